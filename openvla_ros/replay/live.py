"""Live replay: play the bag's images and instructions into the running openvla_node at the
recorded timing (x rate) and record what it publishes. Measures the real system: drops,
latency from publishing an image to receiving its action, achieved rate.

Images are re-stamped with the current time when published (the node never acts on old images)
and matched to the node's actions by that stamp. The recorded CDR is republished as is apart
from the stamp. The current instruction is re-sent every second so a node with
max_instruction_age_s keeps acting on it.
"""
from __future__ import annotations

import threading
import time

from .bag import Frame, ReplayError, stamp_ns
from .frames import FrameSelector, Progress, frame_inputs

INSTRUCTION_RESEND_S = 1.0


def run_live(ep, o, stop) -> tuple[list, dict]:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    from openvla_ros.msg import EndEffectorAction

    started_here = not rclpy.ok()
    if started_here:
        rclpy.init()
    node = Node("openvla_replay_player")
    img_type = ep.topics[ep.image_topic][0]
    img_cls = CompressedImage if img_type.endswith("CompressedImage") else Image
    pub_img = node.create_publisher(img_cls, o.node_image_topic, qos_profile_sensor_data)
    pub_ins = node.create_publisher(String, o.node_instruction_topic, QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    lock = threading.Lock()
    received: dict[int, tuple[float, object]] = {}

    def on_action(msg):
        with lock:
            received.setdefault(stamp_ns(msg.header), (time.monotonic(), msg))

    node.create_subscription(EndEffectorAction, o.node_action_topic, on_action,
                             QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    # The node's own view (backend, weights, its drop/reject counters) from /diagnostics.
    node_ns = node.resolve_topic_name(o.node_action_topic).rsplit("/", 1)[0] + "/"
    diagnostics: dict = {}

    def on_diagnostics(arr):
        for st in arr.status:
            if st.name.startswith(node_ns) and "OpenVLA" in st.name:
                diagnostics.clear()
                diagnostics.update({kv.key: kv.value for kv in st.values})

    from diagnostic_msgs.msg import DiagnosticArray

    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    sent: list[tuple[int, Frame, float, str | None, object]] = []
    progress = Progress(None, o.progress, "live replay")
    try:
        action_topic = node.resolve_topic_name(o.node_action_topic)
        deadline = time.monotonic() + o.wait_timeout_s
        while not (pub_img.get_subscription_count() and pub_ins.get_subscription_count()
                   and node.count_publishers(action_topic)):
            if time.monotonic() > deadline or stop.hit:
                raise ReplayError(
                    f"no node subscribed to {pub_img.topic_name} and {pub_ins.topic_name} and publishing "
                    f"{action_topic} within {o.wait_timeout_s:.0f} s: is openvla_node running (same ROS_DOMAIN_ID "
                    "and namespace)?")
            time.sleep(0.05)

        selector = FrameSelector(o.every, o.control_rate_hz, o.max_frames)
        current, last_sent_instruction = o.instruction, 0.0

        def send_instruction(text):
            nonlocal last_sent_instruction
            pub_ins.publish(String(data=text))
            last_sent_instruction = time.monotonic()

        if current:
            send_instruction(current)
            time.sleep(0.2)
        topics = {ep.image_topic} | ({ep.instruction_topic} if not o.instruction and ep.instruction_topic else set())
        first_t = wall0 = None
        index = 0
        for topic, msgtype, t_ns, _raw, msg in ep.messages(topics):
            if stop.hit or selector.full:
                break
            if first_t is None:
                first_t, wall0 = t_ns, time.monotonic()
            delay = wall0 + (t_ns - first_t) / 1e9 / o.rate - time.monotonic()
            while delay > 0 and not stop.hit:
                time.sleep(min(delay, 0.05))
                if current and time.monotonic() - last_sent_instruction > INSTRUCTION_RESEND_S:
                    send_instruction(current)
                delay = wall0 + (t_ns - first_t) / 1e9 / o.rate - time.monotonic()
            if topic != ep.image_topic:
                current = str(msg.data)
                send_instruction(current)
                continue
            frame = Frame(index, t_ns, stamp_ns(msg.header) or t_ns, msgtype, b"", msg)
            index += 1
            if not selector.accept(frame):
                continue
            instruction, gt = frame_inputs(ep, o, frame)
            now = node.get_clock().now().to_msg()
            msg.header.stamp.sec, msg.header.stamp.nanosec = now.sec, now.nanosec
            new_stamp = now.sec * 1_000_000_000 + now.nanosec
            pub_img.publish(bytes(ep.typestore.serialize_cdr(msg, msgtype)))
            sent.append((new_stamp, frame, time.monotonic(), instruction, gt))
            progress.update()
        # let the last actions arrive: stop once nothing new came for settle_s
        last_count, quiet_since = -1, time.monotonic()
        while not stop.hit and time.monotonic() - quiet_since < o.settle_s:
            with lock:
                n = len(received)
            if n != last_count:
                last_count, quiet_since = n, time.monotonic()
            if n >= len(sent):
                break
            time.sleep(0.05)
    finally:
        progress.close()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        if started_here and rclpy.ok():
            rclpy.shutdown()

    rows, done_times, t_first = [], [], sent[0][2] if sent else 0.0
    unnorm_key = None
    for new_stamp, frame, t_sent, instruction, gt in sent:
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
    model = {"node": node_ns.rstrip("/") or "/", "action_topic": o.node_action_topic,
             **{k: diagnostics[k] for k in ("backend", "mesh_device", "device", "dtype", "weights_path",
                                            "model_load_time_s") if k in diagnostics},
             "node_diagnostics": dict(diagnostics)}
    return rows, {"model": model, "unnorm_key": unnorm_key, "selected": len(sent), "done_times_s": sorted(done_times)}
