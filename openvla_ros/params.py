"""Every parameter of openvla_node, declared in one place with descriptors and validated with
clear errors (all problems at once, one line each).

`declare_and_read(node, ...)` declares the parameters on a node and returns a validated NodeConfig;
`validate(values)` builds a NodeConfig from a plain dict (also used to vet runtime changes).
Parameters marked read-only take effect at start (model, topics, QoS); the others may be changed
at runtime with `ros2 param set` and are validated the same way.

Unknown names (a typo such as `max_delta_positon_m` would otherwise be ignored silently, leaving
the default limit in force) are refused, naming the closest known parameter, unless
`allow_unknown_parameters` is true (then each is warned about once). Names that reach the node
only through a `/**` section of a params file, which other nodes share, are warned about, not
refused: `wildcard_only_names()` tells them apart by reading the --params-file YAMLs, since rclpy
merges every source into one dict of overrides.

Streams (`streams`, docs/ros_node.md "Streams"): one node may serve several cameras / robots.
Parameters in STREAM_PARAMS may be overridden per stream as `<stream>.<name>` (a params file may
nest them: `left: {max_delta_position_m: [...]}`); an override left unset follows the global value,
also when that changes at runtime. Each stream's configuration is the global one with its
overrides applied, validated by the same rules (problems name `<stream>.<name>`).
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

from .image_conversion import DEFAULT_MAX_PIXELS
from .oft_inputs import PROPRIO_TYPES
from .safety import GRIPPER_CONVENTIONS, GripperConfig, MotionLimits, SafetyError

BACKENDS = ("ttnn", "torch")
MESH_DEVICES = ("N300", "T3K", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")
IMAGE_TRANSPORTS = ("raw", "compressed")
RELIABILITIES = ("best_effort", "reliable")
DURABILITIES = ("volatile", "transient_local")
INFERENCE_MODES = ("on_frame", "fixed_rate")

# Overrides of the TT-NN precision profile (config/ttnn/<mesh>.yaml). Empty = the profile's value.
PRECISION_DTYPES = ("", "bf16", "bfp8", "bfp4", "fp32")
PRECISION_FIDELITIES = ("", "lofi", "hifi2", "hifi3", "hifi4")
PRECISION_KEYS = {
    "precision.wqkv_dtype": PRECISION_DTYPES,
    "precision.wo_dtype": PRECISION_DTYPES,
    "precision.kv_cache_dtype": PRECISION_DTYPES,
    "precision.activation_dtype": PRECISION_DTYPES,
    "precision.ffn_weight_dtype": PRECISION_DTYPES,
    "precision.lm_head_logits_dtype": PRECISION_DTYPES,
    "precision.qkv_math_fidelity": PRECISION_FIDELITIES,
    "precision.sdpa_math_fidelity": PRECISION_FIDELITIES,
    "precision.wo_math_fidelity": PRECISION_FIDELITIES,
    "precision.ffn_math_fidelity": PRECISION_FIDELITIES,
}


class ParameterError(ValueError):
    """Invalid parameters; str() lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Spec:
    default: Any
    description: str
    read_only: bool = True
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None  # returns a problem or None
    number: bool = False  # float / float array: integers are accepted too
    env: str | None = None  # environment variable holding the default, read when the node starts

    def initial(self):
        """The default as of now (`env` is read at each call, not at import)."""
        return os.environ.get(self.env, self.default) if self.env else self.default


def _positive(v):
    return None if _is_num(v) and math.isfinite(v) and v > 0 else "must be a finite number > 0"


def _non_negative(v):
    return None if _is_num(v) and math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def _int_at_least(n):
    def check(v):
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= n else f"must be an integer >= {n}"
    return check


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _device(v):
    if v in ("auto", "cpu", "cuda") or (isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return "must be auto, cpu, cuda or cuda:N"


def _unit_interval(v):
    return None if _is_num(v) and 0.0 <= v <= 1.0 else "must be a number in [0, 1]"


def _indices(v):
    ok = all(_is_num(x) and float(x).is_integer() and x >= 0 for x in v)
    return None if ok else "must be integers >= 0"


def _joint_names(v):
    names = [n for n in v if n != ""]
    if any(not n.strip() for n in names):
        return "must be joint names (empty: every position in message order)"
    return None if len(set(names)) == len(names) else "must be distinct"


STREAM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _stream_names(v):
    """[""] (the default: one unnamed stream, topics as without streams) or distinct names, each
    a ROS name token (letters, digits, _; first a letter) that is no parameter name."""
    if list(v) == [""]:
        return None
    if not v:
        return "must name at least one stream (the default [''] is one unnamed stream)"
    bad = [n for n in v if not STREAM_NAME.fullmatch(n)]
    if bad:
        return (f"stream names must be ROS name tokens (a letter, then letters, digits or _; the unnamed "
                f"stream '' only alone), not {bad}")
    if len(set(v)) != len(v):
        return "stream names must be distinct"
    clash = [n for n in v if n in SPECS or any(k.startswith(n + ".") for k in SPECS)]
    if clash:
        return f"stream names must not be parameter names: {clash}"
    return None


SPECS: dict[str, Spec] = {
    # -- model (read at configure) --
    "backend": Spec("ttnn", "Inference backend: ttnn (Tenstorrent N300/T3K) or torch (CPU/CUDA).", choices=BACKENDS),
    "mesh_device": Spec("auto", "TT-NN mesh: N300, T3K, or auto ($MESH_DEVICE / what is attached). "
                        "The launch file also loads config/mesh/<mesh>.yaml.", choices=MESH_DEVICES),
    "device": Spec("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:N.", check=_device),
    "dtype": Spec("auto", "torch dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.",
                  choices=DTYPES),
    "weights_path": Spec("", "Checkpoint directory in the HF openvla-7b layout (default: $OPENVLA_WEIGHTS, read "
                         "when the node starts).", env="OPENVLA_WEIGHTS"),
    "unnorm_key": Spec("", "Dataset statistics key used to un-normalise actions (e.g. bridge_orig). Required when "
                       "the checkpoint has several datasets.", read_only=False),
    "center_crop": Spec(False, "Central 90% crop before resizing (only for LIBERO fine-tunes)."),
    "speculative": Spec(True, "Speculative action decoding: the previous action's tokens (same instruction, at most "
                        "speculative_max_age_s old) are verified as a draft in the prefill. Same actions as plain "
                        "greedy decoding; fewer decode steps when the draft matches. false: plain decoding."),
    "speculative_max_age_s": Spec(1.0, "A previous action older than this is not used as a draft, s.",
                                  read_only=False, check=_positive, number=True),
    **{k: Spec("", f"Override of the TT-NN precision profile config/ttnn/<mesh>.yaml ({', '.join(c for c in v if c)}; "
               "empty = the profile's value). Per mesh: config/mesh/*.yaml.", choices=v) for k, v in PRECISION_KEYS.items()},
    # -- inputs --
    "image_transport": Spec("raw", "raw: subscribe `image` (sensor_msgs/Image); compressed: subscribe "
                            "`image/compressed` (sensor_msgs/CompressedImage).", choices=IMAGE_TRANSPORTS),
    "image_qos_reliability": Spec("best_effort", "Image subscription reliability (sensor-data QoS: best_effort).",
                                  choices=RELIABILITIES),
    "image_qos_depth": Spec(1, "Image subscription queue depth (keep 1: only the newest frame matters).",
                            check=_int_at_least(1)),
    "instruction_qos_durability": Spec("volatile", "Instruction subscription durability: volatile (plain "
                                       "`ros2 topic pub` works) or transient_local (receive a latched instruction).",
                                       choices=DURABILITIES),
    "instruction_qos_depth": Spec(1, "Instruction subscription queue depth (reliable).", check=_int_at_least(1)),
    "initial_instruction": Spec("", "Instruction to act on before any arrives on `instruction` (empty = none)."),
    "max_instruction_chars": Spec(1000, "Longer instructions are refused (and clear the current one).",
                                  read_only=False, check=_int_at_least(1)),
    "max_image_pixels": Spec(DEFAULT_MAX_PIXELS, "Larger images are refused before their data is read.",
                             read_only=False, check=_int_at_least(1)),
    # -- scheduling --
    "inference_mode": Spec("on_frame", "on_frame: infer on every newest frame as fast as the model allows; "
                           "fixed_rate: at most control_rate_hz inferences per second.", choices=INFERENCE_MODES),
    "control_rate_hz": Spec(5.0, "Inference rate in fixed_rate mode, Hz.", check=_positive, number=True),
    # -- streams (one policy, several cameras / robots, batched) --
    "streams": Spec([""], "Stream names, e.g. [left, right]: each has its own topics <stream>/image, "
                    "<stream>/instruction, <stream>/action, ..., its own ~/<stream>/enable, safety state and "
                    "diagnostics; frames of all streams are batched into one predict_batch. [''] (default): one "
                    "unnamed stream with the topics image, instruction, action, ... Per-stream overrides: "
                    "<stream>.<parameter> (see docs/ros_node.md).", check=_stream_names),
    "max_batch_wait_ms": Spec(0.0, "How long the batcher may wait, after a stream's frame arrived, for frames of "
                              "the other streams before running the batch, ms (0: take what is pending).",
                              read_only=False, check=_non_negative, number=True),
    # -- OpenVLA-OFT checkpoints (chunk mode, docs/oft.md) --
    "num_images": Spec(0, "OpenVLA-OFT: images per chunk, 1 (`image`) or 2 (`image` + `wrist_image`); 0 = what the "
                       "checkpoint states (config.json openvla_oft.num_images_in_input), else 1.",
                       check=lambda v: None if v in (0, 1, 2) and not isinstance(v, bool) else "must be 0, 1 or 2"),
    "proprio_type": Spec("float64_array", "OpenVLA-OFT with proprio: type of the `proprio` topic, float64_array "
                         "(std_msgs/Float64MultiArray) or joint_state (sensor_msgs/JointState).", choices=PROPRIO_TYPES),
    "proprio_joint_names": Spec([""], "proprio_type joint_state: the joints whose positions form the robot state, in "
                                "this order ([''] = every position in message order).", check=_joint_names),
    "proprio_indices": Spec([], "proprio_type float64_array: the indices of `data` forming the robot state, in this "
                            "order ([] = all of data).", check=_indices, number=True),
    "max_proprio_age_s": Spec(0.5, "OpenVLA-OFT: a robot state received longer ago than this is not used, s.",
                              read_only=False, check=_positive, number=True),
    "execute_steps": Spec(0, "OpenVLA-OFT: steps of a chunk executed before a newer chunk replaces the rest "
                          "(0 = the whole chunk).", read_only=False, check=_int_at_least(0)),
    "temporal_ensemble_decay": Spec(0.0, "OpenVLA-OFT: ACT temporal ensembling, each step the average of every chunk "
                                    "in play weighted exp(-m i), i = 0 the oldest; 0 = off (one chunk at a time, "
                                    "execute_steps).", check=_non_negative, number=True),
    # -- safety --
    "start_enabled": Spec(False, "Publish motion on `action`/`twist`/`gripper` right after activation. false = dry run "
                          "(actions only on `action_preview`) until ~/enable is called with true."),
    "max_image_age_s": Spec(1.0, "Images older than this (image stamp vs node clock) are never acted on, s.",
                            read_only=False, check=_positive, number=True),
    "max_instruction_age_s": Spec(0.0, "Instructions older than this are stale and not acted on, s (0 = never "
                                  "expire).", read_only=False, check=_non_negative, number=True),
    "max_delta_position_m": Spec([0.05, 0.05, 0.05], "Per-axis clip |dx|,|dy|,|dz| <= limit, metres.",
                                 read_only=False, number=True),
    "max_delta_orientation_rad": Spec([0.25, 0.25, 0.25], "Per-axis clip |droll|,|dpitch|,|dyaw| <= limit, radians.",
                                      read_only=False, number=True),
    "gripper_convention": Spec("unit", "raw | unit ([0,1]) | inverted (1-unit) | binary | binary_inverted "
                               "(see docs/ros_node.md).", read_only=False, choices=GRIPPER_CONVENTIONS),
    "gripper_raw_range": Spec([0.0, 1.0], "Range [lo, hi] of the model's gripper value mapped onto [0, 1].",
                              read_only=False, number=True),
    "gripper_threshold": Spec(0.5, "binary conventions: unit value >= threshold -> 1.", read_only=False,
                              check=_unit_interval, number=True),
    # -- outputs --
    "action_frame": Spec("base_link", "header.frame_id of published actions: the frame the dataset's deltas are "
                         "expressed in.", read_only=False, check=lambda v: None if v.strip() else "must not be empty"),
    "action_period_s": Spec(0.2, "Control period one action spans, s (twist = delta / action_period_s).",
                            read_only=False, check=_positive, number=True),
    "publish_twist": Spec(False, "Also publish `twist` (geometry_msgs/TwistStamped)."),
    "publish_gripper": Spec(False, "Also publish `gripper` (std_msgs/Float64)."),
    "publish_preview": Spec(True, "Publish every action that passed the safety checks on `action_preview`, "
                            "enabled or not (for dry runs)."),
    "output_qos_depth": Spec(10, "Queue depth of action/twist/gripper publishers (reliable).",
                             check=_int_at_least(1)),
    # -- lifecycle and status --
    "allow_unknown_parameters": Spec(False, "false: parameters the node does not know (typos) make it exit with "
                                     "code 2 naming them; true: warn once per name and start. Names from a `/**` "
                                     "params-file section are only warned about."),
    "autostart": Spec(True, "Configure (load the model) and activate at start, so plain `ros2 run` works."),
    "diagnostics_period_s": Spec(1.0, "Period of /diagnostics messages, s.", check=_positive, number=True),
    "log_throttle_s": Spec(5.0, "Minimum interval between repeated warnings of one kind, s.", read_only=False,
                           check=_positive, number=True),
}

# Parameters a stream may override as `<stream>.<name>` (what differs between robots or cameras).
STREAM_PARAMS = ("unnorm_key", "initial_instruction", "start_enabled", "image_transport", "max_image_age_s",
                 "max_instruction_age_s", "max_delta_position_m", "max_delta_orientation_rad", "gripper_convention",
                 "gripper_raw_range", "gripper_threshold", "action_frame", "action_period_s")


def stream_param_names(streams) -> list[str]:
    """Every `<stream>.<name>` override the node declares for these streams (none for the
    unnamed one)."""
    return [f"{s}.{n}" for s in streams if s for n in STREAM_PARAMS]


@dataclass(frozen=True)
class NodeConfig:
    backend: str
    mesh_device: str
    device: str
    dtype: str
    weights_path: str
    unnorm_key: str
    center_crop: bool
    speculative: bool
    speculative_max_age_s: float
    precision: dict
    image_transport: str
    image_qos_reliability: str
    image_qos_depth: int
    instruction_qos_durability: str
    instruction_qos_depth: int
    initial_instruction: str
    max_instruction_chars: int
    max_image_pixels: int
    inference_mode: str
    control_rate_hz: float
    streams: tuple
    max_batch_wait_ms: float
    num_images: int
    proprio_type: str
    proprio_joint_names: tuple
    proprio_indices: tuple
    max_proprio_age_s: float
    execute_steps: int
    temporal_ensemble_decay: float
    start_enabled: bool
    max_image_age_s: float
    max_instruction_age_s: float
    limits: MotionLimits
    gripper: GripperConfig
    action_frame: str
    action_period_s: float
    publish_twist: bool
    publish_gripper: bool
    publish_preview: bool
    output_qos_depth: int
    allow_unknown_parameters: bool
    autostart: bool
    diagnostics_period_s: float
    log_throttle_s: float
    values: dict = field(repr=False, default_factory=dict)  # the raw parameter values
    stream_cfgs: dict = field(repr=False, default_factory=dict)  # stream -> its NodeConfig (with overrides)

    @property
    def min_inference_period_s(self) -> float:
        return 1.0 / self.control_rate_hz if self.inference_mode == "fixed_rate" else 0.0

    def for_stream(self, stream: str) -> "NodeConfig":
        """The configuration stream `stream` acts on: this one with its `<stream>.*` overrides."""
        return self.stream_cfgs.get(stream, self)

    @property
    def known_names(self) -> set[str]:
        """Every parameter name this configuration accepts (SPECS and the per-stream overrides)."""
        return set(SPECS) | set(stream_param_names(self.streams))


def _type_problem(name: str, spec: Spec, value) -> str | None:
    d = spec.default
    if spec.number:
        if isinstance(d, list):
            if not isinstance(value, (list, tuple)) or not all(_is_num(v) for v in value):
                return f"{name}: expected a list of numbers like {d}, got {value!r}"
        elif not _is_num(value):
            return f"{name}: expected a number, got {value!r}"
        return None
    if isinstance(d, bool):
        return None if isinstance(value, bool) else f"{name}: expected true or false, got {value!r}"
    if isinstance(d, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            f"{name}: expected an integer, got {value!r}"
    if isinstance(d, str):
        return None if isinstance(value, str) else f"{name}: expected a string, got {value!r} (quote it)"
    if isinstance(d, list) and not (isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)):
        return f"{name}: expected a list of strings like [left, right], got {value!r}"
    return None


def validate(values: dict) -> NodeConfig:
    """Build a NodeConfig from parameter values (`<stream>.<name>` overrides included; None =
    unset); raise ParameterError listing every problem."""
    problems, stream_cfgs, cfg = [], {}, None
    try:
        cfg = _validate_one(values)
    except ParameterError as e:
        problems += e.problems
    streams = values.get("streams", SPECS["streams"].default)
    if _type_problem("streams", SPECS["streams"], streams) or _stream_names(streams):
        streams = []  # reported above
    for stream in streams:
        overrides = {n: values[f"{stream}.{n}"] for n in STREAM_PARAMS
                     if stream and values.get(f"{stream}.{n}") is not None}
        if not overrides:
            continue
        try:
            stream_cfgs[stream] = _validate_one({**values, **overrides})
        except ParameterError as e:
            # the override's own problems (the global values' are listed already)
            own = [f"{stream}.{p}" for p in e.problems if any(p.startswith(n) for n in overrides)]
            problems += own or ([f"{stream}: {p}" for p in e.problems] if cfg is not None else [])
    if problems:
        raise ParameterError(problems)
    object.__setattr__(cfg, "stream_cfgs", stream_cfgs)
    return cfg


def _validate_one(values: dict) -> NodeConfig:
    problems: list[str] = []
    v = {}
    for name, spec in SPECS.items():
        value = values.get(name, spec.initial())
        p = _type_problem(name, spec, value)
        if p is None and spec.choices is not None and value not in spec.choices:
            shown = ", ".join(repr(c) if c == "" else str(c) for c in spec.choices)
            p = f"{name}: {value!r} is not one of: {shown}"
        if p is None and spec.check is not None:
            msg = spec.check(value)
            p = f"{name}: {msg}, got {value!r}" if msg else None
        if p:
            problems.append(p)
        v[name] = [float(x) for x in value] if (spec.number and isinstance(value, (list, tuple))) else \
            (float(value) if spec.number and _is_num(value) else value)
    limits = gripper = None
    if not any(p.startswith(("max_delta_position_m", "max_delta_orientation_rad")) for p in problems):
        try:
            limits = MotionLimits(tuple(v["max_delta_position_m"]), tuple(v["max_delta_orientation_rad"]))
        except SafetyError as e:
            problems.append(str(e))
    if not any(p.startswith(("gripper_",)) for p in problems):
        try:
            gripper = GripperConfig(v["gripper_convention"], tuple(v["gripper_raw_range"]), v["gripper_threshold"])
        except SafetyError as e:
            problems.append(str(e))
    if problems:
        raise ParameterError(problems)
    precision = {k.split(".", 1)[1]: v[k] for k in PRECISION_KEYS if v[k]}
    return NodeConfig(
        backend=v["backend"], mesh_device=v["mesh_device"], device=v["device"], dtype=v["dtype"],
        weights_path=v["weights_path"].strip(), unnorm_key=v["unnorm_key"].strip(), center_crop=v["center_crop"],
        speculative=v["speculative"], speculative_max_age_s=v["speculative_max_age_s"],
        precision=precision, image_transport=v["image_transport"],
        image_qos_reliability=v["image_qos_reliability"], image_qos_depth=v["image_qos_depth"],
        instruction_qos_durability=v["instruction_qos_durability"], instruction_qos_depth=v["instruction_qos_depth"],
        initial_instruction=v["initial_instruction"], max_instruction_chars=v["max_instruction_chars"],
        max_image_pixels=v["max_image_pixels"], inference_mode=v["inference_mode"],
        control_rate_hz=v["control_rate_hz"], streams=tuple(v["streams"]), max_batch_wait_ms=v["max_batch_wait_ms"],
        num_images=v["num_images"], proprio_type=v["proprio_type"],
        proprio_joint_names=tuple(n for n in v["proprio_joint_names"] if n),
        proprio_indices=tuple(int(i) for i in v["proprio_indices"]), max_proprio_age_s=v["max_proprio_age_s"],
        execute_steps=v["execute_steps"], temporal_ensemble_decay=v["temporal_ensemble_decay"],
        start_enabled=v["start_enabled"],
        max_image_age_s=v["max_image_age_s"], max_instruction_age_s=v["max_instruction_age_s"],
        limits=limits, gripper=gripper, action_frame=v["action_frame"].strip(),
        action_period_s=v["action_period_s"], publish_twist=v["publish_twist"],
        publish_gripper=v["publish_gripper"], publish_preview=v["publish_preview"],
        output_qos_depth=v["output_qos_depth"], allow_unknown_parameters=v["allow_unknown_parameters"],
        autostart=v["autostart"],
        diagnostics_period_s=v["diagnostics_period_s"], log_throttle_s=v["log_throttle_s"], values=dict(values))


def descriptor(name: str, spec: Spec):
    from rcl_interfaces.msg import ParameterDescriptor

    constraints = f"one of: {', '.join(c for c in spec.choices if c) or '(empty)'}" if spec.choices else ""
    if spec.number:
        constraints = (constraints + "; " if constraints else "") + "integers are accepted"
    return ParameterDescriptor(name=name, description=spec.description, additional_constraints=constraints,
                               read_only=spec.read_only, dynamic_typing=spec.number)


def stream_descriptor(name: str, spec: Spec):
    """Descriptor of a `<stream>.<name>` override: the global parameter's, any type (unset until
    given; validate() checks the value)."""
    from rcl_interfaces.msg import ParameterDescriptor

    stream, base = name.split(".", 1)
    return ParameterDescriptor(name=name, description=f"Stream {stream}: overrides {base} (unset: the global value). "
                               + spec.description, read_only=spec.read_only, dynamic_typing=True)


def _kind(spec: Spec) -> str:
    d = spec.default
    if spec.number:
        return "a list of numbers" if isinstance(d, list) else "a number"
    if isinstance(d, list):
        return "a list of strings"
    if isinstance(d, bool):
        return "true or false"
    if isinstance(d, int):
        return "an integer"
    return "a string"


def closest_name(name: str, known: Iterable[str]) -> str:
    """The known parameter name most like `name` (difflib's ratio), for "did you mean" messages."""
    known = sorted(known)
    return (difflib.get_close_matches(name, known, n=1, cutoff=0.0) or [""])[0]


WILDCARD = "/**"  # the only wildcard section rclpy applies (rclpy Node.get_parameters)


def _ros_args(args: Iterable[str] | None):
    """(flag, value) of every --params-file and -p/--param inside the --ros-args sections of `args`."""
    in_ros, it = False, iter(args or ())
    for a in it:
        if a == "--ros-args":
            in_ros = True
        elif a == "--":
            in_ros = False
        elif in_ros and a in ("--params-file", "-p", "--param"):
            yield a, next(it, "")


def _flat_names(params: dict, prefix: str = "") -> set[str]:
    """Parameter names as rcl flattens them: nested mappings join with '.'."""
    names = set()
    for k, v in params.items():
        names |= _flat_names(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return names


def params_file_sections(path: str | os.PathLike) -> dict[str, set[str]]:
    """{node key ('/**', '/ns/name'): parameter names} of a ros__parameters YAML file. Keys are
    normalised as rcl does: a leading '/', nested mappings above ros__parameters joined by '/'."""
    import yaml

    sections: dict[str, set[str]] = {}

    def walk(d: dict, parts: list[str]):
        for k, v in d.items():
            if not isinstance(v, dict):
                continue
            if k == "ros__parameters":
                key = "/" + "/".join(p for p in (str(q).strip("/") for q in parts) if p)
                sections.setdefault(key, set()).update(_flat_names(v))
            else:
                walk(v, parts + [str(k)])

    doc = yaml.safe_load(Path(path).read_text())
    if isinstance(doc, dict):
        walk(doc, [])
    return sections


def wildcard_only_names(arg_lists: Iterable[Iterable[str] | None], node_fqn: str,
                        explicit: Iterable[str] = ()) -> set[str]:
    """Names that reach node `node_fqn` only through `/**` sections of the --params-file YAMLs in
    `arg_lists` (the process's and the node's own arguments): not from a section keyed by the
    node's name, not from -p, not from `explicit` (constructor overrides). A file that cannot be
    read here counts as naming nothing (its names are then treated as given to this node)."""
    wild, specific = set(), set(explicit)
    for args in arg_lists:
        for flag, value in _ros_args(args):
            if flag != "--params-file":
                specific.add(value.split(":=", 1)[0].rsplit(":", 1)[-1])  # [node:]name:=value
                continue
            try:
                sections = params_file_sections(value)
            except Exception:  # noqa: BLE001 - rcl has parsed it already; no wildcard information here
                continue
            wild |= sections.get(WILDCARD, set())
            specific |= sections.get(node_fqn, set())
    return wild - specific


def unknown_parameters(given: Iterable[str], known: Collection[str], wildcard_only: Collection[str],
                       allow: bool) -> tuple[list[str], list[str]]:
    """(problems, warnings) for the names in `given` that are not in `known`: problems for names
    given to this node (refused unless `allow`), warnings for the rest. One line per name, with
    the closest known name."""
    problems, warnings = [], []
    for name in sorted(set(given) - set(known)):
        hint = f"closest known: {closest_name(name, known)}"
        if name in wildcard_only:
            warnings.append(f"{name}: unknown parameter in a {WILDCARD} params-file section, ignored ({hint})")
        elif allow:
            warnings.append(f"{name}: unknown parameter, ignored (allow_unknown_parameters is true; {hint})")
        else:
            problems.append(f"{name}: unknown parameter ({hint}; allow_unknown_parameters:=true starts anyway)")
    return problems, warnings


def declare_and_read(node, given: Iterable[str] = (), wildcard_only: Collection[str] = ()) \
        -> tuple[NodeConfig, list[str]]:
    """Declare every parameter on `node` and return (the validated configuration, warnings).
    `given`: every parameter name handed to the node (its overrides); `wildcard_only`: those
    that reached it only through a `/**` params-file section (see wildcard_only_names).
    Raises ParameterError listing every wrong type, invalid value and unknown name at once."""
    from rclpy.exceptions import ParameterException

    problems, values = [], {}
    for name, spec in SPECS.items():
        try:
            node.declare_parameter(name, spec.initial(), descriptor(name, spec))
            values[name] = node.get_parameter(name).value
        except ParameterException as e:  # wrong type given as an override
            problems.append(f"{name}: wrong type, expected {_kind(spec)} ({e})")
            values[name] = spec.initial()
    streams = values["streams"] if _stream_names(values["streams"]) is None else []
    for name in stream_param_names(streams):
        # dynamically typed and unset by default (None = follow the global value); validate() checks types
        spec = SPECS[name.split(".", 1)[1]]
        node.declare_parameter(name, None, stream_descriptor(name, spec))
        value = node.get_parameter(name).value
        if value is not None:
            values[name] = value
    given = list(given)
    known = set(SPECS) | set(stream_param_names(streams)) | {n for n in given if node.has_parameter(n)}
    # (+ what rclpy declares itself: use_sim_time)
    allow = values.get("allow_unknown_parameters") is True
    unknown_problems, warnings = unknown_parameters(given, known, wildcard_only, allow)
    problems += unknown_problems
    cfg = None
    try:
        cfg = validate(values)
    except ParameterError as e:
        problems += e.problems
    if problems:
        raise ParameterError(problems)
    return cfg, warnings
