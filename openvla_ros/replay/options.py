"""The options of one replay run (what `openvla-replay` parses) and their validation."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .bag import ReplayError


@dataclass
class ReplayOptions:
    bag: str
    image_topic: str | None = None
    instruction_topic: str | None = None
    instruction: str | None = None
    gt_action_topic: str | None = None
    weights: str | None = None
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    mesh_device: str | None = None
    unnorm_key: str | None = None
    center_crop: bool = False
    speculative: bool = True  # offline: the previous action's tokens as the draft (same actions)
    speculative_max_age_s: float = 1.0  # offline: no draft from an action older than this (image stamps)
    mode: str = "offline"
    rate: float = 1.0
    every: int = 1
    control_rate_hz: float | None = None
    max_frames: int | None = None
    out: str | None = None
    force: bool = False
    gripper_threshold: float = 0.5
    twist_period_s: float = 0.2
    gt_tolerance_s: float = 0.05
    bag_version: int = 8
    progress: bool = True
    # live mode: the running node's topics (relative names resolve in the player's namespace)
    node_image_topic: str = "image"
    node_instruction_topic: str = "instruction"
    node_action_topic: str = "action_preview"
    wait_timeout_s: float = 60.0
    settle_s: float = 2.0


def _positive(v) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def check_options(o: ReplayOptions) -> None:
    """Option values that would fail (or silently do nothing) later: one ReplayError, before any work."""
    if o.mode not in ("offline", "live"):
        raise ReplayError(f"unknown mode {o.mode!r} (offline or live)")
    if o.every < 1:
        raise ReplayError(f"--every must be >= 1, got {o.every}")
    if o.max_frames is not None and o.max_frames < 1:
        raise ReplayError(f"--max-frames must be >= 1, got {o.max_frames}")
    for flag, v in (("--rate", o.rate), ("--twist-period-s", o.twist_period_s),
                    ("--speculative-max-age-s", o.speculative_max_age_s)):
        if not _positive(v):
            raise ReplayError(f"{flag} must be a finite number > 0, got {v}")
    if o.control_rate_hz is not None and not _positive(o.control_rate_hz):
        raise ReplayError(f"--control-rate-hz must be a finite number > 0, got {o.control_rate_hz}")
    for flag, v in (("--gt-tolerance-s", o.gt_tolerance_s), ("--wait-timeout-s", o.wait_timeout_s)):
        if not (math.isfinite(v) and v >= 0):
            raise ReplayError(f"{flag} must be a finite number >= 0, got {v}")
