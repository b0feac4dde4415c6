"""Backends: everything between preprocessed pixels + prompt ids and the 7 action token ids.

A backend never builds prompts, preprocesses images or decodes actions: the policy does that
once for all of them. Interface (duck-typed):

    backend.generate(pixel_values, input_ids, num_tokens) -> (tokens: np.int64[num_tokens],
                                                             timings_ms: {vision, projector, prefill, decode})
    backend.describe() -> dict   (backend, device, dtype, ... for logs and diagnostics)
    backend.close()

Batch dimension (optional; the torch reference and the fast path have it, docs/model.md "Batched
prediction", docs/performance.md "Batches on the fast path"):

    backend.generate_batch(pixel_values (B, 6, S, S), [input_ids_1 .. input_ids_B], num_tokens,
                           drafts=None | [draft_or_None] * B)
        -> (tokens: np.int64[B, num_tokens], accepted: np.int64[B], timings_ms for the batch)
        Prompts may differ in length; row i's tokens must equal generate() of item i alone.
        OpenVLAPolicy.predict_batch uses it when present, else one generate() per item.

Speculative action decoding (optional; a backend that has it sets `supports_draft = True`):

    backend.generate(pixel_values, input_ids, num_tokens, draft=ids) -> same as above; the
        draft ids ride in the prefill as rows after the prompt, speculative.accepted_length
        (the one verifier) picks the longest prefix greedy decoding reproduces, plain decoding
        continues after it; backend.last_accepted = how many drafts were accepted (0 without).
        The tokens are the plain greedy ones either way. Backends sanitise the draft with
        speculative.sanitize_draft (cheap, idempotent), so a bad draft never raises.
"""
from __future__ import annotations

from ..errors import BackendError

BACKENDS = ("torch", "ttnn")


def create_backend(name: str, config, checkpoint, **options):
    if name == "torch":
        from .torch_backend import TorchBackend, resolve_device
        from .torch_cuda import FastTorchBackend, use_fast_path

        # CUDA: the fast path (graphs, static cache) unless fast=False / OPENVLA_TORCH_FAST=0.
        if use_fast_path(resolve_device(options.get("device")), options.get("fast")):
            return FastTorchBackend(config, checkpoint, device=options.get("device"), dtype=options.get("dtype"))
        return TorchBackend(config, checkpoint, device=options.get("device"), dtype=options.get("dtype"))
    if name == "ttnn":
        from .ttnn import TtnnBackend

        # mesh_device: N300 | T3K | auto ($MESH_DEVICE). precision: the node's precision.* overrides.
        extra = {k: options[k] for k in ("precision", "profile_overrides", "cache_dir", "trace", "tt")
                 if options.get(k) is not None}
        return TtnnBackend(config, checkpoint, mesh_device=options.get("mesh_device"), **extra)
    raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
