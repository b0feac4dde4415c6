"""TT-NN backend: OpenVLA on an N300 (1x2) or T3K (1x8) Tenstorrent mesh.

Rooms (one block per file, as tt-metal's tt_transformers): mesh (open/close by name),
model_config (precision + fidelity per mesh from config/ttnn/<MESH>.yaml), weights (checkpoint
-> mesh tensors, disk cache), vision, projector, attention, mlp, decoder, llm, backend.
Importing this package does not import ttnn; TtnnBackend does, when constructed.
"""
from __future__ import annotations


def __getattr__(name):
    if name == "TtnnBackend":
        from .backend import TtnnBackend

        return TtnnBackend
    raise AttributeError(name)


__all__ = ["TtnnBackend"]
