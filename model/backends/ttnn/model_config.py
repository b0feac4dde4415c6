"""Precision and op fidelity per mesh, read from config/ttnn/<MESH>.yaml (one place: no op
picks its own dtype or fidelity).

Every name is resolved against the installed ttnn (ttnn.bfloat8_b, ttnn.MathFidelity.HiFi2, ...)
when the profile is loaded, so a misspelt or non-existent member fails at start-up with the
file and key at fault, never half-way through a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...errors import BackendError

CONFIG_DIR = Path(__file__).resolve().parents[3] / "config" / "ttnn"

DTYPE_ROLES = ("activations", "vision", "projector", "embedding", "wqkv", "wo", "ffn", "kv_cache", "lm_head")
FIDELITY_ROLES = ("vision", "projector", "qkv", "sdpa", "wo", "ffn", "lm_head")
DTYPE_NAMES = ("bfloat16", "bfloat8_b", "bfloat4_b", "float32")
FIDELITY_NAMES = ("LoFi", "HiFi2", "HiFi3", "HiFi4")
DECODE_MATMULS = ("interleaved", "dram_sharded")
# fused: tt_transformers' decode graph (decoder.py decode_fused: sharded residual, heads / RoPE /
# concat ops, 24 device ops per layer); legacy: the interleaved graph (45 ops per layer). fused
# needs decode_matmul: dram_sharded (its activations live in the DRAM-sharded matmuls' layouts);
# with decode_matmul: interleaved the legacy graph runs.
DECODE_GRAPHS = ("fused", "legacy")
# Optional keys and their defaults:
# - dtypes.ccl: dtype of the prefill collectives' payload (ccl.py; bfloat8_b halves the ethernet
#   bytes; decode payloads are never cast). bfloat16 = no cast.
# - fidelity.decode: the DRAM-sharded decode matmuls of the decoder layers (WQKV, WO, W1/W3/W2).
#   They compute only on their 12 DRAM-reader cores: at HiFi4 they turn compute-bound;
#   tt_transformers runs them at HiFi2 (its mlp.py / attention.py). qkv / wo / ffn stay the
#   fidelities of prefill (and of every matmul with decode_matmul: interleaved).
OPTIONAL_DTYPES = {"ccl": ("bfloat16", ("bfloat16", "bfloat8_b"))}
OPTIONAL_FIDELITIES = {"decode": "HiFi2"}
MAX_DECODE_BATCH = 32  # decode rows are one tile row (32); the fused graph puts one user per core


@dataclass(frozen=True)
class PrecisionProfile:
    """Plain names (strings) from the YAML; `resolve(tt)` turns them into ttnn objects."""

    mesh_name: str
    mesh_shape: tuple
    dtypes: dict
    fidelity: dict
    device: dict = field(default_factory=dict)
    max_seq_len: int = 512
    max_batch: int = 1  # decode rows (robots served together): the KV cache holds this many sequences
    max_prefill_traces: int = 8  # prefill traces kept (least recently used released): bounds the trace region
    trace_decode: bool = True
    decode_matmul: str = "interleaved"  # | dram_sharded (see linear.py)
    decode_graph: str = "fused"  # | legacy (see DECODE_GRAPHS)
    target_actions_per_s: float = 10.0  # the speed the hardware benchmark asserts (OPENVLA_HW_ASSERT_SPEED=1)
    source: str = ""

    def dtype(self, tt, role: str):
        # LM-head logits are always bf16: action-token logits differ by only 0.06-0.25, BFP8
        # output error is 0.5-1.5 (openvla-spec.md section 7). Only the weights may vary.
        return getattr(tt, self.dtypes[role])

    def compute_config(self, tt, role: str):
        """Compute-kernel config of an op group: fidelity from the profile, fp32 accumulation."""
        return tt.WormholeComputeKernelConfig(
            math_fidelity=getattr(tt.MathFidelity, self.fidelity[role]),
            math_approx_mode=False,
            fp32_dest_acc_en=True,
            packer_l1_acc=True,
        )


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise BackendError(f"{path}: cannot read TT-NN precision profile ({e})") from e
    if not isinstance(data, dict):
        raise BackendError(f"{path}: expected a mapping")
    return data


def load_profile(mesh_name: str, config_dir: str | Path | None = None, overrides: dict | None = None) -> PrecisionProfile:
    """Read config/ttnn/<mesh_name>.yaml and validate every key and value."""
    d = Path(config_dir) if config_dir else CONFIG_DIR
    path = d / f"{mesh_name}.yaml"
    if not path.is_file():
        raise BackendError(f"no TT-NN precision profile for mesh {mesh_name!r}: {path} not found")
    data = _load_yaml(path)
    for k, v in (overrides or {}).items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    dtypes = dict(data.get("dtypes") or {})
    fidelity = dict(data.get("fidelity") or {})
    for role, (default, allowed) in OPTIONAL_DTYPES.items():
        dtypes.setdefault(role, default)
        if dtypes[role] not in allowed:
            raise BackendError(f"{path}: dtypes.{role} = {dtypes[role]!r}; expected one of {', '.join(allowed)}")
    for role, default in OPTIONAL_FIDELITIES.items():
        fidelity.setdefault(role, default)
        if fidelity[role] not in FIDELITY_NAMES:
            raise BackendError(
                f"{path}: fidelity.{role} = {fidelity[role]!r}; expected one of {', '.join(FIDELITY_NAMES)}")
    for role in DTYPE_ROLES:
        if dtypes.get(role) not in DTYPE_NAMES:
            raise BackendError(f"{path}: dtypes.{role} = {dtypes.get(role)!r}; expected one of {', '.join(DTYPE_NAMES)}")
    for role in FIDELITY_ROLES:
        if fidelity.get(role) not in FIDELITY_NAMES:
            raise BackendError(
                f"{path}: fidelity.{role} = {fidelity.get(role)!r}; expected one of {', '.join(FIDELITY_NAMES)}")
    if dtypes["embedding"] != "bfloat16":
        raise BackendError(f"{path}: dtypes.embedding must be bfloat16 (ttnn.embedding looks rows up in a "
                           f"row-major bfloat16 table), got {dtypes['embedding']!r}")
    unknown = (sorted(set(dtypes) - set(DTYPE_ROLES) - set(OPTIONAL_DTYPES))
               + sorted(set(fidelity) - set(FIDELITY_ROLES) - set(OPTIONAL_FIDELITIES)))
    if unknown:
        raise BackendError(f"{path}: unknown precision keys {unknown}")
    shape = tuple(int(x) for x in data.get("mesh_shape", ()))
    if len(shape) != 2 or shape[0] != 1 or shape[1] < 2:
        raise BackendError(f"{path}: mesh_shape must be [1, N] with N >= 2, got {list(shape)}")
    max_seq = int(data.get("max_seq_len", 512))
    if max_seq % 32 or max_seq < 288:
        raise BackendError(f"{path}: max_seq_len must be a multiple of 32 and >= 288, got {max_seq}")
    max_batch = data.get("max_batch", 1)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_DECODE_BATCH:
        raise BackendError(f"{path}: max_batch must be an integer 1..{MAX_DECODE_BATCH} (decode rows share one tile "
                           f"row of 32; each row holds a KV cache of max_seq_len positions), got {max_batch!r}")
    max_prefill_traces = data.get("max_prefill_traces", 8)
    if isinstance(max_prefill_traces, bool) or not isinstance(max_prefill_traces, int) or max_prefill_traces < 0:
        raise BackendError(f"{path}: max_prefill_traces must be an integer >= 0 (0: prefill untraced), "
                           f"got {max_prefill_traces!r}")
    decode_matmul = str(data.get("decode_matmul", "interleaved"))
    if decode_matmul not in DECODE_MATMULS:
        raise BackendError(f"{path}: decode_matmul = {decode_matmul!r}; expected one of {', '.join(DECODE_MATMULS)}")
    decode_graph = str(data.get("decode_graph", "fused"))
    if decode_graph not in DECODE_GRAPHS:
        raise BackendError(f"{path}: decode_graph = {decode_graph!r}; expected one of {', '.join(DECODE_GRAPHS)}")
    target = data.get("target_actions_per_s", 10.0)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
        raise BackendError(f"{path}: target_actions_per_s must be a number > 0, got {target!r}")
    return PrecisionProfile(mesh_name=mesh_name, mesh_shape=shape, dtypes=dtypes, fidelity=fidelity,
                            device=dict(data.get("device") or {}), max_seq_len=max_seq, max_batch=max_batch,
                            max_prefill_traces=max_prefill_traces,
                            trace_decode=bool(data.get("trace_decode", True)), decode_matmul=decode_matmul,
                            decode_graph=decode_graph, target_actions_per_s=float(target), source=str(path))


def check_against_ttnn(profile: PrecisionProfile, tt) -> None:
    """Every dtype / fidelity name must exist in the installed ttnn (spec defect 6)."""
    for role, name in profile.dtypes.items():
        if not hasattr(tt, name):
            raise BackendError(f"{profile.source}: dtypes.{role} = {name!r} does not exist in this ttnn")
    for role, name in profile.fidelity.items():
        if not hasattr(tt.MathFidelity, name):
            raise BackendError(f"{profile.source}: fidelity.{role} = {name!r} is not a ttnn.MathFidelity member")


# The ROS node's parameter names (config/mesh/<MESH>.yaml, `precision.*`) -> this profile.
_NODE_DTYPE_KEYS = {"wqkv_dtype": "wqkv", "wo_dtype": "wo", "kv_cache_dtype": "kv_cache",
                    "activation_dtype": "activations", "ffn_weight_dtype": "ffn"}
_NODE_FIDELITY_KEYS = {"qkv_math_fidelity": "qkv", "sdpa_math_fidelity": "sdpa", "wo_math_fidelity": "wo",
                       "ffn_math_fidelity": "ffn"}
_NODE_DTYPES = {"bf16": "bfloat16", "bfp8": "bfloat8_b", "bfp4": "bfloat4_b", "fp32": "float32"}
_NODE_FIDELITIES = {"lofi": "LoFi", "hifi2": "HiFi2", "hifi3": "HiFi3", "hifi4": "HiFi4"}


def overrides_from_node_precision(precision: dict | None) -> dict:
    """Translate the node's `precision` parameters (bf16 / bfp8 / hifi4 ...) into profile
    overrides; unknown keys or values are errors, and logits can only be bf16."""
    if not precision:
        return {}
    dtypes, fidelity = {}, {}
    for key, value in precision.items():
        v = str(value).lower()
        if key in _NODE_DTYPE_KEYS:
            if v not in _NODE_DTYPES:
                raise BackendError(f"precision.{key} = {value!r}; expected one of {', '.join(_NODE_DTYPES)}")
            dtypes[_NODE_DTYPE_KEYS[key]] = _NODE_DTYPES[v]
        elif key in _NODE_FIDELITY_KEYS:
            if v not in _NODE_FIDELITIES:
                raise BackendError(f"precision.{key} = {value!r}; expected one of {', '.join(_NODE_FIDELITIES)}")
            fidelity[_NODE_FIDELITY_KEYS[key]] = _NODE_FIDELITIES[v]
        elif key == "lm_head_logits_dtype":
            if v != "bf16":
                raise BackendError(f"precision.lm_head_logits_dtype = {value!r}: LM-head logits are always bf16 "
                                   "(BFP8 logits flip action tokens)")
        else:
            raise BackendError(f"unknown precision parameter {key!r}")
    out = {}
    if dtypes:
        out["dtypes"] = dtypes
    if fidelity:
        out["fidelity"] = fidelity
    return out
