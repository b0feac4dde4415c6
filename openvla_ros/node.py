"""openvla_node: camera image + language instruction in, end-effector actions out.

Lifecycle (rclpy LifecycleNode):
  configure  = load the policy once (weights, device) and create topics; it stays resident.
  activate   = start the inference worker; actions flow.
  deactivate = publish one zero-motion action if motion was enabled, stop the worker.
  cleanup / shutdown = close the policy (device released).
Every place that must stop the robot (~/enable false, stale input, deactivate / shutdown, SIGINT /
SIGTERM) calls one function, `stop_motion`: one zero-motion action and one zero twist.
With `autostart` (default true) the node configures and activates itself, so `ros2 run` works.
A failed configure (bad weights path, backend unavailable) leaves the node up, unconfigured,
reporting ERROR on /diagnostics with the reason.

Threads: the executor thread only hands work on (store the newest frame, set the instruction,
answer services, publish diagnostics, watch for stale input); one worker thread converts and
infers (`_infer`), then publishes (`_publish`).
Speculative decoding (`speculative`, default true): the worker keeps one DraftState for the
node's stream; the last valid action's tokens are the draft for the next frame with the same
instruction (not after an instruction change or refusal, deactivate/activate, a failure, or
when older than speculative_max_age_s). Actions are the same as without it.
Frames arriving while the worker is busy replace the pending one (counted as dropped), so
there is never a backlog.

Topics (relative, so namespaces and remapping work):
  in:  image (sensor_msgs/Image) or image/compressed (sensor_msgs/CompressedImage), instruction
  out: action, action_preview (openvla_ros/EndEffectorAction), twist (TwistStamped), gripper (Float64),
       /diagnostics;  service: ~/enable (std_srvs/SetBool).
See docs/ros_node.md.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import TwistStamped
from rclpy.duration import Duration
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.logging import get_logger
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rcl_interfaces.msg import SetParametersResult
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float64, String
from std_srvs.srv import SetBool

from openvla_model.speculative import DraftState
from openvla_ros.msg import EndEffectorAction

from .diagnostics import REJECTED, Health, Stats, assess, build_status, percentile
from .image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb
from .params import SPECS, NodeConfig, ParameterError, declare_and_read, validate, wildcard_only_names
from .safety import (Instruction, SafeAction, SafetyError, check_instruction_text, image_too_old, instruction_stale,
                     make_safe_action)

NODE_NAME = "openvla_node"
WORKER_JOIN_TIMEOUT_S = 60.0  # one inference of the 7B model is well below this
WATCHDOG_MAX_PERIOD_S = 0.05  # stale-input checks at least this often (and twice per action_period_s)
STOP_FLUSH_TIMEOUT_S = 0.3  # a dying process waits at most this long for its stop to be acknowledged


@dataclass(frozen=True)
class Frame:
    msg: object  # sensor_msgs/Image or CompressedImage
    compressed: bool
    stamp_ns: int


@dataclass(frozen=True)
class Inference:
    """What `_infer` hands to `_publish`: a model result that passed the safety checks."""
    frame: Frame
    instruction: Instruction
    result: object  # openvla_model.ActionResult
    safe: SafeAction
    sequence: int
    model_ms: float
    started: float  # time.perf_counter() when processing of the frame began


def stamp_to_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def default_policy_loader(cfg: NodeConfig):
    """Load the policy for `cfg` (imports the model package lazily: parameter errors are reported
    before torch is imported)."""
    from openvla_model import load_policy

    kwargs = dict(backend=cfg.backend,
                  device=None if cfg.device == "auto" else cfg.device,
                  dtype=None if cfg.dtype == "auto" else cfg.dtype,
                  mesh_device=None if cfg.mesh_device == "auto" else cfg.mesh_device,
                  center_crop=cfg.center_crop,
                  default_unnorm_key=cfg.unnorm_key or None,
                  speculative=cfg.speculative)
    # Precision overrides (config/mesh/*.yaml) on top of the TT-NN profile (config/ttnn/*.yaml).
    if cfg.precision:
        kwargs["precision"] = dict(cfg.precision)
    return load_policy(cfg.weights_path or None, **kwargs)


class OpenVLANode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, *, policy_loader=None, ros_args: list[str] | None = None,
                 **kwargs):
        """ros_args: the process arguments given to rclpy.init (default sys.argv, as rclpy.init
        uses), read for --params-file to tell `/**` sections from this node's own (unknown names)."""
        super().__init__(node_name, **kwargs)
        # rclpy keeps every override that reached this node (params files, -p, constructor) in
        # _parameter_overrides, merged; which came only from a shared /** section we read ourselves.
        given = list(self._parameter_overrides)
        arg_lists = [kwargs.get("cli_args")]
        if kwargs.get("use_global_arguments", True):
            arg_lists.append(sys.argv if ros_args is None else ros_args)
        wildcard_only = wildcard_only_names(arg_lists, self.get_fully_qualified_name(),
                                            explicit=[p.name for p in kwargs.get("parameter_overrides") or ()])
        self.cfg, warnings = declare_and_read(self, given, wildcard_only)  # raises ParameterError
        for warning in warnings:  # once per name: parameters are read once, here
            self.get_logger().warning(warning)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._policy_loader = policy_loader or default_policy_loader
        self.policy = None
        self.policy_info: dict = {}
        self.load_error = ""
        self.stats = Stats()
        # Speculative decoding: one stream (this node's camera + instruction), one DraftState. Used
        # by the worker only (and by activate / deactivate while no worker runs).
        self._speculative = False  # set at configure: the parameter and a policy that takes drafts
        self._drafts = DraftState(self.cfg.speculative_max_age_s)
        # _out_lock orders everything that decides what reaches the robot: enable/disable,
        # activation, instruction changes and publishing. After disable returns, nothing moves.
        self._out_lock = threading.RLock()
        self._cond = threading.Condition()
        self._pending: Frame | None = None
        self._active = False
        self._enabled = False
        self._instruction: Instruction | None = None
        self._instruction_generation = 0
        self._sequence = 0
        self._last_gripper: tuple[float, float] | None = None  # (after convention, raw)
        self._motion_since_stop = False  # a motion command went out after the last stop
        self._newest_stamp_ns: int | None = None  # stamp of the newest frame received while active
        self._shutting_down = False  # a signal arrived: motion stays off
        self._last_frame_problem: str | None = None
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._closed = False
        self._subs: list = []
        self._pub_action = self._pub_preview = self._pub_twist = self._pub_gripper = None

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(self.cfg.diagnostics_period_s, self._guard(self.publish_diagnostics))
        self._watchdog = self.create_timer(self._watchdog_period_s(self.cfg), self._guard(self._watch_input))
        self._enable_srv = self.create_service(SetBool, "~/enable", self._guard(self._on_enable, self._enable_failed))
        self.get_logger().info(
            f"parameters ok: backend={self.cfg.backend} mesh_device={self.cfg.mesh_device} device={self.cfg.device} "
            f"weights_path={self.cfg.weights_path or '(unset)'} image_transport={self.cfg.image_transport} "
            f"inference_mode={self.cfg.inference_mode}")

    # ------------------------------------------------------------------ helpers
    def _guard(self, fn, fallback=None):
        """Wrap a callback: nothing a message or a bug in one callback does may kill the node.
        fallback(*args, exc) gives the callback's return value after an exception (services must
        answer)."""
        def wrapped(*args):
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - logged and counted, never raised into the executor
                self.stats.inc("callback_errors")
                self.stats.error(f"{fn.__name__}: {type(e).__name__}: {e}")
                self.get_logger().error(f"{fn.__name__} failed: {type(e).__name__}: {e}",
                                        throttle_duration_sec=self.cfg.log_throttle_s)
                return fallback(*args, e) if fallback is not None else None
        wrapped.__name__ = fn.__name__
        return wrapped

    def _warn(self, message: str) -> None:
        self.get_logger().warning(message, throttle_duration_sec=self.cfg.log_throttle_s)

    def lifecycle_state(self) -> str:
        try:
            return str(self._state_machine.current_state[1])
        except Exception:  # noqa: BLE001
            return "unknown"

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def active(self) -> bool:
        return self._active

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _next_sequence(self) -> int:
        seq = self._sequence
        self._sequence = (self._sequence + 1) % (1 << 32)
        return seq

    # ------------------------------------------------------------------ parameters at runtime
    def _on_set_parameters(self, parameters) -> SetParametersResult:
        try:
            values = dict(self.cfg.values)
            for p in parameters:
                if p.name in SPECS:
                    values[p.name] = p.value
            new_cfg = validate(values)
            if new_cfg.unnorm_key != self.cfg.unnorm_key and self.policy is not None:
                problem = self._unnorm_key_problem(new_cfg.unnorm_key, self.policy_info)
                if problem:
                    raise ParameterError([f"unnorm_key: {problem}"])
        except ParameterError as e:
            self.get_logger().warning(f"parameter change refused: {e}")
            return SetParametersResult(successful=False, reason=str(e))
        except Exception as e:  # noqa: BLE001
            return SetParametersResult(successful=False, reason=f"{type(e).__name__}: {e}")
        if new_cfg.action_period_s != self.cfg.action_period_s:
            self._watchdog.timer_period_ns = int(self._watchdog_period_s(new_cfg) * 1e9)
        self.cfg = new_cfg
        return SetParametersResult(successful=True)

    @staticmethod
    def _unnorm_key_problem(unnorm_key: str, policy_info: dict) -> str | None:
        """Why `unnorm_key` does not fit the loaded checkpoint (the codec's rule, one
        implementation), or None. Without the checkpoint's keys (describe() failed) predict()
        still checks it on every frame."""
        from openvla_model import UnnormKeyError
        from openvla_model.action_codec import resolve_unnorm_key

        keys = policy_info.get("unnorm_keys")
        if not keys:
            return None
        try:
            resolve_unnorm_key(keys, unnorm_key or None)
        except UnnormKeyError as e:
            return str(e)
        return None

    @staticmethod
    def _watchdog_period_s(cfg: NodeConfig) -> float:
        return min(WATCHDOG_MAX_PERIOD_S, cfg.action_period_s / 2.0)

    # ------------------------------------------------------------------ lifecycle
    def autostart(self) -> bool:
        """configure + activate when the autostart parameter is set. Returns True when active."""
        if not self.cfg.autostart:
            self.get_logger().info("autostart=false: waiting for lifecycle transitions (configure, activate)")
            return False
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        cfg = self.cfg
        self.get_logger().info(f"configuring: loading {cfg.backend} policy from {cfg.weights_path or '$OPENVLA_WEIGHTS'}")
        self.load_error = ""
        try:
            policy = self._policy_loader(cfg)
        except Exception as e:  # noqa: BLE001 - OpenVLAError carries the clear message; anything else too
            self.load_error = str(e) or type(e).__name__
            self.stats.error(self.load_error)
            self.get_logger().error(f"configure failed: {self.load_error}. The node stays up, unconfigured, "
                                    "reporting ERROR on /diagnostics; fix the parameters and restart (or "
                                    "trigger configure again).")
            return TransitionCallbackReturn.FAILURE
        try:
            info = dict(policy.describe())
        except Exception as e:  # noqa: BLE001
            info = {"describe_error": str(e)}
        problem = self._unnorm_key_problem(cfg.unnorm_key, info)
        if problem:
            policy.close()
            self.load_error = problem
            self.stats.error(problem)
            self.get_logger().error(f"configure failed: {problem}")
            return TransitionCallbackReturn.FAILURE
        self.policy, self.policy_info = policy, info
        self._speculative = self._takes_drafts(cfg, policy)
        self._create_topics()
        if cfg.initial_instruction:
            self._set_instruction_text(cfg.initial_instruction, source="initial_instruction parameter")
        self.get_logger().info(f"configured in {getattr(policy, 'load_time_s', float('nan')):.2f} s: {info}")
        return TransitionCallbackReturn.SUCCESS

    def _takes_drafts(self, cfg: NodeConfig, policy) -> bool:
        """Whether frames get drafts: the `speculative` parameter, a policy loaded with
        speculative=True, and a backend that takes drafts (TT-NN does not yet: plain decoding)."""
        if not cfg.speculative:
            return False
        if not getattr(policy, "speculative", False):
            self.get_logger().info("speculative decoding off: the policy does not take drafts")
            return False
        if getattr(getattr(policy, "backend", None), "supports_draft", True) is False:
            self.get_logger().info(f"speculative decoding off: the {cfg.backend} backend does not take drafts yet")
            return False
        return True

    def _create_topics(self) -> None:
        cfg = self.cfg
        out_qos = QoSProfile(depth=cfg.output_qos_depth, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE, history=HistoryPolicy.KEEP_LAST)
        self._pub_action = self.create_publisher(EndEffectorAction, "action", out_qos)
        self._pub_preview = self.create_publisher(EndEffectorAction, "action_preview", out_qos) \
            if cfg.publish_preview else None
        self._pub_twist = self.create_publisher(TwistStamped, "twist", out_qos) if cfg.publish_twist else None
        self._pub_gripper = self.create_publisher(Float64, "gripper", out_qos) if cfg.publish_gripper else None
        image_qos = QoSProfile(
            depth=cfg.image_qos_depth, history=HistoryPolicy.KEEP_LAST, durability=DurabilityPolicy.VOLATILE,
            reliability=ReliabilityPolicy.BEST_EFFORT if cfg.image_qos_reliability == "best_effort"
            else ReliabilityPolicy.RELIABLE)
        if cfg.image_transport == "compressed":
            self._subs.append(self.create_subscription(
                CompressedImage, "image/compressed", self._guard(self._on_compressed_image), image_qos))
        else:
            self._subs.append(self.create_subscription(Image, "image", self._guard(self._on_image), image_qos))
        instr_qos = QoSProfile(
            depth=cfg.instruction_qos_depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if cfg.instruction_qos_durability == "transient_local"
            else DurabilityPolicy.VOLATILE)
        self._subs.append(self.create_subscription(String, "instruction", self._guard(self._on_instruction),
                                                   instr_qos))

    def _destroy_topics(self) -> None:
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        for name in ("_pub_action", "_pub_preview", "_pub_twist", "_pub_gripper"):
            pub = getattr(self, name)
            if pub is not None:
                self.destroy_publisher(pub)
            setattr(self, name, None)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._out_lock:
            self._active = True
            self._enabled = self.cfg.start_enabled and not self._shutting_down
            self._newest_stamp_ns = None
        self._drafts.reset()  # no worker runs here: a new activation starts without a draft
        self._start_worker()
        if self._enabled:
            self.get_logger().info("active: motion output ENABLED (actions on `action`)")
        else:
            self.get_logger().info("active: motion output DISABLED (dry run: actions on `action_preview` only); "
                                   "call ~/enable with true to publish on `action`")
        return TransitionCallbackReturn.SUCCESS

    def _stop_motion_and_worker(self, reason: str) -> None:
        with self._out_lock:
            self.stop_motion(reason)
            self._active = False
        with self._cond:
            self._pending = None
        self._stop_worker()

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_motion_and_worker("deactivated")
        self._drafts.reset()
        self.get_logger().info("inactive: no inference, nothing published")
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        self._destroy_topics()
        if self.policy is not None:
            try:
                self.policy.close()
                self.get_logger().info("policy closed (device released)")
            except Exception as e:  # noqa: BLE001
                self.get_logger().error(f"policy.close() failed: {e}")
            self.policy = None
        self._speculative = False

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_motion_and_worker("shutting down")
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_motion_and_worker("error")
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Orderly end (SIGINT/SIGTERM, tests): zero-motion if enabled, worker stopped, policy closed."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.lifecycle_state() in ("unconfigured", "inactive", "active"):
                self.trigger_shutdown()
        except Exception as e:  # noqa: BLE001
            self.get_logger().warning(f"lifecycle shutdown failed ({e}); releasing directly")
        self._stop_motion_and_worker("closing")
        self._release()

    def destroy_node(self):
        self.close()
        return super().destroy_node()

    # ------------------------------------------------------------------ inputs (executor thread)
    def _on_image(self, msg: Image) -> None:
        self._hand_over(Frame(msg, False, stamp_to_ns(msg.header.stamp)))

    def _on_compressed_image(self, msg: CompressedImage) -> None:
        self._hand_over(Frame(msg, True, stamp_to_ns(msg.header.stamp)))

    def _hand_over(self, frame: Frame) -> None:
        if not self._active:
            return
        self.stats.inc("frames_received")
        self.stats.last_image_monotonic = time.monotonic()
        self._newest_stamp_ns = frame.stamp_ns
        with self._cond:
            if self._pending is not None:
                self.stats.inc("frames_dropped")
            self._pending = frame
            self._cond.notify()

    def _on_instruction(self, msg: String) -> None:
        self.stats.inc("instructions_received")
        self._set_instruction_text(msg.data, source="instruction topic")

    def _set_instruction_text(self, text, source: str) -> None:
        try:
            cleaned = check_instruction_text(text, self.cfg.max_instruction_chars)
        except SafetyError as e:
            with self._out_lock:
                self._instruction_generation += 1
                self._instruction = None
            self.stats.inc("instructions_rejected")
            self._warn(f"instruction refused ({e}); current instruction cleared: no actions until a valid one arrives")
            return
        with self._out_lock:
            if self._instruction is not None and self._instruction.text == cleaned:
                # Same text again: refresh its age, keep results in flight valid.
                self._instruction = Instruction(cleaned, self._now_ns(), self._instruction_generation)
                return
            self._instruction_generation += 1
            self._instruction = Instruction(cleaned, self._now_ns(), self._instruction_generation)
        self.get_logger().info(f"instruction ({source}): {cleaned[:200]!r}")

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self._out_lock:
            if request.data:
                if self._shutting_down:
                    response.success, response.message = False, "cannot enable motion: shutting down"
                elif not self._active:
                    why = f"policy not loaded: {self.load_error}" if self.load_error else \
                        f"lifecycle state is {self.lifecycle_state()}"
                    response.success, response.message = False, f"cannot enable motion: {why}"
                else:
                    self._enabled = True
                    response.success, response.message = True, "motion enabled"
            else:
                self.stop_motion("disabled via ~/enable", always=True)
                response.success, response.message = True, "motion disabled; zero-motion action published"
        self.get_logger().info(f"~/enable {request.data}: {response.message}")
        return response

    @staticmethod
    def _enable_failed(request: SetBool.Request, response: SetBool.Response, error: Exception) -> SetBool.Response:
        response.success, response.message = False, f"{type(error).__name__}: {error}"
        return response

    # ------------------------------------------------------------------ stopping the robot
    def stop_motion(self, reason: str, *, disable: bool = True, always: bool = False) -> bool:
        """THE safety stop, called from every place that must stop the robot (~/enable false,
        stale input, deactivate / shutdown / error, SIGINT / SIGTERM): one zero-motion action on
        `action` (and `action_preview`) and one zero twist on `twist`, published while active with
        motion enabled (`always`: even when already disabled, as ~/enable false promises).
        `disable` turns motion off. The zero-motion action holds the last commanded gripper (NaN
        if none was ever commanded); its empty normalized / unclipped / tokens mark it as not a
        model output. Safe in a signal handler: it takes only the re-entrant _out_lock (no counter
        locks). Returns whether a stop was published."""
        with self._out_lock:
            publish = self._active and (self._enabled or always) and self._pub_action is not None
            if disable:
                self._enabled = False
            if publish:
                msg = EndEffectorAction()
                msg.header.stamp = self.get_clock().now().to_msg()
                msg.header.frame_id = self.cfg.action_frame
                gripper, raw = self._last_gripper if self._last_gripper else (math.nan, math.nan)
                msg.gripper, msg.gripper_raw = gripper, raw
                msg.unnorm_key = self.cfg.unnorm_key
                msg.sequence = self._next_sequence()
                self._pub_action.publish(msg)
                if self._pub_twist is not None:
                    self._pub_twist.publish(self._twist(msg, self.cfg.action_period_s))
                if self._pub_preview is not None:
                    self._pub_preview.publish(msg)
                self._motion_since_stop = False
        if publish:
            self.get_logger().info(f"zero-motion action published ({reason})")
        return publish

    def stop_for_signal(self, signame: str, *, dying: bool = False) -> None:
        """SIGINT / SIGTERM (from the handler, main thread): stop the robot first, keep motion off
        from now on. `dying` (a second signal): also wait briefly until the stop is acknowledged,
        since the process ends right after."""
        self._shutting_down = True
        self.stop_motion(f"signal {signame}")
        if dying:  # the stop may have gone out microseconds ago, in this handler or the first one
            for pub in (self._pub_action, self._pub_twist):
                if pub is not None:
                    pub.wait_for_all_acked(Duration(seconds=STOP_FLUSH_TIMEOUT_S))

    def _image_stale(self) -> str | None:
        """Why the camera input is stale (the newest frame received is too old, by the same rule
        as every frame), or None. No frame since activation: None (nothing was commanded)."""
        stamp = self._newest_stamp_ns
        return None if stamp is None else image_too_old(stamp, self._now_ns(), self.cfg.max_image_age_s)

    def _input_stale(self) -> str | None:
        """Why the input no longer supports motion, or None: the instruction was cleared (refused)
        or expired (max_instruction_age_s), or the camera input is stale."""
        problem = instruction_stale(self._instruction, self._now_ns(), self.cfg.max_instruction_age_s)
        return problem or self._image_stale()

    def _watch_input(self) -> None:
        """Stale-input watchdog (executor timer, at least twice per action_period_s): when the
        camera stops or its stamps freeze, or the instruction is cleared or expires, while motion
        is enabled, a velocity consumer would keep the last twist; send one stop per stale episode
        (an episode ends with the next command)."""
        with self._out_lock:
            if not (self._active and self._enabled and self._motion_since_stop):
                return
            reason = self._input_stale()
            if not reason or not self.stop_motion(f"stale input: {reason}", disable=False):
                return
        self.stats.inc("stale_input_stops")
        self._warn(f"stale input while motion is enabled: {reason}; zero-motion action and zero twist "
                   "published, acting again on fresh frames")

    # ------------------------------------------------------------------ worker
    def _start_worker(self) -> None:
        self._stop_worker()
        self._worker_stop = threading.Event()
        self._worker = threading.Thread(target=self._worker_loop, args=(self._worker_stop,),
                                        name="openvla_inference", daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        worker = self._worker
        if worker is None:
            return
        self._worker_stop.set()
        with self._cond:
            self._cond.notify_all()
        if worker is not threading.current_thread():
            worker.join(WORKER_JOIN_TIMEOUT_S)
            if worker.is_alive():
                self.get_logger().error("inference worker did not stop in time")
        self._worker = None

    def _worker_loop(self, stop: threading.Event) -> None:
        last_start = -math.inf
        while not stop.is_set():
            with self._cond:
                while self._pending is None and not stop.is_set():
                    self._cond.wait(0.5)
                # fixed_rate: do not start before the period is over; newer frames keep replacing the pending one
                while not stop.is_set():
                    wait = last_start + self.cfg.min_inference_period_s - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                frame, self._pending = self._pending, None
            if frame is None or stop.is_set():
                continue
            last_start = time.monotonic()
            try:
                self._process(frame)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                self.stats.inc("inference_errors")
                self.stats.error(f"{type(e).__name__}: {e}", failure=True)
                self.get_logger().error(f"unexpected error while processing a frame: {type(e).__name__}: {e}",
                                        throttle_duration_sec=self.cfg.log_throttle_s)

    def _process(self, frame: Frame) -> None:
        inference = self._infer(frame)
        if inference is not None:
            self._publish(inference)

    def _infer(self, frame: Frame) -> Inference | None:
        """Checks before inference (instruction, image age), conversion, the model, and the checks
        on its result (valid tokens, finite values, clipping). None: refused (counted, warned)."""
        from openvla_model import InputError

        cfg = self.cfg
        started = time.perf_counter()
        policy = self.policy
        if policy is None or not self._active:
            return None
        with self._out_lock:
            instr = self._instruction
        problem = instruction_stale(instr, self._now_ns(), cfg.max_instruction_age_s)
        if problem:
            self.stats.inc("rejected_no_instruction" if problem == "no instruction" else "rejected_stale_instruction")
            if problem != "no instruction":
                self._warn(f"not acting: {problem}")
            return None
        reason = image_too_old(frame.stamp_ns, self._now_ns(), cfg.max_image_age_s)
        if reason:
            self._reject("rejected_stale_image", f"frame not acted on: {reason}")
            return None
        try:
            rgb = compressed_msg_to_rgb(frame.msg, cfg.max_image_pixels) if frame.compressed \
                else image_msg_to_rgb(frame.msg, cfg.max_image_pixels)
        except ImageConversionError as e:
            self._reject("rejected_bad_image", f"bad image: {e}")
            return None
        self.stats.inc("frames_processed")
        draft = self._draft(instr, cfg)
        t1 = time.perf_counter()
        try:
            if draft is None:
                result = policy.predict(rgb, instr.text, cfg.unnorm_key or None)
            else:  # a bad draft is ignored by the policy, never raised
                result = policy.predict(rgb, instr.text, cfg.unnorm_key or None, draft=draft)
        except InputError as e:
            self._drafts.reset()
            self._reject("rejected_bad_input", f"input refused by the model: {e}")
            return None
        except Exception as e:  # noqa: BLE001 - BackendError and anything else: counted, reported, survived
            self._drafts.reset()
            self.stats.inc("inference_errors")
            self.stats.error(f"inference failed: {type(e).__name__}: {e}", failure=True)
            self.get_logger().error(f"inference failed: {type(e).__name__}: {e}",
                                    throttle_duration_sec=cfg.log_throttle_s)
            return None
        model_ms = float(result.timings_ms.get("total", (time.perf_counter() - t1) * 1e3))
        self._remember_draft(instr, result, draft is not None)
        with self._out_lock:
            seq = self._next_sequence()
        if not result.valid:
            bad = [int(t) for t, o in zip(result.tokens, result.out_of_range) if o]
            self._reject("rejected_invalid_result",
                         f"invalid model output (sequence {seq}): out-of-range tokens {bad}, "
                         f"action {[round(float(v), 5) for v in result.action]}")
            return None
        try:
            safe = make_safe_action(result.action, cfg.limits, cfg.gripper)
        except SafetyError as e:
            self._reject("rejected_invalid_result", f"invalid model output (sequence {seq}): {e}")
            return None
        return Inference(frame, instr, result, safe, seq, model_ms, started)

    def _draft(self, instr: Instruction, cfg: NodeConfig):
        """The draft for this frame (worker thread): the last valid action's tokens when produced
        for this instruction (same generation: not across a change or a refusal) at most
        speculative_max_age_s ago; None otherwise or with speculative decoding off."""
        if not self._speculative:
            return None
        try:
            self._drafts.max_age_s = cfg.speculative_max_age_s  # runtime-changeable
            return self._drafts.draft((instr.generation, instr.text))
        except Exception as e:  # noqa: BLE001 - a draft problem never stops an action: decode plainly
            self._drafts.reset()
            self._warn(f"no draft for this frame: {type(e).__name__}: {e}")
            return None

    def _remember_draft(self, instr: Instruction, result, drafted: bool) -> None:
        """Count the acceptance and keep this result's tokens as the next draft when they are all
        valid action tokens (an invalid result leaves no draft)."""
        if not self._speculative:
            return
        try:
            self.stats.speculation(drafted, int(getattr(result, "accepted", 0) or 0) if drafted else 0)
            if result.valid:
                self._drafts.update((instr.generation, instr.text), result.tokens)
            else:
                self._drafts.reset()
        except Exception as e:  # noqa: BLE001 - bookkeeping never stops an action
            self._drafts.reset()
            self.get_logger().warning(f"speculative decoding bookkeeping failed: {type(e).__name__}: {e}",
                                      throttle_duration_sec=self.cfg.log_throttle_s)

    def _action_msg(self, inf: Inference) -> EndEffectorAction:
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

    def _publish(self, inf: Inference) -> None:
        """Under the output lock: drop the result when deactivated, when the instruction changed
        during inference or when the frame aged past max_image_age_s meanwhile; else publish it on
        `action` / `twist` / `gripper` (motion enabled) and `action_preview`, and count it."""
        cfg = self.cfg
        msg = self._action_msg(inf)
        with self._out_lock:
            if not self._active:
                return
            if self._instruction is None or self._instruction.generation != inf.instruction.generation:
                self._reject("rejected_stale_instruction",
                             "result dropped: the instruction changed or was cleared during inference")
                return
            now_ns = self._now_ns()
            reason = image_too_old(inf.frame.stamp_ns, now_ns, cfg.max_image_age_s)
            if reason:
                self._reject("rejected_stale_image", f"result dropped before publishing: {reason}")
                return
            msg.latency_ms = (now_ns - inf.frame.stamp_ns) * 1e-6
            if self._enabled:
                self._pub_action.publish(msg)
                if self._pub_twist is not None:
                    self._pub_twist.publish(self._twist(msg, cfg.action_period_s))
                if self._pub_gripper is not None:
                    self._pub_gripper.publish(Float64(data=float(inf.safe.gripper)))
                self._last_gripper = (float(inf.safe.gripper), float(inf.safe.gripper_raw))
                self._motion_since_stop = True
                self.stats.inc("actions_published")
                self.stats.published(msg.latency_ms)
            if self._pub_preview is not None:
                self._pub_preview.publish(msg)
                self.stats.inc("actions_previewed")
            if inf.safe.clipped:
                self.stats.inc("actions_clipped")
        self._last_frame_problem = None
        self.stats.success(inf.model_ms, (time.perf_counter() - inf.started) * 1e3 - inf.model_ms)

    def _reject(self, counter: str, message: str) -> None:
        self.stats.inc(counter)
        self._last_frame_problem = message
        self._warn(message)

    @staticmethod
    def _twist(action: EndEffectorAction, period_s: float) -> TwistStamped:
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

    # ------------------------------------------------------------------ diagnostics
    def health(self) -> Health:
        cfg = self.cfg
        with self._out_lock:
            instr = self._instruction
        snap_failures = self.stats.consecutive_failures
        last_img = self.stats.last_image_monotonic
        since_rej = self.stats.snapshot()["last_rejection_age_s"]
        return Health(
            lifecycle_state=self.lifecycle_state(), load_error=self.load_error,
            worker_alive=self._worker is not None and self._worker.is_alive(), enabled=self._enabled,
            consecutive_failures=snap_failures, has_instruction=instr is not None,
            instruction_problem=instruction_stale(instr, self._now_ns(), cfg.max_instruction_age_s),
            seconds_since_image=(time.monotonic() - last_img) if last_img else None,
            last_image_problem=self._last_frame_problem,
            recent_rejection=since_rej is not None and since_rej <= max(cfg.diagnostics_period_s, 1.0),
            max_image_age_s=cfg.max_image_age_s,
            stale_input=self._image_stale() if self._active and self._enabled else None)

    def diagnostic_values(self) -> dict:
        cfg, snap, info = self.cfg, self.stats.snapshot(), self.policy_info
        counts, spec = snap["counts"], snap["speculative"]
        with self._out_lock:
            instr = self._instruction
        values = {
            "lifecycle_state": self.lifecycle_state(),
            "motion_enabled": self._enabled,
            "backend": info.get("backend", cfg.backend),
            "mesh_device": info.get("mesh_device", cfg.mesh_device),
            "device": info.get("device", cfg.device),
            "dtype": info.get("dtype", cfg.dtype),
            "weights_path": info.get("weights_path", cfg.weights_path),
            "model_load_time_s": info.get("load_time_s", float("nan")),
            "unnorm_key": cfg.unnorm_key,
            "instruction": (instr.text[:120] if instr else ""),
            "image_transport": cfg.image_transport,
            "inference_mode": cfg.inference_mode,
            "speculative": self._speculative,
            "speculative_max_age_s": cfg.speculative_max_age_s,
            "speculative_drafted": spec["drafted"],
            "speculative_accepted_total": spec["accepted_total"],
            "speculative_acceptance_rate": spec["acceptance_rate"],
            "speculative_mean_accepted": spec["mean_accepted"],
            "model_ms_p50": percentile(snap["model_ms"], 50),
            "model_ms_p95": percentile(snap["model_ms"], 95),
            "latency_ms_p50": percentile(snap["latency_ms"], 50),
            "latency_ms_p95": percentile(snap["latency_ms"], 95),
            "node_overhead_ms_p50": percentile(snap["overhead_ms"], 50),
            "achieved_rate_hz": self.stats.achieved_rate_hz(),
            **counts,
            "rejected_total": sum(counts[c] for c in REJECTED),
            "consecutive_failures": snap["consecutive_failures"],
            "last_error": snap["last_error"],
        }
        return values

    def publish_diagnostics(self) -> None:
        level, message = assess(self.health())
        values = self.diagnostic_values()
        hw = f"{values['backend']}:{values['device'] if values['backend'] == 'torch' else values['mesh_device']}"
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [build_status(f"{self.get_fully_qualified_name()}: OpenVLA policy", hw, level, message, values)]
        self._diag_pub.publish(arr)


# ---------------------------------------------------------------------- entry point
def main(argv=None) -> int:
    args = sys.argv if argv is None else argv
    # Our own signal handling: the node must publish its zero-motion action and close the device
    # on SIGINT/SIGTERM, which needs the ROS context still alive (rclpy's handlers shut it down).
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    nodes: list[OpenVLANode] = []

    def on_signal(signum, _frame):
        # The robot stops first, in the handler itself (microseconds), whatever follows: a second
        # signal (even 10 ms later) ends the process without the orderly path.
        dying = stop.is_set()
        for node in nodes:
            try:
                node.stop_for_signal(signal.Signals(signum).name, dying=dying)
            except Exception as e:  # noqa: BLE001 - never raise into the code the signal interrupted
                node.get_logger().error(f"stop on signal failed: {type(e).__name__}: {e}")
        if dying:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        node = OpenVLANode(ros_args=args)
        nodes.append(node)
    except ParameterError as e:
        get_logger(NODE_NAME).error("invalid parameters:\n  " + "\n  ".join(e.problems))
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    code = 0
    try:
        node.autostart()
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
        node.get_logger().info("shutting down")
    except Exception as e:  # noqa: BLE001
        node.get_logger().error(f"fatal: {type(e).__name__}: {e}")
        code = 1
    finally:
        node.close()
        executor.remove_node(node)
        node.destroy_node()
        executor.shutdown(timeout_sec=1.0)
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
