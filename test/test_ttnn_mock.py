"""TT-NN backend on MOCK Wormhole meshes (no card): ttnn itself validates every op.

A mock cluster (test/ttnn_mock/*_cluster_desc.yaml: one N300 = 1x2, one T3K = 1x8) and our
stand-in SFPI compiler (test/ttnn_mock/riscv-tt-elf-g++, with ziglang from the venv or Debian's
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

TIMEOUT_S = 600  # the full-size N300 run converts 7.5 B (zero) weights: ~3 min on 2 cores


def _run(args, mesh, tmp_path):
    env = mock_environment(mesh, tmp_path)
    try:
        return subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mock run timed out after {TIMEOUT_S} s:\n{(e.stderr or '')[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("mesh,decode_matmul,llm_layers,vision_depth", [
    ("N300", "dram_sharded", 32, 0),  # the whole OpenVLA-7B: 32 layers, 24 + 27 vision blocks
    ("T3K", "interleaved", 1, 3)])
def test_mock_mesh_runs_the_model_end_to_end(mesh, decode_matmul, llm_layers, vision_depth, tmp_path):
    """N300: the complete 7B architecture with the profiles' default DRAM-sharded decode matmuls;
    the mock allocator has the real DRAM banks, so this also proves the model, its KV cache and
    the activations fit an N300 (the headroom left is printed). T3K (8x the DRAM per weight):
    1 layer, 3 blocks per tower, the interleaved fallback. The golden tests cover both layouts
    on both meshes."""
    out = tmp_path / "result.json"
    proc = _run([str(HERE / "ttnn_mock" / "run_mock_model.py"), mesh, "--llm-layers", str(llm_layers),
                 "--vision-depth", str(vision_depth), "--prompt-tokens", "22", "45", "--decode-matmul",
                 decode_matmul, "--out", str(out), "--work", str(tmp_path)], mesh, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["describe"]["device"].startswith(mesh)
    assert result["describe"]["decode_matmul"] == decode_matmul
    assert [c["prompt_tokens"] for c in result["calls"]] == [22, 45]
    for call in result["calls"]:  # prefills of 288 and 320 rows; the second reuses the KV cache
        assert len(call["tokens"]) == 7
        assert set(call["timings_ms"]) == {"vision", "projector", "prefill", "decode"}
    assert result["stage_keys"] == ["decoder_layer0", "dinov2", "prefill_logits", "projector", "siglip", "vision"]
    print(f"\n{mesh} ({llm_layers} layers) on mock: load {result['load_s']:.0f} s, DRAM left per chip "
          f"{result['dram_headroom_gb_per_chip']:.2f} GB")
    assert result["dram_headroom_gb_per_chip"] >= 0.5


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
    # an explicit cache_dir is a root: keyed below by the checkpoint fingerprint and the profile
    assert len(cache["dir"]) == 2 and cache["dir"][1].startswith("N300-"), cache
    assert cache["files"] == ["test.linear_dtype_BFLOAT16_layout_TILE.tensorbin",
                              "test.replicated_dtype_BFLOAT16_layout_TILE.tensorbin",
                              "test.sharded_dtype_BFLOAT8_B_layout_TILE.tensorbin"], cache
    assert cache["shapes"] == [[64, 128], [64, 64], [1, 1, 1, 64]], cache
    assert "WIDTH_SHARDED" in cache["linear_layout"], cache
