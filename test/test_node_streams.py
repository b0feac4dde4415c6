"""openvla_node with several streams (issue 14): one policy, one batcher, per-stream everything.

The node runs in this process on an executor thread (real DDS on loopback), with the session's
tiny policy behind a recorder that logs every predict_batch call (items, drafts, time). Checks:
- 3 streams: each stream's actions carry its own instruction, its own frame's stamp, the tokens
  the ROS-free pipeline gives that frame alone, its own unnorm_key and clip limits (per-stream
  overrides); the three frames went through ONE predict_batch; nothing crosses to another topic.
- one stream's malformed images, refused instruction and an item the model refuses inside a
  shared batch are that stream's refusals only: the others keep getting actions.
- ~/<stream>/enable false: that stream's zero-motion action only; ~/enable false: every stream's.
- speculative drafts stay per stream (same instruction text on two streams).
- a batch the backend fails is counted by each of its streams; the node reports ERROR after 3, then recovers.
- max_batch_wait_ms: a silent stream delays the others by at most that, a late one within it joins
  the batch, 0 takes what is pending.
- parameters: stream names, `<stream>.<name>` overrides validated and named, typos refused.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import requires_ros
from test_node import Harness, make_node, ros, small_frame, stamp_key, wait_until  # noqa: F401 (ros: fixture)

STREAMS = ("left", "right", "top")
INSTRUCTIONS = {"left": "pick up the red cup", "right": "put the spoon in the bowl", "top": "open the drawer"}


# ---------------------------------------------------------------------------------------------
# parameters (plain functions)
# ---------------------------------------------------------------------------------------------
def test_streams_parameter_and_per_stream_overrides_are_validated():
    from openvla_ros.params import ParameterError, validate

    cfg = validate({})
    assert cfg.streams == ("",) and cfg.max_batch_wait_ms == 0.0 and cfg.for_stream("") is cfg
    cfg = validate({"streams": ["left", "right"], "right.max_delta_position_m": [0.01, 0.01, 0.01],
                    "left.unnorm_key": "tiny_other_dataset", "left.action_frame": "left_base", "right.unnorm_key": None})
    assert cfg.for_stream("right").limits.max_delta_position_m == (0.01, 0.01, 0.01)
    assert cfg.for_stream("left").limits.max_delta_position_m == (0.05, 0.05, 0.05)  # the global value
    assert (cfg.for_stream("left").unnorm_key, cfg.for_stream("left").action_frame) == ("tiny_other_dataset",
                                                                                        "left_base")
    assert cfg.for_stream("right").unnorm_key == "" and cfg.for_stream("right").action_frame == "base_link"
    for streams, problem in ((["left", "left"], "distinct"), (["precision"], "parameter names"),
                             (["1st"], "ROS name tokens"), (["", "right"], "ROS name tokens"), ([], "at least one"),
                             ("left", "list of strings")):
        with pytest.raises(ParameterError) as e:
            validate({"streams": streams})
        assert e.value.problems[0].startswith("streams:") and problem in e.value.problems[0], e.value.problems
    with pytest.raises(ParameterError) as e:
        validate({"streams": ["left", "right"], "left.max_delta_position_m": [0.1, -1.0, 0.1],
                  "right.gripper_convention": "sideways", "max_image_age_s": -1.0})
    assert len(e.value.problems) == 3, e.value.problems
    assert e.value.problems[0].startswith("max_image_age_s:")
    assert any(p.startswith("left.max_delta_position_m") for p in e.value.problems)
    assert any(p.startswith("right.gripper_convention: 'sideways'") for p in e.value.problems)


@requires_ros
def test_per_stream_parameter_names_are_known_and_typos_refused(ros):
    from rclpy.parameter import Parameter

    from openvla_ros.node import OpenVLANode
    from openvla_ros.params import ParameterError

    def start(**params):
        overrides = [Parameter("autostart", value=False), Parameter("streams", value=["left", "right"])]
        overrides += [Parameter(k, value=v) for k, v in params.items()]
        return OpenVLANode("openvla_sp", namespace="/sp", parameter_overrides=overrides)

    node = start(**{"left.max_delta_position_m": [0.01, 0.01, 0.01], "right.start_enabled": True})
    try:
        assert node.cfg.for_stream("left").limits.max_delta_position_m == (0.01, 0.01, 0.01)
        assert node.cfg.for_stream("right").start_enabled and not node.cfg.for_stream("left").start_enabled
        assert node.get_parameter("right.max_delta_position_m").value is None  # declared, unset: the global value
        # runtime: a stream's override, validated and named; the global change reaches unset streams
        res = node.set_parameters([Parameter("right.max_delta_position_m", value=[0.02, -0.02, 0.02])])[0]
        assert not res.successful and "right.max_delta_position_m" in res.reason
        assert all(r.successful for r in node.set_parameters([
            Parameter("right.max_delta_position_m", value=[0.02, 0.02, 0.02]),
            Parameter("max_delta_orientation_rad", value=[0.1, 0.1, 0.1])]))
        assert node.streams[1].cfg.limits.max_delta_position_m == (0.02, 0.02, 0.02)
        assert node.streams[0].cfg.limits.max_delta_orientation_rad == (0.1, 0.1, 0.1)
        assert node.streams[0].cfg.limits.max_delta_position_m == (0.01, 0.01, 0.01)
    finally:
        node.destroy_node()
    with pytest.raises(ParameterError) as e:
        start(**{"left.max_delta_positon_m": [0.01, 0.01, 0.01], "rigth.max_delta_position_m": [0.01, 0.01, 0.01],
                 "left.backend": "torch"})
    text = str(e.value)
    assert "left.max_delta_positon_m: unknown parameter (closest known: left.max_delta_position_m;" in text, text
    assert "rigth.max_delta_position_m: unknown parameter (closest known: right.max_delta_position_m;" in text, text
    assert "left.backend: unknown parameter" in text, text  # not a per-stream parameter


# ---------------------------------------------------------------------------------------------
# the node in this process
# ---------------------------------------------------------------------------------------------
class StreamHarness(Harness):
    """Harness on one stream's topics (<ns>/<stream>/...), its ~/<stream>/enable and its status."""

    def __init__(self, executor, namespace: str, node_name: str, stream: str):
        from std_srvs.srv import SetBool

        super().__init__(executor, f"{namespace}/{stream}", node_name)
        self.diag_name = f"{namespace}/{node_name}/{stream}: OpenVLA stream"
        # (the harness's own client stays: destroying it under the spinning executor races with it)
        self.enable_client = self.node.create_client(SetBool, f"{namespace}/{node_name}/{stream}/enable")


class BatchRecorder:
    """The session's tiny policy (a speculative view: same backend) recording every predict_batch
    call: (monotonic time at entry, [(instruction, unnorm_key, draft as a list or None)]), and the
    outcomes of those that returned."""

    speculative = True

    def __init__(self, tiny_policy):
        from openvla_model import OpenVLAPolicy

        p = tiny_policy
        self.policy = OpenVLAPolicy(p.config, p.backend, p.tokenizer, p.codec, p.preprocessor,
                                    default_unnorm_key=p.default_unnorm_key, speculative=True)
        self.lock = threading.Lock()
        self.batches: list[tuple[float, list]] = []
        self.outcomes: list[list] = []
        self.closed = False

    def describe(self):
        return self.policy.describe()

    @property
    def load_time_s(self):
        return 0.0

    def predict_batch(self, items):
        t = time.monotonic()
        record = [(it.instruction, it.unnorm_key, None if it.draft is None else [int(x) for x in it.draft])
                  for it in items]
        with self.lock:
            self.batches.append((t, record))
        out = self.policy.predict_batch(items)
        with self.lock:
            self.outcomes.append(out)
        return out

    def calls(self):
        with self.lock:
            return list(self.batches)

    def close(self):
        self.closed = True  # the session's tiny policy stays open


@pytest.fixture
def multi(ros, tiny_weights, tiny_policy):
    """factory(namespace, streams, **params) -> (node, {stream: StreamHarness}, node-wide Harness,
    BatchRecorder), on an executor of this test's own (stopped before the nodes are destroyed)."""
    from rclpy.executors import SingleThreadedExecutor

    executor, stop = SingleThreadedExecutor(), threading.Event()

    def spin():  # stopped, then joined, before the executor shuts down (no handler left to race it)
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.05)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    made = []

    def factory(namespace, streams=STREAMS, **params):
        recorder = BatchRecorder(tiny_policy)
        params = {"max_image_age_s": 30.0, "speculative_max_age_s": 30.0, **params}
        node = make_node(namespace, tiny_weights, lambda cfg: recorder, streams=list(streams), **params)
        executor.add_node(node)
        hs = {s: StreamHarness(executor, namespace, "openvla_in", s) for s in streams}
        whole = Harness(executor, namespace, "openvla_in")
        made.append((node, [*hs.values(), whole]))
        assert node.autostart()
        for h in hs.values():
            h.wait_connected()
        return node, hs, whole, recorder

    yield factory
    stop.set()
    thread.join(10.0)
    executor.shutdown(timeout_sec=10.0)
    for node, harnesses in made:
        for h in harnesses:
            h.close()
        node.close()
        node.destroy_node()


def _instruct(node, hs, texts):
    for s, text in texts.items():
        hs[s].send_instruction(text)
    assert wait_until(lambda: all(node.stream(s).instruction is not None and node.stream(s).instruction.text == t
                                  for s, t in texts.items()), 5), "instructions never reached their streams"


def _motion(a):
    return [a.delta_position.x, a.delta_position.y, a.delta_position.z,
            a.delta_orientation.x, a.delta_orientation.y, a.delta_orientation.z]


@requires_ros
def test_three_streams_each_action_carries_its_own_instruction_stamp_and_limits(multi, tiny_policy):
    node, hs, whole, recorder = multi("/ms3", max_batch_wait_ms=3000.0, publish_twist=True,
                                      **{"right.max_delta_position_m": [1e-4, 1e-4, 1e-4],
                                         "top.unnorm_key": "tiny_other_dataset", "top.action_frame": "top_base"})
    _instruct(node, hs, INSTRUCTIONS)
    frames = {s: small_frame(30 + i) for i, s in enumerate(STREAMS)}
    keys = {s: hs[s].send_image(frames[s][1]) for s in STREAMS}
    assert len(set(keys.values())) == 3
    got = {s: hs[s].action_for(keys[s], timeout=20) for s in STREAMS}
    assert all(got.values()), {s: a is not None for s, a in got.items()}
    for s, a in got.items():
        key = "tiny_other_dataset" if s == "top" else "bridge_orig"
        ref = tiny_policy.predict(frames[s][0], INSTRUCTIONS[s], key)  # the ROS-free pipeline, this frame alone
        assert stamp_key(a.header.stamp) == keys[s] and a.instruction == INSTRUCTIONS[s], s
        assert list(a.tokens) == [int(t) for t in ref.tokens] and a.unnorm_key == key, s
        np.testing.assert_allclose(a.unclipped, ref.action, atol=1e-5)
        assert a.header.frame_id == ("top_base" if s == "top" else "base_link")
        # nothing of another stream's on this stream's topics
        assert hs[s].action_stamps() == {keys[s]} and hs[s].action_stamps(hs[s].twists) == {keys[s]}, s
    # per-stream limits: right's override clips at 1e-4, the others keep the global 0.05 m
    for s, a in got.items():
        lim = 1e-4 if s == "right" else 0.05
        expected = np.clip(np.asarray(a.unclipped[:3], np.float64), -lim, lim)
        np.testing.assert_allclose(_motion(a)[:3], expected, atol=1e-9)
    assert got["right"].clipped and max(abs(v) for v in got["right"].unclipped[:3]) > 1e-4
    # the three frames went through one predict_batch, each with its own instruction and key
    calls = recorder.calls()
    assert [len(items) for _, items in calls] == [3], calls
    assert sorted((i, k) for i, k, _ in calls[0][1]) == sorted(
        (INSTRUCTIONS[s], "tiny_other_dataset" if s == "top" else "bridge_orig") for s in STREAMS)
    # diagnostics: a status per stream with its own counters and instruction, totals on the node's
    for s in STREAMS:
        d = hs[s].wait_diag(lambda d: d["values"].get("actions_published") == "1", timeout=5)
        assert d and d["values"]["instruction"] == INSTRUCTIONS[s] and d["values"]["stream"] == s, d
    d = whole.wait_diag(lambda d: d["values"].get("actions_published") == "3", timeout=5)
    assert d and d["values"]["streams"] == "left,right,top" and d["values"]["batch_size_max"] == "3", d


@requires_ros
def test_one_streams_bad_input_never_affects_the_others(multi):
    from sensor_msgs.msg import Image

    node, hs, whole, recorder = multi("/msbad", max_batch_wait_ms=400.0)
    _instruct(node, hs, INSTRUCTIONS)

    def truncated():
        m = Image()
        m.encoding, m.width, m.height, m.step, m.data = "rgb8", 8, 8, 24, b"\x07" * 100
        return m

    good = {s: small_frame(40 + i)[1] for i, s in enumerate(STREAMS)}
    for _ in range(3):  # right's camera sends malformed frames; left and top keep acting
        before = node.stream("right").stats.counts["rejected_bad_image"]
        keys = {s: hs[s].send_image(truncated() if s == "right" else good[s]) for s in STREAMS}
        for s in ("left", "top"):
            assert hs[s].action_for(keys[s], timeout=20) is not None, s
        assert wait_until(lambda: node.stream("right").stats.counts["rejected_bad_image"] > before, 5)
    assert not hs["right"].action_stamps() and not hs["right"].action_stamps(hs["right"].previews)
    d = hs["right"].wait_diag(lambda d: d["level"] == 1 and "bad image" in d["message"], timeout=5)
    assert d and int(d["values"]["rejected_bad_image"]) >= 3 and d["values"]["actions_previewed"] == "0", d
    assert hs["left"].wait_diag(lambda d: d["level"] == 0 and int(d["values"]["actions_published"]) >= 3, 5)
    assert whole.wait_diag(lambda d: d["level"] == 1 and d["message"].startswith("stream right:"), timeout=5)

    # an instruction the model refuses (longer than its positions): that item fails inside the
    # shared batch, the other two items of the same predict_batch are published
    from rclpy.parameter import Parameter

    assert node.set_parameters([Parameter("max_instruction_chars", value=20000)])[0].successful
    _instruct(node, hs, {"right": ("pick up the cup " * 700).strip()})
    n_calls = len(recorder.calls())
    keys = {s: hs[s].send_image(good[s]) for s in STREAMS}
    for s in ("left", "top"):
        assert hs[s].action_for(keys[s], timeout=20) is not None, s
    assert wait_until(lambda: node.stream("right").stats.counts["rejected_bad_input"] == 1, 5)
    calls, outcomes = recorder.calls()[n_calls:], recorder.outcomes[n_calls:]
    assert [len(items) for _, items in calls] == [3], calls
    assert sum(isinstance(o, Exception) for o in outcomes[0]) == 1
    assert keys["right"] not in hs["right"].action_stamps(hs["right"].previews)

    # a refused (empty) instruction clears right's only
    hs["right"].send_instruction("")
    assert wait_until(lambda: node.stream("right").instruction is None, 5)
    assert node.stream("left").instruction.text == INSTRUCTIONS["left"]
    keys = {s: hs[s].send_image(good[s]) for s in STREAMS}
    for s in ("left", "top"):
        assert hs[s].action_for(keys[s], timeout=20) is not None, s
    assert node.stream("right").stats.counts["instructions_rejected"] == 1
    assert node.stream("left").stats.counts["instructions_rejected"] == 0
    assert node.stats.counts["callback_errors"] == 0 and node.stats.counts["inference_errors"] == 0


def _zero_motion_since(h, t):
    with h.lock:
        return [m for ts, m in h.actions if ts >= t and len(m.tokens) == 0]


def _actions_since(h, t):
    with h.lock:
        return [m for ts, m in h.actions if ts >= t]


@requires_ros
def test_disabling_one_stream_publishes_its_zero_motion_only(multi):
    node, hs, whole, _ = multi("/msen", publish_twist=True)
    _instruct(node, hs, INSTRUCTIONS)
    frames = {s: small_frame(50 + i)[1] for i, s in enumerate(STREAMS)}

    def round_trip(store="actions"):
        keys = {s: hs[s].send_image(frames[s]) for s in STREAMS}
        for s in STREAMS:
            assert hs[s].action_for(keys[s], store=hs[s].previews, timeout=20) is not None, s
        time.sleep(0.2)  # the action and twist of each preview are published together with it
        return keys

    round_trip()
    t = time.monotonic()
    resp = hs["left"].set_enabled(False)
    assert resp.success and "disabled" in resp.message
    keys = round_trip()
    stop = _actions_since(hs["left"], t)
    assert len(stop) == 1 and len(stop[0].tokens) == 0 and _motion(stop[0]) == [0.0] * 6, stop
    with hs["left"].lock:
        twists = [m for ts, m in hs["left"].twists if ts >= t]
    assert len(twists) == 1 and twists[0].twist.linear.x == 0.0
    assert keys["left"] not in hs["left"].action_stamps()  # left: previews only
    for s in ("right", "top"):  # untouched: no stop, actions go on
        assert not _zero_motion_since(hs[s], t), s
        assert keys[s] in hs[s].action_stamps(), s
    assert node.stream("left").enabled is False and node.stream("right").enabled is True

    # ~/enable false: every stream's stop, once each
    t2 = time.monotonic()
    assert whole.set_enabled(False).success
    assert wait_until(lambda: all(len(_zero_motion_since(hs[s], t2)) == 1 for s in STREAMS), 5)
    keys = round_trip()
    for s in STREAMS:
        assert [len(m.tokens) for m in _actions_since(hs[s], t2)] == [0], s
        assert keys[s] not in hs[s].action_stamps(), s

    # ~/right/enable true: right acts again, the others stay dry
    assert hs["right"].set_enabled(True).success
    keys = round_trip()
    assert keys["right"] in hs["right"].action_stamps()
    assert keys["left"] not in hs["left"].action_stamps() and keys["top"] not in hs["top"].action_stamps()


@requires_ros
def test_speculative_drafts_stay_per_stream(multi, tiny_policy):
    node, hs, _, recorder = multi("/msdraft", streams=("a", "b"))
    text = INSTRUCTIONS["left"]
    _instruct(node, hs, {"a": text, "b": text})  # the same instruction on both streams
    # two frames whose actions differ, so a draft from the wrong stream shows
    seeds = next((i, j) for i in range(60, 70) for j in range(i + 1, 70)
                 if list(tiny_policy.predict(small_frame(i)[0], text, "bridge_orig").tokens)
                 != list(tiny_policy.predict(small_frame(j)[0], text, "bridge_orig").tokens))
    frame = {"a": small_frame(seeds[0])[1], "b": small_frame(seeds[1])[1]}

    def act(s):
        n = len(recorder.calls())
        a = hs[s].action_for(hs[s].send_image(frame[s]), store=hs[s].previews, timeout=20)
        assert a is not None and wait_until(lambda: len(recorder.calls()) == n + 1, 5)
        (_, items), = recorder.calls()[n:]
        assert len(items) == 1
        return list(a.tokens), items[0][2]

    a1, draft = act("a")
    assert draft is None
    b1, draft = act("b")
    assert draft is None, "stream b's first frame got a draft (stream a's action)"
    assert a1 != b1
    a2, draft = act("a")
    assert draft == a1 and a2 == a1
    b2, draft = act("b")
    assert draft == b1 and b2 == b1
    # an instruction change on a drops a's draft only
    _instruct(node, hs, {"a": INSTRUCTIONS["right"]})
    assert act("a")[1] is None
    assert act("b")[1] == b1


@requires_ros
def test_max_batch_wait_ms_bounds_the_wait_for_other_streams(multi):
    from rclpy.parameter import Parameter

    wait_s = 1.5
    node, hs, _, recorder = multi("/mswait", max_batch_wait_ms=wait_s * 1e3)
    _instruct(node, hs, INSTRUCTIONS)
    frames = {s: small_frame(70 + i)[1] for i, s in enumerate(STREAMS)}

    # only left sends: the batcher waits for the silent streams, but not longer than max_batch_wait_ms
    t0 = time.monotonic()
    key = hs["left"].send_image(frames["left"])
    assert hs["left"].action_for(key, timeout=20) is not None
    (t_batch, items), = recorder.calls()
    assert len(items) == 1
    assert wait_s - 0.05 <= t_batch - t0 <= wait_s + 5.0, t_batch - t0  # + slack for a loaded box

    # right's frame arrives within the wait: one batch with both
    t0 = time.monotonic()
    keys = {"left": hs["left"].send_image(frames["left"])}
    time.sleep(0.3)
    keys["right"] = hs["right"].send_image(frames["right"])
    for s, k in keys.items():
        assert hs[s].action_for(k, timeout=20) is not None, s
    (t_batch, items), = recorder.calls()[1:]
    assert sorted(i for i, _, _ in items) == sorted(INSTRUCTIONS[s] for s in keys), items
    assert wait_s - 0.05 <= t_batch - t0 <= wait_s + 5.0, t_batch - t0  # + slack for a loaded box

    # 0 (runtime change): take what is pending, at once
    assert node.set_parameters([Parameter("max_batch_wait_ms", value=0)])[0].successful
    t0 = time.monotonic()
    key = hs["top"].send_image(frames["top"])
    assert hs["top"].action_for(key, timeout=20) is not None
    (t_batch, items), = recorder.calls()[2:]
    assert len(items) == 1 and t_batch - t0 < wait_s - 0.1, t_batch - t0


@requires_ros
def test_a_failing_batch_is_counted_by_each_of_its_streams_and_the_node_recovers(multi):
    from openvla_model import BackendError

    node, hs, whole, recorder = multi("/msfail", streams=("a", "b"), max_batch_wait_ms=3000.0)
    _instruct(node, hs, {"a": INSTRUCTIONS["left"], "b": INSTRUCTIONS["right"]})
    frames = {s: small_frame(80 + i)[1] for i, s in enumerate(("a", "b"))}
    real = recorder.policy.predict_batch

    def broken(items):
        raise BackendError("device lost")

    recorder.policy.predict_batch = broken
    for n in range(1, 4):  # three batches of both streams fail
        keys = {s: hs[s].send_image(frames[s]) for s in frames}
        assert wait_until(lambda: all(node.stream(s).stats.counts["inference_errors"] == n for s in frames), 20), n
        assert [len(items) for _, items in recorder.calls()[n - 1:]] == [2]
    assert not any(keys[s] in hs[s].action_stamps(hs[s].previews) for s in frames)
    d = whole.wait_diag(lambda d: d["level"] == 2, timeout=5)
    assert d and "3 batches in a row" in d["message"] and "device lost" in d["values"]["last_error"], d
    assert d["values"]["inference_errors"] == "6"  # the node's totals: both streams
    for s in frames:
        d = hs[s].wait_diag(lambda d: d["level"] == 2 and "failing" in d["message"], timeout=5)
        assert d and d["values"]["consecutive_failures"] == "3", (s, d)
    recorder.policy.predict_batch = real
    keys = {s: hs[s].send_image(frames[s]) for s in frames}
    for s in frames:
        assert hs[s].action_for(keys[s], timeout=20) is not None, s
    assert whole.wait_diag(lambda d: d["level"] == 0, timeout=5), "the node did not recover"
