"""openvla_synthetic_camera: a stand-in camera (and optional instruction source) for demos and tests.

Publishes synthetic table-top frames (openvla_model.synthetic) on `image` (sensor_msgs/Image,
sensor-data QoS) or `image/compressed` (JPEG), stamped with the node clock, at `rate_hz`.
If `instruction` is set, it is published on `instruction` (std_msgs/String, reliable) every
`instruction_period_s`, so the consumer may start before or after this node.
"""
from __future__ import annotations

import signal
import sys
import threading

import rclpy
import rclpy.logging
from rclpy.exceptions import ParameterException
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from .image_conversion import SUPPORTED_ENCODINGS, rgb_to_compressed_msg, rgb_to_image_msg


class SyntheticCamera(Node):
    def __init__(self, node_name: str = "synthetic_camera", **kwargs):
        super().__init__(node_name, **kwargs)
        self.rate_hz = float(self.declare_parameter("rate_hz", 5.0).value)
        width = int(self.declare_parameter("width", 640).value)
        height = int(self.declare_parameter("height", 480).value)
        self.encoding = str(self.declare_parameter("encoding", "rgb8").value)
        self.compressed = bool(self.declare_parameter("compressed", False).value)
        self.frame_id = str(self.declare_parameter("frame_id", "camera").value)
        num_frames = int(self.declare_parameter("num_frames", 4).value)
        self.instruction = str(self.declare_parameter("instruction", "").value)
        instruction_period = float(self.declare_parameter("instruction_period_s", 1.0).value)
        problems = []
        if not self.rate_hz > 0:
            problems.append(f"rate_hz must be > 0, got {self.rate_hz}")
        if width < 1 or height < 1:
            problems.append(f"width and height must be >= 1, got {width}x{height}")
        if self.encoding not in SUPPORTED_ENCODINGS:
            problems.append(f"encoding must be one of {', '.join(SUPPORTED_ENCODINGS)}, got {self.encoding!r}")
        if num_frames < 1 or not instruction_period > 0:
            problems.append("num_frames must be >= 1 and instruction_period_s > 0")
        if problems:
            raise ValueError("; ".join(problems))

        from openvla_model.synthetic import synthetic_rgb  # numpy only

        self.frames = [synthetic_rgb(seed=s, height=height, width=width) for s in range(num_frames)]
        self.count = 0
        if self.compressed:
            self.pub = self.create_publisher(CompressedImage, "image/compressed", qos_profile_sensor_data)
        else:
            self.pub = self.create_publisher(Image, "image", qos_profile_sensor_data)
        self.timer = self.create_timer(1.0 / self.rate_hz, self.publish_frame)
        if self.instruction:
            self.instr_pub = self.create_publisher(String, "instruction",
                                                   QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
            self.instr_timer = self.create_timer(instruction_period, self.publish_instruction)
        self.get_logger().info(
            f"publishing {width}x{height} {'jpeg' if self.compressed else self.encoding} frames at {self.rate_hz:g} Hz"
            + (f", instruction {self.instruction!r}" if self.instruction else ""))

    def publish_frame(self) -> None:
        rgb = self.frames[self.count % len(self.frames)]
        stamp = self.get_clock().now().to_msg()
        if self.compressed:
            msg = rgb_to_compressed_msg(rgb, "jpeg", stamp=stamp, frame_id=self.frame_id)
        else:
            msg = rgb_to_image_msg(rgb, self.encoding, stamp=stamp, frame_id=self.frame_id)
        self.pub.publish(msg)
        self.count += 1

    def publish_instruction(self) -> None:
        self.instr_pub.publish(String(data=self.instruction))


def main(argv=None) -> int:
    rclpy.init(args=sys.argv if argv is None else argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node = SyntheticCamera()
    except (ValueError, ParameterException) as e:
        rclpy.logging.get_logger("synthetic_camera").error(f"invalid parameters: {e}")
        rclpy.try_shutdown()
        return 2
    try:
        while not stop.is_set() and rclpy.ok():
            rclpy.spin_once(node, timeout_sec=0.1)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
