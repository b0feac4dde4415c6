#!/usr/bin/env python3
"""Where the fast path's decode time goes (CUDA only; run by scripts/gpu_check.sh).

Prints: the card's device-to-device copy bandwidth (the memory floor's denominator), the time
of each decode-step matrix product alone (replayed as a CUDA graph) against its bytes, and a
torch.profiler kernel table of whole actions on the full-size random model.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def graph_time_ms(fn, reps: int = 50) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return float(np.median(times))


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile")
        return 0
    from openvla_model.backends.torch_backend import TorchBackend
    from openvla_model.backends.torch_cuda import FastTorchBackend
    from openvla_model.config import load_config
    from openvla_model.full_config import RandomCheckpoint, write_full_config
    from openvla_model.preprocess import Preprocessor
    from openvla_model.prompt import PromptTokenizer
    from openvla_model.synthetic import synthetic_rgb

    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    # 1. copy bandwidth (bytes read + written), 4 GiB buffers of random data
    src = torch.randn(1 << 30, device=dev)
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda: dst.copy_(src), reps=5)
    bw = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9  # GB/s
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)")
    del src, dst
    # 2. the decode step's matrix products alone (one token, bf16)
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    xi = torch.randn(1, 11008, device=dev, dtype=torch.bfloat16)
    total_ms, total_bytes = 0.0, 0
    for name, (n, k), count in (("qkv", (12288, 4096), 32), ("o", (4096, 4096), 32), ("gate_up", (22016, 4096), 32),
                                ("down", (4096, 11008), 32), ("lm_head", (32064, 4096), 1)):
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(4)]  # rotate: no L2 reuse
        inp = x if k == 4096 else xi
        ms = graph_time_ms(lambda: [F.linear(inp, w) for w in ws], reps=10) / 4
        nbytes = n * k * 2
        print(f"  gemv {name:8s} {n}x{k}: {ms * 1e3:7.1f} us, {nbytes / (ms * 1e-3) / 1e9:6.0f} GB/s  (x{count} per step)")
        total_ms += ms * count
        total_bytes += nbytes * count
        del ws
    print(f"matrix products of one decode step: {total_ms:.2f} ms for {total_bytes / 1e9:.2f} GB "
          f"(floor at the copy bandwidth: {total_bytes / (bw * 1e9) * 1e3:.2f} ms)")  # bw in GB/s
    # 3. decode attention variants: 1 query over a 304-slot cache with an additive mask, x32 layers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 32, 1, 128, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(1, 32, 384, 128, device=dev, dtype=torch.bfloat16)[:, :, :304]
    vc = torch.randn(1, 32, 384, 128, device=dev, dtype=torch.bfloat16)[:, :, :304]
    mask = torch.zeros(1, 1, 1, 304, device=dev, dtype=torch.bfloat16)
    mask[..., 290:] = float("-inf")

    def manual():
        w = (q @ kc.transpose(-1, -2)) * 128 ** -0.5 + mask
        return w.softmax(-1, dtype=torch.float32).to(q.dtype) @ vc

    variants = {"sdpa default": lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)}
    for name, be in (("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("math", SDPBackend.MATH)):
        def run(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        variants[f"sdpa {name}"] = run
    variants["manual matmul+softmax"] = manual
    ref_out = manual().float()
    for name, fn in variants.items():
        try:
            err = (fn().float() - ref_out).abs().max().item()
            ms = graph_time_ms(lambda: [fn() for _ in range(32)], reps=5)
            print(f"  decode attention {name:22s}: {ms * 1e3 / 32:6.1f} us per layer (max diff {err:.3g})")
        except Exception as e:
            print(f"  decode attention {name:22s}: failed ({str(e).splitlines()[0][:100]})")
    torch.cuda.empty_cache()
    # 4. kernel table of whole actions
    d = write_full_config(Path(tempfile.mkdtemp()) / "full")
    config = load_config(d)
    ref = TorchBackend(config, RandomCheckpoint(0), device="cuda", dtype=torch.bfloat16)
    fast = FastTorchBackend(config, reference=ref)
    ids = PromptTokenizer(d).encode_prompt("pick up the red cup")
    px = Preprocessor(config, device="cuda")(synthetic_rgb(0))
    for _ in range(3):
        fast.generate(px, ids, 7)
    print("stage ms:", {k: round(v, 3) for k, v in fast.generate(px, ids, 7)[1].items()},
          "decode steps:", [round(v, 3) for v in fast.last_decode_steps_ms])
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fast.generate(px, ids, 7)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"{len(events)} distinct CUDA kernels; per action (3 profiled):")
    key = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    for e in events[:30]:
        print(f"  {getattr(e, key) / 3 / 1e3:8.3f} ms  {e.count // 3:5d} x  {e.key[:110]}")
    fast.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
