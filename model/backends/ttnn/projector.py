"""Projector "no-align+fused-gelu-mlp": fc1 (2176 -> 8704) GELU fc2 (-> 4096) GELU fc3 (-> 4096),
replicated on every chip (openvla-spec.md section 3)."""
from __future__ import annotations

from .weights import as_row


class Projector:
    def __init__(self, tt, mesh, profile, store):
        self.tt = tt
        dt = profile.dtype(tt, "projector")
        self.act_dtype = profile.dtype(tt, "activations")
        self.compute = profile.compute_config(tt, "projector")
        raw = lambda local: store.raw("projector", local)  # noqa: E731
        self.layers = []
        for name in ("fc1", "fc2", "fc3"):
            w = store.put(f"projector.{name}.w", lambda n=name: raw(f"{n}.weight").transpose(0, 1), dt)
            b = store.put(f"projector.{name}.b", lambda n=name: as_row(raw(f"{n}.bias")), dt)
            self.layers.append((w, b))

    def __call__(self, x):
        tt = self.tt
        for i, (w, b) in enumerate(self.layers):
            x = tt.linear(x, w, bias=b, compute_kernel_config=self.compute, dtype=self.act_dtype)
            if i < 2:
                x = tt.gelu(x)
        return x
