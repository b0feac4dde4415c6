"""Speculative action decoding (model/speculative.py, issue 13): drafts verified in the prefill.

For every k in 0..6, a draft built from the true greedy tokens with position k+1 corrupted must
give the plain path's tokens and accepted == k, on the reference backend and on the fast path's
math (on the CPU the fast path runs the same functions CUDA captures as graphs, eagerly). Then:
random, out-of-range, non-integer and wrong-length drafts (never an exception), the policy API,
and the per-stream DraftState rules.
"""
import logging

import numpy as np
import pytest
import torch

from openvla_model import load_policy
from openvla_model.backends.torch_backend import TorchBackend, crop_cache
from openvla_model.backends.torch_cuda import FastTorchBackend
from openvla_model.checkpoint import Checkpoint
from openvla_model.policy import OpenVLAPolicy
from openvla_model.preprocess import Preprocessor
from openvla_model.speculative import AcceptanceStats, DraftState, accepted_length, draft_accepting, sanitize_draft
from openvla_model.synthetic import synthetic_rgb

N = 7  # tokens per action
D = N - 1  # draft rows
VOCAB = 32064
SHORT = "pick up the red cup please"  # 27 prompt tokens (tiny tokenizer): + 6 draft rows cross bucket 32
LONG = "put the blue block into the open drawer on the left of the sink next to the yellow towel"  # 40: 48
ACTION_LO = 31744


@pytest.fixture(scope="module")
def backends(tiny_weights, tiny):
    ref = TorchBackend(tiny[0], Checkpoint(tiny_weights), device="cpu", dtype="float32")
    fast = FastTorchBackend(tiny[0], reference=ref)
    yield {"reference": ref, "fast": fast}
    fast.close()


@pytest.fixture(scope="module")
def cases(backends, tiny):
    """(pixels, prompt ids, plain greedy tokens, plain fast-path logits) for two frames/prompts."""
    _, tokenizer, pre = tiny
    out = []
    for seed, instr in ((0, SHORT), (1, LONG)):
        px, ids = pre(synthetic_rgb(seed)), tokenizer.encode_prompt(instr)
        want, _ = backends["reference"].generate(px, ids, N)
        got, _ = backends["fast"].generate(px, ids, N)
        assert np.array_equal(got, want)
        out.append((px, ids, want, backends["fast"].last_logits(N).clone()))
    return out


def draft_with_k_accepted(tokens: np.ndarray, k: int) -> np.ndarray:
    """The true greedy tokens as a draft, with position k+1 corrupted (k == 6: all correct)."""
    d = draft_accepting(tokens, k)
    assert d.size == D and (d != tokens[:D]).sum() == (k < D) and np.array_equal(d[:k], tokens[:k])
    return d


# -- the k sweep --------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["reference", "fast"])
@pytest.mark.parametrize("case", [0, 1], ids=["short", "long"])
def test_exactly_k_drafts_accepted_gives_the_plain_tokens(backends, cases, which, case):
    be = backends[which]
    px, ids, want, plain_logits = cases[case]
    for k in range(D + 1):
        got, timings = be.generate(px, ids, N, draft=draft_with_k_accepted(want, k))
        assert np.array_equal(got, want), (which, k, got, want)
        assert be.last_accepted == k, (which, k, be.last_accepted)
        assert set(timings) == {"vision", "projector", "prefill", "decode"}
        if which == "fast":
            # every step's logits, whether from a draft row of the prefill or a decode step,
            # are the plain path's (positions, KV rows and masking all continue correctly)
            err = (be.last_logits(N) - plain_logits).abs().max().item()
            assert err < 1e-4 * plain_logits.abs().max().item(), (k, err)
            assert len(be.last_decode_steps_ms) == N - 1 - k
    # no draft afterwards: the plain path, nothing left over from the drafted calls
    got, _ = be.generate(px, ids, N)
    assert np.array_equal(got, want) and be.last_accepted == 0


@pytest.mark.parametrize("which", ["reference", "fast"])
def test_random_and_odd_drafts_give_the_plain_tokens(backends, cases, which):
    be = backends[which]
    px, ids, want, _ = cases[0]
    rng = np.random.default_rng(0)
    drafts = [
        rng.integers(ACTION_LO, 32000, D),  # random action tokens
        np.concatenate([want[:2], rng.integers(0, VOCAB, D - 2)]),  # 2 right, then random ids
        want[:3],  # a short draft: 3 rows
        np.array([want[0], want[1], VOCAB, want[3]]),  # out of range at 3: cut there
        np.array([10 ** 12] * D),  # far out of range: no draft
        np.arange(N + 1),  # too long: rejected
        torch.as_tensor(want),  # the previous action's 7 tokens as they come: the 7th is dropped
    ]
    for d in drafts:
        expect = sanitize_draft(d, N, VOCAB).tokens
        k_want = 0 if expect is None else int(accepted_length(expect, want))
        got, _ = be.generate(px, ids, N, draft=d)
        assert np.array_equal(got, want), (which, d)
        assert be.last_accepted == k_want, (which, d, be.last_accepted, k_want)
    assert be.last_accepted == D  # the torch tensor draft (all right) was used


@pytest.mark.parametrize("bucket", [1, 64])
def test_fast_path_draft_rows_with_other_prompt_buckets(backends, cases, tiny, bucket):
    """No padding at all (draft rows are the last rows) and a wide bucket (pads after them)."""
    fast = FastTorchBackend(tiny[0], reference=backends["reference"], prompt_bucket=bucket)
    for px, ids, want, plain_logits in cases[:1]:
        for k in (0, 3, D):
            got, _ = fast.generate(px, ids, N, draft=draft_with_k_accepted(want, k))
            assert np.array_equal(got, want) and fast.last_accepted == k, (bucket, k)
            assert (fast.last_logits(N) - plain_logits).abs().max().item() < 1e-4 * plain_logits.abs().max().item()


def test_fast_path_grows_its_cache_for_the_draft_rows(backends, tiny):
    """A prompt whose decode steps fit the KV cache but whose prefill with the draft rows does
    not (a wide bucket: the 6 rows spill into the next one)."""
    config, tokenizer, pre = tiny
    ref = backends["reference"]
    fast = FastTorchBackend(config, reference=ref, prompt_bucket=128)
    cap = fast.describe()["kv_cache_capacity"]
    instr = "pick up the "
    for _ in range(2000):
        ids = tokenizer.encode_prompt(instr)
        prompt_pad, kv_len = fast._shapes(ids.size, N)
        if kv_len <= cap < config.num_patches + prompt_pad + 128 and ids.size + D > prompt_pad:
            break
        instr += "q"
    else:
        pytest.fail("no prompt length found that needs the draft rows' extra cache")
    px = pre(synthetic_rgb(2))
    want, _ = ref.generate(px, ids, N)
    got, _ = fast.generate(px, ids, N, draft=want)
    assert np.array_equal(got, want) and fast.last_accepted == D
    assert fast.describe()["kv_cache_capacity"] > cap


def test_fast_path_other_action_lengths(backends, cases):
    be = backends["fast"]
    px, ids, _, _ = cases[0]
    for n in (1, 3):  # 1: no draft rows at all; 3: two draft rows
        want, _ = backends["reference"].generate(px, ids, n)
        for k in range(n):
            d = draft_accepting(want, k)
            got, _ = be.generate(px, ids, n, draft=d)
            assert np.array_equal(got, want) and be.last_accepted == k, (n, k)
            assert len(be.last_decode_steps_ms) == n - 1 - k  # only the remaining decode steps ran


def test_crop_cache_keeps_the_prefix_on_this_transformers():
    """crop()'s argument changed meaning between transformers 4.x and 5.x: ours keeps a prefix."""
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).view(2, 3, 10, 4)
    cache.update(k, k + 1, 0)
    assert crop_cache(cache, 10) and cache.get_seq_length() == 10  # nothing to drop
    assert crop_cache(cache, 7) and cache.get_seq_length() == 7
    keys = cache.layers[0].keys if hasattr(cache, "layers") else cache.key_cache[0]
    assert torch.equal(keys, k[:, :, :7])
    assert not crop_cache(cache, 9)  # cannot grow: the caller recomputes


# -- policy API ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policies(tiny_weights):
    ref = load_policy(tiny_weights, device="cpu", dtype="float32", speculative=True)
    fast = load_policy(tiny_weights, device="cpu", dtype="float32", speculative=True, fast=True)
    assert isinstance(fast.backend, FastTorchBackend) and type(ref.backend) is TorchBackend
    yield {"reference": ref, "fast": fast}
    ref.close()
    fast.close()


@pytest.mark.parametrize("which", ["reference", "fast"])
def test_policy_predict_with_drafts(policies, which):
    policy = policies[which]
    rgb = synthetic_rgb(3)
    plain = policy.predict(rgb, SHORT, unnorm_key="bridge_orig", draft=None)
    assert plain.accepted == 0 and plain.to_dict()["accepted"] == 0
    assert policy.describe()["speculative"] is True
    for k in (2, D):
        r = policy.predict(rgb, SHORT, unnorm_key="bridge_orig", draft=draft_with_k_accepted(plain.tokens, k))
        assert r.accepted == k and r.to_dict()["accepted"] == k
        assert np.array_equal(r.tokens, plain.tokens)
        assert np.array_equal(r.action, plain.action)
    r = policy.predict(rgb, SHORT, unnorm_key="bridge_orig", draft=plain.tokens)  # 7 tokens as they come
    assert r.accepted == D and np.array_equal(r.tokens, plain.tokens)
    bad = [[], [1.5] * D, ["a"] * D, [None] * D, [[1, 2], [3]], {"a": 1}, np.zeros((1, D), np.int64),
           [True] * D, 7, "31744 31745", [VOCAB] * D, [-1] * D, list(range(50)), [2 ** 70] * D]
    for d in bad:  # what reaches the backend: nothing
        assert policy._usable_draft(d) is None, d
    for d in ([1.5] * D, [VOCAB] * D):  # and the whole predict never raises
        r = policy.predict(rgb, SHORT, unnorm_key="bridge_orig", draft=d)
        assert r.accepted == 0 and np.array_equal(r.tokens, plain.tokens), d


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def plain3(tiny_policy):
    return tiny_policy.predict(synthetic_rgb(3), SHORT, unnorm_key="bridge_orig")


def test_policy_without_speculative_ignores_drafts(tiny_policy, plain3):
    assert tiny_policy.speculative is False  # the default
    rgb, plain = synthetic_rgb(3), plain3
    logger, records = logging.getLogger("openvla_model"), _Records()  # (a ROS plugin stops propagation)
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        r = tiny_policy.predict(rgb, SHORT, unnorm_key="bridge_orig", draft=plain.tokens)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert r.accepted == 0 and np.array_equal(r.tokens, plain.tokens)
    assert any("speculative=False" in m for m in records.messages), records.messages


def test_policy_on_a_backend_without_draft_rows(tiny_policy, plain3):
    """A backend that does not take drafts (e.g. TT-NN until it does) gets the plain call."""

    class PlainOnly:
        name = "plain-only"

        def __init__(self, inner):
            self.inner = inner

        def generate(self, pixel_values, input_ids, num_tokens):  # no draft parameter
            return self.inner.generate(pixel_values, input_ids, num_tokens)

    p = tiny_policy
    policy = OpenVLAPolicy(p.config, PlainOnly(p.backend), p.tokenizer, p.codec, p.preprocessor, speculative=True)
    r = policy.predict(synthetic_rgb(3), SHORT, unnorm_key="bridge_orig", draft=plain3.tokens)
    assert r.accepted == 0 and np.array_equal(r.tokens, plain3.tokens)


# -- the verifier and the sanitiser ---------------------------------------------------------------

def test_accepted_length_is_the_longest_matching_prefix():
    pred = np.array([5, 6, 7, 8, 9, 10, 11])
    assert accepted_length(np.array([5, 6, 7, 8, 9, 10]), pred) == 6
    assert accepted_length(np.array([5, 6, 0, 8, 9, 10]), pred) == 2  # later matches do not count
    assert accepted_length(np.array([0, 6, 7, 8, 9, 10]), pred) == 0
    assert accepted_length(np.array([5, 6, -1, -1, -1, -1]), pred) == 2  # -1 padding never matches
    assert accepted_length(np.array([5, 6, 7]), pred) == 3
    assert accepted_length(np.zeros(0, np.int64), pred) == 0
    t = accepted_length(torch.tensor([[5, 6, 0], [5, 6, 7]]), torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]]))
    assert isinstance(t, torch.Tensor) and t.tolist() == [2, 3]
    want = np.array([31744, 31999, 5, 6, 7, 8, 9])
    for k in range(D + 1):
        assert accepted_length(draft_accepting(want, k), want) == k
    assert draft_accepting(want, 0)[0] == 31745 and draft_accepting(want, 1)[1] == 31998  # still action tokens
    with pytest.raises(ValueError):
        draft_accepting(want, 7)


def test_sanitize_draft_rules():
    ok = sanitize_draft([31744, 31800, 31900, 31744, 31745, 31746], N, VOCAB)
    assert ok.note is None and ok.tokens.dtype == np.int64 and ok.tokens.tolist() == [31744, 31800, 31900,
                                                                                      31744, 31745, 31746]
    assert sanitize_draft(list(range(100, 107)), N, VOCAB).tokens.tolist() == list(range(100, 106))  # 7 -> 6
    assert sanitize_draft(np.array([3, 4], np.uint16), N, VOCAB).tokens.tolist() == [3, 4]
    assert sanitize_draft(torch.tensor([3, 4]), N, VOCAB).tokens.tolist() == [3, 4]
    cut = sanitize_draft([3, 4, VOCAB, 5], N, VOCAB)
    assert cut.tokens.tolist() == [3, 4] and "outside" in cut.note
    assert sanitize_draft(None, N, VOCAB) == sanitize_draft(None, N, VOCAB) and sanitize_draft(None, N, VOCAB).tokens \
        is None and sanitize_draft(None, N, VOCAB).note is None
    for bad in ([], [-1, 3], [1.0, 2.0], [True, False], ["1"], [None], [[1], [2, 3]], [[1, 2]], 5, list(range(8)),
                [2 ** 70], object(), np.zeros((2, 3), np.int64)):
        check = sanitize_draft(bad, N, VOCAB)
        assert check.tokens is None and check.note, bad
    assert sanitize_draft([5], 1, VOCAB).tokens is None  # one-token actions have no draft rows


# -- per-stream draft state -------------------------------------------------------------------------

def test_draft_state_rules():
    now = [100.0]
    state = DraftState(max_age_s=0.5, clock=lambda: now[0])
    assert state.draft(SHORT) is None and not state.has_draft
    tokens = np.arange(31744, 31751)
    state.update(SHORT, tokens)
    assert state.draft(SHORT).tolist() == tokens.tolist()  # the last action's 7 tokens
    now[0] += 0.5
    assert state.draft(SHORT) is not None  # exactly max_age_s old: still fresh
    now[0] += 0.01
    assert state.draft(SHORT) is None and not state.has_draft  # older: dropped for good
    state.update(SHORT, tokens)
    assert state.draft(LONG) is None  # instruction changed: dropped...
    assert state.draft(SHORT) is None  # ...also for the old instruction
    state.update(SHORT, tokens)
    state.reset()
    assert state.draft(SHORT) is None
    state.update(SHORT, np.arange(20))  # keeps the last 7
    assert state.draft(SHORT).tolist() == list(range(13, 20))
    state.update(SHORT, [1.5, 2.5])  # not token ids: forgets
    assert state.draft(SHORT) is None
    state.update(SHORT, tokens, now=now[0])
    got = state.draft(SHORT)
    got[0] = 0  # a copy: the caller cannot change the stored draft
    assert state.draft(SHORT)[0] == tokens[0]
    now[0] -= 1.0  # a clock that went backwards: not trusted
    assert state.draft(SHORT) is None
    other = DraftState(max_age_s=None)  # no age limit; drafts never cross streams (one state each)
    assert other.draft(SHORT) is None
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            DraftState(max_age_s=bad)


def test_acceptance_stats():
    s = AcceptanceStats()
    assert np.isnan(s.acceptance_rate) and np.isnan(s.mean_accepted)
    s.record(False)
    s.record(True, 6)
    s.record(True, 0)
    s.record(True, 3)
    d = s.as_dict()
    assert d["actions"] == 4 and d["drafted"] == 3 and d["accepted_total"] == 9
    assert d["histogram"] == [1, 0, 0, 1, 0, 0, 1]
    assert d["mean_accepted"] == 3.0 and d["acceptance_rate"] == 9 / 18


# -- CUDA (skips here) --------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graphs_k_sweep_and_the_one_sync(tiny_weights, tiny):
    """float32 on CUDA with graphs: the drafted prefill graph per bucket, the accepted count read
    once (an event sync, which sync-debug mode does not flag), then the remaining decode graphs."""
    config, tokenizer, pre = tiny
    ref = TorchBackend(config, Checkpoint(tiny_weights), device="cuda", dtype="float32")
    fast = FastTorchBackend(config, reference=ref)
    px = Preprocessor(config, device="cuda")(synthetic_rgb(0))
    for instr in (SHORT, LONG):
        ids = tokenizer.encode_prompt(instr)
        want, _ = ref.generate(px, ids, N)
        assert np.array_equal(fast.generate(px, ids, N)[0], want)
        for k in range(D + 1):
            d = draft_with_k_accepted(want, k)
            got, _ = fast.generate(px, ids, N, draft=d)  # first call per bucket captures
            assert np.array_equal(got, want) and fast.last_accepted == k, (instr, k)
            with torch.inference_mode():
                torch.cuda.set_sync_debug_mode("error")
                try:
                    fast.launch(px, ids, N, d)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                again, _ = fast.collect()
            assert np.array_equal(again, want) and fast.last_accepted == k
    desc = fast.describe()
    assert not desc["graph_failures"] and desc["graphs_captured"] >= 5, desc
    assert [key for key in fast._graphs if isinstance(key, tuple) and key[0] == "prefill" and key[2] == D]
    fast.close()
