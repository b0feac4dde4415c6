"""`openvla-bench`: the model benchmark (openvla_model.bench) starting from a 640x480 bgr8
sensor_msgs/Image-shaped message converted by the node's own image conversion, so the table
covers every stage the node runs. Needs no ROS installation (the conversion is numpy)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np

from openvla_model.bench import FrameSource, main as bench_main

from .image_conversion import image_msg_to_rgb


def bgr8_message(rgb: np.ndarray):
    """A sensor_msgs/Image-shaped object (bgr8) holding the frame, as a camera driver sends it."""
    h, w, _ = rgb.shape
    return SimpleNamespace(encoding="bgr8", height=h, width=w, step=w * 3,
                           data=np.ascontiguousarray(rgb[..., ::-1]).tobytes())


def main(argv=None) -> int:
    return bench_main(argv, FrameSource(bgr8_message, image_msg_to_rgb,
                                        "openvla_ros.image_conversion.image_msg_to_rgb (bgr8)"))


if __name__ == "__main__":
    sys.exit(main())
