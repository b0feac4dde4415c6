"""A real EndEffectorAction round trip: a publisher in a child process, a subscriber here,
over DDS confined to loopback (the harness's profile and a run-unique domain)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from conftest import requires_ros

PUBLISHER = textwrap.dedent("""
    import time, rclpy
    from rclpy.node import Node
    from openvla_ros.msg import EndEffectorAction
    rclpy.init()
    node = Node("roundtrip_publisher")
    pub = node.create_publisher(EndEffectorAction, "roundtrip_action", 10)
    msg = EndEffectorAction()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1234, 5678
    msg.header.frame_id = "tool0"
    msg.delta_position.x, msg.delta_position.y, msg.delta_position.z = 0.01, -0.02, 0.03
    msg.delta_orientation.x, msg.delta_orientation.y, msg.delta_orientation.z = 0.1, -0.2, 0.3
    msg.gripper, msg.gripper_raw = 1.0, 0.9961
    msg.normalized = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.9961]
    msg.unclipped = [0.01, -0.02, 0.03, 0.1, -0.2, 0.3, 0.9961]
    msg.tokens = [31744, 31800, 31999, 31872, 31900, 31750, 31745]
    msg.clipped = True
    msg.instruction = "pick up the red cup"
    msg.unnorm_key = "bridge_orig"
    msg.inference_ms, msg.latency_ms = 12.5, 20.25
    deadline = time.time() + 20
    seq = 0
    while time.time() < deadline:
        msg.sequence = seq
        pub.publish(msg)
        seq += 1
        rclpy.spin_once(node, timeout_sec=0.05)
    node.destroy_node()
    rclpy.shutdown()
""")


@requires_ros
def test_end_effector_action_round_trip_between_processes(ros_env):
    import rclpy
    from rclpy.node import Node

    from openvla_ros.msg import EndEffectorAction

    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER], env=ros_env)
    rclpy.init()
    received = []
    try:
        node = Node("roundtrip_subscriber")
        node.create_subscription(EndEffectorAction, "roundtrip_action", received.append, 10)
        deadline = time.time() + 15
        while time.time() < deadline and len(received) < 3:
            rclpy.spin_once(node, timeout_sec=0.1)
        node.destroy_node()
    finally:
        rclpy.shutdown()
        proc.terminate()
        proc.wait(timeout=10)
    assert len(received) >= 3, "no EndEffectorAction arrived from the publisher process"
    m = received[-1]
    assert (m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id) == (1234, 5678, "tool0")
    assert (m.delta_position.x, m.delta_position.y, m.delta_position.z) == (0.01, -0.02, 0.03)
    assert (m.delta_orientation.x, m.delta_orientation.y, m.delta_orientation.z) == (0.1, -0.2, 0.3)
    assert m.gripper == 1.0 and abs(m.gripper_raw - 0.9961) < 1e-6
    assert list(m.tokens) == [31744, 31800, 31999, 31872, 31900, 31750, 31745]
    assert [round(v, 4) for v in m.normalized] == [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.9961]
    assert len(m.unclipped) == 7 and m.clipped is True
    assert (m.instruction, m.unnorm_key) == ("pick up the red cup", "bridge_orig")
    assert (m.inference_ms, m.latency_ms) == (12.5, 20.25)
    assert received[-1].sequence > received[0].sequence
