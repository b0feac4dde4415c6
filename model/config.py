"""config.json + preprocessor_config.json -> one typed, validated config object.

The config is the single source of sizes; nothing else hard-codes model widths.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, NormStatsError

# Released OpenVLA values (used only when preprocessor_config.json does not say).
DINOV2_MEAN = (0.484375, 0.455078125, 0.40625)
DINOV2_STD = (0.228515625, 0.2236328125, 0.224609375)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Extra config.json field (ignored by the official code) holding timm constructor kwargs per
# tower, used by tiny test checkpoints to shrink the towers, e.g. [{"embed_dim": 64, ...}, {...}].
TIMM_KWARGS_FIELD = "timm_override_kwargs"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path.name} not found in {path.parent}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class TowerConfig:
    """One timm vision tower."""

    timm_id: str
    image_size: int
    act_layer: str | None
    kwargs: dict  # timm constructor overrides (tiny checkpoints only)
    mean: tuple
    std: tuple


@dataclass(frozen=True)
class OpenVLAConfig:
    weights_dir: Path
    towers: tuple  # (featurizer, fused_featurizer) TowerConfig
    text_config: dict  # raw text_config; LlamaConfig(**text_config) fills the defaults
    llm: Any  # transformers LlamaConfig built from text_config (sizes with defaults filled in)
    norm_stats: dict
    n_action_bins: int
    pad_to_multiple_of: int
    pad_token_id: int
    image_resize_strategy: str
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def vocab_size(self) -> int:
        """Full (padded) LM vocabulary, e.g. 32064."""
        return int(self.llm.vocab_size)

    @property
    def action_vocab_size(self) -> int:
        """Vocabulary the action tokenizer counts down from: vocab - pad_to_multiple_of (32000)."""
        return self.vocab_size - self.pad_to_multiple_of

    @property
    def image_size(self) -> int:
        return self.towers[0].image_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // 14) ** 2

    @property
    def action_dim(self) -> int:
        """Number of action tokens to generate: len(q01) of the statistics (7)."""
        for stats in self.norm_stats.values():
            return len(stats["action"]["q01"])
        return 7

    @property
    def max_positions(self) -> int:
        return int(self.llm.max_position_embeddings)


def _llama_config(text_config: dict):
    from transformers import LlamaConfig

    tc = {k: v for k, v in text_config.items() if k not in ("model_type", "torch_dtype", "dtype")}
    try:
        return LlamaConfig(**tc)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json text_config is not a valid Llama config: {e}") from e


def _norm_params(pp: dict) -> tuple[list, list] | None:
    if "means" in pp and "stds" in pp:
        return pp["means"], pp["stds"]
    tvf = pp.get("tvf_normalize_params")
    if tvf:
        return [p["mean"] for p in tvf], [p["std"] for p in tvf]
    return None


def _describe(v) -> str:
    """A JSON value as a person reads it in an error: null, "abc", a list of 3, an object."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v[:40])
    if isinstance(v, list):
        return f"a list of {len(v)}"
    if isinstance(v, dict):
        return "an object"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite_number(x) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an integer beyond float range
        return False


def validate_norm_stats(norm_stats, source: str = "config.json") -> None:
    """norm_stats as the action codec consumes them, checked once at load so a bad value is a
    NormStatsError naming the file, the dataset key and the field, never a TypeError at the first
    action. Per dataset: action.q01 and action.q99 are non-empty lists of finite numbers of one
    length D, with q01 <= q99; D is the same for every dataset (the number of action tokens
    generated, see OpenVLAConfig.action_dim); an optional action.mask is D booleans (0/1 taken as
    booleans; a string or null would silently flip un-normalisation in numpy)."""
    if not norm_stats:
        raise NormStatsError(f"{source}: norm_stats missing (needed to un-normalise actions)")
    if not isinstance(norm_stats, dict):
        raise NormStatsError(f"{source}: norm_stats is {_describe(norm_stats)}, expected an object "
                             "{dataset key: {action: {q01, q99, mask}}}")
    first_key, dim = None, None
    for key, stats in norm_stats.items():
        where = f"{source}: norm_stats[{key!r}].action"
        a = stats.get("action") if isinstance(stats, dict) else None
        if not isinstance(a, dict):
            raise NormStatsError(f"{where} is missing or not an object (it needs q01 and q99)")
        values = {}
        for name in ("q01", "q99"):
            if name not in a:
                raise NormStatsError(f"{where}.{name} is missing")
            v = a[name]
            if not isinstance(v, list) or not v:
                raise NormStatsError(f"{where}.{name} is {_describe(v)}, expected a non-empty list of numbers")
            for i, x in enumerate(v):
                if not _finite_number(x):
                    raise NormStatsError(f"{where}.{name}[{i}] is {_describe(x)}, expected a finite number")
            values[name] = v
        q01, q99 = values["q01"], values["q99"]
        if len(q01) != len(q99):
            raise NormStatsError(f"{where}: q01 has {len(q01)} values and q99 {len(q99)}; they must be equal")
        for i, (lo, hi) in enumerate(zip(q01, q99)):
            if lo > hi:
                raise NormStatsError(f"{where}: q01[{i}] = {lo} is above q99[{i}] = {hi}")
        if "mask" in a:
            m = a["mask"]
            if not isinstance(m, list) or len(m) != len(q01):
                raise NormStatsError(f"{where}.mask is {_describe(m)}, expected a list of {len(q01)} booleans "
                                     "(one per q01 value)")
            for i, x in enumerate(m):
                if not (isinstance(x, bool) or (isinstance(x, int) and x in (0, 1))):
                    raise NormStatsError(f"{where}.mask[{i}] is {_describe(x)}, expected true or false")
        if dim is None:
            first_key, dim = key, len(q01)
        elif len(q01) != dim:
            raise NormStatsError(f"{where} has {len(q01)} dimensions but norm_stats[{first_key!r}].action has "
                                 f"{dim}: every dataset must have the same action dimension")


def load_config(weights_dir: str | Path) -> OpenVLAConfig:
    d = Path(weights_dir)
    if not d.is_dir():
        raise ConfigError(f"weights directory not found: {d}")
    cfg = _read_json(d / "config.json")
    pp_path = d / "preprocessor_config.json"
    pp = _read_json(pp_path) if pp_path.is_file() else {}

    if not cfg.get("use_fused_vision_backbone", True):
        raise ConfigError("config.json: only the fused DINOv2+SigLIP backbone (use_fused_vision_backbone) is supported")
    if cfg.get("arch_specifier", "no-align+fused-gelu-mlp") != "no-align+fused-gelu-mlp":
        raise ConfigError(f"config.json: unsupported arch_specifier {cfg.get('arch_specifier')!r}")
    strategy = cfg.get("image_resize_strategy", "resize-naive")
    if strategy != "resize-naive":
        raise ConfigError(f"config.json: unsupported image_resize_strategy {strategy!r} (expected resize-naive)")

    ids = cfg.get("timm_model_ids")
    if not (isinstance(ids, list) and len(ids) == 2):
        raise ConfigError("config.json: timm_model_ids must list the two vision towers")
    sizes = cfg.get("image_sizes", [224, 224])
    acts = cfg.get("timm_override_act_layers") or [None, None]
    kwargs = cfg.get(TIMM_KWARGS_FIELD) or [{}, {}]
    norms = _norm_params(pp) or ([DINOV2_MEAN, SIGLIP_MEAN], [DINOV2_STD, SIGLIP_STD])
    if len(norms[0]) != 2 or len(norms[1]) != 2:
        raise ConfigError(f"{pp_path.name}: expected normalisation stats for 2 towers")
    if len(set(sizes)) != 1 or int(sizes[0]) % 14:
        raise ConfigError(f"config.json: image_sizes {sizes} must be equal multiples of 14")
    towers = tuple(
        TowerConfig(ids[i], int(sizes[i]), acts[i], dict(kwargs[i]),
                    tuple(float(x) for x in norms[0][i]), tuple(float(x) for x in norms[1][i]))
        for i in range(2)
    )

    text_config = cfg.get("text_config")
    if not isinstance(text_config, dict):
        raise ConfigError("config.json: text_config missing")
    llm = _llama_config(text_config)

    norm_stats, source = cfg.get("norm_stats"), "config.json"
    if not norm_stats:
        ds = d / "dataset_statistics.json"
        if ds.is_file():
            norm_stats, source = _read_json(ds), ds.name
    validate_norm_stats(norm_stats, source)

    return OpenVLAConfig(
        weights_dir=d,
        towers=towers,
        text_config=text_config,
        llm=llm,
        norm_stats=norm_stats,
        n_action_bins=int(cfg.get("n_action_bins", 256)),
        pad_to_multiple_of=int(cfg.get("pad_to_multiple_of", 64)),
        pad_token_id=int(cfg.get("pad_token_id", 32000)),
        image_resize_strategy=strategy,
        raw=cfg,
    )
