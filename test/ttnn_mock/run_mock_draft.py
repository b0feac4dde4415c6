"""Run the TT-NN backend on a MOCK mesh with draft rows (speculative action decoding).

    python test/ttnn_mock/run_mock_draft.py N300 --out result.json --work DIR [--llm-layers L --vision-depth D]

Run by test_ttnn_draft.py in a subprocess with mock_env's environment. Default: the full-size
OpenVLA-7B (32 decoder layers, the real 24 / 27-block towers) with the profile's DRAM-sharded
decode. The weights are allocated with their real per-chip specs, not converted
(op_report.allocate_instead_of_convert: mock chips hold no data either way), so the run takes
the ops' validation time only. Calls: a plain action, then drafted ones. Mock chips read back
zeros, so every predicted token is 0 and a draft of zeros is accepted up to its first non-zero
id: the drafts below give k = 6, 3, 0, 6 exactly, and the prompts of 22 and 27 tokens put the 6
draft rows inside the 288-row prefill and across into the 320-row one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from openvla_model.backends.ttnn.op_report import MetaCheckpoint, allocate_instead_of_convert, write_config

D = 6
CALLS = [(22, None), (22, [0] * D), (22, [0, 0, 0, 1, 1, 1]), (27, [1] * D), (27, [0] * D)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mesh", choices=["N300", "T3K"])
    p.add_argument("--llm-layers", type=int, default=32)
    p.add_argument("--vision-depth", type=int, default=0, help="blocks per tower; 0 = the real 24 / 27")
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args(argv)

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.config import load_config

    work = Path(args.work)
    config = load_config(write_config(work / "weights", args.llm_layers, args.vision_depth or None))
    t0 = time.perf_counter()
    with allocate_instead_of_convert({}):
        backend = TtnnBackend(config, MetaCheckpoint(), mesh_device=args.mesh, cache_dir=None, trace=False)
    result = {"mesh": args.mesh, "load_s": time.perf_counter() - t0, "llm_layers": len(backend.llm.layers),
              "vision_depth": args.vision_depth}
    try:
        rows = []
        prefill_layers = backend.llm.prefill_layers

        def record_rows(x, count=None, **kw):
            rows.append(int(x.shape[2]))
            return prefill_layers(x, count, **kw)
        backend.llm.prefill_layers = record_rows
        pixels = torch.randn(1, 6, 224, 224, generator=torch.Generator().manual_seed(0))
        calls = []
        for n, draft in CALLS:
            ids = np.array([1] + [100 + i for i in range(n - 2)] + [29871], np.int64)
            t = time.perf_counter()
            tokens, timings = backend.generate(pixels, ids, D + 1, draft=draft)
            calls.append({"prompt_tokens": n, "draft": draft, "tokens": tokens.tolist(), "timings_ms": timings,
                          "accepted": None if draft is None else backend.last_accepted,
                          "decode_steps": backend.last_decode_steps, "prefill_rows": rows[-1],
                          "wall_s": time.perf_counter() - t})
            print(json.dumps(calls[-1]), flush=True)
        result["calls"] = calls
        result["ok"] = True
    finally:
        backend.close()
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
