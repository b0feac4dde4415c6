"""openvla-replay on small generated bags: the numbers in summary.json are recomputed here
independently from the known ground truth and actions.csv; every bad input is one clear error."""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_ros
from replay_bags import downgrade_to_humble, gt_action, write_episode

pytestmark = requires_ros  # the replay tool is ROS glue (openvla_ros.msg, rosbags types)

DIMS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


def replay(args, capsys=None):
    from openvla_ros.replay.cli import main

    rc = main(list(map(str, args)) + ["--quiet", "--device", "cpu", "--dtype", "float32"])
    err = capsys.readouterr().err if capsys else ""
    return rc, err


def only_error_line(err: str) -> str:
    """stderr ends with exactly one `error:` line: no traceback, no multi-line dump continuing the
    error (earlier log lines, e.g. the tiny checkpoint's warning, are allowed)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def snapshot(root: Path) -> dict:
    """Every file and folder under root with a hash of its content: proof that nothing was touched."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def read_csv(out: Path):
    with open(out / "actions.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_numbers(out: Path, expect_gt=True, twist=False):
    s = json.loads((out / "summary.json").read_text())
    rows = [r for r in read_csv(out) if r["status"] == "ok"]
    assert s["frames"]["processed"] == len(rows) > 0
    pred = np.array([[float(r[f"pred_{d}"]) for d in DIMS] for r in rows])
    if not expect_gt:
        assert s["errors_vs_gt"] is None and s["gripper_agreement"] is None
        return s, rows
    gt = np.array([gt_action(int(r["frame"])) for r in rows])
    for d, name in enumerate(DIMS):
        e = s["errors_vs_gt"][name]
        if twist and name == "gripper":
            assert e["n"] == 0 and e["mae"] is None
            continue
        err = pred[:, d] - gt[:, d]
        assert e["n"] == len(rows)
        assert e["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-5, abs=1e-7)
        assert e["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-5, abs=1e-7)
        if np.std(gt[:, d]) > 1e-9 and np.std(pred[:, d]) > 1e-9:
            assert e["corr"] == pytest.approx(np.corrcoef(pred[:, d], gt[:, d])[0, 1], abs=1e-5)
        else:
            assert e["corr"] is None
    if twist:
        assert s["gripper_agreement"] is None
    else:
        assert s["gripper_agreement"] == pytest.approx(((pred[:, 6] > 0.5) == (gt[:, 6] > 0.5)).mean())
    return s, rows


def read_output_bag(out: Path):
    from rosbags.highlevel import AnyReader

    with AnyReader([out / "predictions_bag"]) as reader:  # type from the bag's own message definition
        assert [c.msgtype for c in reader.connections] == ["openvla_ros/msg/EndEffectorAction"]
        return [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()]


@pytest.mark.parametrize("storage,version,gt", [("sqlite3", 8, "float64"), ("mcap", 9, "action")])
def test_offline_replay_numbers_and_outputs(tmp_path, tiny_weights, capsys, storage, version, gt):
    bag = write_episode(tmp_path / "ep", n_frames=10, storage=storage, version=version, gt=gt)
    out = tmp_path / "out"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out], capsys)
    assert rc == 0, err
    s, rows = check_numbers(out)
    assert s["partial"] is False and s["mode"] == "offline"
    assert s["frames"] == {"in_bag": 10, "selected": 10, "expected_selected": 10, "processed": 10, "rejected": 0,
                           "dropped": 0, "no_instruction": 0}
    assert s["bag"]["storage"] == storage and s["bag"]["image_topic"] == "/camera/image"
    assert s["model"]["backend"] == "torch" and s["unnorm_key"] == "bridge_orig"
    assert s["latency_ms"]["p50"] > 0 and s["latency_ms"]["max"] >= s["latency_ms"]["p95"] >= s["latency_ms"]["p50"]
    assert s["timing_s"]["model"] > 0 and s["timing_s"]["bag_read_decode"] >= 0
    assert {p.name for p in out.iterdir()} >= {"actions.csv", "summary.json", "report.md", "index.html",
                                               "actions.png", "latency_hist.png", "rate.png", "predictions_bag"}
    assert (out / "actions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MAE" in (out / "report.md").read_text() and "<table" in (out / "index.html").read_text()
    msgs = read_output_bag(out)
    assert len(msgs) == 10
    for m, r in zip(msgs, rows):
        assert m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == int(r["stamp_ns"])
        assert list(m.tokens) == [int(r[f"token_{i}"]) for i in range(7)]
        assert m.delta_position.x == pytest.approx(float(r["pred_x"]), rel=1e-5)
        assert m.instruction == "pick up the red cup" and m.unnorm_key == "bridge_orig"
    assert not list(tmp_path.glob("*.incomplete"))


def test_humble_bag_without_embedded_definitions(tmp_path, tiny_weights, capsys):
    """A Humble-format bag (metadata v5, no message definitions): types come from our typestore,
    the custom EndEffectorAction ground truth included."""
    bag = downgrade_to_humble(write_episode(tmp_path / "ep", n_frames=4, storage="sqlite3", version=8, gt="action"))
    assert "version: 5" in (bag / "metadata.yaml").read_text()
    from rosbags.highlevel import AnyReader, AnyReaderError

    with pytest.raises(AnyReaderError, match="no type definitions"):  # nothing embedded to fall back on
        AnyReader([bag]).open()
    out = tmp_path / "out"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out], capsys)
    assert rc == 0, err
    s, _ = check_numbers(out)
    assert s["frames"]["processed"] == 4 and s["frames_with_gt"] == 4


def test_offline_same_tokens_as_the_policy_api(tmp_path, tiny_weights, tiny_policy, capsys):
    from openvla_model.synthetic import synthetic_rgb

    bag = write_episode(tmp_path / "ep", n_frames=3, gt=None)
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    for r in read_csv(tmp_path / "o"):
        want = tiny_policy.predict(synthetic_rgb(int(r["frame"]), 96, 128), "pick up the red cup", "bridge_orig")
        assert [int(r[f"token_{i}"]) for i in range(7)] == want.tokens.tolist()


def test_twist_ground_truth_and_every_nth(tmp_path, tiny_weights, capsys):
    bag = write_episode(tmp_path / "ep", n_frames=9, gt="twist")
    out = tmp_path / "out"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out, "--every", "3"], capsys)
    assert rc == 0, err
    s, rows = check_numbers(out, twist=True)
    assert [int(r["frame"]) for r in rows] == [0, 3, 6]


def test_predictions_only_without_gt_and_compressed_images(tmp_path, tiny_weights, capsys):
    bag = write_episode(tmp_path / "ep", n_frames=4, gt=None, compressed=True)
    out = tmp_path / "out"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out], capsys)
    assert rc == 0, err
    check_numbers(out, expect_gt=False)
    assert "predictions only" in (out / "report.md").read_text()


def test_control_rate_selection_and_instruction_from_option(tmp_path, tiny_weights, capsys):
    bag = write_episode(tmp_path / "ep", n_frames=12, instruction=None, gt=None)  # 10 Hz images
    out = tmp_path / "out"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out,
                      "--control-rate-hz", "5", "--instruction", "open the drawer"], capsys)
    assert rc == 0, err
    rows = read_csv(out)
    assert [int(r["frame"]) for r in rows] == [0, 2, 4, 6, 8, 10]
    assert {r["instruction"] for r in rows} == {"open the drawer"}


def test_frames_before_the_first_instruction_are_skipped_and_counted(tmp_path, tiny_weights, capsys):
    bag = write_episode(tmp_path / "ep", n_frames=8, gt=None, instruction_delay_s=0.35)
    out = tmp_path / "out"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out], capsys)
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"]["no_instruction"] == 4 and s["frames"]["processed"] == 4


def test_a_bad_frame_is_rejected_and_the_rest_processed(tmp_path, tiny_weights, capsys):
    bag = write_episode(tmp_path / "ep", n_frames=5, gt=None, corrupt_frame=2)
    out = tmp_path / "out"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out], capsys)
    assert rc == 0, err
    rows = read_csv(out)
    assert rows[2]["status"].startswith("rejected: image data truncated")
    assert json.loads((out / "summary.json").read_text())["frames"]["rejected"] == 1


def _corrupt_bag(tmp_path):
    bag = write_episode(tmp_path / "corrupt", n_frames=3)
    db = next(bag.glob("*.db3"))
    db.write_bytes(b"this is not sqlite" * 100)
    return bag


def _empty_bag(tmp_path):
    from rosbags.rosbag2 import Writer

    with Writer(tmp_path / "empty", version=9):
        pass
    return tmp_path / "empty"


@pytest.mark.parametrize("case,match", [
    ("missing", "bag not found"),
    ("corrupt", "cannot read bag"),
    ("empty", "is empty"),
    ("missing_topic", "image topic '/nope' not in the bag; topics present: /camera/image [sensor_msgs/msg/Image]"),
    ("wrong_type", "image topic '/instruction' has type std_msgs/msg/String"),
    ("two_image_topics", "several image topics"),
    ("no_instruction_topic", "no instruction topic"),
    ("late_instruction", "mismatched instruction timing"),
    ("out_exists", "exists and is not empty"),
    ("corrupt_metadata", "metadata.yaml is not valid YAML: "),
])
def test_bad_input_is_one_clear_error_and_leaves_nothing_unmarked(tmp_path, tiny_weights, capsys, case, match):
    args = []
    if case == "missing":
        bag = tmp_path / "nope"
    elif case == "corrupt":
        bag = _corrupt_bag(tmp_path)
    elif case == "empty":
        bag = _empty_bag(tmp_path)
    elif case == "two_image_topics":
        bag = write_episode(tmp_path / "ep", n_frames=2, extra_image_topic=True)
    elif case == "no_instruction_topic":
        bag = write_episode(tmp_path / "ep", n_frames=2, instruction=None)
    elif case == "late_instruction":
        bag = write_episode(tmp_path / "ep", n_frames=3, instruction_delay_s=5.0)
    elif case == "corrupt_metadata":  # a YAML syntax error: one line with its position, not the parser's excerpt
        bag = write_episode(tmp_path / "ep", n_frames=2)
        meta = bag / "metadata.yaml"
        meta.write_text(meta.read_text().replace("version:", "version: [", 1))
    else:
        bag = write_episode(tmp_path / "ep", n_frames=2)
        args = {"missing_topic": ["--image-topic", "/nope"], "wrong_type": ["--image-topic", "/instruction"],
                "out_exists": []}[case]
    out = tmp_path / "out"
    if case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out] + args, capsys)
    assert rc == 2
    assert match in only_error_line(err), err
    assert not (tmp_path / "out.incomplete").exists()
    if case == "out_exists":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()


def _no_work(monkeypatch):
    """Refusals must come before any work: replaying a frame here fails the test."""
    import openvla_ros.replay.offline as offline

    def run_offline(*a, **k):
        raise AssertionError("the replay started although the options were refused")

    monkeypatch.setattr(offline, "run_offline", run_offline)


@pytest.mark.parametrize("where,match", [
    ("the_bag", "is the input bag"),
    ("folder_holding_the_bag", "contains the input bag"),
    ("inside_the_bag", "lies inside the input bag"),
    ("link_to_the_bag", "is the input bag"),
    ("db3_file_of_the_bag", "is the input bag"),
    ("incomplete_name_is_the_bag", "is the input bag"),
])
def test_out_is_never_an_input_bag(tmp_path, tiny_weights, capsys, monkeypatch, where, match):
    """Issue 9.7: `--out <bag> --force` replaced the bag with the report, `--out <folder holding the
    bag> --force` deleted the bag and its neighbours. Refused, with or without --force."""
    data = tmp_path / "data"
    data.mkdir()
    bag = write_episode(data / ("res.incomplete" if where == "incomplete_name_is_the_bag" else "ep"), n_frames=2)
    (data / "notes.txt").write_text("unrelated")
    out = {"the_bag": bag, "folder_holding_the_bag": data, "inside_the_bag": bag / "report",
           "link_to_the_bag": tmp_path / "link", "db3_file_of_the_bag": bag,
           "incomplete_name_is_the_bag": data / "res"}[where]
    if where == "link_to_the_bag":
        out.symlink_to(bag, target_is_directory=True)
    bag_arg = next(bag.glob("*.db3")) if where == "db3_file_of_the_bag" else bag
    before = snapshot(tmp_path)
    _no_work(monkeypatch)
    for force in ([], ["--force"]):
        rc, err = replay([bag_arg, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out] + force,
                         capsys)
        assert rc == 2, err
        assert match in only_error_line(err)
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("case", ["out", "incomplete"])
def test_out_never_replaces_a_folder_it_did_not_write(tmp_path, tiny_weights, capsys, monkeypatch, case, force):
    """Issue 9.7: `--out res` silently deleted an unrelated `res.incomplete/`; --force replaced any
    folder. A folder without our marker is never replaced, whatever the flags."""
    bag = write_episode(tmp_path / "ep", n_frames=2)
    mine = tmp_path / ("res" if case == "out" else "res.incomplete")
    mine.mkdir()
    (mine / "thesis.tex").write_text("a year of work")
    (mine / "summary.json").write_text("{}")  # looking like a report is not enough
    before = snapshot(tmp_path)
    _no_work(monkeypatch)
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", tmp_path / "res"]
                     + (["--force"] if force else []), capsys)
    assert rc == 2, err
    assert "was not written by openvla-replay" in only_error_line(err)
    assert snapshot(tmp_path) == before


def test_force_replaces_its_own_report_and_leftover(tmp_path, tiny_weights, capsys):
    """The report folder carries a signed marker; --force replaces such a folder (and the
    `.incomplete` leftover of a killed run), nothing is replaced without --force."""
    from openvla_ros.replay.output import MARKER

    bag = write_episode(tmp_path / "ep", n_frames=2)
    out = tmp_path / "res"
    args = [bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out, "--max-frames", "1"]
    rc, err = replay(args, capsys)
    assert rc == 0, err
    assert json.loads((out / MARKER).read_text())["written_by"] == "openvla-replay"
    (out / "old.txt").write_text("first run")
    leftover = tmp_path / "res.incomplete"  # as a killed run leaves it: our marker, partial content
    leftover.mkdir()
    shutil.copy(out / MARKER, leftover / MARKER)
    (leftover / "actions.csv").write_text("partial")
    before = snapshot(tmp_path)
    rc, err = replay(args, capsys)
    assert rc == 2 and "use --force" in only_error_line(err)
    assert snapshot(tmp_path) == before
    shutil.rmtree(out)  # only the leftover in the way now
    rc, err = replay(args, capsys)
    assert rc == 2 and "interrupted openvla-replay run" in only_error_line(err)
    rc, err = replay(args + ["--force"], capsys)
    assert rc == 0, err
    assert not leftover.exists() and json.loads((out / "summary.json").read_text())["frames"]["processed"] == 1
    (out / "old.txt").write_text("second run")
    rc, err = replay(args + ["--force"], capsys)
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / MARKER).is_file() and (out / "summary.json").is_file()


@pytest.mark.parametrize("case,match", [
    ("out_is_a_file", "exists and is not a folder"),
    ("out_is_dot", "is the current folder or one above it"),
    ("out_is_a_parent", "is the current folder or one above it"),
    ("parent_is_a_file", "is not a folder"),
    ("out_is_empty", "--out is empty"),
    ("max_frames_0", "--max-frames must be >= 1, got 0"),
    ("max_frames_negative", "--max-frames must be >= 1, got -3"),
    ("speculative_max_age_0", "--speculative-max-age-s must be a finite number > 0, got 0.0"),
])
def test_bad_out_or_max_frames_is_refused_before_any_work(tmp_path, tiny_weights, capsys, monkeypatch, case, match):
    """Issue 9.8: `--out <file> --force` replayed everything and then crashed with
    NotADirectoryError, `--out . --force` with ValueError, `--max-frames 0` replayed nothing."""
    bag = write_episode(tmp_path / "ep", n_frames=2)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "file.txt").write_text("keep")
    monkeypatch.chdir(work / "sub")
    extra = []
    out = {"out_is_a_file": work / "file.txt", "out_is_dot": ".", "out_is_a_parent": "..",
           "parent_is_a_file": work / "file.txt" / "res", "out_is_empty": ""}.get(case, tmp_path / "res")
    if case.startswith("max_frames"):
        extra = ["--max-frames", match.rsplit(" ", 1)[1]]
    if case == "speculative_max_age_0":
        extra = ["--speculative-max-age-s", "0"]
    before = snapshot(tmp_path)
    _no_work(monkeypatch)
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out, "--force"] + extra,
                     capsys)
    assert rc == 2, err
    assert match in only_error_line(err)
    assert snapshot(tmp_path) == before


def test_replay_modules_import_one_way():
    """Issue 14: run.py held the helpers offline.py and live.py import and also imported them:
    a circle. Every import inside openvla_ros/replay (module level or in a function) flows one way."""
    pkg = Path(__file__).resolve().parents[1] / "openvla_ros" / "replay"
    graph = {}
    for f in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps.update([node.module] if node.module else [a.name for a in node.names])
                elif node.level == 0 and (node.module or "").startswith("openvla_ros.replay."):
                    deps.add(node.module.split(".")[2])
        graph[f.stem] = {d.split(".")[0] for d in deps} - {f.stem}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    assert "run" not in graph["offline"] | graph["live"]


def test_ctrl_c_writes_a_partial_report(tmp_path, tiny_weights, ros_env):
    bag = write_episode(tmp_path / "ep", n_frames=60, gt="float64")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "openvla_ros.replay.cli", str(bag), "--weights", str(tiny_weights),
           "--unnorm-key", "bridge_orig", "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=ros_env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stderr:  # the first progress line: frames are being processed
        if "[openvla-replay] 1/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["partial"] is True and 1 <= s["frames"]["processed"] < 60
    assert "PARTIAL" in (out / "report.md").read_text() and "PARTIAL report" in stdout
    assert len(read_output_bag(out)) == s["frames"]["processed"]


def test_live_replay_into_the_node_process(tmp_path, tiny_weights, tiny_policy, ros_env):
    """Live mode against openvla_node running as a separate process (loopback DDS): every
    selected frame is either answered (same tokens as the policy API) or counted as dropped."""
    from openvla_model.synthetic import synthetic_rgb

    bag = write_episode(tmp_path / "ep", n_frames=10, gt="float64", period_s=0.25)
    ns = f"/live{os.getpid()}"
    node_cmd = [sys.executable, "-m", "openvla_ros.node", "--ros-args", "-r", f"__ns:={ns}",
                "-p", "backend:=torch", "-p", "device:=cpu", "-p", "dtype:=float32", "-p", f"weights_path:={tiny_weights}",
                "-p", "unnorm_key:=bridge_orig", "-p", "max_image_age_s:=5.0", "-p", "diagnostics_period_s:=0.2"]
    log = open(tmp_path / "node.log", "w")
    node = subprocess.Popen(node_cmd, env=ros_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "openvla_ros.replay.cli", str(bag), "--mode", "live", "--out", str(out),
               "--node-image-topic", f"{ns}/image", "--node-instruction-topic", f"{ns}/instruction",
               "--node-action-topic", f"{ns}/action_preview", "--wait-timeout-s", "90", "--quiet"]
        run = subprocess.run(cmd, env=ros_env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr + (tmp_path / "node.log").read_text()[-3000:]
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=30)
        log.close()
    s = json.loads((out / "summary.json").read_text())
    f = s["frames"]
    assert s["mode"] == "live" and f["selected"] == 10 and f["processed"] + f["dropped"] == 10
    assert f["processed"] >= 5, s
    assert s["latency_ms"]["p50"] > 0 and s["unnorm_key"] == "bridge_orig"
    assert s["model"]["weights_path"] == str(tiny_weights) and s["model"]["backend"] == "torch"
    check_numbers(out)
    for r in (r for r in read_csv(out) if r["status"] == "ok"):
        want = tiny_policy.predict(synthetic_rgb(int(r["frame"]), 96, 128), "pick up the red cup", "bridge_orig")
        assert [int(r[f"token_{i}"]) for i in range(7)] == want.tokens.tolist()
    assert len(read_output_bag(out)) == f["processed"]


def _tokens(rows):
    return [[int(r[f"token_{i}"]) for i in range(7)] for r in rows]


def test_offline_speculative_acceptance_in_summary_and_report(tmp_path, tiny_weights, capsys):
    """Issue 13: each frame's draft is the previous action's tokens (same instruction, image stamps
    0.1 s apart < speculative_max_age_s). The accepted count of every frame is recomputed here
    from the tokens alone: greedy-exact decoding accepts exactly the drafts that equal its own
    tokens, i.e. the common prefix of the previous action's first 6 tokens and this action's."""
    bag = write_episode(tmp_path / "ep", n_frames=6, gt=None)
    out = tmp_path / "spec"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out], capsys)
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    rows = [r for r in read_csv(out) if r["status"] == "ok"]
    sp, n = s["speculative"], s["frames"]["processed"]
    assert n == len(rows) == 6
    toks = _tokens(rows)
    want = [None] + [next((j for j in range(6) if prev[j] != cur[j]), 6) for prev, cur in zip(toks, toks[1:])]
    assert [None if r["accepted"] == "" else int(r["accepted"]) for r in rows] == want
    hist = [0] * 7
    for k in want:
        hist[k or 0] += 1
    assert sp == {"enabled": True, "max_age_s": 1.0, "actions": n, "drafted": n - 1,
                  "accepted_total": sum(want[1:]), "acceptance_rate": pytest.approx(sum(want[1:]) / (6 * (n - 1))),
                  "mean_accepted": pytest.approx(sum(want[1:]) / (n - 1)), "histogram": hist}
    assert sum(sp["histogram"]) == n
    report = (out / "report.md").read_text()
    assert "acceptance rate" in report and "| actions | " + " | ".join(map(str, hist)) + " |" in report

    # --no-speculative: the same actions (greedy-exact), no drafts, no accepted counts
    plain = tmp_path / "plain"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", plain,
                      "--no-speculative"], capsys)
    assert rc == 0, err
    prows = [r for r in read_csv(plain) if r["status"] == "ok"]
    assert _tokens(prows) == toks
    assert [[r[f"pred_{d}"] for d in DIMS] for r in prows] == [[r[f"pred_{d}"] for d in DIMS] for r in rows]
    psp = json.loads((plain / "summary.json").read_text())["speculative"]
    assert psp["enabled"] is False and psp["drafted"] == psp["accepted_total"] == 0
    assert psp["histogram"] == [n, 0, 0, 0, 0, 0, 0] and psp["acceptance_rate"] is None
    assert all(r["accepted"] == "" for r in prows)
    assert "Speculative decoding: off" in (plain / "report.md").read_text()


def test_offline_speculative_age_limit_drops_every_draft(tmp_path, tiny_weights, capsys):
    """Image stamps 0.1 s apart and --speculative-max-age-s 0.05: no frame gets a draft."""
    bag = write_episode(tmp_path / "ep", n_frames=3, gt=None)
    out = tmp_path / "out"
    rc, err = replay([bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out,
                      "--speculative-max-age-s", "0.05"], capsys)
    assert rc == 0, err
    sp = json.loads((out / "summary.json").read_text())["speculative"]
    assert sp["enabled"] is True and sp["max_age_s"] == 0.05
    assert sp["actions"] == 3 and sp["drafted"] == 0 and sp["histogram"] == [3, 0, 0, 0, 0, 0, 0]


# -- several streams (issue 14): batched through policy.predict_batch ------------------------------

VOLATILE = ("latency_ms", "achieved_rate_hz", "timing_s")  # the batch's timing, not the stream's actions


def _stable_summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    for k in VOLATILE:
        s.pop(k)
    s["model"].pop("load_time_s")
    return s


def _stable_rows(out: Path) -> list:
    return [{k: v for k, v in r.items() if k != "latency_ms"} for r in read_csv(out)]


def _stable_bag(out: Path) -> list:
    return [(m.header.stamp.sec, m.header.stamp.nanosec, list(m.tokens), list(m.unclipped), m.instruction)
            for m in read_output_bag(out)]


def assert_stream_equals_single(stream_out: Path, single_out: Path):
    assert _stable_summary(stream_out) == _stable_summary(single_out)
    assert _stable_rows(stream_out) == _stable_rows(single_out)
    assert _stable_bag(stream_out) == _stable_bag(single_out)


def test_several_bags_batched_equal_single_stream_replays(tmp_path, tiny_weights, capsys):
    """Two bags of different lengths, instructions and ground-truth types, one with a corrupt
    frame: the batched replay's per-stream reports equal the single-stream replays of each bag
    (actions, tokens, accepted drafts, metrics, output bag; only the timing differs)."""
    a = write_episode(tmp_path / "ep_a", n_frames=5, gt="float64")
    b = write_episode(tmp_path / "ep_b", n_frames=3, gt="action", instruction="open the drawer", corrupt_frame=1)
    base = ["--weights", tiny_weights, "--unnorm-key", "bridge_orig"]
    for bag, out in ((a, "single_a"), (b, "single_b")):
        rc, err = replay([bag] + base + ["--out", tmp_path / out], capsys)
        assert rc == 0, err
    out = tmp_path / "both"
    rc, err = replay([a, b] + base + ["--out", out], capsys)
    assert rc == 0, err
    assert_stream_equals_single(out / "ep_a", tmp_path / "single_a")
    assert_stream_equals_single(out / "ep_b", tmp_path / "single_b")
    s = json.loads((out / "summary.json").read_text())
    assert list(s["streams"]) == ["ep_a", "ep_b"] and s["mode"] == "offline" and s["partial"] is False
    # rounds: (a0, b0), (a1; b1 corrupt: rejected before the model), (a2, b2), (a3), (a4)
    assert s["batch"] == {"batches": 5, "items": 7, "mean_size": 1.4, "sizes": {"1": 3, "2": 2},
                          "batched_backend": True}
    assert s["streams"]["ep_b"]["frames"]["rejected"] == 1 and s["streams"]["ep_a"]["frames"]["processed"] == 5
    assert json.loads((out / "openvla_replay.json").read_text())["bags"] == [str(a.resolve()), str(b.resolve())]
    report = (out / "report.md").read_text()
    assert "[ep_a](ep_a/report.md)" in report and "2 streams" in report


def test_several_image_topics_of_one_bag(tmp_path, tiny_weights, capsys):
    """Two image topics of one bag are two streams (named after the topics), each equal to the
    single-stream replay of its topic."""
    bag = write_episode(tmp_path / "ep", n_frames=3, gt="float64", extra_image_topic=True)
    base = [bag, "--weights", tiny_weights, "--unnorm-key", "bridge_orig"]
    rc, err = replay(base + ["--image-topic", "/camera2/image", "--out", tmp_path / "single"], capsys)
    assert rc == 0, err
    out = tmp_path / "both"
    rc, err = replay(base + ["--image-topic", "/camera/image", "--image-topic", "/camera2/image", "--out", out],
                     capsys)
    assert rc == 0, err
    assert_stream_equals_single(out / "camera2_image", tmp_path / "single")
    s = json.loads((out / "summary.json").read_text())
    assert [v["image_topic"] for v in s["streams"].values()] == ["/camera/image", "/camera2/image"]
    assert s["batch"]["sizes"] == {"2": 3}
    # the same frames on both topics: the same actions
    assert _stable_rows(out / "camera_image") == _stable_rows(out / "camera2_image")


def _no_work_streams(monkeypatch):
    import openvla_ros.replay.offline as offline

    def refuse(*a, **k):
        raise AssertionError("the replay started although the options were refused")

    monkeypatch.setattr(offline, "run_offline", refuse)
    monkeypatch.setattr(offline, "run_offline_streams", refuse)


@pytest.mark.parametrize("case,match", [
    ("second_bag_missing", "bag not found"),
    ("more_topics_than_bags", "mismatched options: 2 bags and 3 --image-topic values"),
    ("same_topic_twice", "--image-topic given twice with the same topic"),
    ("live_node_streams_count", "mismatched options: 2 replayed streams and 1 --node-streams name"),
    ("out_inside_second_bag", "lies inside the input bag"),
    ("second_bag_lacks_the_topic", "image topic '/camera2/image' not in the bag"),
])
def test_several_streams_bad_input_is_one_clear_error(tmp_path, tiny_weights, capsys, monkeypatch, case, match):
    a = write_episode(tmp_path / "ep_a", n_frames=2,
                      extra_image_topic=case in ("same_topic_twice", "second_bag_lacks_the_topic"))
    b = tmp_path / "nope" if case == "second_bag_missing" else write_episode(tmp_path / "ep_b", n_frames=2)
    bags, extra, out = [a, b], [], tmp_path / "res"
    if case == "more_topics_than_bags":
        extra = ["--image-topic", "/camera/image"] * 3
    elif case == "same_topic_twice":
        bags, extra = [a], ["--image-topic", "/camera/image", "--image-topic", "/camera/image"]
    elif case == "live_node_streams_count":
        extra = ["--mode", "live", "--node-streams", "left"]
    elif case == "out_inside_second_bag":
        out = b / "report"
    elif case == "second_bag_lacks_the_topic":
        extra = ["--image-topic", "/camera2/image"]
    before = snapshot(tmp_path)
    _no_work_streams(monkeypatch)
    rc, err = replay(bags + ["--weights", tiny_weights, "--unnorm-key", "bridge_orig", "--out", out] + extra, capsys)
    assert rc == 2, err
    assert match in only_error_line(err)
    assert snapshot(tmp_path) == before
