"""Speculative action decoding on the TT-NN backend (issue 13): draft rows in the prefill.

Golden functions (test/ttnn_golden/emulator.py, the production TtnnBackend with ttnn's goldens
on an emulated 1x2 / 1x8 mesh, tiny checkpoint, float32): for every k in 0..6 a draft built from
the torch backend's greedy tokens with position k+1 corrupted gives the torch tokens, accepted ==
k and only the 6-k remaining decode steps; random, short, out-of-range and wrong-length drafts
are accepted exactly as the torch backend accepts them; through the trace model
(test/ttnn_golden/trace.py) a replayed drafted action reads its verification once and runs the
trace captured for its remaining step count. Mock devices (slow): the full-size OpenVLA-7B on a
mock N300 with 6 draft rows (test/ttnn_mock/run_mock_draft.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ttnn  # noqa: E402,F401  (a required dependency of the venv: its absence is a failure, not a skip)

from openvla_model.speculative import accepted_length, draft_accepting, sanitize_draft  # noqa: E402

N = 7  # tokens per action
D = N - 1
MESHES = {"N300": 2, "T3K": 8}
# tiny tokenizer: 8 and 27 prompt ids -> L = 264 (+6 draft rows stay in the 288-row bucket) and
# L = 283 (+6 = 289: the draft rows spill into the 320-row bucket); checked in the test
INSTRUCTIONS = ("open the drawer", "pick up the red cup please")


def _rgb(seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(224, 288, 3) * 255).astype(np.uint8)


def _backend(tiny_policy, tiny_weights, mesh, tt, trace=False):
    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    return TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device=mesh, tt=tt, cache_dir=None,
                       trace=trace)


@pytest.fixture(scope="module")
def golden(tiny_weights, tiny_policy):
    from ttnn_golden.emulator import GoldenTTNN

    backends = {mesh: _backend(tiny_policy, tiny_weights, mesh, GoldenTTNN(n)) for mesh, n in MESHES.items()}
    yield backends
    for b in backends.values():
        b.close()


@pytest.fixture(scope="module")
def cases(tiny_policy):
    """(pixels, prompt ids, torch greedy tokens) per instruction."""
    out = []
    for i, instruction in enumerate(INSTRUCTIONS):
        px, ids = tiny_policy.preprocessor(_rgb(40 + i)), tiny_policy.prompt_ids(instruction)
        want, _ = tiny_policy.backend.generate(px, ids, N)
        out.append((px, ids, want))
    return out


def test_the_instructions_cover_both_bucket_cases(tiny_policy, cases):
    """One prompt whose 6 draft rows fit the 32-row padding, one whose rows need the next bucket."""
    patches = tiny_policy.config.num_patches
    crossing = [-(-(ids.size + patches + D) // 32) > -(-(ids.size + patches) // 32) for _, ids, _ in cases]
    assert crossing == [False, True], [ids.size + patches for _, ids, _ in cases]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_golden_exactly_k_drafts_accepted_gives_the_torch_tokens(golden, cases, mesh):
    """Both bucket cases on 1x2; on 1x8 (4x slower to emulate) the case whose draft rows spill."""
    be = golden[mesh]
    for px, ids, want in (cases if mesh == "N300" else cases[1:]):
        for k in range(D + 1):
            got, timings = be.generate(px, ids, N, draft=draft_accepting(want, k))
            assert got.dtype == np.int64 and got.tolist() == want.tolist(), (mesh, ids.size, k, got, want)
            assert be.last_accepted == k and be.last_decode_steps == D - k, (mesh, ids.size, k, be.last_accepted)
            assert set(timings) == {"vision", "projector", "prefill", "decode"}
        # the plain path afterwards: the KV rows the drafts left behind are never read
        got, _ = be.generate(px, ids, N)
        assert got.tolist() == want.tolist() and be.last_accepted == 0 and be.last_decode_steps == D


def test_golden_random_and_odd_drafts_are_accepted_like_the_torch_backend(golden, cases, tiny_policy):
    """The same sanitising and verifier as the torch backends (test_speculative.py checks those
    against the same expectations): the count is accepted_length of the sanitised draft."""
    be = golden["N300"]
    px, ids, want = cases[0]
    rng = np.random.default_rng(0)
    vocab = tiny_policy.config.vocab_size
    drafts = [
        rng.integers(31744, 32000, D),  # random action tokens
        np.concatenate([want[:2], rng.integers(0, vocab, D - 2)]),  # 2 right, then random ids
        want[:3],  # a short draft: 3 rows, all right (decode continues after them)
        want[:1] ^ 1,  # one row, wrong
        np.array([want[0], want[1], vocab, want[3]]),  # out of range at 3: cut there
        np.array([want[0], -5, want[2]]),  # negative id: cut there
        np.arange(N + 1),  # too long: rejected
        np.array([1.5] * D),  # not integers: rejected
        torch.as_tensor(want),  # the previous action's 7 tokens as they come: the 7th is dropped
    ]
    for d in drafts:
        expect = sanitize_draft(d, N, vocab).tokens
        k_want = 0 if expect is None else int(accepted_length(expect, want))
        got, _ = be.generate(px, ids, N, draft=d)
        assert got.tolist() == want.tolist(), d
        assert be.last_accepted == k_want and be.last_decode_steps == D - k_want, (d, be.last_accepted, k_want)
    assert be.last_accepted == D  # the torch tensor draft (all right) was used


def test_golden_drafted_actions_through_the_trace_model(tiny_weights, tiny_policy, cases):
    """One decode trace per remaining step count, captured on first use after a warm-up: a
    replayed drafted action reads its m+1 verified ids ONCE, then writes the start token and
    position (instead of the plain action's position written before the prefill: one write more)
    and replays the trace for its remaining steps, whose tokens are read once at the end (one
    read more than the plain action). All drafts accepted: no decode step, the verification read
    is the only one, no start written (two writes fewer). Every action's tokens equal the torch
    backend's. (Host traffic is compared with a replayed plain action: the image upload is the
    vision stage's business.)"""
    from ttnn_golden.trace import TracingGoldenTTNN

    mesh = "N300"
    emu = TracingGoldenTTNN(MESHES[mesh])
    be = _backend(tiny_policy, tiny_weights, mesh, emu, trace=True)
    px, ids, want = cases[1]
    # (k accepted or None: no draft, decode traces after the call, decode replays in the call,
    #  host transfers relative to a replayed plain action: (writes, reads), or None: not compared)
    plan = [(None, {6}, [], None),  # plain: op by op, then the 6-step trace is captured
            (3, {6, 3}, [], None),  # k=3: 3 steps op by op (warm-up), then captured
            (None, {6, 3}, [6], (0, 0)),  # plain, replayed: the reference host traffic
            (3, {6, 3}, [3], (1, 1)),  # k=3 replayed
            (0, {6, 3}, [6], (1, 1)),  # k=0: the plain action's 6-step trace
            (D, {6, 3}, [], (-2, 0))]  # all accepted: no decode step
    base = None
    try:
        for i, (k, traces, replays, io_delta) in enumerate(plan):
            before, n_replayed = dict(emu.host_io), len(emu.replayed)
            got, _ = be.generate(px, ids, N, draft=None if k is None else draft_accepting(want, k))
            assert got.tolist() == want.tolist(), (mesh, i, k, got, want)
            assert be.last_accepted == (k or 0) and be.last_decode_steps == D - (k or 0)
            assert set(be._traces) == traces and {tid for tid, _ in be._traces.values()} <= set(emu.traces), i
            steps_of = {tid: s for s, (tid, _) in be._traces.items()}
            assert [steps_of[t] for t in emu.replayed[n_replayed:] if t in steps_of] == replays, (i, emu.replayed)
            io = {key: emu.host_io[key] - before[key] for key in before}
            if io_delta == (0, 0):
                base = io
            elif io_delta is not None:
                want_io = {"write": base["write"] + io_delta[0], "read": base["read"] + io_delta[1]}
                assert io == want_io, (i, k, io, base)
        assert base["read"] == 1
        three = [n for n, *_ in emu.traces[be._traces[3][0]]]
        assert three.count("argmax") == 3 and three.count("plus_one") == 6 and three[-1] == "concat", three[-4:]
        # the drafted prefill has its own trace (D + 1 LM-head rows) beside the plain one, and replays ran it
        assert sorted(rows for _, rows, _ in be._prefill_traces) == [1, D + 1], be._prefill_traces
        drafted_tid = next(tid for (_, rows, _), (tid, _) in be._prefill_traces.items() if rows == D + 1)
        assert emu.replayed.count(drafted_tid) == 3, emu.replayed  # k=3, k=0 and all accepted, replayed
    finally:
        be.close()
    assert not emu.traces  # every trace released on close


def test_golden_policy_with_speculative_ttnn_backend(golden, tiny_policy):
    """The policy hands drafts to the TT-NN backend (supports_draft) and reports the count."""
    from openvla_model.policy import OpenVLAPolicy

    p = tiny_policy
    policy = OpenVLAPolicy(p.config, golden["N300"], p.tokenizer, p.codec, p.preprocessor, speculative=True)
    plain = p.predict(_rgb(9), "close the drawer", unnorm_key="bridge_orig")
    first = policy.predict(_rgb(9), "close the drawer", unnorm_key="bridge_orig")
    assert first.accepted == 0 and first.tokens.tolist() == plain.tokens.tolist()
    again = policy.predict(_rgb(9), "close the drawer", unnorm_key="bridge_orig", draft=first.tokens)
    assert again.accepted == D and again.tokens.tolist() == plain.tokens.tolist()
    np.testing.assert_array_equal(again.action, plain.action)
    two = policy.predict(_rgb(9), "close the drawer", unnorm_key="bridge_orig", draft=draft_accepting(plain.tokens, 2))
    assert two.accepted == 2 and two.tokens.tolist() == plain.tokens.tolist()


# -- mock devices: the full-size model with the draft rows ---------------------------------------------

@pytest.mark.slow
def test_mock_n300_full_size_with_draft_rows(tmp_path):
    """OpenVLA-7B at full size (32 layers, 24 + 27 vision blocks, DRAM-sharded decode) on a mock
    N300 with 6 draft rows: ttnn validates the drafted prefill (prompts of 22 and 27 tokens:
    L+6 inside the 288-row bucket and across into 320 rows), the 7-row LM head and argmax, the
    verification read and the remaining decode steps. Mock chips read back zeros, so the
    predicted tokens are all 0: drafts of zeros are accepted up to their first non-zero id,
    which sets k exactly (0, 3, 6)."""
    sys.path.insert(0, str(HERE))
    from ttnn_mock.mock_env import missing_prerequisites, mock_environment

    why = missing_prerequisites()
    if why:
        pytest.skip(f"mock TT-NN devices unavailable: {why}")
    out = tmp_path / "result.json"
    env = mock_environment("N300", tmp_path)
    try:
        proc = subprocess.run([sys.executable, str(HERE / "ttnn_mock" / "run_mock_draft.py"), "N300", "--out",
                               str(out), "--work", str(tmp_path)], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mock run timed out:\n{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    r = json.loads(out.read_text())
    assert r["ok"] and r["llm_layers"] == 32 and r["vision_depth"] == 0, r  # 0: the real 24 / 27-block towers
    calls = r["calls"]
    assert [(c["prompt_tokens"], c["accepted"], c["decode_steps"]) for c in calls] == [
        (22, None, 6), (22, 6, 0), (22, 3, 3), (27, 0, 6), (27, 6, 0)], calls
    assert [c["prefill_rows"] for c in calls] == [288, 288, 288, 320, 320]
    for c in calls:
        assert c["tokens"] == [0] * N


def test_op_report_drafted_action_model_composes_the_measured_stages():
    """The op report's speculative rows (docs/ttnn.md, docs/performance.md): with k accepted, an
    action is vision + projector + the DRAFTED prefill + (6 - k) plain decode steps + the token
    read, which a fully accepted draft does not need (its verification read was the action's)."""
    from openvla_model.backends.ttnn.op_report import STAGES, StageCounts, action_model, draft_model

    us = {"vision": 10e3, "projector": 1e3, "prefill": 70e3, "decode": 30e3, "tokens": 0.1e3, "draft_prefill": 72e3}
    summary = {"stages": {s: StageCounts(modelled_us=us[s]) for s in STAGES + ("draft_prefill",)}}
    plain = action_model(summary)["action_ms"]
    assert plain == pytest.approx(10 + 1 + 70 + 6 * 30 + 0.1)
    rows = {r["accepted"]: r for r in draft_model(summary)["rows"]}
    assert set(rows) == {0, 3, 6}
    assert rows[0]["action_ms"] == pytest.approx(10 + 1 + 72 + 6 * 30 + 0.1, abs=0.05)
    assert rows[3]["action_ms"] == pytest.approx(10 + 1 + 72 + 3 * 30 + 0.1, abs=0.05)
    assert rows[6]["action_ms"] == pytest.approx(10 + 1 + 72, abs=0.05) and rows[6]["decode_steps"] == 0
    assert rows[6]["ratio_vs_plain"] == pytest.approx(83 / plain, abs=1e-3)
