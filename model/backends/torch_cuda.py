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

On the CPU (or with graphs=False) the very same functions run eagerly: that is how the tests
check this path against the reference on the tiny checkpoint.

Switches: create_backend("torch", ..., fast=True|False) or OPENVLA_TORCH_FAST=1|0 (default:
on for CUDA, off for CPU); OPENVLA_TORCH_COMPILE=1|0 (default: on for CUDA).
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


# -- the backend -------------------------------------------------------------------------------

class FastTorchBackend:
    name = "torch"
    supports_draft = True  # generate(..., draft=) verifies drafts in the prefill

    def __init__(self, config, checkpoint=None, device=None, dtype=None, *, reference: TorchBackend | None = None,
                 graphs: bool | None = None, compile_ops: bool | None = None, prompt_bucket: int = PROMPT_BUCKET):
        self.reference = reference if reference is not None else TorchBackend(config, checkpoint, device=device,
                                                                              dtype=dtype)
        self.config = config
        self.device = self.reference.device
        self.dtype = self.reference.dtype
        self.modules = self.reference.modules
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else bool(graphs)
        if self.graphs and not cuda:
            raise BackendError("CUDA graphs need a CUDA device")
        self.preprocess_device = str(self.device) if cuda else "cpu"
        self.prompt_bucket = int(prompt_bucket)

        llm_cfg = config.llm
        self.hidden = int(llm_cfg.hidden_size)
        self.heads = int(llm_cfg.num_attention_heads)
        self.kv_heads = int(getattr(llm_cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(llm_cfg, "head_dim", None) or self.hidden // self.heads)
        self.n_layers = int(llm_cfg.num_hidden_layers)
        self.eps = float(llm_cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.num_patches = int(config.num_patches)
        self.vocab = int(config.vocab_size)
        self.pad_id = int(config.pad_token_id)
        rotary = self.modules.llm.model.rotary_emb
        self._inv_freq = rotary.inv_freq.detach().to(self.device, torch.float32)
        self._rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

        self.w = fuse_llama_weights(self.modules.llm)
        env_compile = _env_flag(ENV_COMPILE)
        want_compile = compile_ops if compile_ops is not None else (cuda and env_compile is not False)
        if want_compile:
            with torch.inference_mode():
                self.ops, self.ops_note = compiled_ops_checked(
                    self.device, self.dtype, self.hidden, self.heads, self.head_dim,
                    int(llm_cfg.intermediate_size), self.eps)
        else:
            self.ops, self.ops_note = Ops(compiled=False), "eager"

        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._vision_stream = torch.cuda.Stream(self.device) if cuda else None
        self._graphs: dict = {}
        self.graph_failures: dict[str, str] = {}
        self.last_decode_steps_ms: list[float] = []
        self.last_accepted = 0  # drafts accepted by the last generate()
        self._cap = 0
        self._slots = 0
        with torch.inference_mode():
            self._allocate(self.num_patches + 4 * self.prompt_bucket + 8, 8)

    # -- buffers -----------------------------------------------------------------------------
    def _allocate(self, needed_len: int, num_tokens: int) -> None:
        """(Re)allocate the KV cache and the static buffers; drops every captured graph."""
        cap = max(self._cap, _round_up(needed_len, CACHE_ALIGN))
        slots = max(self._slots, MIN_TOKEN_SLOTS, num_tokens)
        if cap == self._cap and slots == self._slots:
            return
        dev, dt = self.device, self.dtype
        self._graphs.clear()
        self._kv = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        self._cap, self._slots = cap, slots
        self._kv = torch.zeros(self.n_layers, 2, 1, self.kv_heads, cap, self.head_dim, device=dev, dtype=dt)
        pos = torch.arange(cap, device=dev, dtype=torch.float32)
        freqs = pos[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = (emb.cos() * self._rope_scaling).to(dt)
        self._sin = (emb.sin() * self._rope_scaling).to(dt)
        self._arange = torch.arange(cap, device=dev)
        self._neg_inf = torch.full((cap,), float("-inf"), device=dev, dtype=dt)
        self._tokens = torch.zeros(slots, dtype=torch.long, device=dev)
        self._logits = torch.zeros(slots, self.vocab, dtype=dt, device=dev)
        self._step = torch.zeros(1, dtype=torch.long, device=dev)
        self._accepted = torch.zeros(1, dtype=torch.long, device=dev)
        # [sequence length L, index of the last real position L-1, drafts to compare (-1: none)
        # x slots, prompt ids (+ draft ids) padded...]: one host->device copy per action
        pin = dev.type == "cuda"
        self._ints_host = torch.zeros(cap + 2 + slots, dtype=torch.long, pin_memory=pin)
        self._ints_host_np = self._ints_host.numpy()
        self._ints = torch.zeros(cap + 2 + slots, dtype=torch.long, device=dev)
        self._seq_len, self._last_idx = self._ints[0:1], self._ints[1:2]
        self._draft, self._ids = self._ints[2:2 + slots], self._ints[2 + slots:]
        self._tokens_host = torch.zeros(slots, dtype=torch.long, pin_memory=pin)
        self._accepted_host = torch.zeros(1, dtype=torch.long, pin_memory=pin)
        size = self.config.image_size
        self._pixels = torch.zeros(1, 6, size, size, device=dev, dtype=torch.float32)
        vision_dim = self.modules.vision_dim
        self._patches = torch.zeros(1, self.num_patches, vision_dim, device=dev, dtype=dt)
        self._projected = torch.zeros(1, self.num_patches, self.hidden, device=dev, dtype=dt)
        if dev.type == "cuda":
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4 + slots)]
            self._done = torch.cuda.Event()
            self._accepted_ready = torch.cuda.Event()

    # -- the model pieces (the functions that get captured) ------------------------------------
    def _vision(self):
        px = self._pixels.to(self.dtype)
        side = self._vision_stream
        if side is None:
            self._patches.copy_(self.modules.vision(px))
            return
        # The two towers are independent and each too small to fill the GPU: run SigLIP on a
        # side stream while DINOv2 runs here (fork/join, so the captured graph gets two branches).
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            siglip = self.modules.fused_featurizer(px[:, 3:])
        dino = self.modules.featurizer(px[:, :3])
        main.wait_stream(side)
        self._patches.copy_(torch.cat([dino, siglip], dim=2))

    def _projector(self):
        self._projected.copy_(self.modules.projector(self._patches))

    def _llm_layers(self, x, cos, sin, pos=None, mask=None, kv_len=None):
        """All decoder layers + final norm. Prefill (pos None): causal over x, K/V written to
        cache[:S]. Decode (x has 1 token): K/V written at `pos`, attention over cache[:kv_len]
        with `mask` hiding the slots after `pos`. Returns the final-normed hidden states."""
        ops, w, eps = self.ops, self.w, self.eps
        S, H, KV, D = x.shape[1], self.heads, self.kv_heads, self.head_dim
        gqa = {"enable_gqa": True} if KV != H else {}
        h = ops.rms_norm(x, w.in_norm[0], eps)
        for i in range(self.n_layers):
            qkv = F.linear(h, w.qkv[i]).view(1, S, H + 2 * KV, D)
            qk = ops.rope(qkv[:, :, :H + KV], cos, sin)
            q = qk[:, :, :H].transpose(1, 2)
            k = qk[:, :, H:].transpose(1, 2)
            v = qkv[:, :, H + KV:].transpose(1, 2)
            k_cache, v_cache = self._kv[i, 0], self._kv[i, 1]
            if pos is None:
                k_cache[:, :, :S].copy_(k)
                v_cache[:, :, :S].copy_(v)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **gqa)
            else:
                k_cache.index_copy_(2, pos, k)
                v_cache.index_copy_(2, pos, v)
                a = F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len],
                                                   attn_mask=mask, scale=self.scale, **gqa)
            a = a.transpose(1, 2).reshape(1, S, H * D)
            x, h = ops.add_rms_norm(x, F.linear(a, w.o[i]), w.post_norm[i], eps)
            m = F.linear(ops.silu_mul(F.linear(h, w.gate_up[i])), w.down[i])
            nxt = w.in_norm[i + 1] if i + 1 < self.n_layers else w.final_norm
            x, h = ops.add_rms_norm(x, m, nxt, eps)
        return h

    def _prefill(self, prompt_pad: int, rows: int = 0):
        """[BOS, 256 projected patches, prompt[1:], d1..d_rows, pad...] -> KV cache, tokens,
        logits, step. Without drafts (rows 0): token 0 and logits 0, step 0. With draft rows
        (d_j at position L+j-1, right after the prompt): the greedy token after each of the rows
        L-1..L-1+rows, the accepted count k (speculative.accepted_length against the drafts to
        compare, on the device), tokens 0..k valid and step = k (the decode steps go on from
        there and overwrite the rest, KV rows included)."""
        S = self.num_patches + prompt_pad
        emb = F.embedding(self._ids[:prompt_pad], self.w.embed)
        seq = torch.cat([emb[:1], self._projected[0], emb[1:]], dim=0).unsqueeze(0)
        cos, sin = self._cos[:S].view(1, S, 1, -1), self._sin[:S].view(1, S, 1, -1)
        h = self._llm_layers(seq, cos, sin)
        idx = self._last_idx + self._arange[:rows + 1] if rows else self._last_idx  # rows L-1 .. L-1+rows
        logits = F.linear(h[0].index_select(0, idx), self.w.lm_head)  # (rows+1, V)
        predicted = logits.argmax(-1)
        self._logits[:rows + 1].copy_(logits)
        self._tokens[:rows + 1].copy_(predicted)
        if rows:
            accepted = accepted_length(self._draft[:rows], predicted).view(1)
            self._step.copy_(accepted)
            self._accepted.copy_(accepted)
        else:
            self._step.zero_()

    def _decode_step(self, kv_len: int):
        """One token: reads tokens[step] at position L+step, writes tokens[step+1]; step += 1."""
        step = self._step
        pos = self._seq_len + step
        x = F.embedding(self._tokens.index_select(0, step), self.w.embed).view(1, 1, -1)
        cos = self._cos.index_select(0, pos).view(1, 1, 1, -1)
        sin = self._sin.index_select(0, pos).view(1, 1, 1, -1)
        # additive mask, built once per step (a boolean one is converted again in every layer)
        mask = self._neg_inf[:kv_len].masked_fill(self._arange[:kv_len] <= pos, 0.0).view(1, 1, 1, kv_len)
        h = self._llm_layers(x, cos, sin, pos=pos, mask=mask, kv_len=kv_len)
        logits = F.linear(h[:, 0], self.w.lm_head)  # (1, V)
        nxt = step + 1
        self._logits.index_copy_(0, nxt, logits)
        self._tokens.index_copy_(0, nxt, logits.argmax(-1))
        step.add_(1)

    # -- running -------------------------------------------------------------------------------
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

    def _shapes(self, num_prompt: int, num_tokens: int) -> tuple[int, int]:
        prompt_pad = _round_up(num_prompt, self.prompt_bucket)
        kv_len = _round_up(self.num_patches + prompt_pad + max(num_tokens - 1, 1), 16)
        return prompt_pad, kv_len

    def launch(self, pixel_values: torch.Tensor, input_ids, num_tokens: int, draft=None) -> None:
        """Queue the whole action on the device; collect() waits for it. No host sync, except
        with a draft: one, to read the accepted count (it sets how many decode steps remain).

        A draft (see speculative.sanitize_draft) occupies num_tokens-1 rows right after the
        prompt (missing ones: pad ids, compared as -1, never accepted), in a prefill graph of its
        own per prompt bucket; the decode-step graphs are the plain path's."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        if ids.size < 1:
            raise InputError("empty prompt")
        if num_tokens < 1:
            raise InputError(f"num_tokens must be >= 1, got {num_tokens}")
        drafts = sanitize_draft(draft, num_tokens, self.vocab).tokens
        rows = num_tokens - 1 if drafts is not None else 0
        prompt_pad, kv_len = self._shapes(ids.size, num_tokens)
        prefill_pad = _round_up(ids.size + rows, self.prompt_bucket)  # == prompt_pad without a draft
        needed = max(kv_len, self.num_patches + prefill_pad)
        if needed > self._cap or num_tokens > self._slots:
            self._allocate(needed, num_tokens)
        L = self.num_patches + ids.size
        host, slots = self._ints_host_np, self._slots
        host[0], host[1] = L, L - 1
        host[2:2 + slots] = -1  # drafts to compare: -1 matches no argmax
        p = host[2 + slots:]
        p[:ids.size] = ids
        p[ids.size:prefill_pad] = self.pad_id
        if drafts is not None:
            host[2:2 + drafts.size] = drafts
            p[ids.size:ids.size + drafts.size] = drafts
        cuda = self.device.type == "cuda"
        marks = []

        def mark():
            if cuda:
                ev = self._events[len(marks)]
                ev.record()
                marks.append(ev)
            else:
                marks.append(time.perf_counter())

        mark()
        n_ints = 2 + slots + prefill_pad
        self._ints[:n_ints].copy_(self._ints_host[:n_ints], non_blocking=True)
        self._pixels.copy_(pixel_values, non_blocking=True)
        self._run("vision", self._vision)
        mark()
        self._run("projector", self._projector)
        mark()
        self._run(("prefill", prefill_pad, rows), lambda: self._prefill(prefill_pad, rows))
        mark()
        accepted = 0
        if rows:
            if cuda:  # the one host sync of a drafted action: how many decode steps remain
                self._accepted_host.copy_(self._accepted, non_blocking=True)
                self._accepted_ready.record()
                self._accepted_ready.synchronize()
                accepted = int(self._accepted_host[0])
            else:
                accepted = int(self._accepted[0])
        saved_step = self._step.clone() if self.graphs else None
        for _ in range(num_tokens - 1 - accepted):
            self._run(("decode", kv_len), lambda: self._decode_step(kv_len),
                      before_each=lambda: self._step.copy_(saved_step))
            mark()
        self._tokens_host[:num_tokens].copy_(self._tokens[:num_tokens], non_blocking=True)
        if cuda:
            self._done.record()
        self._pending = (num_tokens, marks, accepted)

    def collect(self):
        num_tokens, marks, accepted = self._pending
        self._pending = None
        if self.device.type == "cuda":
            self._done.synchronize()  # the one host sync: the tokens have landed in pinned memory
            ms = [marks[i].elapsed_time(marks[i + 1]) for i in range(len(marks) - 1)]
        else:
            ms = [(marks[i + 1] - marks[i]) * 1e3 for i in range(len(marks) - 1)]
        tokens = self._tokens_host[:num_tokens].numpy().astype(np.int64).copy()
        self.last_decode_steps_ms = ms[3:]
        self.last_accepted = accepted
        timings = {"vision": ms[0], "projector": ms[1], "prefill": ms[2], "decode": float(sum(ms[3:]))}
        return tokens, timings

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: np.ndarray, num_tokens: int, draft=None):
        self.launch(pixel_values, input_ids, num_tokens, draft)
        return self.collect()

    def last_logits(self, num_tokens: int | None = None) -> torch.Tensor:
        """float32 (num_tokens, vocab) logits of the last generate() (CPU copy, for diagnostics)."""
        n = num_tokens or self._slots
        return self._logits[:n].float().cpu()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "path": "fast", "cuda_graphs": self.graphs, "elementwise_ops": self.ops_note,
                "prompt_bucket": self.prompt_bucket, "kv_cache_capacity": self._cap,
                "graphs_captured": len([g for g in self._graphs.values() if not isinstance(g, _Eager)]),
                "graph_failures": dict(self.graph_failures)}

    def close(self):
        self._graphs.clear()
        self._kv = None
        self.w = None
        self.modules = None
        if self.reference is not None:
            self.reference.close()
            self.reference = None
