"""The safety layer: per-axis clipping, non-finite rejection, gripper conventions, image and
instruction staleness, instruction text checks (pure functions, no ROS)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from openvla_ros.safety import (GripperConfig, Instruction, MotionLimits, SafetyError, apply_gripper_convention,
                                check_instruction_text, image_too_old, instruction_stale, make_safe_action)

LIMITS = MotionLimits((0.01, 0.02, 0.03), (0.1, 0.2, 0.3))
UNIT = GripperConfig("unit")


def test_values_inside_the_limits_pass_unchanged():
    a = [0.005, -0.019, 0.0, 0.1, -0.05, 0.299, 0.7]
    s = make_safe_action(a, LIMITS, UNIT)
    assert s.delta_position == pytest.approx((0.005, -0.019, 0.0))
    assert s.delta_orientation == pytest.approx((0.1, -0.05, 0.299))
    assert s.clipped_axes == (False,) * 6 and not s.clipped
    assert s.gripper_raw == pytest.approx(0.7)


def test_each_axis_is_clipped_to_its_own_limit_with_sign_kept():
    a = [0.5, -0.5, 0.5, -5.0, 5.0, -5.0, 1.0]
    s = make_safe_action(a, LIMITS, UNIT)
    assert s.delta_position == pytest.approx((0.01, -0.02, 0.03))
    assert s.delta_orientation == pytest.approx((-0.1, 0.2, -0.3))
    assert s.clipped_axes == (True,) * 6 and s.clipped


def test_only_the_offending_axis_is_flagged():
    s = make_safe_action([0.0, 0.0, 0.031, 0.0, 0.0, 0.0, 0.0], LIMITS, UNIT)
    assert s.clipped_axes == (False, False, True, False, False, False)
    assert s.delta_position[2] == pytest.approx(0.03)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("index", [0, 4, 6])
def test_non_finite_values_are_never_turned_into_an_action(bad, index):
    a = [0.0] * 7
    a[index] = bad
    with pytest.raises(SafetyError, match="non-finite"):
        make_safe_action(a, LIMITS, UNIT)


def test_wrong_number_of_values_is_refused():
    with pytest.raises(SafetyError, match="7 action values"):
        make_safe_action([0.0] * 6, LIMITS, UNIT)


@pytest.mark.parametrize("pos,rot", [((0.0, 0.1, 0.1), (0.1,) * 3), ((0.1,) * 3, (0.1, -1.0, 0.1)),
                                     ((0.1, 0.1), (0.1,) * 3), ((math.nan, 0.1, 0.1), (0.1,) * 3)])
def test_limits_must_be_three_positive_finite_values(pos, rot):
    with pytest.raises(SafetyError):
        MotionLimits(pos, rot)


@pytest.mark.parametrize("convention,raw,expected", [
    ("raw", 0.73, 0.73), ("raw", -0.4, -0.4),
    ("unit", 0.73, 0.73), ("unit", -0.4, 0.0), ("unit", 1.6, 1.0),
    ("inverted", 0.73, 0.27), ("inverted", -0.4, 1.0),
    ("binary", 0.49, 0.0), ("binary", 0.5, 1.0), ("binary", 0.9, 1.0),
    ("binary_inverted", 0.49, 1.0), ("binary_inverted", 0.9, 0.0),
])
def test_gripper_conventions_with_the_default_range(convention, raw, expected):
    assert apply_gripper_convention(raw, GripperConfig(convention)) == pytest.approx(expected)


def test_gripper_range_and_threshold_are_honoured():
    cfg = GripperConfig("unit", raw_range=(-1.0, 1.0))
    assert apply_gripper_convention(-1.0, cfg) == 0.0
    assert apply_gripper_convention(0.0, cfg) == pytest.approx(0.5)
    assert apply_gripper_convention(0.5, cfg) == pytest.approx(0.75)
    binary = GripperConfig("binary", raw_range=(-1.0, 1.0), threshold=0.8)
    assert apply_gripper_convention(0.5, binary) == 0.0  # unit 0.75 < 0.8
    assert apply_gripper_convention(0.7, binary) == 1.0  # unit 0.85


def test_gripper_convention_goes_into_the_safe_action():
    s = make_safe_action([0.0] * 6 + [0.2], LIMITS, GripperConfig("inverted"))
    assert s.gripper == pytest.approx(0.8) and s.gripper_raw == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs", [dict(convention="open_close"), dict(raw_range=(1.0, 0.0)),
                                    dict(raw_range=(0.0,)), dict(threshold=1.5)])
def test_bad_gripper_configuration_is_refused(kwargs):
    with pytest.raises(SafetyError):
        GripperConfig(**kwargs)


def test_gripper_nan_is_refused():
    with pytest.raises(SafetyError):
        apply_gripper_convention(math.nan, UNIT)


S = 1_000_000_000


def test_image_age_rules():
    now = 100 * S
    assert image_too_old(now - S // 2, now, 1.0) is None
    assert image_too_old(now, now, 1.0) is None
    assert "old" in image_too_old(now - 2 * S, now, 1.0)
    assert "no timestamp" in image_too_old(0, now, 1.0)
    assert "future" in image_too_old(now + 3 * S, now, 1.0)
    assert image_too_old(now + S // 2, now, 1.0) is None  # small skew tolerated


def test_instruction_staleness():
    now = 50 * S
    assert instruction_stale(None, now, 0.0) == "no instruction"
    fresh = Instruction("pick up the cup", now - 10 * S, 1)
    assert instruction_stale(fresh, now, 0.0) is None  # 0 = never expires
    assert instruction_stale(fresh, now, 20.0) is None
    assert "old" in instruction_stale(fresh, now, 5.0)


def test_instruction_text_checks():
    assert check_instruction_text("  pick   up\tthe cup \n", 100) == "pick up the cup"
    for bad, why in [("", "empty"), ("   \n\t", "empty"), ("x" * 10_000, "max_instruction_chars"),
                     ("pick\x00up", "non-printable"), ("go\x1b[2J", "non-printable")]:
        with pytest.raises(SafetyError, match=why):
            check_instruction_text(bad, 1000)
    with pytest.raises(SafetyError):
        check_instruction_text(None, 10)


def test_limits_as_array_order_matches_axes():
    np.testing.assert_allclose(LIMITS.as_array(), [0.01, 0.02, 0.03, 0.1, 0.2, 0.3])
