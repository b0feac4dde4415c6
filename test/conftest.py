"""Test harness: DDS stays on loopback, each run gets its own ROS domain, and the tiny random
checkpoint is written once per session."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_PROFILE = ROOT / "config" / "dds" / "fastdds_loopback.xml"

# Before anything imports rclpy: loopback-only discovery + transports, a run-unique domain.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("FASTRTPS_DEFAULT_PROFILES_FILE", str(LOOPBACK_PROFILE))
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(LOOPBACK_PROFILE))
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.pop("OPENVLA_WEIGHTS", None)  # tests name their weights explicitly
os.environ.pop("MESH_DEVICE", None)


def ros_available() -> tuple[bool, str]:
    """Skip the ROS tests only where rclpy is not installed at all. Anything else (rclpy's C
    extension failing to load, a broken openvla_ros.msg build) is a failure of the tests that
    need it, never a skip: they import what they use and fail with the real error."""
    if importlib.util.find_spec("rclpy") is None:
        return False, "rclpy is not installed (no ROS 2 wheels in this environment); run `make setup`"
    return True, ""


requires_ros = pytest.mark.skipif(not ros_available()[0], reason=ros_available()[1] or "ROS available")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the exact HF layout (3 bf16 shards + index)."""
    from openvla_model.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_openvla"), seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    """(config, prompt tokenizer, CPU preprocessor) of the tiny checkpoint, for backend-level tests."""
    from openvla_model.config import load_config
    from openvla_model.preprocess import Preprocessor
    from openvla_model.prompt import PromptTokenizer

    config = load_config(tiny_weights)
    return config, PromptTokenizer(tiny_weights), Preprocessor(config)


@pytest.fixture(scope="session")
def tiny_policy(tiny_weights):
    from openvla_model import load_policy

    policy = load_policy(tiny_weights, backend="torch", device="cpu", dtype="float32")
    yield policy
    policy.close()


@pytest.fixture
def ros_env() -> dict:
    """Environment for ROS child processes: the same loopback settings and domain as this run."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def venv_python() -> str:
    return sys.executable


def spec_action(tokens, action_stats: dict) -> np.ndarray:
    """openvla-spec.md section 5, written out independently of openvla_model.action_codec (tests
    compare the pipeline's actions with this, never with the codec the pipeline itself calls):
    normalized = bin centre of clip(32000 - token - 1, 0, 254), centre[k] = -1 + (2k+1)/255; where
    mask (default all true): 0.5 * (normalized + 1) * (q99 - q01) + q01, elsewhere unchanged."""
    t = np.asarray(tokens, dtype=np.int64)
    normalized = -1.0 + (2 * np.clip(32000 - t - 1, 0, 254) + 1) / 255.0
    q01, q99 = np.asarray(action_stats["q01"], np.float64), np.asarray(action_stats["q99"], np.float64)
    mask = np.asarray(action_stats.get("mask", [True] * t.size), bool)
    return np.where(mask, 0.5 * (normalized + 1.0) * (q99 - q01) + q01, normalized)


def checkpoint_action_stats(weights_dir, unnorm_key: str) -> dict:
    """norm_stats[unnorm_key]["action"] read straight from the checkpoint's config.json."""
    return json.loads((Path(weights_dir) / "config.json").read_text())["norm_stats"][unnorm_key]["action"]
