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

Streams (`streams`, default one unnamed stream): each camera / robot is a `Stream`
(openvla_ros/stream.py) with its own topics, instruction, enable, safety state, counters, drafts
and diagnostics status. One stream is the same code with a list of one.

Threads: the executor thread only hands work on (store each stream's newest frame, set
instructions, answer services, publish diagnostics, watch for stale input); one worker thread
batches: it takes the newest pending frame of every stream that has one (waiting at most
`max_batch_wait_ms` after the first for the others), prepares each (checks, conversion, draft),
runs ONE policy.predict_batch for all of them and hands each item's outcome back to its stream,
which checks and publishes it. Frames arriving while the worker is busy replace their stream's
pending one (counted as dropped), so there is never a backlog.
Speculative decoding (`speculative`, default true): each stream keeps its own DraftState; its last
valid action's tokens are the draft for its next frame with the same instruction (not after an
instruction change or refusal, deactivate/activate, a failure, or when older than
speculative_max_age_s). Actions are the same as without it.

Topics (relative, so namespaces and remapping work; `<stream>/` in front with named streams):
  in:  image (sensor_msgs/Image) or image/compressed (sensor_msgs/CompressedImage), instruction
  out: action, action_preview (openvla_ros/EndEffectorAction), twist (TwistStamped), gripper (Float64),
       /diagnostics;  services: ~/enable (every stream), ~/<stream>/enable (std_srvs/SetBool).
OpenVLA-OFT checkpoints (chunk mode, chosen by the checkpoint): each stream is a ChunkStream
(openvla_ros/chunk_stream.py): wrist image and robot state in, one pass per frame, the chunk on
`action_chunk`, its steps on `action` / `twist` / `gripper` every action_period_s (docs/oft.md).
See docs/ros_node.md.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections import deque

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.duration import Duration
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.logging import get_logger
from rclpy.signals import SignalHandlerOptions
from rcl_interfaces.msg import SetParametersResult
from std_srvs.srv import SetBool

from .diagnostics import ERROR, FAILURES_FOR_ERROR, OK, Stats, assess, build_status, percentile, stats_values
from .params import NodeConfig, ParameterError, declare_and_read, validate, wildcard_only_names
from .stream import Frame, Prepared, Stream, predict_items, stamp_to_ns  # noqa: F401 (Frame, stamp_to_ns: API)

NODE_NAME = "openvla_node"
WORKER_JOIN_TIMEOUT_S = 60.0  # one inference of the 7B model is well below this
WATCHDOG_MAX_PERIOD_S = 0.05  # stale-input checks at least this often (and twice per action_period_s)
STOP_FLUSH_TIMEOUT_S = 0.3  # a dying process waits at most this long for its stop to be acknowledged


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
        # The node's counters: with one stream they are that stream's; with several, each stream
        # counts in its own Stats and adds to these (totals), and batch-wide failures land here.
        self.stats = Stats()
        self._speculative = False  # set at configure: the parameter and a policy that takes drafts
        # _out_lock orders everything that decides what reaches any robot: enable/disable,
        # activation, instruction changes and publishing. After disable returns, nothing moves.
        self._out_lock = threading.RLock()
        self._cond = threading.Condition()  # guards every stream's pending frame
        self._active = False
        self._shutting_down = False  # a signal arrived: motion stays off
        self._worker: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._closed = False
        self._batches: deque = deque(maxlen=200)  # (items, backend ms) of recent batches
        self._batch_count = 0
        self.single = self.cfg.streams == ("",)
        self.streams = [Stream(self, name, self.cfg.for_stream(name),
                               self.stats if self.single else Stats(parent=self.stats)) for name in self.cfg.streams]

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(self.cfg.diagnostics_period_s, self._guard(self.publish_diagnostics))
        self._watchdog = self.create_timer(self._watchdog_period_s(self.cfg), self._guard(self._watch_input))
        self._enable_srv = self.create_service(SetBool, "~/enable", self._guard(self._on_enable, self._enable_failed))
        self._stream_enable_srvs = [
            self.create_service(SetBool, f"~/{s.name}/enable", self._guard(s.on_enable, self._enable_failed))
            for s in self.streams if s.name]
        self.get_logger().info(
            f"parameters ok: backend={self.cfg.backend} mesh_device={self.cfg.mesh_device} device={self.cfg.device} "
            f"weights_path={self.cfg.weights_path or '(unset)'} image_transport={self.cfg.image_transport} "
            f"inference_mode={self.cfg.inference_mode}"
            + ("" if self.single else f" streams={list(self.cfg.streams)} "
                                      f"max_batch_wait_ms={self.cfg.max_batch_wait_ms:g}"))

    # ------------------------------------------------------------------ helpers
    def _guard(self, fn, fallback=None):
        """Wrap a callback: nothing a message or a bug in one callback does may kill the node.
        fallback(*args, exc) gives the callback's return value after an exception (services must
        answer)."""
        def wrapped(*args):
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - logged and counted, never raised into the executor
                self._callback_failed(fn.__name__, e)
                return fallback(*args, e) if fallback is not None else None
        wrapped.__name__ = fn.__name__
        return wrapped

    def _callback_failed(self, name: str, e: Exception) -> None:
        self.stats.inc("callback_errors")
        self.stats.error(f"{name}: {type(e).__name__}: {e}")
        self.get_logger().error(f"{name} failed: {type(e).__name__}: {e}",
                                throttle_duration_sec=self.cfg.log_throttle_s)

    def lifecycle_state(self) -> str:
        try:
            return str(self._state_machine.current_state[1])
        except Exception:  # noqa: BLE001
            return "unknown"

    @property
    def enabled(self) -> bool:
        """Motion is enabled on at least one stream."""
        return any(s.enabled for s in self.streams)

    @property
    def active(self) -> bool:
        return self._active

    @property
    def _instruction(self):
        """The first stream's instruction (the only one of a single-stream node)."""
        return self.streams[0].instruction

    def stream(self, name: str) -> Stream:
        return next(s for s in self.streams if s.name == name)

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    # ------------------------------------------------------------------ parameters at runtime
    def _on_set_parameters(self, parameters) -> SetParametersResult:
        try:
            values, known = dict(self.cfg.values), self.cfg.known_names
            for p in parameters:
                if p.name in known:
                    values[p.name] = p.value  # None: a per-stream override unset (follows the global value)
            new_cfg = validate(values)
            if self.policy is not None:
                problems = []
                for s in self.streams:
                    key = new_cfg.for_stream(s.name).unnorm_key
                    problem = key != s.cfg.unnorm_key and self._unnorm_key_problem(key, self.policy_info)
                    if problem:
                        problems.append(f"{s.name + '.' if s.name else ''}unnorm_key: {problem}")
                if problems:
                    raise ParameterError(problems)
        except ParameterError as e:
            self.get_logger().warning(f"parameter change refused: {e}")
            return SetParametersResult(successful=False, reason=str(e))
        except Exception as e:  # noqa: BLE001
            return SetParametersResult(successful=False, reason=f"{type(e).__name__}: {e}")
        if self._watchdog_period_s(new_cfg) != self._watchdog_period_s(self.cfg):
            self._watchdog.timer_period_ns = int(self._watchdog_period_s(new_cfg) * 1e9)
        self.cfg = new_cfg
        for s in self.streams:
            s.cfg = new_cfg.for_stream(s.name)
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
        return min(WATCHDOG_MAX_PERIOD_S, min(cfg.for_stream(s).action_period_s for s in cfg.streams) / 2.0)

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
        problems = [f"{s.label}{p}" for s in self.streams
                    for p in [self._unnorm_key_problem(s.cfg.unnorm_key, info)] if p]
        chunk_mode = getattr(policy, "kind", "") == "oft"  # OpenVLA-OFT: action chunks (docs/oft.md)
        if chunk_mode:
            from .chunk_stream import chunk_mode_problem

            problems += [p for p in [chunk_mode_problem(policy, cfg)] if p]
        if problems:
            policy.close()
            self.load_error = "; ".join(dict.fromkeys(problems))
            self.stats.error(self.load_error)
            self.get_logger().error(f"configure failed: {self.load_error}")
            return TransitionCallbackReturn.FAILURE
        self.policy, self.policy_info = policy, info
        self._speculative = self._takes_drafts(cfg, policy)
        if chunk_mode:
            from .chunk_stream import ChunkStream, chunk_num_images

            for s in self.streams:
                ChunkStream.upgrade(s, policy, chunk_num_images(policy, cfg))
        for s in self.streams:
            s.create_topics()
            if s.cfg.initial_instruction:
                self._set_instruction_text(s.cfg.initial_instruction, "initial_instruction parameter", stream=s)
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

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._out_lock:
            self._active = True
            for s in self.streams:
                s.enabled = s.cfg.start_enabled and not self._shutting_down
        with self._cond:
            for s in self.streams:
                s.reset()  # no worker runs here: a new activation starts without a draft
        self._start_worker()
        for s in self.streams:
            if s.enabled:
                s.logger.info("active: motion output ENABLED (actions on `action`)")
            else:
                s.logger.info("active: motion output DISABLED (dry run: actions on `action_preview` only); "
                              f"call ~/{s.name + '/' if s.name else ''}enable with true to publish on `action`")
        return TransitionCallbackReturn.SUCCESS

    def _stop_motion_and_worker(self, reason: str) -> None:
        with self._out_lock:
            self.stop_motion(reason)
            self._active = False
        with self._cond:
            for s in self.streams:
                s.pending = None
        self._stop_worker()

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_motion_and_worker("deactivated")
        for s in self.streams:
            s.reset()
        self.get_logger().info("inactive: no inference, nothing published")
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        for s in self.streams:
            s.destroy_topics()
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
    def _set_instruction_text(self, text, source: str, stream: Stream | None = None) -> None:
        """Set `stream`'s instruction (default: the first stream); see Stream.set_instruction_text."""
        (stream or self.streams[0]).set_instruction_text(text, source)

    def enable_problem(self) -> str | None:
        """Why motion cannot be enabled now (caller holds the output lock), or None."""
        if self._shutting_down:
            return "cannot enable motion: shutting down"
        if not self._active:
            why = f"policy not loaded: {self.load_error}" if self.load_error else \
                f"lifecycle state is {self.lifecycle_state()}"
            return f"cannot enable motion: {why}"
        return None

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        """~/enable: every stream (with one stream, the stream). true enables motion (only when
        active); false publishes each enabled stream's zero-motion action and turns motion off."""
        with self._out_lock:
            if request.data:
                problem = self.enable_problem()
                for s in self.streams:
                    s.enabled = problem is None
                response.success, response.message = problem is None, problem or "motion enabled"
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
        """THE safety stop of the node, called from every place that must stop every robot
        (~/enable false, deactivate / shutdown / error, SIGINT / SIGTERM): Stream.stop_motion for
        each stream (one zero-motion action and one zero twist per stream that is enabled, or
        every stream with `always`). Safe in a signal handler. Returns whether any stop was
        published."""
        with self._out_lock:
            return any([s.stop_motion(reason, disable=disable, always=always) for s in self.streams])

    def stop_for_signal(self, signame: str, *, dying: bool = False) -> None:
        """SIGINT / SIGTERM (from the handler, main thread): stop the robot first, keep motion off
        from now on. `dying` (a second signal): also wait briefly until the stop is acknowledged,
        since the process ends right after."""
        self._shutting_down = True
        self.stop_motion(f"signal {signame}")
        if dying:  # the stop may have gone out microseconds ago, in this handler or the first one
            for s in self.streams:
                for pub in (s.pub_action, s.pub_twist):
                    if pub is not None:
                        pub.wait_for_all_acked(Duration(seconds=STOP_FLUSH_TIMEOUT_S))

    def _watch_input(self) -> None:
        """Stale-input watchdog (executor timer, at least twice per action_period_s): each stream
        checks its own input (Stream.watch_input); one stream's failure never skips another's."""
        for s in self.streams:
            try:
                s.watch_input()
            except Exception as e:  # noqa: BLE001
                self._callback_failed(f"{s.label}watch_input", e)

    # ------------------------------------------------------------------ worker: the batcher
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

    def _take_batch(self, stop: threading.Event, last_start: float) -> list[tuple[Stream, Frame]]:
        """Wait for the next batch (caller holds _cond): at least one stream's pending frame;
        fixed_rate: not before the period is over; then, while some stream has no frame, at most
        until max_batch_wait_ms after the oldest pending frame arrived (a silent stream delays the
        others by that much at most). Newer frames keep replacing a stream's pending one."""
        while not any(s.pending is not None for s in self.streams) and not stop.is_set():
            self._cond.wait(0.5)
        while not stop.is_set():
            wait = last_start + self.cfg.min_inference_period_s - time.monotonic()
            if wait <= 0:
                break
            self._cond.wait(wait)
        while not stop.is_set() and any(s.pending is None for s in self.streams):
            first = min((s.pending_since for s in self.streams if s.pending is not None), default=None)
            if first is None:
                break
            wait = first + self.cfg.max_batch_wait_ms * 1e-3 - time.monotonic()
            if wait <= 0:
                break
            self._cond.wait(wait)
        return [(s, s.take_pending()) for s in self.streams if s.pending is not None]

    def _worker_loop(self, stop: threading.Event) -> None:
        last_start = -math.inf
        while not stop.is_set():
            with self._cond:
                batch = self._take_batch(stop, last_start)
            if not batch or stop.is_set():
                continue
            last_start = time.monotonic()
            try:
                self._process_batch(batch)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                self.stats.inc("inference_errors")
                self.stats.error(f"{type(e).__name__}: {e}", failure=True)
                self.get_logger().error(f"unexpected error while processing a batch: {type(e).__name__}: {e}",
                                        throttle_duration_sec=self.cfg.log_throttle_s)

    def _stream_failed(self, s: Stream, e: Exception) -> None:
        """An unexpected error in one stream's step: counted on that stream; the others go on."""
        s.stats.inc("inference_errors")
        s.stats.error(f"{type(e).__name__}: {e}", failure=True)
        s.logger.error(f"unexpected error while processing a frame: {type(e).__name__}: {e}",
                       throttle_duration_sec=s.cfg.log_throttle_s)

    def _process_batch(self, batch: list[tuple[Stream, Frame]]) -> None:
        """Prepare each stream's frame, run ONE predict_batch for every prepared item, hand each
        item's outcome back to its own stream (checks, then publishing). A stream's refused frame
        or failed item stays that stream's; a failure of the whole batch (the backend) is counted
        by every stream in it."""
        if getattr(self.policy, "kind", "") == "oft":
            return self._process_chunks(batch)
        from openvla_model.policy import BatchItem

        prepared: list[tuple[Stream, Prepared]] = []
        for s, frame in batch:
            try:
                prep = s.prepare(frame)
            except Exception as e:  # noqa: BLE001
                self._stream_failed(s, e)
                continue
            if prep is not None:
                prepared.append((s, prep))
        policy = self.policy
        if not prepared or policy is None:
            return
        items = [BatchItem(p.rgb, p.instruction.text, p.unnorm_key, p.draft) for _, p in prepared]
        t1 = time.perf_counter()
        try:
            outcomes = predict_items(policy, items)
            if len(outcomes) != len(items):
                raise RuntimeError(f"the policy returned {len(outcomes)} results for {len(items)} items")
        except Exception as e:  # noqa: BLE001 - BackendError and anything else: counted, reported, survived
            if not self.single:
                self.stats.error(f"batch of {len(items)} failed: {type(e).__name__}: {e}", failure=True)
            for s, _ in prepared:
                s.fail(e)
            return
        batch_ms = (time.perf_counter() - t1) * 1e3
        self._batches.append((len(items), batch_ms))
        self._batch_count += 1
        if not self.single:
            self.stats.success(batch_ms, 0.0)  # the node's model time is the batch's
        for (s, prep), outcome in zip(prepared, outcomes):
            try:
                inference = s.finish(prep, outcome, batch_ms)
                if inference is not None:
                    s.publish(inference)
            except Exception as e:  # noqa: BLE001
                self._stream_failed(s, e)

    def _process_chunks(self, batch: list[tuple[Stream, Frame]]) -> None:
        """Chunk mode (OpenVLA-OFT): one pass per stream's frame; each ChunkStream prepares
        (instruction, camera, wrist image, robot state), runs, checks and publishes its own."""
        for s, frame in batch:
            try:
                pc = s.prepare(frame)
                policy = self.policy
                if pc is None or policy is None:
                    continue
                t1 = time.perf_counter()
                outcome = s.infer(policy, pc)
                inference = s.finish(pc, outcome, (time.perf_counter() - t1) * 1e3)
                if inference is not None:
                    s.publish(inference)
            except Exception as e:  # noqa: BLE001
                self._stream_failed(s, e)

    # ------------------------------------------------------------------ diagnostics
    def health(self):
        """The first stream's Health (the only one of a single-stream node)."""
        return self.streams[0].health()

    def _node_values(self) -> dict:
        cfg, info = self.cfg, self.policy_info
        return {
            "lifecycle_state": self.lifecycle_state(),
            "motion_enabled": self.enabled,
            "backend": info.get("backend", cfg.backend),
            "mesh_device": info.get("mesh_device", cfg.mesh_device),
            "device": info.get("device", cfg.device),
            "dtype": info.get("dtype", cfg.dtype),
            "weights_path": info.get("weights_path", cfg.weights_path),
            "model_load_time_s": info.get("load_time_s", float("nan")),
            "inference_mode": cfg.inference_mode,
            "speculative": self._speculative,
            "speculative_max_age_s": cfg.speculative_max_age_s,
        }

    def diagnostic_values(self) -> dict:
        """The node's status values: with one stream, that stream's too (counters, instruction);
        with several, their totals and the batcher's figures."""
        if self.single:
            return {**self._node_values(), **self.streams[0].diagnostic_values()}
        values = {**self._node_values(), "streams": ",".join(self.cfg.streams),
                  "max_batch_wait_ms": self.cfg.max_batch_wait_ms}
        batches = list(self._batches)
        sizes = [n for n, _ in batches]
        values.update({"batches": self._batch_count,
                       "batch_size_mean": sum(sizes) / len(sizes) if sizes else float("nan"),
                       "batch_size_max": max(sizes, default=0),
                       **stats_values(self.stats),
                       "batch_ms_p50": percentile([ms for _, ms in batches], 50),
                       "batch_ms_p95": percentile([ms for _, ms in batches], 95)})
        values.pop("node_overhead_ms_p50")  # per frame: in each stream's status
        return values

    def _node_assessment(self, streams: list[tuple[Stream, tuple[int, str]]]) -> tuple[int, str]:
        """Level and message of the node's status with several streams: a node-wide problem
        (policy, lifecycle, worker, whole batches failing), else the worst stream's."""
        h = self.streams[0].health()
        if h.load_error or h.lifecycle_state != "active" or not h.worker_alive:
            return assess(h)
        if self.stats.consecutive_failures >= FAILURES_FOR_ERROR:
            return ERROR, f"inference failing ({self.stats.consecutive_failures} batches in a row)"
        level = max(lvl for _, (lvl, _) in streams)
        if level == OK:
            enabled = sum(s.enabled for s in self.streams)
            return OK, f"running: {len(self.streams)} streams, motion enabled on {enabled}"
        s, (lvl, msg) = next((s, a) for s, a in streams if a[0] == level)
        return level, f"stream {s.name}: {msg}"

    def publish_diagnostics(self) -> None:
        node_values = self._node_values()
        hw = f"{node_values['backend']}:" + \
            f"{node_values['device'] if node_values['backend'] == 'torch' else node_values['mesh_device']}"
        fqn = self.get_fully_qualified_name()
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        if self.single:
            level, message = assess(self.streams[0].health())
            arr.status = [build_status(f"{fqn}: OpenVLA policy", hw, level, message, self.diagnostic_values())]
        else:
            assessed = [(s, assess(s.health())) for s in self.streams]
            level, message = self._node_assessment(assessed)
            arr.status = [build_status(f"{fqn}: OpenVLA policy", hw, level, message, self.diagnostic_values())]
            arr.status += [build_status(f"{fqn}/{s.name}: OpenVLA stream", hw, lvl, msg,
                                        {"stream": s.name, "lifecycle_state": node_values["lifecycle_state"],
                                         **s.diagnostic_values()})
                           for s, (lvl, msg) in assessed]
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
