"""The backend-neutral OpenVLA policy: load once, then predict(rgb, instruction) -> ActionResult.

    from openvla_model import load_policy
    policy = load_policy("/path/to/openvla-7b", backend="torch", device="cuda")
    result = policy.predict(rgb_uint8_hxwx3, "pick up the red cup", unnorm_key="bridge_orig")
    result.action      # 7 un-normalised values [dx, dy, dz, droll, dpitch, dyaw, gripper]
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .action_codec import ActionCodec
from .backends import create_backend
from .checkpoint import Checkpoint
from .config import OpenVLAConfig, load_config
from .errors import ConfigError, InputError, OpenVLAError
from .preprocess import Preprocessor
from .prompt import PromptTokenizer
from .speculative import sanitize_draft

log = logging.getLogger("openvla_model")

STAGES = ("preprocess", "vision", "projector", "prefill", "decode", "total")


class BatchItem(NamedTuple):
    """One item of predict_batch; a plain (rgb, instruction[, unnorm_key[, draft]]) tuple works too."""

    rgb: np.ndarray
    instruction: str
    unnorm_key: str | None = None
    draft: object = None


def _as_item(item) -> BatchItem:
    if isinstance(item, BatchItem):
        return item
    if not isinstance(item, (tuple, list)) or not 2 <= len(item) <= 4:
        raise InputError("a batch item must be (rgb, instruction[, unnorm_key[, draft]]), got "
                         f"{type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else ""))
    return BatchItem(*item)


def _cat_pixels(pixels: list):
    import torch

    return pixels[0] if len(pixels) == 1 else torch.cat(pixels, dim=0)


@dataclass
class ActionResult:
    action: np.ndarray  # float32[7], un-normalised (robot units of the unnorm_key dataset)
    normalized: np.ndarray  # float32[7], bin centres in [-1, 1]
    tokens: np.ndarray  # int64[7], raw greedy token ids
    out_of_range: np.ndarray  # bool[7], token was not an action token (31744..31999)
    unnorm_key: str
    instruction: str
    timings_ms: dict = field(default_factory=dict)  # keys: STAGES
    accepted: int = 0  # drafts accepted (speculative decoding); 0 without a draft

    @property
    def valid(self) -> bool:
        """All 7 tokens are action tokens and every value is finite."""
        return not self.out_of_range.any() and bool(np.isfinite(self.action).all())

    def to_dict(self) -> dict:
        return {
            "tokens": [int(t) for t in self.tokens],
            "normalized": [float(v) for v in self.normalized],
            "action": [float(v) for v in self.action],
            "out_of_range": [bool(v) for v in self.out_of_range],
            "unnorm_key": self.unnorm_key,
            "instruction": self.instruction,
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "accepted": int(self.accepted),
        }


class OpenVLAPolicy:
    def __init__(self, config: OpenVLAConfig, backend, tokenizer: PromptTokenizer, codec: ActionCodec,
                 preprocessor: Preprocessor, default_unnorm_key: str | None = None, load_time_s: float = 0.0,
                 speculative: bool = False):
        self.config = config
        self.speculative = bool(speculative)  # predict(draft=...) is verified; False: drafts ignored
        self._draft_warned = False
        self.backend = backend
        self.tokenizer = tokenizer
        self.codec = codec
        self.preprocessor = preprocessor
        self.default_unnorm_key = default_unnorm_key
        self.load_time_s = load_time_s

    @property
    def weights_path(self) -> Path:
        return self.config.weights_dir

    def describe(self) -> dict:
        return {**self.backend.describe(), "weights_path": str(self.weights_path), "speculative": self.speculative,
                "load_time_s": round(self.load_time_s, 3), "unnorm_keys": self.codec.keys}

    def prompt_ids(self, instruction: str) -> np.ndarray:
        ids = self.tokenizer.encode_prompt(instruction)
        needed = len(ids) + self.config.num_patches + self.config.action_dim
        if needed > self.config.max_positions:
            raise InputError(
                f"instruction too long: {len(ids)} prompt tokens + {self.config.num_patches} image patches + "
                f"{self.config.action_dim} actions exceed the model's {self.config.max_positions} positions")
        return ids

    def _usable_draft(self, draft) -> np.ndarray | None:
        """The draft as clean token ids for the backend, or None (no draft, drafts off, a backend
        without draft rows, or a draft sanitize_draft rejects). Never raises."""
        if draft is None:
            return None
        if not self.speculative:
            why = "the policy was loaded with speculative=False"
            check = None
        elif not getattr(self.backend, "supports_draft", False):
            why, check = f"the {getattr(self.backend, 'name', '?')} backend does not take drafts yet", None
        else:
            check = sanitize_draft(draft, self.config.action_dim, self.config.vocab_size)
            why = check.note
        if why:
            (log.debug if self._draft_warned else log.warning)("draft: %s", why)
            self._draft_warned = True
        return None if check is None else check.tokens

    def predict(self, rgb: np.ndarray, instruction: str, unnorm_key: str | None = None,
                draft=None) -> ActionResult:
        """One action. draft: the tokens this action is expected to start with (usually the
        stream's previous action, see speculative.DraftState); verified in the prefill when the
        policy is speculative, so the tokens are always those of plain greedy decoding and
        result.accepted says how many drafts were right. A bad draft is ignored, never raised.
        A batch of one through predict_batch; a bad image, instruction or unnorm_key raises its
        OpenVLAError (InputError, UnnormKeyError)."""
        outcome = self.predict_batch([BatchItem(rgb, instruction, unnorm_key, draft)])[0]
        if isinstance(outcome, OpenVLAError):
            raise outcome
        return outcome

    def predict_batch(self, items) -> list:
        """Actions for several (rgb, instruction, unnorm_key, draft) items in one batch: one
        preprocessing each, then one backend call for all the good items (batched vision,
        prefill and decode on a backend with generate_batch: the torch reference, the fast path
        and TT-NN; per-item generate calls on one without).

        items: BatchItem or plain tuples (rgb, instruction[, unnorm_key[, draft]]).
        Returns one outcome per item, in order: its ActionResult, or the OpenVLAError that item
        failed its own checks with (bad image, bad instruction, prompt too long, unknown or
        missing unnorm_key), returned, not raised. A bad item never changes the others' actions:
        each good item's tokens are exactly those predict() gives it alone. A bad draft is
        ignored (as in predict). Errors that are not the item's fault (a backend failure) raise
        for the whole batch. timings_ms: "preprocess" is the item's own; the model stages are
        those of the one batched backend call (of the item's own generate call on a backend
        without generate_batch); "total" is the item's preprocessing plus the backend time until
        its result was decoded. accepted is per item."""
        clock = time.perf_counter
        items = list(items)
        outcomes: list = [None] * len(items)
        good = []  # (index, instruction, key, ids, pixels, drafts, preprocess ms)
        for n, item in enumerate(items):
            ts = clock()
            try:
                rgb, instruction, unnorm_key, draft = _as_item(item)
                key = self.codec.resolve_key(unnorm_key if unnorm_key else self.default_unnorm_key)
                ids = self.prompt_ids(instruction)
                check = getattr(self.backend, "check_prompt", None)
                if check is not None:  # a backend's own tighter limit (TT-NN: its KV cache), per item
                    check(ids, self.config.action_dim)
                pixels = self.preprocessor(rgb)
            except OpenVLAError as e:
                outcomes[n] = e
                continue
            drafts = self._usable_draft(draft)
            good.append((n, instruction, key, ids, pixels, drafts, (clock() - ts) * 1e3))
        if not good:
            return outcomes
        num = self.config.action_dim
        t1 = clock()
        if hasattr(self.backend, "generate_batch"):
            drafts = [g[5] for g in good]
            tokens, accepted, timings = self.backend.generate_batch(
                _cat_pixels([g[4] for g in good]), [g[3] for g in good], num,
                drafts=None if all(d is None for d in drafts) else drafts)
            per_item = [(tokens[j], int(accepted[j]), timings) for j in range(len(good))]
        else:  # a backend without a batch dimension yet: one generate per item, same results
            per_item = []
            for _, _, _, ids, pixels, drafts, _ in good:
                if drafts is None:
                    tok, timings = self.backend.generate(pixels, ids, num)
                    per_item.append((tok, 0, timings))
                else:
                    tok, timings = self.backend.generate(pixels, ids, num, draft=drafts)
                    per_item.append((tok, int(self.backend.last_accepted), timings))
        for (n, instruction, key, _, _, _, pre_ms), (tok, accepted, timings) in zip(good, per_item):
            decoded = self.codec.decode_tokens(tok)
            action = self.codec.unnormalize(decoded.normalized, key)
            t2 = clock()
            total = (t2 - t1) * 1e3 + pre_ms
            outcomes[n] = ActionResult(
                action=action, normalized=decoded.normalized, tokens=np.asarray(tok, np.int64),
                out_of_range=decoded.out_of_range, unnorm_key=key, instruction=instruction,
                timings_ms={"preprocess": pre_ms, **timings, "total": total}, accepted=accepted)
        return outcomes

    def close(self):
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def default_weights_path() -> str | None:
    return os.environ.get("OPENVLA_WEIGHTS") or None


def load_policy(weights_path: str | os.PathLike | None = None, backend: str = "torch", *, device: str | None = None,
                dtype: str | None = None, mesh_device: str | None = None, center_crop: bool = False,
                default_unnorm_key: str | None = None, fast: bool | None = None, precision: dict | None = None,
                speculative: bool = False, **backend_options) -> OpenVLAPolicy:
    """Load an OpenVLA checkpoint directory (HF layout) onto a backend.

    weights_path defaults to $OPENVLA_WEIGHTS; mesh_device (ttnn) defaults to $MESH_DEVICE.
    device: torch "cpu" | "cuda" | "auto" (default: cuda when available). dtype: "float32" |
    "bfloat16" (default: float32 on CPU, bfloat16 on CUDA). fast (torch): the CUDA fast path
    (default: on for CUDA, see docs/performance.md; $OPENVLA_TORCH_FAST overrides). precision
    (ttnn): per-mesh precision overrides (config/mesh/*.yaml). speculative: predict(draft=...)
    verifies the draft in the prefill (speculative action decoding, same tokens; docs/model.md);
    False ignores drafts. Other keyword arguments go to the backend (ttnn: cache_dir, trace).
    """
    start = time.perf_counter()
    path = weights_path or default_weights_path()
    if not path:
        raise ConfigError("no weights path given and OPENVLA_WEIGHTS is not set")
    from .oft import checkpoint_kind

    if checkpoint_kind(path) == "oft":  # action head / proprio projector files beside the HF files: docs/oft.md
        from .oft_policy import load_oft_policy

        if backend == "ttnn":  # the mesh and precision reach the TT-NN OFT model as they reach TtnnBackend
            backend_options = dict(backend_options, mesh_device=mesh_device)
            if precision is not None:
                backend_options["precision"] = precision
        return load_oft_policy(path, backend, device=device, dtype=dtype, center_crop=center_crop,
                               default_unnorm_key=default_unnorm_key, fast=fast, **backend_options)
    config = load_config(path)
    if config.raw.get("openvla_ros_tiny_random"):
        log.warning("%s is a TINY RANDOM test checkpoint: its actions are meaningless", path)
    tokenizer = PromptTokenizer(config.weights_dir)
    codec = action_codec(config)
    if default_unnorm_key:
        codec.resolve_key(default_unnorm_key)  # the one check per load: before the weights, not on the first frame
    checkpoint = Checkpoint(config.weights_dir)
    be = create_backend(backend, config, checkpoint, device=device, dtype=dtype,
                        mesh_device=mesh_device or os.environ.get("MESH_DEVICE"), fast=fast, precision=precision,
                        **backend_options)
    return assemble_policy(config, be, tokenizer=tokenizer, codec=codec, center_crop=center_crop,
                           default_unnorm_key=default_unnorm_key, speculative=speculative,
                           load_time_s=time.perf_counter() - start)


def action_codec(config) -> ActionCodec:
    """The checkpoint's action codec (its norm stats, action vocabulary and bins)."""
    return ActionCodec(config.norm_stats, vocab_size=config.action_vocab_size, n_bins=config.n_action_bins)


def assemble_policy(config, backend, *, tokenizer: PromptTokenizer | None = None, codec: ActionCodec | None = None,
                    center_crop: bool = False, default_unnorm_key: str | None = None, speculative: bool = False,
                    load_time_s: float = 0.0) -> OpenVLAPolicy:
    """The policy around a created backend: the prompt tokenizer of the weights directory, the
    action codec, preprocessing on the backend's preprocess device (load_policy, the benchmarks)."""
    pre = Preprocessor(config, center_crop=center_crop, device=getattr(backend, "preprocess_device", "cpu"))
    return OpenVLAPolicy(config, backend, tokenizer or PromptTokenizer(config.weights_dir),
                         codec or action_codec(config), pre, default_unnorm_key=default_unnorm_key,
                         load_time_s=load_time_s, speculative=speculative)
