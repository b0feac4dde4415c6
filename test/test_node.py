"""openvla_node over real DDS (loopback profile, run-unique domain).

- The node as a separate process (`python -m openvla_ros.node`, tiny model, CPU): actions flow
  with the image stamp, every bad input is counted and never acted on, 200 frames pushed fast
  leave no backlog, ~/enable, SIGTERM/SIGINT shutdown, ttnn unavailable -> up with ERROR,
  invalid parameters -> exit 2 with a clear message.
- The node in this process on an executor thread: compressed images, no / stale instruction,
  clipping and runtime parameters, invalid model results, lifecycle, fixed_rate, params files,
  speculative decoding (which frames get the previous action's tokens as a draft, diagnostics).
- Parameter validation and diagnostics levels as plain functions.
One node process is reused across the checks that can share it (2-core CI machine).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, requires_ros, ros_available

INSTRUCTION = "pick up the red cup"
TOKEN_MIN, TOKEN_MAX = 31744, 31999


# ---------------------------------------------------------------------------------------------
# plain functions: parameters and diagnostics levels
# ---------------------------------------------------------------------------------------------
def test_default_parameters_are_valid_and_safe():
    from openvla_ros.params import SPECS, validate

    cfg = validate({})
    assert cfg.backend == "ttnn" and cfg.mesh_device == "auto"
    assert cfg.start_enabled is False  # motion needs an explicit ~/enable
    assert cfg.max_image_age_s > 0 and cfg.limits.as_array().max() <= 0.25
    assert all(spec.description for spec in SPECS.values())


def test_invalid_parameters_are_all_reported_at_once():
    from openvla_ros.params import ParameterError, validate

    with pytest.raises(ParameterError) as e:
        validate({"backend": "tensorrt", "mesh_device": "TG", "device": "tpu", "image_transport": "theora",
                  "max_image_age_s": 0.0, "control_rate_hz": -1.0, "max_delta_position_m": [0.1, -0.1, 0.1],
                  "gripper_convention": "open_close", "image_qos_depth": 0, "precision.ffn_weight_dtype": "int4",
                  "max_instruction_age_s": "soon"})
    text = str(e.value)
    for name in ("backend", "mesh_device", "device", "image_transport", "max_image_age_s", "control_rate_hz",
                 "max_delta_position_m", "gripper_convention", "image_qos_depth", "precision.ffn_weight_dtype",
                 "max_instruction_age_s"):
        assert name in text, name
    assert "'tensorrt' is not one of: ttnn, torch" in text
    assert len(e.value.problems) == 11


def test_integers_are_accepted_for_float_parameters():
    from openvla_ros.params import validate

    cfg = validate({"max_image_age_s": 2, "max_delta_position_m": [1, 1, 1], "control_rate_hz": 10})
    assert cfg.max_image_age_s == 2.0 and isinstance(cfg.max_image_age_s, float)
    assert cfg.limits.max_delta_position_m == (1.0, 1.0, 1.0)


def test_mesh_parameter_files_select_the_mesh_and_the_spec_precision():
    """config/mesh/<MESH>.yaml selects the mesh; the precision it leads to (the backend profile
    config/ttnn/<MESH>.yaml plus any overrides in the mesh file) is the spec's."""
    import yaml

    from openvla_model.backends.ttnn.model_config import load_profile, overrides_from_node_precision
    from openvla_ros.params import validate

    for mesh in ("N300", "T3K"):
        params = yaml.safe_load((ROOT / "config" / "mesh" / f"{mesh}.yaml").read_text())["/**"]["ros__parameters"]
        assert params["mesh_device"] == mesh
        overrides = params.get("precision") or {}
        cfg = validate({"mesh_device": mesh, **{f"precision.{k}": v for k, v in overrides.items()}})
        p = load_profile(mesh, overrides=overrides_from_node_precision(cfg.precision))
        if mesh == "N300":
            assert [p.dtypes[r] for r in ("wqkv", "wo", "kv_cache", "activations")] == ["bfloat16"] * 4
            assert [p.fidelity[r] for r in ("qkv", "sdpa", "wo")] == ["HiFi4"] * 3
            assert (p.dtypes["ffn"], p.fidelity["ffn"]) == ("bfloat8_b", "HiFi2")
        else:
            assert set(p.dtypes.values()) == {"bfloat16"}
            assert {r: f for r, f in p.fidelity.items() if r != "decode"} == dict.fromkeys(
                ("vision", "projector", "qkv", "sdpa", "wo", "ffn", "lm_head"), "HiFi4")
        # One-row DRAM-sharded decode matmuls run at HiFi2 on both meshes (issue 12, as
        # tt_transformers does: HiFi4 makes them compute-bound on their 12 reader cores);
        # prefill keeps the spec's fidelities above. `fidelity.decode: HiFi4` restores the spec.
        assert p.fidelity["decode"] == "HiFi2"
        assert p.dtypes["lm_head"] == "bfloat16"


def test_default_params_file_is_valid():
    import yaml

    from openvla_ros.params import SPECS, validate

    values = yaml.safe_load((ROOT / "config" / "openvla.yaml").read_text())["/**"]["ros__parameters"]
    assert set(values) <= set(SPECS), set(values) - set(SPECS)
    assert "weights_path" not in values  # must not override $OPENVLA_WEIGHTS
    validate(values)


def test_every_parameter_is_documented():
    from openvla_ros.params import PRECISION_KEYS, SPECS

    doc = (ROOT / "docs" / "ros_node.md").read_text()
    missing = [n for n in SPECS if n not in PRECISION_KEYS and f"`{n}`" not in doc]
    missing += [k for k in PRECISION_KEYS if k.split(".", 1)[1] not in doc]
    assert not missing, f"parameters missing from docs/ros_node.md: {missing}"


def test_diagnostics_levels():
    from openvla_ros.diagnostics import ERROR, OK, WARN, Health, assess

    base = dict(lifecycle_state="active", load_error="", worker_alive=True, enabled=True, consecutive_failures=0,
                has_instruction=True, instruction_problem=None, seconds_since_image=0.1, last_image_problem=None,
                recent_rejection=False, max_image_age_s=1.0)

    def level(**kw):
        return assess(Health(**{**base, **kw}))

    assert level() == (OK, "running")
    assert level(load_error="backend 'ttnn' is not available")[0] == ERROR
    assert level(worker_alive=False)[0] == ERROR
    assert level(consecutive_failures=3)[0] == ERROR
    assert level(lifecycle_state="inactive")[0] == WARN
    assert level(seconds_since_image=None)[0] == WARN
    assert level(seconds_since_image=5.0)[0] == WARN
    assert level(last_image_problem="image is 3 s old")[0] == WARN
    assert level(instruction_problem="instruction is 30 s old")[0] == WARN
    assert level(recent_rejection=True)[0] == WARN
    assert level(instruction_problem="no instruction") == (OK, "idle: waiting for an instruction")
    assert level(enabled=False)[0] == OK and "DISABLED" in level(enabled=False)[1]
    stale = level(stale_input="image is 1.300 s old (max_image_age_s 1)")
    assert stale[0] == WARN and "stale input" in stale[1] and "1.300 s old" in stale[1]


# ---------------------------------------------------------------------------------------------
# ROS helpers
# ---------------------------------------------------------------------------------------------
def wait_until(pred, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


def stamp_key(stamp) -> tuple[int, int]:
    return int(stamp.sec), int(stamp.nanosec)


class Harness:
    """Test-side node for one namespace: publishes images/instructions, records every output."""

    def __init__(self, executor, namespace: str, node_name: str, compressed: bool = False):
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import Float64, String
        from std_srvs.srv import SetBool

        from openvla_ros.msg import EndEffectorAction

        self.namespace, self.node_name = namespace, node_name
        self.diag_name = f"{namespace}/{node_name}: OpenVLA policy"
        self.node = Node(f"harness_{node_name}", namespace=namespace)
        self.lock = threading.Lock()
        self.actions, self.previews, self.twists, self.grippers = [], [], [], []
        self.diag: dict | None = None
        rec = lambda store: (lambda m: self._append(store, m))  # noqa: E731
        out_qos = QoSProfile(depth=100)
        self.node.create_subscription(EndEffectorAction, "action", rec(self.actions), out_qos)
        self.node.create_subscription(EndEffectorAction, "action_preview", rec(self.previews), out_qos)
        self.node.create_subscription(TwistStamped, "twist", rec(self.twists), out_qos)
        self.node.create_subscription(Float64, "gripper", rec(self.grippers), out_qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, out_qos)
        self.image_pub = self.node.create_publisher(CompressedImage if compressed else Image,
                                                    "image/compressed" if compressed else "image",
                                                    qos_profile_sensor_data)
        self.instruction_pub = self.node.create_publisher(String, "instruction", QoSProfile(depth=10))
        self.enable_client = self.node.create_client(SetBool, f"{namespace}/{node_name}/enable")
        self._String, self._SetBool = String, SetBool
        executor.add_node(self.node)
        self.executor = executor

    def _append(self, store, msg):
        with self.lock:
            store.append((time.monotonic(), msg))

    def _on_diag(self, arr):
        from openvla_ros.diagnostics import status_to_dict

        for st in arr.status:
            if st.name == self.diag_name:
                with self.lock:
                    self.diag = status_to_dict(st)

    def close(self):
        self.executor.remove_node(self.node)
        self.node.destroy_node()

    # -- inputs
    def now(self):
        return self.node.get_clock().now().to_msg()

    def wait_connected(self, timeout=20.0):
        ok = wait_until(lambda: self.image_pub.get_subscription_count() > 0
                        and self.instruction_pub.get_subscription_count() > 0, timeout)
        assert ok, f"node in {self.namespace} never subscribed to image/instruction"

    def send_instruction(self, text: str):
        self.instruction_pub.publish(self._String(data=text))

    def send_image(self, msg, stamp=None):
        msg.header.stamp = stamp if stamp is not None else self.now()
        self.image_pub.publish(msg)
        return stamp_key(msg.header.stamp)

    def set_enabled(self, value: bool, timeout=10.0):
        assert self.enable_client.wait_for_service(timeout_sec=timeout), "~/enable service not available"
        fut = self.enable_client.call_async(self._SetBool.Request(data=value))
        assert wait_until(fut.done, timeout), "~/enable call timed out"
        return fut.result()

    # -- outputs
    def action_stamps(self, store=None):
        with self.lock:
            return {stamp_key(m.header.stamp) for _, m in (store if store is not None else self.actions)}

    def action_for(self, key, timeout=10.0, store=None):
        store = self.actions if store is None else store

        def find():
            with self.lock:
                return next((m for _, m in store if stamp_key(m.header.stamp) == key), None)
        return wait_until(find, timeout)

    def counts(self) -> dict:
        with self.lock:
            d = self.diag
        return {k: int(v) for k, v in d["values"].items() if v.isdigit()} if d else {}

    def wait_diag(self, pred, timeout=15.0):
        def check():
            with self.lock:
                d = self.diag
            return d if d is not None and pred(d) else None
        return wait_until(check, timeout)

    def wait_count(self, name: str, above: int, timeout=10.0) -> int:
        ok = wait_until(lambda: self.counts().get(name, -1) > above, timeout)
        assert ok, f"diagnostics counter {name} stayed at {self.counts().get(name)} (expected > {above})"
        return self.counts()[name]


@pytest.fixture(scope="module")
def ros():
    """rclpy context + one executor spinning on a background thread for this module."""
    available, reason = ros_available()
    if not available:
        pytest.skip(reason)
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    rclpy.init()
    executor = SingleThreadedExecutor()
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    yield executor
    executor.shutdown(timeout_sec=2.0)
    rclpy.try_shutdown()
    thread.join(5)


def small_frame(seed: int, encoding="rgb8", h=96, w=128):
    from openvla_model.synthetic import synthetic_rgb

    from openvla_ros.image_conversion import rgb_to_image_msg

    rgb = synthetic_rgb(seed=seed, height=h, width=w)
    return rgb, rgb_to_image_msg(rgb, encoding, frame_id="camera")


def node_cmd(namespace: str, name: str, *params: str) -> list[str]:
    cmd = [sys.executable, "-m", "openvla_ros.node", "--ros-args", "-r", f"__ns:={namespace}", "-r", f"__node:={name}"]
    for p in params:
        cmd += ["-p", p]
    return cmd


class NodeProcess:
    def __init__(self, cmd, log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


# ---------------------------------------------------------------------------------------------
# the node as a separate process
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_node(ros, ns, name, params, log_dir, *, compressed=False, up_timeout=60, clean_stop=False):
    """The node as a process with a harness on its topics, active and connected; on exit the
    harness closes and the node stops (SIGINT with exit code 0 asserted when clean_stop, else
    SIGKILL)."""
    node = NodeProcess(node_cmd(ns, name, *params), log_dir / "node.log")
    harness = Harness(ros, ns, name, compressed=compressed)
    try:
        up = harness.wait_diag(lambda d: d["values"].get("lifecycle_state") == "active", timeout=up_timeout)
        assert up, f"node process did not become active:\n{node.output()[-3000:]}"
        harness.wait_connected()
        yield node, harness
    finally:
        harness.close()
        if node.proc.poll() is None:
            if clean_stop:
                assert node.stop(signal.SIGINT) == 0, node.output()[-3000:]
            else:
                node.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def proc_node(ros, tiny_weights, tmp_path_factory):
    with running_node(ros, "/proc", "openvla_proc",
                      ["backend:=torch", "device:=cpu", f"weights_path:={tiny_weights}", "unnorm_key:=bridge_orig",
                       "start_enabled:=true", "publish_twist:=true", "publish_gripper:=true",
                       "diagnostics_period_s:=0.1", "max_image_age_s:=3.0", "log_throttle_s:=0.2",
                       "action_frame:=tool0", "action_period_s:=0.5"],
                      tmp_path_factory.mktemp("proc")) as running:
        yield running


def _ensure_instruction(harness, text=INSTRUCTION):
    harness.send_instruction(text)
    assert harness.wait_diag(lambda d: d["values"].get("instruction") == text, timeout=10), \
        "instruction never reached the node"


@requires_ros
def test_process_actions_carry_the_image_stamp_and_every_field(proc_node, tiny_policy, tiny_weights):
    node, h = proc_node
    _ensure_instruction(h)
    sent = []
    for seed in (11, 12):
        rgb, msg = small_frame(seed)
        sent.append((rgb, h.send_image(msg)))
        assert h.action_for(sent[-1][1], timeout=10) is not None, f"no action for frame seed {seed}"
    for rgb, key in sent:
        a = h.action_for(key)
        assert stamp_key(a.header.stamp) == key and a.header.frame_id == "tool0"
        ref = tiny_policy.predict(rgb, INSTRUCTION, "bridge_orig")  # the ROS-free pipeline, same frame
        assert list(a.tokens) == [int(t) for t in ref.tokens]
        assert all(TOKEN_MIN <= t <= TOKEN_MAX for t in a.tokens)
        np.testing.assert_allclose(a.unclipped, ref.action, atol=1e-5)
        np.testing.assert_allclose(a.normalized, ref.normalized, atol=1e-6)
        lim = np.array([0.05, 0.05, 0.05, 0.25, 0.25, 0.25])
        expected = np.clip(np.asarray(a.unclipped[:6], np.float64), -lim, lim)
        got = [a.delta_position.x, a.delta_position.y, a.delta_position.z,
               a.delta_orientation.x, a.delta_orientation.y, a.delta_orientation.z]
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert a.clipped == bool(np.any(np.abs(np.asarray(a.unclipped[:6])) > lim))
        assert a.gripper_raw == pytest.approx(a.unclipped[6]) and a.gripper == pytest.approx(
            min(1.0, max(0.0, a.unclipped[6])))  # default `unit` convention
        assert (a.instruction, a.unnorm_key) == (INSTRUCTION, "bridge_orig")
        assert a.inference_ms > 0 and a.latency_ms >= a.inference_ms - 1.0
        with h.lock:
            twists = [m for _, m in h.twists if stamp_key(m.header.stamp) == key]
            preview = [m for _, m in h.previews if stamp_key(m.header.stamp) == key]
        assert len(twists) == 1 and len(preview) == 1 and preview[0].sequence == a.sequence
        assert twists[0].twist.linear.x == pytest.approx(a.delta_position.x / 0.5)
        assert twists[0].twist.angular.z == pytest.approx(a.delta_orientation.z / 0.5)
    with h.lock:
        grippers = [m.data for _, m in h.grippers]
    assert h.action_for(sent[-1][1]).gripper == pytest.approx(grippers[-1])
    d = h.diag["values"]
    assert d["backend"] == "torch" and d["device"] == "cpu" and d["weights_path"] == str(tiny_weights)
    assert float(d["model_ms_p50"]) > 0 and float(d["model_load_time_s"]) > 0


@requires_ros
def test_process_bad_inputs_are_counted_and_never_acted_on(proc_node):
    from builtin_interfaces.msg import Time
    from sensor_msgs.msg import Image

    node, h = proc_node
    _ensure_instruction(h)

    def raw(encoding, width, height, step, size):
        m = Image()
        m.encoding, m.width, m.height, m.step, m.data = encoding, width, height, step, b"\x07" * size
        return m

    bad_images = {
        "16UC1": raw("16UC1", 8, 8, 16, 128),
        "32FC1": raw("32FC1", 8, 8, 32, 256),
        "zero size": raw("rgb8", 0, 0, 0, 0),
        "step too small": raw("rgb8", 8, 8, 20, 160),
        "truncated": raw("rgb8", 8, 8, 24, 100),
        "huge": raw("rgb8", 200000, 200000, 600000, 64),
    }
    for what, msg in bad_images.items():
        before = h.counts()["rejected_bad_image"]
        key = h.send_image(msg)
        h.wait_count("rejected_bad_image", before)
        assert key not in h.action_stamps() | h.action_stamps(h.previews), what

    _, good = small_frame(21)
    now = h.node.get_clock().now().nanoseconds
    stale_stamps = {"10 s old": now - 10_000_000_000, "zero stamp": 0, "10 s in the future": now + 10_000_000_000}
    for what, ns in stale_stamps.items():
        before = h.counts()["rejected_stale_image"]
        key = h.send_image(good, Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000))
        h.wait_count("rejected_stale_image", before)
        assert key not in h.action_stamps() | h.action_stamps(h.previews), what
    assert h.wait_diag(lambda d: d["level"] == 1 and "not acting" in d["message"], timeout=5)

    for what, text in {"empty": "", "whitespace": "  \n ", "10 kB": "pick up the cup " * 640}.items():
        before = h.counts()["instructions_rejected"]
        h.send_instruction(text)
        h.wait_count("instructions_rejected", before)
        nothing_before = h.counts()["rejected_no_instruction"]
        key = h.send_image(good)  # a perfectly good frame: still no action, the instruction was cleared
        h.wait_count("rejected_no_instruction", nothing_before)
        assert key not in h.action_stamps() | h.action_stamps(h.previews), what

    _ensure_instruction(h)
    key = h.send_image(good)
    assert h.action_for(key, timeout=10) is not None, "node stopped acting after bad inputs"
    assert node.proc.poll() is None
    assert h.counts()["callback_errors"] == 0 and h.counts()["inference_errors"] == 0


@requires_ros
def test_process_200_frames_pushed_fast_leave_no_backlog(proc_node):
    node, h = proc_node
    _ensure_instruction(h)
    time.sleep(0.3)  # let any earlier frame finish
    before = h.counts()
    frames = [small_frame(s)[1] for s in range(4)]
    keys = []
    for i in range(200):
        keys.append(h.send_image(frames[i % 4]))
        time.sleep(0.002)
    last = h.action_for(keys[-1], timeout=10)
    assert last is not None, "the newest frame was never processed"
    n_actions = len(h.action_stamps() & set(keys))
    # diagnostics lag a little behind the actions: wait until they account for every frame received
    assert wait_until(lambda: _settled(h.counts()) and h.counts()["actions_published"]
                      - before["actions_published"] == n_actions, 5), h.counts()
    after = h.counts()
    received = after["frames_received"] - before["frames_received"]
    dropped = after["frames_dropped"] - before["frames_dropped"]
    processed = after["frames_processed"] - before["frames_processed"]
    published = after["actions_published"] - before["actions_published"]
    assert 0 < received <= 200
    assert dropped > received // 2, (received, dropped, processed)  # most frames replaced while busy
    assert processed == received - dropped and published == processed
    time.sleep(1.0)  # no backlog: nothing more arrives after the newest frame's action
    assert len(h.action_stamps() & set(keys)) == n_actions
    assert h.counts()["frames_processed"] == after["frames_processed"]


def _settled(c: dict) -> bool:
    """Every frame the node received was dropped, refused before inference, or inferred on."""
    if not c:
        return False
    before_inference = sum(c[k] for k in ("rejected_stale_image", "rejected_bad_image", "rejected_no_instruction",
                                           "rejected_stale_instruction"))
    return c["frames_received"] == c["frames_dropped"] + before_inference + c["frames_processed"]


@requires_ros
def test_process_disable_publishes_one_zero_motion_action_then_nothing_until_enabled(proc_node):
    node, h = proc_node
    _ensure_instruction(h)
    _, frame = small_frame(31)
    key = h.send_image(frame)
    assert h.action_for(key) is not None
    # the action's twist follows it on its own delivery: wait for it before t_disable
    assert wait_until(lambda: _twist_for(h, key), 5), "no twist for the last action before disable"
    t_disable = time.monotonic()
    resp = h.set_enabled(False)
    assert resp.success and "disabled" in resp.message
    keys = []
    for _ in range(8):
        keys.append(h.send_image(frame))
        time.sleep(0.12)
    assert h.action_for(keys[-1], store=h.previews, timeout=10) is not None, "dry run: previews continue"
    with h.lock:
        after = [m for t, m in h.actions if t >= t_disable]
        zero_twists = [m for t, m in h.twists if t >= t_disable]
    assert len(after) == 1, f"expected exactly one (zero-motion) action after disable, got {len(after)}"
    stop = after[0]
    assert (stop.delta_position.x, stop.delta_position.y, stop.delta_position.z) == (0.0, 0.0, 0.0)
    assert (stop.delta_orientation.x, stop.delta_orientation.y, stop.delta_orientation.z) == (0.0, 0.0, 0.0)
    assert len(stop.tokens) == 0 and stop.header.frame_id == "tool0"
    assert len(zero_twists) == 1 and zero_twists[0].twist.linear.x == 0.0
    assert not set(keys) & h.action_stamps()
    assert h.diag["values"]["motion_enabled"] == "False" or h.wait_diag(
        lambda d: d["values"]["motion_enabled"] == "False", 3)

    assert h.set_enabled(True).success
    key = h.send_image(frame)
    assert h.action_for(key, timeout=10) is not None, "actions did not resume after enable"


@requires_ros
def test_process_sigterm_publishes_zero_motion_and_exits_cleanly(proc_node):
    node, h = proc_node
    t = time.monotonic()
    code = node.stop(signal.SIGTERM)
    out = node.output()
    assert code == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "zero-motion action published (signal SIGTERM)" in out and "policy closed" in out
    stops = wait_until(lambda: [m for ts, m in list(h.actions) if ts >= t and len(m.tokens) == 0], 3)
    assert stops, "no zero-motion action on shutdown"


@requires_ros
def test_ttnn_backend_unavailable_keeps_node_up_with_error_and_sigint_is_clean(ros, tiny_weights, tmp_path):
    node = NodeProcess(node_cmd("/tt", "openvla_tt", "backend:=ttnn", "mesh_device:=N300",
                                f"weights_path:={tiny_weights}", "unnorm_key:=bridge_orig",
                                "diagnostics_period_s:=0.1"), tmp_path / "tt.log")
    h = Harness(ros, "/tt", "openvla_tt")
    try:
        d = h.wait_diag(lambda d: d["level"] == 2, timeout=60)
        assert d, f"no ERROR diagnostics:\n{node.output()[-3000:]}"
        assert "ttnn" in d["message"] and d["values"]["lifecycle_state"] == "unconfigured"
        assert d["values"]["backend"] == "ttnn" and d["values"]["mesh_device"] == "N300"
        resp = h.set_enabled(True)
        assert not resp.success and "policy not loaded" in resp.message
        assert node.proc.poll() is None, "node exited instead of staying up"
    finally:
        h.close()
        code = node.stop(signal.SIGINT)
    out = node.output()
    assert code == 0 and "Traceback" not in out, out[-3000:]
    assert "configure failed" in out


@requires_ros
@pytest.mark.parametrize("params,expected", [
    (["backend:=tensorrt", "max_delta_position_m:=[0.1, -1.0, 0.1]", "gripper_convention:=sideways",
      "inference_mode:=sometimes"],
     ["backend: 'tensorrt' is not one of: ttnn, torch", "max_delta_position_m", "gripper_convention", "inference_mode"]),
    (["image_qos_depth:=deep", "max_image_age_s:=old"],
     ["image_qos_depth: wrong type, expected an integer", "max_image_age_s: expected a number"]),
])
def test_invalid_parameters_exit_2_with_a_clear_message(tmp_path, params, expected):
    node = NodeProcess(node_cmd("/bad", "openvla_bad", *params), tmp_path / "bad.log")
    code = node.proc.wait(30)
    out = node.output()
    node.log.close()
    assert code == 2, out
    assert "invalid parameters" in out and "Traceback" not in out, out
    for text in expected:
        assert text in out, out


# ---------------------------------------------------------------------------------------------
# the node in this process
# ---------------------------------------------------------------------------------------------
class ScriptedPolicy:
    """The real tiny policy, with results corrupted on demand to exercise the safety paths."""

    def __init__(self, policy):
        self.policy, self.mode, self.closed = policy, "ok", False

    def describe(self):
        return self.policy.describe()

    @property
    def load_time_s(self):
        return self.policy.load_time_s

    def predict(self, rgb, instruction, unnorm_key=None, **draft):
        from openvla_model import BackendError, InputError

        if self.mode == "input_error":
            raise InputError("instruction too long for the model")
        if self.mode == "backend_error":
            raise BackendError("device lost")
        r = self.policy.predict(rgb, instruction, unnorm_key, **draft)
        if self.mode == "out_of_range":
            tokens = r.tokens.copy()
            tokens[2] = 1234
            return dataclasses.replace(r, tokens=tokens, out_of_range=np.arange(7) == 2)
        if self.mode == "nan":
            action = r.action.copy()
            action[4] = np.nan
            return dataclasses.replace(r, action=action)
        return r

    def close(self):
        self.closed = True  # the session-wide tiny policy stays open for other tests


def make_node(namespace, tiny_weights, loader=None, **params):
    from rclpy.parameter import Parameter

    from openvla_ros.node import OpenVLANode

    defaults = dict(backend="torch", device="cpu", weights_path=str(tiny_weights), unnorm_key="bridge_orig",
                    start_enabled=True, diagnostics_period_s=0.1, log_throttle_s=0.2)
    defaults.update(params)
    overrides = [Parameter(k, value=v) for k, v in defaults.items()]
    return OpenVLANode("openvla_in", namespace=namespace, parameter_overrides=overrides, policy_loader=loader)


@pytest.fixture
def inproc(ros, tiny_weights, tiny_policy):
    """In-process node + harness on an executor of this test's own: it is stopped before the
    nodes are destroyed (destroying nodes under a spinning executor can kill its thread and with
    it every later test of the module)."""
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor()
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    made = []

    def factory(namespace, compressed=False, scripted=True, loader=None, **params):
        """loader: a policy loader of the test's own (else the scripted tiny policy, or with
        scripted=False the real loader)."""
        scripted_policy = ScriptedPolicy(tiny_policy) if scripted and loader is None else None
        if scripted_policy is not None:
            loader = lambda cfg: scripted_policy  # noqa: E731
        node = make_node(namespace, tiny_weights, loader, **params)
        executor.add_node(node)
        h = Harness(executor, namespace, "openvla_in", compressed=compressed)
        made.append((node, h))
        return node, h, scripted_policy

    yield factory
    executor.shutdown(timeout_sec=5.0)
    thread.join(5.0)
    for node, h in made:
        h.close()
        node.close()
        node.destroy_node()


@requires_ros
def test_inprocess_compressed_images_instruction_rules_and_clipping(inproc):
    from rclpy.parameter import Parameter

    from openvla_ros.image_conversion import rgb_to_compressed_msg

    node, h, _ = inproc("/inc", compressed=True, image_transport="compressed", max_instruction_age_s=1.5)
    assert node.autostart() and node.lifecycle_state() == "active"
    h.wait_connected()
    from openvla_model.synthetic import synthetic_rgb

    jpeg = rgb_to_compressed_msg(synthetic_rgb(seed=5, height=96, width=128), "jpeg")

    # no instruction -> no action
    key = h.send_image(jpeg)
    assert wait_until(lambda: node.stats.counts["rejected_no_instruction"] >= 1, 5)
    assert key not in h.action_stamps()

    h.send_instruction("  put the spoon   in the bowl ")
    assert wait_until(lambda: node._instruction is not None, 5)
    key = h.send_image(jpeg)
    a = h.action_for(key)
    assert a is not None and a.instruction == "put the spoon in the bowl"

    # corrupt compressed data -> counted, no action
    from sensor_msgs.msg import CompressedImage

    bad = CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0" + b"junk" * 100)
    key_bad = h.send_image(bad)
    assert wait_until(lambda: node.stats.counts["rejected_bad_image"] >= 1, 5)
    assert key_bad not in h.action_stamps()

    # tighter limits at runtime -> clipped actions, counted
    res = node.set_parameters([Parameter("max_delta_position_m", value=[1e-4, 1e-4, 1e-4]),
                               Parameter("max_delta_orientation_rad", value=[1e-4, 1e-4, 1e-4])])
    assert all(r.successful for r in res)
    h.send_instruction("put the spoon in the bowl")
    key = h.send_image(jpeg)
    a = h.action_for(key)
    assert a is not None and a.clipped
    assert max(abs(a.delta_position.x), abs(a.delta_position.y), abs(a.delta_position.z)) <= 1e-4 + 1e-12
    assert max(abs(v) for v in a.unclipped[:3]) > 1e-4  # the model asked for more
    assert node.stats.counts["actions_clipped"] >= 1

    # invalid runtime values and read-only parameters are refused with a reason
    bad_res = node.set_parameters([Parameter("max_image_age_s", value=-1.0)])[0]
    assert not bad_res.successful and "max_image_age_s" in bad_res.reason
    bad_key = node.set_parameters([Parameter("unnorm_key", value="no_such_dataset")])[0]
    assert not bad_key.successful and "bridge_orig" in bad_key.reason
    ro = node.set_parameters([Parameter("backend", value="ttnn")])[0]
    assert not ro.successful
    assert node.cfg.max_image_age_s > 0 and node.cfg.backend == "torch"

    # stale instruction -> no action
    time.sleep(1.6)
    before = node.stats.counts["rejected_stale_instruction"]
    key = h.send_image(jpeg)
    assert wait_until(lambda: node.stats.counts["rejected_stale_instruction"] > before, 5)
    assert key not in h.action_stamps()


@requires_ros
def test_inprocess_invalid_results_and_failures_never_become_actions(inproc):
    node, h, policy = inproc("/inv")
    assert node.autostart()
    h.wait_connected()
    h.send_instruction(INSTRUCTION)
    assert wait_until(lambda: node._instruction is not None, 5)
    _, frame = small_frame(41)

    def send_and_wait(counter):
        before = node.stats.counts[counter]
        key = h.send_image(frame)
        assert wait_until(lambda: node.stats.counts[counter] > before, 10), counter
        return key

    for mode, counter in [("out_of_range", "rejected_invalid_result"), ("nan", "rejected_invalid_result"),
                          ("input_error", "rejected_bad_input")]:
        policy.mode = mode
        key = send_and_wait(counter)
        assert key not in h.action_stamps() | h.action_stamps(h.previews), mode
    assert h.wait_diag(lambda d: d["level"] == 1, timeout=3), "rejections should raise a WARN"

    policy.mode = "backend_error"
    for _ in range(3):
        key = send_and_wait("inference_errors")
        assert key not in h.action_stamps()
    d = h.wait_diag(lambda d: d["level"] == 2, timeout=3)
    assert d and "failing" in d["message"] and "device lost" in d["values"]["last_error"]

    policy.mode = "ok"
    key = h.send_image(frame)
    a = h.action_for(key)
    assert a is not None
    assert h.wait_diag(lambda d: d["level"] == 0, timeout=3)
    # sequence numbers: the two rejected model results (out_of_range, nan) left a gap of two;
    # exceptions produced no result and use no number
    assert a.sequence == 2


@requires_ros
def test_inprocess_lifecycle_transitions(inproc):
    from rclpy.lifecycle import TransitionCallbackReturn

    node, h, policy = inproc("/life", autostart=False, initial_instruction=INSTRUCTION)
    assert node.lifecycle_state() == "unconfigured" and node.policy is None
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.lifecycle_state() == "inactive" and node.policy is policy
    h.wait_connected()
    _, frame = small_frame(51)
    key = h.send_image(frame)
    time.sleep(0.3)
    assert node.stats.counts["frames_received"] == 0 and key not in h.action_stamps()  # inactive: ignored
    assert not h.set_enabled(True).success  # cannot enable while inactive

    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    key = h.send_image(frame)
    assert h.action_for(key) is not None  # initial_instruction parameter acted on

    t = time.monotonic()
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    stop = wait_until(lambda: [m for ts, m in list(h.actions) if ts >= t], 5)
    assert stop and len(stop[0].tokens) == 0 and stop[0].delta_position.x == 0.0
    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert policy.closed and node.policy is None and node.lifecycle_state() == "unconfigured"


@requires_ros
def test_inprocess_start_disabled_is_a_dry_run(inproc):
    node, h, _ = inproc("/dry", start_enabled=False, initial_instruction=INSTRUCTION)
    assert node.autostart() and not node.enabled
    h.wait_connected()
    _, frame = small_frame(61)
    key = h.send_image(frame)
    assert h.action_for(key, store=h.previews) is not None
    assert key not in h.action_stamps() and node.stats.counts["actions_published"] == 0


@requires_ros
def test_inprocess_fixed_rate_mode_limits_inference_and_drops_extra_frames(inproc):
    node, h, _ = inproc("/rate", inference_mode="fixed_rate", control_rate_hz=4.0, initial_instruction=INSTRUCTION)
    assert node.autostart()
    h.wait_connected()
    _, frame = small_frame(71)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        h.send_image(frame)
        time.sleep(0.03)
    time.sleep(0.4)
    # starts are >= 1/4 s apart: at most one per started quarter second since the first frame
    bound = int((time.monotonic() - t0) * 4.0) + 1
    counts = dict(node.stats.counts)
    assert 2 <= counts["frames_processed"] <= bound, (counts, bound)
    assert counts["frames_dropped"] > counts["frames_processed"], counts


@requires_ros
def test_params_files_and_mesh_profile_load_into_the_node(ros, tmp_path):
    from rclpy.parameter import Parameter

    from openvla_ros.node import OpenVLANode

    # a robot-local precision override, as one would uncomment it in config/mesh/N300.yaml
    override = tmp_path / "override.yaml"
    override.write_text("/**:\n  ros__parameters:\n    precision:\n      ffn_weight_dtype: bf16\n")
    node = OpenVLANode("openvla_params", namespace="/pf",
                       cli_args=["--ros-args", "--params-file", str(ROOT / "config" / "openvla.yaml"),
                                 "--params-file", str(ROOT / "config" / "mesh" / "N300.yaml"),
                                 "--params-file", str(override)],
                       parameter_overrides=[Parameter("autostart", value=False)])
    try:
        cfg = node.cfg
        assert cfg.mesh_device == "N300" and cfg.backend == "ttnn" and cfg.unnorm_key == "bridge_orig"
        assert cfg.precision == {"ffn_weight_dtype": "bf16"}  # only what was overridden; the rest: config/ttnn
        assert cfg.start_enabled is False and cfg.autostart is False
        assert node.lifecycle_state() == "unconfigured"
    finally:
        node.destroy_node()


# ---------------------------------------------------------------------------------------------
# unknown parameters (issue 9): refused with the closest known name, warned with
# allow_unknown_parameters or when they come only from a shared /** params-file section
# ---------------------------------------------------------------------------------------------
def test_params_file_sections_are_keyed_like_rcl_and_wildcard_only_names_found(tmp_path):
    from openvla_ros.params import params_file_sections, wildcard_only_names

    f = tmp_path / "p.yaml"
    f.write_text("/**:\n  ros__parameters:\n    shared_a: 1\n    precision:\n      ffn_weigth_dtype: bf16\n"
                 "    both_b: 1\n"
                 "/ns/node:\n  ros__parameters:\n    own_c: 1\n"
                 "ns:\n  node:\n    ros__parameters:\n      nested_d: 1\n      both_b: 2\n"
                 "/other:\n  ros__parameters:\n    other_e: 1\n")
    sections = params_file_sections(f)
    assert sections == {"/**": {"shared_a", "precision.ffn_weigth_dtype", "both_b"},
                        "/ns/node": {"own_c", "nested_d", "both_b"}, "/other": {"other_e"}}
    args = ["prog", "--ros-args", "--params-file", str(f), "-p", "shared_a:=2", "--"]
    # shared_a is also given with -p, both_b also in the node's own section: neither is wildcard-only
    assert wildcard_only_names([args], "/ns/node") == {"precision.ffn_weigth_dtype"}
    assert wildcard_only_names([args], "/ns/node", explicit=["precision.ffn_weigth_dtype"]) == set()
    # another node: everything in /** reaches it only through the wildcard, except what -p gives
    assert wildcard_only_names([args], "/elsewhere") == {"precision.ffn_weigth_dtype", "both_b"}
    # outside --ros-args, --params-file is the program's own argument
    assert wildcard_only_names([["prog", "--params-file", str(f)]], "/ns/node") == set()


def test_unknown_parameters_name_the_closest_known_one():
    from openvla_ros.params import SPECS, unknown_parameters

    given = ["max_delta_positon_m", "gripper_treshold", "max_image_age_s", "use_sim_time"]
    known = set(SPECS) | {"use_sim_time"}
    problems, warnings = unknown_parameters(given, known, wildcard_only={"gripper_treshold"}, allow=False)
    assert problems == ["max_delta_positon_m: unknown parameter (closest known: max_delta_position_m; "
                        "allow_unknown_parameters:=true starts anyway)"]
    assert warnings == ["gripper_treshold: unknown parameter in a /** params-file section, ignored "
                        "(closest known: gripper_threshold)"]
    problems, warnings = unknown_parameters(given, known, wildcard_only=(), allow=True)
    assert problems == [] and len(warnings) == 2
    assert "max_delta_positon_m" in warnings[1] and "closest known: max_delta_position_m" in warnings[1]


@requires_ros
@pytest.mark.parametrize("case", ["cli", "node_section"])
def test_process_unknown_parameters_refuse_to_start(tmp_path, case):
    """A typo in a safety limit must not leave the default in force silently: exit 2, each unknown
    name with the closest known one, before anything is loaded."""
    if case == "cli":
        params = ["max_delta_positon_m:=[0.01, 0.01, 0.01]", "autostart:=false"]
        expected = {"max_delta_positon_m": "max_delta_position_m"}
        extra = []
    else:
        f = tmp_path / "robot.yaml"
        f.write_text("/unk/openvla_unk:\n  ros__parameters:\n    autostart: false\n    gripper_treshold: 0.4\n"
                     "    precision:\n      ffn_weigth_dtype: bf16\n")
        params, extra = [], ["--params-file", str(f)]
        expected = {"gripper_treshold": "gripper_threshold",
                    "precision.ffn_weigth_dtype": "precision.ffn_weight_dtype"}
    node = NodeProcess(node_cmd("/unk", "openvla_unk", *params) + extra, tmp_path / "unk.log")
    try:
        code = node.proc.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if node.proc.poll() is None:
            node.stop(signal.SIGKILL)
    out = node.output()
    node.log.close()
    assert code == 2, f"exit code {code}, expected 2:\n{out[-3000:]}"
    assert "invalid parameters" in out and "Traceback" not in out, out
    for name, closest in expected.items():
        assert f"{name}: unknown parameter (closest known: {closest};" in out, out


@requires_ros
@pytest.mark.parametrize("case", ["allowed", "wildcard_section"])
def test_process_unknown_parameters_warned_once_when_allowed_or_shared(tmp_path, case):
    """allow_unknown_parameters: true, or names that reach the node only through a /** section
    (shared with other nodes): the node starts and warns once per name."""
    if case == "allowed":
        params, extra = ["allow_unknown_parameters:=true", "max_delta_positon_m:=[0.01, 0.01, 0.01]"], []
        name, closest = "max_delta_positon_m", "max_delta_position_m"
    else:
        f = tmp_path / "shared.yaml"
        f.write_text("/**:\n  ros__parameters:\n    gripper_treshold: 0.4\n    max_image_age_s: 2.0\n")
        params, extra = [], ["--params-file", str(f)]
        name, closest = "gripper_treshold", "gripper_threshold"
    node = NodeProcess(node_cmd("/unk", "openvla_unk", "autostart:=false", *params) + extra, tmp_path / "unk.log")
    try:
        started = wait_until(lambda: "parameters ok" in node.output() or node.proc.poll() is not None, 30)
        out = node.output()
        assert started and node.proc.poll() is None, f"node did not start:\n{out[-3000:]}"
    finally:
        code = node.stop(signal.SIGTERM)
    out = node.output()
    assert code == 0 and "Traceback" not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if f"{name}: unknown parameter" in ln]
    assert len(lines) == 1, out[-3000:]
    assert "WARN" in lines[0] and f"closest known: {closest}" in lines[0] and "ignored" in lines[0]


@requires_ros
def test_weights_path_default_is_read_from_the_environment_when_the_node_starts(ros, monkeypatch, tmp_path):
    import openvla_ros.params  # noqa: F401 - imported before the variable is set, as in a long-lived process
    from rclpy.parameter import Parameter

    from openvla_ros.node import OpenVLANode

    monkeypatch.setenv("OPENVLA_WEIGHTS", str(tmp_path / "weights_from_env"))
    node = OpenVLANode("openvla_env", namespace="/env", parameter_overrides=[Parameter("autostart", value=False)])
    try:
        assert node.cfg.weights_path == str(tmp_path / "weights_from_env")
        assert node.get_parameter("weights_path").value == str(tmp_path / "weights_from_env")
    finally:
        node.destroy_node()


# ---------------------------------------------------------------------------------------------
# stale input and signals (issue 9): a separate node process with a short max_image_age_s
# ---------------------------------------------------------------------------------------------
STALE_MAX_AGE_S, STALE_PERIOD_S = 0.6, 0.3


def _ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _is_zero_twist(tw) -> bool:
    t = tw.twist
    return (t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z) == (0.0,) * 6


@pytest.fixture(scope="module")
def stale_node(ros, tiny_weights, tmp_path_factory):
    with running_node(ros, "/stale", "openvla_stale",
                      ["backend:=torch", "device:=cpu", f"weights_path:={tiny_weights}", "unnorm_key:=bridge_orig",
                       "start_enabled:=true", "publish_twist:=true", "diagnostics_period_s:=0.1",
                       f"max_image_age_s:={STALE_MAX_AGE_S}", f"action_period_s:={STALE_PERIOD_S}",
                       "log_throttle_s:=0.2",
                       "max_delta_position_m:=[1.0, 1.0, 1.0]"],  # unclipped: the model's twist is non-zero
                      tmp_path_factory.mktemp("stale")) as (node, harness):
        _ensure_instruction(harness)
        yield node, harness


def _drive_until_moving(h, frame, stamp_fn=None, timeout=10.0):
    """Send frames at ~10 Hz until a motion action (tokens, non-zero twist) comes back; returns
    the stamp key of the frame it answered."""
    deadline, keys = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        keys.append(h.send_image(frame, stamp_fn() if stamp_fn else None))
        time.sleep(0.1)
        answered = h.action_stamps() & set(keys)
        if answered:
            key = max(answered)
            # the twist is published right after the action: wait for it too (its own delivery)
            wait_until(lambda: _twist_moving_for(h, key), 5)
            return key
    raise AssertionError("no action while driving fresh frames")


def _twist_for(h, key) -> bool:
    with h.lock:
        return any(stamp_key(m.header.stamp) == key for _, m in h.twists)


def _twist_moving_for(h, key) -> bool:
    with h.lock:
        return any(stamp_key(m.header.stamp) == key and not _is_zero_twist(m) for _, m in h.twists)


def _stops_since(h, t):
    """(zero-motion actions, zero twists) received since monotonic time t."""
    with h.lock:
        actions = [m for ts, m in h.actions if ts >= t and len(m.tokens) == 0]
        twists = [m for ts, m in h.twists if ts >= t and _is_zero_twist(m)]
    return actions, twists


def _moving_after_the_last_stop(h):
    with h.lock:
        t_stop = max(ts for ts, m in h.twists if _is_zero_twist(m))
        return [m for ts, m in h.twists if ts > t_stop]


@requires_ros
def test_process_stale_input_publishes_one_zero_twist_per_episode(stale_node):
    node, h = stale_node
    _, frame = small_frame(81)
    budget_ns = int((STALE_MAX_AGE_S + STALE_PERIOD_S) * 1e9)

    # 1) the camera stops: one zero-motion action + one zero twist, in time, then nothing more
    _drive_until_moving(h, frame)
    with h.lock:
        assert any(not _is_zero_twist(m) for _, m in h.twists), "the tiny model's twist should move"
    last_ns = _ns(frame.header.stamp)
    t_last = time.monotonic()
    stops = wait_until(lambda: all(_stops_since(h, t_last)), 5)
    assert stops, f"no zero twist / zero-motion action after the camera stopped:\n{node.output()[-2000:]}"
    actions, twists = _stops_since(h, t_last)
    for m in (actions[0], twists[0]):
        late = _ns(m.header.stamp) - last_ns
        assert int(STALE_MAX_AGE_S * 1e9) <= late <= budget_ns, f"stop {late / 1e9:.3f} s after the last frame"
    d = h.wait_diag(lambda d: d["level"] == 1 and "stale input" in d["message"], timeout=3)
    assert d and "old" in d["message"], d
    time.sleep(1.0)
    actions, twists = _stops_since(h, t_last)
    assert (len(actions), len(twists)) == (1, 1), "one stop per stale episode"
    assert not _moving_after_the_last_stop(h), "nothing may move after the stop while no frame arrives"
    assert int(h.counts()["stale_input_stops"]) >= 1

    # 2) fresh frames: acting again; then the stamp freezes: the same, once
    _drive_until_moving(h, frame)
    frozen = h.now()
    t_freeze = time.monotonic()
    while time.monotonic() - t_freeze < STALE_MAX_AGE_S + 1.0:
        h.send_image(frame, frozen)
        time.sleep(0.1)
    actions, twists = _stops_since(h, t_freeze)
    assert (len(actions), len(twists)) == (1, 1), (len(actions), len(twists))
    assert _ns(twists[0].header.stamp) - _ns(frozen) <= budget_ns
    assert not _moving_after_the_last_stop(h), "nothing may move after the stop while the stamp stays frozen"
    assert h.counts()["rejected_stale_image"] > 0

    # 3) fresh frames again: normal actions resume
    key = _drive_until_moving(h, frame)
    assert h.action_for(key) is not None

    # 4) frames stay fresh but the instruction is refused (cleared): no command can follow, so
    #    the last twist must not stand either: one stop, then nothing moves
    stops_before = int(h.counts()["stale_input_stops"])
    t_clear = time.monotonic()
    h.send_instruction("")
    while time.monotonic() - t_clear < STALE_PERIOD_S + 1.0:
        h.send_image(frame)
        time.sleep(0.1)
    actions, twists = _stops_since(h, t_clear)
    assert (len(actions), len(twists)) == (1, 1), (len(actions), len(twists))
    assert not _moving_after_the_last_stop(h), "nothing may move after the instruction was cleared"
    assert wait_until(lambda: int(h.counts()["stale_input_stops"]) > stops_before, 3), \
        "the stop must be counted in stale_input_stops"
    _ensure_instruction(h)
    key = _drive_until_moving(h, frame)
    assert h.action_for(key) is not None


@requires_ros
def test_process_sigterm_then_sigint_10ms_apart_still_stops_the_robot(stale_node):
    """A second signal may hurry the end, but the zero-motion action and zero twist go out first."""
    node, h = stale_node
    _, frame = small_frame(82)
    _drive_until_moving(h, frame)
    t = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    node.proc.send_signal(signal.SIGINT)
    try:
        code = node.proc.wait(20)
    finally:
        node.stop(signal.SIGKILL)  # only if it is still running
    out = node.output()
    assert code in (0, -signal.SIGTERM, -signal.SIGINT), f"exit code {code}:\n{out[-3000:]}"
    stops = wait_until(lambda: all(_stops_since(h, t)), 3)
    assert stops, f"no zero-motion action / zero twist before the process ended (code {code}):\n{out[-3000:]}"
    with h.lock:
        last_twist = h.twists[-1][1]
    assert _is_zero_twist(last_twist), "the last twist a velocity consumer saw must be zero"


# ---------------------------------------------------------------------------------------------
# documented behaviour (issue 10), in process, with a policy that blocks until released
# ---------------------------------------------------------------------------------------------
class BlockingPolicy(ScriptedPolicy):
    """The tiny policy; each predict() waits (in the worker) until the test releases it."""

    def __init__(self, policy):
        super().__init__(policy)
        self.entered, self.release = threading.Event(), threading.Event()

    def predict(self, rgb, instruction, unnorm_key=None):
        self.entered.set()
        assert self.release.wait(20), "the test never released the inference"
        self.release.clear()
        return super().predict(rgb, instruction, unnorm_key)


@requires_ros
def test_inprocess_disable_during_inference_no_motion_follows(inproc, tiny_policy):
    policy = BlockingPolicy(tiny_policy)
    node, h, _ = inproc("/mid", loader=lambda cfg: policy, publish_twist=True, initial_instruction=INSTRUCTION)
    assert node.autostart() and node.enabled
    h.wait_connected()
    _, frame = small_frame(91)
    key = h.send_image(frame)
    assert policy.entered.wait(10), "inference never started"
    t_disable = time.monotonic()
    assert h.set_enabled(False).success  # returns while the model is still busy with the frame
    policy.release.set()
    assert h.action_for(key, store=h.previews, timeout=10) is not None, "the result is still previewed"
    time.sleep(0.3)
    with h.lock:
        after = [m for ts, m in h.actions if ts >= t_disable]
        twists = [m for ts, m in h.twists if ts >= t_disable]
    assert key not in h.action_stamps(), "a result computed before disable reached `action` after it"
    assert len(after) == 1 and len(after[0].tokens) == 0, "only the zero-motion action follows disable"
    assert len(twists) == 1 and _is_zero_twist(twists[0])


@requires_ros
def test_inprocess_results_dropped_when_instruction_changes_or_frame_ages_during_inference(inproc, tiny_policy):
    from rclpy.parameter import Parameter

    policy = BlockingPolicy(tiny_policy)
    node, h, _ = inproc("/drop", loader=lambda cfg: policy, initial_instruction=INSTRUCTION)
    assert node.autostart()
    h.wait_connected()
    _, frame = small_frame(92)

    # the instruction changes while the model works on the old one: the result is dropped
    key = h.send_image(frame)
    assert policy.entered.wait(10)
    policy.entered.clear()
    before = node.stats.counts["rejected_stale_instruction"]
    h.send_instruction("put the spoon in the bowl")
    assert wait_until(lambda: node._instruction.text == "put the spoon in the bowl", 5)
    policy.release.set()
    assert wait_until(lambda: node.stats.counts["rejected_stale_instruction"] > before, 10), \
        "the result computed for the old instruction was not dropped"
    assert key not in h.action_stamps() | h.action_stamps(h.previews)

    # the frame ages past max_image_age_s during inference: dropped by the re-check before publishing
    assert all(r.successful for r in node.set_parameters([Parameter("max_image_age_s", value=0.4)]))
    key = h.send_image(frame)
    assert policy.entered.wait(10)
    policy.entered.clear()
    before = node.stats.counts["rejected_stale_image"]
    time.sleep(0.6)
    policy.release.set()
    assert wait_until(lambda: node.stats.counts["rejected_stale_image"] > before, 10), \
        "the frame that aged during inference was not dropped before publishing"
    assert key not in h.action_stamps() | h.action_stamps(h.previews)

    # and a fresh frame answered in time is published (max_image_age_s back to a bound a loaded
    # machine meets: with 0.4 s a slow inference alone could drop it)
    assert all(r.successful for r in node.set_parameters([Parameter("max_image_age_s", value=5.0)]))
    key = h.send_image(frame)
    assert policy.entered.wait(10)
    policy.release.set()
    assert h.action_for(key) is not None


@requires_ros
def test_inprocess_zero_motion_action_keeps_the_last_gripper_and_has_no_model_fields(inproc):
    node, h, _ = inproc("/grip", initial_instruction=INSTRUCTION)
    assert node.autostart()
    h.wait_connected()

    def disable_and_get_stop():
        t = time.monotonic()
        assert h.set_enabled(False).success
        stops = wait_until(lambda: [m for ts, m in list(h.actions) if ts >= t], 5)
        assert stops and len(stops) == 1
        return stops[0]

    stop = disable_and_get_stop()  # nothing was ever commanded: the gripper is unknown
    assert math.isnan(stop.gripper) and math.isnan(stop.gripper_raw)
    assert (len(stop.normalized), len(stop.unclipped), len(stop.tokens)) == (0, 0, 0)

    assert h.set_enabled(True).success
    _, frame = small_frame(93)
    a = h.action_for(h.send_image(frame))
    assert a is not None and len(a.tokens) == 7
    stop = disable_and_get_stop()
    assert (stop.gripper, stop.gripper_raw) == (a.gripper, a.gripper_raw)
    assert (len(stop.normalized), len(stop.unclipped), len(stop.tokens)) == (0, 0, 0)
    assert (stop.delta_position.x, stop.delta_position.y, stop.delta_position.z,
            stop.delta_orientation.x, stop.delta_orientation.y, stop.delta_orientation.z) == (0.0,) * 6


@requires_ros
def test_inprocess_callback_exceptions_are_counted_and_the_node_survives(inproc):
    node, h, _ = inproc("/cb", initial_instruction=INSTRUCTION)
    assert node.autostart()
    h.wait_connected()

    def boom(*args, **kwargs):
        raise RuntimeError("injected fault")

    # a subscription callback
    node._set_instruction_text = boom
    h.send_instruction("anything")
    assert wait_until(lambda: node.stats.counts["callback_errors"] == 1, 5)
    assert "injected fault" in node.stats.last_error
    del node._set_instruction_text
    # a service callback: it still answers, with the reason
    node.stop_motion = boom
    resp = h.set_enabled(False)
    assert not resp.success and "injected fault" in resp.message
    assert node.stats.counts["callback_errors"] == 2
    del node.stop_motion
    # the node keeps working, and reports the errors
    _, frame = small_frame(94)
    assert h.action_for(h.send_image(frame)) is not None
    assert h.wait_diag(lambda d: d["values"]["callback_errors"] == "2", timeout=5)


# ---------------------------------------------------------------------------------------------
# speculative decoding (issue 13): the previous action's tokens as the next frame's draft
# ---------------------------------------------------------------------------------------------
class RecordingPolicy(ScriptedPolicy):
    """A speculative view of the session's tiny policy (same backend, speculative=True) that
    records the draft of every predict() call and the result it returned."""

    speculative = True

    def __init__(self, tiny_policy):
        from openvla_model import OpenVLAPolicy

        p = tiny_policy
        super().__init__(OpenVLAPolicy(p.config, p.backend, p.tokenizer, p.codec, p.preprocessor,
                                       default_unnorm_key=p.default_unnorm_key, speculative=True))
        self.calls: list[tuple[str, list | None]] = []  # (instruction, draft given as a list, or None)
        self.draft_kwargs = 0  # calls that got a draft keyword at all
        self.results: list = []

    def predict(self, rgb, instruction, unnorm_key=None, **kwargs):
        self.draft_kwargs += "draft" in kwargs
        draft = kwargs.get("draft")
        self.calls.append((instruction, None if draft is None else [int(t) for t in draft]))
        r = super().predict(rgb, instruction, unnorm_key, **kwargs)
        self.results.append(r)
        return r


def _act(h, policy, frame, n_calls):
    """Send `frame`, wait for its action and for the policy's call number n_calls."""
    a = h.action_for(h.send_image(frame), store=h.previews)
    assert a is not None, "no action for the frame"
    assert wait_until(lambda: len(policy.calls) >= n_calls, 5) and len(policy.calls) == n_calls
    return a


@requires_ros
def test_default_loader_passes_the_speculative_parameter(monkeypatch):
    import openvla_model

    from openvla_ros.node import default_policy_loader
    from openvla_ros.params import validate

    seen = []
    monkeypatch.setattr(openvla_model, "load_policy", lambda path, **kw: seen.append(kw["speculative"]))
    default_policy_loader(validate({"backend": "torch"}))
    default_policy_loader(validate({"backend": "torch", "speculative": False}))
    assert seen == [True, False]  # default on


@requires_ros
def test_inprocess_speculative_drafts_follow_the_stream_and_diagnostics_carry_the_rate(inproc, tiny_policy):
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    policy = RecordingPolicy(tiny_policy)
    node, h, _ = inproc("/spec", loader=lambda cfg: policy, initial_instruction=INSTRUCTION,
                        speculative_max_age_s=30.0, max_image_age_s=30.0)
    assert node.autostart()
    h.wait_connected()
    _, frame = small_frame(95)

    # no previous action: no draft; the same frame again: the first action's tokens are the draft,
    # all six verified drafts accepted by the real (tiny) model, same action
    a1 = _act(h, policy, frame, 1)
    assert policy.calls[0] == (INSTRUCTION, None)
    a2 = _act(h, policy, frame, 2)
    assert policy.calls[1] == (INSTRUCTION, list(a1.tokens))
    assert list(a2.tokens) == list(a1.tokens) and policy.results[1].accepted == 6
    d = h.wait_diag(lambda d: d["values"].get("speculative_drafted") == "1", timeout=5)
    assert d, "diagnostics never counted the drafted action"
    v = d["values"]
    assert v["speculative"] == "True" and v["speculative_accepted_total"] == "6"
    assert float(v["speculative_acceptance_rate"]) == 1.0 and float(v["speculative_mean_accepted"]) == 6.0

    # an instruction change drops the draft; the next frame drafts from the new instruction's action
    h.send_instruction("put the spoon in the bowl")
    assert wait_until(lambda: node._instruction.text == "put the spoon in the bowl", 5)
    a3 = _act(h, policy, frame, 3)
    assert policy.calls[2] == ("put the spoon in the bowl", None)
    _act(h, policy, frame, 4)
    assert policy.calls[3][1] == list(a3.tokens)

    # a refused instruction is a reset: the same text again starts without a draft
    h.send_instruction("   ")
    assert wait_until(lambda: node._instruction is None, 5)
    h.send_instruction("put the spoon in the bowl")
    assert wait_until(lambda: node._instruction is not None, 5)
    _act(h, policy, frame, 5)
    assert policy.calls[4][1] is None, "a draft survived a refused instruction"

    # older than speculative_max_age_s (runtime parameter): no draft
    assert all(r.successful for r in node.set_parameters([Parameter("speculative_max_age_s", value=0.2)]))
    time.sleep(0.5)
    _act(h, policy, frame, 6)
    assert policy.calls[5][1] is None, "a draft older than speculative_max_age_s was used"

    # an invalid result (out-of-range token) never becomes a draft
    assert all(r.successful for r in node.set_parameters([Parameter("speculative_max_age_s", value=30.0)]))
    policy.mode = "out_of_range"
    before = node.stats.counts["rejected_invalid_result"]
    h.send_image(frame)
    assert wait_until(lambda: node.stats.counts["rejected_invalid_result"] > before, 10)
    policy.mode = "ok"
    _act(h, policy, frame, 8)
    assert policy.calls[6][1] is not None and policy.calls[7][1] is None, "an invalid result became a draft"

    # deactivate / activate is a reset
    _act(h, policy, frame, 9)
    assert policy.calls[8][1] is not None
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    _act(h, policy, frame, 10)
    assert policy.calls[9][1] is None, "a draft survived deactivate/activate"
    drafted = sum(1 for _, dr in policy.calls if dr is not None)
    assert drafted == 4  # frames 2, 4, 7 (the out-of-range one) and 9
    assert h.wait_diag(lambda d: d["values"].get("speculative_drafted") == str(drafted), timeout=5)


@requires_ros
def test_inprocess_speculative_false_passes_no_draft(inproc, tiny_policy):
    policy = RecordingPolicy(tiny_policy)
    node, h, _ = inproc("/nospec", loader=lambda cfg: policy, initial_instruction=INSTRUCTION, speculative=False,
                        max_image_age_s=30.0)
    assert node.autostart()
    h.wait_connected()
    _, frame = small_frame(96)
    _act(h, policy, frame, 1)
    _act(h, policy, frame, 2)
    assert [dr for _, dr in policy.calls] == [None, None] and policy.draft_kwargs == 0
    d = h.wait_diag(lambda d: d["values"].get("speculative") == "False", timeout=5)
    assert d and d["values"]["speculative_drafted"] == "0" and d["values"]["speculative_acceptance_rate"] == "nan"
