"""launch_testing: start the real launch files, assert actions flow, and that every process
exits cleanly (code 0) when launch shuts them down.

- launch/openvla_demo.launch.py (synthetic camera + node, tiny checkpoint) in namespace /demo
- launch/openvla.launch.py with mesh_device:=N300 (loads config/mesh/N300.yaml), backend torch,
  start_enabled:=true, fed by a synthetic camera, in namespace /robot

`launch` / `launch_testing` are not on PyPI: without them this module is skipped. Run where they
exist (a ROS 2 Jazzy machine, or a venv with the ros2/launch + ros2/launch_ros sources
pip-installed), see docs/ros_node.md:
    scripts/run_isolated.sh .venv/bin/python -m pytest -q test/test_launch.py
"""
from __future__ import annotations

import sys
import tempfile
import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip("launch_testing", reason="launch_testing not installed (not on PyPI)")
pytest.importorskip("launch_ros", reason="launch_ros not installed (not on PyPI)")

import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from launch_ros.actions import Node  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DIR = ROOT / "launch"


@pytest.mark.launch_test
def generate_test_description():
    from openvla_model.tiny_checkpoint import write_tiny_checkpoint

    weights = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="tiny_openvla_launch_")), seed=0)
    demo = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH_DIR / "openvla_demo.launch.py")),
        launch_arguments={"weights_path": str(weights), "namespace": "/demo", "rate_hz": "4.0"}.items())
    robot = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH_DIR / "openvla.launch.py")),
        launch_arguments={"mesh_device": "N300", "weights_path": str(weights), "backend": "torch",
                          "device": "cpu", "unnorm_key": "bridge_orig", "namespace": "/robot",
                          "image_topic": "camera/image_raw", "start_enabled": "true"}.items())
    camera = Node(executable=sys.executable, arguments=["-m", "openvla_ros.synthetic_camera"],
                  name="robot_camera", namespace="/robot",
                  parameters=[{"rate_hz": 4.0, "instruction": "put the spoon in the bowl", "width": 320,
                               "height": 240}],
                  remappings=[("image", "camera/image_raw")], output="screen")
    return launch.LaunchDescription([demo, robot, camera, launch_testing.actions.ReadyToTest()])


def _collect(topic: str, count: int, timeout: float):
    import rclpy
    from rclpy.node import Node as RclNode

    from openvla_ros.msg import EndEffectorAction

    received = []
    node = RclNode(f"launch_test_listener_{abs(hash(topic)) % 10000}")
    node.create_subscription(EndEffectorAction, topic, received.append, 10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(received) < count:
        rclpy.spin_once(node, timeout_sec=0.1)
    node.destroy_node()
    return received


class TestActionsFlow(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import rclpy

        rclpy.init()

    @classmethod
    def tearDownClass(cls):
        import rclpy

        rclpy.shutdown()

    def test_demo_launch_publishes_actions(self):
        actions = _collect("/demo/action", 3, timeout=60)
        self.assertGreaterEqual(len(actions), 3, "no actions from openvla_demo.launch.py")
        for a in actions:
            self.assertEqual(len(a.tokens), 7)
            self.assertEqual(a.instruction, "pick up the red cup")
            self.assertGreater(a.header.stamp.sec, 0)

    def test_robot_launch_with_n300_profile_publishes_actions(self):
        actions = _collect("/robot/action", 3, timeout=60)
        self.assertGreaterEqual(len(actions), 3, "no actions from openvla.launch.py")
        self.assertEqual(actions[-1].instruction, "put the spoon in the bowl")
        self.assertEqual(actions[-1].unnorm_key, "bridge_orig")


@launch_testing.post_shutdown_test()
class TestCleanShutdown(unittest.TestCase):
    def test_every_process_exits_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)

    def test_node_closed_its_policy(self, proc_output):
        text = "".join(o.text.decode(errors="replace") for o in proc_output)
        self.assertNotIn("Traceback", text)
        self.assertGreaterEqual(text.count("policy closed"), 2, text[-2000:])

