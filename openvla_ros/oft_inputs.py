"""The extra inputs of OpenVLA-OFT checkpoints, as the node and openvla-replay read them (plain
functions over message objects: rclpy messages and rosbags messages alike; no ROS import).

Wrist camera: topic `wrist_image` (sensor_msgs/Image) or `wrist_image/compressed`
(sensor_msgs/CompressedImage), the same `image_transport` as the primary camera, converted by
openvla_ros.image_conversion (the same encodings, decoder and checks as the primary image: no
second decoder). The checkpoint's image order is [primary, wrist] (docs/oft.md).

Robot state (proprio): topic `proprio`, one of
  joint_state    sensor_msgs/JointState: `position` of the joints named in `proprio_joint_names`,
                 in that order (a name missing from the message is refused); with no names given,
                 every position in message order.
  float64_array  std_msgs/Float64MultiArray: `data`, or data[i] for each i in `proprio_indices`.
The result must have the checkpoint's PROPRIO_DIM values, all finite; the policy normalises it
with the checkpoint's proprio statistics. LIBERO checkpoints take 8 values (end-effector
position 3, axis-angle 3, gripper joint positions 2), so a LIBERO-like robot publishes its
end-effector state as a Float64MultiArray; ALOHA checkpoints take the 14 joint positions
(JointState with the 14 names).
Every malformed message raises ProprioError (an openvla_model InputError) naming the problem.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from openvla_model.errors import InputError


PROPRIO_TYPES = ("float64_array", "joint_state")


class ProprioError(InputError):
    """A robot-state message the node cannot use."""


def _check(values: np.ndarray, expected_dim: int | None, what: str) -> np.ndarray:
    if expected_dim is not None and values.size != expected_dim:
        raise ProprioError(f"{what} gives {values.size} proprio values, the checkpoint takes {expected_dim}")
    if not np.isfinite(values).all():
        bad = [i for i, v in enumerate(values.tolist()) if not np.isfinite(v)]
        raise ProprioError(f"{what} has non-finite proprio values at {bad}")
    return values


def proprio_from_joint_state(msg, joint_names: Sequence[str] = (), expected_dim: int | None = None) -> np.ndarray:
    """sensor_msgs/JointState -> float64 (P,): the positions of `joint_names` in that order (all
    positions in message order when empty)."""
    names = [str(n) for n in msg.name]
    try:
        position = np.asarray(msg.position, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ProprioError(f"JointState position is not numeric: {e}") from None
    if not joint_names:
        return _check(position, expected_dim, "JointState position")
    if len(names) != position.size:
        raise ProprioError(f"JointState has {len(names)} names but {position.size} positions")
    index = {}
    for i, n in enumerate(names):
        if n in index:
            raise ProprioError(f"JointState names joint {n!r} twice")
        index[n] = i
    missing = [n for n in joint_names if n not in index]
    if missing:
        shown = ", ".join(names[:20]) or "none"
        raise ProprioError(f"JointState lacks joint(s) {', '.join(missing)} of proprio_joint_names (it has: {shown})")
    return _check(position[[index[n] for n in joint_names]], expected_dim, "JointState (proprio_joint_names)")


def proprio_from_float64_array(msg, indices: Sequence[int] = (), expected_dim: int | None = None) -> np.ndarray:
    """std_msgs/Float64MultiArray -> float64 (P,): data, or data[i] for each i in `indices`."""
    try:
        data = np.asarray(msg.data, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ProprioError(f"Float64MultiArray data is not numeric: {e}") from None
    if not len(indices):
        return _check(data, expected_dim, "Float64MultiArray data")
    bad = [int(i) for i in indices if not 0 <= int(i) < data.size]
    if bad:
        raise ProprioError(f"proprio_indices {bad} out of range for a Float64MultiArray of {data.size} values")
    return _check(data[[int(i) for i in indices]], expected_dim, "Float64MultiArray (proprio_indices)")


def proprio_from_msg(msg, proprio_type: str, *, joint_names: Sequence[str] = (), indices: Sequence[int] = (),
                     expected_dim: int | None = None) -> np.ndarray:
    if proprio_type == "joint_state":
        return proprio_from_joint_state(msg, joint_names, expected_dim)
    if proprio_type == "float64_array":
        return proprio_from_float64_array(msg, indices, expected_dim)
    raise ValueError(f"proprio_type {proprio_type!r} is not one of: {', '.join(PROPRIO_TYPES)}")
