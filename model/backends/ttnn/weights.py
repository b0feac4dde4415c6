"""Checkpoint -> mesh tensors: the layout transforms (transpose to (in, out), head padding,
per-chip QKV fusion, vocab padding) and the on-disk cache of converted tensors.

Checkpoint keys come from modeling.module_to_checkpoint_key (the one key mapping). A converted
tensor is cached with ttnn.as_tensor(cache_file_name=...) under
`<cache root>/<weights fingerprint>/<MESH>-<profile hash>/`, whichever the root (the default one
or an explicit cache_dir), so the second start loads tiles straight from disk and never reads or
transforms the safetensors again, and a changed checkpoint or precision converts again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from ...errors import BackendError, CheckpointError
from ...modeling import module_to_checkpoint_key

log = logging.getLogger("openvla_model.ttnn")

TILE = 32
# Bump when a transform below changes: old caches then miss instead of loading stale layouts.
WEIGHT_FORMAT_VERSION = 2  # 2: vision towers split over the chips, projector fc1 in their gathered layout


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def default_cache_root() -> Path:
    env = os.environ.get("OPENVLA_TTNN_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openvla_ros" / "ttnn"


def checkpoint_fingerprint(checkpoint) -> str | None:
    """Hash of the weight files' names, sizes and mtimes; a checkpoint that is not a set of files
    may name its own content with a `fingerprint` attribute. None: the content cannot be named,
    so nothing is cached."""
    own = getattr(checkpoint, "fingerprint", None)
    if own is not None:
        return hashlib.sha256(str(own).encode()).hexdigest()[:16]
    d = getattr(checkpoint, "dir", None)
    files = sorted(set(getattr(checkpoint, "key_file", {}).values()))
    if d is None or not files:
        return None
    h = hashlib.sha256(str(Path(d).resolve()).encode())
    for name in files:
        st = (Path(d) / name).stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def profile_key(profile) -> str:
    """`<MESH>-<hash of the weight dtypes and the conversion format>`: what the cached tiles depend on."""
    prof = hashlib.sha256(json.dumps([profile.dtypes, WEIGHT_FORMAT_VERSION], sort_keys=True).encode())
    return f"{profile.mesh_name}-{prof.hexdigest()[:8]}"


class WeightStore:
    """Reads checkpoint tensors (float32, on the host) and puts converted tensors on the mesh."""

    def __init__(self, tt, mesh, checkpoint, profile, cache_dir: str | Path | None = "auto"):
        """cache_dir: "auto" (the default root, $OPENVLA_TTNN_CACHE or ~/.cache/openvla_ros/ttnn),
        a directory to use as the root instead, or None (no cache). Either root is keyed below by
        the checkpoint fingerprint and the precision profile."""
        self.tt, self.mesh, self.checkpoint, self.profile = tt, mesh, checkpoint, profile
        self.cache_dir = None
        if cache_dir:
            fp = checkpoint_fingerprint(checkpoint)
            root = default_cache_root() if cache_dir == "auto" else Path(cache_dir)
            if fp is not None:
                self.cache_dir = root / fp / profile_key(profile)
            elif cache_dir != "auto":
                log.warning("weight cache %s not used: the checkpoint has no fingerprint to key it by", root)
        self.hits = self.misses = 0

    # ---- reading -------------------------------------------------------------------------
    def raw(self, comp: str, local: str) -> torch.Tensor:
        key = module_to_checkpoint_key(comp, local)
        for _, t in self.checkpoint.load([key], dtype=torch.float32):
            return t.float()
        raise CheckpointError(f"{key} missing from the checkpoint")

    # ---- writing -------------------------------------------------------------------------
    def _cache_path(self, name: str, dtype, layout) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{name}_dtype_{dtype.name}_layout_{layout.name}.tensorbin"

    def put(self, name: str, make: Callable[[], torch.Tensor], dtype, *, shard_dim: int | None = None,
            layout=None, memory_config=None):
        """The device tensor `name`: from the cache when present, else make() converted (and cached).
        shard_dim None = replicated on every chip; an int = split along that dim, chip i gets part i."""
        tt, mesh = self.tt, self.mesh.device
        layout = tt.TILE_LAYOUT if layout is None else layout
        memory_config = tt.DRAM_MEMORY_CONFIG if memory_config is None else memory_config
        mapper = tt.ReplicateTensorToMesh(mesh) if shard_dim is None else tt.ShardTensorToMesh(mesh, dim=shard_dim)
        path = self._cache_path(name, dtype, layout)
        if path is not None and path.is_file():
            try:
                t = tt.as_tensor(None, dtype=dtype, layout=layout, device=mesh, memory_config=memory_config,
                                 mesh_mapper=mapper, cache_file_name=str(self.cache_dir / name))
                if hasattr(t, "memory_config") and t.memory_config() != memory_config:
                    t = tt.to_memory_config(t, memory_config)  # e.g. DRAM-sharded decode weights
                self.hits += 1
                return t
            except Exception as e:  # corrupt / incompatible cache file: rebuild it
                log.warning("weight cache %s unusable (%s): converting again", path, e)
                path.unlink(missing_ok=True)
        host = make()
        self.misses += 1
        if shard_dim is not None and host.shape[shard_dim] % self.mesh.num_devices:
            raise BackendError(f"internal: {name} dim {shard_dim} = {host.shape[shard_dim]} does not split over "
                               f"{self.mesh.num_devices} chips")
        kwargs = dict(dtype=dtype, layout=layout, device=mesh, memory_config=memory_config, mesh_mapper=mapper)
        if path is not None:
            return tt.as_tensor(host.contiguous(), cache_file_name=str(self.cache_dir / name), **kwargs)
        return tt.from_torch(host.contiguous(), **kwargs)


# ---- layout transforms (pure torch, host) ------------------------------------------------
def pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad dim of t up to size."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def as_row(v: torch.Tensor) -> torch.Tensor:
    """(W,) -> (1, 1, 1, W): norm gains, biases, LayerScale, broadcast over rows."""
    return v.reshape(1, 1, 1, -1)


def pad_heads(w: torch.Tensor, groups: int, heads: int, head_dim: int, padded: int, dim: int = 0) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) laid out as [group][head][head_dim]: pad each head's
    head_dim to `padded` with zeros (SigLIP's 72 -> 96 for tiling). Zero q/k padding leaves q.k
    unchanged; zero v padding yields zero outputs that meet zero rows of the projection."""
    if head_dim == padded:
        return w
    moved = w if dim == 0 else w.transpose(0, 1)
    rest = moved.shape[1:]
    moved = moved.reshape(groups, heads, head_dim, *rest)
    moved = pad_dim(moved, 2, padded).reshape(groups * heads * padded, *rest)
    return moved if dim == 0 else moved.transpose(0, 1)


def patch_weight(conv_w: torch.Tensor, k_padded: int) -> torch.Tensor:
    """Conv (E, C, p, p) -> matmul weight (C*p*p padded, E) matching `patchify` below."""
    e = conv_w.shape[0]
    return pad_dim(conv_w.reshape(e, -1).transpose(0, 1), 0, k_padded)


def patchify(pixels: torch.Tensor, patch: int, k_padded: int) -> torch.Tensor:
    """(1, C, H, W) -> (1, 1, patches, C*p*p padded): the conv's im2col, a pure re-layout (no
    arithmetic) done on the host so the patch embedding is one device matmul."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, 1, gh * gw, c * patch * patch)
    return pad_dim(x, 3, k_padded)
