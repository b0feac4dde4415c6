"""Run the TT-NN OpenVLA-OFT pass (model/backends/ttnn/oft.py) on a MOCK mesh at full widths.

    python test/ttnn_mock/run_mock_oft.py N300 --llm-layers 1 --vision-depth 3 --out result.json --work DIR

Run by test_ttnn_oft.py::test_mock_n300_runs_the_oft_pass in a subprocess with mock_env's environment, under a
timeout. Every op of the OFT pass (vision per image, projector over all patches, the proprio
projector, the sequence assembly, the BIDIRECTIONAL prefill with its padding mask, the action-row
slice + final norm, the L1 head on the device with its column-sharded fc1 + all-gather, and the
discrete fallback's LM head + per-row argmax) goes through ttnn's real validation (shapes, tiles,
memory configs, L1 budgets, collectives) on mock Wormhole chips. The LLM / vision weights are the
OpenVLA-7B shapes (zeros, as run_mock_model.py), the head and proprio projector LIBERO's at width
4096 (8 x 7 actions, 8 proprio values); mock devices read back zeros, so the numbers are meaningless.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_mock_model import ZeroCheckpoint, dram_headroom_gb, write_full_width_config  # noqa: E402


def zero_module(cls, *args, **kwargs):
    """A module built without its random initialisation (meta), then zeros on the host."""
    with torch.device("meta"):
        m = cls(*args, **kwargs)
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mesh", choices=["N300", "T3K"])
    p.add_argument("--llm-layers", type=int, default=1)
    p.add_argument("--vision-depth", type=int, default=3, help="blocks per tower; 0 = the real 24 / 27")
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args(argv)

    from openvla_model.action_codec import ActionCodec
    from openvla_model.backends.ttnn.oft import TtnnOFTModel
    from openvla_model.config import load_config
    from openvla_model.oft import BOUNDS_Q99, L1RegressionActionHead, OFTSpec, ProprioProjector

    work = Path(args.work)
    config = load_config(write_full_width_config(work / "weights", args.llm_layers, args.vision_depth or None))
    hidden = int(config.llm.hidden_size)
    spec = OFTSpec(num_actions_chunk=8, action_dim=7, proprio_dim=8, normalization=BOUNDS_Q99, num_images_in_input=2,
                   source="mock (LIBERO)")
    head = zero_module(L1RegressionActionHead, hidden, hidden, spec.action_dim)
    proj = zero_module(ProprioProjector, spec.proprio_dim, hidden)
    codec = ActionCodec(config.norm_stats, vocab_size=config.action_vocab_size, n_bins=config.n_action_bins)
    result = {"mesh": args.mesh, "llm_layers": args.llm_layers, "vision_depth": args.vision_depth}
    t0 = time.perf_counter()
    model = TtnnOFTModel(config, ZeroCheckpoint(), spec, head, proj, codec, mesh_device=args.mesh, cache_dir=None)
    del head, proj
    result["load_s"] = time.perf_counter() - t0
    try:
        result["describe"] = model.describe()
        gen = torch.Generator().manual_seed(0)
        calls = []
        # (images, prompt tokens): sequences of 592 -> 608 rows and 359 -> 384 rows (both padded:
        # the mask path), then the discrete fallback (LM head on the 56 rows, argmax per row).
        for n_img, n_prompt, head_on in ((2, 22, True), (1, 45, True), (2, 22, False)):
            ids = np.array([1] + [100 + i for i in range(n_prompt - 2)] + [29871], np.int64)
            pixels = torch.randn(n_img, 6, 224, 224, generator=gen)
            saved = model.head
            if not head_on:
                model.head = None
            t = time.perf_counter()
            try:
                out = model.run(pixels, ids, np.zeros(spec.proprio_dim))
            finally:
                model.head = saved
            calls.append({"images": n_img, "prompt_tokens": n_prompt, "head": "device" if head_on else "discrete",
                          "length": out.layout.length, "normalized_shape": list(out.normalized.shape),
                          "tokens": None if out.tokens is None else out.tokens.reshape(-1).tolist()[:8],
                          "timings_ms": out.timings_ms, "wall_s": time.perf_counter() - t})
            print(json.dumps(calls[-1]), flush=True)
        result["calls"] = calls
        import ttnn

        result["dram_headroom_gb_per_chip"] = dram_headroom_gb(ttnn, model.backend.mesh.device)
        result["ok"] = True
    finally:
        model.close()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
