"""Speculative action decoding: the previous action's tokens as a draft, verified in the prefill.

One prefill runs over [BOS, patches, prompt, d1..dm]. Row r of its logits (r = 0 at the last
prompt position, r = j at draft token dj) gives the greedy token that follows. The backend takes
the argmax p_r of every row; `accepted_length` returns the longest prefix of drafts that greedy
decoding reproduces (the largest k with d_j == p_{j-1} for every j <= k). Then p_0..p_k are the
first k+1 tokens of the action, exactly as plain greedy decoding gives them (p_k is the first
non-matching argmax, or the token after the last draft); the KV rows after position L+k-1 are
discarded and plain decoding continues at position L+k. With all m = num_tokens-1 drafts
accepted, the whole action comes from the one prefill.

This module holds the pieces every backend and the node share:
- `sanitize_draft`: whatever a caller passes as a draft becomes clean token ids or "no draft",
  with a note, never an exception.
- `accepted_length`: the one verifier (numpy or torch, any device, no host sync on torch).
- `draft_accepting(tokens, k)`: a draft of which exactly k are accepted (benchmarks, tests).
- `DraftState`: one stream's draft (its last action's tokens), invalidated on an instruction
  change, a reset, or when older than speculative_max_age_s; drafts never cross streams (one
  DraftState per stream).
- `AcceptanceStats`: acceptance rate, mean accepted drafts and a histogram (diagnostics, replay).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class DraftCheck:
    tokens: np.ndarray | None  # int64[1..num_tokens-1] to verify, or None: no draft
    note: str | None = None  # why (part of) the draft was not used; None when used as given


def sanitize_draft(draft, num_tokens: int, vocab_size: int) -> DraftCheck:
    """Turn a caller's draft into token ids a backend can verify, never raising.

    Accepted: a 1-D sequence of integers (list, tuple, numpy or torch) of 1..num_tokens ids. A
    draft of num_tokens (the previous action's tokens as they come) loses its last id: only the
    first num_tokens-1 can be checked before the action is complete. Ids outside [0, vocab_size)
    cut the draft there (no greedy token can match them, so nothing after one could be
    accepted). Rejected (no draft): non-integers, booleans, nested or ragged sequences, more
    than num_tokens ids, an empty draft.
    """
    if draft is None:
        return DraftCheck(None)
    max_rows = int(num_tokens) - 1
    if max_rows < 1:
        return DraftCheck(None, f"no draft rows for an action of {num_tokens} token(s)")
    try:
        if hasattr(draft, "detach") and hasattr(draft, "cpu"):  # a torch tensor, without importing torch
            draft = draft.detach().cpu().numpy()
        arr = np.asarray(draft)
    except Exception as e:  # ragged lists, odd objects: not a draft
        return DraftCheck(None, f"draft rejected: not a sequence of token ids ({type(e).__name__})")
    if arr.dtype.kind not in "iu":
        return DraftCheck(None, f"draft rejected: token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        return DraftCheck(None, f"draft rejected: expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        return DraftCheck(None, "draft rejected: empty")
    if arr.size > num_tokens:
        return DraftCheck(None, f"draft rejected: {arr.size} tokens, an action has {num_tokens}")
    notes = []
    if arr.size > max_rows:
        arr = arr[:max_rows]
    bad = np.nonzero((arr < 0) | (arr >= vocab_size))[0]
    if bad.size:
        cut = int(bad[0])
        notes.append(f"draft cut at position {cut + 1}: token id {arr[cut]} is outside [0, {vocab_size})")
        arr = arr[:cut]
        if arr.size == 0:
            return DraftCheck(None, notes[0])
    return DraftCheck(arr.astype(np.int64), "; ".join(notes) or None)


def accepted_length(draft, predicted):
    """Number of leading drafts that greedy decoding reproduces.

    draft: (..., m) token ids; predicted: (..., >= m) greedy argmax ids, predicted[..., j] taken
    at the row just before draft[..., j] (j = 0: the last prompt position). Returns the largest
    k with draft[..., j] == predicted[..., j] for all j < k, as an int64 array / tensor over the
    leading dims (a 0-d tensor for 1-D inputs; on the tensors' device, without a host sync).
    A draft id that no argmax can take (e.g. -1 as padding) is never accepted, nor is anything
    after it.
    """
    m = draft.shape[-1]
    match = predicted[..., :m] == draft
    if isinstance(match, np.ndarray):
        return match.astype(np.int64).cumprod(axis=-1).sum(axis=-1)
    return match.long().cumprod(dim=-1).sum(dim=-1)


def draft_accepting(tokens, k: int) -> np.ndarray:
    """A draft of which greedy decoding accepts exactly k (benchmarks and tests): the first
    len(tokens)-1 greedy tokens with the one at position k+1 changed (k == len-1: unchanged).
    The change flips the lowest bit, so an action token stays an action token (31744..31999)."""
    d = np.array(np.asarray(tokens).reshape(-1)[:-1], dtype=np.int64)
    if not 0 <= k <= d.size:
        raise ValueError(f"k must be in 0..{d.size}, got {k}")
    if k < d.size:
        d[k] ^= 1
    return d


class DraftState:
    """One stream's draft: the tokens of its last action, if still valid.

    draft(instruction) returns them when the instruction is the one they were produced for and
    they are at most max_age_s old; otherwise it forgets them and returns None. update() stores a
    new action's tokens; reset() forgets them (after a reset, a disable, a new episode).
    """

    def __init__(self, max_age_s: float | None = None, num_tokens: int = 7, clock=time.monotonic):
        if max_age_s is not None and not (max_age_s > 0):  # also rejects NaN
            raise ValueError(f"max_age_s must be > 0 (or None for no age limit), got {max_age_s!r}")
        if num_tokens < 2:
            raise ValueError(f"num_tokens must be >= 2, got {num_tokens!r}")
        self.max_age_s = math.inf if max_age_s is None else float(max_age_s)
        self.num_tokens = int(num_tokens)
        self._clock = clock
        self._tokens: np.ndarray | None = None
        self._instruction: str | None = None
        self._stamp = 0.0

    def update(self, instruction: str, tokens, now: float | None = None) -> None:
        """Remember the last num_tokens tokens of the action just produced for instruction."""
        arr = np.asarray(tokens).reshape(-1)
        if arr.size == 0 or arr.dtype.kind not in "iu":
            self.reset()
            return
        self._tokens = arr[-self.num_tokens:].astype(np.int64).copy()
        self._instruction = instruction
        self._stamp = self._clock() if now is None else float(now)

    def draft(self, instruction: str, now: float | None = None) -> np.ndarray | None:
        """The stored tokens if valid for this instruction now, else None (and they are dropped)."""
        if self._tokens is None:
            return None
        now = self._clock() if now is None else float(now)
        age = now - self._stamp
        if instruction != self._instruction or not (0.0 <= age <= self.max_age_s):
            self.reset()
            return None
        return self._tokens.copy()

    def reset(self) -> None:
        self._tokens, self._instruction, self._stamp = None, None, 0.0

    @property
    def has_draft(self) -> bool:
        return self._tokens is not None


@dataclass
class AcceptanceStats:
    """Counts over actions: how many had a draft, how many drafts were accepted."""

    max_drafts: int = 6
    actions: int = 0
    drafted: int = 0
    accepted_total: int = 0
    histogram: list = field(default_factory=list)  # histogram[k]: drafted actions with k accepted

    def __post_init__(self):
        if not self.histogram:
            self.histogram = [0] * (self.max_drafts + 1)

    def record(self, drafted: bool, accepted: int = 0) -> None:
        self.actions += 1
        if not drafted:
            return
        k = min(max(int(accepted), 0), self.max_drafts)
        self.drafted += 1
        self.accepted_total += k
        self.histogram[k] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / offered drafts (each drafted action offers max_drafts); NaN if none."""
        offered = self.drafted * self.max_drafts
        return self.accepted_total / offered if offered else math.nan

    @property
    def mean_accepted(self) -> float:
        """Mean accepted drafts per drafted action; NaN if none."""
        return self.accepted_total / self.drafted if self.drafted else math.nan

    def as_dict(self) -> dict:
        return {"actions": self.actions, "drafted": self.drafted, "accepted_total": self.accepted_total,
                "acceptance_rate": self.acceptance_rate, "mean_accepted": self.mean_accepted,
                "histogram": list(self.histogram)}
