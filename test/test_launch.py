"""launch_testing: start the real launch files, assert actions flow, and that every process
exits cleanly (code 0) when launch shuts them down.

- launch/openvla_demo.launch.py (synthetic camera + node, tiny checkpoint) in namespace /demo
- launch/openvla.launch.py with mesh_device:=N300 (loads config/mesh/N300.yaml: /diagnostics must
  report mesh_device N300, which only that file sets), backend torch, start_enabled:=true, fed by
  a synthetic camera, in namespace /robot

Needs ROS 2's `launch_testing` / `launch_ros` (apt on a ROS 2 machine; not on PyPI): without them
this module is skipped. `.ci/run` installs them into the venv when an offline overlay of them sits
beside the checkout; see docs/ros_node.md ("Tests"):
    scripts/run_isolated.sh .venv/bin/python -m pytest -q test/test_launch.py
"""
from __future__ import annotations

import sys
import tempfile
import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip("launch_testing", reason="launch_testing not installed (ROS 2 launch; not on PyPI)")
pytest.importorskip("launch_ros", reason="launch_ros not installed (ROS 2 launch; not on PyPI)")

import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from launch_ros.actions import Node  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DIR = ROOT / "launch"
# Deadline for the first actions / the active status. The tiny model loads in a few seconds, but
# two nodes importing torch on a loaded 2-core machine took 72 s (load average 9.4): the waits
# return as soon as the messages arrive, so a long deadline costs nothing when all is well.
STARTUP_TIMEOUT_S = 180


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
                  remappings=[("image", "camera/image_raw")], output="screen", sigterm_timeout="10")
    return launch.LaunchDescription([demo, robot, camera, launch_testing.actions.ReadyToTest()])


def _collect(topic: str, count: int, timeout: float, msg_type=None, done=None):
    """Messages on topic until `count` arrived (or done(received) is true) or the timeout."""
    import rclpy
    from rclpy.node import Node as RclNode

    from openvla_ros.msg import EndEffectorAction

    received = []
    node = RclNode(f"launch_test_listener_{abs(hash(topic)) % 10000}")
    node.create_subscription(msg_type or EndEffectorAction, topic, received.append, 10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(received) < count and not (done and done(received)):
        rclpy.spin_once(node, timeout_sec=0.1)
    node.destroy_node()
    return received


def _node_status(node_fqn: str, timeout: float) -> dict | None:
    """The node's newest OpenVLA status on /diagnostics, as a dict (None: none arrived)."""
    from diagnostic_msgs.msg import DiagnosticArray

    from openvla_ros.diagnostics import status_to_dict

    def statuses(arrays):
        return [status_to_dict(st) for arr in arrays for st in arr.status if st.name.startswith(f"{node_fqn}:")]

    arrays = _collect("/diagnostics", 10**6, timeout, DiagnosticArray,
                      done=lambda got: any(st["values"].get("lifecycle_state") == "active" for st in statuses(got)))
    found = statuses(arrays)
    return found[-1] if found else None


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
        actions = _collect("/demo/action", 3, timeout=STARTUP_TIMEOUT_S)
        self.assertGreaterEqual(len(actions), 3, "no actions from openvla_demo.launch.py")
        for a in actions:
            self.assertEqual(len(a.tokens), 7)
            self.assertEqual(a.instruction, "pick up the red cup")
            self.assertGreater(a.header.stamp.sec, 0)

    def test_robot_launch_with_n300_profile_publishes_actions(self):
        actions = _collect("/robot/action", 3, timeout=STARTUP_TIMEOUT_S)
        self.assertGreaterEqual(len(actions), 3, "no actions from openvla.launch.py")
        self.assertEqual(actions[-1].instruction, "put the spoon in the bowl")
        self.assertEqual(actions[-1].unnorm_key, "bridge_orig")
        # The N300 profile was loaded: config/openvla.yaml says mesh_device auto and the launch file
        # passes no mesh_device for a mesh that has a profile, so N300 can only come from
        # config/mesh/N300.yaml.
        status = _node_status("/robot/openvla_node", timeout=STARTUP_TIMEOUT_S)
        self.assertIsNotNone(status, "no /diagnostics status from /robot/openvla_node")
        values = status["values"]
        self.assertEqual(values.get("lifecycle_state"), "active", status)
        self.assertEqual(values.get("mesh_device"), "N300", status)
        self.assertEqual((values.get("backend"), values.get("device")), ("torch", "cpu"), status)
        self.assertEqual(status["hardware_id"], "torch:cpu", status)


@launch_testing.post_shutdown_test()
class TestCleanShutdown(unittest.TestCase):
    def test_every_process_exits_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)

    def test_node_closed_its_policy(self, proc_output):
        text = "".join(o.text.decode(errors="replace") for o in proc_output)
        self.assertNotIn("Traceback", text)
        self.assertGreaterEqual(text.count("policy closed"), 2, text[-2000:])

