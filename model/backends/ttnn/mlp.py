"""Llama SwiGLU MLP, tensor-parallel: W1 (gate) and W3 (up) column-parallel, W2 (down)
row-parallel, partial sums all-reduced (ccl.py). The intermediate width is zero-padded to a multiple of
32 x N so every chip's slice is whole tiles (silu(0) * 0 = 0 meets zero rows of W2)."""
from __future__ import annotations

from .linear import Linear
from .weights import TILE, pad_dim, round_up


class MLP:
    def __init__(self, tt, mesh, profile, store, llm_cfg, layer: int, ccl):
        self.tt, self.mesh, self.ccl = tt, mesh, ccl
        self.act_dtype = profile.dtype(tt, "activations")
        self.compute = profile.compute_config(tt, "ffn")
        dt = profile.dtype(tt, "ffn")
        inter = round_up(llm_cfg.intermediate_size, TILE * mesh.num_devices)
        pre = f"model.layers.{layer}.mlp."
        raw = lambda name: store.raw("llm", pre + name)  # noqa: E731
        hidden, local = llm_cfg.hidden_size, inter // mesh.num_devices
        kw = dict(compute=self.compute, decode_compute=profile.compute_config(tt, "decode"))
        self.w1 = Linear(tt, mesh, profile, store, f"llm.{layer}.w1",
                         lambda: pad_dim(raw("gate_proj.weight").transpose(0, 1), 1, inter), dt, shard_dim=1,
                         in_features=hidden, out_features=local, **kw)
        self.w3 = Linear(tt, mesh, profile, store, f"llm.{layer}.w3",
                         lambda: pad_dim(raw("up_proj.weight").transpose(0, 1), 1, inter), dt, shard_dim=1,
                         in_features=hidden, out_features=local, **kw)
        self.w2 = Linear(tt, mesh, profile, store, f"llm.{layer}.w2",
                         lambda: pad_dim(raw("down_proj.weight").transpose(0, 1), 0, inter), dt, shard_dim=0,
                         in_features=local, out_features=hidden, **kw)

    def decode_fused(self, x, residual_memcfg):
        """x: the normed row width-sharded in W1's (= W3's) decode input layout: ONE reshard feeds
        both; SiLU fused into the multiply; the product resharded once for W2; all-reduced into
        `residual_memcfg`. 7 device ops, 2 of them collectives."""
        tt = self.tt
        g1 = self.w1.decode_sharded(x, self.act_dtype)
        g3 = self.w3.decode_sharded(x, self.act_dtype)
        h = tt.multiply(g1, g3, input_tensor_a_activations=[tt.UnaryOpType.SILU], dtype=self.act_dtype,
                        memory_config=g1.memory_config())
        y = self.w2.decode_sharded(tt.to_memory_config(h, self.w2.decode_input), self.act_dtype)
        return self.ccl.all_reduce(y, memory_config=residual_memcfg)

    def __call__(self, x, decode: bool = False):
        tt = self.tt
        mm = (lambda lin, a: lin.decode(a, self.act_dtype)) if decode else (lambda lin, a: lin.prefill(a, self.act_dtype))
        h = tt.multiply(tt.silu(mm(self.w1, x)), mm(self.w3, x))
        return self.ccl.all_reduce(mm(self.w2, h), prefill=not decode)
