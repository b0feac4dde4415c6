"""Fast path of the torch backend (CUDA graphs at the memory floor; same math on the CPU).

The reference `TorchBackend` (transformers Llama, DynamicCache, eager) stays the ground truth;
this backend shares its modules (no second copy of the weights) and runs its own decoder:

- q/k/v and gate/up weights fused into one matrix each. The fused matrix REPLACES the original
  parameters (they become row views of it), so fusing costs no memory and the reference path
  and transformers' generate() keep working on the same weights.
- A static KV cache of our own, allocated once (256 patches + prompt + new tokens, grown only
  for a longer prompt), plus pinned host buffers for the prompt ids and the result tokens.
- Prompts are padded to PROMPT_BUCKET tokens: padding sits after the real tokens, so causal
  attention keeps it out of every real position, and decode masks every cache slot past the
  current position. One prefill graph per bucket, one decode-step graph per cache length.
- On CUDA, vision, projector, prefill and the decode step are each captured once as a CUDA
  graph and replayed; the step counter, positions and tokens live on the device, so nothing
  waits for the host between decode steps; the only sync is the final copy of the tokens.
  Stage times come from CUDA events recorded between the graph launches.
- The small element-wise pieces (RMSNorm, residual add + RMSNorm, RoPE, SiLU-gate) can be
  fused by torch.compile (default on CUDA; checked against the eager versions at start-up and
  dropped with a warning if that fails). The matrix products stay cuBLAS.

- Speculative action decoding (generate(..., draft=)): the num_tokens-1 draft ids sit right
  after the prompt in the prefill (a prefill graph per bucket with those rows), the prefill
  graph also takes the argmax of the rows L-1..L-1+drafts and the accepted count
  (speculative.accepted_length) on the device and sets the step counter to it; the host reads
  that count (the one extra sync) and replays only the remaining decode-step graphs, which
  overwrite the rejected draft rows of the KV cache (and decode masks every slot past the
  current position anyway).
- Batches (generate_batch): every buffer has a batch dimension; graphs are captured per batch
  size 1, 2, 4, 8 and a batch runs at the next one, the extra rows dummy rows (zero pixels, a
  BOS-only prompt, no decode step) whose results are discarded; more than 8 items run in chunks
  of 8. Each row sits at the positions it has alone: RIGHT padding (a row's pads and missing
  drafts after its own tokens, position = cache column), so the prefill stays plain causal
  attention for every row, and each decode step writes row r's K/V at its own position and
  masks, per row, the columns after it. Drafts are verified per row in the prefill; the step
  counter is per row, the host reads the accepted counts once and runs the decode steps the
  row with the fewest accepted needs, and a row whose action is complete stops (its step stays,
  its token goes to a scratch column). generate() is a batch of one.
- OpenVLA-OFT (FastOFTModel): the one bidirectional pass on the same fused layers, static
  buffers per (images, proprio, text bucket), the LLM forward and the head one graph.

On the CPU (or with graphs=False) the very same functions run eagerly: that is how the tests
check this path against the reference on the tiny checkpoint.

Switches: create_backend("torch", ..., fast=True|False), load_oft_policy(..., fast=) or
OPENVLA_TORCH_FAST=1|0 (default: on for CUDA, off for CPU); OPENVLA_TORCH_COMPILE=1|0 (default:
on for CUDA).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackendError, InputError
from ..speculative import accepted_length, sanitize_draft
from .torch_backend import TorchBackend

log = logging.getLogger("openvla_model")

ENV_FAST = "OPENVLA_TORCH_FAST"
ENV_COMPILE = "OPENVLA_TORCH_COMPILE"
PROMPT_BUCKET = 16  # prompt tokens are padded to a multiple of this (one prefill graph per bucket)
CACHE_ALIGN = 64  # KV-cache capacity granularity
MIN_TOKEN_SLOTS = 16  # device token / logit buffers hold at least this many new tokens
GRAPH_BATCH_SIZES = (1, 2, 4, 8)  # batch sizes with graphs of their own; a batch runs at the next one
MAX_GRAPH_BATCH = GRAPH_BATCH_SIZES[-1]  # larger batches run in chunks of this many items


def _env_flag(name: str):
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise BackendError(f"{name}={raw!r}: expected 1 or 0")


def use_fast_path(device: torch.device, fast: bool | None = None) -> bool:
    """The fast path is chosen automatically on CUDA; `fast` or $OPENVLA_TORCH_FAST override."""
    if fast is None:
        fast = _env_flag(ENV_FAST)
    if fast is None:
        return torch.device(device).type == "cuda"
    return bool(fast)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# -- element-wise pieces (the eager versions reproduce transformers' Llama numerics) ----------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in float32, round to the input dtype, then scale."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float):
    """Residual add, then the next RMSNorm: returns (x + update, rms_norm(x + update))."""
    x = x + update
    return x, rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' rotate_half layout: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up on the fused gate/up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Ops:
    """The four element-wise functions, eager or torch.compile'd."""

    def __init__(self, compiled: bool = False, emulate_precision_casts: bool = True):
        self.compiled = compiled
        fns = dict(rms_norm=rms_norm, add_rms_norm=add_rms_norm, rope=rope, silu_mul=silu_mul)
        if compiled:
            # emulate_precision_casts: round after each op like eager bf16 does, so the fused
            # kernels stay as close as possible to the reference numerics.
            opts = {"emulate_precision_casts": True} if emulate_precision_casts else None
            fns = {k: torch.compile(f, fullgraph=True, options=opts) for k, f in fns.items()}
        for k, f in fns.items():
            setattr(self, k, f)


def compiled_ops_checked(device: torch.device, dtype: torch.dtype, hidden: int, heads: int, head_dim: int,
                         intermediate: int, eps: float, seq_lens=(1, 272)) -> tuple[Ops, str]:
    """torch.compile the element-wise ops and check them against the eager ones on random data
    (decode and prefill shapes). Returns (ops, note); eager ops if compiling or checking fails."""
    errors = []
    for emulate in (True, False):
        try:
            ops = _check_ops(Ops(compiled=True, emulate_precision_casts=emulate), device, dtype, hidden, heads,
                             head_dim, intermediate, eps, seq_lens)
            return ops, f"compiled (emulate_precision_casts={emulate}; {ops.check_note})"
        except Exception as e:  # inductor / triton failures of any kind: stay correct
            errors.append(str(e).splitlines()[0][:200] if str(e) else repr(e))
            torch._dynamo.reset()
    log.warning("torch.compile of the element-wise ops failed (%s): using eager ops", errors[-1])
    return Ops(compiled=False), f"eager (compile failed: {errors[-1]})"


def _check_ops(ops: Ops, device, dtype, hidden, heads, head_dim, intermediate, eps, seq_lens) -> Ops:
    """Run every op on random data at decode and prefill shapes; raise if it is less accurate than
    the eager op. Both are compared with the exact result (the eager op in float32 on the same
    inputs): the compiled op's mean error may be at most twice the eager op's own rounding error
    (plus a float32 floor), so a systematic error far below one bf16 step per element (a 0.5%
    scale, say) is rejected, while a different but equally exact rounding passes. The max error
    must also stay within 1e-2 of the largest value (catches NaN and a few wild elements)."""
    ref = Ops(compiled=False)
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    def f32(*ts):
        return [t.float() for t in ts]

    worst_max, worst_ratio = 0.0, 0.0
    for s in seq_lens:
        x, u, w = rnd(1, s, hidden), rnd(1, s, hidden), rnd(hidden) * 0.1 + 1
        qk = rnd(1, s, 3 * heads, head_dim)[:, :, : 2 * heads]
        cos, sin = rnd(1, s, 1, head_dim), rnd(1, s, 1, head_dim)
        gu = rnd(1, s, 2 * intermediate)
        got_add, eager_add, exact_add = (o.add_rms_norm(*args, eps) for o, args in
                                         ((ops, (x, u, w)), (ref, (x, u, w)), (ref, f32(x, u, w))))
        triples = [
            ("rms_norm", ops.rms_norm(x, w, eps), ref.rms_norm(x, w, eps), ref.rms_norm(*f32(x, w), eps)),
            ("add_rms_norm.sum", got_add[0], eager_add[0], exact_add[0]),
            ("add_rms_norm.norm", got_add[1], eager_add[1], exact_add[1]),
            ("rope", ops.rope(qk, cos, sin), ref.rope(qk, cos, sin), ref.rope(*f32(qk, cos, sin))),
            ("silu_mul", ops.silu_mul(gu), ref.silu_mul(gu), ref.silu_mul(gu.float())),
        ]
        for name, got, eager, exact in triples:
            if got.shape != exact.shape:
                raise RuntimeError(f"compiled {name} returned shape {tuple(got.shape)}, expected {tuple(exact.shape)}")
            scale = exact.abs().mean().clamp_min(1e-12)
            err_got = ((got.float() - exact).abs().mean() / scale).item()
            err_eager = ((eager.float() - exact).abs().mean() / scale).item()
            max_rel = ((got.float() - exact).abs().max() / exact.abs().max().clamp_min(1e-6)).item()
            ratio = err_got / (2.0 * err_eager + 1e-6)
            if not (max_rel <= 1e-2 and ratio <= 1.0):  # `not`: NaN fails too
                raise RuntimeError(f"compiled {name}: results differ from eager: mean error {err_got:.3g} vs eager's "
                                   f"{err_eager:.3g} (relative to the exact float32 result), max {max_rel:.3g}")
            worst_max, worst_ratio = max(worst_max, max_rel), max(worst_ratio, ratio)
    ops.check_note = (f"max relative difference to exact {worst_max:.2g}, mean error <= "
                      f"{worst_ratio:.2f} x the allowed 2 x eager")
    return ops


# -- weights -----------------------------------------------------------------------------------

@dataclass
class LlamaWeights:
    embed: torch.Tensor
    in_norm: list
    post_norm: list
    qkv: list
    o: list
    gate_up: list
    down: list
    final_norm: torch.Tensor
    lm_head: torch.Tensor


def _fuse_rows(linears) -> torch.Tensor:
    """Concatenate the weights of several nn.Linear along the output dim and make each module's
    weight a row view of the fused matrix (so no memory is duplicated)."""
    ws = [m.weight for m in linears]
    base = ws[0]
    contiguous_run = all(w.is_contiguous() for w in ws) and all(
        w.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for w in ws) and all(
        ws[i + 1].data_ptr() == ws[i].data_ptr() + ws[i].numel() * ws[i].element_size() for i in range(len(ws) - 1))
    if contiguous_run:  # already fused (e.g. a second fast backend on the same modules)
        rows = sum(w.shape[0] for w in ws)
        return base.as_strided((rows, base.shape[1]), (base.shape[1], 1))
    fused = torch.cat([w.detach() for w in ws], dim=0)
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[row:row + n], requires_grad=False)
        row += n
    return fused


def fuse_llama_weights(llm) -> LlamaWeights:
    layers = llm.model.layers
    for layer in layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if lin.bias is not None:
                raise BackendError("fast path: Llama projections with biases are not supported")
    return LlamaWeights(
        embed=llm.model.embed_tokens.weight,
        in_norm=[layer.input_layernorm.weight for layer in layers],
        post_norm=[layer.post_attention_layernorm.weight for layer in layers],
        qkv=[_fuse_rows([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]) for layer in layers],
        o=[layer.self_attn.o_proj.weight for layer in layers],
        gate_up=[_fuse_rows([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in layers],
        down=[layer.mlp.down_proj.weight for layer in layers],
        final_norm=llm.model.norm.weight,
        lm_head=llm.lm_head.weight,
    )


# -- CUDA graphs -------------------------------------------------------------------------------

class _Eager:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def _capture(fn, pool, before_each=None, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Warm fn up on a side stream (allocator, cuBLAS handles, compiled kernels), then capture it.
    before_each() restores state that fn advances (the decode step counter)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            if before_each is not None:
                before_each()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    if before_each is not None:
        before_each()
    return graph


def _graph_count(graphs: dict) -> int:
    return len([g for g in graphs.values() if not isinstance(g, _Eager)])


# -- what both fast paths share ------------------------------------------------------------------

class _FusedLlamaRunner:
    """The fused Llama weights, the element-wise ops, the decoder layers, the vision towers and
    graph capture with its fallback: shared by the OpenVLA fast path (FastTorchBackend) and the
    OFT fast path (FastOFTModel), which differ only in what they feed the layers."""

    def _init_runner(self, modules, llm_cfg, device: torch.device, dtype: torch.dtype, graphs, compile_ops) -> None:
        self.modules, self.device, self.dtype = modules, device, dtype
        cuda = device.type == "cuda"
        self.graphs = cuda if graphs is None else bool(graphs)
        if self.graphs and not cuda:
            raise BackendError("CUDA graphs need a CUDA device")
        self.preprocess_device = str(device) if cuda else "cpu"
        self.hidden = int(llm_cfg.hidden_size)
        self.heads = int(llm_cfg.num_attention_heads)
        self.kv_heads = int(getattr(llm_cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(llm_cfg, "head_dim", None) or self.hidden // self.heads)
        self.n_layers = int(llm_cfg.num_hidden_layers)
        self.eps = float(llm_cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        rotary = modules.llm.model.rotary_emb
        self._inv_freq = rotary.inv_freq.detach().to(device, torch.float32)
        self._rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

        self.w = fuse_llama_weights(modules.llm)
        env_compile = _env_flag(ENV_COMPILE)
        want_compile = compile_ops if compile_ops is not None else (cuda and env_compile is not False)
        if want_compile:
            with torch.inference_mode():
                self.ops, self.ops_note = compiled_ops_checked(
                    device, dtype, self.hidden, self.heads, self.head_dim, int(llm_cfg.intermediate_size), self.eps)
        else:
            self.ops, self.ops_note = Ops(compiled=False), "eager"
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._vision_stream = torch.cuda.Stream(device) if cuda else None
        self._graphs: dict = {}
        self.graph_failures: dict[str, str] = {}

    def _rope_table(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n, head_dim) in the model dtype for positions 0..n-1 (transformers' values)."""
        pos = torch.arange(n, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self._rope_scaling).to(self.dtype), (emb.sin() * self._rope_scaling).to(self.dtype)

    def _vision_into(self, pixels: torch.Tensor, out: torch.Tensor) -> None:
        """(B, 6, S, S) float32 pixels -> out (B, 256, vision_dim): DINOv2 on channels 0-2, SigLIP on 3-5."""
        px = pixels.to(self.dtype)
        side = self._vision_stream
        if side is None:
            out.copy_(self.modules.vision(px))
            return
        # The two towers are independent and each too small to fill the GPU: run SigLIP on a
        # side stream while DINOv2 runs here (fork/join, so the captured graph gets two branches).
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            siglip = self.modules.fused_featurizer(px[:, 3:])
        dino = self.modules.featurizer(px[:, :3])
        main.wait_stream(side)
        out.copy_(torch.cat([dino, siglip], dim=2))

    def _llm_layers(self, x, cos, sin, *, kv=None, pos=None, mask=None, kv_len=None, causal: bool = True):
        """All decoder layers + final norm over x (B, S, hidden). Returns the final-normed hidden states.

        kv None (OFT): attention over x itself, causal or not, `mask` additive (B|1, 1, 1|S, S).
        kv (layers, 2, B, kv_heads, cap, head_dim), pos None (prefill): causal over x, K/V written
        to cache columns [:S]. kv and pos (B,) (decode, S = 1): row b's K/V written at column
        pos[b], attention over cache[:kv_len] with `mask` (B, 1, 1, kv_len) hiding, per row, the
        columns after its own position."""
        ops, w, eps = self.ops, self.w, self.eps
        B, S, H, KV, D = x.shape[0], x.shape[1], self.heads, self.kv_heads, self.head_dim
        gqa = {"enable_gqa": True} if KV != H else {}
        write = None if pos is None else pos.view(B, 1, 1, 1).expand(B, KV, 1, D)
        h = ops.rms_norm(x, w.in_norm[0], eps)
        for i in range(self.n_layers):
            qkv = F.linear(h, w.qkv[i]).view(B, S, H + 2 * KV, D)
            qk = ops.rope(qkv[:, :, :H + KV], cos, sin)
            q = qk[:, :, :H].transpose(1, 2)
            k = qk[:, :, H:].transpose(1, 2)
            v = qkv[:, :, H + KV:].transpose(1, 2)
            if kv is None:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                   scale=self.scale, **gqa)
            elif pos is None:
                k_cache, v_cache = kv[i, 0], kv[i, 1]
                k_cache[:, :, :S].copy_(k)
                v_cache[:, :, :S].copy_(v)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **gqa)
            else:
                k_cache, v_cache = kv[i, 0], kv[i, 1]
                k_cache.scatter_(2, write, k)
                v_cache.scatter_(2, write, v)
                a = F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len],
                                                   attn_mask=mask, scale=self.scale, **gqa)
            a = a.transpose(1, 2).reshape(B, S, H * D)
            x, h = ops.add_rms_norm(x, F.linear(a, w.o[i]), w.post_norm[i], eps)
            m = F.linear(ops.silu_mul(F.linear(h, w.gate_up[i])), w.down[i])
            nxt = w.in_norm[i + 1] if i + 1 < self.n_layers else w.final_norm
            x, h = ops.add_rms_norm(x, m, nxt, eps)
        return h

    def _run(self, key, fn, before_each=None):
        if not self.graphs:
            fn()
            return
        g = self._graphs.get(key)
        if g is None:
            g = self._capture_or_fallback(key, fn, before_each)
            self._graphs[key] = g
        g.replay()

    def _capture_or_fallback(self, key, fn, before_each):
        """Capture fn; if that fails with compiled ops, switch to the eager ops and retry; if it
        still fails, run this piece eagerly from now on (slower, still correct)."""
        while True:
            try:
                return _capture(fn, self._pool, before_each=before_each)
            except Exception as e:
                msg = (str(e).splitlines() or [repr(e)])[0][:300]
                torch.cuda.synchronize(self.device)
                if before_each is not None:
                    before_each()
                if self.ops.compiled:
                    log.warning("capturing %s with compiled ops failed (%s); switching to eager ops", key, msg)
                    self.graph_failures[f"{key} (compiled ops)"] = msg
                    self.ops, self.ops_note = Ops(compiled=False), f"eager (compiled ops failed in {key}: {msg})"
                    continue
                log.warning("CUDA graph capture of %s failed (%s); running it eagerly", key, msg)
                self.graph_failures[str(key)] = msg
                return _Eager(fn)


class _Marks:
    """Stage boundaries: CUDA events recorded between graph launches (no sync), or CPU clocks."""

    def __init__(self, events=None):
        self.events, self.marks = events, []

    def __call__(self):
        if self.events is not None:
            ev = self.events[len(self.marks)]
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def ms(self) -> list[float]:
        """After the work has finished (the caller synchronised)."""
        m = self.marks
        if self.events is not None:
            return [m[i].elapsed_time(m[i + 1]) for i in range(len(m) - 1)]
        return [(m[i + 1] - m[i]) * 1e3 for i in range(len(m) - 1)]


# -- the OpenVLA backend -------------------------------------------------------------------------

def padded_batch_size(n: int) -> int:
    """The captured batch size a batch of n (1..MAX_GRAPH_BATCH) runs at."""
    for size in GRAPH_BATCH_SIZES:
        if size >= n:
            return size
    raise BackendError(f"a batch of {n} exceeds the largest captured size {GRAPH_BATCH_SIZES[-1]}")


class FastTorchBackend(_FusedLlamaRunner):
    """OpenVLA on the fast path: generate() (one action), generate_batch() (B actions, rows equal
    to each item alone), launch/collect (the same, split at the one final host sync).
    max_batch: the batch size (rounded up to a captured size) to allocate for at start; the
    buffers grow on demand (dropping the graphs captured so far) when a larger batch comes."""

    name = "torch"
    supports_draft = True  # generate(..., draft=) verifies drafts in the prefill

    def __init__(self, config, checkpoint=None, device=None, dtype=None, *, reference: TorchBackend | None = None,
                 graphs: bool | None = None, compile_ops: bool | None = None, prompt_bucket: int = PROMPT_BUCKET,
                 max_batch: int = 1):
        self.reference = reference if reference is not None else TorchBackend(config, checkpoint, device=device,
                                                                              dtype=dtype)
        self.config = config
        self._init_runner(self.reference.modules, config.llm, self.reference.device, self.reference.dtype, graphs,
                          compile_ops)
        self.prompt_bucket = int(prompt_bucket)
        self.num_patches = int(config.num_patches)
        self.vocab = int(config.vocab_size)
        self.pad_id = int(config.pad_token_id)
        self.last_decode_steps_ms: list[float] = []
        self.last_accepted = 0  # drafts accepted by the last generate()
        self.last_batches: list[tuple[int, int]] = []  # (items, captured size) of each chunk of the last call
        self._pending = None
        self._cap = self._slots = self._bcap = 0
        with torch.inference_mode():
            self._allocate(self.num_patches + 4 * self.prompt_bucket + 8, 8,
                           padded_batch_size(min(max(int(max_batch), 1), MAX_GRAPH_BATCH)))

    # -- buffers -----------------------------------------------------------------------------
    def _allocate(self, needed_len: int, num_tokens: int, batch: int = 1) -> None:
        """(Re)allocate the KV cache and the static buffers for `batch` rows; drops every graph."""
        cap = max(self._cap, _round_up(needed_len, CACHE_ALIGN))
        slots = max(self._slots, MIN_TOKEN_SLOTS, num_tokens)
        bcap = max(self._bcap, batch)
        if (cap, slots, bcap) == (self._cap, self._slots, self._bcap):
            return
        dev, dt = self.device, self.dtype
        self._graphs.clear()
        self._kv = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        self._cap, self._slots, self._bcap = cap, slots, bcap
        self._kv = torch.zeros(self.n_layers, 2, bcap, self.kv_heads, cap, self.head_dim, device=dev, dtype=dt)
        self._cos, self._sin = self._rope_table(cap)
        self._arange = torch.arange(cap, device=dev)
        self._neg_inf = torch.full((cap,), float("-inf"), device=dev, dtype=dt)
        # tokens / logits: columns 0..slots-1 per row, column `slots` is the scratch column that
        # a row whose action is complete writes to while the others still decode
        self._tokens = torch.zeros(bcap, slots + 1, dtype=torch.long, device=dev)
        self._logits = torch.zeros(bcap, slots + 1, self.vocab, dtype=dt, device=dev)
        self._step = torch.zeros(bcap, dtype=torch.long, device=dev)
        self._accepted = torch.zeros(bcap, dtype=torch.long, device=dev)
        # per row: [sequence length L, last real position L-1, last step (num_tokens-1; 0: a
        # dummy row), drafts to compare (-1: none) x slots, prompt ids (+ draft ids) padded...]:
        # one host->device copy per batch
        pin = dev.type == "cuda"
        width = 3 + slots + cap
        self._ints_host = torch.zeros(bcap, width, dtype=torch.long, pin_memory=pin)
        self._ints_host_np = self._ints_host.numpy()
        self._ints = torch.zeros(bcap, width, dtype=torch.long, device=dev)
        self._seq_len, self._last_idx, self._limit = self._ints[:, 0], self._ints[:, 1], self._ints[:, 2]
        self._draft, self._ids = self._ints[:, 3:3 + slots], self._ints[:, 3 + slots:]
        self._tokens_host = torch.zeros(bcap, slots + 1, dtype=torch.long, pin_memory=pin)
        self._accepted_host = torch.zeros(bcap, dtype=torch.long, pin_memory=pin)
        size = self.config.image_size
        self._pixels = torch.zeros(bcap, 6, size, size, device=dev, dtype=torch.float32)
        self._patches = torch.zeros(bcap, self.num_patches, self.modules.vision_dim, device=dev, dtype=dt)
        self._projected = torch.zeros(bcap, self.num_patches, self.hidden, device=dev, dtype=dt)
        if dev.type == "cuda":
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4 + slots)]
            self._done = torch.cuda.Event()
            self._accepted_ready = torch.cuda.Event()

    # -- the model pieces (the functions that get captured, one set per batch size b) ----------
    def _vision(self, b: int):
        self._vision_into(self._pixels[:b], self._patches[:b])

    def _projector(self, b: int):
        self._projected[:b].copy_(self.modules.projector(self._patches[:b]))

    def _prefill(self, b: int, prompt_pad: int, rows: int = 0):
        """Row r: [BOS, 256 projected patches, prompt[1:], d1..d_rows, pad...] -> its KV rows,
        tokens, logits and step. Each row sits at the positions it has alone (position = cache
        column; pads after its real tokens, which causal attention keeps out of every real
        position). Without drafts (rows 0): token 0 and logits 0, step 0. With draft rows (d_j
        at position L+j-1, right after the prompt): the greedy token after each of the rows
        L-1..L-1+rows, the row's accepted count k (speculative.accepted_length against its
        drafts, on the device), tokens 0..k valid and step = k (its decode steps go on from
        there and overwrite the rest, KV rows included)."""
        S = self.num_patches + prompt_pad
        emb = F.embedding(self._ids[:b, :prompt_pad], self.w.embed)
        seq = torch.cat([emb[:, :1], self._projected[:b], emb[:, 1:]], dim=1)
        cos, sin = self._cos[:S].view(1, S, 1, -1), self._sin[:S].view(1, S, 1, -1)
        h = self._llm_layers(seq, cos, sin, kv=self._kv[:, :, :b])
        idx = self._last_idx[:b, None] + self._arange[:rows + 1]  # (b, rows+1): L-1 .. L-1+rows per row
        picked = h.gather(1, idx.unsqueeze(-1).expand(b, rows + 1, self.hidden))
        logits = F.linear(picked, self.w.lm_head)  # (b, rows+1, V)
        predicted = logits.argmax(-1)
        self._logits[:b, :rows + 1].copy_(logits)
        self._tokens[:b, :rows + 1].copy_(predicted)
        if rows:
            accepted = accepted_length(self._draft[:b, :rows], predicted)
            self._step[:b].copy_(accepted)
            self._accepted[:b].copy_(accepted)
        else:
            self._step[:b].zero_()

    def _decode_step(self, b: int, kv_len: int):
        """One token per row: row r reads tokens[r, step_r] at its position L_r+step_r, writes
        tokens[r, step_r+1] and advances step_r, while step_r < its last step. A row whose action
        is complete (it accepted more drafts than another row; a dummy row) stops: it writes to the
        scratch column, its step stays, and what it computes touches only its own KV row."""
        step, limit = self._step[:b], self._limit[:b]
        active = step < limit
        pos = self._seq_len[:b] + step
        x = F.embedding(self._tokens[:b].gather(1, step.view(b, 1)), self.w.embed)  # (b, 1, hidden)
        cos = self._cos.index_select(0, pos).view(b, 1, 1, -1)
        sin = self._sin.index_select(0, pos).view(b, 1, 1, -1)
        mask = self._decode_mask(b, pos, kv_len)
        h = self._llm_layers(x, cos, sin, kv=self._kv[:, :, :b], pos=pos, mask=mask, kv_len=kv_len)
        logits = F.linear(h[:, 0], self.w.lm_head)  # (b, V)
        nxt = torch.where(active, step + 1, self._slots).view(b, 1)
        self._logits[:b].scatter_(1, nxt.unsqueeze(-1).expand(b, 1, self.vocab), logits.unsqueeze(1))
        self._tokens[:b].scatter_(1, nxt, logits.argmax(-1, keepdim=True))
        step.add_(active.long())

    def _decode_mask(self, b: int, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """(b, 1, 1, kv_len) additive mask, built once per step: row r sees the cache columns up to
        its own position pos[r] (its prompt, accepted drafts and decoded tokens), never the pads,
        rejected drafts or stale columns after it (a boolean mask is converted again per layer)."""
        cols = self._neg_inf[:kv_len].expand(b, kv_len)
        return cols.masked_fill(self._arange[:kv_len] <= pos.view(b, 1), 0.0).view(b, 1, 1, kv_len)

    # -- running -------------------------------------------------------------------------------
    def _shapes(self, num_prompt: int, num_tokens: int) -> tuple[int, int]:
        prompt_pad = _round_up(num_prompt, self.prompt_bucket)
        kv_len = _round_up(self.num_patches + prompt_pad + max(num_tokens - 1, 1), 16)
        return prompt_pad, kv_len

    def launch_batch(self, pixel_values: torch.Tensor, input_ids, num_tokens: int, drafts=None) -> None:
        """Queue up to MAX_GRAPH_BATCH actions on the device; collect_batch() waits for them.

        The batch runs at the next captured size (1, 2, 4, 8): the rows after the real items are
        dummy rows (zero pixels, a BOS-only prompt, no decode step of their own) whose results are
        discarded. No host sync, except with a draft: one, to read the accepted counts (the
        fewest accepted by a real row sets how many decode steps run; a row that accepted more
        stops early, see _decode_step).

        A draft (see speculative.sanitize_draft) occupies num_tokens-1 rows right after its item's
        prompt (missing ones: pad ids, compared as -1, never accepted); with any draft in the
        batch, every row has those rows (a prefill graph per bucket and batch size with them)."""
        batch = len(input_ids)
        if not 1 <= batch <= MAX_GRAPH_BATCH:
            raise BackendError(f"launch_batch takes 1..{MAX_GRAPH_BATCH} items, got {batch}")
        if pixel_values.shape[0] != batch:
            raise BackendError(f"generate_batch: {pixel_values.shape[0]} images for {batch} prompts")
        if drafts is not None and len(drafts) != batch:
            raise BackendError(f"generate_batch: {len(drafts)} drafts for {batch} prompts")
        if num_tokens < 1:
            raise InputError(f"num_tokens must be >= 1, got {num_tokens}")
        ids = [np.asarray(x, dtype=np.int64).reshape(-1) for x in input_ids]
        if any(x.size < 1 for x in ids):
            raise InputError("empty prompt")
        clean = [None] * batch if drafts is None else [sanitize_draft(d, num_tokens, self.vocab).tokens
                                                        for d in drafts]
        rows = num_tokens - 1 if any(d is not None for d in clean) else 0
        b = padded_batch_size(batch)
        longest = max(x.size for x in ids)
        prompt_pad, kv_len = self._shapes(longest, num_tokens)
        prefill_pad = _round_up(longest + rows, self.prompt_bucket)  # == prompt_pad without a draft
        # a finished row keeps its step at num_tokens-1: its (discarded) K/V go to column
        # L+num_tokens-1 at most, which must exist
        needed = max(kv_len, self.num_patches + prefill_pad, self.num_patches + longest + num_tokens)
        if needed > self._cap or num_tokens > self._slots or b > self._bcap:
            self._allocate(needed, num_tokens, b)
        host, slots, P = self._ints_host_np, self._slots, self.num_patches
        for r in range(b):
            real = r < batch
            x, last = (ids[r], num_tokens - 1) if real else self._dummy_row(ids[0], num_tokens)
            row = host[r]
            row[0], row[1], row[2] = P + x.size, P + x.size - 1, last
            row[3:3 + slots] = -1  # drafts to compare: -1 matches no argmax
            p = row[3 + slots:]
            p[:x.size] = x
            p[x.size:prefill_pad] = self.pad_id
            d = clean[r] if real else None
            if d is not None:
                row[3:3 + d.size] = d
                p[x.size:x.size + d.size] = d
        cuda = self.device.type == "cuda"
        mark = _Marks(self._events if cuda else None)
        mark()
        self._ints[:b].copy_(self._ints_host[:b], non_blocking=True)
        self._pixels[:batch].copy_(pixel_values, non_blocking=True)
        if b > batch:
            self._dummy_pixels(self._pixels[batch:b])
        self._run(("vision", b), lambda: self._vision(b))
        mark()
        self._run(("projector", b), lambda: self._projector(b))
        mark()
        self._run(("prefill", prefill_pad, rows, b), lambda: self._prefill(b, prefill_pad, rows))
        mark()
        accepted = np.zeros(batch, np.int64)
        if rows:
            if cuda:  # the one host sync of a drafted batch: how many decode steps remain
                self._accepted_host[:b].copy_(self._accepted[:b], non_blocking=True)
                self._accepted_ready.record()
                self._accepted_ready.synchronize()
                accepted = self._accepted_host[:batch].numpy().astype(np.int64).copy()
            else:
                accepted = self._accepted[:batch].numpy().astype(np.int64).copy()
        saved_step = self._step[:b].clone() if self.graphs else None
        for _ in range(num_tokens - 1 - int(accepted.min())):
            self._run(("decode", kv_len, b), lambda: self._decode_step(b, kv_len),
                      before_each=lambda: self._step[:b].copy_(saved_step))
            mark()
        self._tokens_host[:b].copy_(self._tokens[:b], non_blocking=True)
        if cuda:
            self._done.record()
        self._pending = (batch, b, num_tokens, mark, accepted)

    def _dummy_row(self, first_ids: np.ndarray, num_tokens: int) -> tuple[np.ndarray, int]:
        """(prompt ids, last step) of a dummy row: BOS only, last step 0 (no decode step of its own)."""
        return first_ids[:1], 0

    def _dummy_pixels(self, pixels: torch.Tensor) -> None:
        pixels.zero_()

    def collect_batch(self):
        """-> (tokens int64[items, num_tokens], accepted int64[items], timings_ms) of launch_batch."""
        batch, b, num_tokens, mark, accepted = self._pending
        self._pending = None
        if self.device.type == "cuda":
            self._done.synchronize()  # the one host sync: the tokens have landed in pinned memory
        ms = mark.ms()
        tokens = self._tokens_host[:batch, :num_tokens].numpy().astype(np.int64).copy()
        self.last_decode_steps_ms = ms[3:]
        self.last_batches.append((batch, b))
        timings = {"vision": ms[0], "projector": ms[1], "prefill": ms[2], "decode": float(sum(ms[3:]))}
        return tokens, accepted, timings

    def launch(self, pixel_values: torch.Tensor, input_ids, num_tokens: int, draft=None) -> None:
        """One action (a batch of one): collect() waits for it. No host sync, except with a draft."""
        self.last_batches = []
        self.launch_batch(pixel_values, [input_ids], num_tokens, None if draft is None else [draft])

    def collect(self):
        tokens, accepted, timings = self.collect_batch()
        self.last_accepted = int(accepted[0])
        return tokens[0], timings

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: np.ndarray, num_tokens: int, draft=None):
        self.launch(pixel_values, input_ids, num_tokens, draft)
        return self.collect()

    @torch.inference_mode()
    def generate_batch(self, pixel_values: torch.Tensor, input_ids, num_tokens: int, drafts=None):
        """Greedy action tokens for B items (the backend contract of backends/__init__.py): row i's
        tokens are those generate() gives item i alone. Runs in chunks of MAX_GRAPH_BATCH items,
        each at the next captured batch size (see launch_batch); timings are summed over chunks."""
        batch = len(input_ids)
        if pixel_values.shape[0] != batch:
            raise BackendError(f"generate_batch: {pixel_values.shape[0]} images for {batch} prompts")
        if drafts is not None and len(drafts) != batch:
            raise BackendError(f"generate_batch: {len(drafts)} drafts for {batch} prompts")
        self.last_batches = []
        tokens, accepted, total = [], [], {"vision": 0.0, "projector": 0.0, "prefill": 0.0, "decode": 0.0}
        for start in range(0, batch, MAX_GRAPH_BATCH):
            end = min(start + MAX_GRAPH_BATCH, batch)
            self.launch_batch(pixel_values[start:end], input_ids[start:end], num_tokens,
                              None if drafts is None else drafts[start:end])
            tok, acc, t = self.collect_batch()
            tokens.append(tok)
            accepted.append(acc)
            for k, v in t.items():
                total[k] += v
        if not tokens:
            return np.zeros((0, num_tokens), np.int64), np.zeros(0, np.int64), total
        return np.concatenate(tokens), np.concatenate(accepted), total

    def last_logits(self, num_tokens: int | None = None, row: int = 0) -> torch.Tensor:
        """float32 (num_tokens, vocab) logits of row `row` of the last (chunk of a) batch: a CPU copy
        (never a view of the buffer the next call overwrites)."""
        n = num_tokens or self._slots
        return self._logits[row, :n].to("cpu", torch.float32, copy=True)

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "path": "fast", "cuda_graphs": self.graphs, "elementwise_ops": self.ops_note,
                "prompt_bucket": self.prompt_bucket, "kv_cache_capacity": self._cap,
                "graph_batch_sizes": list(GRAPH_BATCH_SIZES), "batch_capacity": self._bcap,
                "graphs_captured": _graph_count(self._graphs), "graph_failures": dict(self.graph_failures)}

    def close(self):
        self._graphs.clear()
        self._kv = None
        self.w = None
        self.modules = None
        if self.reference is not None:
            self.reference.close()
            self.reference = None


# -- the OpenVLA-OFT pass ---------------------------------------------------------------------------

@dataclass
class _OFTBuffers:
    """Static buffers of one OFT pass shape: (images, proprio token, text bucket)."""

    pixels: torch.Tensor  # (images, 6, S, S) float32
    patches: torch.Tensor  # (images, 256, vision_dim)
    prefix: torch.Tensor  # (1, images x 256 (+1 proprio), hidden)
    proprio: torch.Tensor | None  # (1, PROPRIO_DIM) float32
    ints: torch.Tensor  # [valid length L, first action row, first placeholder (ids index), ids padded...]
    ints_host: torch.Tensor
    proprio_host: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    arange: torch.Tensor
    neg_inf: torch.Tensor
    rows: torch.Tensor  # (CHUNK x ACTION_DIM, hidden): final-norm hidden states of the action rows
    out: torch.Tensor  # (CHUNK, ACTION_DIM) float32 normalised actions, or (CHUNK x ACTION_DIM,) tokens
    out_host: torch.Tensor


class FastOFTModel(_FusedLlamaRunner):
    """The OpenVLA-OFT pass (model/oft.py) on the fast path: the reference OFTTorchModel's modules,
    head and proprio projector (shared, weights fused in place), run on static buffers.

    Text [BOS ... 29871, CHUNK x ACTION_DIM placeholders, stop] is padded to a multiple of
    prompt_bucket with pad ids AFTER the stop token; every query attends every real key
    (bidirectional, as the OFT transformers fork) and no query attends a pad key (an additive
    key mask built on the device from the valid length), so positions 0..L-1 and every real
    row are those of the unpadded pass. The placeholders' embeddings are zeroed on the device
    (from the first placeholder's index), the action rows gathered from the first action row.

    On CUDA three graphs per shape (images, proprio, text bucket), replayed back to back without
    a host sync: vision, projector (+ proprio token), and the bidirectional LLM forward with the
    head (L1 head or the discrete fallback's argmax) as ONE graph; stage times from CUDA events
    between them ("llm" includes the head, "head" is 0.0). The one sync is the final copy of the
    chunk. On the CPU (or graphs=False) the same functions run eagerly."""

    name = "torch"

    def __init__(self, reference, *, graphs: bool | None = None, compile_ops: bool | None = None,
                 prompt_bucket: int = PROMPT_BUCKET):
        self.reference = reference
        self.config, self.spec, self.codec = reference.config, reference.spec, reference.codec
        self.head, self.proprio_projector = reference.head, reference.proprio_projector
        self._init_runner(reference.modules, reference.config.llm, reference.device, reference.dtype, graphs,
                          compile_ops)
        self.prompt_bucket = int(prompt_bucket)
        self.num_patches = int(self.config.num_patches)
        self.pad_id = int(self.config.pad_token_id)
        self._buffers: dict[tuple, _OFTBuffers] = {}
        if self.device.type == "cuda":
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            self._done = torch.cuda.Event()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "path": "fast", "cuda_graphs": self.graphs, "elementwise_ops": self.ops_note,
                "prompt_bucket": self.prompt_bucket, "graphs_captured": _graph_count(self._graphs),
                "graph_failures": dict(self.graph_failures)}

    def layout(self, prompt_len: int, num_images: int, with_proprio: bool):
        return self.reference.layout(prompt_len, num_images, with_proprio)

    def _alloc(self, key) -> _OFTBuffers:
        n_img, with_proprio, text_pad = key
        dev, dt, pin = self.device, self.dtype, self.device.type == "cuda"
        n_prefix = n_img * self.num_patches + int(with_proprio)
        S = n_prefix + text_pad
        size = self.config.image_size
        cos, sin = self._rope_table(S)
        A = self.spec.num_action_tokens
        p_dim = self.spec.proprio_dim
        if self.head is not None:
            out = torch.zeros(self.spec.num_actions_chunk, self.spec.action_dim, device=dev, dtype=torch.float32)
        else:
            out = torch.zeros(A, device=dev, dtype=torch.long)
        return _OFTBuffers(
            pixels=torch.zeros(n_img, 6, size, size, device=dev, dtype=torch.float32),
            patches=torch.zeros(n_img, self.num_patches, self.modules.vision_dim, device=dev, dtype=dt),
            prefix=torch.zeros(1, n_prefix, self.hidden, device=dev, dtype=dt),
            proprio=torch.zeros(1, p_dim, device=dev, dtype=torch.float32) if with_proprio else None,
            ints=torch.zeros(3 + text_pad, device=dev, dtype=torch.long),
            ints_host=torch.zeros(3 + text_pad, dtype=torch.long, pin_memory=pin),
            proprio_host=torch.zeros(1, p_dim, dtype=torch.float32, pin_memory=pin) if with_proprio else None,
            cos=cos, sin=sin, arange=torch.arange(S, device=dev),
            neg_inf=torch.full((S,), float("-inf"), device=dev, dtype=dt),
            rows=torch.zeros(A, self.hidden, device=dev, dtype=dt),
            out=out, out_host=torch.zeros(out.shape, dtype=out.dtype, pin_memory=pin))

    # -- the pieces (captured per shape) ---------------------------------------------------------
    def _oft_vision(self, buf: _OFTBuffers):
        self._vision_into(buf.pixels, buf.patches)

    def _oft_projector(self, buf: _OFTBuffers):
        n = buf.patches.shape[0] * self.num_patches
        buf.prefix[:, :n].copy_(self.modules.projector(buf.patches.reshape(1, n, -1)))
        if buf.proprio is not None:  # one token after all the patches
            buf.prefix[:, n:].copy_(self.proprio_projector(buf.proprio.to(self.dtype)).unsqueeze(1))

    def _key_mask(self, buf: _OFTBuffers, valid_len: torch.Tensor) -> torch.Tensor:
        """(1, 1, S, S) additive, built once per pass: 0 at the real keys (columns < L), -inf at the
        pads, the same row for every query (bidirectional: nothing else is masked). Materialised
        like the 4-D mask transformers hands SDPA, not a stride-0 broadcast."""
        S = buf.arange.shape[0]
        row = buf.neg_inf.masked_fill(buf.arange < valid_len, 0.0)
        return row.expand(S, S).contiguous().view(1, 1, S, S)

    def _oft_llm(self, buf: _OFTBuffers):
        """[emb(BOS), prefix, emb(prompt[1:]), zeros (placeholders), emb(stop), pads] -> one
        bidirectional forward -> the action rows -> head (or argmax of the LM logits)."""
        A, text_pad = self.spec.num_action_tokens, buf.ints.shape[0] - 3
        valid_len, first_row, first_placeholder = buf.ints[0:1], buf.ints[1:2], buf.ints[2:3]
        emb = F.embedding(buf.ints[3:], self.w.embed)  # (text_pad, hidden)
        j = buf.arange[:text_pad]
        placeholder = (j >= first_placeholder) & (j < first_placeholder + A)
        emb = emb.masked_fill(placeholder.unsqueeze(-1), 0.0)
        seq = torch.cat([emb[:1], buf.prefix[0], emb[1:]], dim=0).unsqueeze(0)
        S = seq.shape[1]
        h = self._llm_layers(seq, buf.cos.view(1, S, 1, -1), buf.sin.view(1, S, 1, -1),
                             mask=self._key_mask(buf, valid_len), causal=False)
        rows = h[0].index_select(0, first_row + buf.arange[:A])
        buf.rows.copy_(rows)
        if self.head is not None:
            buf.out.copy_(self.head(rows.unsqueeze(0), self.spec.num_actions_chunk)[0].float())
        else:
            buf.out.copy_(F.linear(rows, self.w.lm_head).argmax(-1))

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor, prompt_ids, proprio_normalized=None):
        """Same contract as OFTTorchModel.run: pixel_values (N, 6, S, S), one row per image
        (primary first); prompt_ids [BOS ... 29871]; proprio_normalized (PROPRIO_DIM,) or None."""
        from ..oft import OFTLayout, OFTPassOutput, oft_input_ids

        if (proprio_normalized is None) != (self.proprio_projector is None):
            raise InputError("proprio is required by this checkpoint's proprio projector" if proprio_normalized is None
                             else "this checkpoint has no proprio projector: proprio must be None")
        spec, P = self.spec, self.num_patches
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        ids = oft_input_ids(prompt, spec.num_action_tokens)
        n_img, with_proprio = int(pixel_values.shape[0]), proprio_normalized is not None
        text_pad = _round_up(ids.size, self.prompt_bucket)
        key = (n_img, with_proprio, text_pad)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = self._alloc(key)
        layout = OFTLayout(prompt.size, n_img * P + int(with_proprio), spec.num_action_tokens)
        host = buf.ints_host.numpy()
        host[0], host[1], host[2] = layout.length, layout.action_rows_start, prompt.size
        host[3:3 + ids.size] = ids
        host[3 + ids.size:] = self.pad_id
        cuda = self.device.type == "cuda"
        mark = _Marks(self._events if cuda else None)
        mark()
        buf.ints.copy_(buf.ints_host, non_blocking=True)
        buf.pixels.copy_(pixel_values, non_blocking=True)
        if with_proprio:
            buf.proprio_host.copy_(torch.as_tensor(np.asarray(proprio_normalized, np.float32)).view(1, -1))
            buf.proprio.copy_(buf.proprio_host, non_blocking=True)
        self._run(("oft-vision", *key), lambda: self._oft_vision(buf))
        mark()
        self._run(("oft-projector", *key), lambda: self._oft_projector(buf))
        mark()
        self._run(("oft-llm", *key), lambda: self._oft_llm(buf))
        mark()
        buf.out_host.copy_(buf.out, non_blocking=True)
        if cuda:
            self._done.record()
            self._done.synchronize()  # the one host sync: the chunk has landed in pinned memory
        ms = mark.ms()
        out = buf.out_host.numpy().copy()
        tokens = oor = None
        if self.head is not None:
            normalized = out
        else:  # discrete fallback: the LM's greedy token at each action row, decoded as OpenVLA bins
            decoded = self.codec.decode_tokens(out)
            shape = (spec.num_actions_chunk, spec.action_dim)
            normalized, tokens, oor = (decoded.normalized.reshape(shape), out.astype(np.int64).reshape(shape),
                                       decoded.out_of_range.reshape(shape))
        timings = {"vision": ms[0], "projector": ms[1], "llm": ms[2], "head": 0.0}
        return OFTPassOutput(buf.rows.clone().unsqueeze(0), np.asarray(normalized, np.float32), tokens, oor, layout,
                             timings)

    def close(self):
        self._graphs.clear()
        self._buffers.clear()
        self.w = self.modules = self.head = self.proprio_projector = None
        if self.reference is not None:
            self.reference.close()
            self.reference = None
