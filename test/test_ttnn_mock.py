"""TT-NN backend on MOCK Wormhole meshes (no card): ttnn itself validates every op.

A mock cluster (test/ttnn_mock/*_cluster_desc.yaml: one N300 = 1x2, one T3K = 1x8) and our
stand-in SFPI compiler (test/ttnn_mock/riscv-tt-elf-g++, needs Debian's
binutils-riscv64-unknown-elf) let ttnn open the mesh and run the real model code. Mock chips
compute nothing (they read back zeros), but shapes, tile layouts, shard specs, memory configs,
L1 budgets and the collectives are checked by ttnn exactly as on a card. The model runs at the
real OpenVLA-7B widths (DINOv2 ViT-L, SigLIP So400m with head dim 72, Llama-2-7B with 32 heads,
vocab 32064) with 1 decoder layer and 3 blocks per tower to keep CI short.

Each run is a subprocess under a timeout (a malformed kernel ELF can hang tt-metal), with a
private runtime root and JIT cache: nothing of a real card's installation is touched.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ttnn_mock.mock_env import missing_prerequisites, mock_environment  # noqa: E402

_why = missing_prerequisites()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"mock TT-NN devices unavailable: {_why}")

TIMEOUT_S = 300


def _run(args, mesh, tmp_path):
    env = mock_environment(mesh, tmp_path)
    try:
        return subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mock run timed out after {TIMEOUT_S} s:\n{(e.stderr or '')[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("mesh,decode_matmul", [("N300", "dram_sharded"), ("T3K", "interleaved")])
def test_mock_mesh_runs_the_full_width_model_end_to_end(mesh, decode_matmul, tmp_path):
    """Both decode-matmul layouts are validated: DRAM-sharded (the profiles' default) on the
    N300, interleaved (the fallback) on the T3K; the golden tests cover both on both meshes."""
    out = tmp_path / "result.json"
    proc = _run([str(HERE / "ttnn_mock" / "run_mock_model.py"), mesh, "--llm-layers", "1", "--vision-depth", "3",
                 "--prompt-tokens", "22", "45", "--decode-matmul", decode_matmul, "--out", str(out),
                 "--work", str(tmp_path)], mesh, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["describe"]["device"].startswith(mesh)
    assert result["describe"]["decode_matmul"] == decode_matmul
    assert [c["prompt_tokens"] for c in result["calls"]] == [22, 45]
    for call in result["calls"]:  # prefills of 288 and 320 rows; the second reuses the KV cache
        assert len(call["tokens"]) == 7
        assert set(call["timings_ms"]) == {"vision", "projector", "prefill", "decode"}
    assert result["stage_keys"] == ["decoder_layer0", "dinov2", "prefill_logits", "projector", "siglip", "vision"]


@pytest.mark.slow
def test_mock_bad_input_errors_close_the_mesh_and_weight_cache_round_trips(tmp_path):
    proc = _run([str(HERE / "ttnn_mock" / "run_mock_errors.py"), str(tmp_path)], "N300", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["auto"] == ["N300", 2]
    assert "T3K needs 8 Tenstorrent chips, 2 found" in r["t3k_on_n300"]
    assert "lm_head.weight missing" in r["bad_weights"]
    assert "device failed during decode" in r["mid_run"] and "mesh closed" in r["mid_run"]
    assert r["closed_after_failure"] is True
    assert "failed earlier" in r["after_failure"]
    assert r["reopen"] == "N300"
    cache = r["cache"]
    assert cache["misses"] == 3 and cache["hits"] == 3 and cache["made"] == 3, cache
    assert cache["files"] == ["test.linear_dtype_BFLOAT16_layout_TILE.tensorbin",
                              "test.replicated_dtype_BFLOAT16_layout_TILE.tensorbin",
                              "test.sharded_dtype_BFLOAT8_B_layout_TILE.tensorbin"], cache
    assert cache["shapes"] == [[64, 128], [64, 64], [1, 1, 1, 64]], cache
    assert "WIDTH_SHARDED" in cache["linear_layout"], cache
