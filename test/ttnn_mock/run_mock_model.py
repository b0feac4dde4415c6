"""Run the real TT-NN backend on a MOCK mesh at full OpenVLA-7B widths (all depths, or fewer).

    python test/ttnn_mock/run_mock_model.py N300 --llm-layers 32 --vision-depth 0 [--batch 4] --out result.json --work DIR

Run by test_ttnn_mock.py in a subprocess (with mock_env's environment, under a timeout): every op
of vision, projector, prefill and decode goes through ttnn's real validation (shapes, tiling,
sharding, memory configs, collectives, L1 budgets, DRAM capacity) on mock Wormhole chips. Mock
devices read back zeros, so the tokens are meaningless; the widths, head counts and vocabulary
are the real ones, the depths are the real ones or reduced by the flags (weights are zeros: no
15 GB checkpoint needed). The profile is config/ttnn/<MESH>.yaml unless --decode-matmul /
--decode-graph override it (the fallbacks of docs/ttnn.md). The decode trace is off
(trace=False): on mock devices trace capture dies with SIGSEGV (docs/ttnn.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from openvla_model.backends.ttnn.op_report import MetaCheckpoint

ROOT = Path(__file__).resolve().parents[2]


def write_full_width_config(out: Path, llm_layers: int, vision_depth: int | None) -> Path:
    """config.json of OpenVLA-7B (real widths: DINOv2 ViT-L, SigLIP So400m, Llama-2-7B) with
    `llm_layers` decoder layers and `vision_depth` blocks per tower (None: the real 24 / 27)."""
    from openvla_model.config import TIMM_KWARGS_FIELD
    from openvla_model.tiny_checkpoint import tiny_config_json

    cfg = tiny_config_json()
    cfg[TIMM_KWARGS_FIELD] = [{"depth": vision_depth}, {"depth": vision_depth}] if vision_depth else [{}, {}]
    cfg["text_config"] = {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": llm_layers,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 32064, "pad_token_id": 32000,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    cfg.pop("openvla_ros_tiny_random", None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


class ZeroCheckpoint(MetaCheckpoint):
    """Duck-types Checkpoint: every expected tensor, all zeros (mock devices ignore values)."""

    fingerprint = "zeros"  # names the content, so the weight cache can key it

    def load(self, keys, dtype=None, device="cpu"):
        for k in keys:
            yield k, torch.zeros(self.shapes[k], dtype=torch.bfloat16)


def dram_headroom_gb(ttnn, device, chunk_mb: int = 256) -> float:
    """Free DRAM per chip: allocate chunks (no data moves) until the allocator refuses. Mock
    chips have the real Wormhole DRAM banks, so this is the headroom a card would have."""
    rows = chunk_mb * 1024 * 1024 // (2 * 4096)
    held = []
    try:
        while len(held) < 1000:
            held.append(ttnn.empty([1, 1, rows, 4096], ttnn.bfloat16, ttnn.TILE_LAYOUT, device, ttnn.DRAM_MEMORY_CONFIG))
    except RuntimeError:
        pass
    for t in held:
        ttnn.deallocate(t)
    return len(held) * chunk_mb / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mesh", choices=["N300", "T3K"])
    p.add_argument("--llm-layers", type=int, default=1)
    p.add_argument("--vision-depth", type=int, default=3, help="blocks per tower; 0 = the real 24 / 27")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[22, 45],
                   help="prompt length of each generate() call (the KV cache is reused); 22 and 45 give "
                        "prefills of 288 and 320 rows")
    p.add_argument("--decode-matmul", default=None, choices=["interleaved", "dram_sharded"],
                   help="override the profile's decode_matmul")
    p.add_argument("--decode-graph", default=None, choices=["fused", "legacy"],
                   help="override the profile's decode_graph")
    p.add_argument("--batch", type=int, default=0,
                   help="then one generate_batch of this many items (robots served together; prompt lengths "
                        "cycle through --prompt-tokens, each item its own image); 0: none")
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args(argv)

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.config import load_config

    work = Path(args.work)
    config = load_config(write_full_width_config(work / "weights", args.llm_layers, args.vision_depth or None))
    overrides = {k: v for k, v in (("decode_matmul", args.decode_matmul), ("decode_graph", args.decode_graph)) if v}
    result = {"mesh": args.mesh, "llm_layers": args.llm_layers, "vision_depth": args.vision_depth,
              "overrides": overrides}
    t0 = time.perf_counter()
    backend = TtnnBackend(config, ZeroCheckpoint(), mesh_device=args.mesh, cache_dir=None, trace=False,
                          profile_overrides=overrides or None)
    result["load_s"] = time.perf_counter() - t0
    try:
        result["describe"] = backend.describe()
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(1, 6, 224, 224, generator=gen)
        calls = []
        for n in args.prompt_tokens:
            ids = np.array([1] + [100 + i for i in range(n - 2)] + [29871], np.int64)
            t = time.perf_counter()
            tokens, timings = backend.generate(pixels, ids, 7)
            calls.append({"prompt_tokens": n, "tokens": tokens.tolist(), "timings_ms": timings,
                          "wall_s": time.perf_counter() - t})
        result["calls"] = calls
        if args.batch:
            lens = [args.prompt_tokens[i % len(args.prompt_tokens)] for i in range(args.batch)]
            batch_ids = [np.array([1] + [100 + i for i in range(n - 2)] + [29871], np.int64) for n in lens]
            batch_px = torch.randn(args.batch, 6, 224, 224, generator=gen)
            t = time.perf_counter()
            tokens, accepted, timings = backend.generate_batch(batch_px, batch_ids, 7)
            result["batch_call"] = {"items": args.batch, "prompt_tokens": lens, "max_batch": backend.llm.batch,
                                    "tokens_shape": list(tokens.shape), "accepted": accepted.tolist(),
                                    "timings_ms": timings, "wall_s": time.perf_counter() - t}
        result["stage_keys"] = sorted(backend.stage_outputs(pixels, ids))
        import ttnn

        result["dram_headroom_gb_per_chip"] = dram_headroom_gb(ttnn, backend.mesh.device)
        result["ok"] = True
    finally:
        backend.close()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
