"""What may reach the robot: clipping limits, image and instruction staleness, gripper conventions.

Pure functions over numbers (no ROS, no model): the node calls them, tests check them directly.

Gripper conventions (parameter `gripper_convention`), applied to the model's 7th value `raw`:
  raw              the model's value unchanged.
  unit             mapped linearly from gripper_raw_range [lo, hi] to [0, 1], clamped.
                   OpenVLA's RLDS data pipeline aligns gripper actions to 0 = close, 1 = open,
                   and the Bridge / EEF datasets keep that dimension un-normalised (mask false),
                   so with the default range [0, 1] `unit` is the raw value clamped to [0, 1].
  inverted         1 - unit (for controllers where 1 = close, 0 = open).
  binary           1.0 if unit >= gripper_threshold else 0.0.
  binary_inverted  1.0 - binary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GRIPPER_CONVENTIONS = ("raw", "unit", "inverted", "binary", "binary_inverted")
AXES = ("x", "y", "z", "roll", "pitch", "yaw")


class SafetyError(ValueError):
    """A value the safety layer refuses to act on (non-finite model output, bad limits)."""


@dataclass(frozen=True)
class MotionLimits:
    """Symmetric per-axis limits: |delta| <= limit. Metres for x, y, z; radians for roll, pitch, yaw."""

    max_delta_position_m: tuple[float, float, float]
    max_delta_orientation_rad: tuple[float, float, float]

    def __post_init__(self):
        for name in ("max_delta_position_m", "max_delta_orientation_rad"):
            values = getattr(self, name)
            if len(values) != 3:
                raise SafetyError(f"{name} needs 3 values (one per axis), got {len(values)}")
            for v in values:
                if not (math.isfinite(v) and v > 0):
                    raise SafetyError(f"{name} values must be finite and > 0, got {list(values)}")

    def as_array(self) -> np.ndarray:
        return np.array(list(self.max_delta_position_m) + list(self.max_delta_orientation_rad), np.float64)


@dataclass(frozen=True)
class GripperConfig:
    convention: str = "unit"
    raw_range: tuple[float, float] = (0.0, 1.0)
    threshold: float = 0.5

    def __post_init__(self):
        if self.convention not in GRIPPER_CONVENTIONS:
            raise SafetyError(f"gripper_convention {self.convention!r} is not one of: {', '.join(GRIPPER_CONVENTIONS)}")
        if len(self.raw_range) != 2:
            raise SafetyError(f"gripper_raw_range needs 2 values [lo, hi], got {list(self.raw_range)}")
        lo, hi = self.raw_range
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise SafetyError(f"gripper_raw_range must be finite with lo < hi, got {list(self.raw_range)}")
        if not (0.0 <= self.threshold <= 1.0):
            raise SafetyError(f"gripper_threshold must be in [0, 1], got {self.threshold}")


def apply_gripper_convention(raw: float, cfg: GripperConfig) -> float:
    if not math.isfinite(raw):
        raise SafetyError(f"gripper value is not finite ({raw})")
    if cfg.convention == "raw":
        return float(raw)
    lo, hi = cfg.raw_range
    unit = min(1.0, max(0.0, (raw - lo) / (hi - lo)))
    if cfg.convention == "unit":
        return unit
    if cfg.convention == "inverted":
        return 1.0 - unit
    binary = 1.0 if unit >= cfg.threshold else 0.0
    return binary if cfg.convention == "binary" else 1.0 - binary


@dataclass(frozen=True)
class SafeAction:
    delta_position: tuple[float, float, float]  # metres, after clipping
    delta_orientation: tuple[float, float, float]  # radians, after clipping
    gripper: float  # after the gripper convention
    gripper_raw: float  # the model's 7th value
    clipped_axes: tuple[bool, ...]  # 6 flags, AXES order

    @property
    def clipped(self) -> bool:
        return any(self.clipped_axes)


def make_safe_action(action, limits: MotionLimits, gripper: GripperConfig) -> SafeAction:
    """7 un-normalised values [dx, dy, dz, droll, dpitch, dyaw, gripper] -> a clipped SafeAction.

    Raises SafetyError when any value is NaN/inf: such an action is never published.
    """
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (7,):
        raise SafetyError(f"expected 7 action values, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise SafetyError(f"action has non-finite values: {a.tolist()}")
    lim = limits.as_array()
    motion = np.clip(a[:6], -lim, lim)
    clipped_axes = tuple(bool(c) for c in (motion != a[:6]))
    return SafeAction(delta_position=tuple(float(v) for v in motion[:3]),
                      delta_orientation=tuple(float(v) for v in motion[3:]),
                      gripper=apply_gripper_convention(float(a[6]), gripper),
                      gripper_raw=float(a[6]), clipped_axes=clipped_axes)


def image_age_s(stamp_ns: int, now_ns: int) -> float:
    """Age of an image at `now` (both in nanoseconds of the node's clock). Negative = future stamp."""
    return (now_ns - stamp_ns) * 1e-9


def image_too_old(stamp_ns: int, now_ns: int, max_age_s: float) -> str | None:
    """None when the image may be acted on, else the reason. A zero stamp (driver never set it)
    counts as infinitely old; a stamp further in the future than max_age_s (clock skew between
    camera and node) is refused as well, since its age cannot be trusted."""
    if stamp_ns <= 0:
        return "image has no timestamp (header.stamp is zero)"
    age = image_age_s(stamp_ns, now_ns)
    if age > max_age_s:
        return f"image is {age:.3f} s old (max_image_age_s {max_age_s:g})"
    if age < -max_age_s:
        return f"image stamp is {-age:.3f} s in the future (clock skew?)"
    return None


@dataclass(frozen=True)
class Instruction:
    text: str
    received_ns: int  # node clock when it arrived
    generation: int  # increments on every change, so a result computed for an old one is dropped


def instruction_stale(instr: Instruction | None, now_ns: int, max_age_s: float) -> str | None:
    """None when the instruction may be acted on, else the reason. max_age_s <= 0: never expires."""
    if instr is None or not instr.text:
        return "no instruction"
    if max_age_s > 0:
        age = (now_ns - instr.received_ns) * 1e-9
        if age > max_age_s:
            return f"instruction is {age:.1f} s old (max_instruction_age_s {max_age_s:g})"
    return None


def check_instruction_text(text: str, max_chars: int) -> str:
    """Normalise an incoming instruction; raise SafetyError when it must be refused.
    An empty (or whitespace-only) instruction is refused: it clears the current one.
    The rules are openvla_model.inputs.check_instruction, the one openvla-predict applies too."""
    from openvla_model.inputs import InstructionError, check_instruction

    try:
        return check_instruction(text, max_chars)
    except InstructionError as e:
        raise SafetyError(str(e)) from None
