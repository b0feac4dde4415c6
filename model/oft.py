"""OpenVLA-OFT: checkpoint detection, platform constants, the L1-regression action head and the
proprio projector, and the one-pass forward on the torch reference modules.

Facts (docs/oft.md, from moojink/openvla-oft and its transformers fork):
  sequence  [BOS, N x 256 fused patches, (proprio token), prompt[1:] (ends with 29871),
             ACTION_DIM x CHUNK placeholders (input embeddings zeroed), stop token 2]
  attention fully bidirectional (only padding masked): every position sees every other
  rows      the last hidden states (after the final norm) of the CHUNK x ACTION_DIM positions that
            start at the LAST PROMPT TOKEN (each row is the one *before* its action token, as in
            next-token training), i.e. rows [prefix + prompt_len - 1, ... + CHUNK x ACTION_DIM)
  head      MLPResNet on (CHUNK, ACTION_DIM x hidden) -> (CHUNK, ACTION_DIM) normalised actions;
            without a head the LM logits of those rows are argmaxed and decoded as OpenVLA tokens
  un-norm   where mask: 0.5 (n + 1) (high - low + 1e-8) + low; (low, high) = (q01, q99) for
            BOUNDS_Q99, (min, max) for BOUNDS

The vision towers, projector and Llama are the ones of model/modeling.py loaded by the torch
backend's loader; this module adds only what OFT needs.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, ConfigError, InputError, NormStatsError

STOP_TOKEN_ID = 2  # '</s>': appended after the placeholders (it was there at training time)
PLACEHOLDER_TOKEN_ID = 1  # any id: the placeholders' input embeddings are zeroed

ACTION_HEAD = "action_head"
PROPRIO_PROJECTOR = "proprio_projector"
# Components of OFT variants this project refuses, by checkpoint file name -> what they mean.
REFUSED_COMPONENTS = {
    "noisy_action_projector": "a diffusion action head (OFT diffusion variant)",
    "vision_backbone": "a FiLM vision backbone (OFT+)",
}
# Optional config.json object (our extension; official checkpoints do not have it) that states the
# platform constants: {"num_actions_chunk", "action_dim", "proprio_dim", "normalization",
# "num_images_in_input"}; any subset.
OFT_CONFIG_FIELD = "openvla_oft"

BOUNDS = "bounds"  # normalised to [-1, 1] with min / max
BOUNDS_Q99 = "bounds_q99"  # normalised to [-1, 1] with q01 / q99
NORMALIZATION_BOUNDS = {BOUNDS: ("min", "max"), BOUNDS_Q99: ("q01", "q99")}


@dataclass(frozen=True)
class Platform:
    name: str
    num_actions_chunk: int
    action_dim: int
    proprio_dim: int
    normalization: str


# prismatic/vla/constants.py; the official code picks one by sniffing argv, we match the checkpoint's
# statistics shapes (action dim, proprio dim) against this table instead.
PLATFORMS = (
    Platform("LIBERO", 8, 7, 8, BOUNDS_Q99),
    Platform("ALOHA", 25, 14, 14, BOUNDS),
    Platform("BRIDGE", 5, 7, 7, BOUNDS_Q99),
)


@dataclass(frozen=True)
class OFTSpec:
    """The platform constants one OFT checkpoint runs with, and where they came from."""

    num_actions_chunk: int
    action_dim: int
    proprio_dim: int | None  # None: no proprio projector
    normalization: str
    num_images_in_input: int | None  # None: any count is accepted
    source: str  # e.g. "statistics shapes (LIBERO)", "explicit arguments", "config.json openvla_oft"

    @property
    def num_action_tokens(self) -> int:
        return self.num_actions_chunk * self.action_dim


# -- files -----------------------------------------------------------------------------------------
def _component_files(weights_dir: Path, name: str) -> list[Path]:
    pat = re.compile(rf"^{re.escape(name)}--(.+)_checkpoint\.pt$")
    return sorted(p for p in weights_dir.glob(f"{name}--*_checkpoint.pt") if pat.match(p.name))


def find_component_file(weights_dir, name: str) -> Path | None:
    """The one `<name>--<step>_checkpoint.pt` (or `--latest_checkpoint.pt`) beside the HF files; None
    when absent. Several steps is an error listing them (choose one with load_oft_policy(step=))."""
    d = Path(weights_dir)
    files = _component_files(d, name)
    if len(files) > 1:
        raise CheckpointError(f"{len(files)} {name} checkpoints in {d} ({', '.join(p.name for p in files)}); "
                              "pass the training step to choose one")
    return files[0] if files else None


def config_oft_field(weights_dir: Path) -> dict | None:
    path = weights_dir / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot parse JSON: {e}") from e
    field = cfg.get(OFT_CONFIG_FIELD) if isinstance(cfg, dict) else None
    if field is not None and not isinstance(field, dict):
        raise ConfigError(f"{path}: {OFT_CONFIG_FIELD} must be an object")
    return field


def checkpoint_kind(weights_dir) -> str:
    """'oft' when an action head or proprio projector checkpoint (or our openvla_oft config field)
    is beside the HF files, else 'openvla'. Diffusion and FiLM checkpoints raise CheckpointError."""
    d = Path(weights_dir)
    if not d.is_dir():
        raise ConfigError(f"weights directory not found: {d}")
    for name, what in REFUSED_COMPONENTS.items():
        files = _component_files(d, name)
        if files:
            raise CheckpointError(f"{files[0].name} in {d}: this checkpoint uses {what}, which is not supported "
                                  "(only the L1-regression head and the discrete fallback are)")
    if _component_files(d, ACTION_HEAD) or _component_files(d, PROPRIO_PROJECTOR):
        return "oft"
    return "oft" if config_oft_field(d) is not None else "openvla"


def load_component_state_dict(path) -> dict[str, torch.Tensor]:
    """A component .pt state dict (torch.load weights_only=True), with the `module.` prefix of
    DistributedDataParallel training stripped."""
    path = Path(path)
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip / weights_only refusals all land here
        raise CheckpointError(f"{path}: cannot load the state dict ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: expected a non-empty state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is not a named tensor")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


# -- modules ---------------------------------------------------------------------------------------
class MLPResNetBlock(nn.Module):
    """Pre-LayerNorm residual block: x + ReLU(Linear(LayerNorm(x)))."""

    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x):
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """Hidden states of the CHUNK x ACTION_DIM action rows -> (CHUNK, ACTION_DIM) normalised actions:
    the ACTION_DIM rows of one chunk step are concatenated (row-major reshape) into one input."""

    def __init__(self, llm_dim: int, hidden_dim: int, action_dim: int, num_blocks: int = 2):
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(num_blocks, llm_dim * action_dim, hidden_dim, action_dim)

    def forward(self, action_rows: torch.Tensor, num_actions_chunk: int) -> torch.Tensor:
        b = action_rows.shape[0]
        return self.model(action_rows.reshape(b, num_actions_chunk, -1))


class ProprioProjector(nn.Module):
    """Normalised proprio state (B, P) -> one LLM token (B, H): fc1, GELU, fc2."""

    def __init__(self, proprio_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()

    def forward(self, proprio):
        return self.fc2(self.act_fn1(self.fc1(proprio)))


def _check_state(path: Path, state: dict, module: nn.Module, what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    unknown = [k for k in state if k not in expected]
    if unknown:
        hint = ""
        if any(k.startswith(("noise_predictor.", "time_encoder.")) for k in unknown):
            hint = " (a diffusion action head, which is not supported)"
        raise CheckpointError(f"{path.name}: unknown key(s) for the {what}: {', '.join(unknown[:5])}{hint}; "
                              f"expected keys such as {next(iter(expected))}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path.name}: {len(missing)} key(s) missing for the {what}: {', '.join(missing[:5])}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"{path.name}: {k} has shape {list(state[k].shape)}, expected {list(shape)}")


def _missing_key_error(path: Path, state: dict, key: str, what: str) -> CheckpointError:
    """A needed key is absent: name an unknown prefix when the key is there under one."""
    for k in state:
        if k.endswith("." + key):
            prefix = k[: -len(key)]
            return CheckpointError(f"{path.name}: unknown key prefix {prefix!r} (e.g. {k}); expected {key} "
                                   "(only a 'module.' prefix is stripped)")
    return CheckpointError(f"{path.name}: {key} ({what}) missing or not a matrix; keys: {', '.join(list(state)[:5])}")


def build_action_head(path: Path, state: dict, llm_dim: int, action_dim: int | None) -> L1RegressionActionHead:
    """The L1 head, sized from its own tensors (fc2: ACTION_DIM x hidden) and validated against the LLM
    width and the expected action dimension."""
    if any(k.startswith(("noise_predictor.", "time_encoder.")) for k in state):
        raise CheckpointError(f"{path.name}: this is a diffusion action head, which is not supported")
    fc2 = state.get("model.fc2.weight")
    if fc2 is None or fc2.dim() != 2:
        raise _missing_key_error(path, state, "model.fc2.weight", "ACTION_DIM x hidden")
    dim, hidden = int(fc2.shape[0]), int(fc2.shape[1])
    if action_dim is not None and dim != action_dim:
        raise CheckpointError(f"{path.name}: the head predicts {dim} action dimensions, but the checkpoint's "
                              f"statistics / arguments say {action_dim}")
    num_blocks = len({k.split(".")[2] for k in state if k.startswith("model.mlp_resnet_blocks.")})
    with torch.device("meta"):
        head = L1RegressionActionHead(llm_dim, hidden, dim, num_blocks=num_blocks)
    _check_state(path, state, head, f"L1 action head (LLM width {llm_dim}, {dim} action dims)")
    head.load_state_dict(state, strict=True, assign=True)
    return head


def build_proprio_projector(path: Path, state: dict, llm_dim: int, proprio_dim: int | None) -> ProprioProjector:
    fc1 = state.get("fc1.weight")
    if fc1 is None or fc1.dim() != 2:
        raise _missing_key_error(path, state, "fc1.weight", "LLM width x PROPRIO_DIM")
    dim = int(fc1.shape[1])
    if proprio_dim is not None and dim != proprio_dim:
        raise CheckpointError(f"{path.name}: the projector takes {dim} proprio values, but the checkpoint's "
                              f"statistics / arguments say {proprio_dim}")
    with torch.device("meta"):
        proj = ProprioProjector(dim, llm_dim)
    _check_state(path, state, proj, f"proprio projector (LLM width {llm_dim})")
    proj.load_state_dict(state, strict=True, assign=True)
    return proj


# -- statistics and platform constants -------------------------------------------------------------
def load_oft_norm_stats(config) -> tuple[dict, str]:
    """The official deploy code replaces config.json's norm_stats by dataset_statistics.json when that
    file exists (the fine-tuning statistics); config.json's (the base model's) otherwise."""
    from .config import validate_norm_stats

    path = Path(config.weights_dir) / "dataset_statistics.json"
    if path.is_file():
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise NormStatsError(f"{path}: cannot parse JSON: {e}") from e
        validate_norm_stats(stats, path.name)
        return stats, path.name
    return config.norm_stats, "config.json"


def _stats_dim(norm_stats: dict, part: str) -> int | None:
    dims = {len(s[part]["q01"]) for s in norm_stats.values()
            if isinstance(s, dict) and isinstance(s.get(part), dict) and isinstance(s[part].get("q01"), list)}
    return dims.pop() if len(dims) == 1 else None


def _int_arg(name: str, value, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_spec(norm_stats: dict, *, head_action_dim: int | None, projector_dim: int | None,
                 config_field: dict | None = None, num_actions_chunk=None, action_dim=None, proprio_dim=None,
                 normalization=None, num_images_in_input=None) -> OFTSpec:
    """Platform constants: explicit arguments, else config.json's openvla_oft object, else the one
    official platform whose (action dim, proprio dim) match the statistics. Dimensions read from
    the head / projector tensors and the statistics must agree with whatever was chosen."""
    explicit = {"num_actions_chunk": num_actions_chunk, "action_dim": action_dim, "proprio_dim": proprio_dim,
                "normalization": normalization, "num_images_in_input": num_images_in_input}
    field = dict(config_field or {})
    unknown = set(field) - set(explicit)
    if unknown:
        raise ConfigError(f"config.json {OFT_CONFIG_FIELD}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(explicit)}")
    values, sources = {}, set()
    for name, v in explicit.items():
        if v is not None:
            values[name] = v
            sources.add("explicit arguments")
        elif field.get(name) is not None:
            values[name] = field[name]
            sources.add(f"config.json {OFT_CONFIG_FIELD}")
    for name in ("num_actions_chunk", "action_dim", "proprio_dim", "num_images_in_input"):
        if name in values:
            values[name] = _int_arg(name, values[name], "arguments / config.json")
    if "normalization" in values and values["normalization"] not in NORMALIZATION_BOUNDS:
        raise ConfigError(f"normalization {values['normalization']!r} is not supported; valid: "
                          f"{', '.join(NORMALIZATION_BOUNDS)} (the official 'normal' type is unused by OFT)")

    stats_action = _stats_dim(norm_stats, "action")
    stats_proprio = _stats_dim(norm_stats, "proprio")
    a_dim = values.get("action_dim", head_action_dim or stats_action)
    for what, got in (("the action head", head_action_dim), ("the statistics (action q01)", stats_action)):
        if got is not None and a_dim is not None and got != a_dim:
            raise CheckpointError(f"action dimension mismatch: {what} has {got}, but {a_dim} was chosen")
    if a_dim is None:
        raise CheckpointError("cannot tell the action dimension: no head and no action statistics; pass action_dim=")
    p_dim = None
    if projector_dim is not None:
        p_dim = values.get("proprio_dim", projector_dim)
        if p_dim != projector_dim:
            raise CheckpointError(f"proprio dimension mismatch: the projector takes {projector_dim}, "
                                  f"but {p_dim} was chosen")
        if stats_proprio is not None and stats_proprio != projector_dim:
            raise CheckpointError(f"proprio dimension mismatch: the projector takes {projector_dim} values, "
                                  f"the statistics (proprio q01) have {stats_proprio}")
    if "num_actions_chunk" in values and "normalization" in values:
        source = " + ".join(sorted(sources))
        chunk, norm = values["num_actions_chunk"], values["normalization"]
    else:
        want_p = p_dim if p_dim is not None else values.get("proprio_dim", stats_proprio)
        matches = [p for p in PLATFORMS if p.action_dim == a_dim and (want_p is None or p.proprio_dim == want_p)]
        if len(matches) != 1:
            have = ", ".join(f"{p.name} ({p.action_dim} actions, {p.proprio_dim} proprio)" for p in PLATFORMS)
            raise CheckpointError(
                f"cannot tell the platform from the checkpoint (action dim {a_dim}, proprio dim {want_p}; known: "
                f"{have}): pass num_actions_chunk= and normalization= ('bounds' or 'bounds_q99')")
        plat = matches[0]
        chunk = values.get("num_actions_chunk", plat.num_actions_chunk)
        norm = values.get("normalization", plat.normalization)
        source = " + ".join(sorted(sources | {f"statistics shapes ({plat.name})"}))
    return OFTSpec(num_actions_chunk=chunk, action_dim=a_dim, proprio_dim=p_dim, normalization=norm,
                   num_images_in_input=values.get("num_images_in_input"), source=source)


def _bounds(stats: dict, part: str, normalization: str, dim: int, where: str):
    lo_name, hi_name = NORMALIZATION_BOUNDS[normalization]
    s = stats.get(part) if isinstance(stats, dict) else None
    if not isinstance(s, dict):
        raise NormStatsError(f"{where}.{part} is missing (needed for {normalization} normalisation)")
    out = []
    for name in (lo_name, hi_name):
        v = s.get(name)
        if not isinstance(v, list) or len(v) != dim or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
            raise NormStatsError(f"{where}.{part}.{name} must be a list of {dim} finite numbers "
                                 f"({normalization} normalisation)")
        out.append(np.asarray(v, dtype=np.float64))
    mask = s.get("mask")
    if mask is None:
        mask = np.ones(dim, dtype=bool)
    elif not isinstance(mask, list) or len(mask) != dim:
        raise NormStatsError(f"{where}.{part}.mask must be a list of {dim} booleans")
    return out[0], out[1], np.asarray(mask, dtype=bool)


def validate_oft_stats(norm_stats: dict, spec: OFTSpec, source: str) -> None:
    """Every dataset has the bounds the spec's normalisation needs (and proprio bounds when the
    checkpoint has a proprio projector): checked once at load, never at the first chunk."""
    for key, stats in norm_stats.items():
        where = f"{source}: norm_stats[{key!r}]"
        _bounds(stats, "action", spec.normalization, spec.action_dim, where)
        if spec.proprio_dim is not None:
            _bounds(stats, "proprio", spec.normalization, spec.proprio_dim, where)


def normalize_proprio(proprio, stats: dict, normalization: str) -> np.ndarray:
    """Robot state -> [-1, 1]: where mask, 2 (p - low) / (high - low + 1e-8) - 1, clipped to [-1, 1]."""
    p = np.asarray(proprio, dtype=np.float64).reshape(-1)
    low, high, mask = _bounds(stats, "proprio", normalization, p.size, "norm_stats")
    return np.clip(np.where(mask, 2.0 * (p - low) / (high - low + 1e-8) - 1.0, p), -1.0, 1.0)


def unnormalize_actions(normalized, stats: dict, normalization: str) -> np.ndarray:
    """(T, D) normalised -> robot units: where mask, 0.5 (n + 1) (high - low + 1e-8) + low."""
    n = np.asarray(normalized, dtype=np.float64)
    low, high, mask = _bounds(stats, "action", normalization, n.shape[-1], "norm_stats")
    return np.where(mask, 0.5 * (n + 1.0) * (high - low + 1e-8) + low, n).astype(np.float32)


# -- the pass ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OFTLayout:
    """Positions in the multimodal sequence [BOS, prefix, prompt[1:], placeholders, stop]."""

    prompt_len: int  # prompt ids incl. BOS and the trailing 29871
    num_prefix: int  # num_images x patches (+1 proprio token)
    num_action_tokens: int  # CHUNK x ACTION_DIM

    @property
    def placeholder_start(self) -> int:
        return self.num_prefix + self.prompt_len

    @property
    def action_rows_start(self) -> int:
        """The official slice NUM_PATCHES + NUM_PROMPT_TOKENS (NUM_PROMPT_TOKENS = prompt_len - 1):
        the last prompt token, i.e. one position before the first placeholder."""
        return self.placeholder_start - 1

    @property
    def length(self) -> int:
        return self.placeholder_start + self.num_action_tokens + 1  # + stop token


def oft_input_ids(prompt_ids, num_action_tokens: int) -> np.ndarray:
    """Prompt ids (BOS ... 29871) + placeholders + stop token."""
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    return np.concatenate([ids, np.full(num_action_tokens, PLACEHOLDER_TOKEN_ID, np.int64),
                           np.asarray([STOP_TOKEN_ID], np.int64)])


def bidirectional_attention_mask(length: int, dtype: torch.dtype, device, key_padding=None) -> torch.Tensor:
    """(B, 1, L, L) additive mask: 0 everywhere (every query sees every key), the dtype minimum at
    padded keys only: what the OFT transformers fork gives its SDPA attention. A 4-D mask is used
    as-is by transformers (4.40 and 5.x), which also turns SDPA's is_causal off."""
    if key_padding is None:
        return torch.zeros(1, 1, length, length, dtype=dtype, device=device)
    pad = torch.as_tensor(key_padding, device=device).bool()  # (B, L) True = padding
    mask = torch.zeros(pad.shape[0], 1, length, length, dtype=dtype, device=device)
    return mask.masked_fill(pad[:, None, None, :], torch.finfo(dtype).min)


@dataclass
class OFTPassOutput:
    action_rows: torch.Tensor  # (1, CHUNK x ACTION_DIM, hidden): final-norm hidden states of the action rows
    normalized: np.ndarray  # float32 (CHUNK, ACTION_DIM)
    tokens: np.ndarray | None  # int64 (CHUNK, ACTION_DIM): discrete fallback only
    out_of_range: np.ndarray | None  # bool (CHUNK, ACTION_DIM): discrete fallback only
    layout: OFTLayout
    timings_ms: dict


class OFTTorchModel:
    """The OFT pass on the torch reference modules (CPU, or CUDA without graphs)."""

    name = "torch"

    def __init__(self, config, checkpoint, spec: OFTSpec, head: L1RegressionActionHead | None,
                 proprio_projector: ProprioProjector | None, codec, device=None, dtype=None):
        from .backends.torch_backend import load_modules, resolve_device, resolve_dtype

        self.config, self.spec, self.codec = config, spec, codec
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.modules = load_modules(config, checkpoint, self.device, self.dtype)
        self.head = None if head is None else head.to(self.device, self.dtype).eval().requires_grad_(False)
        self.proprio_projector = None if proprio_projector is None else \
            proprio_projector.to(self.device, self.dtype).eval().requires_grad_(False)

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def layout(self, prompt_len: int, num_images: int, with_proprio: bool) -> OFTLayout:
        return OFTLayout(prompt_len, num_images * self.config.num_patches + int(with_proprio),
                         self.spec.num_action_tokens)

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor, prompt_ids, proprio_normalized=None) -> OFTPassOutput:
        """pixel_values (N, 6, S, S), one row per image (primary first); prompt_ids [BOS ... 29871];
        proprio_normalized (PROPRIO_DIM,) in [-1, 1] or None."""
        from .modeling import multimodal_embeddings

        m, llm, spec = self.modules, self.modules.llm, self.spec
        if (proprio_normalized is None) != (self.proprio_projector is None):
            raise InputError("proprio is required by this checkpoint's proprio projector" if proprio_normalized is None
                             else "this checkpoint has no proprio projector: proprio must be None")
        clock = time.perf_counter
        t0 = clock()
        px = pixel_values.to(self.device, self.dtype, non_blocking=True)
        n_img = px.shape[0]
        patches = m.vision(px).reshape(1, n_img * self.config.num_patches, -1)  # images along the sequence
        self._sync(); t1 = clock()
        prefix = m.projector(patches)
        if self.proprio_projector is not None:
            p = torch.as_tensor(np.asarray(proprio_normalized, np.float32), device=self.device).to(self.dtype)
            prefix = torch.cat([prefix, self.proprio_projector(p.view(1, -1)).unsqueeze(1)], dim=1)
        self._sync(); t2 = clock()

        layout = OFTLayout(len(prompt_ids), prefix.shape[1], spec.num_action_tokens)
        seq = multimodal_embeddings(llm, prefix, oft_input_ids(prompt_ids, spec.num_action_tokens))
        seq[:, layout.placeholder_start:layout.placeholder_start + layout.num_action_tokens] = 0
        mask = bidirectional_attention_mask(layout.length, seq.dtype, self.device)
        out = llm.model(inputs_embeds=seq, attention_mask=mask, use_cache=False,
                        position_ids=torch.arange(layout.length, device=self.device).view(1, -1))
        r0 = layout.action_rows_start
        rows = out.last_hidden_state[:, r0:r0 + layout.num_action_tokens]
        self._sync(); t3 = clock()

        tokens = oor = None
        if self.head is not None:
            normalized = self.head(rows, spec.num_actions_chunk)[0].float().cpu().numpy()
        else:  # discrete fallback: the LM's greedy token at each action row, decoded as OpenVLA bins
            tokens = llm.lm_head(rows)[0].argmax(-1).cpu().numpy().astype(np.int64)
            decoded = self.codec.decode_tokens(tokens)
            shape = (spec.num_actions_chunk, spec.action_dim)
            normalized, tokens, oor = (decoded.normalized.reshape(shape), tokens.reshape(shape),
                                       decoded.out_of_range.reshape(shape))
        t4 = clock()
        timings = {"vision": (t1 - t0) * 1e3, "projector": (t2 - t1) * 1e3, "llm": (t3 - t2) * 1e3,
                   "head": (t4 - t3) * 1e3}
        return OFTPassOutput(rows, np.asarray(normalized, np.float32), tokens, oor, layout, timings)

    def close(self):
        self.modules = self.head = self.proprio_projector = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
