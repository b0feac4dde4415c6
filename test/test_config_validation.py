"""norm_stats are validated when the checkpoint is loaded (issue 9.9): a bad value is one
NormStatsError (a CheckpointError and a ConfigError) naming the file, the dataset key and the
field, never a TypeError at the first action; the CLIs print it as one `error:` line, exit 2."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from openvla_model.config import load_config
from openvla_model.errors import CheckpointError, ConfigError

FILE = "config.json"


def with_stats(tiny_weights: Path, tmp_path: Path, edit, where: str = FILE) -> Path:
    """The tiny checkpoint (weights linked, not copied) with norm_stats edited in config.json, or
    moved to dataset_statistics.json (config.json then has none) when where says so."""
    d = tmp_path / "ckpt"
    d.mkdir(parents=True)
    for f in tiny_weights.iterdir():
        if f.name not in ("config.json", "dataset_statistics.json"):
            (d / f.name).symlink_to(f)
    cfg = json.loads((tiny_weights / "config.json").read_text())
    stats = cfg["norm_stats"]
    edit(stats)
    if where == "dataset_statistics.json":
        cfg.pop("norm_stats")
        (d / "dataset_statistics.json").write_text(json.dumps(stats))
    (d / "config.json").write_text(json.dumps(cfg))
    return d



def setv(key, field, value, index=None):
    def edit(stats):
        a = stats[key]["action"]
        if index is None:
            a[field] = value
        else:
            a[field][index] = value
    return edit


CASES = [  # (edit, dataset key, expected message after "<file>: norm_stats['<key>'].action")
    (setv("bridge_orig", "q01", None, 2), "bridge_orig", ".q01[2] is null, expected a finite number"),
    (setv("bridge_orig", "q99", "abc", 0), "bridge_orig", ".q99[0] is 'abc', expected a finite number"),
    (setv("bridge_orig", "q99", True, 1), "bridge_orig", ".q99[1] is true, expected a finite number"),
    (setv("tiny_other_dataset", "q01", [0.1], 3), "tiny_other_dataset", ".q01[3] is a list of 1, expected a finite"),
    (setv("bridge_orig", "q01", float("inf"), 0), "bridge_orig", ".q01[0] is inf, expected a finite number"),
    (setv("bridge_orig", "q01", None), "bridge_orig", ".q01 is null, expected a non-empty list of numbers"),
    (setv("bridge_orig", "q99", 0.5), "bridge_orig", ".q99 is 0.5, expected a non-empty list of numbers"),
    (setv("bridge_orig", "q99", []), "bridge_orig", ".q99 is a list of 0, expected a non-empty list"),
    (lambda s: s["bridge_orig"]["action"].pop("q99"), "bridge_orig", ".q99 is missing"),
    (lambda s: s["bridge_orig"].update(action="x"), "bridge_orig", " is missing or not an object"),
    (lambda s: s["bridge_orig"]["action"]["q01"].append(0.0), "bridge_orig",
     ": q01 has 8 values and q99 7; they must be equal"),
    (setv("bridge_orig", "q01", 0.5, 1), "bridge_orig", ": q01[1] = 0.5 is above q99[1] = 0.040855"),
    (setv("bridge_orig", "mask", None), "bridge_orig", ".mask is null, expected a list of 7 booleans"),
    (setv("bridge_orig", "mask", [True] * 6), "bridge_orig", ".mask is a list of 6, expected a list of 7 booleans"),
    (setv("bridge_orig", "mask", "false", 6), "bridge_orig", ".mask[6] is 'false', expected true or false"),
    (lambda s: [s["tiny_other_dataset"]["action"][f].pop() for f in ("q01", "q99")], "tiny_other_dataset",
     " has 6 dimensions but norm_stats['bridge_orig'].action has 7: every dataset must have the same"),
]


@pytest.mark.parametrize("edit,key,expected", CASES, ids=[c[2].strip(" .:")[:40] for c in CASES])
def test_bad_norm_stats_name_the_file_key_and_field(tiny_weights, tmp_path, edit, key, expected):
    d = with_stats(tiny_weights, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_config(d)
    assert isinstance(e.value, ConfigError)  # both: config.json is part of the checkpoint
    assert str(e.value).startswith(f"config.json: norm_stats[{key!r}].action{expected}"), str(e.value)


def test_dataset_statistics_json_is_checked_too_and_named(tiny_weights, tmp_path):
    """Without norm_stats in config.json they come from dataset_statistics.json: valid ones load
    (a 0/1 mask is taken as booleans), a bad one names that file."""
    ok = with_stats(tiny_weights, tmp_path / "ok", setv("bridge_orig", "mask", [1, 1, 1, 1, 1, 1, 0]),
                    where="dataset_statistics.json")
    cfg = load_config(ok)
    assert cfg.action_dim == 7 and cfg.norm_stats["bridge_orig"]["action"]["mask"][6] == 0
    bad = with_stats(tiny_weights, tmp_path / "bad", setv("bridge_orig", "q99", None, 4),
                     where="dataset_statistics.json")
    with pytest.raises(CheckpointError, match=re.escape(
            "dataset_statistics.json: norm_stats['bridge_orig'].action.q99[4] is null")):
        load_config(bad)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_openvla_predict_reports_bad_norm_stats_in_one_line(tiny_weights, tmp_path, capsys):
    import cv2

    from openvla_model.cli import predict_main
    from openvla_model.synthetic import synthetic_rgb

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), synthetic_rgb(0, 64, 64))
    d = with_stats(tiny_weights, tmp_path, setv("bridge_orig", "q01", None, 2))
    rc = predict_main(["--weights", str(d), "--image", str(image), "--instruction", "pick up the cup",
                       "--unnorm-key", "bridge_orig", "--device", "cpu", "--dtype", "float32"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "config.json: norm_stats['bridge_orig'].action.q01[2] is null" in line


def test_openvla_replay_reports_bad_norm_stats_in_one_line(tiny_weights, tmp_path, capsys):
    from conftest import ros_available

    if not ros_available()[0]:
        pytest.skip(ros_available()[1])
    from replay_bags import write_episode

    from openvla_ros.replay.cli import main

    bag = write_episode(tmp_path / "ep", n_frames=2)
    d = with_stats(tiny_weights, tmp_path, setv("bridge_orig", "mask", None))
    rc = main([str(bag), "--weights", str(d), "--unnorm-key", "bridge_orig", "--out", str(tmp_path / "out"),
               "--device", "cpu", "--dtype", "float32", "--quiet"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "config.json: norm_stats['bridge_orig'].action.mask is null" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_node_configure_failure_names_the_file_key_and_field(tiny_weights, tmp_path):
    """The node stays up unconfigured and reports the same message (diagnostics, log)."""
    import os

    from conftest import ros_available

    if not ros_available()[0]:
        pytest.skip(ros_available()[1])
    import rclpy
    from rclpy.parameter import Parameter

    from openvla_ros.node import OpenVLANode

    d = with_stats(tiny_weights, tmp_path, setv("bridge_orig", "q01", None, 2))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = OpenVLANode("openvla_cfg", namespace=f"/cfg{os.getpid()}", context=ctx, parameter_overrides=[
            Parameter("backend", value="torch"), Parameter("device", value="cpu"),
            Parameter("weights_path", value=str(d)), Parameter("unnorm_key", value="bridge_orig")])
        try:
            node.trigger_configure()
            assert node.lifecycle_state() == "unconfigured"
            assert "config.json: norm_stats['bridge_orig'].action.q01[2] is null" in node.load_error, node.load_error
        finally:
            node.close()
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
