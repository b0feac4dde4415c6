"""Batched prediction (issue 14, model side): OpenVLAPolicy.predict_batch on the torch reference.

Every item of a batch must get exactly what predict() gives it alone (tokens, actions, accepted
drafts), whatever the other items are: prompts of different lengths (left padding, per-row
positions, a mask that hides pad columns and rejected drafts), different unnorm keys, drafts of
which each item accepts a different number, and bad items, which come back as their error while
the others succeed. A backend without generate_batch (TT-NN today) gets one
generate call per item, with the same results.
"""
import numpy as np
import pytest

from openvla_model import load_policy
from openvla_model.errors import InputError, OpenVLAError, UnnormKeyError
from openvla_model.policy import BatchItem
from openvla_model.speculative import draft_accepting
from openvla_model.synthetic import synthetic_rgb

KEYS = ("bridge_orig", "tiny_other_dataset")  # the tiny checkpoint's two datasets
# prompt lengths differ (tiny tokenizer): 27, 40, 19, 20 and 32 tokens
INSTRUCTIONS = (
    "pick up the red cup please",
    "put the blue block into the open drawer on the left of the sink next to the yellow towel",
    "go",
    "open the drawer",
    "wipe the table with the sponge",
)


@pytest.fixture(scope="module")
def policy(tiny_weights):
    p = load_policy(tiny_weights, backend="torch", device="cpu", dtype="float32", speculative=True)
    yield p
    p.close()


def item(i: int, draft=None) -> BatchItem:
    return BatchItem(synthetic_rgb(i), INSTRUCTIONS[i % len(INSTRUCTIONS)], KEYS[i % 2], draft)


def plain_greedy(policy, i: int) -> np.ndarray:
    """An oracle independent of the backend's batch code: one item, no cache, no mask, no
    padding; every step recomputes the whole sequence [BOS, patches, prompt, tokens so far]."""
    import torch

    from openvla_model.modeling import multimodal_embeddings

    m = policy.backend.modules
    rgb, instr, _, _ = item(i)
    with torch.inference_mode():
        seq = multimodal_embeddings(m.llm, m.projector(m.vision(policy.preprocessor(rgb))),
                                    policy.prompt_ids(instr))
        out = []
        for _ in range(policy.config.action_dim):
            tok = m.llm(inputs_embeds=seq).logits[0, -1].argmax()
            out.append(int(tok))
            seq = torch.cat([seq, m.llm.get_input_embeddings()(tok.view(1, 1))], dim=1)
    return np.array(out, np.int64)


@pytest.fixture(scope="module")
def alone(policy):
    """predict() of each item on its own: the ground truth every batch must reproduce; checked
    against plain greedy decoding, so a fault in the path predict shares with predict_batch
    shows too."""
    out = [policy.predict(*item(i)) for i in range(len(INSTRUCTIONS))]
    for i, r in enumerate(out):
        assert np.array_equal(r.tokens, plain_greedy(policy, i)), i
    return out


def assert_same(got, want, accepted=0):
    assert not isinstance(got, Exception), got
    assert np.array_equal(got.tokens, want.tokens), (got.tokens, want.tokens)
    np.testing.assert_array_equal(got.action, want.action)
    np.testing.assert_array_equal(got.normalized, want.normalized)
    assert (got.unnorm_key, got.instruction, got.accepted) == (want.unnorm_key, want.instruction, accepted)


def test_prompt_lengths_and_keys_differ(policy, alone):
    lengths = {len(policy.prompt_ids(s)) for s in INSTRUCTIONS}
    assert len(lengths) == len(INSTRUCTIONS)
    assert {r.unnorm_key for r in alone} == set(KEYS)
    # the keys really un-normalise differently, so a mixed-up key would show in the actions
    assert not np.allclose(policy.codec.unnormalize(alone[0].normalized, KEYS[0]),
                           policy.codec.unnormalize(alone[0].normalized, KEYS[1]))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_batch_equals_predict_per_item(policy, alone, size):
    # the batch starts at a different item per size, so short and long prompts share batches
    order = [(size + j) % len(INSTRUCTIONS) for j in range(size)]
    out = policy.predict_batch([item(i) for i in order])
    assert len(out) == size
    for got, i in zip(out, order):
        assert_same(got, alone[i])
        assert set(got.timings_ms) == {"preprocess", "vision", "projector", "prefill", "decode", "total"}


def test_plain_tuples_are_items(policy, alone):
    rgb, instr, key, _ = item(1)
    out = policy.predict_batch([(rgb, instr, key), [synthetic_rgb(3), INSTRUCTIONS[3], KEYS[1], None]])
    assert_same(out[0], alone[1])
    assert_same(out[1], alone[3])


def test_drafts_accepted_per_item(policy, alone):
    """Items accept 0, 6, 3, none (no draft) and 1 drafts in one batch, as each does alone."""
    ks = [0, 6, 3, None, 1]
    items = [item(i, None if k is None else draft_accepting(alone[i].tokens, k)) for i, k in enumerate(ks)]
    single = [policy.predict(*it) for it in items]
    assert [r.accepted for r in single] == [k or 0 for k in ks]
    out = policy.predict_batch(items)
    for got, want, k in zip(out, single, ks):
        assert_same(got, want, accepted=k or 0)
        assert_same(got, alone[ks.index(k)], accepted=k or 0)


def test_bad_items_fail_alone(policy, alone):
    long_instr = "z" * 1900  # < 2000 characters, but ~1900 tokens + 256 patches > 2048 positions
    bad = [
        BatchItem(np.zeros((64, 64), np.uint8), INSTRUCTIONS[0], KEYS[0]),  # corrupt image: no channels
        BatchItem(synthetic_rgb(1), "   ", KEYS[1]),  # empty instruction
        BatchItem(synthetic_rgb(2), INSTRUCTIONS[2], "no_such_dataset"),  # unknown key
        BatchItem(synthetic_rgb(3), INSTRUCTIONS[3], None),  # missing key (two datasets, no default)
        BatchItem(synthetic_rgb(4), long_instr, KEYS[0]),  # prompt longer than the model's positions
        (synthetic_rgb(0),),  # not an item at all
    ]
    expected = [InputError, InputError, UnnormKeyError, UnnormKeyError, InputError, InputError]
    for b, err in zip(bad, expected):
        # good items on both sides of the bad one
        out = policy.predict_batch([item(4), b, item(1), item(2, draft_accepting(alone[2].tokens, 4))])
        assert isinstance(out[1], err) and isinstance(out[1], OpenVLAError), (b, out[1])
        if isinstance(b, BatchItem):  # predict raises the very same message for it alone
            with pytest.raises(err) as raised:
                policy.predict(*b)
            assert str(raised.value) == str(out[1])
        assert_same(out[0], alone[4])
        assert_same(out[2], alone[1])
        assert_same(out[3], alone[2], accepted=4)


def test_all_bad_and_empty_batches(policy):
    assert policy.predict_batch([]) == []
    out = policy.predict_batch([BatchItem(np.zeros((2, 2, 4), np.uint8), "x", KEYS[0])])
    assert isinstance(out[0], InputError)


def test_predict_is_a_batch_of_one(policy, alone, monkeypatch):
    calls = []
    real = policy.predict_batch
    monkeypatch.setattr(policy, "predict_batch", lambda items: calls.append(len(items)) or real(items))
    assert_same(policy.predict(*item(0)), alone[0])
    with pytest.raises(InputError, match="HxWx3"):
        policy.predict(np.zeros((8, 8), np.uint8), INSTRUCTIONS[0], KEYS[0])
    assert calls == [1, 1]


class PerItemOnly:
    """A backend without a batch dimension (like the CUDA fast path today): generate only."""

    supports_draft = True

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, "per-item", 0
        self.last_accepted = 0

    def generate(self, pixel_values, input_ids, num_tokens, draft=None):
        assert pixel_values.shape[0] == 1
        self.calls += 1
        out = self.inner.generate(pixel_values, input_ids, num_tokens, draft=draft)
        self.last_accepted = self.inner.last_accepted
        return out


def test_backend_without_generate_batch_gets_per_item_calls(policy, alone, monkeypatch):
    fake = PerItemOnly(policy.backend)
    monkeypatch.setattr(policy, "backend", fake)
    items = [item(0), BatchItem(synthetic_rgb(1), "", KEYS[1]), item(2, draft_accepting(alone[2].tokens, 2)), item(3)]
    out = policy.predict_batch(items)
    assert fake.calls == 3
    assert isinstance(out[1], InputError)
    assert_same(out[0], alone[0])
    assert_same(out[2], alone[2], accepted=2)
    assert_same(out[3], alone[3])


def test_generate_batch_matches_generate(policy, alone):
    """The backend contract directly: (tokens[B, 7], accepted[B], timings); generate is B = 1."""
    be, pre = policy.backend, policy.preprocessor
    import torch

    order = [1, 2, 0]
    px = torch.cat([pre(synthetic_rgb(i)) for i in order])
    ids = [policy.prompt_ids(INSTRUCTIONS[i]) for i in order]
    drafts = [None, draft_accepting(alone[2].tokens, 5), [1.5, 2.5]]  # the last one is not a draft: ignored
    tokens, accepted, timings = be.generate_batch(px, ids, 7, drafts=drafts)
    assert tokens.shape == (3, 7) and tokens.dtype == np.int64
    assert list(accepted) == [0, 5, 0]
    assert set(timings) == {"vision", "projector", "prefill", "decode"}
    for row, i in zip(tokens, order):
        assert np.array_equal(row, alone[i].tokens)
        single, _ = be.generate(pre(synthetic_rgb(i)), policy.prompt_ids(INSTRUCTIONS[i]), 7)
        assert np.array_equal(single, row)


def test_rows_get_their_own_positions_and_mask(policy, alone, monkeypatch):
    """What the LLM is handed: row i's positions run 0..T_i-1 over its own tokens (whatever the
    padding), a real query sees exactly its row's earlier real columns, and decode step s feeds
    row i at L_i + n_i - 1. (Positions shifted by the pad width give the same tokens in exact
    arithmetic, RoPE being relative, so only this check catches that.)"""
    import torch

    be, pre, llm = policy.backend, policy.preprocessor, policy.backend.modules.llm
    calls = []
    real = llm.forward

    def spy(*args, **kwargs):
        calls.append((kwargs["position_ids"].clone(), kwargs.get("attention_mask")))
        return real(*args, **kwargs)

    monkeypatch.setattr(llm, "forward", spy)
    order = [2, 1]  # 19 and 40 prompt tokens; the short one drafts 6 tokens, 2 of them accepted
    ids = [policy.prompt_ids(INSTRUCTIONS[i]) for i in order]
    drafts = [draft_accepting(alone[2].tokens, 2), None]
    px = torch.cat([pre(synthetic_rgb(i)) for i in order])
    tokens, accepted, _ = be.generate_batch(px, ids, 7, drafts=drafts)
    assert list(accepted) == [2, 0]
    lengths = [policy.config.num_patches + len(x) for x in ids]  # [BOS, patches, prompt[1:]]
    total = [lengths[0] + 6, lengths[1]]
    width = max(total)
    pos, mask = calls[0]
    assert pos.shape == (2, width) and mask.shape == (2, 1, width, width)
    for i in range(2):
        pad = width - total[i]
        assert torch.equal(pos[i, pad:], torch.arange(total[i]))
        real_cols = torch.arange(width) >= pad
        for q in (pad, pad + 1, width - 1):
            assert torch.equal(mask[i, 0, q], real_cols & (torch.arange(width) <= q)), (i, q)
    steps = calls[1:]
    assert len(steps) == 6  # the row that accepted nothing needs 6 decode steps
    for s, (p, m) in enumerate(steps):
        assert p[1, 0] == lengths[1] + s  # row 1 has s + 1 tokens: feeds token s at L + s
        assert m is not None and m[1, 0, 0].all()  # row 1 has no pad and no draft
        if s < 4:  # row 0 has 3 + s tokens; its rejected drafts (4 columns) stay hidden
            assert p[0, 0] == lengths[0] + 2 + s
            cols = m[0, 0, 0]
            assert not cols[width - 4:width].any() and cols[width:].all()
            assert not cols[:width - total[0]].any() and cols[width - total[0]:width - 4].all()
    assert np.array_equal(tokens[0], alone[2].tokens) and np.array_equal(tokens[1], alone[1].tokens)
