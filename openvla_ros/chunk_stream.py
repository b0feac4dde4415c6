"""A stream of openvla_node serving an OpenVLA-OFT checkpoint (chunk mode, docs/oft.md).

Chunk mode is chosen by the checkpoint (`policy.kind == "oft"`): at configure the node turns each
of its streams into a ChunkStream (`ChunkStream.upgrade`). On top of what a Stream does:

  in:   `wrist_image` (sensor_msgs/Image) or `wrist_image/compressed` (CompressedImage, with
        image_transport compressed) when the checkpoint takes 2 images (`num_images`);
        `proprio` (sensor_msgs/JointState or std_msgs/Float64MultiArray, `proprio_type`) when it
        has a proprio projector.
  out:  `action_chunk` (openvla_ros/EndEffectorActionChunk): every chunk that passed the checks,
        enabled or not (the preview of chunk mode);
        `action` / `twist` / `gripper` / `action_preview`: the chunk's steps, one every
        action_period_s (a timer of this stream), chosen by openvla_ros.chunk_executor
        (replacement, staleness, safety on every step); `action` / `twist` / `gripper` only while
        motion is enabled, `action_preview` always.

A frame needs an instruction, a fresh camera image and, when the checkpoint takes them, a wrist
image passing the same checks (age, conversion) and a robot state received at most
max_proprio_age_s ago with the checkpoint's number of values: anything missing or malformed is
refused with a warning that names it (counters rejected_bad_input / rejected_bad_image /
rejected_stale_image), the node stays up, nothing moves.
Stops: the executor's (chunk run out, stale step, stale input, refused step) and every stop of
the Stream (disable, watchdog, deactivate, signal) also drop the chunks; an instruction change
drops them too and stops (one zero-motion action) when a step had gone out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64, Float64MultiArray

from openvla_ros.msg import EndEffectorAction, EndEffectorActionChunk

from .chunk_executor import Chunk, ChunkExecutor, ExecutorConfig, Step, Stop
from .image_conversion import ImageConversionError
from .image_conversion import msg_to_rgb
from .oft_inputs import ProprioError, proprio_from_msg
from .safety import image_too_old
from .stream import Frame, Prepared, Stream, stamp_to_ns, twist_of

NS = 1_000_000_000


@dataclass(frozen=True)
class PreparedChunk:
    """A frame with everything the OFT pass needs."""
    prep: Prepared  # the primary frame as Stream.prepare made it (instruction, rgb, unnorm key)
    images: list  # [primary rgb] or [primary, wrist]
    proprio: np.ndarray | None
    proprio_stamp_ns: int  # node clock when the state arrived (0 without proprio)


@dataclass(frozen=True)
class ChunkInference:
    prepared: PreparedChunk
    chunk: object  # openvla_model.oft_policy.ActionChunk
    sequence: int
    model_ms: float


def chunk_num_images(policy, cfg) -> int:
    """Images per chunk: the num_images parameter, else what the checkpoint states, else 1."""
    return cfg.num_images or policy.spec.num_images_in_input or 1


def chunk_mode_problem(policy, cfg) -> str | None:
    """Why the node cannot execute this OFT checkpoint's chunks (configure fails with it), or None."""
    spec = policy.spec
    if spec.action_dim != 7:
        return (f"this OpenVLA-OFT checkpoint predicts {spec.action_dim}-dim actions; the node executes 7-dim "
                "end-effector chunks only ([dx, dy, dz, droll, dpitch, dyaw, gripper]; joint-space chunks such "
                "as ALOHA's are not supported)")
    stated = spec.num_images_in_input
    if stated and cfg.num_images and stated != cfg.num_images:
        return f"num_images {cfg.num_images}: this checkpoint takes {stated} image(s) per chunk"
    if chunk_num_images(policy, cfg) > 2:
        return (f"this checkpoint takes {chunk_num_images(policy, cfg)} images per chunk; the node feeds at most 2 "
                "(image, wrist_image)")
    return None


def _time_msg(ns: int):
    from builtin_interfaces.msg import Time

    return Time(sec=int(ns // NS), nanosec=int(ns % NS))


class ChunkStream(Stream):
    """See the module docstring. Only the worker calls prepare / infer / finish / publish; the
    executor thread calls the input callbacks and `tick`."""

    @classmethod
    def upgrade(cls, stream: Stream, policy, num_images: int) -> "ChunkStream":
        """Turn a Stream of the node (created before the checkpoint was known, its services bound)
        into a ChunkStream for `policy`, in place."""
        stream.__class__ = cls
        stream._init_chunk_mode(policy, num_images)
        return stream

    def _init_chunk_mode(self, policy, num_images: int) -> None:
        spec = policy.spec
        self.num_steps, self.action_dim = int(spec.num_actions_chunk), int(spec.action_dim)
        self.proprio_dim = spec.proprio_dim if policy.uses_proprio else None
        self.num_images = num_images
        self.executor = ChunkExecutor(self._executor_config())
        self.wrist: Frame | None = None  # the newest wrist frame (executor thread writes, worker reads)
        self.proprio: tuple | None = None  # (values or None, received ns, problem or None)
        self.chunk_sequence = 0
        self.chunks_published = 0
        self.pub_chunk = None
        self.tick_timer = None
        self._tick_period_s = None
        self._was_enabled = False

    def _executor_config(self) -> ExecutorConfig:
        cfg = self.cfg
        return ExecutorConfig(cfg.limits, cfg.gripper, cfg.max_image_age_s, cfg.execute_steps,
                              cfg.temporal_ensemble_decay)

    # ------------------------------------------------------------------ topics
    def create_topics(self) -> None:
        super().create_topics()
        node, cfg, guard = self.node, self.cfg, self.node._guard
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        out_qos = QoSProfile(depth=cfg.output_qos_depth, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE, history=HistoryPolicy.KEEP_LAST)
        self.pub_chunk = node.create_publisher(EndEffectorActionChunk, self.topic("action_chunk"), out_qos)
        sensor_qos = QoSProfile(
            depth=cfg.image_qos_depth, history=HistoryPolicy.KEEP_LAST, durability=DurabilityPolicy.VOLATILE,
            reliability=ReliabilityPolicy.BEST_EFFORT if cfg.image_qos_reliability == "best_effort"
            else ReliabilityPolicy.RELIABLE)
        if self.num_images == 2:
            if cfg.image_transport == "compressed":
                self.subs.append(node.create_subscription(CompressedImage, self.topic("wrist_image/compressed"),
                                                          guard(self.on_wrist_compressed), sensor_qos))
            else:
                self.subs.append(node.create_subscription(Image, self.topic("wrist_image"),
                                                          guard(self.on_wrist_image), sensor_qos))
        if self.proprio_dim is not None:
            msg_type = JointState if cfg.proprio_type == "joint_state" else Float64MultiArray
            self.subs.append(node.create_subscription(msg_type, self.topic("proprio"), guard(self.on_proprio),
                                                      sensor_qos))
        self._tick_period_s = cfg.action_period_s
        self.tick_timer = node.create_timer(cfg.action_period_s, guard(self.tick))

    def destroy_topics(self) -> None:
        super().destroy_topics()
        if self.pub_chunk is not None:
            self.node.destroy_publisher(self.pub_chunk)
            self.pub_chunk = None
        if self.tick_timer is not None:
            self.node.destroy_timer(self.tick_timer)
            self.tick_timer = None

    # ------------------------------------------------------------------ inputs (executor thread)
    def on_wrist_image(self, msg: Image) -> None:
        if self.node._active:
            self.wrist = Frame(msg, False, stamp_to_ns(msg.header.stamp))

    def on_wrist_compressed(self, msg: CompressedImage) -> None:
        if self.node._active:
            self.wrist = Frame(msg, True, stamp_to_ns(msg.header.stamp))

    def on_proprio(self, msg) -> None:
        if not self.node._active:
            return
        cfg = self.cfg
        try:
            values = proprio_from_msg(msg, cfg.proprio_type, joint_names=cfg.proprio_joint_names,
                                      indices=cfg.proprio_indices, expected_dim=self.proprio_dim)
            self.proprio = (values, self._now_ns(), None)
        except ProprioError as e:
            self.proprio = (None, self._now_ns(), str(e))
            self.warn(f"bad robot state on {self.topic('proprio')}: {e}")

    def set_instruction_text(self, text, source: str) -> None:
        """As a Stream; a changed or cleared instruction also drops the chunks made for the old one
        (one zero-motion action when a step of them had gone out)."""
        before = self.instruction_generation
        super().set_instruction_text(text, source)
        if self.instruction_generation != before:
            with self.node._out_lock:
                what = "instruction changed" if self.instruction is not None else "instruction cleared"
                if self.executor.cancel(what) is not None:
                    Stream.stop_motion(self, what, disable=False)

    def stop_motion(self, reason: str, *, disable: bool = True, always: bool = False) -> bool:
        """Every Stream stop (disable, watchdog, deactivate, signal) also drops the chunks."""
        with self.node._out_lock:
            self.executor.cancel(reason)
            return super().stop_motion(reason, disable=disable, always=always)

    def reset(self) -> None:
        """Activation / deactivation (enabled already set): no chunk, no wrist image, no state."""
        super().reset()
        self.executor.reset()
        self._was_enabled = self.enabled
        self.wrist = None
        self.proprio = None

    # ------------------------------------------------------------------ one frame (worker thread)
    def prepare(self, frame: Frame) -> PreparedChunk | None:
        prep = super().prepare(frame)  # instruction, image age, conversion (counted as processed)
        if prep is None:
            return None
        cfg, now = self.cfg, self._now_ns()
        images = [prep.rgb]
        if self.num_images == 2:
            wrist = self.wrist
            if wrist is None:
                self.reject("rejected_bad_input", f"not acting: this checkpoint takes 2 images (primary, wrist) and "
                                                  f"no wrist image arrived on {self.topic('wrist_image')}")
                return None
            reason = image_too_old(wrist.stamp_ns, now, cfg.max_image_age_s)
            if reason:
                self.reject("rejected_stale_image", f"not acting: wrist {reason}")
                return None
            try:
                images.append(msg_to_rgb(wrist.msg, wrist.compressed, cfg.max_image_pixels))
            except ImageConversionError as e:
                self.reject("rejected_bad_image", f"not acting: bad wrist image: {e}")
                return None
        proprio, proprio_ns = None, 0
        if self.proprio_dim is not None:
            state = self.proprio
            if state is None:
                self.reject("rejected_bad_input", f"not acting: this checkpoint needs the robot state "
                                                  f"({self.proprio_dim} values) and none arrived on "
                                                  f"{self.topic('proprio')}")
                return None
            proprio, proprio_ns, problem = state
            if problem:
                self.reject("rejected_bad_input", f"not acting: bad robot state on {self.topic('proprio')}: {problem}")
                return None
            age = (now - proprio_ns) / NS
            if age > cfg.max_proprio_age_s:
                self.reject("rejected_bad_input", f"not acting: the robot state is {age:.3f} s old "
                                                  f"(max_proprio_age_s {cfg.max_proprio_age_s:g})")
                return None
        return PreparedChunk(prep, images, proprio, proprio_ns)

    def infer(self, policy, pc: PreparedChunk):
        """One OFT pass: the ActionChunk, or the exception it raised (the item's outcome)."""
        try:
            return policy.predict_chunk(pc.images, pc.prep.instruction.text, proprio=pc.proprio,
                                        unnorm_key=pc.prep.unnorm_key)
        except Exception as e:  # noqa: BLE001 - handed to finish(), as a batch item's error
            return e

    def finish(self, pc: PreparedChunk, outcome, batch_ms: float) -> ChunkInference | None:
        if isinstance(outcome, Exception):
            self.fail(outcome)
            return None
        chunk = outcome
        model_ms = float(chunk.timings_ms.get("total", batch_ms))
        with self.node._out_lock:
            seq = self.chunk_sequence
            self.chunk_sequence = (self.chunk_sequence + 1) % (1 << 32)
        actions = np.asarray(chunk.actions)
        if actions.shape != (self.num_steps, self.action_dim) or not chunk.valid:
            self.reject("rejected_invalid_result", f"invalid chunk (sequence {seq}): shape {list(actions.shape)}, "
                                                   "non-finite values or out-of-range tokens; not executed")
            return None
        return ChunkInference(pc, chunk, seq, model_ms)

    def chunk_msg(self, inf: ChunkInference) -> EndEffectorActionChunk:
        c, pc = inf.chunk, inf.prepared
        msg = EndEffectorActionChunk()
        msg.header.stamp = pc.prep.frame.msg.header.stamp
        msg.header.frame_id = self.cfg.action_frame
        msg.action_period_s = float(self.cfg.action_period_s)
        msg.num_steps, msg.action_dim = self.num_steps, self.action_dim
        msg.actions = np.asarray(c.actions, np.float32).reshape(-1).tolist()
        msg.normalized = np.asarray(c.normalized, np.float32).reshape(-1).tolist()
        msg.tokens = [] if c.tokens is None else [int(t) for t in np.asarray(c.tokens).reshape(-1)]
        msg.instruction = pc.prep.instruction.text
        msg.unnorm_key = str(c.unnorm_key)
        msg.num_images = len(pc.images)
        msg.used_proprio = pc.proprio is not None
        if pc.proprio is not None:
            msg.proprio_stamp = _time_msg(pc.proprio_stamp_ns)
        msg.inference_ms = inf.model_ms
        msg.sequence = inf.sequence
        return msg

    def publish(self, inf: ChunkInference) -> None:
        """Under the output lock: dropped when deactivated, when the instruction changed during
        inference or when the frame aged past max_image_age_s meanwhile; else published on
        `action_chunk` and handed to the executor (its steps go out on the ticks)."""
        cfg, node, prep = self.cfg, self.node, inf.prepared.prep
        msg = self.chunk_msg(inf)
        with node._out_lock:
            now_ns = self.still_current(prep.instruction, prep.frame.stamp_ns, "chunk")
            if now_ns is None:
                return
            msg.latency_ms = (now_ns - prep.frame.stamp_ns) * 1e-6
            self.pub_chunk.publish(msg)
            self.chunks_published += 1
            c = inf.chunk
            refused = self.executor.offer(
                Chunk(np.asarray(c.actions, np.float64), prep.frame.stamp_ns, float(cfg.action_period_s),
                      inf.sequence, np.asarray(c.normalized, np.float64),
                      None if c.tokens is None else np.asarray(c.tokens), tag=(inf, prep.instruction.generation)),
                now_ns)
        if refused:
            self.warn(f"chunk not executed: {refused}")
        self.last_frame_problem = None
        self.stats.success(inf.model_ms, (time.perf_counter() - prep.started) * 1e3 - inf.model_ms)

    # ------------------------------------------------------------------ the tick (executor thread)
    def tick(self) -> None:
        """Every action_period_s: the executor's step (published) or stop (the zero-motion action)."""
        node, cfg = self.node, self.cfg
        if self.tick_timer is not None and cfg.action_period_s != self._tick_period_s:
            self._tick_period_s = cfg.action_period_s  # runtime parameter
            self.tick_timer.timer_period_ns = int(cfg.action_period_s * NS)
        with node._out_lock:
            if not node._active:
                return
            if self.enabled and not self._was_enabled:  # ~/enable true after a dry run: motion starts with
                self.executor.reset(keep_pending=True)  # the newest chunk, not mid-way through a previewed one
            self._was_enabled = self.enabled
            self.executor.config = self._executor_config()  # limits etc. may change at runtime
            problem = self.input_stale()  # camera stale, instruction cleared or expired
            result = self.executor.tick(self._now_ns(), problem)
            if isinstance(result, Stop):
                if Stream.stop_motion(self, result.reason, disable=False):
                    if problem:
                        self.stats.inc("stale_input_stops")
                    self.warn(f"chunk execution stopped: {result.reason}; zero-motion action and zero twist published")
                return
            if isinstance(result, Step):
                self._publish_step(result)

    def _publish_step(self, step: Step) -> None:
        """One executed step (output lock held): `action` / `twist` / `gripper` while enabled,
        `action_preview` always. Stamp = the step's planned time (image stamp + k periods)."""
        cfg, safe = self.cfg, step.safe
        inf, _ = step.chunk.tag
        msg = EndEffectorAction()
        msg.header.stamp = _time_msg(step.planned_ns)
        msg.header.frame_id = cfg.action_frame
        msg.delta_position.x, msg.delta_position.y, msg.delta_position.z = safe.delta_position
        msg.delta_orientation.x, msg.delta_orientation.y, msg.delta_orientation.z = safe.delta_orientation
        msg.gripper, msg.gripper_raw = float(safe.gripper), float(safe.gripper_raw)
        msg.normalized = [] if step.normalized is None else [float(v) for v in step.normalized]
        msg.unclipped = [float(v) for v in step.action]
        msg.tokens = [] if step.chunk.tokens is None or step.contributors > 1 else \
            [int(t) for t in step.chunk.tokens[step.index]]
        msg.clipped = safe.clipped
        msg.instruction = inf.prepared.prep.instruction.text
        msg.unnorm_key = str(inf.chunk.unnorm_key)
        msg.inference_ms = inf.model_ms
        msg.latency_ms = (self._now_ns() - step.chunk.stamp_ns) * 1e-6
        msg.sequence = self._next_sequence()
        if self.enabled:
            self.pub_action.publish(msg)
            if self.pub_twist is not None:
                self.pub_twist.publish(twist_of(msg, step.chunk.period_s))
            if self.pub_gripper is not None:
                self.pub_gripper.publish(Float64(data=float(safe.gripper)))
            self.last_gripper = (float(safe.gripper), float(safe.gripper_raw))
            self.motion_since_stop = True
            self.stats.inc("actions_published")
            self.stats.published(msg.latency_ms)
        if self.pub_preview is not None:
            self.pub_preview.publish(msg)
            self.stats.inc("actions_previewed")
        if safe.clipped:
            self.stats.inc("actions_clipped")

    # ------------------------------------------------------------------ diagnostics
    def diagnostic_values(self) -> dict:
        counts = self.executor.counts.values
        return {**super().diagnostic_values(), "chunk_mode": True, "chunk_steps": self.num_steps,
                "num_images": self.num_images, "uses_proprio": self.proprio_dim is not None,
                "execute_steps": self.cfg.execute_steps, "chunks_published": self.chunks_published,
                **{f"chunk_{k}": v for k, v in counts.items()}}
