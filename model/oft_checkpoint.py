"""A tiny random OpenVLA-OFT checkpoint in the official layout.

The HF files come from tiny_checkpoint.write_tiny_checkpoint (same writers, same tiny widths); beside
them, as a fine-tuning run of moojink/openvla-oft leaves them:
  dataset_statistics.json                   the fine-tuning statistics (LIBERO-shaped: 7 actions, 8 proprio)
  action_head--<step>_checkpoint.pt         L1RegressionActionHead state dict, `module.` prefixed (DDP)
  proprio_projector--<step>_checkpoint.pt   ProprioProjector state dict, `module.` prefixed
config.json keeps the base model's norm_stats, as merged OFT checkpoints do. Its actions are
MEANINGLESS: random weights.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import load_config
from .oft import ACTION_HEAD, PROPRIO_PROJECTOR, L1RegressionActionHead, ProprioProjector
from .tiny_checkpoint import write_tiny_checkpoint

log = logging.getLogger("openvla_model")

TINY_OFT_STEP = 150000
TINY_OFT_DATASET = "libero_spatial_no_noops"
# LIBERO-shaped statistics (made-up values of a plausible range): 7 action dims (6 EEF deltas +
# gripper, gripper not normalised), 8 proprio dims (EEF position 3, axis-angle 3, gripper 2).
TINY_OFT_STATS = {
    TINY_OFT_DATASET: {
        "action": {
            "mean": [0.15, 0.13, -0.15, -0.005, 0.004, -0.003, -0.02],
            "std": [0.41, 0.35, 0.5, 0.04, 0.07, 0.08, 0.99],
            "max": [0.9375, 0.9375, 0.9375, 0.1971, 0.3364, 0.375, 1.0],
            "min": [-0.9375, -0.9375, -0.9375, -0.1875, -0.3675, -0.36, -1.0],
            "q01": [-0.7454, -0.6664, -0.9375, -0.1071, -0.2079, -0.1875, -1.0],
            "q99": [0.9375, 0.8758, 0.9321, 0.1039, 0.1757, 0.1843, 1.0],
            "mask": [True, True, True, True, True, True, False],
        },
        "proprio": {
            "mean": [-0.024, 0.107, 1.058, 3.007, -0.097, -0.082, 0.026, -0.027],
            "std": [0.101, 0.151, 0.38, 0.17, 0.55, 0.32, 0.014, 0.014],
            "max": [0.1759, 0.3904, 1.3290, 3.4121, 1.4866, 1.3185, 0.0416, 0.0013],
            "min": [-0.3149, -0.2590, 0.0076, 2.3641, -1.5458, -1.2498, -0.0014, -0.0419],
            "q01": [-0.2947, -0.2487, 0.0122, 2.3896, -1.2702, -0.9916, 0.0012, -0.0408],
            "q99": [0.1615, 0.3634, 1.3002, 3.3622, 0.7959, 0.7584, 0.0408, -0.0011],
        },
        "num_transitions": 52970,
        "num_trajectories": 432,
    }
}


def _ddp(state: dict, prefix: bool) -> dict:
    return {(f"module.{k}" if prefix else k): v for k, v in state.items()}


def write_tiny_oft_checkpoint(out_dir: str | Path, seed: int = 0, *, step: int | str = TINY_OFT_STEP,
                              action_head: bool = True, proprio_projector: bool = True, ddp_prefix: bool = True,
                              dtype: torch.dtype = torch.bfloat16, num_shards: int = 3) -> Path:
    """Write the tiny OFT checkpoint; action_head / proprio_projector=False leave that file out."""
    out = write_tiny_checkpoint(out_dir, seed=seed, dtype=dtype, num_shards=num_shards)
    (out / "dataset_statistics.json").write_text(json.dumps(TINY_OFT_STATS, indent=2))
    stats = TINY_OFT_STATS[TINY_OFT_DATASET]
    action_dim, proprio_dim = len(stats["action"]["q01"]), len(stats["proprio"]["q01"])
    llm_dim = int(load_config(out).llm.hidden_size)
    torch.manual_seed(seed + 1)
    for old in list(out.glob(f"{ACTION_HEAD}--*.pt")) + list(out.glob(f"{PROPRIO_PROJECTOR}--*.pt")):
        old.unlink()
    if action_head:
        head = L1RegressionActionHead(llm_dim, llm_dim, action_dim)
        torch.save(_ddp({k: v.to(dtype) for k, v in head.state_dict().items()}, ddp_prefix),
                   out / f"{ACTION_HEAD}--{step}_checkpoint.pt")
    if proprio_projector:
        proj = ProprioProjector(proprio_dim, llm_dim)
        torch.save(_ddp({k: v.to(dtype) for k, v in proj.state_dict().items()}, ddp_prefix),
                   out / f"{PROPRIO_PROJECTOR}--{step}_checkpoint.pt")
    (out / "README.txt").write_text(
        "TINY RANDOM OpenVLA-OFT test checkpoint written by openvla_model.oft_checkpoint.\n"
        "HF files as openvla/openvla-7b at tiny sizes, plus the OFT action head / proprio projector .pt files "
        "and LIBERO-shaped dataset_statistics.json. Its actions are MEANINGLESS.\n")
    log.warning("wrote a TINY RANDOM OpenVLA-OFT checkpoint to %s: its actions are meaningless", out)
    return out
