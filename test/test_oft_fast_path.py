"""The OpenVLA-OFT fast path (backends/torch_cuda.FastOFTModel) against the OFT torch reference
(model/oft.py OFTTorchModel, itself checked against the official semantics in test_oft.py).

On the CPU the fast path runs the very functions CUDA captures as graphs, eagerly: fused
weights, static buffers per (images, proprio, text bucket), text padded after the stop token
with the pad keys masked for every query (bidirectional), placeholders zeroed and action rows
gathered on the device, the head inside the LLM piece. The CUDA test adds the graphs; it skips
here with the reason "no CUDA GPU".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from openvla_model.backends.torch_cuda import ENV_FAST, FastOFTModel, use_fast_path
from openvla_model.oft import OFTTorchModel, normalize_proprio

INSTRUCTION = "put the red cup on the plate"  # 24 prompt tokens with the tiny tokenizer: text bucket 96
LONG = "put the blue block into the open drawer on the left of the sink"  # 31: text bucket 96 too
SHORT = "go"  # 19: text bucket 80
DATASET = "libero_spatial_no_noops"
# float32 on the CPU, fast vs reference (summation order only), measured 2026-12-01 on the tiny
# OFT checkpoint, 1 and 2 images, 3 prompts: action-row hidden states max |diff| 1.9e-6 to 4.2e-6
# (max |value| 3.9-4.4), normalised actions max |diff| 1.0e-6 to 2.4e-6 (max |value| 1.6-1.9).
# Bounds ~5x that: an RMSNorm off by 0.01% moves the rows by ~4e-4, an unmasked pad key by > 1e-2.
ROWS_REL_TOL = 5e-6
ACTIONS_ABS_TOL = 1.5e-5


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory) -> Path:
    from openvla_model.oft_checkpoint import write_tiny_oft_checkpoint

    return write_tiny_oft_checkpoint(tmp_path_factory.mktemp("tiny_oft_fast"), seed=0)


def _load(d, **kw):
    from openvla_model.oft_policy import load_oft_policy

    return load_oft_policy(d, device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def pair(oft_dir):
    """The reference policy and a fast model on the same modules (fused in place)."""
    with _load(oft_dir) as policy:
        assert type(policy.model) is OFTTorchModel
        yield policy, FastOFTModel(policy.model)


def _inputs(policy, n_images, with_proprio, instruction=INSTRUCTION, seed=None):
    images = frames(n_images, seed=n_images if seed is None else seed)
    pixels = torch.cat([policy.preprocessor(f) for f in images])
    p = None
    if with_proprio:
        p = normalize_proprio(np.linspace(-0.2, 1.2, 8), policy.config.norm_stats[DATASET], "bounds_q99")
    return pixels, policy.tokenizer.encode_prompt(instruction), p


def assert_close(fast_out, ref_out, what=""):
    err, scale = (fast_out.action_rows - ref_out.action_rows).abs().max().item(), ref_out.action_rows.abs().max().item()
    assert err < ROWS_REL_TOL * scale, f"{what}: action rows max |diff| {err:.3g} (max |value| {scale:.3g})"
    assert fast_out.layout == ref_out.layout
    if ref_out.tokens is None:
        diff = np.abs(fast_out.normalized - ref_out.normalized).max()
        assert diff < ACTIONS_ABS_TOL, f"{what}: normalised actions max |diff| {diff:.3g}"
    else:
        np.testing.assert_array_equal(fast_out.tokens, ref_out.tokens)
        np.testing.assert_array_equal(fast_out.normalized, ref_out.normalized)


@pytest.mark.parametrize("n_images,with_proprio", [(2, True), (1, True), (1, False)],
                         ids=["two-images-proprio", "one-image-proprio", "one-image-no-proprio"])
def test_fast_pass_equals_reference_on_cpu(oft_dir, pair, n_images, with_proprio):
    policy, fast = pair
    if not with_proprio:  # the checkpoint without its proprio projector
        policy = _load(oft_dir, use_proprio=False)
        fast = FastOFTModel(policy.model)
    pixels, ids, p = _inputs(policy, n_images, with_proprio)
    want, got = policy.model.run(pixels, ids, p), fast.run(pixels, ids, p)
    if not with_proprio:
        policy.close()
    assert_close(got, want, f"{n_images} image(s), proprio {with_proprio}")
    assert got.normalized.shape == (8, 7) and got.tokens is None
    assert set(got.timings_ms) == {"vision", "projector", "llm", "head"}
    assert fast.describe()["path"] == "fast" and fast.describe()["cuda_graphs"] is False
    assert (n_images, with_proprio, 96) in fast._buffers  # 24 + 56 + 1 text tokens: bucket 96


def test_fast_policy_chunk_equals_reference_policy(oft_dir, pair):
    """load_oft_policy(fast=True): predict_chunk (one image + proprio) equals the reference policy's."""
    policy, _ = pair
    images, proprio = frames(1, seed=3), np.linspace(0.0, 0.5, 8)
    want = policy.predict_chunk(images, INSTRUCTION, proprio=proprio)
    with _load(oft_dir, fast=True) as fast_policy:
        assert isinstance(fast_policy.model, FastOFTModel)
        got = fast_policy.predict_chunk(images, INSTRUCTION, proprio=proprio)
    assert np.abs(got.normalized - want.normalized).max() < ACTIONS_ABS_TOL
    np.testing.assert_allclose(got.actions, want.actions, rtol=0, atol=ACTIONS_ABS_TOL * 2)
    assert set(got.timings_ms) == set(want.timings_ms) and got.used_proprio and got.num_images == 1


def test_fast_discrete_fallback(oft_dir):
    with _load(oft_dir, use_action_head=False) as policy:
        fast = FastOFTModel(policy.model)
        pixels, ids, p = _inputs(policy, 2, True, seed=7)
        want, got = policy.model.run(pixels, ids, p), fast.run(pixels, ids, p)
        assert got.tokens.shape == (8, 7)
        assert_close(got, want, "discrete fallback")
        np.testing.assert_array_equal(got.out_of_range, want.out_of_range)


class UnmaskedPads(FastOFTModel):
    """A fault: the pad keys after the stop token are not masked."""

    def _key_mask(self, buf, valid_len):
        return torch.zeros_like(super()._key_mask(buf, valid_len))


def test_text_padding_never_reaches_real_rows(pair):
    """Text buckets 1 (no pad at all) and 64 (pads after the stop token; a long prompt first, so
    the short one runs on a buffer whose pad columns held real ids) give the reference's rows.
    Without the key mask (the fault above) the same check fails."""
    policy, _ = pair
    fasts = {b: FastOFTModel(policy.model, prompt_bucket=b) for b in (1, 64)}
    for instruction in (LONG, INSTRUCTION):
        pixels, ids, p = _inputs(policy, 1, True, instruction=instruction, seed=4)
        want = policy.model.run(pixels, ids, p)
        for b, fast in fasts.items():
            assert_close(fast.run(pixels, ids, p), want, f"bucket {b}, {instruction!r}")
    assert list(fasts[64]._buffers) == [(1, True, 128)]  # both prompts in one bucket: one buffer set
    assert list(fasts[1]._buffers) == [(1, True, 88), (1, True, 81)]  # exact lengths: no pad
    faulty = UnmaskedPads(policy.model, prompt_bucket=64)
    with pytest.raises(AssertionError, match="action rows"):
        assert_close(faulty.run(pixels, ids, p), want, "unmasked pads")


def test_fast_path_is_the_default_on_cuda_and_switchable(oft_dir, monkeypatch):
    """As for OpenVLA (test_cuda_fast_path.test_fast_path_is_selected_on_cuda_and_switchable):
    on by default for CUDA, off for the CPU; fast= or $OPENVLA_TORCH_FAST switch it; load_policy
    passes fast= on to OFT checkpoints."""
    from openvla_model import load_policy
    from openvla_model.oft_policy import OFTPolicy

    monkeypatch.delenv(ENV_FAST, raising=False)
    assert use_fast_path(torch.device("cuda")) and not use_fast_path(torch.device("cpu"))
    with _load(oft_dir) as policy:
        assert type(policy.model) is OFTTorchModel and "path" not in policy.describe()
    with load_policy(oft_dir, device="cpu", dtype="float32", fast=True) as policy:
        assert isinstance(policy, OFTPolicy) and isinstance(policy.model, FastOFTModel)
        assert policy.describe()["path"] == "fast" and policy.model.modules is policy.model.reference.modules
    monkeypatch.setenv(ENV_FAST, "1")
    with _load(oft_dir) as policy:
        assert isinstance(policy.model, FastOFTModel)
    with _load(oft_dir, fast=False) as policy:
        assert type(policy.model) is OFTTorchModel


# -- CUDA ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("n_images", [1, 2])
def test_cuda_graphs_equal_the_reference(oft_dir, monkeypatch, n_images):
    """float32 on CUDA: load_oft_policy(device="cuda") takes the fast path with graphs by default;
    its rows and chunk equal the reference pass (fast=False) on the same pixels, on the capturing
    call and on the replays, for two prompt buckets."""
    from openvla_model.oft_policy import load_oft_policy

    monkeypatch.delenv(ENV_FAST, raising=False)
    with load_oft_policy(oft_dir, device="cuda", dtype="float32") as fast_policy, \
            load_oft_policy(oft_dir, device="cuda", dtype="float32", fast=False) as ref_policy:
        fast, ref = fast_policy.model, ref_policy.model
        assert isinstance(fast, FastOFTModel) and fast.describe()["cuda_graphs"]
        assert type(ref) is OFTTorchModel
        assert fast_policy.preprocessor.device.type == "cuda"
        for instruction in (INSTRUCTION, SHORT):
            pixels, ids, p = _inputs(ref_policy, n_images, True, instruction=instruction)
            pixels = pixels.cuda()
            want = ref.run(pixels, ids, p)
            for _ in range(3):  # capture, then replays
                got = fast.run(pixels, ids, p)
                err = (got.action_rows - want.action_rows).abs().max().item()
                assert err < 1e-4 * want.action_rows.abs().max().item(), err
                assert np.abs(got.normalized - want.normalized).max() < 1e-4
                assert all(v > 0 for k, v in got.timings_ms.items() if k != "head")
        d = fast.describe()
        assert not d["graph_failures"] and d["graphs_captured"] == 6, d  # 3 pieces x 2 buckets
        chunk = fast_policy.predict_chunk(frames(n_images), INSTRUCTION, proprio=np.zeros(8))
        assert chunk.valid and chunk.actions.shape == (8, 7)
