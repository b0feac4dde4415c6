"""The golden emulator's own emulations of ttnn ops WITHOUT a golden function
(test/ttnn_golden/experimental_ops.py), each checked on its own against an independent torch
composition or ttnn's golden of the equivalent op, so the emulator cannot agree with a wrong
model graph by construction; and the collectives' trace-safety contract (ccl.py): persistent
semaphores created once, cycled, Ring topology only on a FABRIC_1D_RING fabric.
All tests are host-only and take milliseconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ttnn  # noqa: E402

from ttnn_golden import experimental_ops as xo  # noqa: E402
from ttnn_golden.emulator import EmuTensor, GoldenTTNN  # noqa: E402


def _shards(n, shape=(1, 1, 3, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


# ---- collectives ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 8])
def test_reduce_scatter_is_sum_then_chunk_in_device_order(n):
    shards = _shards(n)
    out = xo.reduce_scatter_shards(shards, 3)
    total = torch.stack(shards).sum(0)
    w = 64 // n
    for i, o in enumerate(out):
        assert o.shape == (1, 1, 3, w)
        torch.testing.assert_close(o, total[..., i * w:(i + 1) * w])
    # ttnn's golden of the synchronous reduce_scatter composes the chips' outputs along dim 3
    ref = ttnn.get_golden_function(ttnn.reduce_scatter)(shards, 3, _ttnn_golden_mesh_shape=(1, n),
                                                         _ttnn_golden_mesh_shard_dims=(None, None))
    torch.testing.assert_close(torch.cat(out, 3), ref)


@pytest.mark.parametrize("n", [2, 8])
def test_all_gather_is_cat_in_device_order_on_every_chip(n):
    shards = _shards(n)
    out = xo.all_gather_shards(shards, 3)
    ref = ttnn.get_golden_function(ttnn.all_gather)(shards, 3, _ttnn_golden_mesh_shape=(1, n),
                                                    _ttnn_golden_mesh_shard_dims=(None, None))
    for o in out:
        torch.testing.assert_close(o, torch.cat(shards, 3))
        torch.testing.assert_close(o, ref)


def test_reduce_scatter_then_all_gather_is_an_all_reduce():
    shards = _shards(8)
    emu = GoldenTTNN(8)
    ref = emu.all_reduce(EmuTensor([s.clone() for s in shards]))  # ttnn's all_reduce golden
    out = xo.all_gather_shards(xo.reduce_scatter_shards(shards, 3), 3)
    for o, r in zip(out, ref.shards):
        torch.testing.assert_close(o, r)


def _open(emu, name):
    from openvla_model.backends.ttnn.ccl import fabric_config
    from openvla_model.backends.ttnn.mesh import MESH_SHAPES, Mesh

    emu.set_fabric_config(fabric_config(ttnn, name))
    shape = MESH_SHAPES[name]
    return Mesh(emu, name, emu.open_mesh_device(ttnn.MeshShape(*shape)), shape)


def test_async_collectives_demand_semaphores_and_a_ring_fabric_for_ring():
    emu = GoldenTTNN(2)
    emu.set_fabric_config(ttnn.FabricConfig.FABRIC_1D)
    dev = emu.open_mesh_device(ttnn.MeshShape(1, 2))
    x = emu.from_torch(torch.zeros(1, 1, 1, 64), device=dev, mesh_mapper=emu.ReplicateTensorToMesh(dev))
    sems = [emu.create_global_semaphore(dev, None, 0) for _ in range(3)]
    with pytest.raises(ValueError, match="3 semaphores"):
        emu.experimental.reduce_scatter_minimal_async(x, dim=3, multi_device_global_semaphore=sems[:2],
                                                      topology=ttnn.Topology.Linear)
    with pytest.raises(RuntimeError, match="FABRIC_1D_RING"):
        emu.experimental.all_gather_async(x, dim=3, multi_device_global_semaphore=sems[:2],
                                          topology=ttnn.Topology.Ring)
    y = emu.experimental.reduce_scatter_minimal_async(x, dim=3, multi_device_global_semaphore=sems,
                                                      topology=ttnn.Topology.Linear)
    assert y.shape == (1, 1, 1, 32)


@pytest.mark.parametrize("name,n,topology,fabric", [
    ("N300", 2, ttnn.Topology.Linear, ttnn.FabricConfig.FABRIC_1D),
    ("T3K", 8, ttnn.Topology.Ring, ttnn.FabricConfig.FABRIC_1D_RING)])
def test_ccl_semaphores_created_once_cycled_and_reset(name, n, topology, fabric):
    from openvla_model.backends.ttnn.ccl import CCL, SEMAPHORE_SETS, SEMAPHORES_PER_KIND

    emu = GoldenTTNN(n)
    mesh = _open(emu, name)
    assert emu.fabric == fabric
    ccl = CCL(emu, mesh)
    created = len(emu.semaphores)
    assert created == SEMAPHORE_SETS * sum(SEMAPHORES_PER_KIND.values())
    x = emu.from_torch(torch.randn(1, 1, 1, 8 * 32), device=mesh.device,
                       mesh_mapper=emu.ReplicateTensorToMesh(mesh.device))

    def run(k):
        start = len(emu.ccl_calls)
        for _ in range(k):
            ccl.all_reduce(x)
        return emu.ccl_calls[start:]

    first = run(3)
    assert len(emu.semaphores) == created  # nothing created per call
    assert all(c["topology"] == topology for c in first)
    # consecutive calls of one kind never share a semaphore (double buffering) ...
    for kind in ("reduce_scatter_minimal_async", "all_gather_async"):
        sems = [tuple(c["semaphores"]) for c in first if c["op"] == kind]
        assert all(a != b for a, b in zip(sems, sems[1:])), sems
    barriers = [c["barrier"] for c in first]
    assert all(a != b for a, b in zip(barriers, barriers[1:]))
    # ... and after reset() the same sequence comes back (what a captured trace replays)
    ccl.reset()
    again = run(3)
    strip = lambda calls: [(c["op"], tuple(c["semaphores"]), c["barrier"]) for c in calls]  # noqa: E731
    assert strip(again) == strip(first)
    out = ccl.all_reduce(x)
    torch.testing.assert_close(out.shards[0], x.shards[0] * n)


# ---- fused decode ops ----------------------------------------------------------------------------
def test_create_qkv_heads_decode_is_reshape_and_split():
    nh, nkv, d = 4, 2, 16
    x = torch.randn(1, 1, 1, (nh + 2 * nkv) * d)
    q, k, v = xo.create_qkv_heads_decode(x, nh, nkv)
    assert (q.shape, k.shape, v.shape) == ((1, 1, nh, d), (1, 1, nkv, d), (1, 1, nkv, d))
    row = x.reshape(-1)
    # head h of Q is columns [h*d, (h+1)*d) of the fused row, then K's heads, then V's
    for h in range(nh):
        torch.testing.assert_close(q[0, 0, h], row[h * d:(h + 1) * d])
    for h in range(nkv):
        torch.testing.assert_close(k[0, 0, h], row[(nh + h) * d:(nh + h + 1) * d])
        torch.testing.assert_close(v[0, 0, h], row[(nh + nkv + h) * d:(nh + nkv + h + 1) * d])


def test_rotary_embedding_hf_decode_equals_transformers_apply_rotary_pos_emb():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    heads, d, pos = 4, 64, 37
    cfg = LlamaConfig(hidden_size=heads * d, num_attention_heads=heads, rope_theta=10000.0)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.tensor([[pos]]))  # (1, 1, d)
    q = torch.randn(1, heads, 1, d)  # HF layout (batch, heads, seq, d)
    k = torch.randn(1, heads, 1, d)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    # ttnn decode layout: [seq=1, batch, heads, d]; cos/sin [1, batch, 1, d]
    c, s = cos.reshape(1, 1, 1, d), sin.reshape(1, 1, 1, d)
    got_q = xo.rotary_hf_decode(q.permute(2, 0, 1, 3), c, s)
    got_k = xo.rotary_hf_decode(k.permute(2, 0, 1, 3), c, s)
    torch.testing.assert_close(got_q, want_q.permute(2, 0, 1, 3))
    torch.testing.assert_close(got_k, want_k.permute(2, 0, 1, 3))


def test_concat_heads_decode_is_the_inverse_reshape_padded_to_a_tile_of_rows():
    nh, d = 4, 16
    o = torch.randn(1, 1, nh, d)  # [S, B=1, heads, d]
    out = xo.concat_heads_decode(o, nh)
    assert out.shape == (1, 1, 32, nh * d)
    torch.testing.assert_close(out[0, 0, 0], o.reshape(-1))
    assert not out[0, 0, 1:].any()
    # heads -> concat -> the padded view back to one row is the identity on the attention output
    row = xo.padded_view(out, (1, 1, 1, nh * d), (1, 1, 32, nh * d))
    torch.testing.assert_close(row, o.reshape(1, 1, 1, nh * d))


def test_multiply_golden_applies_the_fused_silu_to_a_only():
    a, b = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    got = ttnn.get_golden_function(ttnn.multiply)(a, b, input_tensor_a_activations=[ttnn.UnaryOpType.SILU])
    torch.testing.assert_close(got, torch.nn.functional.silu(a) * b)


def test_fused_decode_graph_runs_its_ops_and_gives_the_legacy_graphs_tokens(tiny_weights, tiny_policy):
    """Default profile = fused decode graph; the legacy graph (decode_graph: legacy) and torch agree."""
    import numpy as np

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    px = tiny_policy.preprocessor((np.random.RandomState(7).rand(224, 224, 3) * 255).astype(np.uint8))
    ids = tiny_policy.prompt_ids("stack the blocks")
    want, _ = tiny_policy.backend.generate(px, ids, 7)
    got = {}
    for graph in ("fused", "legacy"):
        emu = GoldenTTNN(2)
        be = TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device="N300", tt=emu, cache_dir=None,
                         trace=False, profile_overrides={"decode_graph": graph})
        try:
            assert be.describe()["decode_graph"] == graph
            got[graph] = be.generate(px, ids, 7)[0].tolist()
        finally:
            be.close()
        fused_ops = ("nlp_create_qkv_heads_decode", "rotary_embedding_hf", "nlp_concat_heads_decode")
        ran = [emu.ops_run.get(op, 0) for op in fused_ops]
        layers = tiny_policy.config.llm.num_hidden_layers
        # 6 decode steps x layers: heads 1, rope 2, concat 1 per layer
        assert ran == ([6 * layers, 12 * layers, 6 * layers] if graph == "fused" else [0, 0, 0]), (graph, ran)
    assert got["fused"] == got["legacy"] == want.tolist()


def test_fused_decode_step_logits_equal_the_legacy_graphs(tiny_weights, tiny_policy):
    """Tokens are a coarse check: one decode step's full logits from the fused graph must equal
    the legacy graph's (whose RoPE layout has its own negative control in test_ttnn_golden.py)
    at a position past the first tile, with the same KV cache contents."""
    import numpy as np

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    px = tiny_policy.preprocessor((np.random.RandomState(3).rand(224, 224, 3) * 255).astype(np.uint8))
    ids = tiny_policy.prompt_ids("wipe the table")
    logits = {}
    for graph in ("fused", "legacy"):
        be = TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device="N300", tt=GoldenTTNN(2),
                         cache_dir=None, trace=False, profile_overrides={"decode_graph": graph})
        try:
            tokens, _ = be.generate(px, ids, 3)  # prefill + 2 decode steps written to the KV cache
            length = be.llm.sequence_length(len(ids), be.vision.num_patches)
            be.llm.set_step_inputs(int(tokens[-1]), length + 2)
            logits[graph] = be.llm.logits_to_torch(be.llm.decode_step())
        finally:
            be.close()
    scale = logits["legacy"].abs().max()
    diff = (logits["fused"] - logits["legacy"]).abs().max()
    assert diff <= 1e-5 * scale, diff


# ---- device-side feedback of the decode steps (one trace per action) -----------------------------
def _ids_tensor(emu, values, dtype):
    t = torch.tensor(values, dtype=torch.int32)
    return emu.from_torch(t, dtype=dtype, layout=ttnn.ROW_MAJOR_LAYOUT, device=object(),
                          mesh_mapper=emu.ReplicateTensorToMesh(emu.open_mesh_device((1, 1))))


def test_argmax_into_a_preallocated_output_tensor_equals_torch_argmax():
    """ttnn.argmax(..., output_tensor=buf) writes its result into buf (its golden ignores
    output_tensor): the emulation must leave torch.argmax's index in buf on every chip, return
    buf itself, and refuse a buffer of another shape, as the device op does."""
    emu = GoldenTTNN(2)
    mesh = emu.open_mesh_device((1, 1))
    logits = torch.randn(1, 1, 1, 97, generator=torch.Generator().manual_seed(4))
    x = emu.from_torch(logits, dtype=ttnn.bfloat16, device=mesh, mesh_mapper=emu.ReplicateTensorToMesh(mesh))
    buf = _ids_tensor(emu, [[[0]]], ttnn.uint32)
    shard = buf.shards[0]
    out = emu.argmax(x, dim=3, output_tensor=buf)
    assert out is buf and buf.shards[0] is shard  # written in place, same buffer
    assert int(buf.shards[0].reshape(-1)[0]) == int(torch.argmax(logits, dim=3).reshape(-1)[0])
    with pytest.raises(ValueError, match="output_tensor"):
        emu.argmax(x, dim=3, output_tensor=_ids_tensor(emu, [[0]], ttnn.uint32))


def test_plus_one_increments_position_tensors_in_place_like_torch():
    """ttnn.plus_one increments its input in place (tt-metal's test_plus_one.py reads the input
    tensor back after the call): both position tensors of the decode, int32 (1,) and uint32 (1, 1)."""
    emu = GoldenTTNN(1)
    for values, dtype in (([287], ttnn.int32), ([[287]], ttnn.uint32)):
        t = _ids_tensor(emu, values, dtype)
        before = t.shards[0].clone()
        emu.plus_one(t)
        emu.plus_one(t)
        torch.testing.assert_close(t.shards[0], before + 2)


def test_emulated_trace_replays_on_the_captured_buffers_and_refuses_host_transfers():
    """TracingGoldenTTNN: a replay re-runs the recorded ops on the SAME tensors (an input changed
    in place after capture is seen; a position advanced in the trace keeps advancing), results
    land in the captured result objects, and a host transfer inside a capture raises."""
    from ttnn_golden.trace import TracingGoldenTTNN

    emu = TracingGoldenTTNN(2)
    mesh = emu.open_mesh_device((1, 1))
    rep = emu.ReplicateTensorToMesh(mesh)
    a = emu.from_torch(torch.ones(1, 1, 1, 8), dtype=ttnn.bfloat16, device=mesh, mesh_mapper=rep)
    pos = _ids_tensor(emu, [5], ttnn.int32)
    tid = emu.begin_trace_capture(mesh)
    out = emu.add(a, a)
    emu.plus_one(pos)
    emu.end_trace_capture(mesh, tid)
    emu.copy_host_to_device_tensor(emu.from_torch(torch.full((1, 1, 1, 8), 3.0), mesh_mapper=rep), a)
    emu.execute_trace(mesh, tid)
    for s in out.shards:
        torch.testing.assert_close(s, torch.full((1, 1, 1, 8), 6.0))
    assert int(pos.shards[0][0]) == 7  # once while capturing (the emulator runs what it records) + replay
    tid2 = emu.begin_trace_capture(mesh)
    with pytest.raises(RuntimeError, match="host transfer"):
        emu.to_torch(emu.get_device_tensors(out)[0])
    emu.end_trace_capture(mesh, tid2)


# ---- heads ops of prefill-style attention (vision) -----------------------------------------------
def test_create_qkv_heads_splits_the_fused_rows_head_by_head():
    """nlp_create_qkv_heads' emulation against an index-by-index composition: head h of Q at row
    s is columns [h*d, (h+1)*d) of row s, then the K heads, then the V heads; K transposed to
    [B, nkv, d, S] by default, not with transpose_k_heads=False."""
    b, s, nh, nkv, d = 1, 5, 3, 2, 8
    x = torch.randn(b, 1, s, (nh + 2 * nkv) * d, generator=torch.Generator().manual_seed(1))
    q, k, v = xo.create_qkv_heads(x, nh, nkv, transpose_k_heads=False)
    assert (q.shape, k.shape, v.shape) == ((b, nh, s, d), (b, nkv, s, d), (b, nkv, s, d))
    for r in range(s):
        for h in range(nh):
            torch.testing.assert_close(q[0, h, r], x[0, 0, r, h * d:(h + 1) * d])
        for h in range(nkv):
            torch.testing.assert_close(k[0, h, r], x[0, 0, r, (nh + h) * d:(nh + h + 1) * d])
            torch.testing.assert_close(v[0, h, r], x[0, 0, r, (nh + nkv + h) * d:(nh + nkv + h + 1) * d])
    _, kt, _ = xo.create_qkv_heads(x, nh, nkv)  # the op's default: K transposed
    torch.testing.assert_close(kt, k.transpose(-2, -1))
    with pytest.raises(ValueError, match="nlp_create_qkv_heads"):
        xo.create_qkv_heads(x[..., :-1], nh, nkv)


def test_concat_heads_puts_head_h_at_columns_h_times_d():
    """nlp_concat_heads' emulation against an index-by-index composition, and the inverse of the
    heads split: [B, heads, S, d] -> [B, 1, S, heads*d]."""
    b, h, s, d = 1, 4, 3, 8
    o = torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(2))
    out = xo.concat_heads(o)
    assert out.shape == (b, 1, s, h * d)
    for r in range(s):
        for j in range(h):
            torch.testing.assert_close(out[0, 0, r, j * d:(j + 1) * d], o[0, j, r])
    fused = torch.cat([out, out, out], dim=-1)  # [Q | K | V] with the same heads
    q, _, _ = xo.create_qkv_heads(fused, h, h, transpose_k_heads=False)
    torch.testing.assert_close(q, o)


def test_clone_emulation_copies_like_the_device_op():
    """ttnn.clone's golden returns its input object; the device op writes a new buffer. The
    emulation must give ttnn's golden values in NEW storage: an in-place write to the input
    afterwards (what a trace replay does) leaves the clone unchanged."""
    emu = GoldenTTNN(2)
    emu.set_fabric_config(ttnn.FabricConfig.FABRIC_1D)
    mesh = emu.open_mesh_device((1, 2))
    x = emu.from_torch(torch.randn(1, 1, 4, 32), dtype=ttnn.bfloat16, device=mesh,
                       mesh_mapper=emu.ReplicateTensorToMesh(mesh))
    c = emu.clone(x)
    want = [ttnn.get_golden_function(ttnn.clone)(s).clone() for s in x.shards]
    for s in x.shards:
        s.add_(1.0)
    for got, w in zip(c.shards, want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_copy_emulation_writes_into_its_second_tensor_in_place():
    """ttnn.copy(a, b) writes a into b in place (its docstring; its golden only returns the
    value): b's own storage holds a's values afterwards, b is returned, shapes must match."""
    emu = GoldenTTNN(2)
    emu.set_fabric_config(ttnn.FabricConfig.FABRIC_1D)
    mesh = emu.open_mesh_device((1, 2))
    rep = emu.ReplicateTensorToMesh(mesh)
    a = emu.from_torch(torch.randn(1, 1, 4, 32), dtype=ttnn.bfloat16, device=mesh, mesh_mapper=rep)
    b = emu.from_torch(torch.zeros(1, 1, 4, 32), dtype=ttnn.bfloat16, device=mesh, mesh_mapper=rep)
    storage = [s for s in b.shards]
    assert emu.copy(a, b) is b
    for got, src, want in zip(b.shards, storage, a.shards):
        assert got is src
        torch.testing.assert_close(got, ttnn.get_golden_function(ttnn.copy)(want, got), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shapes"):
        emu.copy(a, emu.from_torch(torch.zeros(1, 1, 2, 32), device=mesh, mesh_mapper=rep))


def test_paged_update_cache_writes_each_users_row_at_its_own_position():
    """Batched decode: user b's K/V row lands in cache row b at position pos[b] (a negative
    position leaves the user's cache alone), checked against plain indexing; a batch that differs
    from the cache's is refused as the device op refuses it."""
    emu = GoldenTTNN(2)
    emu.set_fabric_config(ttnn.FabricConfig.FABRIC_1D)
    mesh = emu.open_mesh_device((1, 2))
    rep = emu.ReplicateTensorToMesh(mesh)
    users, heads, seq, d = 4, 2, 16, 8
    cache0 = torch.randn(users, heads, seq, d)
    cache = emu.from_torch(cache0.clone(), device=mesh, mesh_mapper=rep)
    update = torch.randn(1, users, heads, d)  # decode layout [1, batch, heads, d]
    pos = torch.tensor([3, 0, -1, 15], dtype=torch.int32)
    emu.experimental.paged_update_cache(cache, emu.from_torch(update, device=mesh, mesh_mapper=rep),
                                        update_idxs_tensor=emu.from_torch(pos, device=mesh, mesh_mapper=rep))
    want = cache0.clone()
    for b, p in enumerate(pos.tolist()):
        if p >= 0:
            want[b, :, p, :] = update[0, b]
    for shard in cache.shards:
        torch.testing.assert_close(shard, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cache batch"):
        emu.experimental.paged_update_cache(
            cache, emu.from_torch(update[:, :2], device=mesh, mesh_mapper=rep),
            update_idxs_tensor=emu.from_torch(pos[:2], device=mesh, mesh_mapper=rep))


# ---- batched vision (issue 14): the heads ops and SDPA with a batch of images ----------------------
def test_heads_ops_keep_the_items_of_a_batch_apart():
    """nlp_create_qkv_heads / nlp_concat_heads on [B, 1, S, W] with B = 3 against an
    index-by-index composition per item: item b's heads come from item b's rows only."""
    b, s, nh, d = 3, 4, 2, 8
    x = torch.randn(b, 1, s, 3 * nh * d, generator=torch.Generator().manual_seed(3))
    q, k, v = xo.create_qkv_heads(x, nh, nh, transpose_k_heads=False)
    assert q.shape == k.shape == v.shape == (b, nh, s, d)
    for i in range(b):
        for r in range(s):
            for h in range(nh):
                for j, t in enumerate((q, k, v)):
                    col = (j * nh + h) * d
                    torch.testing.assert_close(t[i, h, r], x[i, 0, r, col:col + d], rtol=0, atol=0)
    out = xo.concat_heads(q)
    assert out.shape == (b, 1, s, nh * d)
    for i in range(b):
        for r in range(s):
            for h in range(nh):
                torch.testing.assert_close(out[i, 0, r, h * d:(h + 1) * d], q[i, h, r], rtol=0, atol=0)


def test_sdpa_broadcasts_a_batch_one_mask_and_refuses_what_the_device_refuses():
    """Prefill SDPA with Q/K/V [B, heads, S, d], B = 3: a (1, 1, S, S) additive mask applies to
    every item, a (B, 1, S, S) one per item, each equal to softmax(q k^T scale + mask) v computed
    item by item; a mask whose batch (or heads) is neither 1 nor Q's is refused, as ttnn 0.81.1
    refuses it ("Mask batch dim must either be 1 ... or must match Q batch dimension"), including
    a mask of batch 3 over a Q of batch 1 that torch would silently broadcast."""
    emu = GoldenTTNN(2)
    emu.set_fabric_config(ttnn.FabricConfig.FABRIC_1D)
    mesh = emu.open_mesh_device((1, 2))
    rep = emu.ReplicateTensorToMesh(mesh)
    g = torch.Generator().manual_seed(4)
    b, h, s, d, scale = 3, 2, 6, 8, 0.3
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    masks = {"shared": torch.zeros(1, 1, s, s), "per_item": torch.zeros(b, 1, s, s)}
    masks["shared"][..., 4:] = -1e9
    for i in range(b):
        masks["per_item"][i, ..., s - 1 - i:] = -1e9
    dev = lambda t: emu.from_torch(t, device=mesh, mesh_mapper=rep)  # noqa: E731
    for name, mask in masks.items():
        got = emu.transformer.scaled_dot_product_attention(dev(q), dev(k), dev(v), attn_mask=dev(mask),
                                                           is_causal=False, scale=scale)
        for i in range(b):
            m = mask[i if mask.shape[0] == b else 0, 0]
            want = torch.softmax(q[i] @ k[i].transpose(-1, -2) * scale + m, dim=-1) @ v[i]
            for shard in got.shards:
                torch.testing.assert_close(shard[i], want, rtol=1e-5, atol=1e-5, msg=f"{name} item {i}")
    with pytest.raises(ValueError, match="mask"):
        emu.transformer.scaled_dot_product_attention(dev(q[:1]), dev(k[:1]), dev(v[:1]),
                                                     attn_mask=dev(masks["per_item"]), is_causal=False, scale=scale)
    with pytest.raises(ValueError, match="mask"):
        emu.transformer.scaled_dot_product_attention(dev(q), dev(k), dev(v), attn_mask=dev(torch.zeros(1, 3, s, s)),
                                                     is_causal=False, scale=scale)
