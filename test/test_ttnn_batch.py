"""TT-NN backend serving several robots at once (issue 14), checked through ttnn's golden
functions (test/ttnn_golden: the production backend with the emulator in place of `ttnn`).

generate_batch runs a group of up to max_batch items (the profile's: 4 on N300, 8 on T3K) as one
batched vision + projector pass, one prefill per item into its own KV-cache slot and ONE decode of
every slot's row per step. What must hold: each item's 7 tokens are exactly those the torch
backend gives that item alone, whatever the other items are (prompt lengths across 32-row
buckets, images, drafts), for batches of 2 and 4 on 1x2 and 1x8, and for more items than
max_batch (run in groups); with the trace model the per-(S, rows, slot) prefill traces and the
decode trace are replayed with one read per batch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ttnn  # noqa: E402,F401  (a required dependency of the venv: its absence is a failure, not a skip)

MESHES = {"N300": 2, "T3K": 8}
N = 7  # action tokens
# L = 278 (S 288), 306 (S 320), 279 (S 288), 289 (S 320), 277 (S 288): the items of one batch
# fall in different 32-row buckets and have different lengths within a bucket.
INSTRUCTIONS = ("pick up the red cup", "a b c d e f g h i j k l m n o p q r s t u v w x y z",
                "put the spoon on the towel", "open the drawer and move the blue block to the left of the sink",
                "pick up the cup")


def _rgb(seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(224, 288, 3) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def items(tiny_policy):
    """(pixels (1, 6, S, S), prompt ids, the torch backend's tokens for that item alone) x 5."""
    out = []
    for i, instruction in enumerate(INSTRUCTIONS):
        px = tiny_policy.preprocessor(_rgb(40 + i))
        ids = tiny_policy.prompt_ids(instruction)
        want, _ = tiny_policy.backend.generate(px, ids, N)
        out.append((px, ids, want))
    return out


def _backend(tiny_policy, tiny_weights, mesh, emu, trace=False):
    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    return TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device=mesh, tt=emu, cache_dir=None,
                       trace=trace)


def _batch(items, order):
    return torch.cat([items[i][0] for i in order], 0), [items[i][1] for i in order]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_golden_batch_tokens_equal_each_items_own_torch_tokens(tiny_weights, tiny_policy, items, mesh):
    """Batches of 2 and 4 (and 5 on N300: one group of 4, then one of 1) with mixed prompt
    lengths: item i's tokens equal the torch backend's for item i alone; a batch in another
    order gives every item the same tokens (slots do not leak into each other)."""
    from ttnn_golden.emulator import GoldenTTNN

    be = _backend(tiny_policy, tiny_weights, mesh, GoldenTTNN(MESHES[mesh]))
    try:
        assert be.llm.batch == {"N300": 4, "T3K": 8}[mesh]
        plans = [[0, 1], [2, 3, 4, 0], [4, 1, 3, 2]] + ([[3, 0, 4, 2, 1]] if mesh == "N300" else [])
        for order in plans:
            px, ids = _batch(items, order)
            tokens, accepted, timings = be.generate_batch(px, ids, N)
            assert tokens.shape == (len(order), N) and accepted.tolist() == [0] * len(order)
            for row, i in zip(tokens, order):
                assert row.tolist() == items[i][2].tolist(), (mesh, order, i, row.tolist(), items[i][2].tolist())
            assert set(timings) == {"vision", "projector", "prefill", "decode"}
        # a single action after batches: the other slots' stale rows change nothing
        got, _ = be.generate(items[3][0], items[3][1], N)
        assert got.tolist() == items[3][2].tolist()
    finally:
        be.close()


def test_golden_batch_with_per_item_drafts(tiny_weights, tiny_policy, items):
    """Speculative drafts per item in one batch (N300): no draft, k = 3 accepted, every draft
    accepted (that row idles during the others' decode steps), a draft of 9 ids (dropped):
    tokens equal each item's own, accepted per item as planned."""
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.speculative import draft_accepting as accepting, sanitize_draft

    be = _backend(tiny_policy, tiny_weights, "N300", GoldenTTNN(2))

    try:
        order = [0, 1, 2, 3]
        px, ids = _batch(items, order)
        drafts = [None, accepting(items[1][2], 3), accepting(items[2][2], N - 1), np.arange(100, 109)]
        assert sanitize_draft(drafts[3], N, tiny_policy.config.vocab_size).tokens is None  # dropped, not raised
        tokens, accepted, _ = be.generate_batch(px, ids, N, drafts=drafts)
        for row, i in zip(tokens, order):
            assert row.tolist() == items[i][2].tolist(), (i, row.tolist(), items[i][2].tolist())
        assert accepted.tolist() == [0, 3, N - 1, 0]
        assert be.last_decode_steps == N - 1  # rows without drafts need all 6 steps
        # every item's draft fully accepted: no decode step at all
        tokens, accepted, _ = be.generate_batch(px[:2], ids[:2], N, drafts=[accepting(items[i][2], N - 1) for i in (0, 1)])
        assert [r.tolist() for r in tokens] == [items[i][2].tolist() for i in (0, 1)]
        assert accepted.tolist() == [N - 1, N - 1] and be.last_decode_steps == 0
    finally:
        be.close()


def test_golden_batch_traces_replay_per_slot_with_one_read(tiny_weights, tiny_policy, items):
    """With the trace model (TracingGoldenTTNN, N300): the first batch of 4 runs op by op and
    captures one prefill trace per (S, rows, slot) and the 6-step decode trace; the same batch
    shape again replays them all (vision, 4 prefills, decode) with the host traffic of a batch:
    the patches of all images in one upload, per item its ids and its LM-head row index, the
    decode start positions (2 writes), and ONE read of every row's tokens. A batch of 2 after it
    replays the slots' prefill traces and the same decode trace. Tokens equal torch's throughout."""
    from ttnn_golden.trace import TracingGoldenTTNN

    emu = TracingGoldenTTNN(2)
    be = _backend(tiny_policy, tiny_weights, "N300", emu, trace=True)
    seq = {i: -(-(items[i][1].size + 256) // 32) * 32 for i in range(len(items))}
    try:
        for n, order in enumerate(([0, 1, 2, 3], [0, 1, 2, 3], [2, 3], [0, 1, 2, 3])):
            px, ids = _batch(items, order)
            before, n_replayed = dict(emu.host_io), len(emu.replayed)
            tokens, _, _ = be.generate_batch(px, ids, N)
            for row, i in zip(tokens, order):
                assert row.tolist() == items[i][2].tolist(), (n, order, i)
            kinds = {tid: ("prefill", key) for key, (tid, _) in be._prefill_traces.items()}
            kinds.update({tid: ("decode", s) for s, (tid, _) in be._traces.items()})
            replayed = [kinds.get(t, ("vision", None)) for t in emu.replayed[n_replayed:]]
            if n == 0:
                assert replayed == []
                assert set(be._prefill_traces) == {(seq[i], 1, slot) for slot, i in enumerate(order)}
                assert set(be._traces) == {N - 1}
            elif n in (1, 3):
                assert sorted(k for k, _ in replayed) == ["decode"] + ["prefill"] * 4 + ["vision"], replayed
                assert [key for k, key in replayed if k == "prefill"] == [(seq[i], 1, s) for s, i in enumerate(order)]
                io = {k: emu.host_io[k] - before[k] for k in before}
                assert io == {"write": 1 + 2 * len(order) + 2, "read": 1}, io
            else:  # batch of 2: S of items 2, 3 in slots 0, 1: (288, 1, 0) is known, (320, 1, 1) too
                assert [key for k, key in replayed if k == "prefill"] == [(seq[2], 1, 0), (seq[3], 1, 1)], replayed
                assert ("decode", N - 1) in replayed
    finally:
        be.close()
    assert not emu.traces  # released on close


def test_golden_policy_predict_batch_on_ttnn_equals_predict(tiny_policy, tiny_weights):
    """The policy hands a batch to the TT-NN backend's generate_batch (one call) and a bad item
    (a bad image; an instruction too long for the TT-NN KV cache only) fails alone: every good
    item's action equals the torch policy's predict for it alone."""
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.errors import InputError, OpenVLAError
    from openvla_model.policy import OpenVLAPolicy

    p = tiny_policy
    be = _backend(p, tiny_weights, "T3K", GoldenTTNN(8))
    calls = []
    orig = be.generate_batch
    be.generate_batch = lambda *a, **k: calls.append(len(a[1])) or orig(*a, **k)
    try:
        policy = OpenVLAPolicy(p.config, be, p.tokenizer, p.codec, p.preprocessor)
        # item 3: fits Llama's 2048 positions but not the TT-NN KV cache (max_seq_len 512): refused
        # alone (backend.check_prompt), never failing the batch it would have joined
        too_long = " ".join(["a"] * 400)  # 417 prompt tokens (799 characters: a valid instruction)
        assert p.prompt_ids(too_long).size + 256 + 7 > be.llm.max_seq
        batch = [(_rgb(60), "pick up the red cup", "bridge_orig"), (np.zeros((5, 5), np.uint8), "bad image"),
                 (_rgb(61), "open the drawer and move the blue block to the left of the sink", "bridge_orig"),
                 (_rgb(62), too_long, "bridge_orig")]
        out = policy.predict_batch(batch)
        assert calls == [2]
        assert isinstance(out[1], OpenVLAError)
        assert isinstance(out[3], InputError) and "max_seq_len" in str(out[3]), out[3]
        for j in (0, 2):
            want = p.predict(*batch[j])
            assert out[j].tokens.tolist() == want.tokens.tolist()
            np.testing.assert_array_equal(out[j].action, want.action)
    finally:
        be.close()


@pytest.mark.parametrize("keep", [0, 3])
def test_golden_prefill_traces_are_bounded_least_recently_used_first(tiny_weights, tiny_policy, items, keep):
    """max_prefill_traces bounds the prefill traces kept in the trace region: with 3, capturing a
    4th (S, rows, slot) key releases the LEAST RECENTLY USED one (a replay counts as a use: not the
    oldest capture), which is gone from the device's traces and captured again when it comes back;
    with 0 the prefill runs op by op. Tokens equal torch's throughout."""
    from ttnn_golden.trace import TracingGoldenTTNN

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    emu = TracingGoldenTTNN(2)
    be = TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device="N300", tt=emu, cache_dir=None,
                     trace=True, profile_overrides={"max_prefill_traces": keep})
    seq = {i: -(-(items[i][1].size + 256) // 32) * 32 for i in range(len(items))}
    k = {i: (seq[i], 1, i) for i in range(4)}  # item i in slot i
    c = (seq[3], 1, 0)  # item 3 alone: slot 0
    # after each batch: the keys kept, least recently used first, and how many were released so far
    plan = [([0, 1, 2], [k[0], k[1], k[2]], 0),
            ([0], [k[1], k[2], k[0]], 0),  # k0 replayed: now the most recently used
            ([3], [k[2], k[0], c], 1),  # LRU k1 released (not k0, the oldest capture)
            ([0, 1, 2, 3], [k[1], k[2], k[3]], 4)]  # k0 replayed, then k1, k2, k3 each evict the LRU
    try:
        released = []
        orig_release = emu.release_trace
        emu.release_trace = lambda mesh, tid: released.append(tid) or orig_release(mesh, tid)
        for n, (order, keys, n_released) in enumerate(plan):
            px, ids = _batch(items, order)
            tokens, _, _ = be.generate_batch(px, ids, N)
            for row, i in zip(tokens, order):
                assert row.tolist() == items[i][2].tolist(), (keep, n, order, i)
            if keep:
                assert list(be._prefill_traces) == keys and len(released) == n_released, (n, be._prefill_traces)
                assert all(tid in emu.traces for tid, _ in be._prefill_traces.values())
                assert not set(released) & set(emu.traces)
            else:
                assert not released and not be._prefill_traces
    finally:
        be.close()
