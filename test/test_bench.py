"""openvla-bench's batch and OFT benchmarks on the tiny CPU model (issues 14 and 15): the reports
are complete, their figures consistent with the timed calls, and bad options are one error line.
(The stage-table benchmark and --draft are tested in test_cuda_fast_path.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

import openvla_model.bench as bench


def _spy(monkeypatch, cls, name: str) -> list:
    """Record the arguments of every call of cls.name (the real method still runs)."""
    calls, real = [], getattr(cls, name)

    def wrapper(self, *a, **k):
        calls.append((a, k))
        return real(self, *a, **k)

    monkeypatch.setattr(cls, name, wrapper)
    return calls


@pytest.mark.slow
def test_bench_batch_tiny_cpu(tiny_weights, tmp_path, capsys, monkeypatch):
    from openvla_model.policy import OpenVLAPolicy
    from openvla_ros.bench import main  # the openvla-bench entry point: the node's image conversion included

    monkeypatch.setattr(bench, "WARMUP_RUNS", 1)
    calls = _spy(monkeypatch, OpenVLAPolicy, "predict_batch")
    out = tmp_path / "batch.json"
    assert main(["--weights", str(tiny_weights), "--device", "cpu", "--runs", "2", "--batch", "2",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "batch" and r["batch_sizes"] == [1, 2]  # batch 1 added: the ratios' baseline
    assert r["batched_backend"] is True  # the torch reference: one generate_batch per call
    sizes = [len(a[0]) for a, _ in calls]
    # 1 + 2 alone (predict), 1 + 2 checked, then 1 warm-up + 2 timed runs per size
    assert sorted(sizes) == [1] * 3 + [1] * 3 + [2] * 4, sizes
    for b in ("1", "2"):
        res = r["results"][b]
        lat = res["latency_ms"]
        assert lat["n"] == 2 and 0 < lat["p50_ms"] <= lat["p95_ms"]
        assert res["actions_per_s"] == pytest.approx(int(b) * 1e3 / lat["p50_ms"], rel=1e-3)
        assert res["tokens_equal_alone"] == f"{b}/{b}"
        assert {"vision", "prefill", "decode"} <= set(res["stages_median_ms"])
    two, one = r["results"]["2"], r["results"]["1"]
    assert one["throughput_vs_batch1"] == 1.0 and one["latency_vs_batch1"] == 1.0
    assert two["throughput_vs_batch1"] == pytest.approx(two["actions_per_s"] / one["actions_per_s"], rel=1e-2)
    assert two["latency_vs_batch1"] == pytest.approx(two["latency_ms"]["p50_ms"] / one["latency_ms"]["p50_ms"],
                                                     rel=1e-2)
    printed = capsys.readouterr().out
    assert "x batch-1 actions/s" in printed and "one generate_batch call per batch" in printed


@pytest.mark.slow
def test_bench_oft_tiny_cpu(tmp_path, capsys, monkeypatch):
    from openvla_model.oft_policy import OFTPolicy
    from openvla_model.policy import OpenVLAPolicy
    from openvla_ros.bench import main

    monkeypatch.setattr(bench, "WARMUP_RUNS", 1)
    chunks = _spy(monkeypatch, OFTPolicy, "predict_chunk")
    actions = _spy(monkeypatch, OpenVLAPolicy, "predict")
    out = tmp_path / "oft.json"
    assert main(["--oft", "--size", "tiny", "--device", "cpu", "--runs", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    o, p = r["oft"], r["openvla"]
    assert r["mode"] == "oft" and o["chunk"] == 8 and o["action_dim"] == 7  # the tiny OFT checkpoint: LIBERO
    assert o["num_images"] == 2 and o["proprio"] is True and o["describe"]["action_head"] == "l1_regression"
    assert len(chunks) == len(actions) == 3  # 1 warm-up + 2 timed runs each
    images = chunks[0][0][0]
    assert len(images) == 2 and images[0].shape == (480, 640, 3) and chunks[0][1]["proprio"].shape == (8,)
    assert o["chunk_ms"]["n"] == p["action_ms"]["n"] == 2
    assert o["per_action_ms"] == pytest.approx(o["chunk_ms"]["median_ms"] / 8, rel=1e-3)
    assert r["ratios"]["openvla action / oft per action"] == pytest.approx(
        p["action_ms"]["median_ms"] / o["per_action_ms"], rel=1e-2)
    assert r["ratios"]["openvla action / oft chunk"] == pytest.approx(
        p["action_ms"]["median_ms"] / o["chunk_ms"]["median_ms"], rel=1e-2)
    assert {"preprocess", "vision", "llm", "head"} <= set(o["stages_median_ms"])
    printed = capsys.readouterr().out
    assert "oft per action" in printed and "ratio openvla action / oft per action" in printed


@pytest.mark.parametrize("fast", ["0", "1"])
def test_random_oft_policy_on_the_tiny_architecture(tiny_weights, monkeypatch, fast):
    """The full-size --oft path (config without weights + RandomCheckpoint + random head and
    projector), run here on the tiny architecture: a chunk of LIBERO's shape comes out, on the
    reference and on the fast path (what CUDA gets; eager on the CPU: $OPENVLA_TORCH_FAST=1)."""
    from openvla_model.full_config import RandomCheckpoint
    from openvla_model.synthetic import synthetic_rgb

    monkeypatch.setenv("OPENVLA_TORCH_FAST", fast)
    pol = bench.random_oft_policy(tiny_weights, RandomCheckpoint(seed=0), "cpu", "float32")
    try:
        assert pol.describe().get("path", "reference") == ("fast" if fast == "1" else "reference")
        stats = pol.config.norm_stats[sorted(pol.config.norm_stats)[0]]
        mid = (np.asarray(stats["proprio"]["q01"]) + np.asarray(stats["proprio"]["q99"])) / 2
        chunk = pol.predict_chunk([synthetic_rgb(0), synthetic_rgb(1)], "pick up the red cup", proprio=mid,
                                  unnorm_key=sorted(pol.config.norm_stats)[0])
        assert chunk.actions.shape == (8, 7) and np.isfinite(chunk.actions).all() and chunk.used_proprio
        assert pol.describe()["action_head"] == "l1_regression"
    finally:
        pol.close()


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch '0': use batch sizes 1..64"),
    (["--batch", "1,x"], "--batch '1,x'"),
    (["--batch", "65"], "--batch '65'"),
    (["--batch", ""], "--batch ''"),
    (["--batch", "2", "--oft"], "--batch and --oft are separate benchmarks"),
    (["--batch", "2", "--draft", "0"], "--draft times the stage table's speculative paths"),
    (["--oft", "--report", "ops"], "--report ops needs --backend ttnn"),  # --oft --backend ttnn: test_ttnn_op_report
])
def test_bench_batch_and_oft_refuse_bad_options_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("MESH_DEVICE", raising=False)
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_bench_oft_refuses_a_plain_checkpoint(tiny_weights, capsys):
    assert bench.main(["--oft", "--weights", str(tiny_weights), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an OpenVLA-OFT checkpoint" in err[0], err


def test_bench_report_ops_with_batch_is_one_mode(capsys, monkeypatch):
    """--batch with --report ops is the op report's "Several robots" rows, not a second benchmark: without
    --backend ttnn the one error is the op report's (the forwarding itself: test_ttnn_op_report)."""
    monkeypatch.delenv("MESH_DEVICE", raising=False)
    assert bench.main(["--report", "ops", "--batch", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report ops needs --backend ttnn" in err[0], err
