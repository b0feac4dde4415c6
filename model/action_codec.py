"""Action tokens <-> normalised actions <-> robot actions (OpenVLA's ActionTokenizer).

The one action decoder every backend shares. Facts (openvla-spec.md section 5):
  bins = linspace(-1, 1, n_bins); 255 bin centres centre[k] = -1 + (2k+1)/255
  idx = clip(vocab - token - 1, 0, n_bins - 2);  normalized = centre[idx]
  action tokens are vocab-n_bins .. vocab-1 (31744..31999); others clip to an extreme centre and
  are reported as out of range (never hidden).
  un-normalise where mask: 0.5 * (n + 1) * (q99 - q01) + q01; elsewhere n unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UnnormKeyError


def resolve_unnorm_key(available, unnorm_key: str | None) -> str:
    """The one unnorm_key rule: the dataset key to un-normalise with, given the keys a checkpoint
    has statistics for (`available`: any iterable of names, e.g. norm_stats or describe()'s
    unnorm_keys). None or "" picks the only dataset; raises UnnormKeyError listing the valid keys
    when the key is unknown, or missing while there are several datasets."""
    keys = sorted(available)
    if unnorm_key is None or unnorm_key == "":
        if len(keys) == 1:
            return keys[0]
        raise UnnormKeyError(
            f"unnorm_key is required: this model has statistics for {len(keys)} datasets; "
            f"valid keys: {', '.join(keys)}")
    if unnorm_key not in keys:
        raise UnnormKeyError(f"unknown unnorm_key {unnorm_key!r}; valid keys: {', '.join(keys)}")
    return unnorm_key


@dataclass(frozen=True)
class DecodedTokens:
    normalized: np.ndarray  # float32 [D], in [-1, 1]
    out_of_range: np.ndarray  # bool [D]: token was not an action token


class ActionCodec:
    def __init__(self, norm_stats: dict, vocab_size: int = 32000, n_bins: int = 256):
        self.norm_stats = norm_stats
        self.vocab_size = int(vocab_size)
        self.n_bins = int(n_bins)
        bins = np.linspace(-1.0, 1.0, self.n_bins)
        self.bin_centers = ((bins[:-1] + bins[1:]) / 2.0)  # float64, 255 values

    @property
    def first_action_token(self) -> int:
        return self.vocab_size - self.n_bins

    @property
    def last_action_token(self) -> int:
        return self.vocab_size - 1

    def decode_tokens(self, tokens) -> DecodedTokens:
        t = np.asarray(tokens, dtype=np.int64)
        idx = np.clip(self.vocab_size - t - 1, 0, self.bin_centers.shape[0] - 1)
        oor = (t < self.first_action_token) | (t > self.last_action_token)
        return DecodedTokens(self.bin_centers[idx].astype(np.float32), oor)

    def encode(self, normalized) -> np.ndarray:
        """Normalised values -> the token whose bin centre is nearest (for tests and GT replays)."""
        n = np.asarray(normalized, dtype=np.float64)
        idx = np.abs(n[..., None] - self.bin_centers).argmin(-1)
        return (self.vocab_size - 1 - idx).astype(np.int64)

    # -- un-normalisation --------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return sorted(self.norm_stats)

    def resolve_key(self, unnorm_key: str | None) -> str:
        return resolve_unnorm_key(self.norm_stats, unnorm_key)

    def action_stats(self, unnorm_key: str | None) -> dict:
        return self.norm_stats[self.resolve_key(unnorm_key)]["action"]

    def unnormalize(self, normalized, unnorm_key: str | None) -> np.ndarray:
        stats = self.action_stats(unnorm_key)
        n = np.asarray(normalized, dtype=np.float64)
        q01 = np.asarray(stats["q01"], dtype=np.float64)
        q99 = np.asarray(stats["q99"], dtype=np.float64)
        mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
        out = np.where(mask, 0.5 * (n + 1.0) * (q99 - q01) + q01, n)
        return out.astype(np.float32)
