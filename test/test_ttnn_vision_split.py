"""TT-NN vision split across the chips (issue 12 item 4), checked through the golden emulator.

Each chip runs ONE tower (N300: DINOv2 on chip 0, SigLIP on chip 1; T3K: chips 0-3 / 4-7) as one
op sequence over tower-sharded weights; the towers' differences (width, heads, head dim, MLP,
depth, prefix rows) are absorbed by weight transforms (model/backends/ttnn/vision.py). These
tests use towers that differ MORE than the tiny checkpoint's (other depths, other head counts),
so every transform is exercised: per-tower features and the projector must equal torch's, each
chip must hold its own tower's weights and run one tower's ops only, and the traced vision
stage must replay a new image from the preallocated input with no host transfer but the upload.
Batched (issue 14): B images in one call give each image its own features and projector output
(equal to the image alone and to torch's), on 1x2 and 1x8, and the traced stage keeps one trace
per batch size.
Host-only (float32 emulator); seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ttnn  # noqa: E402,F401  (a required dependency of the venv)

MESHES = {"N300": 2, "T3K": 8}
# DINOv2-like: 2 heads of 32, 3 blocks run (depth 4); SigLIP-like: 4 heads of 36 (head dim padded
# to 64), 4 blocks run (depth 5): other widths, head counts, head dims, MLP widths and depths.
SPLIT_TIMM_KWARGS = [
    {"embed_dim": 64, "depth": 4, "num_heads": 2},
    {"embed_dim": 144, "depth": 5, "num_heads": 4, "mlp_ratio": 3.0},
]
MAX_ABS = 1e-5  # float32 emulator vs float32 torch (measured ~2e-6)


@pytest.fixture(scope="module")
def split_ckpt(tmp_path_factory):
    """A tiny checkpoint whose towers differ in depth and head count (module-level kwargs swapped
    only while it is written)."""
    from openvla_model import tiny_checkpoint

    old = tiny_checkpoint.TINY_TIMM_KWARGS
    tiny_checkpoint.TINY_TIMM_KWARGS = SPLIT_TIMM_KWARGS
    try:
        return tiny_checkpoint.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_split"), seed=3)
    finally:
        tiny_checkpoint.TINY_TIMM_KWARGS = old


@pytest.fixture(scope="module")
def torch_modules(split_ckpt):
    from openvla_model.backends.torch_backend import load_modules
    from openvla_model.checkpoint import Checkpoint
    from openvla_model.config import load_config

    config = load_config(split_ckpt)
    return config, load_modules(config, Checkpoint(split_ckpt), torch.device("cpu"), torch.float32)


def _vision(emu, mesh_name, ckpt, config, trace=False):
    """FusedVision + Projector on an emulated mesh (no LM: seconds)."""
    from openvla_model.backends.ttnn.ccl import fabric_config
    from openvla_model.backends.ttnn.mesh import MESH_SHAPES, Mesh
    from openvla_model.backends.ttnn.model_config import load_profile
    from openvla_model.backends.ttnn.projector import Projector
    from openvla_model.backends.ttnn.vision import FusedVision
    from openvla_model.backends.ttnn.weights import WeightStore
    from openvla_model.checkpoint import Checkpoint

    emu.set_fabric_config(fabric_config(ttnn, mesh_name))
    shape = MESH_SHAPES[mesh_name]
    mesh = Mesh(emu, mesh_name, emu.open_mesh_device(ttnn.MeshShape(*shape)), shape)
    profile = load_profile(mesh_name)
    store = WeightStore(emu, mesh, Checkpoint(ckpt), profile, cache_dir=None)
    vision = FusedVision(emu, mesh, profile, store, config, trace=trace)
    return vision, Projector(emu, mesh, profile, store, vision.feature_layout, vision.dim)


def _pixels(seed):
    return torch.randn(1, 6, 224, 224, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _reference(modules, px):
    dino, sig = modules.featurizer(px[:, :3]), modules.fused_featurizer(px[:, 3:])
    return dino[0], sig[0], modules.projector(torch.cat([dino, sig], 2))[0]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_each_chip_runs_its_tower_and_the_features_equal_torchs(split_ckpt, torch_modules, mesh):
    """Towers of different depth, width, head count, head dim and MLP width. Chip i holds the
    weights of tower i // (N/2) (DINOv2 first) and nothing of the other tower; the stage runs ONE
    tower's op sequence per chip (as many blocks as the deeper tower, not the sum: the replicated
    design ran both on every chip), heads split and merged by the heads ops, one all-gather; every
    chip ends with the same gathered features, both towers' features and the projector output
    equal torch's."""
    from ttnn_golden.emulator import GoldenTTNN

    config, modules = torch_modules
    n = MESHES[mesh]
    emu = GoldenTTNN(n)
    vision, projector = _vision(emu, mesh, split_ckpt, config)
    assert [s.num_blocks_run for s in vision.specs] == [3, 4] and vision.num_blocks == 4
    towers = (modules.featurizer.vit, modules.fused_featurizer.vit)
    bias = vision.blocks[0]["n1b"]  # LayerNorm bias of block 0: the tower's own values, zero-padded
    for i, shard in enumerate(bias.shards):
        own = towers[i // (n // 2)].blocks[0].norm1.bias.detach()
        got = shard.reshape(-1)
        torch.testing.assert_close(got[:own.numel()], own, rtol=0, atol=0)
        assert not got[own.numel():].any()

    px = _pixels(1)
    before = dict(emu.ops_run)
    feats = vision(px)
    ran = {k: v - before.get(k, 0) for k, v in emu.ops_run.items() if v != before.get(k, 0)}
    assert ran["layer_norm"] == 2 * vision.num_blocks, ran  # emulated once per call, run on every chip
    assert ran["sdpa"] == ran["nlp_create_qkv_heads"] == ran["nlp_concat_heads"] == vision.num_blocks, ran
    assert ran.get("reshape", 0) == ran.get("permute", 0) == 0, ran  # no tiled reshape / permute per block
    assert ran.get("all_gather_async", 0) == 1, ran

    for s in feats.shards[1:]:
        torch.testing.assert_close(s, feats.shards[0], rtol=0, atol=0)
    dino, sig = vision.tower_features(feats)
    want_dino, want_sig, want_proj = _reference(modules, px)
    assert dino.shape[1:] == want_dino.shape and sig.shape[1:] == want_sig.shape
    assert float((dino[0] - want_dino).abs().max()) < MAX_ABS * max(1.0, float(want_dino.abs().max()))
    assert float((sig[0] - want_sig).abs().max()) < MAX_ABS * max(1.0, float(want_sig.abs().max()))
    proj = projector(feats).shards[0].reshape(want_proj.shape)
    assert float((proj - want_proj).abs().max()) < MAX_ABS * max(1.0, float(want_proj.abs().max()))


def test_traced_vision_replays_a_new_image_with_one_upload(split_ckpt, torch_modules):
    """trace=True: the first call runs the stage and captures it (TracingGoldenTTNN refuses any
    host transfer while capturing); later calls write the patches into the preallocated input and
    replay: each replay gives torch's features for ITS image, with one host write and no read,
    and the features of the last FEATURE_BUFFERS calls stay valid (copies in buffers allocated
    before the capture: a later replay does not overwrite them).
    (N300 only: the trace mechanism does not depend on the mesh, the split is checked above.)"""
    from ttnn_golden.trace import TracingGoldenTTNN

    config, modules = torch_modules
    emu = TracingGoldenTTNN(2)
    vision, _ = _vision(emu, "N300", split_ckpt, config, trace=True)
    seeds = (5, 6, 7, 8, 9)
    refs = {seed: _reference(modules, _pixels(seed)) for seed in seeds}
    outs = []
    for seed in seeds:
        before = dict(emu.host_io)
        feats = vision(_pixels(seed))
        io = {k: emu.host_io[k] - before[k] for k in before}
        if seed != 5:
            assert io == {"write": 1, "read": 0}, io
        outs.append(feats)
        dino, sig = vision.tower_features(feats)
        want_dino, want_sig, _ = refs[seed]
        assert float((dino[0] - want_dino).abs().max()) < MAX_ABS * max(1.0, float(want_dino.abs().max())), seed
        assert float((sig[0] - want_sig).abs().max()) < MAX_ABS * max(1.0, float(want_sig.abs().max())), seed
    assert len(emu.traces) == 1 and emu.replays == len(seeds) - 1
    # each replay's features are copied into one of FEATURE_BUFFERS buffers allocated before the
    # capture, used in turn: the last FEATURE_BUFFERS calls' features all stay intact
    from openvla_model.backends.ttnn.vision import FEATURE_BUFFERS

    kept = outs[-FEATURE_BUFFERS:]
    assert len({id(t) for t in kept}) == FEATURE_BUFFERS and outs[-1] is outs[-1 - FEATURE_BUFFERS]
    for seed, feats in zip(seeds[-FEATURE_BUFFERS:], kept):
        dino, _ = vision.tower_features(feats)
        want_dino = refs[seed][0]
        assert float((dino[0] - want_dino).abs().max()) < MAX_ABS * max(1.0, float(want_dino.abs().max())), seed
    names = [name for name, *_ in next(iter(emu.traces.values()))]
    assert "experimental.all_gather_async" in names and "reshape" not in names and "permute" not in names
    vision.release()
    assert not emu.traces


def test_projector_fc1_rows_follow_the_gathered_layout():
    """fc1_rows puts tower j's rows at its offset, scaled, zero rows elsewhere: x_gathered @ fc1'
    equals timm features @ fc1 when x_gathered holds tower j's features / scale at its offset."""
    from openvla_model.backends.ttnn.projector import fc1_rows

    g = torch.Generator().manual_seed(0)
    e0, e1, width, out = 5, 7, 8, 3
    w = torch.randn(e0 + e1, out, generator=g)
    f0, f1 = torch.randn(2, e0, generator=g), torch.randn(2, e1, generator=g)
    s = 1.25
    layout = [(0, e0, 1 / s), (width, e1, 1.0)]
    gathered = torch.randn(2, 2 * width, generator=g)  # the extra columns hold anything
    gathered[:, :e0] = f0 * s
    gathered[:, width:width + e1] = f1
    torch.testing.assert_close(gathered @ fc1_rows(w, layout, 2 * width), torch.cat([f0, f1], 1) @ w)
    with pytest.raises(ValueError, match="input rows"):
        fc1_rows(w[:-1], layout, 2 * width)


# ---- batched vision (issue 14: one accelerator, several robots) ------------------------------------
TIGHT = 1e-6  # batched vs one image alone: the same float32 host math per item (measured 0)


def _close(got, want, tol, what):
    err = float((got - want).abs().max())
    assert err <= tol * max(1.0, float(want.abs().max())), f"{what}: max abs error {err}"


@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_batched_vision_gives_each_image_its_own_features(split_ckpt, torch_modules, mesh, batch):
    """pixel_values (B, 6, H, W) of B different images: ONE op sequence for the batch (the ops of
    B = 1 plus the one concat that repeats the prefix rows per item; one all-gather), the gathered
    features (B, 1, 256, dim) on every chip; item b's features, per-tower host copies and
    projector output equal image b's alone (B = 1, tight) and torch's (as the B = 1 test)."""
    from ttnn_golden.emulator import GoldenTTNN

    config, modules = torch_modules
    emu = GoldenTTNN(MESHES[mesh])
    vision, projector = _vision(emu, mesh, split_ckpt, config)
    seeds = [11 + i for i in range(batch)]
    px = torch.cat([_pixels(s) for s in seeds])

    def ops_of(call):
        before = dict(emu.ops_run)
        out = call()
        return out, {k: v - before.get(k, 0) for k, v in emu.ops_run.items() if v != before.get(k, 0)}

    feats, ran = ops_of(lambda: vision(px))
    assert feats.shape == (batch, 1, vision.num_patches, vision.dim)
    for s in feats.shards[1:]:
        torch.testing.assert_close(s, feats.shards[0], rtol=0, atol=0)
    dino, sig = vision.tower_features(feats)
    assert dino.shape == (batch, vision.num_patches, 64) and sig.shape == (batch, vision.num_patches, 144)
    proj, ran_proj = ops_of(lambda: projector(feats))
    assert proj.shape == (batch, 1, vision.num_patches, config.llm.hidden_size)
    assert ran_proj == {"linear": 3, "gelu": 2}, ran_proj  # row-wise over all items at once

    for b, seed in enumerate(seeds):
        alone, ran_one = ops_of(lambda: vision(px[b:b + 1]))
        assert alone.shape == (1, 1, vision.num_patches, vision.dim)
        one_dino, one_sig = vision.tower_features(alone)
        _close(dino[b], one_dino[0], TIGHT, f"item {b} DINOv2 vs alone")
        _close(sig[b], one_sig[0], TIGHT, f"item {b} SigLIP vs alone")
        _close(proj.shards[0][b], projector(alone).shards[0][0], TIGHT, f"item {b} projector vs alone")
        want_dino, want_sig, want_proj = _reference(modules, _pixels(seed))
        _close(dino[b], want_dino, MAX_ABS, f"item {b} DINOv2 vs torch")
        _close(sig[b], want_sig, MAX_ABS, f"item {b} SigLIP vs torch")
        _close(proj.shards[0][b].reshape(want_proj.shape), want_proj, MAX_ABS, f"item {b} projector vs torch")
    # the batch's op sequence is B = 1's (no loop over items) plus the prefix rows' repeat
    assert ran == {**ran_one, "concat": ran_one.get("concat", 0) + 1}, (ran, ran_one)
    with pytest.raises(ValueError, match="pixel_values must be"):
        vision(px[0])
    with pytest.raises(ValueError, match="pixel_values must be"):
        vision(px[:, :3])


def test_traced_vision_captures_one_trace_per_batch_size(split_ckpt, torch_modules):
    """trace=True with batch sizes 1, 2, 1, 2, 1: the first call of each batch size captures its
    own trace (its own preallocated input, its own FEATURE_BUFFERS output copies), every later
    call replays THAT trace with one host write and no read, and gives each item torch's
    features for its image, B = 2 after B = 1 and B = 1 again after B = 2. Features a B = 1 call
    handed out stay intact across the B = 2 calls after it. release() releases every trace."""
    from openvla_model.backends.ttnn.vision import FEATURE_BUFFERS
    from ttnn_golden.trace import TracingGoldenTTNN

    config, modules = torch_modules
    emu = TracingGoldenTTNN(2)
    vision, _ = _vision(emu, "N300", split_ckpt, config, trace=True)
    calls = [(21,), (22, 23), (24,), (25, 26), (27,), (28, 29)]
    refs = {seed: _reference(modules, _pixels(seed)) for c in calls for seed in c}
    first_b1 = None
    tid_of = {}
    for i, seeds in enumerate(calls):
        batch = len(seeds)
        before, replays = dict(emu.host_io), emu.replays
        feats = vision(torch.cat([_pixels(s) for s in seeds]))
        io = {k: emu.host_io[k] - before[k] for k in before}
        if batch in tid_of:  # a replay of this batch size's trace
            assert io == {"write": 1, "read": 0}, (seeds, io)
            assert emu.replays == replays + 1 and emu.replayed[-1] == tid_of[batch], (seeds, emu.replayed)
        else:  # first call of this batch size: op by op, then captured (no replay)
            assert emu.replays == replays and len(emu.traces) == len(tid_of) + 1
            tid_of[batch] = max(emu.traces)
        assert feats.shape[0] == batch
        dino, sig = vision.tower_features(feats)
        for b, seed in enumerate(seeds):
            _close(dino[b], refs[seed][0], MAX_ABS, f"call {i} item {b} DINOv2")
            _close(sig[b], refs[seed][1], MAX_ABS, f"call {i} item {b} SigLIP")
        if i == 2:
            first_b1 = feats  # the B = 1 replay's features, checked again after the B = 2 replay
    assert sorted(tid_of) == [1, 2] and len(emu.traces) == 2 and tid_of[1] != tid_of[2]
    assert emu.replayed == [tid_of[1], tid_of[2], tid_of[1], tid_of[2]]
    # kept since: one B = 1 call (another of its FEATURE_BUFFERS copies) and two B = 2 replays (their own copies)
    assert FEATURE_BUFFERS >= 2
    _close(vision.tower_features(first_b1)[0][0], refs[24][0], MAX_ABS, "B = 1 features after B = 2 replays")
    for tid in tid_of.values():
        names = [name for name, *_ in emu.traces[tid]]
        assert "experimental.all_gather_async" in names and names.count("transformer.scaled_dot_product_attention") \
            == vision.num_blocks
    vision.release()
    assert not emu.traces
    vision.release()  # idempotent
