"""launch_testing: launch/openvla_multi.launch.py with streams:="[left, right]" and per-stream image
topic remaps, fed by two synthetic cameras on different instructions (namespace /multi): actions
arrive on both streams' topics, each carrying its own camera's instruction, both stream statuses
are on /diagnostics, and every process exits 0 when launch shuts them down.

Needs ROS 2's `launch_testing` / `launch_ros` (apt on a ROS 2 machine; not on PyPI): without them
this module is skipped. See docs/ros_node.md ("Tests"):
    scripts/run_isolated.sh .venv/bin/python -m pytest -q test/test_launch_multi.py
"""
from __future__ import annotations

import sys
import tempfile
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

from test_launch import STARTUP_TIMEOUT_S, _collect  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = {"left": "pick up the red cup", "right": "put the spoon in the bowl"}


@pytest.mark.launch_test
def generate_test_description():
    from openvla_model.tiny_checkpoint import write_tiny_checkpoint

    weights = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="tiny_openvla_multi_")), seed=0)
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(ROOT / "launch" / "openvla_multi.launch.py")),
        launch_arguments={"streams": "[left, right]", "image_topics": "[cam_left/image_raw, cam_right/image_raw]",
                          "weights_path": str(weights), "backend": "torch", "device": "cpu",
                          "unnorm_key": "bridge_orig", "namespace": "/multi", "start_enabled": "true",
                          "max_batch_wait_ms": "50"}.items())
    cameras = [Node(executable=sys.executable, arguments=["-m", "openvla_ros.synthetic_camera"],
                    name=f"camera_{s}", namespace="/multi",
                    parameters=[{"rate_hz": 4.0, "instruction": text, "width": 160, "height": 120}],
                    remappings=[("image", f"cam_{s}/image_raw"), ("instruction", f"{s}/instruction")],
                    output="screen", sigterm_timeout="10")
               for s, text in INSTRUCTIONS.items()]
    return launch.LaunchDescription([node, *cameras, launch_testing.actions.ReadyToTest()])


class TestBothStreamsAct(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import rclpy

        rclpy.init()

    @classmethod
    def tearDownClass(cls):
        import rclpy

        rclpy.shutdown()

    def test_each_stream_gets_actions_for_its_own_instruction(self):
        for stream, text in INSTRUCTIONS.items():
            actions = _collect(f"/multi/{stream}/action", 3, timeout=STARTUP_TIMEOUT_S)
            self.assertGreaterEqual(len(actions), 3, f"no actions on /multi/{stream}/action")
            self.assertEqual({a.instruction for a in actions}, {text}, stream)
            for a in actions:
                self.assertEqual(len(a.tokens), 7)
                self.assertGreater(a.header.stamp.sec, 0)

    def test_a_diagnostics_status_per_stream(self):
        from diagnostic_msgs.msg import DiagnosticArray

        from openvla_ros.diagnostics import status_to_dict

        names = {f"/multi/openvla_node/{s}: OpenVLA stream" for s in INSTRUCTIONS}

        def statuses(arrays):
            return {st["name"]: st for arr in arrays for st in map(status_to_dict, arr.status)
                    if st["name"] in names and int(st["values"].get("actions_published", "0")) > 0}

        arrays = _collect("/diagnostics", 10**6, STARTUP_TIMEOUT_S, DiagnosticArray,
                          done=lambda got: len(statuses(got)) == len(names))
        found = statuses(arrays)
        self.assertEqual(set(found), names, "a stream status is missing or never counted an action")
        for name, st in found.items():
            stream = name.split("/")[-1].split(":")[0]
            self.assertEqual(st["values"]["instruction"], INSTRUCTIONS[stream], st)


@launch_testing.post_shutdown_test()
class TestCleanShutdown(unittest.TestCase):
    def test_every_process_exits_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)

    def test_node_closed_its_policy(self, proc_output):
        text = "".join(o.text.decode(errors="replace") for o in proc_output)
        self.assertNotIn("Traceback", text)
        self.assertIn("policy closed", text)
