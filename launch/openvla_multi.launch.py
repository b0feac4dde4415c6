"""One policy, several cameras / robots (streams), batched:

    ros2 launch openvla_ros openvla_multi.launch.py streams:="[left, right]" \
        image_topics:="[/cam_left/image_raw, /cam_right/image_raw]" weights_path:=/path/to/openvla-7b

Each stream has its own topics in the node's namespace: <stream>/image (remapped to the stream's
entry of image_topics; <topic>/compressed with image_transport:=compressed), <stream>/instruction
(instruction_topics), <stream>/action, <stream>/action_preview, <stream>/twist, <stream>/gripper,
and its own ~/<stream>/enable. Per-stream parameter overrides (`<stream>.max_delta_position_m`, ...)
go in params_file under the node's name. Parameters come, in order, from params_file
(config/openvla.yaml), config/mesh/<mesh_device>.yaml and the non-empty launch arguments, as in
openvla.launch.py. See docs/ros_node.md ("Streams").
"""
import os

import yaml
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node

from openvla_ros.launch_support import node_command, node_parameters

# Works from the source tree and from share/openvla_ros/launch (config/ sits beside launch/).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")

ARGUMENTS = [
    ("streams", "[left, right]", "stream names, a YAML list: each gets <stream>/image, <stream>/action, ..."),
    ("image_topics", "", "camera topic per stream, a YAML list in the order of streams (empty: <stream>/image)"),
    ("instruction_topics", "", "instruction topic per stream, a YAML list (empty: <stream>/instruction)"),
    ("max_batch_wait_ms", "", "how long the batcher waits for the other streams' frames, ms (empty: params file, 0)"),
    ("mesh_device", "auto", "TT-NN mesh: N300 | T3K | auto ($MESH_DEVICE); selects config/mesh/<mesh>.yaml"),
    ("weights_path", EnvironmentVariable("OPENVLA_WEIGHTS", default_value=""),
     "checkpoint directory in the HF openvla-7b layout (default $OPENVLA_WEIGHTS)"),
    ("backend", "", "ttnn | torch (empty: the params file's value, ttnn by default)"),
    ("device", "", "torch device: auto | cpu | cuda (empty: params file)"),
    ("unnorm_key", "", "dataset statistics key, e.g. bridge_orig (empty: params file)"),
    ("params_file", os.path.join(CONFIG_DIR, "openvla.yaml"), "ros__parameters YAML for the node"),
    ("image_transport", "", "raw | compressed (empty: params file)"),
    ("namespace", "", "namespace for the node and its relative topics"),
    ("node_name", "openvla_node", "node name"),
    ("start_enabled", "false", "publish motion immediately on every stream (false: dry run until ~/enable true)"),
    ("use_sim_time", "false", "use /clock (bag replay, simulation)"),
    ("log_level", "info", "debug | info | warn | error"),
]


def _names(text: str, what: str) -> list[str]:
    """A YAML list of names ("[left, right]"); a single name is a list of one."""
    value = yaml.safe_load(text) if text.strip() else []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be a YAML list of names such as [left, right], got {text!r}")
    return value


def _per_stream(text: str, streams: list[str], what: str, default: str) -> list[str]:
    topics = _names(text, what) if text.strip() else [f"{s}/{default}" for s in streams]
    if len(topics) != len(streams):
        raise ValueError(f"{what} needs one topic per stream ({len(streams)}: {streams}), got {len(topics)}")
    return topics


def _make_node(context, *args, **kwargs):
    def arg(name):
        return LaunchConfiguration(name).perform(context).strip()

    streams = _names(arg("streams"), "streams")
    if not streams:
        raise ValueError("streams must name at least one stream (for one camera use openvla.launch.py)")
    image_topics = _per_stream(arg("image_topics"), streams, "image_topics", "image")
    instruction_topics = _per_stream(arg("instruction_topics"), streams, "instruction_topics", "instruction")
    overrides = {"streams": streams}
    if arg("max_batch_wait_ms"):
        overrides["max_batch_wait_ms"] = float(arg("max_batch_wait_ms"))
    parameters = node_parameters(arg, CONFIG_DIR, **overrides)
    remappings = []
    for stream, image, instruction in zip(streams, image_topics, instruction_topics):
        remappings += [(f"{stream}/image", image), (f"{stream}/image/compressed", f"{image}/compressed"),
                       (f"{stream}/instruction", instruction)]
    return [Node(
        **node_command("openvla_ros.node", "openvla_node"),
        name=arg("node_name"),
        namespace=arg("namespace"),
        parameters=parameters,
        remappings=remappings,
        ros_arguments=["--log-level", arg("log_level")],
        output="screen",
        emulate_tty=True,
        sigterm_timeout="15",  # let the node publish its zero-motion actions and close the device
    )]


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=doc) for name, default, doc in ARGUMENTS]
        + [OpaqueFunction(function=_make_node)])
