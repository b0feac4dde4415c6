"""One stream of openvla_node: a camera, an instruction and the robot (arm) that acts on them.

A node serves one or more streams (parameter `streams`) with one resident policy. Everything
that belongs to one robot lives here, once per stream: its topics (namespace-relative
`<stream>/image`, `<stream>/instruction`, `<stream>/action`, ...; the unnamed stream "" has the
plain names `image`, `action`, ...), its instruction, its pending frame, ~/<stream>/enable, its
safety state (limits, staleness watchdog, the zero-motion stop), its counters, its speculative
draft memory (drafts never cross streams) and its diagnostics status. The node owns what is
shared: the policy, the lifecycle, the output lock, and the worker that batches the streams'
frames (node.py).

A frame goes through three steps, each stream's own, so one stream's bad input (a malformed image,
a refused instruction, an item the model refuses) never touches another's action:
  prepare(frame)          checks before inference, conversion, the draft -> Prepared | None
  finish(prepared, out)   the item's outcome of the batch (result or error), result checks -> Inference | None
  publish(inference)      under the output lock: re-checks, then action / twist / gripper / preview
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from geometry_msgs.msg import TwistStamped
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float64, String
from std_srvs.srv import SetBool

from openvla_model.speculative import DraftState
from openvla_ros.msg import EndEffectorAction

from .diagnostics import Health, Stats, stats_values
from .image_conversion import ImageConversionError, msg_to_rgb
from .params import NodeConfig
from .safety import (Instruction, SafeAction, SafetyError, check_instruction_text, image_too_old, instruction_stale,
                     make_safe_action)


@dataclass(frozen=True)
class Frame:
    msg: object  # sensor_msgs/Image or CompressedImage
    compressed: bool
    stamp_ns: int


@dataclass(frozen=True)
class Prepared:
    """A frame that passed the checks before inference, converted: one item of the next batch."""
    frame: Frame
    instruction: Instruction
    rgb: object  # uint8 HxWx3
    unnorm_key: str | None
    draft: object  # token ids or None
    started: float  # time.perf_counter() when processing of the frame began


@dataclass(frozen=True)
class Inference:
    """What `finish` hands to `publish`: a model result that passed the safety checks."""
    frame: Frame
    instruction: Instruction
    result: object  # openvla_model.ActionResult
    safe: SafeAction
    sequence: int
    model_ms: float
    started: float  # time.perf_counter() when processing of the frame began


def stamp_to_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def predict_items(policy, items: list) -> list:
    """One batch through the policy: `predict_batch` (one backend call for every item; per-item
    errors come back as the item's outcome) when the policy has it, else `predict` per item with
    each item's exception as its outcome (a policy without a batch entry point, such as a test
    double). items: openvla_model.policy.BatchItem. A failure of the whole batch raises."""
    if hasattr(policy, "predict_batch"):
        return list(policy.predict_batch(items))
    outcomes = []
    for item in items:
        try:
            if item.draft is None:
                outcomes.append(policy.predict(item.rgb, item.instruction, item.unnorm_key))
            else:  # a bad draft is ignored by the policy, never raised
                outcomes.append(policy.predict(item.rgb, item.instruction, item.unnorm_key, draft=item.draft))
        except Exception as e:  # noqa: BLE001 - the item's outcome, as predict_batch returns it
            outcomes.append(e)
    return outcomes


def twist_of(action: EndEffectorAction, period_s: float) -> TwistStamped:
    tw = TwistStamped()
    tw.header = action.header
    tw.twist.linear.x = action.delta_position.x / period_s
    tw.twist.linear.y = action.delta_position.y / period_s
    tw.twist.linear.z = action.delta_position.z / period_s
    # roll/pitch/yaw increments per period ~ angular velocity (small-angle approximation)
    tw.twist.angular.x = action.delta_orientation.x / period_s
    tw.twist.angular.y = action.delta_orientation.y / period_s
    tw.twist.angular.z = action.delta_orientation.z / period_s
    return tw


class Stream:
    """Per-stream state and behaviour. `node` is the owning OpenVLANode: its clock, logger,
    `_out_lock` (orders enable/disable, activation, instruction changes and publishing, for every
    stream), `_cond` (guards `pending`), `_active`, `_shutting_down` and `_speculative`."""

    def __init__(self, node, name: str, cfg: NodeConfig, stats: Stats):
        self.node = node
        self.name = name
        self.cfg = cfg  # the node's configuration with this stream's overrides (params.NodeConfig.for_stream)
        self.stats = stats
        self.logger = node.get_logger().get_child(name) if name else node.get_logger()
        self.drafts = DraftState(cfg.speculative_max_age_s)  # worker only (and activate / deactivate)
        self.pending: Frame | None = None  # guarded by node._cond
        self.pending_since = 0.0  # time.monotonic() when `pending` was filled after being empty
        self.enabled = False
        self.instruction: Instruction | None = None
        self.instruction_generation = 0
        self.sequence = 0
        self.last_gripper: tuple[float, float] | None = None  # (after convention, raw)
        self.motion_since_stop = False  # a motion command went out after the last stop
        self.newest_stamp_ns: int | None = None  # stamp of the newest frame received while active
        self.last_frame_problem: str | None = None
        self.subs: list = []
        self.pub_action = self.pub_preview = self.pub_twist = self.pub_gripper = None
        self.enable_srv = None

    # ------------------------------------------------------------------ names
    def topic(self, base: str) -> str:
        """Namespace-relative topic of this stream: `<stream>/<base>`, or `<base>` unnamed."""
        return f"{self.name}/{base}" if self.name else base

    @property
    def label(self) -> str:
        return f"stream {self.name}: " if self.name else ""

    def warn(self, message: str) -> None:
        self.logger.warning(message, throttle_duration_sec=self.cfg.log_throttle_s)

    def _now_ns(self) -> int:
        return self.node._now_ns()

    def _next_sequence(self) -> int:
        seq = self.sequence
        self.sequence = (self.sequence + 1) % (1 << 32)
        return seq

    # ------------------------------------------------------------------ topics
    def create_topics(self) -> None:
        node, cfg, guard = self.node, self.cfg, self.node._guard
        out_qos = QoSProfile(depth=cfg.output_qos_depth, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE, history=HistoryPolicy.KEEP_LAST)
        self.pub_action = node.create_publisher(EndEffectorAction, self.topic("action"), out_qos)
        self.pub_preview = node.create_publisher(EndEffectorAction, self.topic("action_preview"), out_qos) \
            if cfg.publish_preview else None
        self.pub_twist = node.create_publisher(TwistStamped, self.topic("twist"), out_qos) \
            if cfg.publish_twist else None
        self.pub_gripper = node.create_publisher(Float64, self.topic("gripper"), out_qos) \
            if cfg.publish_gripper else None
        image_qos = QoSProfile(
            depth=cfg.image_qos_depth, history=HistoryPolicy.KEEP_LAST, durability=DurabilityPolicy.VOLATILE,
            reliability=ReliabilityPolicy.BEST_EFFORT if cfg.image_qos_reliability == "best_effort"
            else ReliabilityPolicy.RELIABLE)
        if cfg.image_transport == "compressed":
            self.subs.append(node.create_subscription(
                CompressedImage, self.topic("image/compressed"), guard(self.on_compressed_image), image_qos))
        else:
            self.subs.append(node.create_subscription(Image, self.topic("image"), guard(self.on_image), image_qos))
        instr_qos = QoSProfile(
            depth=cfg.instruction_qos_depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if cfg.instruction_qos_durability == "transient_local"
            else DurabilityPolicy.VOLATILE)
        self.subs.append(node.create_subscription(String, self.topic("instruction"), guard(self.on_instruction),
                                                  instr_qos))

    def destroy_topics(self) -> None:
        for sub in self.subs:
            self.node.destroy_subscription(sub)
        self.subs = []
        for name in ("pub_action", "pub_preview", "pub_twist", "pub_gripper"):
            pub = getattr(self, name)
            if pub is not None:
                self.node.destroy_publisher(pub)
            setattr(self, name, None)

    # ------------------------------------------------------------------ inputs (executor thread)
    def on_image(self, msg: Image) -> None:
        self.hand_over(Frame(msg, False, stamp_to_ns(msg.header.stamp)))

    def on_compressed_image(self, msg: CompressedImage) -> None:
        self.hand_over(Frame(msg, True, stamp_to_ns(msg.header.stamp)))

    def hand_over(self, frame: Frame) -> None:
        """The newest frame replaces the pending one (counted as dropped): never a backlog."""
        if not self.node._active:
            return
        self.stats.inc("frames_received")
        self.stats.image_received()
        self.newest_stamp_ns = frame.stamp_ns
        with self.node._cond:
            if self.pending is not None:
                self.stats.inc("frames_dropped")
            else:
                self.pending_since = time.monotonic()
            self.pending = frame
            self.node._cond.notify()

    def take_pending(self) -> Frame | None:
        """The pending frame, emptied (caller holds node._cond)."""
        frame, self.pending = self.pending, None
        return frame

    def on_instruction(self, msg: String) -> None:
        self.stats.inc("instructions_received")
        self.node._set_instruction_text(msg.data, "instruction topic", stream=self)

    def set_instruction_text(self, text, source: str) -> None:
        """A refused instruction (empty, too long, non-printable) clears the current one; the same
        text again refreshes its age and keeps results in flight valid."""
        lock = self.node._out_lock
        try:
            cleaned = check_instruction_text(text, self.cfg.max_instruction_chars)
        except SafetyError as e:
            with lock:
                self.instruction_generation += 1
                self.instruction = None
            self.stats.inc("instructions_rejected")
            self.warn(f"instruction refused ({e}); current instruction cleared: no actions until a valid one "
                      "arrives")
            return
        with lock:
            if self.instruction is not None and self.instruction.text == cleaned:
                self.instruction = Instruction(cleaned, self._now_ns(), self.instruction_generation)
                return
            self.instruction_generation += 1
            self.instruction = Instruction(cleaned, self._now_ns(), self.instruction_generation)
        self.logger.info(f"instruction ({source}): {cleaned[:200]!r}")

    def on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        """~/<stream>/enable: true enables this stream's motion (only when active); false publishes
        its zero-motion action and turns its motion off. Other streams are untouched."""
        what = f"~/{self.name}/enable"
        with self.node._out_lock:
            if request.data:
                problem = self.node.enable_problem()
                self.enabled = problem is None
                response.success, response.message = problem is None, problem or "motion enabled"
            else:
                self.stop_motion(f"disabled via {what}", always=True)
                response.success, response.message = True, "motion disabled; zero-motion action published"
        self.logger.info(f"{what} {request.data}: {response.message}")
        return response

    # ------------------------------------------------------------------ stopping the robot
    def stop_motion(self, reason: str, *, disable: bool = True, always: bool = False) -> bool:
        """This stream's safety stop (OpenVLANode.stop_motion calls it for every stream): one
        zero-motion action on `action` (and `action_preview`) and one zero twist on `twist`, while
        active with motion enabled (`always`: even when already disabled, as ~/enable false
        promises). `disable` turns motion off. The zero-motion action holds the last commanded
        gripper (NaN if none) and has empty normalized / unclipped / tokens. Safe in a signal
        handler: only the re-entrant output lock. Returns whether a stop was published."""
        node = self.node
        with node._out_lock:
            publish = node._active and (self.enabled or always) and self.pub_action is not None
            if disable:
                self.enabled = False
            if publish:
                msg = EndEffectorAction()
                msg.header.stamp = node.get_clock().now().to_msg()
                msg.header.frame_id = self.cfg.action_frame
                gripper, raw = self.last_gripper if self.last_gripper else (math.nan, math.nan)
                msg.gripper, msg.gripper_raw = gripper, raw
                msg.unnorm_key = self.cfg.unnorm_key
                msg.sequence = self._next_sequence()
                self.pub_action.publish(msg)
                if self.pub_twist is not None:
                    self.pub_twist.publish(twist_of(msg, self.cfg.action_period_s))
                if self.pub_preview is not None:
                    self.pub_preview.publish(msg)
                self.motion_since_stop = False
        if publish:
            self.logger.info(f"zero-motion action published ({reason})")
        return publish

    def image_stale(self) -> str | None:
        """Why the camera input is stale (the newest frame received is too old, by the same rule
        as every frame), or None. No frame since activation: None (nothing was commanded)."""
        stamp = self.newest_stamp_ns
        return None if stamp is None else image_too_old(stamp, self._now_ns(), self.cfg.max_image_age_s)

    def input_stale(self) -> str | None:
        """Why the input no longer supports motion, or None: the instruction was cleared (refused)
        or expired (max_instruction_age_s), or the camera input is stale."""
        problem = instruction_stale(self.instruction, self._now_ns(), self.cfg.max_instruction_age_s)
        return problem or self.image_stale()

    def watch_input(self) -> None:
        """Stale-input watchdog (the node's timer, for every stream): when the camera stops or its
        stamps freeze, or the instruction is cleared or expires, while motion is enabled, a velocity
        consumer would keep the last twist; one stop per stale episode (it ends with the next command)."""
        with self.node._out_lock:
            if not (self.node._active and self.enabled and self.motion_since_stop):
                return
            reason = self.input_stale()
            if not reason or not self.stop_motion(f"stale input: {reason}", disable=False):
                return
        self.stats.inc("stale_input_stops")
        self.warn(f"stale input while motion is enabled: {reason}; zero-motion action and zero twist published, "
                  "acting again on fresh frames")

    def reset(self) -> None:
        """Activation / deactivation: no pending frame, no draft, no stamp to watch."""
        self.pending = None
        self.newest_stamp_ns = None
        self.drafts.reset()

    # ------------------------------------------------------------------ one frame (worker thread)
    def reject(self, counter: str, message: str) -> None:
        self.stats.inc(counter)
        self.last_frame_problem = message
        self.warn(message)

    def prepare(self, frame: Frame) -> Prepared | None:
        """Checks before inference (instruction, image age) and conversion. None: refused (counted,
        warned)."""
        cfg = self.cfg
        started = time.perf_counter()
        if self.node.policy is None or not self.node._active:
            return None
        with self.node._out_lock:
            instr = self.instruction
        problem = instruction_stale(instr, self._now_ns(), cfg.max_instruction_age_s)
        if problem:
            self.stats.inc("rejected_no_instruction" if problem == "no instruction" else "rejected_stale_instruction")
            if problem != "no instruction":
                self.warn(f"not acting: {problem}")
            return None
        reason = image_too_old(frame.stamp_ns, self._now_ns(), cfg.max_image_age_s)
        if reason:
            self.reject("rejected_stale_image", f"frame not acted on: {reason}")
            return None
        try:
            rgb = msg_to_rgb(frame.msg, frame.compressed, cfg.max_image_pixels)
        except ImageConversionError as e:
            self.reject("rejected_bad_image", f"bad image: {e}")
            return None
        self.stats.inc("frames_processed")
        return Prepared(frame, instr, rgb, cfg.unnorm_key or None, self._draft(instr), started)

    def fail(self, error: Exception) -> None:
        """The item failed in the model: an InputError is the input's fault (counted as refused);
        anything else is an inference failure (counted; diagnostics ERROR after 3 in a row)."""
        from openvla_model import InputError

        self.drafts.reset()
        if isinstance(error, InputError):
            self.reject("rejected_bad_input", f"input refused by the model: {error}")
            return
        self.stats.inc("inference_errors")
        self.stats.error(f"inference failed: {type(error).__name__}: {error}", failure=True)
        self.logger.error(f"inference failed: {type(error).__name__}: {error}",
                          throttle_duration_sec=self.cfg.log_throttle_s)

    def finish(self, prep: Prepared, outcome, batch_ms: float) -> Inference | None:
        """This item's outcome of the batch: an exception (see `fail`) or an ActionResult, checked
        (valid tokens, finite values) and clipped. None: refused (counted, warned)."""
        if isinstance(outcome, Exception):
            self.fail(outcome)
            return None
        result, cfg = outcome, self.cfg
        model_ms = float(result.timings_ms.get("total", batch_ms))
        self._remember_draft(prep.instruction, result, prep.draft is not None)
        with self.node._out_lock:
            seq = self._next_sequence()
        if not result.valid:
            bad = [int(t) for t, o in zip(result.tokens, result.out_of_range) if o]
            self.reject("rejected_invalid_result",
                        f"invalid model output (sequence {seq}): out-of-range tokens {bad}, "
                        f"action {[round(float(v), 5) for v in result.action]}")
            return None
        try:
            safe = make_safe_action(result.action, cfg.limits, cfg.gripper)
        except SafetyError as e:
            self.reject("rejected_invalid_result", f"invalid model output (sequence {seq}): {e}")
            return None
        return Inference(prep.frame, prep.instruction, result, safe, seq, model_ms, prep.started)

    def _draft(self, instr: Instruction):
        """The draft for this frame: the last valid action's tokens of this stream when produced
        for this instruction (same generation: not across a change or a refusal) at most
        speculative_max_age_s ago; None otherwise or with speculative decoding off."""
        if not self.node._speculative:
            return None
        try:
            self.drafts.max_age_s = self.node.cfg.speculative_max_age_s  # runtime-changeable
            return self.drafts.draft((instr.generation, instr.text))
        except Exception as e:  # noqa: BLE001 - a draft problem never stops an action: decode plainly
            self.drafts.reset()
            self.warn(f"no draft for this frame: {type(e).__name__}: {e}")
            return None

    def _remember_draft(self, instr: Instruction, result, drafted: bool) -> None:
        """Count the acceptance and keep this result's tokens as the stream's next draft when they
        are all valid action tokens (an invalid result leaves no draft)."""
        if not self.node._speculative:
            return
        try:
            self.stats.speculation(drafted, int(getattr(result, "accepted", 0) or 0) if drafted else 0)
            if result.valid:
                self.drafts.update((instr.generation, instr.text), result.tokens)
            else:
                self.drafts.reset()
        except Exception as e:  # noqa: BLE001 - bookkeeping never stops an action
            self.drafts.reset()
            self.warn(f"speculative decoding bookkeeping failed: {type(e).__name__}: {e}")

    def action_msg(self, inf: Inference) -> EndEffectorAction:
        result, safe = inf.result, inf.safe
        msg = EndEffectorAction()
        msg.header.stamp = inf.frame.msg.header.stamp
        msg.header.frame_id = self.cfg.action_frame
        msg.delta_position.x, msg.delta_position.y, msg.delta_position.z = safe.delta_position
        msg.delta_orientation.x, msg.delta_orientation.y, msg.delta_orientation.z = safe.delta_orientation
        msg.gripper, msg.gripper_raw = float(safe.gripper), float(safe.gripper_raw)
        msg.normalized = [float(v) for v in result.normalized]
        msg.unclipped = [float(v) for v in result.action]
        msg.tokens = [int(t) for t in result.tokens]
        msg.clipped = safe.clipped
        msg.instruction = inf.instruction.text
        msg.unnorm_key = str(result.unnorm_key)
        msg.inference_ms = inf.model_ms
        msg.sequence = inf.sequence
        return msg

    def still_current(self, instruction, stamp_ns: int, what: str) -> int | None:
        """Under the output lock, before a result is published: None (counted and warned as a
        rejection) when the node is inactive, the instruction changed or was cleared during
        inference, or the frame aged past max_image_age_s meanwhile; else the time now (ns)."""
        if not self.node._active:
            return None
        if self.instruction is None or self.instruction.generation != instruction.generation:
            self.reject("rejected_stale_instruction",
                        f"{what} dropped: the instruction changed or was cleared during inference")
            return None
        now_ns = self._now_ns()
        reason = image_too_old(stamp_ns, now_ns, self.cfg.max_image_age_s)
        if reason:
            self.reject("rejected_stale_image", f"{what} dropped before publishing: {reason}")
            return None
        return now_ns

    def publish(self, inf: Inference) -> None:
        """Under the output lock: drop the result when deactivated, when the instruction changed
        during inference or when the frame aged past max_image_age_s meanwhile; else publish it on
        `action` / `twist` / `gripper` (motion enabled) and `action_preview`, and count it."""
        cfg, node = self.cfg, self.node
        msg = self.action_msg(inf)
        with node._out_lock:
            now_ns = self.still_current(inf.instruction, inf.frame.stamp_ns, "result")
            if now_ns is None:
                return
            msg.latency_ms = (now_ns - inf.frame.stamp_ns) * 1e-6
            if self.enabled:
                self.pub_action.publish(msg)
                if self.pub_twist is not None:
                    self.pub_twist.publish(twist_of(msg, cfg.action_period_s))
                if self.pub_gripper is not None:
                    self.pub_gripper.publish(Float64(data=float(inf.safe.gripper)))
                self.last_gripper = (float(inf.safe.gripper), float(inf.safe.gripper_raw))
                self.motion_since_stop = True
                self.stats.inc("actions_published")
                self.stats.published(msg.latency_ms)
            if self.pub_preview is not None:
                self.pub_preview.publish(msg)
                self.stats.inc("actions_previewed")
            if inf.safe.clipped:
                self.stats.inc("actions_clipped")
        self.last_frame_problem = None
        self.stats.success(inf.model_ms, (time.perf_counter() - inf.started) * 1e3 - inf.model_ms)

    # ------------------------------------------------------------------ diagnostics
    def health(self) -> Health:
        node, cfg = self.node, self.cfg
        with node._out_lock:
            instr = self.instruction
        last_img = self.stats.last_image_monotonic
        since_rej = self.stats.snapshot()["last_rejection_age_s"]
        return Health(
            lifecycle_state=node.lifecycle_state(), load_error=node.load_error,
            worker_alive=node._worker is not None and node._worker.is_alive(), enabled=self.enabled,
            consecutive_failures=self.stats.consecutive_failures, has_instruction=instr is not None,
            instruction_problem=instruction_stale(instr, self._now_ns(), cfg.max_instruction_age_s),
            seconds_since_image=(time.monotonic() - last_img) if last_img else None,
            last_image_problem=self.last_frame_problem,
            recent_rejection=since_rej is not None and since_rej <= max(node.cfg.diagnostics_period_s, 1.0),
            max_image_age_s=cfg.max_image_age_s,
            stale_input=self.image_stale() if node._active and self.enabled else None)

    def diagnostic_values(self) -> dict:
        """This stream's values on /diagnostics (its configuration, instruction, counters, times)."""
        with self.node._out_lock:
            instr = self.instruction
        return {"motion_enabled": self.enabled, "unnorm_key": self.cfg.unnorm_key,
                "instruction": (instr.text[:120] if instr else ""), "image_transport": self.cfg.image_transport,
                **stats_values(self.stats)}
