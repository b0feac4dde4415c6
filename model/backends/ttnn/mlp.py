"""Llama SwiGLU MLP, tensor-parallel: W1 (gate) and W3 (up) column-parallel, W2 (down)
row-parallel, partial sums all-reduced. The intermediate width is zero-padded to a multiple of
32 x N so every chip's slice is whole tiles (silu(0) * 0 = 0 meets zero rows of W2)."""
from __future__ import annotations

from .attention import all_reduce
from .linear import Linear
from .weights import TILE, pad_dim, round_up


class MLP:
    def __init__(self, tt, mesh, profile, store, llm_cfg, layer: int):
        self.tt, self.mesh = tt, mesh
        self.act_dtype = profile.dtype(tt, "activations")
        self.compute = profile.compute_config(tt, "ffn")
        dt = profile.dtype(tt, "ffn")
        inter = round_up(llm_cfg.intermediate_size, TILE * mesh.num_devices)
        pre = f"model.layers.{layer}.mlp."
        raw = lambda name: store.raw("llm", pre + name)  # noqa: E731
        hidden, local = llm_cfg.hidden_size, inter // mesh.num_devices
        kw = dict(compute=self.compute)
        self.w1 = Linear(tt, mesh, profile, store, f"llm.{layer}.w1",
                         lambda: pad_dim(raw("gate_proj.weight").transpose(0, 1), 1, inter), dt, shard_dim=1,
                         in_features=hidden, out_features=local, **kw)
        self.w3 = Linear(tt, mesh, profile, store, f"llm.{layer}.w3",
                         lambda: pad_dim(raw("up_proj.weight").transpose(0, 1), 1, inter), dt, shard_dim=1,
                         in_features=hidden, out_features=local, **kw)
        self.w2 = Linear(tt, mesh, profile, store, f"llm.{layer}.w2",
                         lambda: pad_dim(raw("down_proj.weight").transpose(0, 1), 0, inter), dt, shard_dim=0,
                         in_features=local, out_features=hidden, **kw)

    def __call__(self, x, decode: bool = False):
        tt = self.tt
        mm = (lambda lin, a: lin.decode(a, self.act_dtype)) if decode else (lambda lin, a: lin.prefill(a, self.act_dtype))
        h = tt.multiply(tt.silu(mm(self.w1, x)), mm(self.w3, x))
        return all_reduce(tt, self.mesh, mm(self.w2, h))
