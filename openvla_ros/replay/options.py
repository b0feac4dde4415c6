"""The options of one replay run (what `openvla-replay` parses), their validation, and the
streams they name (several bags, or several image topics of one bag: replayed batched offline,
or live into the node's streams, one node stream each)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .bag import ReplayError


@dataclass
class ReplayOptions:
    bag: str | list  # one bag, or several (one stream each: batched offline, or live into the node's streams)
    image_topic: str | list | None = None  # one topic, or several (of one bag, or one per bag)
    instruction_topic: str | None = None
    instruction: str | None = None
    gt_action_topic: str | None = None
    weights: str | None = None
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    mesh_device: str | None = None
    unnorm_key: str | None = None
    center_crop: bool = False
    speculative: bool = True  # offline: the previous action's tokens as the draft (same actions)
    speculative_max_age_s: float = 1.0  # offline: no draft from an action older than this (image stamps)
    mode: str = "offline"
    rate: float = 1.0
    every: int = 1
    control_rate_hz: float | None = None
    max_frames: int | None = None
    out: str | None = None
    force: bool = False
    gripper_threshold: float = 0.5
    twist_period_s: float = 0.2
    gt_tolerance_s: float = 0.05
    bag_version: int = 8
    progress: bool = True
    # live mode: the running node's topics (relative names resolve in the player's namespace)
    node_image_topic: str = "image"
    node_instruction_topic: str = "instruction"
    node_action_topic: str = "action_preview"
    # live mode: the node's stream names, one per replayed stream in order (a list, or "a,b");
    # None: the replayed streams' names with several streams, the plain topics with one
    node_streams: str | list | None = None
    node_namespace: str | None = None  # live: prefixes the relative node topics (None: the player's namespace)
    wait_timeout_s: float = 60.0
    settle_s: float = 2.0


def _positive(v) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def check_options(o: ReplayOptions) -> None:
    """Option values that would fail (or silently do nothing) later: one ReplayError, before any work."""
    if o.mode not in ("offline", "live"):
        raise ReplayError(f"unknown mode {o.mode!r} (offline or live)")
    if o.every < 1:
        raise ReplayError(f"--every must be >= 1, got {o.every}")
    if o.max_frames is not None and o.max_frames < 1:
        raise ReplayError(f"--max-frames must be >= 1, got {o.max_frames}")
    for flag, v in (("--rate", o.rate), ("--twist-period-s", o.twist_period_s),
                    ("--speculative-max-age-s", o.speculative_max_age_s)):
        if not _positive(v):
            raise ReplayError(f"{flag} must be a finite number > 0, got {v}")
    if o.control_rate_hz is not None and not _positive(o.control_rate_hz):
        raise ReplayError(f"--control-rate-hz must be a finite number > 0, got {o.control_rate_hz}")
    for flag, v in (("--gt-tolerance-s", o.gt_tolerance_s), ("--wait-timeout-s", o.wait_timeout_s)):
        if not (math.isfinite(v) and v >= 0):
            raise ReplayError(f"{flag} must be a finite number >= 0, got {v}")
    if o.node_streams is not None and o.mode != "live":
        raise ReplayError(f"mismatched options: --node-streams in {o.mode} mode (it names the running node's "
                          "streams: live mode)")
    if o.node_namespace is not None and o.mode != "live":
        raise ReplayError(f"mismatched options: --node-namespace in {o.mode} mode (live mode only)")


@dataclass(frozen=True)
class StreamSpec:
    """One replayed stream: an image topic of a bag (None: the bag's only image topic)."""

    name: str  # unique, usable as a folder name: the stream's sub-folder of the report
    bag: str
    image_topic: str | None
    node_stream: str = ""  # live: the node's stream it is played into ("": the node's plain topics)


def _as_list(v) -> list:
    if v is None:
        return []
    return [v] if isinstance(v, (str, Path)) else list(v)


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return name or "stream"


def _unique(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        k = seen.get(n, 0) + 1
        seen[n] = k
        out.append(n if k == 1 else f"{n}_{k}")
    return out if len(set(out)) == len(out) else [f"{n}_{i}" for i, n in enumerate(out)]


def stream_specs(o: ReplayOptions) -> list[StreamSpec]:
    """The streams the options name, in order. One bag and at most one topic: one stream (the
    single-stream replay, report at --out). Several topics of one bag: one stream per topic.
    Several bags: one stream per bag, all with the one --image-topic given (or each bag's only
    image topic), or paired in order with as many --image-topic as bags. Anything else:
    ReplayError. Live mode: each stream's `node_stream` (_node_streams)."""
    bags, topics = [str(b) for b in _as_list(o.bag)], [str(t) for t in _as_list(o.image_topic)]
    if not bags:
        raise ReplayError("no bag given")
    if len(bags) == 1:
        if len(topics) != len(set(topics)):
            raise ReplayError(f"--image-topic given twice with the same topic: {', '.join(topics)}")
        specs = [(bags[0], t) for t in topics] or [(bags[0], None)]
        names = [_safe_name(t) for t in topics] if len(topics) > 1 else ["stream"]
    else:
        if len(topics) > 1 and len(topics) != len(bags):
            raise ReplayError(f"mismatched options: {len(bags)} bags and {len(topics)} --image-topic values "
                              "(give one topic for every bag, or one per bag in the same order)")
        specs = [(b, topics[i] if len(topics) > 1 else (topics[0] if topics else None)) for i, b in enumerate(bags)]
        names = [_safe_name(Path(b).expanduser().name if Path(b).suffix not in (".db3", ".mcap")
                            else Path(b).expanduser().parent.name) for b in bags]
    names = _unique(names)
    node_streams = _node_streams(o, names)
    return [StreamSpec(n, b, t, ns) for n, (b, t), ns in zip(names, specs, node_streams)]


_NS_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _node_streams(o: ReplayOptions, names: list[str]) -> list[str]:
    """Live mode: the node stream each replayed stream is played into, in order. --node-streams
    maps them explicitly; without it several streams use their own names and one stream the
    node's plain topics (""). The names must be what the node's `streams` parameter accepts
    (ROS name tokens, distinct), and the --node-*-topic options relative to the stream."""
    given = o.node_streams
    if o.mode != "live":
        return [""] * len(names)
    if o.node_namespace is not None:
        tokens = o.node_namespace.strip("/").split("/")
        if o.node_namespace.strip("/") and not all(_NS_TOKEN.fullmatch(t) for t in tokens):
            raise ReplayError(f"--node-namespace {o.node_namespace!r} is not a ROS namespace (tokens of letters, "
                              "digits and _, not starting with a digit, separated by /)")
    if given is None:
        if len(names) == 1:
            return [""]
        streams, source = list(names), f"the streams' own names ({','.join(names)})"
        hint = "; name the node's streams with --node-streams NAME,NAME,..."
    else:
        streams = [n.strip() for n in given.split(",")] if isinstance(given, str) else [str(n).strip() for n in given]
        source, hint = f"--node-streams {','.join(streams)}", ""
        if len(streams) != len(names):
            raise ReplayError(f"mismatched options: {len(names)} replayed stream{'s' if len(names) > 1 else ''} "
                              f"and {len(streams)} --node-streams name{'s' if len(streams) != 1 else ''} (give one "
                              "node stream per replayed stream, in the same order)")
    from ..params import ParameterError, validate  # the node's own rules for its `streams` parameter

    try:
        validate({"streams": streams})
    except ParameterError as e:
        problem = e.problems[0].removeprefix("streams: ").split(", got ")[0]
        raise ReplayError(f"{source}: {problem}{hint}") from None
    if streams == [""]:  # --node-streams "": the node's plain topics
        return streams
    for flag, topic in (("--node-image-topic", o.node_image_topic), ("--node-instruction-topic",
                        o.node_instruction_topic), ("--node-action-topic", o.node_action_topic)):
        if topic.startswith(("/", "~")) or not topic.strip("/"):
            raise ReplayError(f"{flag} {topic!r} must be relative with node streams (each stream's topic is "
                              "<namespace>/<stream>/<topic>); give the node's namespace with --node-namespace")
    return streams


def node_topic(o: ReplayOptions, node_stream: str, topic: str) -> str:
    """The topic of the node's stream `node_stream` ("": the node's plain topic) for one of the
    --node-*-topic options: `<stream>/<topic>`, under --node-namespace when given (else relative:
    resolved in the player's namespace). An absolute plain topic is used as given."""
    if topic.startswith(("/", "~")):
        return topic
    rel = f"{node_stream}/{topic}" if node_stream else topic
    ns = (o.node_namespace or "").strip("/")
    return f"/{ns}/{rel}" if ns else rel
