"""Run OpenVLA on a robot:

    ros2 launch openvla_ros openvla.launch.py mesh_device:=N300 weights_path:=/path/to/openvla-7b

Parameters come from, in order (later wins): params_file (default config/openvla.yaml), the
per-mesh parameters config/mesh/<mesh_device>.yaml (N300, T3K; `auto` uses $MESH_DEVICE; the TT-NN
precision profile itself is config/ttnn/<mesh>.yaml),
then the non-empty launch arguments below. The node starts in dry-run mode unless
start_enabled:=true: actions appear on `action_preview`; enable motion with
    ros2 service call /<namespace>/openvla_node/enable std_srvs/srv/SetBool "{data: true}"
See docs/ros_node.md.
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node

from openvla_ros.launch_support import node_command, node_parameters

# Works from the source tree and from share/openvla_ros/launch (config/ sits beside launch/).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")

ARGUMENTS = [
    ("mesh_device", "auto", "TT-NN mesh: N300 | T3K | auto ($MESH_DEVICE); selects config/mesh/<mesh>.yaml"),
    ("weights_path", EnvironmentVariable("OPENVLA_WEIGHTS", default_value=""),
     "checkpoint directory in the HF openvla-7b layout (default $OPENVLA_WEIGHTS)"),
    ("backend", "", "ttnn | torch (empty: the params file's value, ttnn by default)"),
    ("device", "", "torch device: auto | cpu | cuda (empty: params file)"),
    ("unnorm_key", "", "dataset statistics key, e.g. bridge_orig (empty: params file)"),
    ("params_file", os.path.join(CONFIG_DIR, "openvla.yaml"), "ros__parameters YAML for the node"),
    ("image_topic", "image", "camera topic (sensor_msgs/Image; <topic>/compressed with image_transport:=compressed)"),
    ("image_transport", "", "raw | compressed (empty: params file)"),
    ("instruction_topic", "instruction", "std_msgs/String topic carrying the language instruction"),
    ("wrist_image_topic", "wrist_image", "OpenVLA-OFT checkpoints with 2 images: the wrist camera topic (as image_topic)"),
    ("proprio_topic", "proprio", "OpenVLA-OFT checkpoints with proprio: robot state topic (proprio_type in params_file)"),
    ("namespace", "", "namespace for the node and its relative topics"),
    ("node_name", "openvla_node", "node name"),
    ("start_enabled", "false", "publish motion immediately (false: dry run until ~/enable true)"),
    ("use_sim_time", "false", "use /clock (bag replay, simulation)"),
    ("log_level", "info", "debug | info | warn | error"),
]


def _make_node(context, *args, **kwargs):
    def arg(name):
        return LaunchConfiguration(name).perform(context).strip()

    parameters = node_parameters(arg, CONFIG_DIR)
    image_topic, wrist_topic = arg("image_topic"), arg("wrist_image_topic")
    return [Node(
        **node_command("openvla_ros.node", "openvla_node"),
        name=arg("node_name"),
        namespace=arg("namespace"),
        parameters=parameters,
        remappings=[("image", image_topic), ("image/compressed", f"{image_topic}/compressed"),
                    ("instruction", arg("instruction_topic")), ("wrist_image", wrist_topic),
                    ("wrist_image/compressed", f"{wrist_topic}/compressed"), ("proprio", arg("proprio_topic"))],
        ros_arguments=["--log-level", arg("log_level")],
        output="screen",
        emulate_tty=True,
        sigterm_timeout="15",  # let the node publish its zero-motion action and close the device
    )]


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=doc) for name, default, doc in ARGUMENTS]
        + [OpaqueFunction(function=_make_node)])
