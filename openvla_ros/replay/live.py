"""Live replay: play the bag's images and instructions into the running openvla_node at the
recorded timing (x rate) and record what it publishes. Measures the real system: drops,
latency from publishing an image to receiving its action, achieved rate.

Images are re-stamped with the current time when published (the node never acts on old images)
and matched to the node's actions by that stamp. The recorded CDR is republished as is apart
from the stamp. The current instruction is re-sent every second so a node with
max_instruction_age_s keeps acting on it.

Several streams (bags, or image topics of one bag) are played at once into the node's streams,
from one player node (one executor): each stream publishes on its node stream's topics
(`<stream>/image`, `<stream>/instruction`; options.node_topic) and records its
`<stream>/action_preview`, each at its own recorded timing (x rate), all starting together (each
from its own first message); every stream has its own instruction and resend, sent frames and
matched actions. The node's status of each stream (`<node>/<stream>: OpenVLA stream` on
/diagnostics) goes into that stream's report, with the node's counters over the replay (its
values at the end less those at the start), and the node's batch counters into the overview.
One stream into the node's plain topics (no --node-streams) is the single-stream replay.
"""
from __future__ import annotations

import heapq
import threading
import time

from ..diagnostics import COUNTERS
from .bag import Frame, ReplayError, stamp_ns
from .frames import FrameSelector, Progress, frame_inputs
from .options import node_topic

INSTRUCTION_RESEND_S = 1.0
DIAG_WAIT_S = 3.0  # node streams: wait this long for the node's statuses before the first frame and after the last
POLICY_STATUS, STREAM_STATUS = ": OpenVLA policy", ": OpenVLA stream"
STREAM_COUNTERS = (*COUNTERS, "rejected_total", "speculative_drafted", "speculative_accepted_total")


class _Stream:
    """One replayed stream in the player: its topics and publishers, its frame selection and
    instruction, the frames it sent and the actions it received, the node's status of it."""

    def __init__(self, node, ep, o, name: str, lock: threading.Lock):
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        from openvla_ros.msg import EndEffectorAction

        self.ep, self.name, self.lock, self._String = ep, name, lock, String
        self.image_topic, self.instruction_topic, self.action_topic = (
            node_topic(o, name, t) for t in (o.node_image_topic, o.node_instruction_topic, o.node_action_topic))
        img_cls = CompressedImage if ep.topics[ep.image_topic][0].endswith("CompressedImage") else Image
        self.pub_img = node.create_publisher(img_cls, self.image_topic, qos_profile_sensor_data)
        self.pub_ins = node.create_publisher(String, self.instruction_topic,
                                             QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.received: dict[int, tuple[float, object]] = {}
        node.create_subscription(EndEffectorAction, self.action_topic, self.on_action,
                                 QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.resolved_action_topic = node.resolve_topic_name(self.action_topic)
        self.sent: list[tuple[int, Frame, float, str | None, object]] = []
        self.selector = FrameSelector(o.every, o.control_rate_hz, o.max_frames)
        self.current, self.last_sent_instruction = o.instruction, 0.0
        self.topics = {ep.image_topic} | (
            {ep.instruction_topic} if not o.instruction and ep.instruction_topic else set())
        self.messages = None  # the bag's messages of this stream (a generator), opened when playing starts
        self.first_t: int | None = None
        self.index = 0
        self.status: dict | None = None  # the node's newest status of this stream (values)
        self.status_t = 0.0
        self.status_start: dict | None = None  # the one seen before the first frame

    def on_action(self, msg) -> None:
        with self.lock:
            self.received.setdefault(stamp_ns(msg.header), (time.monotonic(), msg))

    def connected(self, node) -> bool:
        return bool(self.pub_img.get_subscription_count() and self.pub_ins.get_subscription_count()
                    and node.count_publishers(self.resolved_action_topic))

    def send_instruction(self, text: str) -> None:
        self.pub_ins.publish(self._String(data=text))
        self.last_sent_instruction = time.monotonic()

    def resend_if_due(self) -> None:
        if self.current and time.monotonic() - self.last_sent_instruction > INSTRUCTION_RESEND_S:
            self.send_instruction(self.current)

    def rows(self) -> tuple[list, list, str | None]:
        """(one row per sent frame, the receive times of the answered ones from this stream's
        first frame, the unnorm_key the node used)."""
        rows, done_times, t_first = [], [], self.sent[0][2] if self.sent else 0.0
        unnorm_key = None
        with self.lock:
            received = dict(self.received)
        for new_stamp, frame, t_sent, instruction, gt in self.sent:
            row = {"frame": frame.index, "stamp_ns": frame.stamp_ns, "bag_time_ns": frame.bag_time_ns,
                   "instruction": instruction or "", "gt": gt, "status": "dropped"}
            hit = received.get(new_stamp)
            if hit is not None:
                t_recv, a = hit
                unnorm_key = a.unnorm_key or unnorm_key
                row.update(status="ok", action=list(a.unclipped) if len(a.unclipped) == 7 else
                           [a.delta_position.x, a.delta_position.y, a.delta_position.z, a.delta_orientation.x,
                            a.delta_orientation.y, a.delta_orientation.z, a.gripper_raw],
                           normalized=list(a.normalized), tokens=list(a.tokens), out_of_range=0,
                           latency_ms=(t_recv - t_sent) * 1e3, inference_ms=a.inference_ms, unnorm_key=a.unnorm_key,
                           sequence=a.sequence, instruction=a.instruction or row["instruction"])
                done_times.append(t_recv - t_first)
            rows.append(row)
        return rows, done_times, unnorm_key


def _counts_during(start: dict | None, end: dict | None, keys) -> dict | None:
    """The node's counters `keys` at the end less those at the start (None without both)."""
    if not start or not end:
        return None
    ints = {k: (_int(end.get(k)), _int(start.get(k))) for k in keys}
    return {k: a - b for k, (a, b) in ints.items() if a is not None and b is not None}


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def run_live_streams(eps: list, o, stop, node_streams: list[str]) -> tuple[list, dict | None]:
    """Every stream into its node stream at once: ([(rows, info) per stream], the node's batch
    figures over the replay, None with one stream). node_streams[i]: the node stream of eps[i]
    ("" only alone: the node's plain topics, the single-stream replay)."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.exceptions import NameValidationException
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    named = any(node_streams)
    started_here = not rclpy.ok()
    if started_here:
        rclpy.init()
    node = Node("openvla_replay_player")
    lock = threading.Lock()
    try:
        streams = [_Stream(node, ep, o, name, lock) for ep, name in zip(eps, node_streams)]
    except NameValidationException as e:  # e.g. a --node-*-topic that is no valid ROS name
        node.destroy_node()
        if started_here and rclpy.ok():
            rclpy.shutdown()
        raise ReplayError(f"invalid node topic: {e}") from None
    first = streams[0]
    # The node's own view (backend, weights, its drop/reject counters) from /diagnostics, found by
    # the namespace the action topic resolves in.
    rel = f"{first.name}/{o.node_action_topic}"
    if named and first.resolved_action_topic.endswith("/" + rel):  # <namespace>/<stream>/<topic>
        node_ns = first.resolved_action_topic[: -len(rel)]
    else:
        node_ns = first.resolved_action_topic.rsplit("/", 1)[0] + "/"
    diagnostics: dict = {}  # the node's status (one stream unnamed: any OpenVLA status in its namespace)
    node_status = {"t": 0.0, "start": None}

    def on_diagnostics(arr):
        for st in arr.status:
            if not st.name.startswith(node_ns):
                continue
            values = {kv.key: kv.value for kv in st.values}
            if not named:
                if "OpenVLA" in st.name:
                    diagnostics.clear()
                    diagnostics.update(values)
                continue
            rest = st.name[len(node_ns):]
            with lock:
                if rest.endswith(POLICY_STATUS) and "/" not in rest:
                    diagnostics.clear()
                    diagnostics.update(values)
                    node_status["t"] = time.monotonic()
                for s in streams:
                    tail = f"/{s.name}{STREAM_STATUS}"
                    if rest.endswith(tail) and "/" not in rest[: -len(tail)]:
                        s.status, s.status_t = values, time.monotonic()

    def statuses_since(t: float) -> bool:
        """The node's status and each stream's, received after t."""
        with lock:
            return node_status["t"] > t and all(s.status is not None and s.status_t > t for s in streams)

    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    progress = Progress(None, o.progress, "live replay")
    try:
        deadline = time.monotonic() + o.wait_timeout_s
        while not all(s.connected(node) for s in streams):
            if time.monotonic() > deadline or stop.hit:
                s = next(s for s in streams if not s.connected(node))
                raise ReplayError(
                    f"no node subscribed to {s.pub_img.topic_name} and {s.pub_ins.topic_name} and publishing "
                    f"{s.resolved_action_topic} within {o.wait_timeout_s:.0f} s: is openvla_node running (same "
                    "ROS_DOMAIN_ID and namespace" + (", with these streams" if named else "") + ")?")
            time.sleep(0.05)
        if named:  # the node's counters before the first frame: what changes is the replay's
            deadline = time.monotonic() + DIAG_WAIT_S
            while not statuses_since(0.0) and time.monotonic() < deadline and not stop.hit:
                time.sleep(0.05)
            with lock:
                node_status["start"] = dict(diagnostics) if diagnostics else None
                for s in streams:
                    s.status_start = s.status

        if o.instruction:
            for s in streams:
                s.send_instruction(o.instruction)
            time.sleep(0.2)
        heap: list = []  # the next message of every stream still playing: (offset from its first, stream, message)

        def advance(i: int) -> None:
            s = streams[i]
            item = next(s.messages, None)
            if item is not None:
                if s.first_t is None:
                    s.first_t = item[2]
                heapq.heappush(heap, (item[2] - s.first_t, i, item))

        for i, s in enumerate(streams):
            s.messages = s.ep.messages(s.topics)
            advance(i)
        wall0 = None
        while heap and not stop.hit:
            offset, i, (topic, msgtype, t_ns, _raw, msg) = heapq.heappop(heap)
            s = streams[i]
            if wall0 is None:
                wall0 = time.monotonic()
            delay = wall0 + offset / 1e9 / o.rate - time.monotonic()
            while delay > 0 and not stop.hit:
                time.sleep(min(delay, 0.05))
                for x in streams:
                    x.resend_if_due()
                delay = wall0 + offset / 1e9 / o.rate - time.monotonic()
            if topic != s.ep.image_topic:
                s.current = str(msg.data)
                s.send_instruction(s.current)
            else:
                frame = Frame(s.index, t_ns, stamp_ns(msg.header) or t_ns, msgtype, b"", msg)
                s.index += 1
                if s.selector.accept(frame):
                    instruction, gt = frame_inputs(s.ep, o, frame)
                    now = node.get_clock().now().to_msg()
                    msg.header.stamp.sec, msg.header.stamp.nanosec = now.sec, now.nanosec
                    new_stamp = now.sec * 1_000_000_000 + now.nanosec
                    s.pub_img.publish(bytes(s.ep.typestore.serialize_cdr(msg, msgtype)))
                    s.sent.append((new_stamp, frame, time.monotonic(), instruction, gt))
                    progress.update()
            if not s.selector.full:
                advance(i)
        # let the last actions arrive: stop once nothing new came for settle_s
        last_count, quiet_since = -1, time.monotonic()
        while not stop.hit and time.monotonic() - quiet_since < o.settle_s:
            with lock:
                n = sum(len(s.received) for s in streams)
                answered = all(len(s.received) >= len(s.sent) for s in streams)
            if n != last_count:
                last_count, quiet_since = n, time.monotonic()
            if answered:
                break
            time.sleep(0.05)
        if named:  # the node's statuses after the last action
            t_end, deadline = time.monotonic(), time.monotonic() + DIAG_WAIT_S
            while not statuses_since(t_end) and time.monotonic() < deadline and not stop.hit:
                time.sleep(0.05)
    finally:
        progress.close()
        for s in streams:
            if s.messages is not None:
                s.messages.close()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        if started_here and rclpy.ok():
            rclpy.shutdown()

    common = {k: diagnostics[k] for k in ("backend", "mesh_device", "device", "dtype", "weights_path",
                                          "model_load_time_s") if k in diagnostics}
    results = []
    for s in streams:
        rows, done_times, unnorm_key = s.rows()
        if named:
            end = s.status
            model = {"node": node_ns.rstrip("/") or "/", "node_stream": s.name, "action_topic": s.action_topic,
                     **common, "node_diagnostics": dict(diagnostics), "stream_diagnostics": end,
                     "node_counts": _counts_during(s.status_start, end, STREAM_COUNTERS)}
        else:
            model = {"node": node_ns.rstrip("/") or "/", "action_topic": s.action_topic, **common,
                     "node_diagnostics": dict(diagnostics)}
        results.append((rows, {"model": model, "unnorm_key": unnorm_key, "selected": len(s.sent),
                               "done_times_s": sorted(done_times)}))
    if len(streams) == 1:
        return results, None
    counts = _counts_during(node_status["start"], dict(diagnostics), ("batches", "frames_processed")) or {}
    batches, items = counts.get("batches"), counts.get("frames_processed")
    return results, {"source": "node", "batches": batches, "items": items,
                     "mean_size": round(items / batches, 3) if batches and items is not None else None,
                     "max_size": _int(diagnostics.get("batch_size_max")), "sizes": None, "batched_backend": None}
