"""TT-NN op and byte report: the backend's REAL op graph counted on a mock mesh, and a cost model.

    python -m openvla_model.backends.ttnn.op_report --mesh-device N300      # or T3K
    (also `openvla-bench --backend ttnn --mesh-device N300 --report ops [--oft] [--batch 1,2,4]`)

What it does
1. Opens a MOCK Wormhole mesh (N300 = 1x2, T3K = 1x8; test/ttnn_mock/: cluster descriptor +
   stand-in SFPI compiler) in a subprocess, unless this process already runs on one.
2. Builds `TtnnBackend` at the full OpenVLA-7B sizes (or a reduced depth, see below). The
   weights are ALLOCATED, not converted: `WeightStore.put` is replaced, for this run only, by
   `ttnn.empty` with the per-chip shape, dtype, layout and memory config the store would give
   the tensor (mock chips hold no data anyway; converting 7.5 B zeros takes minutes). Every op
   of vision, projector, prefill and decode is the production code, unchanged.
3. Runs one `generate()` (7 tokens) under `ttnn.graph` capture, on the timed path (no
   synchronize_device between stages; the decode steps with device-side feedback, exactly the op
   sequence the backend captures as one trace per action: mock devices cannot capture traces,
   so it runs untraced). Stage and decoder-layer boundaries are marked with
   `ttnn.graph.track_function_start/end` scopes around the backend's own methods, so every
   `*DeviceOperation` node of the call trace is attributed to a stage (vision, projector,
   prefill, decode step k, tokens: the final gather and read) and, in the LM, to a decoder layer.
4. Counts per stage: device ops, ops per decoder layer, collective launches (reduce-scatter /
   all-gather / all-reduce device ops), weight and KV-cache bytes read per chip (input tensors
   of each device op whose DRAM buffer is a weight or a KV cache; SDPA decode reads each row at
   its own position: a row holding an item rows 0..p of its slot, an idle row of the max_batch
   (position 0..5 of its own slot) one 32-row chunk; the rows holding items and their starts are
   the positions the backend writes, recorded from llm.set_decode_start: kv_read_fraction),
   host<->device transfers (Tensor::to_device from a host tensor,
   copy_host_to_device_tensor, Tensor::cpu; uploads made INSIDE a device op, e.g. reshape's
   index table, are listed apart) and the `synchronize_device` calls between stages; and the
   host transfers of the whole action (all stages, all decode steps).
5. Models the time of each stage with COST_MODEL (below) and prints a table plus the line
   `decode ops per decoder layer: N`.

Reduced depth: `--llm-layers L --vision-depth D` run L decoder layers and D-block towers at the
full widths; per-layer and per-block counts are measured (every layer / block is delimited in
the trace) and the full model is extrapolated EXPLICITLY: stage = fixed part + 32 x layer
(+ 23 / 26 x block for DINOv2 / SigLIP); the report says "extrapolated" when it did so.

OpenVLA-OFT (`--oft`, issue 15): capture_oft adds one chunk of TtnnOFTModel.run (LIBERO: 2 images,
proprio, 8 x 7 action rows; the bidirectional prefill; the L1 head on the device) in its own stages
oft_*, counted the same way, and the "OpenVLA-OFT chunk" section: modelled ms per chunk and per
executed action (chunk / T) beside the plain action (oft_model). Not run by default.

Several robots (issue 14; `--batch 1,2,4`, also `openvla-bench ... --report ops --batch 1,2,4`):
after the single actions (their records and tables unchanged), one `generate_batch` of B = 2 and
one of B = max_batch items (N300 4, T3K 8; prompts of mixed lengths, BATCH_PROMPT_OFFSETS) are
captured, each in its own graph capture, in stages batch_vision / batch_projector (one batched
pass), batch_prefill#i (item i's prefill into KV slot i), batch_start (the decode start positions,
written once), batch_decode#k (all max_batch rows at once), batch_tokens (one read). Each part is
summarised like an action (_summarise_batch: same cost model, same extrapolation) and
batch_model() gives per B the batch's wall time (= every robot's latency: all actions complete at
the end of the batch's decode), the aggregate actions/s and the ratios to batch 1; sizes not
captured are derived as batch_model() documents (vision interpolated, prefills per item, groups of
max_batch).

The cost model is arithmetic, not a measurement: see COST_MODEL and `calibration()`; a card's
profiler replaces it. Nothing here is imported by the backend itself.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
MOCK_DIR = REPO_ROOT / "test" / "ttnn_mock"
MESHES = {"N300": 2, "T3K": 8}
FULL_LLM_LAYERS = 32
DECODE_STEPS = 6  # tokens 2..7 of an action
# SDPA decode reads K/V in whole chunks; without a program config (attention.py passes none) the
# kernel sizes the chunk per position (ttnn 0.81.1 sdpa_decode kernels, get_dynamic_Sk_chunk_t: the
# position's tiles rounded up to a power of 2, at most 8): at positions 0..5 one 32-row tile, so an
# idle row reads its slot's chunk 0 of 32 rows (kv_read_fraction)
SDPA_DECODE_CHUNK_ROWS = 32
# "tokens": the action's tokens gathered on the device (1 op) and read back once, after the decode
STAGES = ("vision", "projector", "prefill", "decode", "tokens")
# Speculative action decoding: a second, drafted action is captured; its stage "draft_prefill" is
# the drafted prefill (6 draft rows, the LM head on 7 rows, their argmax), the one read of the 7 ids
# and the start token + position written back. On a mock (zeros read back) this draft is accepted
# up to its first non-zero id: k = 3, so the capture also runs 3 decode steps and the token read.
DRAFT_ON_MOCK = [0, 0, 0, 1, 1, 1]
DRAFT_ACCEPTED = (0, 3, 6)  # accepted counts modelled against the plain action (issue 13)
MARK = "openvla::"
# Several robots (issue 14): after the single actions, one generate_batch of B = 2 and one of
# B = max_batch items (N300 4, T3K 8) are captured, prompts of mixed lengths (the single action's
# prompt + these offsets, in turn: sequences in different 32-row prefill buckets). Stages:
# batch_vision, batch_projector (one batched pass), batch_prefill#i (item i's prefill into slot i:
# its ids + LM-head row written, its patches sliced, the prefill, its token 1), batch_start (the
# decode start positions of every row, written once), batch_decode#k, batch_tokens.
BATCH_PHASE = "batch_"
BATCH_PROMPT_OFFSETS = (0, 18, -8, 10)
BATCH_STAGES = ("vision", "projector", "decode", "tokens")

# ---- cost model --------------------------------------------------------------------------------
# One Wormhole chip (n300 has two, a T3K eight). Sources:
# - DRAM: 12 GDDR6 banks, 288 GB/s spec; tt-metal's tech report "Saturating DRAM bandwidth"
#   measures 240-260 GB/s for DRAM-sharded matmuls (each bank streamed by its nearest core).
#   DRAM-interleaved reads (plain ttnn.linear, other ops) are assumed at 180 GB/s (assumption).
# - Matrix engine: 8x16 x 16x16 per cycle = 2048 MAC / cycle / core at LoFi, 1 GHz; HiFi2 /
#   HiFi3 / HiFi4 take 2 / 3 / 4 passes (tt-metal docs, "Math fidelity"). A decode matmul has
#   one activation row, computed as a 32-row tile. DRAM-sharded decode matmuls compute on the
#   12 DRAM-reader cores; other matmuls on the 8x8 grid at 70 % utilisation (assumption).
# - Per-op cost under trace: a fitted constant (`calibration()`): tt_transformers' published
#   Llama-3.1-8B N300 performance-mode figure (44.2 tok/s/user) with its decode graph read from
#   tt/attention.py, mlp.py, decoder.py, ccl.py (24 device ops and 4 async CCLs per layer). The
#   constant covers dispatch plus the run time of the many small ops (norms, RoPE, heads, SDPA
#   decode, reshards) the byte and FLOP terms do not see. Checked on N300 accuracy mode and T3K.
# - Collective launch: 25 us fixed (small decode tensors; assumption within the 20-40 us of the
#   review) + payload over ethernet at 10 GB/s per chip (1 link of 100 Gb/s at ~80 %).
# - Host: a write 30 us, a blocking read 100 us (drains the queue), synchronize_device 50 us.
WORMHOLE = {
    "dram_spec_gbs": 288.0,
    "dram_sharded_gbs": 250.0, "dram_sharded_gbs_range": (240.0, 260.0),
    "dram_interleaved_gbs": 180.0,
    "clock_ghz": 1.0, "macs_per_cycle_lofi": 2048, "grid_cores": 64, "dram_reader_cores": 12,
    "matmul_utilisation": 0.7,
}
FIDELITY_PASSES = {"LoFi": 1, "HiFi2": 2, "HiFi3": 3, "HiFi4": 4}
COST_MODEL = {
    "collective_us": 25.0, "eth_gbs": 10.0,
    "host_write_us": 30.0, "host_read_us": 100.0, "sync_us": 50.0,
    # per_op_us: filled in by calibration() below (fitted, see there)
}
BYTES_PER_ELEMENT = {"BFLOAT16": 2.0, "FLOAT32": 4.0, "BFLOAT8_B": 1088 / 1024, "BFLOAT4_B": 576 / 1024,
                     "UINT32": 4.0, "INT32": 4.0, "UINT16": 2.0}

# tt_transformers' Llama-3.1-8B at batch 1 (models/tt_transformers/PERF.md): tok/s/user.
PUBLISHED = {("N300", "performance"): 44.2, ("N300", "accuracy"): 38.8, ("T3K", "performance"): 64.3}
LLAMA31_8B = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128, "ffn": 14336,
              "vocab": 128256}
# Decode graph per layer as tt_transformers builds it on a 1xN mesh (read in tt/decoder.py,
# attention.py forward_decode, mlp.py forward, ccl.py): all-gather of the fractured residual +
# sharded RMSNorm (x2), QKV matmul, sharded_to_interleaved, nlp_create_qkv_heads_decode, 2 RoPE,
# 2 paged_update_cache, SDPA decode, to_memory_config, nlp_concat_heads_decode, WO matmul,
# reduce_scatter_minimal_async, to_memory_config, residual add (x2), W1, W3, mul(+SiLU),
# to_memory_config, W2, reduce_scatter_minimal_async, to_memory_config.
# Counting conversions that are no-ops when the configs already match gives 24-27; with 27 the
# fitted per-op cost drops by ~1 us and the modelled OpenVLA figures change by a few percent.
TT_TRANSFORMERS_LAYER = {"ops": 24, "collectives": 4}
# embedding, final norm (+ gather), LM head (split in column chunks: matmul + reshard each, concat),
# its all-reduce, argmax: an estimate. LM-head weights BFP8 (the weight dtype tt_transformers passes
# to its LMHead), HiFi2.
TT_TRANSFORMERS_FIXED = {"ops": 8, "collectives": 1}
TT_TRANSFORMERS_HOST_PER_TOKEN_US = 300.0  # token read back + inputs written per step (generator.py)


def _gb(x: float) -> float:
    return x / 1e9


def matmul_us(m_rows: int, k: int, n: int, fidelity: str, cores: int, utilisation: float = 1.0) -> float:
    flops = 2.0 * math.ceil(m_rows / 32) * 32 * k * n
    per_core = WORMHOLE["macs_per_cycle_lofi"] * 2 * WORMHOLE["clock_ghz"] * 1e9 / FIDELITY_PASSES[fidelity]
    return flops / (cores * per_core * utilisation) * 1e6


def _llama_decode_step_us(mesh: str, mode: str, per_op_us: float) -> float:
    """Modelled time of one Llama-3.1-8B decode step as tt_transformers runs it."""
    n = MESHES[mesh]
    c = LLAMA31_8B
    attn_b = BYTES_PER_ELEMENT["BFLOAT8_B"]  # Llama 3: bfp8 attention in both modes (PERF.md)
    ffn_b = BYTES_PER_ELEMENT["BFLOAT4_B" if mode == "performance" else "BFLOAT8_B"]
    fid = "LoFi" if mode == "performance" else "HiFi2"
    qkv_n = (c["heads"] + 2 * c["kv_heads"]) * c["head_dim"] // n
    shapes = [(c["hidden"], qkv_n, attn_b, "HiFi2"), (c["hidden"] // n, c["hidden"], attn_b, "HiFi2"),
              (c["hidden"], c["ffn"] // n, ffn_b, fid), (c["hidden"], c["ffn"] // n, ffn_b, fid),
              (c["ffn"] // n, c["hidden"], ffn_b, fid)]
    bw = WORMHOLE["dram_sharded_gbs"] * 1e3  # bytes per us
    layer = 0.0
    for k, nn, b, f in shapes:
        layer += max(k * nn * b / bw, matmul_us(1, k, nn, f, WORMHOLE["dram_reader_cores"]))
    head = max(c["hidden"] * c["vocab"] // n * BYTES_PER_ELEMENT["BFLOAT8_B"] / bw,
               matmul_us(1, c["hidden"], c["vocab"] // n, "HiFi2", WORMHOLE["dram_reader_cores"]))
    ops = c["layers"] * TT_TRANSFORMERS_LAYER["ops"] + TT_TRANSFORMERS_FIXED["ops"]
    coll = c["layers"] * TT_TRANSFORMERS_LAYER["collectives"] + TT_TRANSFORMERS_FIXED["collectives"]
    return (c["layers"] * layer + head + ops * per_op_us + coll * COST_MODEL["collective_us"]
            + TT_TRANSFORMERS_HOST_PER_TOKEN_US)


def calibration() -> dict:
    """Fit per_op_us on tt_transformers' N300 performance-mode figure; report the model's error
    on the two other published figures (the same constant, nothing else changed)."""
    target_us = 1e6 / PUBLISHED[("N300", "performance")]
    base = _llama_decode_step_us("N300", "performance", 0.0)
    ops = LLAMA31_8B["layers"] * TT_TRANSFORMERS_LAYER["ops"] + TT_TRANSFORMERS_FIXED["ops"]
    per_op = (target_us - base) / ops
    rows = []
    for (mesh, mode), tps in PUBLISHED.items():
        us = _llama_decode_step_us(mesh, mode, per_op)
        rows.append({"mesh": mesh, "mode": mode, "published_tok_s": tps, "modelled_tok_s": round(1e6 / us, 1),
                     "error_pct": round((1e6 / us - tps) / tps * 100, 1),
                     "fitted": (mesh, mode) == ("N300", "performance")})
    return {"per_op_us": round(per_op, 2), "rows": rows}


CALIBRATION = calibration()
COST_MODEL["per_op_us"] = CALIBRATION["per_op_us"]


# ---- graph parsing -----------------------------------------------------------------------------
_SHAPE = re.compile(r"Shape\(\[([0-9, ]*)\]\)")
COLLECTIVE_WORDS = ("AllGather", "ReduceScatter", "AllReduce", "AllBroadcast")


def _shape(text) -> tuple:
    m = _SHAPE.search(str(text or ""))
    return tuple(int(x) for x in m.group(1).split(",") if x.strip()) if m else ()


def _dtype_name(text) -> str:
    return str(text or "").split("::")[-1]


def _tensor_bytes(shape: tuple, dtype: str, layout, size) -> float:
    """Bytes of one chip's tensor. The graph's `size` counts block-float tensors at one byte per
    element (bfloat8_b's shared exponents are missing): tiled tensors are recomputed here from
    whole 32x32 tiles (bf16 2048 B, bfloat8_b 1088 B, bfloat4_b 576 B per tile)."""
    if "TILE" in str(layout) and shape and dtype in BYTES_PER_ELEMENT:
        rows = shape[-2] if len(shape) > 1 else 1
        tiles = math.prod(shape[:-2]) * math.ceil(rows / 32) * math.ceil(shape[-1] / 32)
        return tiles * 1024 * BYTES_PER_ELEMENT[dtype]
    return float(size or 0)


@dataclass
class OpRecord:
    name: str
    stage: str
    step: int | None
    layer: int | None
    block: tuple | None
    inputs: list  # [(shape, dtype, bytes, buffer_type, address, memory_config)]
    output: tuple | None = None


@dataclass
class StageCounts:
    device_ops: int = 0
    by_op: Counter = field(default_factory=Counter)
    collectives: int = 0
    collective_bytes: float = 0.0
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    h2d: int = 0
    h2d_bytes: float = 0.0
    d2h: int = 0
    d2h_bytes: float = 0.0
    op_internal_uploads: int = 0
    syncs: int = 0
    modelled_us: float = 0.0
    time_parts: Counter = field(default_factory=Counter)


def parse_graph(graph: list) -> tuple[list, list]:
    """Captured graph -> (device-op records, host-transfer events). Scopes opened with
    track_function_start(MARK + 'stage=...' / 'layer=...' / 'block=...') attribute each op."""
    inputs_of: dict[int, list] = {}
    for i, node in enumerate(graph):
        if node.get("node_type") == "tensor":
            for c in node.get("connections") or []:
                inputs_of.setdefault(c, []).append(i)

    def tensor_info(i):
        p = graph[i].get("params") or {}
        shape, dtype = _shape(p.get("shape")), _dtype_name(p.get("dtype"))
        return (shape, dtype, _tensor_bytes(shape, dtype, p.get("layout"), p.get("size")), p.get("buffer_type"),
                p.get("address"), str(p.get("memory_config") or ""), p.get("storage_type"))

    ops, transfers, stack = [], [], []  # stack: is each open function a device op
    ctx = {"stage": None, "step": None, "layer": None, "block": None}
    ctx_stack = []
    for i, node in enumerate(graph):
        kind = node.get("node_type")
        name = (node.get("params") or {}).get("name", "")
        if kind == "function_start":
            ctx_stack.append(dict(ctx))
            if name.startswith(MARK):
                key, _, val = name[len(MARK):].partition("=")
                if key == "stage":
                    st, _, step = val.partition("#")
                    ctx["stage"], ctx["step"] = st, (int(step) if step else None)
                elif key == "layer":
                    ctx["layer"] = int(val)
                elif key == "block":
                    tower, _, b = val.partition(":")
                    ctx["block"] = (int(tower), int(b))
            in_device_op = any(stack)
            params = node.get("params") or {}
            is_device_op = name.endswith("DeviceOperation") or "program_cache_hit" in params
            if is_device_op and not in_device_op:
                ops.append(OpRecord(name, ctx["stage"], ctx["step"], ctx["layer"], ctx["block"],
                                    [tensor_info(t) for t in inputs_of.get(i, [])]))
            elif name in ("Tensor::to_device", "tt::tt_metal::copy_to_device", "Tensor::cpu"):
                ins = [tensor_info(t) for t in inputs_of.get(i, [])]
                if name == "Tensor::cpu":
                    transfers.append(("d2h", ctx["stage"], ctx["step"], sum(x[2] for x in ins), in_device_op))
                else:
                    host_in = [x for x in ins if x[6] == "HOST"]
                    if host_in:
                        transfers.append(("h2d", ctx["stage"], ctx["step"], sum(x[2] for x in host_in), in_device_op))
            stack.append(is_device_op)
        elif kind == "function_end":
            if stack:
                stack.pop()
            if ctx_stack:
                ctx = ctx_stack.pop()
    return ops, transfers


# ---- capture (runs on a mock mesh) ---------------------------------------------------------------
class MetaCheckpoint:
    """Duck-types Checkpoint with META tensors: the weight transforms run for their shapes only."""

    dir = None
    key_file: dict = {}
    fingerprint = None

    def __init__(self):
        self.shapes = {}

    def validate(self, expected):
        self.shapes = dict(expected)

    def keys(self):
        return list(self.shapes)

    def load(self, keys, dtype=None, device="cpu"):
        import torch

        for k in keys:
            yield k, torch.empty(self.shapes[k], dtype=torch.bfloat16, device="meta")


@contextlib.contextmanager
def allocate_instead_of_convert(registry: dict):
    """WeightStore.put -> ttnn.empty of the same per-chip spec; registry[(address)] = (name, bytes)."""
    from . import weights as wmod

    original = wmod.WeightStore.put

    def put(self, name, make, dtype, *, shard_dim=None, layout=None, memory_config=None):
        tt, mesh = self.tt, self.mesh.device
        layout = tt.TILE_LAYOUT if layout is None else layout
        memory_config = tt.DRAM_MEMORY_CONFIG if memory_config is None else memory_config
        shape = list(make().shape)
        if shard_dim is not None:
            shape[shard_dim] //= self.mesh.num_devices
        t = tt.empty(shape, dtype, layout, mesh, memory_config)
        dev0 = tt.get_device_tensors(t)[0]
        registry[str(dev0.buffer_address())] = name
        self.misses += 1
        return t

    wmod.WeightStore.put = put
    try:
        yield
    finally:
        wmod.WeightStore.put = original


def _scoped(tt, label, fn):
    """fn inside a graph scope named MARK + label (label: a string, or a function giving it at call time)."""
    def wrapper(*a, **k):
        tt.graph.track_function_start(MARK + (label() if callable(label) else label))
        try:
            return fn(*a, **k)
        finally:
            tt.graph.track_function_end()
    return wrapper


def write_config(out: Path, llm_layers: int, vision_depth: int | None) -> Path:
    from ...config import TIMM_KWARGS_FIELD
    from ...full_config import write_full_config

    write_full_config(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = int(llm_layers)
    if vision_depth:
        cfg[TIMM_KWARGS_FIELD] = [{"depth": int(vision_depth)}, {"depth": int(vision_depth)}]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def capture(mesh_name: str, llm_layers: int = FULL_LLM_LAYERS, vision_depth: int | None = None,
            prompt_tokens: int = 22, decode_matmul: str | None = None, work: str | Path | None = None,
            oft: bool = False) -> dict:
    """Run one generate() on the (mock) mesh under graph capture; returns the raw records.
    oft: also capture one OpenVLA-OFT chunk (capture_oft), its records appended (stages oft_*)."""
    import numpy as np
    import torch
    import ttnn

    from ...config import load_config
    from .backend import TtnnBackend

    work = Path(work or tempfile.mkdtemp(prefix="openvla_op_report_"))
    config = load_config(write_config(work / "config", llm_layers, vision_depth))
    registry: dict = {}
    overrides = {"decode_matmul": decode_matmul} if decode_matmul else None
    t0 = time.perf_counter()
    with allocate_instead_of_convert(registry):
        backend = TtnnBackend(config, MetaCheckpoint(), mesh_device=mesh_name, cache_dir=None, trace=False,
                              profile_overrides=overrides)
    load_s = time.perf_counter() - t0
    try:
        llm = backend.llm
        kv = {}
        for i, layer in enumerate(llm.layers):
            for which in ("k_cache", "v_cache"):
                t = getattr(layer.attention, which)
                kv[str(ttnn.get_device_tensors(t)[0].buffer_address())] = f"llm.{i}.{which}"
            layer.decode = _scoped(ttnn, f"layer={i}", layer.decode)
            layer.prefill = _scoped(ttnn, f"layer={i}", layer.prefill)
        block_counters = []
        for j, tower in enumerate([backend.vision]):  # one op sequence: the towers split over the chips
            counter = {"n": 0}
            block_counters.append(counter)

            def block_attention(x, blk, _orig=tower._attention, _j=j, _c=counter):
                # marks where block n's attention starts; one whole block = the ops from block
                # 0's attention start to block 1's (_vision_block_costs)
                ttnn.graph.track_function_start(MARK + f"block={_j}:{_c['n']}")
                try:
                    return _orig(x, blk)
                finally:
                    _c["n"] += 1
                    ttnn.graph.track_function_end()
            tower._attention = block_attention
        state = {"step": 0}
        # phase "": the plain action; "draft_": the drafted one (its stages are named draft_*; the
        # verification, from the drafted prefill to the start token written back, is draft_prefill)
        phase = {"p": "", "verify": False, "item": None}
        vision = backend.vision
        backend.vision = _scoped(ttnn, lambda: f"stage={phase['p']}vision", backend.vision)
        backend.projector = _scoped(ttnn, lambda: f"stage={phase['p']}projector", backend.projector)
        def prefill_label():
            if phase["p"] != BATCH_PHASE:
                return f"stage={phase['p']}prefill"
            # the batch: each item's prefill apart (#slot); the decode start positions of all rows
            # (written once after every prefill) as "batch_start"
            return "stage=batch_start" if phase["item"] is None else f"stage=batch_prefill#{phase['item']}"
        for name in ("embed_sequence", "set_decode_start", "prefill", "prefill_token", "draft_predictions",
                     "set_start_token"):
            setattr(llm, name, _scoped(ttnn, prefill_label, getattr(llm, name)))
        # the decode start positions the backend writes, per phase: the rows given hold an item
        # (their start = the slot's sequence length L + accepted drafts); the other rows of the
        # max_batch idle at position 0 of their own slot (llm.set_decode_start) -- the SDPA decode
        # KV term reads each row at its own position (kv_read_fraction)
        starts_of = {}
        scoped_start = llm.set_decode_start

        def set_decode_start(pos, _orig=scoped_start):
            starts_of[phase["p"]] = [int(v) for v in np.atleast_1d(np.asarray(pos, np.int64))]
            return _orig(pos)
        llm.set_decode_start = set_decode_start
        orig_item_prefill = backend._prefill

        def item_prefill(*a, slot=0, **k):
            phase["item"] = slot if phase["p"] == BATCH_PHASE else None
            try:
                return orig_item_prefill(*a, slot=slot, **k)
            finally:
                phase["item"] = None
        backend._prefill = item_prefill
        orig_step = llm.feedback_step

        def feedback_step(k):
            if not phase["p"]:
                state["step"] = k + 1
            elif phase["p"] == BATCH_PHASE:
                state["batch_steps"] = k + 1
            return _scoped(ttnn, f"stage={phase['p']}decode#{k + 1}", orig_step)(k)
        llm.feedback_step = feedback_step
        for name in ("gather_tokens", "read_tokens", "read_token_rows"):
            setattr(llm, name, _scoped(ttnn, lambda: "stage=draft_prefill" if phase["verify"]
                                       else f"stage={phase['p']}tokens", getattr(llm, name)))
        orig_verify = backend._verify_drafts

        def verify_drafts(*a, **k):
            phase["verify"] = True
            try:
                return orig_verify(*a, **k)
            finally:
                phase["verify"] = False
        backend._verify_drafts = _scoped(ttnn, "stage=draft_prefill", verify_drafts)
        syncs = Counter()
        orig_sync = backend._sync
        stage_of_sync = iter(["vision", "projector", "prefill"] + ["other"] * 100)

        def sync():
            syncs[next(stage_of_sync)] += 1
            return orig_sync()
        backend._sync = sync

        ids = np.array([1] + [100 + i for i in range(prompt_tokens - 2)] + [29871], np.int64)
        pixels = torch.zeros(1, 6, 224, 224)
        ttnn.graph.begin_graph_capture(ttnn.graph.RunMode.NORMAL)
        try:
            t1 = time.perf_counter()
            backend.generate(pixels, ids, 1 + DECODE_STEPS)
            gen_s = time.perf_counter() - t1
            # The drafted action (speculative decoding): mock chips read back zeros, so every
            # predicted id is 0 and this draft is accepted exactly up to its first non-zero id.
            phase["p"] = "draft_"
            backend.generate(pixels, ids, 1 + DECODE_STEPS, draft=DRAFT_ON_MOCK)
            drafted = {"draft": DRAFT_ON_MOCK, "accepted": backend.last_accepted,
                       "decode_steps": backend.last_decode_steps}
        finally:
            graph = ttnn.graph.end_graph_capture()
        ops, transfers = parse_graph(graph)
        length = llm.sequence_length(ids.size, vision.num_patches)
        # Several robots (issue 14), after the single actions (their records above are unchanged):
        # one generate_batch of B = 2 and of B = max_batch items, each under its own graph capture.
        phase["p"] = BATCH_PHASE
        batches = []
        fills = []  # (item whose prefill runs, KV-cache slot passed to ttnn.fill_cache), per call
        orig_fill = ttnn.fill_cache

        def fill_cache(cache, x, slot, *a, **k):
            fills.append((phase["item"], int(slot)))
            return orig_fill(cache, x, slot, *a, **k)
        ttnn.fill_cache = fill_cache
        try:
            for size in batch_capture_sizes(llm.batch):
                prompts = batch_prompt_tokens(prompt_tokens, size)
                items = [np.array([1] + [100 + i for i in range(n - 2)] + [29871], np.int64) for n in prompts]
                state["batch_steps"] = 0
                fills.clear()
                starts_of.pop(BATCH_PHASE, None)
                for counter in block_counters:  # the batch's vision blocks numbered from 0 (_vision_block_costs)
                    counter["n"] = 0
                ttnn.graph.begin_graph_capture(ttnn.graph.RunMode.NORMAL)
                try:
                    t2 = time.perf_counter()
                    tokens, _, _ = backend.generate_batch(torch.zeros(size, 6, 224, 224), items, 1 + DECODE_STEPS)
                    batch_s = time.perf_counter() - t2
                finally:
                    bgraph = ttnn.graph.end_graph_capture()
                b_ops, b_transfers = parse_graph(bgraph)
                batches.append({"size": size, "max_batch": llm.batch, "prompt_tokens": prompts,
                                "sequence_lengths": [llm.sequence_length(n, vision.num_patches) for n in prompts],
                                "tokens_shape": list(np.asarray(tokens).shape),
                                "decode_steps_run": state["batch_steps"],
                                "generate_s": round(batch_s, 1), "graph_nodes": len(bgraph),
                                "fill_cache_slots": [list(f) for f in fills],
                                "decode_starts": starts_of.get(BATCH_PHASE),
                                "ops": [o.__dict__ for o in b_ops], "transfers": b_transfers})
        finally:
            ttnn.fill_cache = orig_fill
        info = {
            "mesh": mesh_name, "num_devices": backend.mesh.num_devices, "llm_layers": len(llm.layers),
            "vision_blocks": [len(vision.blocks)],  # per chip: the deeper tower's blocks (vision.py)
            "vision_blocks_full": [max(_full_blocks(t, config.image_size) for t in config.towers)],
            "prompt_tokens": prompt_tokens, "sequence_length": length, "max_seq": llm.max_seq,
            "profile": {"dtypes": backend.profile.dtypes, "fidelity": backend.profile.fidelity,
                        "decode_matmul": backend.profile.decode_matmul, "source": backend.profile.source},
            "load_s": round(load_s, 1), "generate_s": round(gen_s, 1), "graph_nodes": len(graph),
            "syncs": dict(syncs), "decode_steps_run": state["step"], "drafted": drafted,
            "max_batch": llm.batch, "decode_starts": starts_of.get(""),
        }
    finally:
        backend.close()
    raw = {"info": info, "weights": registry, "kv": kv,
           "ops": [o.__dict__ for o in ops], "transfers": transfers, "batch": batches}
    if oft:
        o = capture_oft(mesh_name, config, prompt_tokens, decode_matmul)
        info["oft"] = o["info"]
        raw["weights"].update(o["weights"])
        raw["kv"].update(o["kv"])
        raw["ops"] += o["ops"]
        raw["transfers"] += o["transfers"]
    return raw


# OpenVLA-OFT, LIBERO configuration (issue 15): primary + wrist image, 8 proprio values, 8 x 7 chunk
OFT_LIBERO = {"num_images": 2, "proprio_dim": 8, "chunk": 8, "action_dim": 7}
OFT_STAGES = ("oft_vision", "oft_projector", "oft_proprio", "oft_prefill", "oft_head")


def capture_oft(mesh_name: str, config, prompt_tokens: int = 22, decode_matmul: str | None = None) -> dict:
    """One OpenVLA-OFT chunk (TtnnOFTModel.run, the production code) on the mock mesh under graph
    capture, LIBERO-shaped: 2 images, proprio, 8 x 7 action rows, the L1 head on the device. The
    backbone weights are allocated as in capture(); the head's and proprio projector's (built on
    the meta device) too, registered as weights "oft.head.*" / "oft.proprio.*". Steady state of the
    timed path: the BOS row and the padding mask of this sequence length are cached before the
    capture (the first chunk of a length uploads its mask once). Stages: oft_vision (per image),
    oft_projector, oft_proprio, oft_prefill (everything else of the pass: sequence assembly, the
    bidirectional prefill with its layers scoped, action-row slice + final norm), oft_head (the
    head and the one read of the chunk)."""
    import numpy as np
    import torch
    import ttnn

    from ...action_codec import ActionCodec
    from ...oft import BOUNDS_Q99, L1RegressionActionHead, OFTSpec, ProprioProjector
    from . import oft as oft_mod
    from .weights import round_up

    lib = OFT_LIBERO
    hidden = int(config.llm.hidden_size)
    spec = OFTSpec(num_actions_chunk=lib["chunk"], action_dim=lib["action_dim"], proprio_dim=lib["proprio_dim"],
                   normalization=BOUNDS_Q99, num_images_in_input=lib["num_images"], source="op report (LIBERO)")
    with torch.device("meta"):
        head = L1RegressionActionHead(hidden, hidden, spec.action_dim)
        proj = ProprioProjector(spec.proprio_dim, hidden)
    codec = ActionCodec(config.norm_stats, vocab_size=config.action_vocab_size, n_bins=config.n_action_bins)
    registry: dict = {}
    head_names = (["oft.head.ln1.w", "oft.head.ln1.b", "oft.head.fc1.w", "oft.head.fc1.b"]
                  + [f"oft.head.block{i}.{k}" for i in range(len(head.model.mlp_resnet_blocks))
                     for k in ("ln.w", "ln.b", "w", "b")]
                  + ["oft.head.ln2.w", "oft.head.ln2.b", "oft.head.fc2.w", "oft.head.fc2.b"])
    names = iter(head_names + [f"oft.proprio.{k}" for k in ("w1", "b1", "w2", "b2")])  # construction order
    orig_put = oft_mod._Put.__call__

    def put(self, t, dtype, shard_dim=None):  # allocate, do not convert (meta tensors: shapes only)
        shape = [1] * (4 - t.dim()) + list(t.shape)
        if shard_dim is not None:
            shape[shard_dim] //= self.mesh.num_devices
        out = ttnn.empty(shape, dtype, ttnn.TILE_LAYOUT, self.mesh.device, ttnn.DRAM_MEMORY_CONFIG)
        registry[str(ttnn.get_device_tensors(out)[0].buffer_address())] = next(names, "oft.other")
        return out

    overrides = {"decode_matmul": decode_matmul} if decode_matmul else None
    t0 = time.perf_counter()
    oft_mod._Put.__call__ = put
    try:
        with allocate_instead_of_convert(registry):
            model = oft_mod.TtnnOFTModel(config, MetaCheckpoint(), spec, head, proj, codec, mesh_device=mesh_name,
                                         cache_dir=None, profile_overrides=overrides)
    finally:
        oft_mod._Put.__call__ = orig_put
    load_s = time.perf_counter() - t0
    try:
        be, llm = model.backend, model.llm
        fc1_sharded = bool(model.head.fc1_sharded)
        kv = {}
        for i, layer in enumerate(llm.layers):
            for which in ("k_cache", "v_cache"):
                kv[str(ttnn.get_device_tensors(getattr(layer.attention, which))[0].buffer_address())] = \
                    f"oft.llm.{i}.{which}"
            layer.prefill = _scoped(ttnn, f"layer={i}", layer.prefill)
        be.vision = _scoped(ttnn, "stage=oft_vision", be.vision)
        be.projector = _scoped(ttnn, "stage=oft_projector", be.projector)
        model.proprio_projector = _scoped(ttnn, "stage=oft_proprio", model.proprio_projector)
        model.head = _scoped(ttnn, "stage=oft_head", model.head)
        model._chip0 = _scoped(ttnn, "stage=oft_head", model._chip0)
        ids = np.array([1] + [100 + i for i in range(prompt_tokens - 2)] + [29871], np.int64)
        layout = model.layout(ids.size, lib["num_images"], True)
        seq = round_up(layout.length, 32)
        model._bos_row(int(ids[0]))  # cached by the model after its first chunk
        model._mask(layout.length, seq)
        pixels = torch.zeros(lib["num_images"], 6, 224, 224)
        run = _scoped(ttnn, "stage=oft_prefill", model.run)  # the default stage of the pass's other ops
        ttnn.graph.begin_graph_capture(ttnn.graph.RunMode.NORMAL)
        try:
            t1 = time.perf_counter()
            out = run(pixels, ids, np.zeros(spec.proprio_dim, np.float32))
            run_s = time.perf_counter() - t1
        finally:
            graph = ttnn.graph.end_graph_capture()
        ops, transfers = parse_graph(graph)
        info = {"num_images": lib["num_images"], "proprio_dim": spec.proprio_dim, "chunk": spec.num_actions_chunk,
                "action_dim": spec.action_dim, "action_rows": spec.num_action_tokens, "prompt_tokens": prompt_tokens,
                "sequence_length": layout.length, "padded_length": seq, "max_seq": llm.max_seq,
                "llm_layers": len(llm.layers), "head_fc1_sharded": fc1_sharded,
                "load_s": round(load_s, 1), "run_s": round(run_s, 1), "graph_nodes": len(graph),
                "normalized_shape": list(np.asarray(out.normalized).shape)}
    finally:
        model.close()
    return {"info": info, "weights": registry, "kv": kv, "ops": [o.__dict__ for o in ops], "transfers": transfers}


def batch_capture_sizes(max_batch: int) -> list:
    """The batch sizes captured: 2 and max_batch (none above max_batch, none of 1: the single action)."""
    return sorted({b for b in (2, int(max_batch)) if 1 < b <= int(max_batch)})


def batch_prompt_tokens(prompt_tokens: int, size: int) -> list:
    """Prompt lengths (in tokens) of a captured batch's items: mixed, item 0 the single action's."""
    return [max(3, prompt_tokens + BATCH_PROMPT_OFFSETS[i % len(BATCH_PROMPT_OFFSETS)]) for i in range(size)]


def _full_blocks(tower_cfg, image_size: int) -> int:
    """Blocks the real (full-depth) tower runs: timm depth - 1 (the last block is skipped)."""
    import timm
    import torch

    kwargs = {k: v for k, v in (tower_cfg.kwargs or {}).items() if k != "depth"}
    with torch.device("meta"):
        vit = timm.create_model(tower_cfg.timm_id, pretrained=False, num_classes=0, img_size=image_size,
                                act_layer=tower_cfg.act_layer, **kwargs)
    return len(vit.blocks) - 1


# ---- counting and the model ---------------------------------------------------------------------
def _is_sdpa(op_name: str) -> bool:
    low = op_name.lower()
    return "sdpa" in low or "scaleddotproduct" in low


def _role(weight_name: str | None, op_name: str) -> str:
    if weight_name is None:
        return "sdpa" if _is_sdpa(op_name) else "other"
    if weight_name.startswith(("featurizer", "fused_featurizer")):
        return "vision"
    if weight_name.startswith(("projector", "oft.")):  # the OFT head / proprio projector: its compute config
        return "projector"
    if weight_name == "llm.lm_head":
        return "lm_head"
    leaf = weight_name.rsplit(".", 1)[-1]
    return {"wqkv": "qkv", "wo": "wo", "w1": "ffn", "w2": "ffn", "w3": "ffn"}.get(leaf, "other")


def _op_time_us(op: dict, weights: dict, kv: dict, fidelity: dict, stage: str, kv_fraction: float,
                n_dev: int) -> tuple[float, str, float, float, float]:
    """(modelled us, kind, weight bytes, kv bytes, collective bytes) of one device op."""
    name = op["name"]
    ins = op["inputs"]
    wbytes = kvbytes = cbytes = 0.0
    wname, dram_sharded = None, False
    act_dram = 0.0
    for shape, dtype, size, btype, addr, memcfg, _storage in ins:
        key = str(addr)
        if str(btype) == "0" and key in weights:
            wbytes += size
            wname = weights[key]
            dram_sharded = dram_sharded or "WIDTH_SHARDED" in memcfg
        elif str(btype) == "0" and key in kv:
            if _is_sdpa(name):  # decode SDPA reads rows 0..p only
                kvbytes += size * kv_fraction
        elif str(btype) == "0":
            act_dram += size
    if any(w in name for w in COLLECTIVE_WORDS):
        cbytes = sum(x[2] for x in ins)
        t = COST_MODEL["collective_us"] + cbytes * (n_dev - 1) / n_dev / (COST_MODEL["eth_gbs"] * 1e3)
        return t, "collective", wbytes, kvbytes, cbytes
    # The DRAM-sharded decode program (one tile row of activations, width-sharded in L1) streams
    # each bank from its nearest core; a DRAM-sharded weight in a many-row (prefill) matmul is
    # read by the 2D-multicast program over the whole grid instead.
    rows = ins[0][0][-2] if ins and len(ins[0][0]) >= 2 else 0
    dram_sharded = dram_sharded and rows <= 32
    bw = (WORMHOLE["dram_sharded_gbs"] if dram_sharded else WORMHOLE["dram_interleaved_gbs"]) * 1e3
    mem_us = (wbytes + kvbytes + act_dram) / bw
    comp_us = 0.0
    role = _role(wname, name)
    fid = fidelity.get(role, "HiFi4") if role != "other" else "HiFi4"
    if "Matmul" in name and len(ins) >= 2 and ins[0][0] and ins[1][0]:
        a, b = ins[0][0], ins[1][0]
        m, k, n = a[-2], a[-1], b[-1]
        batch = math.prod(a[:-2]) if len(a) > 2 else 1
        cores = WORMHOLE["dram_reader_cores"] if dram_sharded else WORMHOLE["grid_cores"]
        util = 1.0 if dram_sharded else WORMHOLE["matmul_utilisation"]
        comp_us = batch * matmul_us(m, k, n, fid, cores, util)
    elif _is_sdpa(name) and "decode" not in name.lower() and len(ins) >= 2 and ins[0][0]:
        q = ins[0][0]
        heads, s, d = q[-3], q[-2], q[-1]
        causal = 0.5 if stage == "prefill" else 1.0
        comp_us = causal * 2 * matmul_us(s, d, s, fidelity.get("sdpa", "HiFi4"), WORMHOLE["grid_cores"],
                                         WORMHOLE["matmul_utilisation"]) * heads
    kind = "memory" if mem_us >= comp_us else "compute"
    return max(mem_us, comp_us), kind, wbytes, kvbytes, cbytes


def kv_read_fraction(starts, max_batch: int, max_seq: int, steps: int = DECODE_STEPS) -> float:
    """Mean fraction of the KV cache (max_batch slots x max_seq rows) that SDPA decode reads per
    decode step, each row at its own position. `starts`: the decode start positions the backend
    wrote (llm.set_decode_start), one per row that holds an item; decode step k of such a row is at
    position start + k and reads its slot's rows 0..start + k (the rule of the single action since
    the first report: exact rows, no chunk rounding). The other rows idle at positions 0..steps - 1
    of their own slot: the kernel reads whole K/V chunks of SDPA_DECODE_CHUNK_ROWS rows, so an idle
    row reads its slot's chunk 0 and nothing more."""
    starts = [int(s) for s in starts]
    if not 0 < len(starts) <= max_batch:
        raise ValueError(f"decode starts {starts} for {max_batch} rows")
    idle = (max_batch - len(starts)) * SDPA_DECODE_CHUNK_ROWS
    rows = sum(sum(s + k + 1 for s in starts) + idle for k in range(steps)) / steps
    return rows / (max_batch * max_seq)


def summarise(raw: dict) -> dict:
    """Per-stage counts and modelled times from capture()'s records, extrapolated to the full
    depth when the capture ran a reduced one."""
    info, weights, kv = raw["info"], raw["weights"], raw["kv"]
    n_dev, fidelity = info["num_devices"], info["profile"]["fidelity"]
    steps = sorted({o["step"] for o in raw["ops"] if o["stage"] == "decode"})
    first_step = steps[0] if steps else None
    # mean KV rows read over the 6 decode steps, each row at its own position (the rows holding an
    # item at their starts' L..L+5, the idle rows one chunk), as a fraction of the whole cache;
    # records without the starts (made before max_batch rows): one row at the prompt's positions
    kv_fraction = kv_read_fraction(info.get("decode_starts") or [info["sequence_length"]],
                                   info.get("max_batch", 1), info["max_seq"])

    stages = {s: StageCounts() for s in STAGES + ("draft_prefill",) + OFT_STAGES}
    lm = ("prefill", "decode", "draft_prefill", "oft_prefill")
    per_layer = {s: Counter() for s in lm}  # layer -> ops
    per_layer_us = {s: Counter() for s in lm}
    per_layer_coll = {s: Counter() for s in lm}
    per_layer_bytes = {s: Counter() for s in lm}  # weights
    per_layer_kv = {s: Counter() for s in lm}
    per_layer_parts = {s: Counter() for s in lm}  # kind -> us, summed over layers
    draft_steps = sorted({o["step"] for o in raw["ops"] if o["stage"] == "draft_decode"})
    draft_decode_ops = Counter()  # device ops of the drafted action's first decode step, by op
    for o in raw["ops"]:
        st = o["stage"]
        if st == "draft_decode" and o["step"] == draft_steps[:1][0]:
            draft_decode_ops[o["name"]] += 1
        if st not in stages or (st == "decode" and o["step"] != first_step):
            continue
        us, kind, wb, kb, cb = _op_time_us(o, weights, kv, fidelity, st, kv_fraction, n_dev)
        us += COST_MODEL["per_op_us"]
        c = stages[st]
        c.device_ops += 1
        c.by_op[o["name"].replace("DeviceOperation", "")] += 1
        c.weight_bytes += wb
        c.kv_bytes += kb
        c.modelled_us += us
        c.time_parts[kind] += us - COST_MODEL["per_op_us"]
        c.time_parts["per-op"] += COST_MODEL["per_op_us"]
        if kind == "collective":
            c.collectives += 1
            c.collective_bytes += cb
        if st in per_layer and o["layer"] is not None:
            per_layer[st][o["layer"]] += 1
            per_layer_us[st][o["layer"]] += us
            per_layer_coll[st][o["layer"]] += kind == "collective"
            per_layer_bytes[st][o["layer"]] += wb
            per_layer_kv[st][o["layer"]] += kb
            per_layer_parts[st][kind] += us - COST_MODEL["per_op_us"]
            per_layer_parts[st]["per-op"] += COST_MODEL["per_op_us"]
    action_io = {"h2d": 0, "h2d_bytes": 0.0, "d2h": 0, "d2h_bytes": 0.0, "by_stage": Counter(),
                 "inside_ops": 0, "outside_stages": 0}
    for kind, st, step, nbytes, internal in raw["transfers"]:
        if st and st.startswith(("draft_", "oft_")):
            pass  # the drafted action / the OFT chunk: their own accounting (their stages below)
        elif internal:
            action_io["inside_ops"] += 1
        elif st not in stages:
            action_io["outside_stages"] += 1
        else:  # every stage and every decode step: the host traffic of one whole action
            action_io[kind] += 1
            action_io[kind + "_bytes"] += nbytes
            action_io["by_stage"][f"{kind} {st}"] += 1
        if st not in stages or (st == "decode" and step != first_step):
            continue
        c = stages[st]
        if internal:
            c.op_internal_uploads += 1
            continue
        if kind == "h2d":
            c.h2d += 1
            c.h2d_bytes += nbytes
            c.modelled_us += COST_MODEL["host_write_us"]
            c.time_parts["host"] += COST_MODEL["host_write_us"]
        else:
            c.d2h += 1
            c.d2h_bytes += nbytes
            c.modelled_us += COST_MODEL["host_read_us"]
            c.time_parts["host"] += COST_MODEL["host_read_us"]
    for st, n in info["syncs"].items():
        if st in stages:
            stages[st].syncs = n
            stages[st].modelled_us += n * COST_MODEL["sync_us"]
            stages[st].time_parts["host"] += n * COST_MODEL["sync_us"]

    # ---- extrapolation to the full depth -----------------------------------------------------
    notes = []
    if draft_decode_ops and sum(draft_decode_ops.values()) != stages["decode"].device_ops:
        notes.append(f"the drafted action's decode step has {sum(draft_decode_ops.values())} device ops, the plain "
                     f"one {stages['decode'].device_ops}: the speculative model assumes they are equal")
    layers_run = info["llm_layers"]
    scale = {}
    for st in ("prefill", "decode") + (("oft_prefill",) if "oft" in info else ()):
        counts = [per_layer[st][i] for i in range(layers_run)]
        if counts and len(set(counts)) != 1:
            notes.append(f"{st}: decoder layers differ in op count {counts}")
        scale[st] = counts
    if layers_run != FULL_LLM_LAYERS:
        extra = FULL_LLM_LAYERS - layers_run
        for st in lm:
            c = stages[st]
            mean = lambda ctr: sum(ctr.values()) / max(layers_run, 1)  # noqa: E731
            c.device_ops += round(extra * mean(per_layer[st]))
            c.collectives += round(extra * mean(per_layer_coll[st]))
            c.modelled_us += extra * mean(per_layer_us[st])
            for kind, us in per_layer_parts[st].items():
                c.time_parts[kind] += extra * us / layers_run
            # weights and KV read per layer scale with the layers (the LM head is in the fixed part)
            c.weight_bytes += extra * mean(per_layer_bytes[st])
            c.kv_bytes += extra * mean(per_layer_kv[st])
        notes.append(f"LM measured with {layers_run} decoder layer(s) and extrapolated to {FULL_LLM_LAYERS}: "
                     "stage = measured + (32 - L) x mean measured layer")
    if info["vision_blocks"] != info["vision_blocks_full"]:
        blocks = _vision_block_costs(raw, weights, kv, fidelity, kv_fraction, n_dev)
        # the OFT pass runs the same vision call once per image: the same missing blocks per image
        for st, times in (("vision", 1), ("oft_vision", (info.get("oft") or {}).get("num_images", 0))):
            c = stages[st]
            for j, (run, full) in enumerate(zip(info["vision_blocks"], info["vision_blocks_full"])):
                if run < 2:
                    if st == "vision":
                        notes.append(f"vision tower {j}: {run} block(s) run: need >= 2 to measure a whole block")
                    continue
                ops_b, us_b, wb_b, parts_b = blocks[j]
                c.device_ops += times * round((full - run) * ops_b)
                c.modelled_us += times * (full - run) * us_b
                c.weight_bytes += times * (full - run) * wb_b
                for kind, us in parts_b.items():
                    c.time_parts[kind] += times * (full - run) * us
        notes.append(f"vision measured with {info['vision_blocks']} blocks per tower and extrapolated to "
                     f"{info['vision_blocks_full']}: tower = measured + missing blocks x one measured whole block")
    decode_layer_ops = scale["decode"][0] if scale["decode"] else 0
    return {"info": info, "stages": stages, "decode_ops_per_layer": decode_layer_ops,
            "prefill_ops_per_layer": scale["prefill"][0] if scale["prefill"] else 0,
            "decode_collectives_per_layer": per_layer_coll["decode"].get(0, 0),
            "notes": notes, "kv_fraction": kv_fraction, "action_io": action_io,
            "draft_prefill_ops_per_layer": per_layer["draft_prefill"].get(0, 0),
            "draft_decode_step_ops": sum(draft_decode_ops.values()),
            "oft_prefill_ops_per_layer": scale.get("oft_prefill", [0])[0] if scale.get("oft_prefill") else 0,
            "oft_prefill_collectives_per_layer": per_layer_coll["oft_prefill"].get(0, 0),
            "oft_io": _oft_io(raw["transfers"]),
            "syncs_per_action": sum(info["syncs"].values()),
            **({"batch": [_summarise_batch(raw, b) for b in raw["batch"]]} if raw.get("batch") else {})}


def _pick(raw: dict, capture: dict, keep) -> dict:
    """A raw record set of ONE batch capture's records renamed to the single action's stages:
    keep(stage, step) -> (new stage, new step) or None (dropped). Summarised by summarise() as if
    it were an action (same cost model, same extrapolation to the full depth)."""
    def ren(stage, step):
        return keep(stage, step) if stage else None
    ops = []
    for o in capture["ops"]:
        r = ren(o["stage"], o["step"])
        if r:
            ops.append({**o, "stage": r[0], "step": r[1]})
    transfers = []
    for kind, st, step, nbytes, internal in capture["transfers"]:
        r = ren(st, step)
        if r:
            transfers.append((kind, r[0], r[1], nbytes, internal))
    info = {k: v for k, v in raw["info"].items() if k != "oft"}
    info["syncs"] = {}
    info["decode_starts"] = capture.get("decode_starts")  # this batch's rows (its decode's KV term)
    return {"info": info, "weights": raw["weights"], "kv": raw["kv"], "ops": ops, "transfers": transfers}


def _summarise_batch(raw: dict, capture: dict) -> dict:
    """One captured generate_batch of B items: its batched stages (vision, projector, decode step,
    tokens), each item's prefill and the decode start, each summarised by summarise() on its own
    records (so extrapolated to the full depth exactly as the single action). The decode step's
    KV term reads each row at its own position (kv_read_fraction): the B items' rows at the
    starts this batch wrote, the max_batch - B idle rows one chunk each."""
    size = capture["size"]
    shared = {BATCH_PHASE + s: s for s in BATCH_STAGES}
    base = summarise(_pick(raw, capture, lambda st, step: (shared[st], step) if st in shared else None))
    items = []
    for i in range(size):
        one = summarise(_pick(raw, capture, lambda st, step, _i=i: ("prefill", None)
                              if st == BATCH_PHASE + "prefill" and step == _i else None))
        c = one["stages"]["prefill"]
        items.append({"slot": i, "prompt_tokens": capture["prompt_tokens"][i],
                      "sequence_length": capture["sequence_lengths"][i], "device_ops": c.device_ops,
                      "ops_per_layer": one["prefill_ops_per_layer"], "collectives": c.collectives,
                      "h2d": c.h2d, "d2h": c.d2h, "internal_uploads": c.op_internal_uploads,
                      "prefill_ms": c.modelled_us / 1e3})
    start = summarise(_pick(raw, capture, lambda st, step: ("prefill", None) if st == BATCH_PHASE + "start"
                            else None))["stages"]["prefill"]
    st = base["stages"]
    io = {"by_stage": Counter(), "h2d": 0, "d2h": 0, "h2d_bytes": 0.0, "d2h_bytes": 0.0, "inside_ops": 0,
          "outside_stages": 0}
    for kind, stage, step, nbytes, internal in capture["transfers"]:
        if internal:
            io["inside_ops"] += 1
            continue
        if not (stage or "").startswith(BATCH_PHASE):
            io["outside_stages"] += 1
            continue
        io[kind] += 1
        io[kind + "_bytes"] += nbytes
        io["by_stage"][f"{kind} {stage}" + ("" if step is None or stage.endswith("decode") else f"#{step}")] += 1
    steps = sorted({o["step"] for o in capture["ops"] if o["stage"] == BATCH_PHASE + "decode"})
    step_ops = [sum(1 for o in capture["ops"] if o["stage"] == BATCH_PHASE + "decode" and o["step"] == k)
                for k in steps]
    unattributed = sum(1 for o in capture["ops"] if not (o["stage"] or "").startswith(BATCH_PHASE))
    return {"size": size, "max_batch": capture["max_batch"], "prompt_tokens": capture["prompt_tokens"],
            "sequence_lengths": capture["sequence_lengths"], "generate_s": capture["generate_s"],
            "decode_steps_run": capture["decode_steps_run"], "tokens_shape": capture["tokens_shape"],
            "stage_ms": {s: st[s].modelled_us / 1e3 for s in BATCH_STAGES},
            "stage_ops": {s: st[s].device_ops for s in BATCH_STAGES},
            "vision_weight_bytes": st["vision"].weight_bytes, "decode_step_ops": step_ops,
            "decode_kv_bytes": st["decode"].kv_bytes, "decode_starts": capture.get("decode_starts"),
            "decode_ops_per_layer": base["decode_ops_per_layer"],
            "items": items, "fill_cache_slots": capture.get("fill_cache_slots", []),
            "start_ms": start.modelled_us / 1e3, "start_ops": start.device_ops,
            "start_h2d": start.h2d, "io": io, "unattributed_ops": unattributed, "notes": base["notes"]}


def batch_sizes_default(max_batch: int) -> list:
    """1, 2, 4, ... up to max_batch (N300: 1, 2, 4; T3K: 1, 2, 4, 8)."""
    out, b = [], 1
    while b <= max_batch:
        out.append(b)
        b *= 2
    return out


def batch_model(summary: dict, sizes=None) -> dict:
    """Several robots on the same cost model, per batch size B (generate_batch: groups of max_batch
    items, one after the other; per group ONE batched vision + projector pass, one prefill per
    item, the decode start positions written once, DECODE_STEPS decode steps for all max_batch rows
    at once, the tokens gathered and read once):
      group(b items) = vision(b) + projector(b) + sum of the b items' prefills + start
                       + DECODE_STEPS x decode step + tokens
      batch(B)       = group(max_batch) x (B // max_batch) + group(B % max_batch)
    Every robot's action completes at the end of its batch (the tokens of all rows come back in
    the one read after the last decode step, and generate_batch returns after its last group):
    per-robot latency = batch(B); aggregate = B / batch(B). Sources:
    - B = 1: the single action (captured: generate() is generate_batch of one); its row equals the
      report's action exactly.
    - vision(b), projector(b): captured at b = 1, 2 and max_batch; any other b linearly
      interpolated between the nearest captured sizes (the batched ops' activations and math grow
      with b, their weight reads and op count do not: linear in b for an op that stays memory- or
      compute-bound).
    - item i's prefill: captured (item i of the largest capture: prompts of mixed lengths, item i
      of a batch of B < max_batch has the same prompt); items beyond max_batch repeat items
      0..max_batch-1 (groups of the same prompts).
    - the decode step, start and tokens: the capture's of that b, else the largest capture's (the
      decode step runs max_batch rows whatever b: checked equal to the single action's op by op in
      the tests); its KV term reads each row at its own position (kv_read_fraction), so a b that
      was not captured takes the largest capture's step with its KV read rescaled to items
      0..b-1 + max_batch - b idle rows (SDPA decode is memory-bound in the model: its time is its
      bytes over the interleaved DRAM bandwidth)."""
    caps = {c["size"]: c for c in summary.get("batch") or []}
    single = action_model(summary)
    ms1 = single["stage_ms"]
    max_batch = caps[max(caps)]["max_batch"] if caps else 1
    big = caps.get(max_batch)
    vis = {1: (ms1["vision"], ms1["projector"])}
    for b, c in caps.items():
        vis[b] = (c["stage_ms"]["vision"], c["stage_ms"]["projector"])

    def vision(b):
        if b in vis:
            return vis[b], "captured"
        lo = max(k for k in vis if k < b)
        hi = min((k for k in vis if k > b), default=None)
        if hi is None:
            raise ValueError(f"batch {b}: no captured batch above it")
        f = (b - lo) / (hi - lo)
        return tuple(vis[lo][j] + f * (vis[hi][j] - vis[lo][j]) for j in range(2)), f"interpolated {lo}..{hi}"

    def decode_step(cap, b):
        ms = cap["stage_ms"]["decode"]
        if b == cap["size"]:
            return ms
        max_seq = summary["info"]["max_seq"]
        kv = cap["decode_kv_bytes"]
        kv_b = kv * (kv_read_fraction(cap["decode_starts"][:b], max_batch, max_seq)
                     / kv_read_fraction(cap["decode_starts"], max_batch, max_seq))
        return ms - (kv - kv_b) / (WORMHOLE["dram_interleaved_gbs"] * 1e6)

    def group(b):
        (v, p), how = vision(b)
        if b == 1:
            return {"vision_ms": v, "projector_ms": p, "prefill_ms": [ms1["prefill"]], "start_ms": 0.0,
                    "decode_ms": DECODE_STEPS * ms1["decode"], "tokens_ms": ms1["tokens"], "vision_source": how,
                    "source": "single action (captured)"}
        cap = caps.get(b, big)
        return {"vision_ms": v, "projector_ms": p, "prefill_ms": [it["prefill_ms"] for it in cap["items"][:b]],
                "start_ms": cap["start_ms"], "decode_ms": DECODE_STEPS * decode_step(cap, b),
                "tokens_ms": cap["stage_ms"]["tokens"], "vision_source": how,
                "source": f"batch of {cap['size']} (captured)" if cap["size"] == b else
                f"batch of {cap['size']} (captured), items 0..{b - 1}, KV of {b} rows"}

    def total(g):
        return (g["vision_ms"] + g["projector_ms"] + sum(g["prefill_ms"]) + g["start_ms"] + g["decode_ms"]
                + g["tokens_ms"])

    sizes = sorted(set(sizes or batch_sizes_default(max_batch)) | {1})
    rows = []
    for b in sizes:
        full, rest = divmod(b, max_batch)
        groups = [group(max_batch)] * full + ([group(rest)] if rest else [])
        batch_ms = sum(total(g) for g in groups)
        rows.append({"batch": b, "groups": len(groups), "group_parts": groups, "batch_ms": batch_ms,
                     "per_robot_latency_ms": batch_ms, "actions_per_s": b * 1e3 / batch_ms})
    base = rows[0]
    for r in rows:
        r["throughput_vs_batch1"] = r["actions_per_s"] / base["actions_per_s"]
        r["latency_vs_batch1"] = r["batch_ms"] / base["batch_ms"]
    return {"max_batch": max_batch, "captured": sorted([1] + list(caps)), "rows": rows,
            "single_action_ms": single["action_ms"]}


def format_batch(summary: dict, sizes=None) -> list:
    """The "Several robots" section of the printed report (batch_model's rows)."""
    m = batch_model(summary, sizes)
    caps = summary.get("batch") or []
    lines = ["", f"Several robots (issue 14; generate_batch, max_batch {m['max_batch']} on this mesh; same cost "
             "model): "
             f"captured B = {', '.join(map(str, m['captured']))} (B = 1: the single action above)"]
    for c in caps:
        io = c["io"]
        where = ", ".join(f"{n} {k}" for k, n in sorted(io["by_stage"].items()))
        items = "; ".join(f"{it['prompt_tokens']} tok -> L {it['sequence_length']}: {it['device_ops']} ops, "
                          f"{it['prefill_ms']:.1f} ms" for it in c["items"])
        lines.append(f"captured batch of {c['size']}: vision {c['stage_ops']['vision']} ops "
                     f"{c['stage_ms']['vision']:.2f} ms, "
                     f"projector {c['stage_ops']['projector']} ops {c['stage_ms']['projector']:.2f} ms; prefills "
                     f"[{items}]; decode start {c['start_h2d']} writes; decode step {c['stage_ops']['decode']} ops "
                     f"{c['stage_ms']['decode']:.2f} ms x {c['decode_steps_run']} steps; tokens "
                     f"{c['stage_ms']['tokens']:.2f} ms; host transfers {io['h2d']} writes, {io['d2h']} reads "
                     f"[{where}]")
    lines += ["| batch B | groups | vision + projector ms | prefills ms | decode ms | batch ms | per-robot latency ms "
              "| aggregate actions/s | x batch 1 actions/s | x batch 1 latency | source |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        g = r["group_parts"]
        vp = sum(x["vision_ms"] + x["projector_ms"] for x in g)
        pre = sum(sum(x["prefill_ms"]) + x["start_ms"] for x in g)
        dec = sum(x["decode_ms"] + x["tokens_ms"] for x in g)
        src = "; ".join(sorted({f"{x['source']}, vision {x['vision_source']}" for x in g}))
        lines.append(f"| {r['batch']} | {r['groups']} | {vp:.1f} | {pre:.1f} | {dec:.1f} | {r['batch_ms']:.1f} | "
                     f"{r['per_robot_latency_ms']:.1f} | {r['actions_per_s']:.2f} | {r['throughput_vs_batch1']:.2f}x | "
                     f"{r['latency_vs_batch1']:.2f}x | {src} |")
    lines.append("per-robot latency = the batch's wall time: every robot's action completes at the end of the "
                 "batch's decode (all rows' tokens come back in one read after the last step; with more robots "
                 "than max_batch, after the last group); decode = 6 steps of all max_batch rows + the token read")
    return lines


def _oft_io(transfers) -> dict:
    """Host traffic of the OFT chunk (every oft_* stage), uploads inside device ops apart."""
    io = {"h2d": 0, "h2d_bytes": 0.0, "d2h": 0, "d2h_bytes": 0.0, "by_stage": Counter(), "inside_ops": 0}
    for kind, st, _step, nbytes, internal in transfers:
        if not (st and st.startswith("oft_")):
            continue
        if internal:
            io["inside_ops"] += 1
            continue
        io[kind] += 1
        io[kind + "_bytes"] += nbytes
        io["by_stage"][f"{kind} {st}"] += 1
    return io


def _vision_block_costs(raw, weights, kv, fidelity, kv_fraction, n_dev) -> list:
    """(ops, us, weight bytes) of one whole vision block per tower, measured as the ops from the
    start of block 1's attention scope to the start of block 2's (or the tower's last op)."""
    out = []
    vis = [o for o in raw["ops"] if o["stage"] == "vision"]
    for j in range(2):
        idx = [i for i, o in enumerate(vis) if o["block"] and int(o["block"][0]) == j]
        starts = {}
        for i in idx:
            starts.setdefault(vis[i]["block"][1], i)
        if 1 not in starts or 0 not in starts:
            out.append((0, 0.0, 0.0, Counter()))
            continue
        a, b = starts[0], starts[1]  # block 0's attention start .. block 1's: one whole block
        ops = vis[a:b]
        us = wb = 0.0
        parts = Counter()
        for o in ops:
            t, kind, w, _, _ = _op_time_us(o, weights, kv, fidelity, "vision", kv_fraction, n_dev)
            us += t + COST_MODEL["per_op_us"]
            wb += w
            parts[kind] += t
            parts["per-op"] += COST_MODEL["per_op_us"]
        out.append((len(ops), us, wb, parts))
    return out


def action_model(summary: dict) -> dict:
    st = summary["stages"]
    ms = {s: st[s].modelled_us / 1e3 for s in STAGES}
    total = ms["vision"] + ms["projector"] + ms["prefill"] + DECODE_STEPS * ms["decode"] + ms["tokens"]
    return {"stage_ms": ms, "action_ms": total, "actions_per_s": 1e3 / total}


def draft_model(summary: dict) -> dict:
    """Speculative action decoding against the plain action, on the same cost model: with k of
    the 6 drafts accepted an action is vision + projector + the drafted prefill (its 7-row LM head
    and argmax, the one read of the 7 ids, the start token and position written back) + (6 - k)
    decode steps + the token read (none when k = 6: the verification read returned the action).
    The decode step and the token read are the plain action's (the captured drafted action's
    decode step has the same op count, checked: `draft_decode_step_ops`)."""
    st = summary["stages"]
    plain = action_model(summary)
    ms = plain["stage_ms"]
    drafted_prefill = st["draft_prefill"].modelled_us / 1e3
    rows = []
    for k in DRAFT_ACCEPTED:
        steps = DECODE_STEPS - k
        total = (ms["vision"] + ms["projector"] + drafted_prefill + steps * ms["decode"]
                 + (ms["tokens"] if steps else 0.0))
        rows.append({"accepted": k, "decode_steps": steps, "action_ms": round(total, 1),
                     "actions_per_s": round(1e3 / total, 2), "ratio_vs_plain": round(total / plain["action_ms"], 3)})
    return {"plain_action_ms": round(plain["action_ms"], 1), "drafted_prefill_ms": round(drafted_prefill, 2),
            "plain_prefill_ms": round(ms["prefill"], 2), "rows": rows}


def oft_model(summary: dict) -> dict:
    """The OpenVLA-OFT chunk on the same cost model: chunk = its stages (vision x images, projector,
    proprio projector, the bidirectional prefill, the head + the one read); per action = chunk / T
    (the whole chunk executed); beside the plain OpenVLA action (vision + projector + prefill +
    6 decode steps + tokens)."""
    st, o = summary["stages"], summary["info"]["oft"]
    ms = {s: st[s].modelled_us / 1e3 for s in OFT_STAGES}
    chunk = sum(ms.values())
    plain = action_model(summary)["action_ms"]
    t = o["chunk"]
    return {"stage_ms": {k: round(v, 3) for k, v in ms.items()}, "chunk_ms": round(chunk, 2),
            "per_action_ms": round(chunk / t, 3), "chunks_per_s": round(1e3 / chunk, 2),
            "actions_per_s": round(t * 1e3 / chunk, 1), "plain_action_ms": round(plain, 1),
            "plain_actions_per_s": round(1e3 / plain, 2), "plain_action_over_chunk": round(plain / chunk, 2),
            "plain_action_over_per_action": round(plain / (chunk / t), 1), "chunk": t,
            "device_ops": sum(st[s].device_ops for s in OFT_STAGES),
            "collectives": sum(st[s].collectives for s in OFT_STAGES),
            "weight_bytes": sum(st[s].weight_bytes for s in OFT_STAGES)}


def format_oft(summary: dict) -> list:
    """The "OpenVLA-OFT chunk" section of the printed report."""
    st, o, io = summary["stages"], summary["info"]["oft"], summary["oft_io"]
    m = oft_model(summary)
    lines = ["", f"OpenVLA-OFT chunk (LIBERO: {o['num_images']} images, proprio {o['proprio_dim']}, "
             f"{o['chunk']} x {o['action_dim']} chunk = {o['action_rows']} action rows; sequence "
             f"{o['sequence_length']} -> {o['padded_length']} rows, BIDIRECTIONAL prefill, L1 head on the device; "
             f"one TtnnOFTModel.run captured, steady state: mask and BOS row cached), same cost model:",
             "| stage | device ops | ops / decoder layer | collective launches | weights read / chip "
             "| host->dev writes | dev->host reads | modelled ms |", "|---|---|---|---|---|---|---|---|"]
    labels = {"oft_vision": f"vision (x {o['num_images']} images)", "oft_projector": "projector (all patches)",
              "oft_proprio": "proprio projector",
              "oft_prefill": "sequence + bidirectional prefill + action-row norm", "oft_head": "L1 head + one read"}
    for s in OFT_STAGES:
        c = st[s]
        writes = f"{c.h2d} ({c.h2d_bytes / 1e3:.1f} kB)" + (f" + {c.op_internal_uploads} inside ops"
                                                           if c.op_internal_uploads else "")
        per_layer = summary["oft_prefill_ops_per_layer"] if s == "oft_prefill" else "-"
        lines.append(f"| {labels[s]} | {c.device_ops} | {per_layer} | {c.collectives} | {_gb(c.weight_bytes):.3f} GB | "
                     f"{writes} | {c.d2h} ({c.d2h_bytes:.0f} B) | {c.modelled_us / 1e3:.2f} |")
    where = ", ".join(f"{n} {k}" for k, n in sorted(io["by_stage"].items()))
    lines += [f"| chunk | {m['device_ops']} | | {m['collectives']} | {_gb(m['weight_bytes']):.3f} GB | {io['h2d']} | "
              f"{io['d2h']} | {m['chunk_ms']:.1f} |",
              f"host transfers per chunk: {io['h2d']} writes ({io['h2d_bytes'] / 1e3:.1f} kB), {io['d2h']} reads "
              f"({io['d2h_bytes']:.0f} B) [{where}]",
              f"OFT chunk: {m['chunk_ms']:.1f} ms -> {m['chunks_per_s']:.2f} chunks/s; per executed action (chunk / "
              f"{m['chunk']}): {m['per_action_ms']:.2f} ms -> {m['actions_per_s']:.1f} actions/s (modelled)",
              f"plain OpenVLA action (modelled above): {m['plain_action_ms']:.1f} ms -> {m['plain_actions_per_s']:.2f} "
              f"actions/s; plain action / OFT chunk {m['plain_action_over_chunk']:.2f}x, plain action / OFT per "
              f"action {m['plain_action_over_per_action']:.1f}x"]
    goal = 10.0
    if m["actions_per_s"] >= goal and 1e3 / m["chunk_ms"] >= goal:
        verdict = (f">= {goal:.0f} Hz control: modelled within reach on {summary['info']['mesh']}, even replanning "
                   f"every step (one chunk {m['chunk_ms']:.0f} ms <= 100 ms)")
    elif m["actions_per_s"] >= goal:
        verdict = (f">= {goal:.0f} Hz control: modelled within reach on {summary['info']['mesh']} when the chunk is "
                   f"executed ({m['actions_per_s']:.0f} actions/s supplied at {m['chunk']} per chunk: a new chunk "
                   f"after every k >= {math.ceil(goal * m['chunk_ms'] / 1e3)} executed steps keeps up with 100 ms "
                   f"steps); NOT when replanning every step (one chunk {m['chunk_ms']:.0f} ms > 100 ms)")
    else:
        verdict = (f">= {goal:.0f} Hz control: NOT reached even executing whole chunks (modelled "
                   f"{m['actions_per_s']:.1f} actions/s)")
    lines.append(verdict)
    return lines


def levers(summary: dict) -> list:
    """What-if rows on the same cost model (not measured): what would close the gap."""
    st, info = summary["stages"], summary["info"]
    n_dev = info["num_devices"]
    base = action_model(summary)
    dec = st["decode"]
    layers = FULL_LLM_LAYERS
    rows = []
    # (1) tt_transformers' decode graph: 24 ops, 4 async CCLs per layer, same bytes
    ops_now = dec.device_ops
    coll_now = dec.collectives
    ops_new = layers * TT_TRANSFORMERS_LAYER["ops"] + TT_TRANSFORMERS_FIXED["ops"]
    coll_new = layers * TT_TRANSFORMERS_LAYER["collectives"] + TT_TRANSFORMERS_FIXED["collectives"]
    # host traffic of a decode step (0 with device-side feedback: one trace per action)
    d_dec = ((ops_new - ops_now) * COST_MODEL["per_op_us"] + (coll_new - coll_now) * COST_MODEL["collective_us"]
             - dec.time_parts.get("host", 0)) / 1e3
    dec_ms = base["stage_ms"]["decode"] + d_dec
    rows.append(("tt_transformers decode graph (24 ops + 4 async CCL / layer), one trace per action", dec_ms))
    # (2) + HiFi2 on the DRAM-sharded decode matmuls and BFP8 attention weights
    ffn_b = BYTES_PER_ELEMENT[info["profile"]["dtypes"]["ffn"].upper()]
    att_b = BYTES_PER_ELEMENT[info["profile"]["dtypes"]["wqkv"].upper()]
    bw = WORMHOLE["dram_sharded_gbs"] * 1e3
    attn_bytes = layers * (4096 * 3 * 4096 + 4096 * 4096) / n_dev
    dec_ms2 = dec_ms - max(0.0, attn_bytes * (att_b - BYTES_PER_ELEMENT["BFLOAT8_B"]) / bw / 1e3)
    rows.append(("+ BFP8 attention weights (token agreement to be proven)", dec_ms2))
    ffn_bytes = layers * 3 * 4096 * 11008 / n_dev
    dec_ms3 = dec_ms2 - max(0.0, ffn_bytes * (ffn_b - BYTES_PER_ELEMENT["BFLOAT4_B"]) / bw / 1e3)
    rows.append(("+ BFP4 FFN weights (token agreement to be proven)", dec_ms3))
    out = []
    # vision: the towers already run on different chips (vision.py); the measured stage is used
    vision_split = base["stage_ms"]["vision"]
    for label, d in rows:
        total = (vision_split + base["stage_ms"]["projector"] + base["stage_ms"]["prefill"] + DECODE_STEPS * d
                 + base["stage_ms"]["tokens"])
        out.append({"lever": label + ", vision towers on different chips", "decode_step_ms": round(d, 2),
                    "action_ms": round(total, 1), "actions_per_s": round(1e3 / total, 2)})
    # Upper bound: the 6 sequential decode steps replaced by ONE 7-row pass (a verified draft of the
    # 6 tokens, accepted every time); bandwidth-bound, so about one decode step.
    d = rows[-1][1]
    total = vision_split + base["stage_ms"]["projector"] + base["stage_ms"]["prefill"] + d + base["stage_ms"]["tokens"]
    out.append({"lever": "all of the above + the 6 decode steps as one verified 7-token pass (upper bound: "
                         "every draft accepted)", "decode_step_ms": round(d, 2), "action_ms": round(total, 1),
                "actions_per_s": round(1e3 / total, 2)})
    return out


# ---- presentation -----------------------------------------------------------------------------
def _action_io_line(summary: dict) -> str:
    io = summary["action_io"]
    where = ", ".join(f"{n} {k}" for k, n in sorted(io["by_stage"].items()))
    return (f"host transfers per action: {io['h2d']} writes ({io['h2d_bytes'] / 1e3:.1f} kB), {io['d2h']} reads "
            f"({io['d2h_bytes']:.0f} B) [{where}]; synchronize_device calls: {summary['syncs_per_action']}")


def format_report(summary: dict, batch_sizes=None) -> str:
    """The printed report; batch_sizes: the "Several robots" rows (default 1, 2, 4.. max_batch)."""
    info, st = summary["info"], summary["stages"]
    act = action_model(summary)
    lines = [
        f"TT-NN op and byte report: {info['mesh']} ({info['num_devices']} chips, mock mesh), "
        f"profile {Path(info['profile']['source']).name} (decode_matmul {info['profile']['decode_matmul']}), "
        f"prompt {info['prompt_tokens']} tokens -> sequence {info['sequence_length']}, "
        f"{DECODE_STEPS} decode steps",
        f"captured: {info['llm_layers']} decoder layers, vision blocks {info['vision_blocks']} "
        f"(full: {FULL_LLM_LAYERS}, {info['vision_blocks_full']}); load {info['load_s']} s, "
        f"generate under capture {info['generate_s']} s",
        "",
        "| stage | device ops | ops / decoder layer | collective launches | weights read / chip | KV read / chip "
        "| host->dev writes | dev->host reads | syncs | modelled ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_layer = {"prefill": summary["prefill_ops_per_layer"], "decode": summary["decode_ops_per_layer"]}
    for s in STAGES:
        c = st[s]
        label = {"decode": "decode (one step)", "tokens": "tokens (gather + one read)"}.get(s, s)
        writes = f"{c.h2d} ({c.h2d_bytes / 1e3:.1f} kB)" + (f" + {c.op_internal_uploads} inside ops"
                                                           if c.op_internal_uploads else "")
        lines.append(f"| {label} | {c.device_ops} | {per_layer.get(s, '-')} | {c.collectives} | "
                     f"{_gb(c.weight_bytes):.3f} GB | {c.kv_bytes / 1e6:.1f} MB | {writes} | {c.d2h} | {c.syncs} | "
                     f"{c.modelled_us / 1e3:.2f} |")
    lines += [
        "",
        f"decode ops per decoder layer: {summary['decode_ops_per_layer']}",
        f"decode collective launches per decoder layer: {summary['decode_collectives_per_layer']}",
        _action_io_line(summary),
        f"one action (vision + projector + prefill + {DECODE_STEPS} x decode + tokens): {act['action_ms']:.1f} ms "
        f"-> {act['actions_per_s']:.2f} actions/s (modelled)",
    ]
    d = st["decode"]
    floor_ms = DECODE_STEPS * (d.weight_bytes + d.kv_bytes) / (WORMHOLE["dram_spec_gbs"] * 1e6)
    lines.append(f"DRAM floor of the {DECODE_STEPS} decode steps alone (every byte at the "
                 f"{WORMHOLE['dram_spec_gbs']:.0f} GB/s spec, nothing else): {floor_ms:.1f} ms")
    parts = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in sorted(d.time_parts.items()))
    lines.append(f"decode step time by term: {parts}")
    goal = 10.0
    if act["actions_per_s"] >= goal:
        lines.append(f">= {goal:.0f} actions/s on this mesh: modelled within reach ({act['actions_per_s']:.2f}).")
    else:
        lines.append(f">= {goal:.0f} actions/s: NOT reached by today's graph (modelled {act['actions_per_s']:.2f}; "
                     f"the action must drop from {act['action_ms']:.0f} ms to 100 ms, {act['action_ms'] / 100:.1f}x).")
    lines += ["", "what would close it (same cost model, not measured):",
              "| lever | decode step ms | action ms | actions/s |", "|---|---|---|---|"]
    for r in levers(summary):
        lines.append(f"| {r['lever']} | {r['decode_step_ms']} | {r['action_ms']} | {r['actions_per_s']} |")
    lines += ["", f"cost model: per op {COST_MODEL['per_op_us']} us (fitted, below), collective "
              f"{COST_MODEL['collective_us']} us + payload at {COST_MODEL['eth_gbs']} GB/s, DRAM-sharded reads "
              f"{WORMHOLE['dram_sharded_gbs']} GB/s (spec {WORMHOLE['dram_spec_gbs']}), interleaved "
              f"{WORMHOLE['dram_interleaved_gbs']} GB/s, matmul {WORMHOLE['macs_per_cycle_lofi']} MAC/cycle/core at "
              f"LoFi (HiFi2/3/4 = 2/3/4 passes), host write {COST_MODEL['host_write_us']} us, read "
              f"{COST_MODEL['host_read_us']} us, sync {COST_MODEL['sync_us']} us",
              "calibration (tt_transformers Llama-3.1-8B, batch 1, its decode graph: "
              f"{TT_TRANSFORMERS_LAYER['ops']} ops + {TT_TRANSFORMERS_LAYER['collectives']} CCL per layer):",
              "| mesh | mode | published tok/s/user | modelled tok/s/user | error |", "|---|---|---|---|---|"]
    for r in CALIBRATION["rows"]:
        lines.append(f"| {r['mesh']} | {r['mode']} | {r['published_tok_s']} | {r['modelled_tok_s']} | "
                     f"{r['error_pct']:+.1f} %{' (fitted)' if r['fitted'] else ''} |")
    if summary["stages"]["draft_prefill"].device_ops:
        dm, c = draft_model(summary), summary["stages"]["draft_prefill"]
        drafted = summary["info"].get("drafted") or {}
        lines += ["", "speculative action decoding (6 draft rows in the prefill, docs/ttnn.md), same cost model:",
                  f"drafted prefill: {c.device_ops} device ops ({summary['draft_prefill_ops_per_layer']} per decoder "
                  f"layer), {c.h2d} host writes, {c.d2h} read ({c.d2h_bytes:.0f} B: the 7 verified ids), "
                  f"{dm['drafted_prefill_ms']} ms modelled (plain prefill {dm['plain_prefill_ms']} ms); captured "
                  f"with draft {drafted.get('draft')} -> {drafted.get('accepted')} accepted and "
                  f"{drafted.get('decode_steps')} decode steps (each with the plain step's device ops: "
                  f"{summary['draft_decode_step_ops']} measured at {summary['info']['llm_layers']} layer(s))",
                  "| drafts accepted | decode steps | action ms | actions/s | vs plain |", "|---|---|---|---|---|"]
        for r in dm["rows"]:
            lines.append(f"| {r['accepted']} | {r['decode_steps']} | {r['action_ms']} | {r['actions_per_s']} | "
                         f"{r['ratio_vs_plain']:.3f}x |")
        lines.append(f"| plain (no draft) | {DECODE_STEPS} | {dm['plain_action_ms']} | "
                     f"{1e3 / dm['plain_action_ms']:.2f} | 1.000x |")
    if "oft" in summary["info"]:
        lines += format_oft(summary)
    if summary.get("batch"):
        lines += format_batch(summary, batch_sizes)
    for n in summary["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def to_json(summary: dict, batch_sizes=None) -> dict:
    out = {k: v for k, v in summary.items() if k not in ("stages", "batch")}
    out["action_io"] = {**summary["action_io"], "by_stage": dict(summary["action_io"]["by_stage"])}
    out["stages"] = {s: {**{k: v for k, v in c.__dict__.items() if k not in ("by_op", "time_parts")},
                         "by_op": dict(c.by_op), "time_parts": dict(c.time_parts)}
                     for s, c in summary["stages"].items()}
    out["action"] = action_model(summary)
    out["levers"] = levers(summary)
    if summary["stages"]["draft_prefill"].device_ops:
        out["speculative"] = draft_model(summary)
    if "oft" in summary["info"]:
        out["oft"] = oft_model(summary)
        out["oft_io"] = {**summary["oft_io"], "by_stage": dict(summary["oft_io"]["by_stage"])}
    else:
        out.pop("oft_io", None)
    if summary.get("batch"):
        out["batch"] = {"captures": [{**c, "io": {**c["io"], "by_stage": dict(c["io"]["by_stage"])}}
                                     for c in summary["batch"]],
                        "model": batch_model(summary, batch_sizes)}
    out["calibration"] = CALIBRATION
    return out


# ---- entry points -----------------------------------------------------------------------------
def _mock_env_module():
    path = MOCK_DIR / "mock_env.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("openvla_ttnn_mock_env", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def op_report(mesh: str, *, llm_layers: int = FULL_LLM_LAYERS, vision_depth: int | None = None,
              prompt_tokens: int = 22, decode_matmul: str | None = None, timeout_s: float = 1800,
              work: str | Path | None = None, oft: bool = False) -> dict:
    """The report as a dict (summary of the captured graph). Runs in this process when it is
    already on a mock cluster (TT_METAL_MOCK_CLUSTER_DESC_PATH), else in a subprocess with the
    mock environment of test/ttnn_mock (a private runtime root and JIT cache)."""
    from ...errors import BackendError

    mesh = str(mesh).upper()
    if mesh not in MESHES:
        raise BackendError(f"op report: unknown mesh {mesh!r}; choose N300 or T3K")
    if os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH"):
        raw = capture(mesh, llm_layers, vision_depth, prompt_tokens, decode_matmul, work, oft=oft)
        if work:
            (Path(work) / "raw.json").write_text(json.dumps(raw))
        return summarise(raw)
    mock = _mock_env_module()
    if mock is None:
        raise BackendError(f"op report: mock devices need the repository's {MOCK_DIR} (not found)")
    why = mock.missing_prerequisites()
    if why:
        raise BackendError(f"op report: mock TT-NN devices unavailable: {why}")
    work = Path(work or tempfile.mkdtemp(prefix="openvla_op_report_"))
    env = mock.mock_environment(mesh, work)
    env["TT_METAL_MOCK_CLUSTER_DESC_PATH"] = str(mock.DESCRIPTORS[mesh])
    out = work / "raw.json"
    cmd = [sys.executable, "-m", "openvla_model.backends.ttnn.op_report", "--mesh-device", mesh,
           "--llm-layers", str(llm_layers), "--prompt-tokens", str(prompt_tokens), "--raw-out", str(out),
           "--work", str(work)]
    if vision_depth:
        cmd += ["--vision-depth", str(vision_depth)]
    if decode_matmul:
        cmd += ["--decode-matmul", decode_matmul]
    if oft:
        cmd += ["--oft"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise BackendError(f"op report: the mock run timed out after {timeout_s:.0f} s") from e
    if proc.returncode != 0 or not out.is_file():
        log = work / "capture.log"
        log.write_text((proc.stdout or "") + (proc.stderr or ""))
        last = ((proc.stderr or proc.stdout or "").strip().splitlines() or ["no output"])[-1]
        raise BackendError(f"op report: the mock run failed (exit {proc.returncode}): {last} (full log: {log})")
    return summarise(json.loads(out.read_text()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="openvla-op-report", description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh-device", required=True, help="N300 | T3K")
    p.add_argument("--llm-layers", type=int, default=FULL_LLM_LAYERS,
                   help="decoder layers to run (fewer: measured per layer, extrapolated to 32)")
    p.add_argument("--vision-depth", type=int, default=0,
                   help="timm depth per tower (0: the real 24 / 27; >= 3 to extrapolate)")
    p.add_argument("--prompt-tokens", type=int, default=22)
    p.add_argument("--decode-matmul", choices=["interleaved", "dram_sharded"], default=None)
    p.add_argument("--oft", action="store_true",
                   help="also capture one OpenVLA-OFT chunk (LIBERO: 2 images, proprio, 8 x 7) and add the "
                        "'OpenVLA-OFT chunk' section (modelled ms per chunk and per action beside OpenVLA)")
    p.add_argument("--batch", default=None, metavar="B[,B]",
                   help="batch sizes of the 'Several robots' table (default 1,2,4 on N300, 1,2,4,8 on T3K; "
                        "1 always added: the ratios' baseline; more than max_batch runs in groups)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--raw-out", default=None, help=argparse.SUPPRESS)  # subprocess: raw capture
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from ...errors import OpenVLAError

    mesh = args.mesh_device.upper()
    if mesh not in MESHES:
        print(f"error: --mesh-device must be N300 or T3K, got {args.mesh_device!r}", file=sys.stderr)
        return 2
    if args.llm_layers < 1 or args.llm_layers > FULL_LLM_LAYERS or args.vision_depth in (1, 2) or args.vision_depth < 0:
        print("error: --llm-layers must be 1..32 and --vision-depth 0 (full) or >= 3", file=sys.stderr)
        return 2
    sizes = None
    if args.batch is not None:
        from ...bench import parse_batch  # the one parser of --batch (openvla-bench's)

        try:
            sizes = parse_batch(args.batch)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        if args.raw_out:  # the subprocess half: capture on the mock mesh, write the raw records
            raw = capture(mesh, args.llm_layers, args.vision_depth or None, args.prompt_tokens, args.decode_matmul,
                          args.work, oft=args.oft)
            Path(args.raw_out).write_text(json.dumps(raw))
            return 0
        summary = op_report(mesh, llm_layers=args.llm_layers, vision_depth=args.vision_depth or None,
                            prompt_tokens=args.prompt_tokens, decode_matmul=args.decode_matmul,
                            timeout_s=args.timeout, work=args.work, oft=args.oft)
    except OpenVLAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(summary, sizes))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(summary, sizes), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
