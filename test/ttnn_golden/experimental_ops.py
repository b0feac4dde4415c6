"""Emulations, for GoldenTTNN, of the ttnn 0.81.1 ops that have NO golden function
(`ttnn.get_golden_function` raises for them): the asynchronous collectives and the fused
decode ops of tt_transformers' graph.

Each emulation is written from the op's documented semantics (the docstring in the installed
ttnn 0.81.1 wheel, `help(ttnn.experimental.<op>)`, quoted below) in plain torch, and each is
unit-tested ON ITS OWN against an independent torch composition or ttnn's golden of the
equivalent synchronous op (test/test_ttnn_emulation.py), so the emulator cannot agree with a
wrong model graph by construction.

`install(GoldenTTNN, _PASSTHROUGH)` adds them to the emulator: methods named
`_experimental_<op>` are reached as `tt.experimental.<op>` (EXPERIMENTAL_OPS lists them), the
others as `tt.<op>`. What each call received is recorded in `emu.ccl_calls` (collective, topology,
the semaphores it used) so tests can check trace-safety properties that numbers cannot show.
"""
from __future__ import annotations

import itertools

import torch
import ttnn

# names the emulator passes through from the real ttnn (they carry no data)
PASSTHROUGH = {"Topology", "UnaryOpType", "L1_HEIGHT_SHARDED_MEMORY_CONFIG", "Shape",
               "LayerNormShardedMultiCoreProgramConfig"}
EXPERIMENTAL_OPS = {"all_gather_async", "reduce_scatter_minimal_async", "nlp_create_qkv_heads_decode",
                    "rotary_embedding_hf", "nlp_concat_heads_decode", "nlp_create_qkv_heads", "nlp_concat_heads"}
TILE = 32
_ids = itertools.count()


class EmuSemaphore:
    """ttnn.create_global_semaphore's handle: a named counter on a set of cores of every chip."""

    def __init__(self, mesh, cores, initial_value):
        self.id = next(_ids)
        self.mesh, self.cores, self.value = mesh, cores, int(initial_value)

    def __repr__(self):
        return f"EmuSemaphore({self.id})"


# ---- pure tensor semantics (per-chip lists of torch tensors in, per-chip lists out) -------------
def reduce_scatter_shards(shards: list, dim: int) -> list:
    """ttnn.experimental.reduce_scatter_minimal_async: "Performs an reduce-scatter operation on
    multi-device input_tensor across all devices. dim: Dimension to scatter." The chips' tensors
    are summed element-wise and the sum is cut into N equal slices along `dim`; chip i keeps
    slice i (device order of the 1xN mesh)."""
    n = len(shards)
    if shards[0].shape[dim] % n:
        raise ValueError(f"reduce_scatter: dim {dim} of {tuple(shards[0].shape)} does not split over {n} chips")
    total = shards[0].clone()
    for s in shards[1:]:
        total = total + s
    return [c.clone() for c in torch.tensor_split(total, n, dim=dim)]


def all_gather_shards(shards: list, dim: int) -> list:
    """ttnn.experimental.all_gather_async: "Performs an all-gather operation on multi-device
    input_tensor across all devices. dim: Dimension to perform operation." Every chip receives
    the chips' tensors concatenated along `dim` in device order."""
    out = torch.cat(list(shards), dim=dim)
    return [out.clone() for _ in shards]


def create_qkv_heads_decode(x: torch.Tensor, num_heads: int, num_kv_heads: int):
    """ttnn.experimental.nlp_create_qkv_heads_decode: "Shuffles [1, S=1, B, head_dim * (num_heads
    + 2*num_kv_heads)] fused qkv matrix into Q, K, and V heads with shape [S, B, num_heads,
    head_dim] for Q and [S, B, num_kv_heads, head_dim] for K and V" (the heads are padded to 32
    only in the padded shape; "if ttnn pads B ... this op respects the unpadded B"). The fused row
    is [Q heads | K heads | V heads], each head's head_dim contiguous."""
    _, s, b, width = x.shape
    if s != 1 or width % (num_heads + 2 * num_kv_heads):
        raise ValueError(f"nlp_create_qkv_heads_decode: input {tuple(x.shape)} is not [1, 1, B, d*(nh+2nkv)]")
    d = width // (num_heads + 2 * num_kv_heads)
    heads = x.reshape(b, num_heads + 2 * num_kv_heads, d).unsqueeze(0)  # [S=1, B, heads, d]
    q, k, v = torch.split(heads, [num_heads, num_kv_heads, num_kv_heads], dim=2)
    return q.contiguous(), k.contiguous(), v.contiguous()


def rotary_hf_decode(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ttnn.experimental.rotary_embedding_hf, decode mode: "Applies HuggingFace-style rotary position
    embedding ... Decode: input [seq_len=1, batch, num_heads, head_dim], cos/sin [1, batch, 1,
    head_dim]": x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[d/2:], x[:d/2]) per head,
    cos/sin broadcast over the heads of each batch row."""
    if x.shape[0] != 1 or cos.shape != (1, x.shape[1], 1, x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(f"rotary_embedding_hf decode: input {tuple(x.shape)} wants cos/sin "
                         f"[1, {x.shape[1]}, 1, {x.shape[3]}], got {tuple(cos.shape)} / {tuple(sin.shape)}")
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def concat_heads_decode(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """ttnn.experimental.nlp_concat_heads_decode: "Shuffles [S=1, B=32, 32(num_heads), head_dim]
    tensor into tensor with shape [S=1, 1, B=32, num_heads * head_dim]. ... the op will assume the
    input padded num_heads to 32 and will unpad it." The output has 32 rows whatever the batch
    (the mock shows a logical [1, 1, 32, nh*d] for B = 1); rows >= B are padding (zeros here)."""
    s, b, h, d = x.shape
    if s != 1 or h < num_heads or b > TILE:
        raise ValueError(f"nlp_concat_heads_decode: input {tuple(x.shape)} with num_heads {num_heads}")
    out = torch.zeros(1, 1, TILE, num_heads * d, dtype=x.dtype)
    out[0, 0, :b] = x[0, :, :num_heads, :].reshape(b, num_heads * d)
    return out


def create_qkv_heads(x: torch.Tensor, num_heads: int, num_kv_heads: int | None = None,
                     transpose_k_heads: bool = True):
    """ttnn.experimental.nlp_create_qkv_heads (prefill / vision): "Shuffles [B, 1, S, 3 * head_dim *
    num_heads] fused qkv matrix into 3 Q, K, and V heads with shapes [B, num_heads, S, head_dim],
    [B, num_kv_heads, head_dim, S], and [B, num_kv_heads, S, head_dim]. ... num_kv_heads defaults
    to num_heads if not provided. An additional transpose along the last two dims is performed by
    default for K heads, but this can be skipped with transpose_k_heads=false." The fused row is
    [Q heads | K heads | V heads], each head's head_dim contiguous (the layout tt_transformers'
    image attention builds its per-chip wqkv in); head_dim = width / (num_heads + 2 num_kv_heads)."""
    nkv = num_kv_heads or num_heads
    b, one, s, width = x.shape
    if one != 1 or width % (num_heads + 2 * nkv):
        raise ValueError(f"nlp_create_qkv_heads: input {tuple(x.shape)} is not [B, 1, S, d*(nh+2nkv)]")
    d = width // (num_heads + 2 * nkv)
    heads = x.reshape(b, s, num_heads + 2 * nkv, d).permute(0, 2, 1, 3)  # [B, heads, S, d]
    q, k, v = torch.split(heads, [num_heads, nkv, nkv], dim=1)
    if transpose_k_heads:
        k = k.transpose(-2, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def concat_heads(x: torch.Tensor) -> torch.Tensor:
    """ttnn.experimental.nlp_concat_heads: "Shuffles [B, num_heads, S, head_dim] tensor into
    tensor with shape [B, 1, S, num_heads * head_dim]" (head h at columns [h*d, (h+1)*d))."""
    b, h, s, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, 1, s, h * d).contiguous()


def padded_view(x: torch.Tensor, shape, padded_shape) -> torch.Tensor:
    """ttnn.reshape(x, logical_shape, padded_shape) with x's padded shape unchanged: a view that
    only changes the logical shape (no device op, verified on the mock); shrinking the logical
    rows drops padding rows. Emulated as the leading block of x of the logical shape."""
    shape = tuple(shape)
    if len(shape) != x.dim() or any(a > b for a, b in zip(shape, x.shape)):
        raise ValueError(f"reshape view {tuple(x.shape)} -> {shape}: not a leading block")
    return x[tuple(slice(0, n) for n in shape)].clone()


# ---- methods installed on GoldenTTNN -------------------------------------------------------------
def create_global_semaphore(self, mesh_device, cores, initial_value, buffer_type=None):
    sem = EmuSemaphore(mesh_device, cores, initial_value)
    self.semaphores.append(sem)
    return sem


def _check_ccl(self, name, t, sems, want: int, kw):
    if not isinstance(sems, (list, tuple)) or len(sems) != want or not all(isinstance(s, EmuSemaphore) for s in sems):
        raise ValueError(f"{name}: multi_device_global_semaphore must be {want} semaphores from "
                         f"create_global_semaphore, got {sems!r}")
    barrier = kw.get("barrier_semaphore")
    if barrier is not None and not isinstance(barrier, EmuSemaphore):
        raise ValueError(f"{name}: barrier_semaphore must come from create_global_semaphore")
    topo = kw.get("topology", ttnn.Topology.Ring)
    if topo not in (ttnn.Topology.Ring, ttnn.Topology.Linear):
        raise ValueError(f"{name}: topology {topo} (valid: Ring, Linear)")
    if topo == ttnn.Topology.Ring and self.fabric != ttnn.FabricConfig.FABRIC_1D_RING:
        raise RuntimeError(f"{name}: Ring topology needs set_fabric_config(FABRIC_1D_RING) before the mesh opened")
    self.ops_run[name] = self.ops_run.get(name, 0) + 1
    self.ccl_calls.append({"op": name, "topology": topo, "semaphores": [s.id for s in sems],
                           "barrier": barrier.id if barrier is not None else None, "shape": t.shape})


def _experimental_reduce_scatter_minimal_async(self, input_tensor, persistent_output_buffers=None, dim=None,
                                               multi_device_global_semaphore=None, **kw):
    from .emulator import EmuTensor

    _check_ccl(self, "reduce_scatter_minimal_async", input_tensor, multi_device_global_semaphore, 3, kw)
    return EmuTensor(reduce_scatter_shards(input_tensor.shards, dim))


def _experimental_all_gather_async(self, input_tensor, persistent_output_buffer=None, dim=None,
                                   multi_device_global_semaphore=None, **kw):
    from .emulator import EmuTensor

    _check_ccl(self, "all_gather_async", input_tensor, multi_device_global_semaphore, 2, kw)
    return EmuTensor(all_gather_shards(input_tensor.shards, dim))


def _experimental_nlp_create_qkv_heads_decode(self, x, *, num_heads, num_kv_heads=None, **kw):
    from .emulator import EmuTensor

    self.ops_run["nlp_create_qkv_heads_decode"] = self.ops_run.get("nlp_create_qkv_heads_decode", 0) + 1
    outs = [create_qkv_heads_decode(s, num_heads, num_kv_heads or num_heads) for s in x.shards]
    return tuple(EmuTensor([o[j] for o in outs]) for j in range(3))


def _experimental_rotary_embedding_hf(self, x, cos, sin, *, is_decode_mode=False, **kw):
    from .emulator import EmuTensor

    if not is_decode_mode:
        raise NotImplementedError("GoldenTTNN emulates rotary_embedding_hf in decode mode only")
    self.ops_run["rotary_embedding_hf"] = self.ops_run.get("rotary_embedding_hf", 0) + 1
    return EmuTensor([rotary_hf_decode(a, c, s) for a, c, s in zip(x.shards, cos.shards, sin.shards, strict=True)])


def _experimental_nlp_concat_heads_decode(self, x, *, num_heads, **kw):
    from .emulator import EmuTensor

    self.ops_run["nlp_concat_heads_decode"] = self.ops_run.get("nlp_concat_heads_decode", 0) + 1
    return EmuTensor([concat_heads_decode(s, num_heads) for s in x.shards])


def _experimental_nlp_create_qkv_heads(self, x, input_kv=None, *, num_heads, num_kv_heads=None,
                                       transpose_k_heads=True, kv_tied=False, **kw):
    from .emulator import EmuTensor

    if input_kv is not None or kv_tied:
        raise NotImplementedError("GoldenTTNN emulates nlp_create_qkv_heads on one fused input only")
    self.ops_run["nlp_create_qkv_heads"] = self.ops_run.get("nlp_create_qkv_heads", 0) + 1
    outs = [create_qkv_heads(s, num_heads, num_kv_heads, transpose_k_heads) for s in x.shards]
    return tuple(EmuTensor([o[j] for o in outs]) for j in range(3))


def _experimental_nlp_concat_heads(self, x, **kw):
    from .emulator import EmuTensor

    self.ops_run["nlp_concat_heads"] = self.ops_run.get("nlp_concat_heads", 0) + 1
    return EmuTensor([concat_heads(s) for s in x.shards])


def reshape(self, t, shape, padded_shape=None, **kw):
    """ttnn.reshape: its golden for (x, shape); with a padded shape, the padded view above."""
    from .emulator import EmuTensor

    if padded_shape is None:
        return self._per_chip("reshape", ttnn.get_golden_function(ttnn.reshape), (t, tuple(shape)), kw)
    self.ops_run["reshape_view"] = self.ops_run.get("reshape_view", 0) + 1
    return EmuTensor([padded_view(s, shape, padded_shape) for s in t.shards])


def clone(self, t, **kw):
    """ttnn.clone: "Clones the input tensor, creating a copy" (dtype / memory config aside, which
    the emulator ignores). Its golden returns the input itself; the device op writes a new
    buffer, so the emulation copies each shard (a later in-place write to the input, e.g. a
    trace replay, must not show through)."""
    from .emulator import EmuTensor

    self.ops_run["clone"] = self.ops_run.get("clone", 0) + 1
    return EmuTensor([s.clone() for s in t.shards])


def copy(self, a, b, **kw):
    """ttnn.copy: "Copies the elements from input_a into input_b. input_b is modified in place.
    Both input tensors must be of equal shape." Its golden returns the value without writing
    input_b (unless given a private flag): the emulation writes each shard of b in place and
    returns b, as the device op does."""
    self.ops_run["copy"] = self.ops_run.get("copy", 0) + 1
    for x, y in zip(a.shards, b.shards, strict=True):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(f"copy: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
        y.copy_(x)
    return b


def typecast(self, t, dtype, **kw):
    """ttnn.typecast between float dtypes: the emulator computes in float32 and ignores dtypes
    everywhere (module docstring of emulator.py), so an identity; the dtype asked is recorded.
    (ttnn's golden quantises block floats through a ttnn.Tensor, which needs a device.)"""
    from .emulator import EmuTensor

    if any(dtype == getattr(ttnn, d) for d in ("uint32", "int32")):
        raise NotImplementedError("GoldenTTNN emulates float typecasts only")
    self.ops_run["typecast"] = self.ops_run.get("typecast", 0) + 1
    self.op_kwargs.setdefault("typecast", []).append({"dtype": str(dtype)})
    return EmuTensor([s.clone() for s in t.shards])


def install(cls, passthrough: set) -> set:
    """Add the emulations to GoldenTTNN; returns the names reached under tt.experimental."""
    passthrough.update(PASSTHROUGH)
    for fn in (create_global_semaphore, typecast, reshape, clone, copy, _experimental_reduce_scatter_minimal_async,
               _experimental_all_gather_async, _experimental_nlp_create_qkv_heads_decode,
               _experimental_rotary_embedding_hf, _experimental_nlp_concat_heads_decode,
               _experimental_nlp_create_qkv_heads, _experimental_nlp_concat_heads):
        setattr(cls, fn.__name__, fn)
    from .emulator import EmuTensor

    # ops take `memory_config=t.memory_config()` (the device layout); the emulator has none
    EmuTensor.memory_config = lambda self: None
    init = cls.__init__

    def __init__(self, *a, **k):
        init(self, *a, **k)
        self.semaphores, self.ccl_calls = [], []
        self.experimental._names = set(self.experimental._names) | EXPERIMENTAL_OPS

    cls.__init__ = __init__
    return EXPERIMENTAL_OPS
