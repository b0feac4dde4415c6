"""TT-NN backend, numbers checked through ttnn's golden functions (no card needed).

The production TtnnBackend runs with test/ttnn_golden/emulator.GoldenTTNN in place of `ttnn`:
every op is ttnn.get_golden_function(op) on host tensors, the mesh is emulated chip by chip
(1x2 = N300, 1x8 = T3K), the collectives combine the chips' shards. On the tiny checkpoint the 7
action tokens must equal the torch backend's, and each stage must match torch.

What this checks: our logic — tensor-parallel sharding of QKV/WO/W1/W3/W2 and the vocab-sharded
LM head, the head split, HF rotate_half RoPE, KV-cache indexing across tile boundaries, the
multimodal sequence and token bookkeeping (action 1 from the prefill, no shift).
What it does NOT check: device precision, kernels, tiling or memory (float32 here; see
test_ttnn_mock.py for ttnn's own validation on mock chips, test_ttnn_hardware.py on a card).
Per stage: PCC and a max |diff| bound (PCC alone misses small systematic errors), and the
epsilons / fused activations the emulator recorded for the goldens.
Run with -s to see the per-stage PCC table.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import checkpoint_action_stats, spec_action  # noqa: E402
import ttnn  # noqa: E402,F401  (a required dependency of the venv: its absence is a failure, not a skip)
from ttnn_golden.reference import STAGES, stage_max_abs_diff, stage_pccs, torch_stage_outputs  # noqa: E402

MESHES = {"N300": 2, "T3K": 8}
INSTRUCTIONS = ("pick up the red cup", "put the spoon on the towel",
                "open the drawer and move the blue block to the left of the sink")
PCC_MIN = 0.9999  # float32 golden vs float32 torch: only summation order differs
# PCC cannot see small systematic errors (a vision LayerNorm eps of 1e-5 instead of 1e-6 keeps it
# at 1.000000000): max |diff| per stage can. Measured on the tiny checkpoint, N300 and T3K, two
# inputs: dinov2 2.3e-6, siglip 1.1e-6, vision 2.3e-6, projector 9.7e-8, decoder_layer0 2.7e-4
# (hidden states up to 86), prefill_logits 1.4e-5. The bounds are ~2.5x that; with eps 1e-5 the
# SigLIP stage reaches 5.5e-6 and the projector 2.9e-7.
MAX_ABS_DIFF = {"dinov2": 6e-6, "siglip": 3e-6, "vision": 6e-6, "projector": 2.5e-7, "decoder_layer0": 7e-4,
                "prefill_logits": 4e-5}


def _rgb(seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(224, 288, 3) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def golden(tiny_weights, tiny_policy):
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    backends = {}
    for mesh, n in MESHES.items():
        emu = GoldenTTNN(available_devices=n)
        backends[mesh] = TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device=mesh, tt=emu,
                                     cache_dir=None, trace=False)
    yield backends
    for b in backends.values():
        b.close()


@pytest.mark.parametrize("mesh", list(MESHES))
def test_golden_action_tokens_equal_torch(golden, tiny_policy, mesh):
    be = golden[mesh]
    for i, instruction in enumerate(INSTRUCTIONS):
        px = tiny_policy.preprocessor(_rgb(i))
        ids = tiny_policy.prompt_ids(instruction)
        want, _ = tiny_policy.backend.generate(px, ids, 7)
        got, timings = be.generate(px, ids, 7)
        assert got.dtype == np.int64 and got.shape == (7,)
        assert got.tolist() == want.tolist(), f"{mesh} {instruction!r}: ttnn {got.tolist()} vs torch {want.tolist()}"
        assert set(timings) == {"vision", "projector", "prefill", "decode"}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_golden_policy_end_to_end_same_actions_as_torch(golden, tiny_policy, mesh):
    """The whole policy (preprocess, prompt, backend, action codec) with the ttnn backend."""
    from openvla_model.policy import OpenVLAPolicy

    p = tiny_policy
    policy = OpenVLAPolicy(p.config, golden[mesh], p.tokenizer, p.codec, p.preprocessor)
    got = policy.predict(_rgb(7), "close the drawer", unnorm_key="bridge_orig")
    want = p.predict(_rgb(7), "close the drawer", unnorm_key="bridge_orig")
    assert got.tokens.tolist() == want.tokens.tolist()
    # the action of those tokens by the spec's formula (not a comparison of two codec outputs)
    np.testing.assert_allclose(got.action, spec_action(got.tokens, checkpoint_action_stats(p.config.weights_dir,
                                                                                           "bridge_orig")),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_golden_kv_cache_indexing_across_tile_boundaries(golden, tiny_policy, mesh):
    """Prompt lengths whose prefill ends just before, at and after a 32-row tile boundary, so
    the decode positions cross it (the seed cropped its page table to the prefill: defect 4).
    The cache is reused call after call without a reset."""
    be = golden[mesh]
    px = tiny_policy.preprocessor(_rgb(3))
    rng = np.random.RandomState(0)
    for prompt_len in (26, 29, 32, 33, 38):  # L = prompt + 256 -> 282 .. 294, decode up to L + 5
        ids = np.concatenate([[1], rng.randint(300, 31000, prompt_len - 2), [29871]]).astype(np.int64)
        want, _ = tiny_policy.backend.generate(px, ids, 7)
        got, _ = be.generate(px, ids, 7)
        assert got.tolist() == want.tolist(), f"{mesh} prompt {prompt_len}: {got.tolist()} vs {want.tolist()}"


@pytest.mark.parametrize("mesh", list(MESHES))
def test_golden_per_stage_pcc(golden, tiny_policy, mesh, record_property):
    be = golden[mesh]
    px = tiny_policy.preprocessor(_rgb(11))
    ids = tiny_policy.prompt_ids("push the green can to the right")
    ours, ref = be.stage_outputs(px, ids), torch_stage_outputs(tiny_policy.backend.modules, px, ids)
    pccs, diffs = stage_pccs(ours, ref), stage_max_abs_diff(ours, ref)
    line = f"golden PCC vs torch ({mesh}, tiny checkpoint, float32 logic check): " + ", ".join(
        f"{k} {v:.9f} (max |diff| {diffs[k]:.1e})" for k, v in pccs.items())
    print("\n" + line)
    record_property("pcc", pccs)
    for stage in STAGES:
        assert pccs[stage] >= PCC_MIN, line
    over = {k: f"{diffs[k]:.2e} > {MAX_ABS_DIFF[k]:.1e}" for k in STAGES if not diffs[k] <= MAX_ABS_DIFF[k]}
    assert not over, f"max |diff| over its bound: {over}\n{line}"


@pytest.mark.parametrize("mesh", list(MESHES))
def test_golden_norms_get_the_models_epsilons_and_no_activation_is_dropped(golden, tiny_policy, mesh):
    """What the emulator gave the goldens, as it recorded it: every vision LayerNorm got the timm
    towers' eps, every RMSNorm the checkpoint's rms_norm_eps (never ttnn's 1e-12 default), and no
    program config carries a fused activation (the model fuses none; the matmul goldens would
    apply one, so a new one must be named here)."""
    be, emu = golden[mesh], golden[mesh].tt
    start = {op: len(emu.op_kwargs.get(op, [])) for op in ("layer_norm", "rms_norm", "linear", "matmul")}
    be.stage_outputs(tiny_policy.preprocessor(_rgb(2)), tiny_policy.prompt_ids("open the drawer"))
    seen = {op: emu.op_kwargs.get(op, [])[n:] for op, n in start.items()}
    m = tiny_policy.backend.modules
    vit_eps = {float(t.vit.blocks[0].norm1.eps) for t in (m.featurizer, m.fused_featurizer)}
    assert vit_eps == {1e-6}  # timm's ViTs (openvla-spec.md section 1)
    ln_eps = [c["epsilon"] for c in seen["layer_norm"]]
    rms_eps = [c["epsilon"] for c in seen["rms_norm"]]
    assert ln_eps and set(ln_eps) == vit_eps, f"vision LayerNorm eps passed: {sorted(set(map(str, ln_eps)))}"
    assert rms_eps and set(rms_eps) == {tiny_policy.config.llm.rms_norm_eps}, sorted(set(map(str, rms_eps)))
    fused = [c["fused_activation"] for op in ("linear", "matmul") for c in seen[op] if "fused_activation" in c]
    assert not fused, f"fused activations in program configs: {sorted(set(fused))}"
    assert "program_config" not in emu.stripped_kwargs.get("linear", set())  # reaches the golden


def test_golden_interleaved_decode_matmuls_give_the_same_tokens(tiny_weights, tiny_policy):
    """The fallback weight layout (decode_matmul: interleaved) on both meshes."""
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    px = tiny_policy.preprocessor(_rgb(5))
    ids = tiny_policy.prompt_ids(INSTRUCTIONS[1])
    want, _ = tiny_policy.backend.generate(px, ids, 7)
    for mesh, n in MESHES.items():
        be = TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device=mesh, tt=GoldenTTNN(n),
                         cache_dir=None, trace=False, profile_overrides={"decode_matmul": "interleaved"})
        try:
            assert be.describe()["decode_matmul"] == "interleaved"
            assert be.generate(px, ids, 7)[0].tolist() == want.tolist()
        finally:
            be.close()


def test_golden_emulation_ran_the_sharded_ops(golden):
    """The emulated mesh really went through the collectives and the decode-cache ops."""
    emu = golden["T3K"].tt
    for op in ("reduce_scatter_minimal_async", "all_gather_async", "paged_update_cache", "sdpa_decode", "fill_cache",
               "sdpa", "embedding"):
        assert emu.ops_run.get(op, 0) > 0, f"{op} never ran: {emu.ops_run}"
    assert golden["T3K"].describe()["decode_matmul"] == "dram_sharded"  # the profiles' default


def test_golden_detects_the_interleaved_rope_layout(tiny_weights, tiny_policy, monkeypatch):
    """Negative control: with the interleaved RoPE pairing (what rotary_embedding_llama expects
    without a Q/K permutation; the seed's defect 3) the same test sees the logits diverge."""
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.backends.ttnn import attention
    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    def interleaved(d):
        r = torch.zeros(d, d)
        for i in range(0, d, 2):
            r[i + 1, i], r[i, i + 1] = -1.0, 1.0
        return r

    monkeypatch.setattr(attention, "rotate_half_matrix", interleaved)
    be = TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device="N300", tt=GoldenTTNN(2),
                     cache_dir=None, trace=False)
    try:
        px = tiny_policy.preprocessor(_rgb(11))
        ids = tiny_policy.prompt_ids("push the green can to the right")
        pccs = stage_pccs(be.stage_outputs(px, ids), torch_stage_outputs(tiny_policy.backend.modules, px, ids))
    finally:
        be.close()
    assert pccs["projector"] >= PCC_MIN  # vision is untouched
    assert pccs["decoder_layer0"] < 0.999, pccs


# Prompt lengths (tiny checkpoint, 256 patches): L = 278, 279 (bucket S = 288), 289, 306
# (S = 320), then 277 (S = 288 again): every prefill trace is replayed for another L than the
# one it was captured for.
TRACE_INSTRUCTIONS = INSTRUCTIONS + ("a b c d e f g h i j k l m n o p q r s t u v w x y z", "pick up the cup")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_golden_one_trace_per_action_gives_torch_tokens_with_one_read(tiny_weights, tiny_policy, mesh):
    """All decode steps of an action as ONE trace, and the prefill as one trace per 32-row
    bucket of the padded sequence length (TracingGoldenTTNN replays the recorded ops on the
    captured tensors, and refuses host transfers while capturing): the first action of a bucket
    runs its prefill op by op and captures it, later actions of that bucket replay it with
    another prompt length L (the ids and the last row's index come from device tensors written
    before the replay); the first action captures the decode steps, the next ones replay them.
    Every action's 7 tokens equal the torch backend's, and a replayed action's host traffic is
    the image, the prompt ids, the LM-head row index and the decode start position in, the
    tokens out in ONE read."""
    from ttnn_golden.trace import TracingGoldenTTNN

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    emu = TracingGoldenTTNN(MESHES[mesh])
    be = TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device=mesh, tt=emu, cache_dir=None,
                     trace=True)
    buckets: set = set()
    lengths = []
    try:
        for i, instruction in enumerate(TRACE_INSTRUCTIONS):
            px = tiny_policy.preprocessor(_rgb(20 + i))
            ids = tiny_policy.prompt_ids(instruction)
            length = ids.size + 256
            seq = -(-length // 32) * 32
            lengths.append((length, seq))
            want, _ = tiny_policy.backend.generate(px, ids, 7)
            before, n_replayed = dict(emu.host_io), len(emu.replayed)
            got, _ = be.generate(px, ids, 7)
            assert got.tolist() == want.tolist(), f"{mesh} action {i}: ttnn {got.tolist()} vs torch {want.tolist()}"
            prefill_replayed = seq in buckets
            buckets.add(seq)
            # the vision trace, the decode trace and one prefill trace per bucket seen
            assert set(be._prefill_traces) == {(s, 1, 0) for s in buckets}, (i, be._prefill_traces.keys())
            assert len(emu.traces) == 2 + len(buckets), (i, emu.traces.keys())
            kinds = {tid: "prefill" for tid, _ in be._prefill_traces.values()}
            kinds.update({tid: "decode" for tid, _ in be._traces.values()})
            replayed = sorted(kinds.get(t, "vision") for t in emu.replayed[n_replayed:])
            want_replayed = ([] if not i else ["decode", "vision"]) + (["prefill"] if prefill_replayed else [])
            assert replayed == sorted(want_replayed), (i, lengths[-1], replayed)
            if i:  # the patches (one upload, vision traced too) + the ids (one upload) + the LM-head
                # row index + 2 position writes; 1 read (prefill replayed or run op by op alike)
                io = {k: emu.host_io[k] - before[k] for k in before}
                assert io == {"write": 5, "read": 1}, io
        assert [s for _, s in lengths] == [288, 288, 320, 320, 288], lengths  # the plan above holds
        decode_trace = [emu.traces[tid] for tid, _ in be._traces.values()]
        assert len(decode_trace) == 1
        ops = [name for name, *_ in decode_trace[0]]
        assert ops.count("argmax") == 6 and ops.count("plus_one") == 12 and ops[-1] == "concat", ops[-3:]
        for tid, _ in be._prefill_traces.values():
            ops = [name for name, *_ in emu.traces[tid]]
            assert ops.count("argmax") == 1 and ops.count("fill_cache") >= 2 and ops[-1] == "argmax", ops[-3:]
    finally:
        be.close()
    assert not emu.traces  # released on close
