"""A stand-in for the `ttnn` module that computes every op with ttnn's own golden functions
(ttnn.get_golden_function(op): ttnn's PyTorch reference) on host tensors, with the mesh emulated
chip by chip: a mesh tensor is one torch tensor per chip (replicated or sharded as the mesh
mapper says), each op runs once per chip on that chip's shard, and the collectives combine the
chips' shards with ttnn's collective goldens.

The TT-NN backend takes it in place of `ttnn` (TtnnBackend(..., tt=GoldenTTNN(8))), so the
production model code — sharding, head split, RoPE layout, KV-cache indexing, token
bookkeeping — is what runs. What it does NOT check: kernels, tiling, memory, device precision
(everything here is float32; dtypes and compute configs are ignored) — the mock-device tests and
the hardware tests cover those.

What the goldens are given is recorded, so tests can check what the emulation cannot show in
numbers: `op_kwargs[op]` lists, per call, the epsilon passed to a norm (None = ttnn's default
1e-12 would apply) and the fused activation a program config carries (the linear/matmul goldens
apply it: program_config reaches them); `stripped_kwargs[op]` names the device-only keyword
arguments that were dropped before the golden ran. `as_tensor(cache_file_name=...)` keeps ttnn's
cache file contract (`<name>_dtype_<DTYPE>_layout_<LAYOUT>.tensorbin`, loaded instead of the
given tensor when present), so weight-cache behaviour runs here too.

Only the names the model uses are provided; anything else raises AttributeError naming it, so
a new op in the model cannot silently bypass the emulation.
"""
from __future__ import annotations

from pathlib import Path

import ttnn
import torch

# Constants and config objects taken from the real ttnn (they carry no data).
_PASSTHROUGH = {
    "bfloat16", "bfloat8_b", "bfloat4_b", "float32", "uint32", "int32",
    "TILE_LAYOUT", "ROW_MAJOR_LAYOUT", "DRAM_MEMORY_CONFIG", "L1_MEMORY_CONFIG",
    "MathFidelity", "WormholeComputeKernelConfig", "FabricConfig", "MeshShape", "CoreGrid", "ShardStrategy",
    "create_sharded_memory_config", "CoreCoord", "CoreRange", "CoreRangeSet", "MemoryConfig", "TensorMemoryLayout",
    "BufferType", "ShardSpec", "ShardOrientation", "num_cores_to_corerangeset", "L1_WIDTH_SHARDED_MEMORY_CONFIG",
    "MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig", "MatmulMultiCoreReuseMultiCastProgramConfig",
}
# Keyword arguments that only steer the device (placement, kernels, precision): not part of the math.
_DEVICE_ONLY = {"memory_config", "compute_kernel_config", "dtype", "program_config", "core_grid", "layout",
                "queue_id", "output_tensor", "sub_core_grids"}
# ...except a matmul's program config, which may carry a fused activation: its golden applies it.
_KEEP_FOR = {"linear": {"program_config"}, "matmul": {"program_config"}}
_NORMS = ("layer_norm", "rms_norm")
_INT_DTYPES = ("uint32", "int32")


class EmuTensor:
    """One torch tensor per chip (float32, or int64 for uint32/int32 tensors)."""

    def __init__(self, shards: list, on_device: bool = True):
        self.shards = shards
        self.on_device = on_device

    @property
    def shape(self):
        return tuple(self.shards[0].shape)

    def __repr__(self):
        return f"EmuTensor({len(self.shards)} chips, per-chip shape {self.shape})"


class EmuMesh:
    def __init__(self, shape):
        self.shape = tuple(shape)
        self.n = self.shape[0] * self.shape[1]
        self.open = True

    def get_num_devices(self):
        return self.n

    # A Wormhole chip's grids (memory configs and program configs are built from them).
    def dram_grid_size(self):
        return ttnn.CoreCoord(12, 1)

    def compute_with_storage_grid_size(self):
        return ttnn.CoreCoord(8, 8)


class _Mapper:
    def __init__(self, mesh, dim=None):
        self.n, self.dim = mesh.n, dim

    def split(self, t: torch.Tensor) -> list:
        if self.dim is None:
            return [t.clone() for _ in range(self.n)]
        if t.shape[self.dim] % self.n:
            raise ValueError(f"cannot shard dim {self.dim} of {tuple(t.shape)} over {self.n} chips")
        return [c.clone() for c in torch.chunk(t, self.n, dim=self.dim)]


class _Composer:
    def __init__(self, mesh, dim):
        self.dim = dim


class _Namespace:
    def __init__(self, owner, prefix, names):
        self._owner, self._prefix, self._names = owner, prefix, names

    def __getattr__(self, name):
        if name not in self._names:
            raise AttributeError(f"ttnn.{self._prefix}.{name} is not emulated by GoldenTTNN")
        return getattr(self._owner, f"_{self._prefix}_{name}")


def _golden(op):
    return ttnn.get_golden_function(op)


class GoldenTTNN:
    def __init__(self, available_devices: int):
        self.available = int(available_devices)
        self.fabric = None
        self.ops_run: dict[str, int] = {}
        self.op_kwargs: dict[str, list[dict]] = {}  # op -> per call {"epsilon": ..., "fused_activation": ...}
        self.stripped_kwargs: dict[str, set[str]] = {}  # op -> device-only kwargs dropped before the golden
        self.cache_files_read = 0
        self.transformer = _Namespace(self, "transformer", {"scaled_dot_product_attention",
                                                            "scaled_dot_product_attention_decode"})
        self.experimental = _Namespace(self, "experimental", {"paged_update_cache"})

    def __getattr__(self, name):
        if name in _PASSTHROUGH:
            return getattr(ttnn, name)
        raise AttributeError(f"ttnn.{name} is not emulated by GoldenTTNN")

    # ---- device management ---------------------------------------------------------------------
    def GetNumAvailableDevices(self):
        return self.available

    def set_fabric_config(self, cfg):
        self.fabric = cfg

    def open_mesh_device(self, mesh_shape, **_):
        shape = (mesh_shape[0], mesh_shape[1]) if not hasattr(mesh_shape, "dims") else tuple(mesh_shape)
        mesh = EmuMesh(shape)
        if mesh.n > self.available:
            raise RuntimeError(f"requested {mesh.n} devices, {self.available} available")
        if mesh.n > 1 and self.fabric not in (ttnn.FabricConfig.FABRIC_1D, ttnn.FabricConfig.FABRIC_1D_RING):
            raise RuntimeError("collectives need set_fabric_config(FABRIC_1D or FABRIC_1D_RING) before open_mesh_device")
        return mesh

    def close_mesh_device(self, mesh):
        mesh.open = False

    def synchronize_device(self, mesh):
        pass

    # ---- host <-> mesh -------------------------------------------------------------------------
    def ReplicateTensorToMesh(self, mesh):
        return _Mapper(mesh)

    def ShardTensorToMesh(self, mesh, dim):
        return _Mapper(mesh, dim)

    def ConcatMeshToTensor(self, mesh, dim):
        return _Composer(mesh, dim)

    def from_torch(self, tensor, dtype=None, layout=None, device=None, mesh_mapper=None, **_):
        integer = dtype is not None and any(dtype == getattr(ttnn, d) for d in _INT_DTYPES)
        t = tensor.to(torch.int64) if integer else tensor.to(torch.float32)
        shards = mesh_mapper.split(t) if mesh_mapper is not None else [t.clone()]
        return EmuTensor(shards, on_device=device is not None)

    def as_tensor(self, tensor, dtype=None, layout=None, device=None, mesh_mapper=None, cache_file_name=None, **_):
        """ttnn.as_tensor: with cache_file_name, load `<name>_dtype_<D>_layout_<L>.tensorbin` when it
        exists (the given tensor is then ignored, as ttnn does), else write it."""
        path = None
        if cache_file_name is not None:
            path = Path(f"{cache_file_name}_dtype_{dtype.name}_layout_{layout.name}.tensorbin")
            if path.is_file():
                self.cache_files_read += 1
                tensor = torch.load(path, weights_only=True)
            elif tensor is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(tensor.detach().float().cpu().clone(), path)
        if tensor is None:
            raise RuntimeError(f"GoldenTTNN.as_tensor: no tensor and no cache file {path}")
        return self.from_torch(tensor, dtype=dtype, layout=layout, device=device, mesh_mapper=mesh_mapper)

    def to_torch(self, t, mesh_composer=None, **_):
        if mesh_composer is None:
            if len(t.shards) != 1:
                raise ValueError("to_torch of a multi-chip tensor needs a mesh_composer")
            return t.shards[0].clone()
        return torch.cat(t.shards, dim=mesh_composer.dim)

    def get_device_tensors(self, t):
        return [EmuTensor([s]) for s in t.shards]

    def copy_host_to_device_tensor(self, src, dst, *_, **__):
        for s, d in zip(src.shards, dst.shards, strict=True):
            d.copy_(s)

    def to_layout(self, t, layout, **_):
        return t

    def to_memory_config(self, t, memory_config, **_):
        return t

    def sharded_to_interleaved(self, t, *_, **__):
        return t

    def deallocate(self, t, *_, **__):
        pass

    # ---- ops: ttnn's golden function, once per chip --------------------------------------------
    def _record(self, name, kwargs):
        seen = {}
        if name in _NORMS or "epsilon" in kwargs:
            seen["epsilon"] = kwargs.get("epsilon")
        pc = kwargs.get("program_config")
        fused = getattr(pc, "fused_activation", None) if pc is not None else None
        if fused is not None:
            seen["fused_activation"] = str(getattr(fused, "op_type", fused))
        if seen:
            self.op_kwargs.setdefault(name, []).append(seen)
        keep = _KEEP_FOR.get(name, set())
        dropped = {k for k in kwargs if k in _DEVICE_ONLY and k not in keep}
        if dropped:
            self.stripped_kwargs.setdefault(name, set()).update(dropped)
        return {k: v for k, v in kwargs.items() if k not in _DEVICE_ONLY or k in keep}

    def _per_chip(self, name, golden, args, kwargs):
        self.ops_run[name] = self.ops_run.get(name, 0) + 1
        kwargs = self._record(name, kwargs)
        n = None
        for x in list(args) + list(kwargs.values()):
            for y in (x if isinstance(x, (list, tuple)) else [x]):
                if isinstance(y, EmuTensor):
                    n = len(y.shards) if n is None else n
                    if len(y.shards) != n:
                        raise ValueError(f"{name}: operands live on different numbers of chips")

        def pick(x, i):
            if isinstance(x, EmuTensor):
                return x.shards[i]
            if isinstance(x, (list, tuple)) and any(isinstance(y, EmuTensor) for y in x):
                return type(x)(pick(y, i) for y in x)
            return x

        outs = [golden(*[pick(a, i) for a in args], **{k: pick(v, i) for k, v in kwargs.items()})
                for i in range(n)]
        return EmuTensor(outs)

    def _op(name, op_path):  # noqa: N805 (class-body factory)
        def call(self, *args, **kwargs):
            obj = ttnn
            for part in op_path.split("."):
                obj = getattr(obj, part)
            return self._per_chip(name, _golden(obj), args, kwargs)

        call.__name__ = name
        return call

    linear = _op("linear", "linear")
    matmul = _op("matmul", "matmul")
    add = _op("add", "add")
    multiply = _op("multiply", "multiply")
    rms_norm = _op("rms_norm", "rms_norm")
    layer_norm = _op("layer_norm", "layer_norm")
    gelu = _op("gelu", "gelu")
    silu = _op("silu", "silu")
    softmax = _op("softmax", "softmax")
    embedding = _op("embedding", "embedding")
    concat = _op("concat", "concat")
    reshape = _op("reshape", "reshape")
    permute = _op("permute", "permute")
    slice = _op("slice", "slice")
    _argmax = _op("argmax", "argmax")
    plus_one = _op("plus_one", "plus_one")  # ttnn's golden increments its input IN PLACE, as the device op
    fill_cache = _op("fill_cache", "fill_cache")  # in place on each chip's cache shard
    _sdpa = _op("sdpa", "transformer.scaled_dot_product_attention")
    _transformer_scaled_dot_product_attention_decode = _op(
        "sdpa_decode", "transformer.scaled_dot_product_attention_decode")
    del _op

    def argmax(self, t, *args, output_tensor=None, **kwargs):
        """ttnn.argmax; its golden ignores `output_tensor` ("Preallocated output (must be UINT32,
        ROW_MAJOR, INTERLEAVED, same device)", ttnn 0.81.1 docstring): the result is written into
        it here, shard by shard, and it is returned (the device op writes that buffer)."""
        out = self._argmax(t, *args, **kwargs)
        if output_tensor is None:
            return out
        for o, d in zip(out.shards, output_tensor.shards, strict=True):
            if tuple(o.shape) != tuple(d.shape):
                raise ValueError(f"argmax output_tensor of shape {tuple(d.shape)}, result {tuple(o.shape)}")
            d.copy_(o)
        return output_tensor

    def _transformer_scaled_dot_product_attention(self, q, k, v, *args, attn_mask=None, **kwargs):
        """ttnn.transformer.scaled_dot_product_attention: its golden, after the device op's mask
        checks ("Mask batch dim must either be 1 (to be broadcasted across all batches) or must
        match Q batch dimension", the same for the heads; ttnn 0.81.1). torch would broadcast a
        mask of batch B over a Q of batch 1 where the device refuses it."""
        if attn_mask is not None:
            for qs, ms in zip(q.shards, attn_mask.shards, strict=True):
                if ms.dim() != 4 or ms.shape[0] not in (1, qs.shape[0]) or ms.shape[1] not in (1, qs.shape[1]):
                    raise ValueError(f"sdpa: mask {tuple(ms.shape)} for Q {tuple(qs.shape)}: its batch and heads "
                                     f"must each be 1 (broadcast) or Q's")
        return self._sdpa(q, k, v, *args, attn_mask=attn_mask, **kwargs)

    def _experimental_paged_update_cache(self, cache, update, update_idxs_tensor=None, **kwargs):
        """No golden exists for paged_update_cache: per user b of the decode batch, update_cache's
        golden on cache row b with the decode layout [1, batch, heads, d] moved to update_cache's
        [1, heads, batch, d] and that user's own position update_idxs_tensor[b] (a negative
        position skips the user, as sdpa_decode's golden skips it). The device op wants the input
        batch equal to the cache batch (mock N300: "input.shape[1] == cache batch"): checked."""
        golden = _golden(ttnn.update_cache)
        self.ops_run["paged_update_cache"] = self.ops_run.get("paged_update_cache", 0) + 1
        for i, (c, u) in enumerate(zip(cache.shards, update.shards, strict=True)):
            idxs = [int(v) for v in update_idxs_tensor.shards[i].reshape(-1)]
            users = u.shape[1]
            if users != c.shape[0] or len(idxs) != users:
                raise ValueError(f"paged_update_cache: input batch {users}, cache batch {c.shape[0]}, "
                                 f"{len(idxs)} positions (all three must be equal)")
            for b, idx in enumerate(idxs):
                if idx >= 0:
                    golden(c[b:b + 1], u.permute(0, 2, 1, 3), idx, batch_offset=b)
        return cache

    # ---- collectives: ttnn's collective goldens over every chip's shard -------------------------
    def _collective(self, name, op, t, *args):
        self.ops_run[name] = self.ops_run.get(name, 0) + 1
        n = len(t.shards)
        out = _golden(op)(list(t.shards), *args, _ttnn_golden_mesh_shape=(1, n),
                          _ttnn_golden_mesh_shard_dims=(None, None), _ttnn_global_golden_mesh_shards=True)
        return EmuTensor([out.clone() for _ in range(n)])

    def all_reduce(self, t, **_):
        return self._collective("all_reduce", ttnn.all_reduce, t)

    def all_gather(self, t, dim, **_):
        return self._collective("all_gather", ttnn.all_gather, t, dim)

    # ---- traces are a device feature ------------------------------------------------------------
    def begin_trace_capture(self, *_, **__):
        raise RuntimeError("GoldenTTNN does not emulate traces (construct the backend with trace=False)")


# Emulations of the ops without a golden function (async collectives, fused decode ops).
from .experimental_ops import install as _install_experimental  # noqa: E402

_install_experimental(GoldenTTNN, _PASSTHROUGH)
