"""Live replay: openvla_node (dry run) + openvla-replay --mode live playing a bag into it.

    ros2 launch openvla_ros openvla_replay.launch.py bag:=/data/episode_42 \
        weights_path:=/path/to/openvla-7b unnorm_key:=bridge_orig backend:=torch out:=/tmp/ep42_live

The node starts with motion disabled (start_enabled:=false): the replay records `action_preview`
(every action that passed the safety checks), so a robot on the same graph never moves. The
report lands in `out`; launch shuts down when the replay finishes. With rosbag2 installed you can
instead run `ros2 bag play` against a running node (see docs/replay.md).
"""
import os

from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, ExecuteProcess, IncludeLaunchDescription,
                            OpaqueFunction, RegisterEventHandler)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import EnvironmentVariable, LaunchConfiguration

from openvla_ros.launch_support import executable_command

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))

ARGUMENTS = [
    ("bag", "", "rosbag2 folder (sqlite3 or mcap) to replay"),
    ("out", "", "report folder (default: ./<bag>_openvla_replay)"),
    ("rate", "1.0", "playback speed factor"),
    ("bag_image_topic", "", "image topic in the bag (empty: the only one)"),
    ("bag_instruction_topic", "", "instruction topic in the bag (empty: the only one)"),
    ("instruction", "", "instruction for every frame instead of the bag's"),
    ("weights_path", EnvironmentVariable("OPENVLA_WEIGHTS", default_value=""), "checkpoint (default $OPENVLA_WEIGHTS)"),
    ("backend", "", "ttnn | torch (empty: params file)"),
    ("device", "", "torch device (empty: params file)"),
    ("mesh_device", "auto", "N300 | T3K | auto"),
    ("unnorm_key", "", "dataset statistics key, e.g. bridge_orig"),
    ("namespace", "openvla_replay", "namespace of the node under test (keeps it apart from a live robot graph)"),
]


def _make(context, *args, **kwargs):
    def arg(name):
        return LaunchConfiguration(name).perform(context).strip()

    ns = "/" + arg("namespace").strip("/") if arg("namespace") else ""
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(LAUNCH_DIR, "openvla.launch.py")),
        launch_arguments={"namespace": arg("namespace"), "weights_path": arg("weights_path"),
                          "backend": arg("backend"), "device": arg("device"), "mesh_device": arg("mesh_device"),
                          "unnorm_key": arg("unnorm_key"), "start_enabled": "false",
                          "image_topic": "image", "instruction_topic": "instruction"}.items())
    cmd = executable_command("openvla_ros.replay.cli", "openvla-replay") + [arg("bag"), "--mode", "live", "--rate", arg("rate"),
                               "--node-image-topic", f"{ns}/image", "--node-instruction-topic", f"{ns}/instruction",
                               "--node-action-topic", f"{ns}/action_preview", "--wait-timeout-s", "300"]
    for name, flag in (("out", "--out"), ("bag_image_topic", "--image-topic"),
                       ("bag_instruction_topic", "--instruction-topic"), ("instruction", "--instruction")):
        if arg(name):
            cmd += [flag, arg(name)]
    # On Ctrl-C the replay stops after the current frame and writes a partial report (plots
    # included): give it time before launch escalates to SIGTERM.
    replay = ExecuteProcess(cmd=cmd, name="openvla_replay", output="screen", sigterm_timeout="30")
    done = RegisterEventHandler(OnProcessExit(target_action=replay, on_exit=[EmitEvent(event=Shutdown(
        reason="replay finished"))]))
    return [node, replay, done]


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(n, default_value=d, description=doc) for n, d, doc in ARGUMENTS]
        + [OpaqueFunction(function=_make)])
