"""Demo: synthetic camera + instruction -> openvla_node on the tiny random checkpoint (CPU).

    ros2 launch openvla_ros openvla_demo.launch.py weights_path:=build/tiny_openvla
    ros2 topic echo /action

The tiny checkpoint comes from `openvla-tiny-checkpoint build/tiny_openvla` (or `make demo`);
its actions are MEANINGLESS (random weights). Without `ros2 launch`, `make demo` starts the
same two executables (scripts/demo.sh -> openvla_ros.demo).
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node

from openvla_ros.launch_support import node_command

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(os.path.dirname(LAUNCH_DIR), "config")


def _make_nodes(context, *args, **kwargs):
    def arg(name):
        return LaunchConfiguration(name).perform(context).strip()

    camera = Node(
        **node_command("openvla_ros.synthetic_camera", "openvla_synthetic_camera"),
        name="synthetic_camera", namespace=arg("namespace"),
        parameters=[{"rate_hz": float(arg("rate_hz")), "instruction": arg("instruction"),
                     "width": 640, "height": 480}],
        output="screen",
        sigterm_timeout="10")  # SIGINT -> exit takes well under 1 s; margin for a loaded machine
    node = Node(
        **node_command("openvla_ros.node", "openvla_node"),
        name="openvla_node", namespace=arg("namespace"),
        parameters=[os.path.join(CONFIG_DIR, "openvla.yaml"),
                    {"backend": arg("backend"), "device": arg("device"), "weights_path": arg("weights_path"),
                     "unnorm_key": arg("unnorm_key"), "start_enabled": True, "publish_twist": True,
                     "publish_gripper": True}],
        output="screen", emulate_tty=True,
        sigterm_timeout="15")  # let the node publish its zero-motion action and close the device
    return [camera, node]


def generate_launch_description():
    args = [
        ("weights_path", EnvironmentVariable("OPENVLA_WEIGHTS", default_value="build/tiny_openvla"),
         "checkpoint directory (default $OPENVLA_WEIGHTS, else build/tiny_openvla)"),
        ("instruction", "pick up the red cup", "instruction the synthetic source publishes"),
        ("rate_hz", "5.0", "synthetic camera rate"),
        ("backend", "torch", "ttnn | torch"),
        ("device", "cpu", "torch device"),
        ("unnorm_key", "bridge_orig", "dataset statistics key"),
        ("namespace", "", "namespace for both nodes"),
    ]
    return LaunchDescription([DeclareLaunchArgument(n, default_value=d, description=doc) for n, d, doc in args]
                             + [OpaqueFunction(function=_make_nodes)])
