"""openvla-replay --mode live with several streams (issue 14): every stream is played at once into
its own stream of one running openvla_node (in this process, real DDS on loopback, the tiny
policy behind test_node_streams' recorder of every predict_batch call), and each stream's report
holds that stream's actions, drops and the node's status of that stream.

- two bags with different instructions into node streams named after them: each report's
  actions carry its own bag's instruction and the tokens the ROS-free pipeline gives that frame
  alone; every frame answered or counted as dropped; the node's per-stream counters, its batches
  (both streams' frames in shared predict_batch calls) and the overview.
- a name collision (two bags called `ep`: report folders ep, ep_2) with --node-streams mapping
  them in order (reversed against the node's own order).
- one bag with two image topics, stopped after a few frames (Ctrl-C): partial reports per stream.
- --node-streams / --node-namespace / node topic problems: one `error:` line, exit 2, nothing written.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import requires_ros
from replay_bags import write_episode
from test_node import ros  # noqa: F401 (fixture)
from test_node_streams import multi  # noqa: F401 (fixture)
from test_replay import only_error_line, read_csv, replay, snapshot

pytestmark = requires_ros

RED, DRAWER = "pick up the red cup", "open the drawer"


def live(bags, out, *extra, capsys=None):
    return replay(list(bags) + ["--mode", "live", "--out", out, "--wait-timeout-s", "20", *extra], capsys)


def stream_summary(out: Path, name: str) -> dict:
    return json.loads((out / name / "summary.json").read_text())


def assert_every_frame_accounted(out: Path, name: str, selected: int) -> list:
    """selected frames = answered + dropped, in summary.json and actions.csv alike; the ok rows."""
    s = stream_summary(out, name)
    f, rows = s["frames"], read_csv(out / name)
    assert s["mode"] == "live" and f["selected"] == selected == len(rows), (name, f)
    assert f["processed"] + f["dropped"] == selected and {r["status"] for r in rows} <= {"ok", "dropped"}, f
    assert sum(r["status"] == "ok" for r in rows) == f["processed"], name
    return [r for r in rows if r["status"] == "ok"]


def test_two_bags_live_each_into_its_own_node_stream(tmp_path, multi, tiny_policy, capsys):  # noqa: F811
    from openvla_model.synthetic import synthetic_rgb

    node, hs, _whole, recorder = multi("/lvs2", streams=("left", "right"), max_batch_wait_ms=150.0)
    left = write_episode(tmp_path / "left", n_frames=6, gt="float64", period_s=0.3, instruction=RED)
    right = write_episode(tmp_path / "right", n_frames=6, gt="float64", period_s=0.3, instruction=DRAWER)
    out = tmp_path / "out"
    rc, err = live([left, right], out, "--node-namespace", "/lvs2", capsys=capsys)  # node streams: the bags' names
    assert rc == 0, err
    instructions = {"left": RED, "right": DRAWER}
    processed = 0
    for name, text in instructions.items():
        ok = assert_every_frame_accounted(out, name, 6)
        assert len(ok) >= 2, name  # the first frame at least (nothing pending); more as the CPU allows
        processed += len(ok)
        for r in ok:  # the node acted on this stream's own instruction and frame
            assert r["instruction"] == text, (name, r)
            want = tiny_policy.predict(synthetic_rgb(int(r["frame"]), 96, 128), text, "bridge_orig")
            assert [int(r[f"token_{i}"]) for i in range(7)] == want.tokens.tolist(), (name, r["frame"])
        s = stream_summary(out, name)
        m = s["model"]
        assert m["node"] == "/lvs2" and m["node_stream"] == name and m["action_topic"] == f"/lvs2/{name}/action_preview"
        assert m["backend"] == "torch" and s["unnorm_key"] == "bridge_orig" and s["latency_ms"]["p50"] > 0
        # the node's status of this stream, and its counters over the replay
        assert m["stream_diagnostics"]["stream"] == name and m["stream_diagnostics"]["instruction"] == text, m
        assert m["node_counts"]["actions_previewed"] == len(ok), m["node_counts"]
        assert len(ok) <= m["node_counts"]["frames_received"] <= 6, m["node_counts"]
        assert f"node stream `{name}`" in (out / name / "report.md").read_text()
        # what the node published on this stream's topic: only this stream's instruction
        previews = [msg for _, msg in hs[name].previews]
        assert len(previews) == len(ok) and {p.instruction for p in previews} == {text}, name
    # both streams' frames went through shared predict_batch calls; the overview counts them
    calls = recorder.calls()
    assert sum(len(items) for _, items in calls) == processed
    assert any(sorted(i for i, _, _ in items) == sorted([RED, DRAWER]) for _, items in calls), calls
    top = json.loads((out / "summary.json").read_text())
    assert top["mode"] == "live" and top["partial"] is False and list(top["streams"]) == ["left", "right"]
    assert [v["node_stream"] for v in top["streams"].values()] == ["left", "right"]
    assert top["batch"]["batches"] == len(calls) and top["batch"]["items"] == processed, top["batch"]
    report = (out / "report.md").read_text()
    assert "2 streams" in report and "[left](left/report.md)" in report and "mode: live" in report
    assert (out / "index.html").is_file() and (out / "left" / "predictions_bag").is_dir()


def test_name_collision_and_explicit_node_streams_in_order(tmp_path, multi, capsys):  # noqa: F811
    """Two bags both called `ep`: report folders ep and ep_2; --node-streams right,left plays the
    first into the node's `right` stream and the second into `left`."""
    node, hs, _whole, _rec = multi("/lvsc", streams=("left", "right"))
    a = write_episode(tmp_path / "x" / "ep", n_frames=4, gt=None, period_s=0.2, instruction=RED)
    b = write_episode(tmp_path / "y" / "ep", n_frames=4, gt=None, period_s=0.2, instruction=DRAWER)
    out = tmp_path / "out"
    rc, err = live([a, b], out, "--node-namespace", "lvsc", "--node-streams", "right,left", capsys=capsys)
    assert rc == 0, err
    for folder, node_stream, text in (("ep", "right", RED), ("ep_2", "left", DRAWER)):
        ok = assert_every_frame_accounted(out, folder, 4)
        assert ok and {r["instruction"] for r in ok} == {text}, folder
        assert stream_summary(out, folder)["model"]["node_stream"] == node_stream
        assert {p.instruction for _, p in hs[node_stream].previews} == {text}, node_stream
        assert node.stream(node_stream).instruction.text == text
    top = json.loads((out / "summary.json").read_text())
    assert {k: v["node_stream"] for k, v in top["streams"].items()} == {"ep": "right", "ep_2": "left"}


def test_ctrl_c_gives_partial_reports_per_stream(tmp_path, multi, capsys, monkeypatch):  # noqa: F811
    """One bag, two image topics into node streams cam1, cam2; SIGINT after the 3rd published frame:
    each stream's report is written and marked partial, its frames answered or dropped; exit 130."""
    import openvla_ros.replay.live as live_mod

    class StopAfter3(live_mod.Progress):
        def update(self, n=1):
            super().update(n)
            if self.n == 3:
                os.kill(os.getpid(), signal.SIGINT)  # the replay's handler: stop after this frame

    monkeypatch.setattr(live_mod, "Progress", StopAfter3)
    multi("/lvsi", streams=("cam1", "cam2"))
    bag = write_episode(tmp_path / "ep", n_frames=30, gt="float64", period_s=0.2, extra_image_topic=True)
    out = tmp_path / "out"
    rc, err = live([bag], out, "--image-topic", "/camera/image", "--image-topic", "/camera2/image",
                   "--node-namespace", "/lvsi", "--node-streams", "cam1,cam2", capsys=capsys)
    assert rc == 130, err
    top = json.loads((out / "summary.json").read_text())
    assert top["partial"] is True and list(top["streams"]) == ["camera_image", "camera2_image"]
    assert [v["node_stream"] for v in top["streams"].values()] == ["cam1", "cam2"]
    selected = {k: v["frames"]["selected"] for k, v in top["streams"].items()}
    assert sum(selected.values()) == 3 and all(selected.values()), selected
    for name, n in selected.items():
        assert_every_frame_accounted(out, name, n)
        assert stream_summary(out, name)["partial"] is True
        assert "PARTIAL" in (out / name / "report.md").read_text()
    assert "PARTIAL" in (out / "report.md").read_text()


def _refuse_live(monkeypatch):
    import openvla_ros.replay.live as live_mod

    def refuse(*a, **k):
        raise AssertionError("the live replay started although the options were refused")

    monkeypatch.setattr(live_mod, "run_live_streams", refuse)


@pytest.mark.parametrize("bag_names,extra,match", [
    (("ep_a", "ep_b"), ["--node-streams", "left"],
     "mismatched options: 2 replayed streams and 1 --node-streams name"),
    (("ep_a",), ["--node-streams", "left,right"], "mismatched options: 1 replayed stream and 2 --node-streams names"),
    (("ep_a", "ep_b"), ["--node-streams", "left,left"], "--node-streams left,left: stream names must be distinct"),
    (("ep_a", "ep_b"), ["--node-streams", "left,right-arm"], "must be ROS name tokens"),
    (("ep-a", "ep_b"), [], "the streams' own names (ep-a,ep_b): stream names must be ROS name tokens"),
    (("ep_a", "ep_b"), ["--node-image-topic", "/cam/image"], "--node-image-topic '/cam/image' must be relative"),
    (("ep_a",), ["--node-namespace", "robot/1st"], "--node-namespace 'robot/1st' is not a ROS namespace"),
    (("ep_a", "ep_b"), ["--mode", "offline", "--node-streams", "left,right"],
     "mismatched options: --node-streams in offline mode"),
])
def test_node_streams_problems_are_one_error_line(tmp_path, capsys, monkeypatch, tiny_weights, bag_names, extra,
                                                   match):
    bags = [write_episode(tmp_path / n, n_frames=2) for n in bag_names]
    _refuse_live(monkeypatch)
    before = snapshot(tmp_path)
    rc, err = live(bags, tmp_path / "out", "--weights", tiny_weights, *extra, capsys=capsys)
    assert rc == 2, err
    assert match in only_error_line(err)
    assert snapshot(tmp_path) == before


def test_node_topic_names():
    """Stream i's topics: <namespace>/<node stream>/<topic>; one unnamed stream keeps the plain
    topics of single-stream live mode (an absolute one as given, a relative one under the namespace)."""
    from openvla_ros.replay.options import ReplayOptions, node_topic, stream_specs

    o = ReplayOptions(bag=["/d/left_arm", "/d/right_arm"], mode="live", node_namespace="/robots/", node_streams="l,r")
    assert [(sp.name, sp.node_stream) for sp in stream_specs(o)] == [("left_arm", "l"), ("right_arm", "r")]
    assert node_topic(o, "l", "image/compressed") == "/robots/l/image/compressed"
    assert node_topic(ReplayOptions(bag="b", mode="live"), "left", "action_preview") == "left/action_preview"
    single = ReplayOptions(bag="b", mode="live")
    assert [sp.node_stream for sp in stream_specs(single)] == [""] and node_topic(single, "", "image") == "image"
    assert node_topic(single, "", "/ns/image") == "/ns/image"
    assert node_topic(ReplayOptions(bag="b", mode="live", node_namespace="ns"), "", "image") == "/ns/image"
