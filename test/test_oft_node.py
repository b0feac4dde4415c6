"""The OpenVLA-OFT side of the ROS layer: the EndEffectorActionChunk message, the robot-state
(proprio) and wrist-image conversions (openvla_ros/oft_inputs.py), and the node in chunk mode.
The chunk executor's own rules are tested with a fake clock in test_chunk_executor.py."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import requires_ros
from test_node import wait_until


# ---------------------------------------------------------------------------------------------
# proprio and wrist image conversion (plain functions)
# ---------------------------------------------------------------------------------------------
def joint_state(names, positions):
    return SimpleNamespace(name=list(names), position=np.asarray(positions, dtype=np.float64))


def test_proprio_from_float64_array_all_values_or_the_chosen_indices():
    from openvla_ros.oft_inputs import ProprioError, proprio_from_float64_array

    msg = SimpleNamespace(data=[0.0, 1.0, 2.0, 3.0, 4.0])
    assert proprio_from_float64_array(msg, (), 5).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert proprio_from_float64_array(msg, [4, 0, 2], 3).tolist() == [4.0, 0.0, 2.0]
    with pytest.raises(ProprioError, match="gives 5 proprio values, the checkpoint takes 8"):
        proprio_from_float64_array(msg, (), 8)
    with pytest.raises(ProprioError, match=r"out of range.*5 values"):
        proprio_from_float64_array(msg, [1, 5], 2)
    with pytest.raises(ProprioError, match=r"non-finite proprio values at \[1\]"):
        proprio_from_float64_array(SimpleNamespace(data=[0.0, math.nan]), (), 2)
    with pytest.raises(ProprioError, match="not numeric"):
        proprio_from_float64_array(SimpleNamespace(data=["a", "b"]), (), 2)


def test_proprio_from_joint_state_by_name_in_the_configured_order():
    from openvla_ros.oft_inputs import ProprioError, proprio_from_joint_state

    msg = joint_state(["b", "a", "c"], [2.0, 1.0, 3.0])
    assert proprio_from_joint_state(msg, ["a", "b", "c"], 3).tolist() == [1.0, 2.0, 3.0]
    assert proprio_from_joint_state(msg, ["c", "a"], 2).tolist() == [3.0, 1.0]
    assert proprio_from_joint_state(msg, [], 3).tolist() == [2.0, 1.0, 3.0]  # message order
    with pytest.raises(ProprioError, match=r"lacks joint\(s\) d .*it has: b, a, c"):
        proprio_from_joint_state(msg, ["a", "d"], 2)
    with pytest.raises(ProprioError, match="3 names but 2 positions"):
        proprio_from_joint_state(joint_state(["a", "b", "c"], [1.0, 2.0]), ["a"], 1)
    with pytest.raises(ProprioError, match="twice"):
        proprio_from_joint_state(joint_state(["a", "a"], [1.0, 2.0]), ["a"], 1)
    with pytest.raises(ProprioError, match="takes 4"):
        proprio_from_joint_state(msg, ["a", "b", "c"], 4)


@requires_ros
def test_proprio_and_wrist_conversions_on_real_messages():
    """rclpy messages (array.array fields) convert like the plain objects above; the wrist camera
    goes through the primary camera's conversion (raw and compressed)."""
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    from openvla_model.synthetic import synthetic_rgb
    from openvla_ros.image_conversion import ImageConversionError, rgb_to_compressed_msg, rgb_to_image_msg
    from openvla_ros.image_conversion import msg_to_rgb as image_to_rgb
    from openvla_ros.oft_inputs import proprio_from_msg

    js = JointState(name=["j0", "j1"], position=[0.5, -0.5])
    assert proprio_from_msg(js, "joint_state", joint_names=["j1", "j0"], expected_dim=2).tolist() == [-0.5, 0.5]
    arr = Float64MultiArray(data=[1.0, 2.0, 3.0])
    assert proprio_from_msg(arr, "float64_array", indices=[2], expected_dim=1).tolist() == [3.0]
    with pytest.raises(ValueError, match="proprio_type"):
        proprio_from_msg(arr, "pose", expected_dim=3)
    rgb = synthetic_rgb(seed=3, height=40, width=56)
    assert np.array_equal(image_to_rgb(rgb_to_image_msg(rgb, "bgr8"), False, 1 << 20), rgb)
    png = rgb_to_compressed_msg(rgb, "png")
    assert np.array_equal(image_to_rgb(png, True, 1 << 20), rgb)
    with pytest.raises(ImageConversionError, match="more than the limit"):
        image_to_rgb(png, True, 100)


# ---------------------------------------------------------------------------------------------
# the message
# ---------------------------------------------------------------------------------------------
@requires_ros
def test_end_effector_action_chunk_serialises_every_field():
    from rclpy.serialization import deserialize_message, serialize_message

    from openvla_ros.msg import EndEffectorActionChunk

    m = EndEffectorActionChunk()
    m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id = 12, 345, "base_link"
    m.action_period_s = 0.05
    m.num_steps, m.action_dim = 8, 7
    actions = np.arange(56, dtype=np.float32) / 100
    m.actions, m.normalized = actions.tolist(), (actions / 2).tolist()
    m.tokens = []
    m.instruction, m.unnorm_key = "put the bowl on the plate", "libero_spatial_no_noops"
    m.num_images, m.used_proprio = 2, True
    m.proprio_stamp.sec, m.proprio_stamp.nanosec = 12, 300
    m.inference_ms, m.latency_ms, m.sequence = 14.5, 30.25, 7
    d = deserialize_message(serialize_message(m), EndEffectorActionChunk)
    assert (d.header.stamp.sec, d.header.stamp.nanosec, d.header.frame_id) == (12, 345, "base_link")
    assert (d.num_steps, d.action_dim, d.num_images, d.used_proprio, d.sequence) == (8, 7, 2, True, 7)
    np.testing.assert_array_equal(np.asarray(d.actions, np.float32).reshape(8, 7), actions.reshape(8, 7))
    np.testing.assert_array_equal(np.asarray(d.normalized, np.float32), actions / 2)
    assert list(d.tokens) == [] and (d.proprio_stamp.sec, d.proprio_stamp.nanosec) == (12, 300)
    assert d.action_period_s == pytest.approx(0.05) and (d.inference_ms, d.latency_ms) == (14.5, 30.25)
    assert (d.instruction, d.unnorm_key) == ("put the bowl on the plate", "libero_spatial_no_noops")


# ---------------------------------------------------------------------------------------------
# the node in chunk mode (in this process, on an executor thread of the test's own)
# ---------------------------------------------------------------------------------------------
KEY = "libero_spatial_no_noops"
INSTRUCTION = "put the bowl on the plate"
T = 8  # the tiny OFT checkpoint: LIBERO-shaped, 8 steps x 7 dims, proprio 8


def ns_of(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def frame_rgb(seed: int):
    from openvla_model.synthetic import synthetic_rgb

    return synthetic_rgb(seed=seed, height=224, width=224)  # 224x224: no resize in the OFT preparation


def proprio_of(i: int) -> list:
    return [0.01 * i, 0.1, 1.0, 3.0, -0.1, 0.05, 0.02, -0.02]


class OFTHarness:
    """Test-side node: publishes image, wrist_image, proprio and instruction; records action,
    action_preview, action_chunk and twist with their receive times."""

    def __init__(self, executor, namespace: str, node_name: str):
        import threading

        from geometry_msgs.msg import TwistStamped
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import Image
        from std_msgs.msg import Float64MultiArray, String
        from std_srvs.srv import SetBool

        from openvla_ros.msg import EndEffectorAction, EndEffectorActionChunk

        self.node = Node(f"harness_{node_name}", namespace=namespace)
        self.lock = threading.Lock()
        self.actions, self.previews, self.chunks, self.twists = [], [], [], []
        q = QoSProfile(depth=200)
        rec = lambda store: (lambda m: self._append(store, m))  # noqa: E731
        self.node.create_subscription(EndEffectorAction, "action", rec(self.actions), q)
        self.node.create_subscription(EndEffectorAction, "action_preview", rec(self.previews), q)
        self.node.create_subscription(EndEffectorActionChunk, "action_chunk", rec(self.chunks), q)
        self.node.create_subscription(TwistStamped, "twist", rec(self.twists), q)
        self.image_pub = self.node.create_publisher(Image, "image", qos_profile_sensor_data)
        self.wrist_pub = self.node.create_publisher(Image, "wrist_image", qos_profile_sensor_data)
        self.proprio_pub = self.node.create_publisher(Float64MultiArray, "proprio", QoSProfile(depth=10))
        self.instruction_pub = self.node.create_publisher(String, "instruction", QoSProfile(depth=10))
        self.enable_client = self.node.create_client(SetBool, f"{namespace}/{node_name}/enable")
        self._String, self._SetBool, self._F64 = String, SetBool, Float64MultiArray
        executor.add_node(self.node)
        self.executor = executor

    def _append(self, store, msg):
        import time

        with self.lock:
            store.append((time.monotonic(), msg))

    def close(self):
        self.executor.remove_node(self.node)
        self.node.destroy_node()

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def wait_connected(self, timeout=20.0, wrist=True):
        pubs = (self.image_pub, self.proprio_pub, self.instruction_pub) + ((self.wrist_pub,) if wrist else ())
        assert wait_until(lambda: all(p.get_subscription_count() > 0 for p in pubs), timeout), "node never subscribed"

    def send(self, seed: int, *, wrist=True, proprio=None, instruction=INSTRUCTION) -> int:
        """Instruction, robot state, wrist image then primary image (same stamp); returns the stamp."""
        from openvla_ros.image_conversion import rgb_to_image_msg

        if instruction is not None:
            self.instruction_pub.publish(self._String(data=instruction))
        if proprio is not False:
            self.proprio_pub.publish(self._F64(data=proprio if proprio is not None else proprio_of(seed)))
        stamp = self.node.get_clock().now().to_msg()
        if wrist:
            self.wrist_pub.publish(rgb_to_image_msg(frame_rgb(1000 + seed), stamp=stamp, frame_id="wrist"))
        import time

        time.sleep(0.05)  # the wrist image and the state first: the primary frame triggers the pass
        self.image_pub.publish(rgb_to_image_msg(frame_rgb(seed), stamp=stamp, frame_id="camera"))
        return ns_of(stamp)

    def set_enabled(self, value: bool, timeout=10.0):
        assert self.enable_client.wait_for_service(timeout_sec=timeout), "~/enable service not available"
        fut = self.enable_client.call_async(self._SetBool.Request(data=value))
        assert wait_until(fut.done, timeout), "~/enable call timed out"
        return fut.result()

    def snapshot(self, store):
        with self.lock:
            return list(store)

    def chunk_for(self, stamp_ns: int, timeout=30.0):
        def find():
            return next((m for _, m in self.snapshot(self.chunks) if ns_of(m.header.stamp) == stamp_ns), None)
        return wait_until(find, timeout)


def is_zero_motion(m) -> bool:
    return (m.delta_position.x, m.delta_position.y, m.delta_position.z, m.delta_orientation.x,
            m.delta_orientation.y, m.delta_orientation.z) == (0.0,) * 6 and len(m.unclipped) == 0


@pytest.fixture(scope="module")
def oft_weights(tmp_path_factory):
    from openvla_model.oft_checkpoint import write_tiny_oft_checkpoint

    return write_tiny_oft_checkpoint(tmp_path_factory.mktemp("tiny_oft_node"), seed=0)


@pytest.fixture(scope="module")
def oft_policy(oft_weights):
    from openvla_model.oft_policy import load_oft_policy

    p = load_oft_policy(oft_weights, device="cpu", dtype="float32")
    yield p
    p.close()


class ScriptedChunkPolicy:
    """The tiny OFT policy's description and shapes; chunks are the real pass ("real") or instant,
    known values ("fast": chunk n has x = n / 100 + k / 1000 at step k, gripper 1), so the
    executor's timing can be checked on a loaded machine. Records every call's inputs."""

    kind = "oft"

    def __init__(self, policy, mode="fast"):
        self.policy, self.mode, self.calls, self.closed = policy, mode, [], False

    @property
    def spec(self):
        return self.policy.spec

    @property
    def uses_proprio(self):
        return self.policy.uses_proprio

    @property
    def load_time_s(self):
        return self.policy.load_time_s

    def describe(self):
        return self.policy.describe()

    def predict_chunk(self, images, instruction, proprio=None, unnorm_key=None):
        from openvla_model.oft_policy import ActionChunk

        self.calls.append((images, instruction, None if proprio is None else np.asarray(proprio)))
        if self.mode == "real":
            return self.policy.predict_chunk(images, instruction, proprio=proprio, unnorm_key=unnorm_key)
        n = len(self.calls)
        a = np.zeros((T, 7), np.float32)
        a[:, 0] = n / 100 + np.arange(T) / 1000
        a[:, 6] = 1.0
        return ActionChunk(actions=a, normalized=a / 2, unnorm_key=KEY, instruction=instruction,
                           timings_ms={"total": 1.0}, num_images=len(images), used_proprio=proprio is not None)

    def close(self):
        self.closed = True


@pytest.fixture
def oft_node(oft_policy):
    """factory(namespace, mode, **params) -> (node, harness, scripted policy); all torn down after."""
    available = pytest.importorskip("rclpy")
    import threading

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from openvla_ros.node import OpenVLANode

    del available
    rclpy.init()
    executor = SingleThreadedExecutor()
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    made = []

    def factory(namespace, mode="fast", **params):
        scripted = ScriptedChunkPolicy(oft_policy, mode)
        defaults = dict(backend="torch", device="cpu", weights_path="/unused", unnorm_key=KEY, start_enabled=True,
                        diagnostics_period_s=0.2, log_throttle_s=0.2, num_images=2, action_period_s=0.1,
                        max_image_age_s=5.0)
        defaults.update(params)
        node = OpenVLANode("openvla_oft", namespace=namespace, policy_loader=lambda cfg: scripted,
                           parameter_overrides=[Parameter(k, value=v) for k, v in defaults.items()])
        executor.add_node(node)
        h = OFTHarness(executor, namespace, "openvla_oft")
        made.append((node, h))
        assert node.autostart() and node.lifecycle_state() == "active"
        h.wait_connected(wrist=node.streams[0].num_images == 2)
        return node, h, scripted

    yield factory
    executor.shutdown(timeout_sec=5.0)
    thread.join(5.0)
    for node, h in made:
        h.close()
        node.close()
        node.destroy_node()
    rclpy.try_shutdown()


def steps_of(store, chunk_stamp_ns: int, period_s: float, T: int = T) -> list:
    """The non-zero actions of `store` that belong to the chunk stamped chunk_stamp_ns: (k, msg),
    k from the step's planned time (image stamp + k periods)."""
    out = []
    for _, m in store:
        if is_zero_motion(m):
            continue
        k = (ns_of(m.header.stamp) - chunk_stamp_ns) / (period_s * 1e9)
        if abs(k - round(k)) < 1e-3 and 0 <= round(k) < T:
            out.append((int(round(k)), m))
    return out


@requires_ros
def test_chunk_mode_real_pass_gets_the_wrist_image_and_the_robot_state(oft_node, oft_policy):
    """The tiny OFT checkpoint's real pass: the chunk on action_chunk equals predict_chunk on the
    primary image, the wrist image and the robot state the test published; its 8 steps go out on
    `action` in order with their planned stamps, then one zero-motion action."""
    node, h, policy = oft_node("/oftreal", mode="real", max_image_age_s=120.0, action_period_s=0.1)
    stamp = h.send(3)
    chunk = h.chunk_for(stamp, timeout=120)
    assert chunk is not None, "no action_chunk"
    want = oft_policy.predict_chunk([frame_rgb(3), frame_rgb(1003)], INSTRUCTION, proprio=proprio_of(3),
                                    unnorm_key=KEY)
    assert (chunk.num_steps, chunk.action_dim, chunk.num_images, chunk.used_proprio) == (T, 7, 2, True)
    np.testing.assert_allclose(np.asarray(chunk.actions).reshape(T, 7), want.actions, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(chunk.normalized).reshape(T, 7), want.normalized, rtol=1e-5, atol=1e-6)
    assert chunk.instruction == INSTRUCTION and chunk.unnorm_key == KEY and list(chunk.tokens) == []
    assert chunk.action_period_s == pytest.approx(0.1) and chunk.header.frame_id == "base_link"
    assert ns_of(chunk.proprio_stamp) > 0 and chunk.latency_ms > 0
    done = wait_until(lambda: any(is_zero_motion(m) for _, m in h.snapshot(h.actions)), 30)
    assert done, "no zero-motion action after the chunk ran out"
    steps = steps_of(h.snapshot(h.actions), stamp, 0.1)
    assert [k for k, _ in steps] == list(range(T))
    for k, m in steps:
        np.testing.assert_allclose(m.unclipped, want.actions[k], rtol=1e-5, atol=1e-6)
        assert m.delta_position.x == pytest.approx(float(np.clip(want.actions[k][0], -0.05, 0.05)), abs=1e-6)
        assert list(m.tokens) == [] and m.instruction == INSTRUCTION
    (images, instruction, proprio), = policy.calls
    assert len(images) == 2 and np.array_equal(images[1], frame_rgb(1003))
    np.testing.assert_allclose(proprio, proprio_of(3))


@requires_ros
def test_chunk_steps_go_out_at_the_period_then_one_stop(oft_node):
    period = 0.1
    node, h, _ = oft_node("/oftper", action_period_s=period, publish_twist=True)
    stamp = h.send(1)
    assert wait_until(lambda: any(is_zero_motion(m) for _, m in h.snapshot(h.actions)), 20), "no stop"
    acts = h.snapshot(h.actions)
    steps = steps_of(acts, stamp, period)
    assert [k for k, _ in steps] == list(range(T))
    assert [round(m.unclipped[0], 6) for _, m in steps] == [round(0.01 + k / 1000, 6) for k in range(T)]
    times = [t for t, m in acts if not is_zero_motion(m)]
    gaps = np.diff(times)
    assert 0.5 * period < float(np.median(gaps)) < 2.5 * period, gaps  # one step per tick, not all at once
    assert sum(is_zero_motion(m) for _, m in acts) == 1 and is_zero_motion(acts[-1][1])
    assert wait_until(lambda: len(h.snapshot(h.twists)) >= T + 1, 5)
    tw = h.snapshot(h.twists)[-1][1].twist
    assert (tw.linear.x, tw.linear.y, tw.linear.z, tw.angular.x, tw.angular.y, tw.angular.z) == (0.0,) * 6
    n = len(h.snapshot(h.actions))
    import time

    time.sleep(0.5)
    assert len(h.snapshot(h.actions)) == n  # nothing after the stop
    values = node.streams[0].diagnostic_values()
    assert values["chunk_mode"] is True and values["chunks_published"] == 1 and values["chunk_steps_executed"] == T


@requires_ros
def test_a_newer_chunk_replaces_the_rest_without_replaying_executed_steps(oft_node):
    """execute_steps 2: chunk B (from an image taken while A ran) takes over after A's second step
    at least, and starts at its step k0 = the steps of A executed after B's image."""
    period = 0.15
    node, h, _ = oft_node("/oftrep", action_period_s=period, execute_steps=2)
    a = h.send(1)
    assert wait_until(lambda: len(steps_of(h.snapshot(h.actions), a, period)) >= 1, 20)
    b = h.send(2)
    assert wait_until(lambda: any(is_zero_motion(m) for _, m in h.snapshot(h.actions)), 20), "no stop"
    acts = [m for _, m in h.snapshot(h.actions) if not is_zero_motion(m)]
    a_steps, b_steps = steps_of(h.snapshot(h.actions), a, period), steps_of(h.snapshot(h.actions), b, period)
    assert len(a_steps) >= 2 and b_steps, (len(a_steps), len(b_steps))
    assert acts[:len(a_steps)] == [m for _, m in a_steps]  # A's steps, then B's: no interleaving
    # when each of A's steps went out: its chunk's stamp + latency_ms (now - chunk stamp at the tick)
    a_ticks = [a + int(round(m.latency_ms * 1e6)) for _, m in a_steps]
    k0 = sum(1 for t in a_ticks if t > b)
    assert [k for k, _ in b_steps] == list(range(k0, T))
    assert [round(m.unclipped[0], 6) for _, m in b_steps] == [round(0.02 + k / 1000, 6) for k in range(k0, T)]


@requires_ros
def test_disable_and_a_stale_camera_stop_execution_mid_chunk(oft_node):
    period = 0.2
    node, h, _ = oft_node("/oftstop", action_period_s=period, max_image_age_s=0.9)
    a = h.send(1)
    assert wait_until(lambda: len(steps_of(h.snapshot(h.actions), a, period)) >= 2, 20)
    assert h.set_enabled(False).success
    assert wait_until(lambda: any(is_zero_motion(m) for _, m in h.snapshot(h.actions)), 5)
    import time

    time.sleep(3 * period)
    acts = h.snapshot(h.actions)
    assert is_zero_motion(acts[-1][1]) and sum(is_zero_motion(m) for _, m in acts) == 1
    assert len(steps_of(acts, a, period)) < T  # stopped mid-chunk
    assert h.set_enabled(True).success
    n_before = len(acts)
    b = h.send(2)  # then the camera stops: the newest frame ages past max_image_age_s mid-chunk
    assert wait_until(lambda: len(steps_of(h.snapshot(h.actions), b, period)) >= 1, 20)
    assert wait_until(lambda: is_zero_motion(h.snapshot(h.actions)[-1][1]), 5), "no stop on the stale camera"
    time.sleep(2 * period)
    acts = h.snapshot(h.actions)[n_before:]
    assert sum(is_zero_motion(m) for _, m in acts) == 1 and is_zero_motion(acts[-1][1])
    b_steps = steps_of(acts, b, period)
    assert 1 <= len(b_steps) < T  # 1.6 s chunk, stopped about 0.9 s after its image
    assert node.streams[0].stats.counts["stale_input_stops"] >= 1


@requires_ros
def test_instruction_change_drops_the_chunk_with_one_stop(oft_node):
    period = 0.2
    node, h, _ = oft_node("/oftinstr", action_period_s=period)
    a = h.send(1)
    assert wait_until(lambda: len(steps_of(h.snapshot(h.actions), a, period)) >= 1, 20)
    h.instruction_pub.publish(h._String(data="open the drawer"))
    assert wait_until(lambda: any(is_zero_motion(m) for _, m in h.snapshot(h.actions)), 5), "no stop"
    import time

    time.sleep(3 * period)
    acts = h.snapshot(h.actions)
    assert is_zero_motion(acts[-1][1]) and len(steps_of(acts, a, period)) < T


@requires_ros
def test_missing_wrist_image_and_malformed_proprio_are_refused_and_the_node_stays_up(oft_node):
    node, h, policy = oft_node("/oftbad")
    s = node.streams[0]
    stamp = h.send(1, wrist=False)  # no wrist image ever received
    assert wait_until(lambda: s.stats.counts["rejected_bad_input"] >= 1, 10)
    assert "no wrist image" in s.last_frame_problem and policy.calls == []
    stamp = h.send(2, proprio=[0.0] * 7)  # 7 values, the checkpoint takes 8
    assert wait_until(lambda: s.stats.counts["rejected_bad_input"] >= 2, 10)
    assert "takes 8" in s.last_frame_problem and policy.calls == []
    assert h.chunk_for(stamp, timeout=0.5) is None and h.snapshot(h.actions) == []
    stamp = h.send(3)  # good inputs: acting again
    assert h.chunk_for(stamp, timeout=20) is not None and len(policy.calls) == 1


@requires_ros
def test_one_image_checkpoint_setting_and_ensembling_parameters(oft_node):
    """num_images 1: no wrist topic needed, one image per pass; temporal ensembling averages the
    chunks in play (the executor's arithmetic is checked in test_chunk_executor.py)."""
    period = 0.15
    node, h, policy = oft_node("/oftone", num_images=1, action_period_s=period, temporal_ensemble_decay=0.5)
    a = h.send(1, wrist=False)
    assert wait_until(lambda: len(steps_of(h.snapshot(h.actions), a, period)) >= 1, 20)
    b = h.send(2, wrist=False)
    assert wait_until(lambda: any(is_zero_motion(m) for _, m in h.snapshot(h.actions)), 20)
    assert [len(images) for images, _, _ in policy.calls] == [1, 1]
    xs = [m.unclipped[0] for _, m in h.snapshot(h.actions) if not is_zero_motion(m)]
    assert any(0.011 < x < 0.019 for x in xs), xs  # a step that averages chunk 1 (0.01x) and chunk 2 (0.02x)


@requires_ros
def test_configure_refuses_chunks_the_node_cannot_execute():
    """Joint-space chunks (ALOHA: 14 dims) and a num_images the checkpoint contradicts fail configure
    with the reason; otherwise the image count is the parameter, else the checkpoint's, else 1."""
    from openvla_ros.chunk_stream import chunk_mode_problem, chunk_num_images

    def policy(dim=7, images=None):
        return SimpleNamespace(spec=SimpleNamespace(action_dim=dim, num_images_in_input=images))

    cfg = lambda n: SimpleNamespace(num_images=n)  # noqa: E731
    assert "14-dim" in chunk_mode_problem(policy(dim=14), cfg(0))
    assert "takes 2 image(s)" in chunk_mode_problem(policy(images=2), cfg(1))
    assert "at most 2" in chunk_mode_problem(policy(images=3), cfg(0))
    assert chunk_mode_problem(policy(images=2), cfg(2)) is None and chunk_mode_problem(policy(), cfg(0)) is None
    assert [chunk_num_images(policy(images=i), cfg(n)) for i, n in ((None, 0), (2, 0), (None, 2), (1, 1))] == \
        [1, 2, 2, 1]
