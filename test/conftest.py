"""Test harness: DDS stays on loopback, each run gets its own ROS domain, and the tiny random
checkpoint is written once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

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
    try:
        import rclpy  # noqa: F401

        from openvla_ros.msg import EndEffectorAction  # noqa: F401
    except Exception as e:  # ImportError, or the wheels' C extensions failing to load
        return False, f"rclpy / generated openvla_ros.msg not importable ({e}); run `make setup`"
    return True, ""


requires_ros = pytest.mark.skipif(not ros_available()[0], reason=ros_available()[1] or "ROS available")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the exact HF layout (3 bf16 shards + index)."""
    from openvla_model.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_openvla"), seed=0)


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
