"""Reading episodes from rosbag2 bags (sqlite3 and mcap; Humble and Jazzy metadata) and writing
the predicted actions back as a bag, with `rosbags` (pure Python, CDR identical to rclpy's)."""
from __future__ import annotations

import bisect
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ACTION_TYPE = "openvla_ros/msg/EndEffectorAction"
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
INSTRUCTION_TYPE = "std_msgs/msg/String"
GT_TYPES = (ACTION_TYPE, "geometry_msgs/msg/TwistStamped", "std_msgs/msg/Float64MultiArray")


class ReplayError(Exception):
    """A bag or option problem, reported as one clear line."""


def action_msg_definition() -> str:
    """EndEffectorAction.msg text: installed share/openvla_ros/msg (colcon / venv) or the source tree."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("openvla_ros")) / "msg" / "EndEffectorAction.msg")
    except Exception:  # package not in the ament index (plain source checkout)
        pass
    candidates.append(Path(__file__).resolve().parents[2] / "msg" / "EndEffectorAction.msg")
    for c in candidates:
        if c.is_file():
            return c.read_text(encoding="utf-8")
    raise ReplayError("EndEffectorAction.msg not found (is openvla_ros installed?)")


def make_typestore():
    """Jazzy's standard types + openvla_ros/msg/EndEffectorAction."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    store.register(get_types_from_msg(action_msg_definition(), ACTION_TYPE))
    return store


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


@dataclass
class Frame:
    index: int
    bag_time_ns: int  # when the image was recorded (bag log time)
    stamp_ns: int  # the image header stamp (bag time when the header is empty)
    msgtype: str
    raw: bytes = field(repr=False, default=b"")  # CDR as recorded (the live player republishes it)
    msg: object = field(repr=False, default=None)  # deserialised rosbags message


def _detect_storage(path: Path) -> str:
    if path.is_dir():
        suffixes = {p.suffix for p in path.iterdir()}
        if ".mcap" in suffixes:
            return "mcap"
        if ".db3" in suffixes:
            return "sqlite3"
    return {".mcap": "mcap", ".db3": "sqlite3"}.get(path.suffix, "unknown")


def _pick(topics: dict, wanted: str | None, types: tuple, what: str, required: bool) -> str | None:
    listing = ", ".join(f"{t} [{m}]" for t, (m, _) in sorted(topics.items())) or "none"
    if wanted:
        if wanted not in topics:
            raise ReplayError(f"{what} topic {wanted!r} not in the bag; topics present: {listing}")
        if topics[wanted][0] not in types:
            raise ReplayError(f"{what} topic {wanted!r} has type {topics[wanted][0]}, "
                              f"supported: {', '.join(types)}")
        return wanted
    found = [t for t, (m, _) in topics.items() if m in types]
    if len(found) == 1:
        return found[0]
    if not found:
        if required:
            raise ReplayError(f"no {what} topic ({', '.join(types)}) in the bag; topics present: {listing}")
        return None
    raise ReplayError(f"several {what} topics ({', '.join(sorted(found))}): choose one with --{what}-topic")


def gt_values(msg, msgtype: str, twist_period_s: float) -> np.ndarray:
    """A ground-truth message -> 7 values in the model's action space (NaN where unknown)."""
    if msgtype == ACTION_TYPE:
        if len(msg.unclipped) == 7:
            return np.asarray(msg.unclipped, dtype=np.float64)
        p, o = msg.delta_position, msg.delta_orientation
        return np.array([p.x, p.y, p.z, o.x, o.y, o.z, msg.gripper_raw], dtype=np.float64)
    if msgtype == "geometry_msgs/msg/TwistStamped":
        lin, ang = msg.twist.linear, msg.twist.angular
        v = np.array([lin.x, lin.y, lin.z, ang.x, ang.y, ang.z], dtype=np.float64) * twist_period_s
        return np.append(v, np.nan)  # a twist carries no gripper command
    data = np.asarray(msg.data, dtype=np.float64)
    if data.shape != (7,):
        raise ReplayError(f"ground-truth Float64MultiArray has {data.size} values, expected 7")
    return data


def reader_error(path: Path, e: Exception) -> ReplayError:
    """A reader failure as one line. A YAML syntax error (a corrupt metadata.yaml) is reported by
    its position, not as the multi-line excerpt the YAML parser renders."""
    cause, depth = e, 0
    while cause is not None and depth < 16:  # the chain of causes, bounded
        depth += 1
        mark = getattr(cause, "problem_mark", None)
        if mark is not None:  # ruamel / PyYAML MarkedYAMLError
            what = "metadata.yaml" if "metadata.yaml" in str(e) else "the bag's metadata"
            problem = " ".join(str(getattr(cause, "problem", None) or getattr(cause, "context", "") or "").split())
            return ReplayError(f"cannot read bag {path}: {what} is not valid YAML: {problem or 'syntax error'} "
                               f"(line {mark.line + 1}, column {mark.column + 1})")
        cause = cause.__cause__ or cause.__context__
    return ReplayError(f"cannot read bag {path}: {type(e).__name__}: {' '.join(str(e).split())}")


class BagEpisode:
    """One recorded episode. Instructions and ground truth (small) are read at open; image frames
    are streamed by frames() so long bags never sit in memory."""

    def __init__(self, path: str | os.PathLike, image_topic: str | None = None,
                 instruction_topic: str | None = None, gt_topic: str | None = None,
                 need_instruction_topic: bool = True, twist_period_s: float = 0.2):
        self.path = Path(path)
        if not self.path.exists():
            raise ReplayError(f"bag not found: {self.path}")
        self.storage = _detect_storage(self.path)
        self.typestore = make_typestore()
        with self._reader() as reader:
            self.topics = {t: (info.msgtype, info.msgcount) for t, info in reader.topics.items()}
            if not self.topics or reader.message_count == 0:
                raise ReplayError(f"bag {self.path} is empty")
            self.start_ns, self.end_ns = reader.start_time, reader.end_time
            self.image_topic = _pick(self.topics, image_topic, IMAGE_TYPES, "image", True)
            self.instruction_topic = _pick(self.topics, instruction_topic, (INSTRUCTION_TYPE,), "instruction",
                                           need_instruction_topic)
            self.gt_topic = (_pick(self.topics, gt_topic, GT_TYPES, "gt-action", False)
                             if gt_topic or _has_gt(self.topics) else None)
            self.instructions: list[tuple[int, str]] = []
            self.gt: list[tuple[int, int | None, np.ndarray]] = []
            for topic, msgtype, t_ns, _, msg in self._iter(reader, {self.instruction_topic, self.gt_topic} - {None}):
                if topic == self.instruction_topic:
                    self.instructions.append((t_ns, str(msg.data)))
                else:
                    s = stamp_ns(msg.header) if hasattr(msg, "header") else None
                    self.gt.append((t_ns, s, gt_values(msg, msgtype, twist_period_s)))
        self.num_frames = self.topics[self.image_topic][1]
        if self.num_frames == 0:
            raise ReplayError(f"image topic {self.image_topic} has no messages in {self.path}")
        self._instr_times = [t for t, _ in self.instructions]
        self._gt_by_stamp = {s: v for _, s, v in self.gt if s}
        self._gt_times = np.array([t for t, _, _ in self.gt], dtype=np.int64)

    @contextlib.contextmanager
    def _reader(self):
        from rosbags.highlevel import AnyReader

        try:
            reader = AnyReader([self.path], default_typestore=self.typestore)
            reader.open()
        except Exception as e:  # corrupt metadata/storage raise assorted errors in the storage plugins
            raise reader_error(self.path, e) from None
        try:
            yield reader
        finally:
            reader.close()

    def _iter(self, reader, topics: set):
        conns = [c for c in reader.connections if c.topic in topics]
        if not conns:  # rosbags reads every connection when given none
            return
        it = reader.messages(connections=conns)
        while True:
            try:
                conn, t_ns, raw = next(it)
                msg = reader.deserialize(raw, conn.msgtype)
            except StopIteration:
                return
            except Exception as e:  # storage/CDR errors surface lazily while iterating
                raise reader_error(self.path, e) from None
            yield conn.topic, conn.msgtype, t_ns, raw, msg

    def messages(self, topics: set):
        """(topic, msgtype, bag_time_ns, raw CDR, message) in recorded order."""
        with self._reader() as reader:
            yield from self._iter(reader, topics)

    def frames(self):
        index = 0
        for _, msgtype, t_ns, raw, msg in self.messages({self.image_topic}):
            yield Frame(index, t_ns, stamp_ns(msg.header) or t_ns, msgtype, bytes(raw), msg)
            index += 1

    def instruction_at(self, t_ns: int) -> str | None:
        """The newest instruction recorded at or before t_ns."""
        i = bisect.bisect_right(self._instr_times, t_ns)
        return self.instructions[i - 1][1] if i else None

    def ground_truth(self, frame: Frame, tolerance_ns: int) -> np.ndarray | None:
        """A GT message whose header stamp equals the image stamp, else the GT message nearest in
        bag time within tolerance_ns."""
        if not self.gt:
            return None
        if frame.stamp_ns in self._gt_by_stamp:
            return self._gt_by_stamp[frame.stamp_ns]
        i = int(np.abs(self._gt_times - frame.bag_time_ns).argmin())
        return self.gt[i][2] if abs(int(self._gt_times[i]) - frame.bag_time_ns) <= tolerance_ns else None

    def identity(self) -> dict:
        return {"path": str(self.path.resolve()), "storage": self.storage,
                "duration_s": (self.end_ns - self.start_ns) / 1e9, "start_ns": self.start_ns,
                "topics": {t: {"type": m, "count": c} for t, (m, c) in sorted(self.topics.items())},
                "image_topic": self.image_topic, "instruction_topic": self.instruction_topic,
                "gt_topic": self.gt_topic}


def _has_gt(topics: dict) -> bool:
    return any(m in GT_TYPES for m, _ in topics.values())


def write_action_bag(path: Path, rows: list, storage: str = "sqlite3", version: int = 8,
                     topic: str = "/openvla/action", frame_id: str = "openvla_action") -> int:
    """rows: dicts with bag_time_ns, stamp_ns, action(7), normalized(7), tokens(7), instruction,
    unnorm_key, inference_ms, latency_ms, sequence. Readable by rosbag2 (Humble: version 8)."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = make_typestore()
    T = store.types
    Header, Time, Vector3 = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"], T["geometry_msgs/msg/Vector3"]
    Action = T[ACTION_TYPE]
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=version, storage_plugin=plugin) as writer:
        conn = writer.add_connection(topic, ACTION_TYPE, typestore=store)
        for r in rows:
            a = np.asarray(r["action"], dtype=np.float32)
            msg = Action(
                header=Header(stamp=Time(sec=r["stamp_ns"] // 1_000_000_000, nanosec=r["stamp_ns"] % 1_000_000_000),
                              frame_id=frame_id),
                delta_position=Vector3(x=float(a[0]), y=float(a[1]), z=float(a[2])),
                delta_orientation=Vector3(x=float(a[3]), y=float(a[4]), z=float(a[5])),
                gripper=float(a[6]), gripper_raw=float(a[6]),
                normalized=np.asarray(r["normalized"], dtype=np.float32), unclipped=a,
                tokens=np.asarray(r["tokens"], dtype=np.int32), clipped=False,
                instruction=r["instruction"], unnorm_key=r["unnorm_key"],
                inference_ms=float(r["inference_ms"]), latency_ms=float(r["latency_ms"]),
                sequence=int(r["sequence"]))
            writer.write(conn, int(r["bag_time_ns"]), store.serialize_cdr(msg, ACTION_TYPE))
    return len(rows)
