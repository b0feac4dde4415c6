"""Projector "no-align+fused-gelu-mlp": fc1 (2176 -> 8704) GELU fc2 (-> 4096) GELU fc3 (-> 4096),
replicated on every chip (openvla-spec.md section 3).

Its input is the vision stage's gathered features (vision.py): each tower's features sit at an
offset of that tensor, possibly with extra columns (DINOv2's width padding) and a scale (DINOv2's
residual scale s). fc1's rows are laid out to match: tower j's rows at its offset, divided by its
scale, zero rows for the extra columns; so fc1 computes exactly timm features @ fc1.

Row-wise (three linears and two GELUs on the last dim), so a batch of images needs nothing of
its own: the vision's (B, 1, 256, dim) gives (B, 1, 256, hidden), item b = image b's alone
(test_ttnn_vision_split.py checks it per item).
"""
from __future__ import annotations

import torch

from .weights import as_row


def fc1_rows(w: torch.Tensor, feature_layout, width: int) -> torch.Tensor:
    """fc1 as (in, out) for the concatenated towers -> (width, out) for the gathered layout:
    feature_layout = [(offset, real width, scale that gives timm's features), ...] in tower order."""
    if sum(e for _, e, _ in feature_layout) != w.shape[0]:
        raise ValueError(f"projector fc1 has {w.shape[0]} input rows, the towers give "
                         f"{sum(e for _, e, _ in feature_layout)}")
    out = w.new_zeros(width, w.shape[1])
    start = 0
    for off, e, k in feature_layout:
        out[off:off + e] = w[start:start + e] * k
        start += e
    return out


class Projector:
    def __init__(self, tt, mesh, profile, store, feature_layout=None, feature_dim: int | None = None):
        """feature_layout / feature_dim: FusedVision's (None: the plain concatenation)."""
        self.tt = tt
        dt = profile.dtype(tt, "projector")
        self.act_dtype = profile.dtype(tt, "activations")
        self.compute = profile.compute_config(tt, "projector")
        raw = lambda local: store.raw("projector", local)  # noqa: E731

        def weight(name):
            w = raw(f"{name}.weight").transpose(0, 1)
            if name == "fc1" and feature_layout is not None:
                w = fc1_rows(w, feature_layout, feature_dim)
            return w

        self.layers = []
        for name in ("fc1", "fc2", "fc3"):
            w = store.put(f"projector.{name}.w", lambda n=name: weight(n), dt)
            b = store.put(f"projector.{name}.b", lambda n=name: as_row(raw(f"{n}.bias")), dt)
            self.layers.append((w, b))

    def __call__(self, x):
        tt = self.tt
        for i, (w, b) in enumerate(self.layers):
            x = tt.linear(x, w, bias=b, compute_kernel_config=self.compute, dtype=self.act_dtype)
            if i < 2:
                x = tt.gelu(x)
        return x
