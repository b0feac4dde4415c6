"""OpenVLA-OFT on the TT-NN backend (model/backends/ttnn/oft.py), numbers checked through ttnn's
golden functions (test/ttnn_golden/emulator.GoldenTTNN in place of `ttnn`, the mesh emulated chip
by chip: 1x2 = N300, 1x8 = T3K), against the OFT torch CPU reference (model/oft.py, itself tested
against an independent composition of the official semantics in test_oft.py).

What this checks: the OFT logic on the mesh — images along the sequence, the proprio token after
the patches, zeroed placeholder rows, the stop token, BIDIRECTIONAL attention with the padding keys
masked, the action-row slice and final norm, the L1 head on the device (row-major grouping, the
column-sharded fc1 + all-gather, residual blocks, eps), the discrete fallback's argmax per row.
What it does NOT check: device precision, kernels, memory (float32 here; test/ttnn_mock/run_mock_oft.py
runs the same code through ttnn's validation on a mock N300).
Two negative controls show the check sees what matters: a causal pass and an unmasked padding
both fail the bound. Run with -s to see the measured differences.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ttnn  # noqa: E402,F401  (a required dependency of the venv: its absence is a failure, not a skip)
from test_oft import INSTRUCTION, frames, variant  # noqa: E402

from openvla_model.errors import BackendError, InputError  # noqa: E402

MESHES = {"N300": 2, "T3K": 8}
# float32 golden pass vs float32 torch pass (only summation order and the sharded sums differ).
# Measured on the tiny OFT checkpoint over the 6 runs below (N300 and T3K, 1 and 2 images, with and
# without proprio; 2026-12-01): normalised actions max |diff| 2.9e-6 .. 5.0e-6 (values up to 1.6),
# action-row hidden states 8.5e-6 .. 1.2e-5. Bounds ~2.5x the largest. The negative controls
# measured: a causal pass 6.7e-1 (actions) / 1.5 (rows), unmasked padding keys 2.1e-2 / 5.3e-2.
MAX_ABS_DIFF_ACTIONS = 1.25e-5
MAX_ABS_DIFF_ROWS = 3e-5
CASES = {"two-images-proprio": (2, True), "one-image-proprio": (1, True), "one-image-no-proprio": (1, False),
         "two-images-no-proprio": (2, False)}
RUNS = [("N300", c) for c in CASES] + [("T3K", "two-images-proprio"), ("T3K", "one-image-no-proprio")]
PROPRIO = np.linspace(-0.2, 1.2, 8)


@pytest.fixture(scope="module")
def oft_dirs(tmp_path_factory) -> dict:
    from openvla_model.oft_checkpoint import write_tiny_oft_checkpoint

    d = write_tiny_oft_checkpoint(tmp_path_factory.mktemp("tiny_oft_ttnn"), seed=0)
    return {True: d, False: variant(d, tmp_path_factory.mktemp("tiny_oft_ttnn_noproprio"),
                                    drop=("proprio_projector",))}


@pytest.fixture(scope="module")
def torch_policies(oft_dirs):
    from openvla_model.oft_policy import load_oft_policy

    pols = {k: load_oft_policy(d, device="cpu", dtype="float32") for k, d in oft_dirs.items()}
    yield pols
    for p in pols.values():
        p.close()


def _load_ttnn(d, mesh, **kw):
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.oft_policy import load_oft_policy

    return load_oft_policy(d, backend="ttnn", mesh_device=mesh, tt=GoldenTTNN(MESHES[mesh]), cache_dir=None, **kw)


@pytest.fixture(scope="module")
def ttnn_policies(oft_dirs):
    """(mesh, with_proprio) -> OFT policy on the emulated mesh. The N300 one with proprio comes
    through openvla_model.load_policy (checkpoint-kind dispatch, mesh auto-detected: 2 chips)."""
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model import load_policy

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MESH_DEVICE", raising=False)  # auto-detection, not the environment's mesh
        pols = {("N300", True): load_policy(oft_dirs[True], backend="ttnn", tt=GoldenTTNN(2), cache_dir=None)}
    needed = {(mesh, CASES[case][1]) for mesh, case in RUNS}
    for mesh, proprio in sorted(needed - set(pols)):
        pols[(mesh, proprio)] = _load_ttnn(oft_dirs[proprio], mesh)
    yield pols
    for p in pols.values():
        p.close()


def _pixels(policy, images):
    return torch.cat([policy.preprocessor(f) for f in images])


def _diffs(ours, ref) -> tuple[float, float]:
    return (float(np.abs(ours.normalized - ref.normalized).max()),
            float((ours.action_rows.double() - ref.action_rows.double()).abs().max()))


def _pass(policy, images, proprio):
    """The policy's model pass on the same inputs predict_chunk would give it (rows kept for the
    TT-NN model)."""
    from openvla_model.oft import normalize_proprio

    p_norm = None if proprio is None else normalize_proprio(
        proprio, policy.config.norm_stats["libero_spatial_no_noops"], "bounds_q99")
    if hasattr(policy.model, "return_rows"):
        policy.model.return_rows = True
    try:
        return policy.model.run(_pixels(policy, images), policy.tokenizer.encode_prompt(INSTRUCTION), p_norm)
    finally:
        if hasattr(policy.model, "return_rows"):
            policy.model.return_rows = False


@pytest.mark.parametrize("mesh,case", RUNS, ids=[f"{m}-{c}" for m, c in RUNS])
def test_golden_oft_chunk_equals_torch(ttnn_policies, torch_policies, mesh, case):
    n_images, with_proprio = CASES[case]
    pol, ref = ttnn_policies[(mesh, with_proprio)], torch_policies[with_proprio]
    assert pol.describe()["device"].startswith(mesh) and pol.describe()["backend"] == "ttnn"
    images, proprio = frames(n_images, seed=10 + n_images), (PROPRIO if with_proprio else None)
    got = pol.predict_chunk(images, INSTRUCTION, proprio=proprio)
    want = ref.predict_chunk(images, INSTRUCTION, proprio=proprio)
    ours, theirs = _pass(pol, images, proprio), _pass(ref, images, proprio)
    d_actions, d_rows = _diffs(ours, theirs)
    print(f"\n{mesh} {case}: L={ours.layout.length} (padded to {-(-ours.layout.length // 32) * 32}), "
          f"normalised actions max |diff| {d_actions:.2e}, action rows {d_rows:.2e}")
    assert ours.layout == theirs.layout
    assert d_rows <= MAX_ABS_DIFF_ROWS, d_rows
    assert d_actions <= MAX_ABS_DIFF_ACTIONS, d_actions
    np.testing.assert_array_equal(got.normalized, ours.normalized)  # predict_chunk ran the same pass
    np.testing.assert_allclose(got.normalized, want.normalized, rtol=0, atol=MAX_ABS_DIFF_ACTIONS)
    np.testing.assert_allclose(got.actions, want.actions, rtol=0, atol=2 * MAX_ABS_DIFF_ACTIONS)  # (hi - lo) < 2
    assert got.actions.shape == (8, 7) and got.valid and got.num_images == n_images
    assert got.used_proprio is with_proprio and got.tokens is None
    assert set(got.timings_ms) == {"preprocess", "vision", "projector", "llm", "head", "total"}


def test_golden_oft_head_norms_get_the_heads_eps(ttnn_policies):
    """What the emulator handed the goldens: the head's 4 LayerNorms got nn.LayerNorm's 1e-5 (not
    the vision towers' 1e-6, not ttnn's 1e-12 default), the final RMSNorm of the rows the LLM's eps."""
    pol = ttnn_policies[("N300", True)]
    emu = pol.model.tt
    start = {op: len(emu.op_kwargs.get(op, [])) for op in ("layer_norm", "rms_norm")}
    pol.predict_chunk(frames(1, seed=3), INSTRUCTION, proprio=PROPRIO)
    ln = [c["epsilon"] for c in emu.op_kwargs["layer_norm"][start["layer_norm"]:]]
    rms = [c["epsilon"] for c in emu.op_kwargs["rms_norm"][start["rms_norm"]:]]
    assert ln[-4:] == [1e-5] * 4, ln[-6:]
    assert rms[-1] == pol.config.llm.rms_norm_eps


def _causal(monkeypatch):
    """Fault: the LLM prefill as OpenVLA runs it (causal; the padding mask dropped, as the device op
    takes no mask with is_causal=True)."""
    from openvla_model.backends.ttnn.llm import LLM

    orig = LLM.prefill_layers
    monkeypatch.setattr(LLM, "prefill_layers", lambda self, x, count=None, causal=True, attn_mask=None:
                        orig(self, x, count))


def _unmasked(monkeypatch):
    """Fault: bidirectional, but the padding keys are not masked (a zero mask)."""
    from openvla_model.backends.ttnn import oft

    monkeypatch.setattr(oft, "padding_mask", lambda length, padded: torch.zeros(1, 1, padded, padded))


@pytest.mark.parametrize("fault", [_causal, _unmasked], ids=["causal", "padding-unmasked"])
def test_golden_oft_negative_controls_fail_the_check(ttnn_policies, torch_policies, monkeypatch, fault):
    """The check above sees bidirectionality and the padding mask: with either fault the same
    comparison is far outside its bound."""
    pol, ref = ttnn_policies[("N300", True)], torch_policies[True]
    images = frames(2, seed=21)
    pol.model._masks.clear()  # masks are cached per length: rebuild under the fault
    fault(monkeypatch)
    try:
        ours = _pass(pol, images, PROPRIO)
    finally:
        pol.model._masks.clear()
    assert ours.layout.length % 32, "the case must have padding rows"
    d_actions, d_rows = _diffs(ours, _pass(ref, images, PROPRIO))
    print(f"\n{fault.__name__}: normalised actions max |diff| {d_actions:.2e}, action rows {d_rows:.2e}")
    assert d_actions > 10 * MAX_ABS_DIFF_ACTIONS and d_rows > 10 * MAX_ABS_DIFF_ROWS, (d_actions, d_rows)


def test_golden_oft_discrete_fallback_tokens_equal_torch(oft_dirs):
    """No head: the LM head on the 56 action rows, argmax per row on the device."""
    from openvla_model.oft_policy import load_oft_policy

    images = frames(2, seed=4)
    with load_oft_policy(oft_dirs[True], device="cpu", dtype="float32", use_action_head=False) as ref:
        want = ref.predict_chunk(images, INSTRUCTION, proprio=PROPRIO)
    with _load_ttnn(oft_dirs[True], "N300", use_action_head=False) as pol:
        assert pol.describe()["oft_head"].startswith("discrete")
        got = pol.predict_chunk(images, INSTRUCTION, proprio=PROPRIO)
    assert got.tokens.shape == (8, 7)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.out_of_range, want.out_of_range)
    np.testing.assert_array_equal(got.actions, want.actions)


def test_oft_ttnn_input_errors_leave_the_policy_usable(ttnn_policies, oft_dirs):
    pol = ttnn_policies[("N300", True)]
    assert pol.describe()["max_images"] == 2
    with pytest.raises(InputError, match="max_seq_len"):  # the KV cache is sized for 2 images
        pol.predict_chunk(frames(3), INSTRUCTION, proprio=PROPRIO)
    with pytest.raises(InputError, match="needs the robot state"):
        pol.predict_chunk(frames(1), INSTRUCTION)
    assert pol.predict_chunk(frames(1), INSTRUCTION, proprio=PROPRIO).valid  # not marked failed
    with pytest.raises(BackendError, match="ttnn backend only"):
        from openvla_model.oft_policy import load_oft_policy

        load_oft_policy(oft_dirs[True], device="cpu", dtype="float32", cache_dir=None)


MOCK_TIMEOUT_S = 900


@pytest.mark.slow
def test_mock_n300_runs_the_oft_pass(tmp_path):
    """ttnn's own validation of every op of the OFT pass at full widths (1 decoder layer, 3 blocks
    per tower) on a mock N300: two images + proprio, one image, the discrete fallback. 58 s on the
    idle 2-core machine (2.4-4.6 min when it is shared)."""
    import json
    import subprocess

    from ttnn_mock.mock_env import missing_prerequisites, mock_environment

    why = missing_prerequisites()
    if why:
        pytest.skip(f"mock TT-NN devices unavailable: {why}")
    out = tmp_path / "result.json"
    runner = Path(__file__).resolve().parent / "ttnn_mock" / "run_mock_oft.py"
    try:
        proc = subprocess.run([sys.executable, str(runner), "N300", "--llm-layers", "1", "--vision-depth", "3",
                               "--out", str(out), "--work", str(tmp_path)], env=mock_environment("N300", tmp_path),
                              cwd=tmp_path, capture_output=True, text=True, timeout=MOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mock OFT run timed out after {MOCK_TIMEOUT_S} s:\n{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["describe"]["max_seq_len"] == 832
    assert [c["head"] for c in result["calls"]] == ["device", "device", "discrete"]
    assert all(c["normalized_shape"] == [8, 7] for c in result["calls"])


def test_load_policy_hands_the_mesh_name_to_the_oft_model(oft_dirs, monkeypatch):
    """load_policy(..., mesh_device=...) reaches the TT-NN OFT model: a T3K asked for on 2 chips
    is refused naming it (a dropped mesh_device would auto-detect the 2 chips and load)."""
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model import BackendError, load_policy

    monkeypatch.delenv("MESH_DEVICE", raising=False)
    with pytest.raises(BackendError, match="T3K"):
        load_policy(oft_dirs[True], backend="ttnn", mesh_device="T3K", tt=GoldenTTNN(2), cache_dir=None)
