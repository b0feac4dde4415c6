"""The batched fast path (FastTorchBackend.generate_batch, issue 14) against each item alone.

On the CPU the fast path runs the very functions CUDA captures as graphs, eagerly: static
buffers for the captured batch sizes 1, 2, 4, 8, dummy rows padding a batch up to the next one,
chunks of 8 above that, every row at the positions it has alone (pads after its prompt), a
decode mask per row, drafts verified per row with a per-row stop. These tests pin each item's
tokens to the reference TorchBackend's generate() for it alone, and its logits to the fast
path's own batch of one, for batches of 1..5, 8 and 9 with prompts of different lengths and
drafts of which each item accepts a different number. The CUDA tests add the graphs per batch
size; they skip here with the reason "no CUDA GPU".
"""
import numpy as np
import pytest
import torch

from openvla_model.backends.torch_backend import TorchBackend
from openvla_model.backends.torch_cuda import FastTorchBackend
from openvla_model.checkpoint import Checkpoint
from openvla_model.errors import BackendError, InputError
from openvla_model.preprocess import Preprocessor
from openvla_model.speculative import draft_accepting
from openvla_model.synthetic import synthetic_rgb

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

N = 7
# prompt lengths differ with the tiny tokenizer: 27, 40, 19, 20 and 32 tokens (buckets 32, 48, 32, 32, 32)
INSTRUCTIONS = (
    "pick up the red cup please",
    "put the blue block into the open drawer on the left of the sink next to the yellow towel",
    "go",
    "open the drawer",
    "wipe the table with the sponge",
)
ITEMS = 9  # item j: image j, instruction j % 5
# float32 on the CPU: a row of a batch differs from the same item alone by summation order only
# (matrix products over more rows): measured max |logit diff| 5.0e-6 to 7.9e-6 at max |logit| 3.6-4.3
# (2.2e-6 relative). Bound 2e-5 x max |logit| (~8e-5). One decode mask shared by all rows (a row
# seeing its own pad columns) moved them by 1.0e-3 (2.5e-4 relative) without changing a token.
LOGIT_REL_TOL = 2e-5


@pytest.fixture(scope="module")
def backends(tiny_weights, tiny):
    config = tiny[0]
    ref = TorchBackend(config, Checkpoint(tiny_weights), device="cpu", dtype="float32")
    fast = FastTorchBackend(config, reference=ref)
    yield ref, fast
    fast.close()


@pytest.fixture(scope="module")
def inputs(tiny):
    _, tokenizer, pre = tiny
    px = [pre(synthetic_rgb(j)) for j in range(ITEMS)]
    ids = [tokenizer.encode_prompt(INSTRUCTIONS[j % len(INSTRUCTIONS)]) for j in range(ITEMS)]
    assert len({x.size for x in ids[:5]}) == 5  # mixed prompt lengths
    return px, ids


@pytest.fixture(scope="module")
def alone(backends, inputs):
    """Each item alone: the reference's tokens (the ground truth) and the fast path's logits for
    a batch of one, which must give the same tokens."""
    ref, fast = backends
    px, ids = inputs
    out = []
    for j in range(ITEMS):
        want, _ = ref.generate(px[j], ids[j], N)
        got, _ = fast.generate(px[j], ids[j], N)
        assert np.array_equal(got, want), j
        out.append((want, fast.last_logits(N)))
    return out


def check_rows(fast, order, tokens, alone, rows_with_logits=None):
    for r, j in enumerate(order):
        assert np.array_equal(tokens[r], alone[j][0]), (r, j, tokens[r], alone[j][0])
    for r in rows_with_logits or []:
        want = alone[order[r]][1]
        err, scale = (fast.last_logits(N, row=r) - want).abs().max().item(), want.abs().max().item()
        assert err < LOGIT_REL_TOL * scale, f"row {r} (item {order[r]}): max |logit diff| {err:.3g}"


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8, 9])
def test_batch_equals_each_item_alone(backends, inputs, alone, size):
    _, fast = backends
    px, ids = inputs
    order = [(size + j) % ITEMS for j in range(size)]  # a different mix of prompt lengths per size
    tokens, accepted, timings = fast.generate_batch(torch.cat([px[j] for j in order]), [ids[j] for j in order], N)
    assert tokens.shape == (size, N) and tokens.dtype == np.int64 and list(accepted) == [0] * size
    assert set(timings) == {"vision", "projector", "prefill", "decode"}
    padded = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8}
    want_chunks = [(size, padded[size])] if size <= 8 else [(8, 8), (size - 8, padded[size - 8])]
    assert fast.last_batches == want_chunks
    check_rows(fast, order, tokens, alone)  # every item's tokens
    tail = (size - 1) // 8 * 8  # the last chunk's first item: that chunk's logits are still in the buffers
    check_rows(fast, order[tail:], tokens[tail:], alone, rows_with_logits=range(size - tail))


def test_drafts_accepted_per_row(backends, inputs, alone):
    """Items accept 0, 6, 3, none (no draft) and 1 drafts in one batch (padded to 8): each row's
    tokens and accepted count are its own; the decode steps run for the row that accepted fewest,
    and a row that accepted more (complete after the prefill or a few steps) stops while the
    others go on."""
    _, fast = backends
    px, ids = inputs
    ks = [0, 6, 3, None, 1]
    order = [0, 1, 2, 3, 4]
    drafts = [None if k is None else draft_accepting(alone[j][0], k) for j, k in zip(order, ks)]
    tokens, accepted, _ = fast.generate_batch(torch.cat([px[j] for j in order]), [ids[j] for j in order], N,
                                              drafts=drafts)
    assert list(accepted) == [k or 0 for k in ks]
    assert len(fast.last_decode_steps_ms) == N - 1  # the rows with 0 accepted need all 6 steps
    check_rows(fast, order, tokens, alone, rows_with_logits=range(5))
    # fewest accepted 3: only 3 decode steps run; the row that accepted all 6 stops at once
    ks, order = [6, 3, 4], [5, 6, 7]
    drafts = [draft_accepting(alone[j][0], k) for j, k in zip(order, ks)]
    tokens, accepted, _ = fast.generate_batch(torch.cat([px[j] for j in order]), [ids[j] for j in order], N,
                                              drafts=drafts)
    assert list(accepted) == ks and len(fast.last_decode_steps_ms) == N - 1 - 3
    assert fast.last_batches == [(3, 4)]
    # per-row stop: a complete row stays at its last step (its writes stay inside its own row's
    # buffers: the scratch column, its own KV row) and the dummy row never moves
    assert fast._step[:4].tolist() == [N - 1, N - 1, N - 1, 0]
    check_rows(fast, order, tokens, alone, rows_with_logits=range(3))


class GarbageDummies(FastTorchBackend):
    """Dummy rows holding noise pixels and a real prompt that decodes every step."""

    def _dummy_row(self, first_ids, num_tokens):
        return first_ids[:12].copy(), num_tokens - 1

    def _dummy_pixels(self, pixels):
        pixels.copy_(torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0)) * 3)


class SharedDecodeMask(FastTorchBackend):
    """A fault: one decode mask for all rows, at the furthest position of the batch, so a row
    with a shorter prompt sees its own pad columns and stale cache columns after its position."""

    def _decode_mask(self, b, pos, kv_len):
        far = pos.max().expand(b)
        return super()._decode_mask(b, far, kv_len)


def test_padding_never_reaches_real_rows(backends, inputs, alone):
    """Dummy rows: whatever they hold (noise pixels, a prompt that decodes) the real rows' tokens
    and logits are bit for bit those of zero dummy rows. Pad columns: the per-row decode mask is
    what keeps them out: with one shared mask (the fault above) the same check fails."""
    ref, fast = backends
    px, ids = inputs
    order = [2, 1, 3]  # 19, 40 and 20 prompt tokens: batch of 3 at size 4, one dummy row
    batch_px, batch_ids = torch.cat([px[j] for j in order]), [ids[j] for j in order]
    drafts = [draft_accepting(alone[2][0], 2), None, draft_accepting(alone[3][0], 5)]
    tokens, accepted, _ = fast.generate_batch(batch_px, batch_ids, N, drafts=drafts)
    clean = [fast.last_logits(N, row=r) for r in range(3)]
    check_rows(fast, order, tokens, alone, rows_with_logits=range(3))

    garbage = GarbageDummies(ref.config, reference=ref)
    tokens_g, accepted_g, _ = garbage.generate_batch(batch_px, batch_ids, N, drafts=drafts)
    assert garbage.last_batches == [(3, 4)] and garbage._limit[3] == N - 1  # the dummy row did decode
    assert np.array_equal(tokens_g, tokens) and np.array_equal(accepted_g, accepted)
    for r in range(3):
        assert torch.equal(garbage.last_logits(N, row=r), clean[r]), r

    faulty = SharedDecodeMask(ref.config, reference=ref)
    tokens_f, _, _ = faulty.generate_batch(batch_px, batch_ids, N, drafts=drafts)
    with pytest.raises(AssertionError):
        check_rows(faulty, order, tokens_f, alone, rows_with_logits=range(3))


def test_graph_path_on_cpu(backends, inputs, alone, monkeypatch):
    """launch_batch's graph path without a GPU: a fake _capture that does what the real one does
    to the state (two warm-up runs, each decode warm-up a real step; the step counters restored
    by before_each) and then replays eagerly. Batches whose shapes differ in exactly one part of
    a graph key (draft rows; batch size; prompt bucket and cache length), in an order where each
    would replay an earlier batch's piece if its key missed that part, must each give every row
    its own tokens."""
    from openvla_model.backends import torch_cuda

    def fake_capture(fn, pool, before_each=None, warmup=2):
        for _ in range(warmup):
            if before_each is not None:
                before_each()
            fn()
        if before_each is not None:
            before_each()
        return torch_cuda._Eager(fn)

    ref, _ = backends
    px, ids = inputs
    monkeypatch.setattr(torch_cuda, "_capture", fake_capture)
    fast = FastTorchBackend(ref.config, reference=ref, max_batch=8)
    fast.graphs = True  # the graph path of launch_batch, with the fake capture
    batches = [([2, 3], None),  # 19, 20 tokens: bucket 32, size 2
               ([2, 3], [3, 1]),  # + draft rows
               ([5, 7, 8], [2, None, 5]),  # 27 + 6 rows: bucket 48, size 4; row 2 decodes too
               ([3, 1, 4, 0, 2], [2, None, 6, 0, 5]),  # bucket 48, size 8
               ([1, 0], [4, None])]  # 40 + 6 rows: bucket 48 at size 2 (another cache length too)
    for order, ks in batches:
        drafts = None if ks is None else [None if k is None else draft_accepting(alone[j][0], k)
                                          for j, k in zip(order, ks)]
        tokens, accepted, _ = fast.generate_batch(torch.cat([px[j] for j in order]), [ids[j] for j in order], N,
                                                  drafts=drafts)
        assert list(accepted) == [k or 0 for k in (ks or [0] * len(order))]
        check_rows(fast, order, tokens, alone, rows_with_logits=range(len(order)))
    keys = set(fast._graphs)
    assert {k for k in keys if k[0] == "vision"} == {("vision", 2), ("vision", 4), ("vision", 8)}
    assert {k for k in keys if k[0] == "prefill"} == {("prefill", 32, 0, 2), ("prefill", 32, 6, 2),
                                                      ("prefill", 48, 6, 4), ("prefill", 48, 6, 8),
                                                      ("prefill", 48, 6, 2)}
    assert {k for k in keys if k[0] == "decode"} == {("decode", 304, 2), ("decode", 304, 4), ("decode", 320, 8),
                                                     ("decode", 320, 2)}


def test_batch_capacity_grows_on_demand(backends, inputs, alone):
    ref, _ = backends
    px, ids = inputs
    fast = FastTorchBackend(ref.config, reference=ref)
    assert fast.describe()["batch_capacity"] == 1 and fast._kv.shape[2] == 1
    assert np.array_equal(fast.generate(px[0], ids[0], N)[0], alone[0][0])
    tokens, _, _ = fast.generate_batch(torch.cat(px[:2]), ids[:2], N)
    assert fast.describe()["batch_capacity"] == 2 and fast._kv.shape[2] == 2
    check_rows(fast, [0, 1], tokens, alone)
    assert np.array_equal(fast.generate(px[4], ids[4], N)[0], alone[4][0])  # a batch of one after growing
    assert FastTorchBackend(ref.config, reference=ref, max_batch=5).describe()["batch_capacity"] == 8


def test_batch_arguments(backends, inputs):
    _, fast = backends
    px, ids = inputs
    tokens, accepted, _ = fast.generate_batch(torch.zeros(0, 6, 224, 224), [], N)
    assert tokens.shape == (0, N) and accepted.shape == (0,)
    with pytest.raises(BackendError, match="2 images for 3 prompts"):
        fast.generate_batch(torch.cat(px[:2]), ids[:3], N)
    with pytest.raises(BackendError, match="1 drafts for 2 prompts"):
        fast.generate_batch(torch.cat(px[:2]), ids[:2], N, drafts=[None])
    with pytest.raises(BackendError, match="1..8 items"):
        fast.launch_batch(torch.cat(px), ids, N)
    with pytest.raises(InputError, match="empty prompt"):
        fast.generate_batch(torch.cat(px[:2]), [ids[0], []], N)
    # a bad draft is dropped, never raised (as in generate)
    tokens, accepted, _ = fast.generate_batch(torch.cat(px[:2]), ids[:2], N, drafts=[[1.5, 2.5], "x"])
    assert list(accepted) == [0, 0]


def test_policy_predict_batch_runs_on_the_fast_path(tiny_weights, monkeypatch):
    """predict_batch on a fast-path policy: one generate_batch call for the good items; each item
    equals predict() of the reference policy alone, bad items fail alone, drafts per item."""
    from openvla_model import load_policy
    from openvla_model.errors import UnnormKeyError

    keys = ("bridge_orig", "tiny_other_dataset")
    with load_policy(tiny_weights, device="cpu", dtype="float32", speculative=True) as ref, \
            load_policy(tiny_weights, device="cpu", dtype="float32", speculative=True, fast=True) as fast:
        assert isinstance(fast.backend, FastTorchBackend) and type(ref.backend) is TorchBackend
        items = [(synthetic_rgb(j), INSTRUCTIONS[j], keys[j % 2]) for j in range(4)]
        want = [ref.predict(*it) for it in items]
        calls = []
        real = fast.backend.generate_batch
        monkeypatch.setattr(fast.backend, "generate_batch", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
        batch = [items[0], (synthetic_rgb(1), INSTRUCTIONS[1], "no_such_dataset"),
                 (*items[2], draft_accepting(want[2].tokens, 4)), (*items[3], draft_accepting(want[3].tokens, 6)),
                 items[1]]
        out = fast.predict_batch(batch)
        assert calls == [4]
        assert isinstance(out[1], UnnormKeyError)
        for got, w, k in ((out[0], want[0], 0), (out[2], want[2], 4), (out[3], want[3], 6), (out[4], want[1], 0)):
            assert np.array_equal(got.tokens, w.tokens) and got.accepted == k
            np.testing.assert_array_equal(got.action, w.action)
            assert got.unnorm_key == w.unnorm_key


# -- CUDA ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_backends(tiny_weights, tiny):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    config = tiny[0]
    ref = TorchBackend(config, Checkpoint(tiny_weights), device="cuda", dtype="float32")
    fast = FastTorchBackend(config, reference=ref, max_batch=8)  # no growth: every graph stays
    pre = Preprocessor(config, device="cuda")
    tokenizer = tiny[1]
    px = [pre(synthetic_rgb(j)) for j in range(ITEMS)]
    ids = [tokenizer.encode_prompt(INSTRUCTIONS[j % len(INSTRUCTIONS)]) for j in range(ITEMS)]
    want = [ref.generate(px[j], ids[j], N)[0] for j in range(ITEMS)]
    yield ref, fast, px, ids, want
    fast.close()


@requires_cuda
def test_cuda_graphs_per_batch_size_equal_the_reference(cuda_backends):
    """float32 on CUDA with graphs: batches of 1..5, 8 and 9 (graphs at 1, 2, 4 and 8 rows, replayed),
    with and without per-item drafts, give each item the reference's tokens for it alone."""
    ref, fast, px, ids, want = cuda_backends
    assert fast.describe()["cuda_graphs"]
    for size in (1, 2, 3, 4, 5, 8, 9):
        order = [(size + j) % ITEMS for j in range(size)]
        batch_px, batch_ids = torch.cat([px[j] for j in order]), [ids[j] for j in order]
        for _ in range(2):  # the first call captures, the second replays
            tokens, accepted, _ = fast.generate_batch(batch_px, batch_ids, N)
            for r, j in enumerate(order):
                assert np.array_equal(tokens[r], want[j]), (size, r, j, tokens[r], want[j])
        ks = [(r * 5) % 7 for r in range(size)]  # 0, 5, 3, 1, 6, 4, 2, 0, 5 accepted
        drafts = [draft_accepting(want[j], k) for j, k in zip(order, ks)]
        for _ in range(2):
            tokens, accepted, _ = fast.generate_batch(batch_px, batch_ids, N, drafts=drafts)
            assert list(accepted) == ks, (size, list(accepted), ks)
            for r, j in enumerate(order):
                assert np.array_equal(tokens[r], want[j]), (size, r, j, tokens[r], want[j])
    d = fast.describe()
    assert not d["graph_failures"], d
    decode_sizes = {key[2] for key in fast._graphs if isinstance(key, tuple) and key[0] == "decode"}
    assert decode_sizes == {1, 2, 4, 8}, decode_sizes
    assert d["batch_capacity"] == 8


@requires_cuda
def test_cuda_batch_launch_has_no_host_sync(cuda_backends):
    ref, fast, px, ids, want = cuda_backends
    order = [0, 1, 2]
    batch_px, batch_ids = torch.cat([px[j] for j in order]), [ids[j] for j in order]
    first, _, _ = fast.generate_batch(batch_px, batch_ids, N)  # captures the size-4 graphs
    with torch.inference_mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            fast.launch_batch(batch_px, batch_ids, N)  # everything up to the pinned token copy
        finally:
            torch.cuda.set_sync_debug_mode(0)
        again, _, timings = fast.collect_batch()
    assert np.array_equal(first, again)
    for r, j in enumerate(order):
        assert np.array_equal(again[r], want[j])
    assert all(v > 0 for v in timings.values())
