"""OpenVLA-OFT on the torch CPU reference, on tiny random OFT checkpoints (docs/oft.md).

The pass is compared with an independent composition written here from the official semantics
(moojink/openvla-oft modeling_prismatic.predict_action, action_heads.py, projectors.py,
openvla_utils.py and the transformers fork's bidirectional SDPA attention): the sequence, the
mask, the proprio token, the head and the un-normalisation are built by hand from the files on
disk, and the HF Llama decoder layers are called one by one.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openvla_model.errors import CheckpointError, ConfigError, InputError, OpenVLAError

HERE = Path(__file__).resolve().parent
INSTRUCTION = "put the red cup on the plate"


# -- checkpoints -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory) -> Path:
    """Tiny OFT checkpoint: HF files + action head + proprio projector (`module.` prefixed) + stats."""
    from openvla_model.oft_checkpoint import write_tiny_oft_checkpoint

    return write_tiny_oft_checkpoint(tmp_path_factory.mktemp("tiny_oft"), seed=0)


def variant(oft_dir: Path, dest: Path, drop=(), add: dict | None = None) -> Path:
    """The checkpoint with its HF files linked, component .pt files dropped or replaced."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in oft_dir.iterdir():
        if f.name.endswith("_checkpoint.pt"):
            if not any(f.name.startswith(d + "--") for d in drop):
                shutil.copy(f, dest / f.name)
        else:
            os.symlink(f, dest / f.name)
    for name, state in (add or {}).items():
        torch.save(state, dest / name)
    return dest


@pytest.fixture(scope="module")
def no_proprio_dir(oft_dir, tmp_path_factory) -> Path:
    return variant(oft_dir, tmp_path_factory.mktemp("oft_noproprio"), drop=("proprio_projector",))


@pytest.fixture(scope="module")
def policy(oft_dir):
    from openvla_model.oft_policy import load_oft_policy

    p = load_oft_policy(oft_dir, device="cpu", dtype="float32")
    yield p
    p.close()


@pytest.fixture(scope="module")
def policy_no_proprio(no_proprio_dir):
    from openvla_model.oft_policy import load_oft_policy

    p = load_oft_policy(no_proprio_dir, device="cpu", dtype="float32")
    yield p
    p.close()


def pt_state(path: Path) -> dict:
    """A component .pt as the official loader reads it: weights_only, `module.` stripped."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k[len("module."):] if k.startswith("module.") else k: v.float() for k, v in sd.items()}


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


# -- the independent composition -----------------------------------------------------------------------
def reference_pass(policy, images, proprio_raw, *, causal: bool = False, zero_placeholders: bool = True,
                   return_all: bool = False):
    """Official semantics, by hand. Returns (action-row hidden states (56, H), LM logits of those rows)."""
    m = policy.model.modules
    llm = m.llm
    d = Path(policy.weights_path)
    stats = json.loads((d / "dataset_statistics.json").read_text())
    (key,) = stats
    chunk, adim = 8, 7  # LIBERO: 7-dim actions and 8-dim proprio in the statistics
    with torch.no_grad():
        # vision: each image separately, its 256 fused patches, images concatenated along the sequence
        patches = []
        for img in images:
            px = policy.preprocessor(img)  # (1, 6, 224, 224): the shared processor (tested elsewhere)
            feats = torch.cat([m.featurizer(px[:, :3]), m.fused_featurizer(px[:, 3:])], dim=2)
            patches.append(m.projector(feats))
        prefix = torch.cat(patches, dim=1)
        if proprio_raw is not None:  # normalise (BOUNDS_Q99, clipped), fc1, GELU, fc2: one token after the patches
            s = stats[key]["proprio"]
            lo, hi = np.asarray(s["q01"]), np.asarray(s["q99"])
            p = np.clip(2 * (np.asarray(proprio_raw, float) - lo) / (hi - lo + 1e-8) - 1, -1, 1)
            (pfile,) = d.glob("proprio_projector--*_checkpoint.pt")
            w = pt_state(pfile)
            x = torch.tensor(p, dtype=torch.float32).view(1, -1)
            tok = F.linear(F.gelu(F.linear(x, w["fc1.weight"], w["fc1.bias"])), w["fc2.weight"], w["fc2.bias"])
            prefix = torch.cat([prefix, tok.view(1, 1, -1)], dim=1)
        # text: [BOS, prompt..., 29871] + 56 placeholders (embeddings zeroed) + stop token 2
        prompt = [int(t) for t in policy.tokenizer.encode_prompt(INSTRUCTION)]
        assert prompt[0] == 1 and prompt[-1] == 29871
        emb = llm.model.embed_tokens(torch.tensor([prompt + [1] * (chunk * adim) + [2]]))
        if zero_placeholders:
            emb[:, len(prompt):len(prompt) + chunk * adim] = 0.0
        seq = torch.cat([emb[:, :1], prefix, emb[:, 1:]], dim=1)
        L = seq.shape[1]
        assert L == 1 + prefix.shape[1] + (len(prompt) - 1) + chunk * adim + 1
        # attention: the fork keeps only the last row of the causal mask = nothing masked without padding
        mask = torch.zeros(1, 1, L, L)
        if causal:
            mask = torch.full((1, 1, L, L), torch.finfo(torch.float32).min).triu(1)
        pos = torch.arange(L).view(1, -1)
        rope = llm.model.rotary_emb(seq, pos)
        h = seq
        for layer in llm.model.layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
        h = llm.model.norm(h)
        # rows: NUM_PATCHES + NUM_PROMPT_TOKENS (prompt without BOS) .. + 56, i.e. from the last prompt token
        start = prefix.shape[1] + len(prompt) - 1
        rows = h[0, start:start + chunk * adim]
        if return_all:
            return h[0]
        return rows, llm.lm_head(rows)


def reference_head(oft_dir: Path, rows: torch.Tensor) -> np.ndarray:
    """L1RegressionActionHead.predict_action by hand: (56, H) -> (8, 7*H) -> MLPResNet -> (8, 7)."""
    (hfile,) = oft_dir.glob("action_head--*_checkpoint.pt")
    w = pt_state(hfile)

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"], eps=1e-5)

    def lin(x, p):
        return F.linear(x, w[p + ".weight"], w[p + ".bias"])

    with torch.no_grad():
        x = rows.reshape(8, -1)
        x = F.relu(lin(ln(x, "model.layer_norm1"), "model.fc1"))
        for b in (0, 1):
            x = x + F.relu(lin(ln(x, f"model.mlp_resnet_blocks.{b}.ffn.0"), f"model.mlp_resnet_blocks.{b}.ffn.1"))
        return lin(ln(x, "model.layer_norm2"), "model.fc2").numpy()


def reference_unnormalize(oft_dir: Path, normalized: np.ndarray) -> np.ndarray:
    stats = json.loads((oft_dir / "dataset_statistics.json").read_text())
    a = next(iter(stats.values()))["action"]
    lo, hi, mask = np.asarray(a["q01"]), np.asarray(a["q99"]), np.asarray(a["mask"], bool)
    return np.where(mask, 0.5 * (normalized + 1) * (hi - lo + 1e-8) + lo, normalized)


# -- the pass ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_images,with_proprio", [(2, True), (1, True), (1, False)],
                         ids=["two-images-proprio", "one-image-proprio", "one-image-no-proprio"])
def test_pass_equals_independent_composition(request, oft_dir, no_proprio_dir, n_images, with_proprio):
    pol = request.getfixturevalue("policy" if with_proprio else "policy_no_proprio")
    ckpt = oft_dir if with_proprio else no_proprio_dir
    images = frames(n_images, seed=n_images)
    proprio = np.linspace(-0.2, 1.2, 8) if with_proprio else None

    chunk = pol.predict_chunk(images, INSTRUCTION, proprio=proprio)
    ids = pol.tokenizer.encode_prompt(INSTRUCTION)
    pixels = torch.cat([pol.preprocessor(f) for f in images])
    p_norm = None
    if with_proprio:
        from openvla_model.oft import normalize_proprio

        p_norm = normalize_proprio(proprio, pol.config.norm_stats["libero_spatial_no_noops"], "bounds_q99")
    out = pol.model.run(pixels, ids, p_norm)

    rows, _ = reference_pass(pol, images, proprio)
    torch.testing.assert_close(out.action_rows[0], rows, rtol=1e-4, atol=1e-4)
    normalized = reference_head(ckpt, rows)
    np.testing.assert_allclose(chunk.normalized, normalized, rtol=1e-4, atol=1e-4)
    assert chunk.actions.shape == (8, 7) and chunk.normalized.shape == (8, 7)
    np.testing.assert_allclose(chunk.actions, reference_unnormalize(ckpt, normalized), rtol=1e-4, atol=1e-4)
    assert chunk.num_images == n_images and chunk.used_proprio is with_proprio and chunk.valid
    assert set(chunk.timings_ms) == {"preprocess", "vision", "projector", "llm", "head", "total"}


def test_bidirectional_not_causal(policy):
    """The fork's attention is bidirectional: a causal pass gives different action rows (so a causal
    implementation fails the composition test), and early positions see later ones."""
    images, proprio = frames(2, seed=2), np.linspace(-0.2, 1.2, 8)
    ids = policy.tokenizer.encode_prompt(INSTRUCTION)
    from openvla_model.oft import normalize_proprio

    p_norm = normalize_proprio(proprio, policy.config.norm_stats["libero_spatial_no_noops"], "bounds_q99")
    out = policy.model.run(torch.cat([policy.preprocessor(f) for f in images]), ids, p_norm)
    bidir, _ = reference_pass(policy, images, proprio)
    causal, _ = reference_pass(policy, images, proprio, causal=True)
    assert (bidir - causal).abs().max() > 1e-2
    assert (out.action_rows[0] - causal).abs().max() > 1e-2
    # in the reference itself: the BOS row changes when only the placeholders' embeddings change
    h_zero = reference_pass(policy, images, proprio, return_all=True)
    h_emb = reference_pass(policy, images, proprio, zero_placeholders=False, return_all=True)
    assert (h_zero[0] - h_emb[0]).abs().max() > 1e-3


def test_placeholders_zeroed_matter(policy):
    """Zeroed placeholder embeddings are part of the semantics: not zeroing them changes the rows."""
    images, proprio = frames(1, seed=5), np.zeros(8)
    zeroed, _ = reference_pass(policy, images, proprio)
    raw, _ = reference_pass(policy, images, proprio, zero_placeholders=False)
    assert (zeroed - raw).abs().max() > 1e-2
    chunk = policy.predict_chunk(images, INSTRUCTION, proprio=proprio)
    np.testing.assert_allclose(chunk.normalized, reference_head(Path(policy.weights_path), zeroed),
                               rtol=1e-4, atol=1e-4)


def test_discrete_fallback(oft_dir):
    """No head: argmax of the LM logits at the action rows, decoded as OpenVLA bins, un-normalised."""
    from openvla_model.oft_policy import load_oft_policy

    with load_oft_policy(oft_dir, device="cpu", dtype="float32", use_action_head=False) as pol:
        assert pol.describe()["action_head"].startswith("discrete")
        images, proprio = frames(2, seed=7), np.linspace(0.0, 0.5, 8)
        chunk = pol.predict_chunk(images, INSTRUCTION, proprio=proprio)
        _, logits = reference_pass(pol, images, proprio)
        tokens = logits.argmax(-1).numpy().reshape(8, 7)
        np.testing.assert_array_equal(chunk.tokens, tokens)
        normalized = -1.0 + (2 * np.clip(32000 - tokens - 1, 0, 254) + 1) / 255.0
        np.testing.assert_allclose(chunk.normalized, normalized, atol=1e-6)
        np.testing.assert_allclose(chunk.actions, reference_unnormalize(oft_dir, normalized), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(chunk.out_of_range, (tokens < 31744) | (tokens > 31999))


def test_input_errors(policy, policy_no_proprio, oft_dir):
    img = frames(1)[0]
    with pytest.raises(InputError, match="needs the robot state"):
        policy.predict_chunk(img, INSTRUCTION)
    with pytest.raises(InputError, match="has 7 values"):
        policy.predict_chunk(img, INSTRUCTION, proprio=np.zeros(7))
    with pytest.raises(InputError, match="NaN"):
        policy.predict_chunk(img, INSTRUCTION, proprio=np.full(8, np.nan))
    with pytest.raises(InputError, match="no proprio projector"):
        policy_no_proprio.predict_chunk(img, INSTRUCTION, proprio=np.zeros(8))
    with pytest.raises(InputError, match="non-empty list"):
        policy.predict_chunk([], INSTRUCTION, proprio=np.zeros(8))
    with pytest.raises(InputError, match="uint8"):
        policy.predict_chunk(img.astype(np.float32), INSTRUCTION, proprio=np.zeros(8))
    with pytest.raises(OpenVLAError, match="predict_chunk"):
        policy.predict(img, INSTRUCTION)


# -- detection and loading ------------------------------------------------------------------------------
def test_checkpoint_kind(oft_dir, tmp_path):
    from openvla_model.oft import checkpoint_kind

    assert checkpoint_kind(oft_dir) == "oft"
    plain = variant(oft_dir, tmp_path / "plain", drop=("action_head", "proprio_projector"))
    assert checkpoint_kind(plain) == "openvla"
    marked = variant(oft_dir, tmp_path / "marked", drop=("action_head", "proprio_projector"))
    cfg = json.loads((oft_dir / "config.json").read_text())
    cfg["openvla_oft"] = {"num_actions_chunk": 4, "normalization": "bounds_q99"}
    (marked / "config.json").unlink()
    (marked / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_kind(marked) == "oft"  # our config.json marker: discrete OFT without head files
    diffusion = variant(oft_dir, tmp_path / "diffusion", add={"noisy_action_projector--100_checkpoint.pt": {}})
    with pytest.raises(CheckpointError, match="diffusion"):
        checkpoint_kind(diffusion)
    film = variant(oft_dir, tmp_path / "film", add={"vision_backbone--100_checkpoint.pt": {}})
    with pytest.raises(CheckpointError, match="FiLM"):
        checkpoint_kind(film)


def test_load_policy_dispatches_by_kind(oft_dir):
    from openvla_model import load_policy
    from openvla_model.oft_policy import OFTPolicy

    with load_policy(oft_dir, backend="torch", device="cpu", dtype="float32") as pol:
        assert isinstance(pol, OFTPolicy) and pol.spec.num_actions_chunk == 8


def test_component_prefix_stripped(oft_dir, tmp_path):
    from openvla_model.oft import load_component_state_dict

    (hfile,) = oft_dir.glob("action_head--*_checkpoint.pt")
    raw = torch.load(hfile, weights_only=True)
    assert all(k.startswith("module.") for k in raw)  # the generator writes the DDP layout
    stripped = load_component_state_dict(hfile)
    assert set(stripped) == {k[len("module."):] for k in raw}
    plain = tmp_path / "action_head--1_checkpoint.pt"
    torch.save(stripped, plain)
    assert set(load_component_state_dict(plain)) == set(stripped)


def _load(d, **kw):
    from openvla_model.oft_policy import load_oft_policy

    return load_oft_policy(d, device="cpu", dtype="float32", **kw)


def _head_state(oft_dir) -> dict:
    (hfile,) = oft_dir.glob("action_head--*_checkpoint.pt")
    return torch.load(hfile, weights_only=True)


def test_unknown_prefix_is_refused(oft_dir, tmp_path):
    sd = {("model_wrapper." + k[len("module."):]): v for k, v in _head_state(oft_dir).items()}
    d = variant(oft_dir, tmp_path / "x", drop=("action_head",), add={"action_head--150000_checkpoint.pt": sd})
    with pytest.raises(CheckpointError,
                       match=r"action_head--150000_checkpoint\.pt: unknown key prefix 'model_wrapper\.'"):
        _load(d)
    (pfile,) = oft_dir.glob("proprio_projector--*_checkpoint.pt")
    ps = {"projector." + k: v for k, v in torch.load(pfile, weights_only=True).items()}
    d = variant(oft_dir, tmp_path / "p", drop=("proprio_projector",),
                add={"proprio_projector--150000_checkpoint.pt": ps})
    with pytest.raises(CheckpointError,
                       match=r"proprio_projector--150000_checkpoint\.pt: unknown key prefix 'projector\.module\.'"):
        _load(d)


def test_diffusion_head_keys_refused(oft_dir, tmp_path):
    sd = {"module.noise_predictor.model.fc1.weight": torch.zeros(4, 4), "module.time_encoder.dim": torch.zeros(1)}
    d = variant(oft_dir, tmp_path / "x", drop=("action_head",), add={"action_head--150000_checkpoint.pt": sd})
    with pytest.raises(CheckpointError, match="diffusion"):
        _load(d)


def test_wrong_shapes_are_refused(oft_dir, tmp_path):
    sd = dict(_head_state(oft_dir))
    sd["module.model.fc1.weight"] = sd["module.model.fc1.weight"][:, :-3]
    d = variant(oft_dir, tmp_path / "fc1", drop=("action_head",), add={"action_head--150000_checkpoint.pt": sd})
    with pytest.raises(CheckpointError, match=r"action_head--150000_checkpoint\.pt: model\.fc1\.weight has shape"):
        _load(d)
    from openvla_model.oft import L1RegressionActionHead

    sd = L1RegressionActionHead(256, 256, 6).state_dict()  # a consistent 6-dim head, 7-dim statistics
    d = variant(oft_dir, tmp_path / "dim", drop=("action_head",), add={"action_head--150000_checkpoint.pt": sd})
    with pytest.raises(CheckpointError, match="action dimension mismatch"):
        _load(d)
    (pfile,) = oft_dir.glob("proprio_projector--*_checkpoint.pt")
    ps = torch.load(pfile, weights_only=True)
    ps["module.fc1.weight"] = ps["module.fc1.weight"][:, :7]  # 7 proprio inputs, statistics say 8
    d = variant(oft_dir, tmp_path / "prop", drop=("proprio_projector",),
                add={"proprio_projector--150000_checkpoint.pt": ps})
    with pytest.raises(CheckpointError, match="proprio dimension mismatch: the projector takes 7 values"):
        _load(d)


def test_missing_and_ambiguous_files(oft_dir, tmp_path):
    d = variant(oft_dir, tmp_path / "nohead", drop=("action_head",))
    with pytest.raises(CheckpointError, match=r"action_head--<step>_checkpoint\.pt not found"):
        _load(d, use_action_head=True)
    two = variant(oft_dir, tmp_path / "two", add={"action_head--5_checkpoint.pt": _head_state(oft_dir)})
    with pytest.raises(CheckpointError, match=r"2 action_head checkpoints.*action_head--150000.*action_head--5"):
        _load(two)
    with pytest.raises(CheckpointError, match=r"action_head--7_checkpoint\.pt not found"):
        _load(two, step=7, use_action_head=True)
    bad = variant(oft_dir, tmp_path / "bad", drop=("action_head",))
    (bad / "action_head--1_checkpoint.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"action_head--1_checkpoint\.pt: cannot load"):
        _load(bad)


def test_platform_constants():
    from openvla_model.oft import resolve_spec
    from openvla_model.oft_checkpoint import TINY_OFT_STATS

    libero = resolve_spec(TINY_OFT_STATS, head_action_dim=7, projector_dim=8)
    assert (libero.num_actions_chunk, libero.action_dim, libero.proprio_dim, libero.normalization) == \
        (8, 7, 8, "bounds_q99") and "LIBERO" in libero.source

    def stats(a, p):
        q = {"q01": [-1.0] * a, "q99": [1.0] * a, "min": [-2.0] * a, "max": [2.0] * a}
        return {"d": {"action": q, "proprio": {"q01": [0.0] * p, "q99": [1.0] * p}}}

    aloha = resolve_spec(stats(14, 14), head_action_dim=14, projector_dim=14)
    assert (aloha.num_actions_chunk, aloha.normalization) == (25, "bounds")
    bridge = resolve_spec(stats(7, 7), head_action_dim=7, projector_dim=None)
    assert bridge.num_actions_chunk == 5 and bridge.proprio_dim is None
    with pytest.raises(CheckpointError, match="num_actions_chunk="):
        resolve_spec(stats(6, 6), head_action_dim=6, projector_dim=None)
    custom = resolve_spec(stats(6, 6), head_action_dim=6, projector_dim=None, num_actions_chunk=10,
                          normalization="bounds")
    assert (custom.num_actions_chunk, custom.source) == (10, "explicit arguments")
    field = resolve_spec(stats(6, 6), head_action_dim=None, projector_dim=None,
                         config_field={"num_actions_chunk": 4, "normalization": "bounds_q99"})
    assert field.num_actions_chunk == 4 and "openvla_oft" in field.source
    with pytest.raises(ConfigError, match="normalization"):
        resolve_spec(stats(7, 8), head_action_dim=7, projector_dim=8, normalization="normal")


def test_explicit_constants_reach_the_pass(oft_dir):
    """A chunk length given explicitly (never read from argv) sets the number of placeholders."""
    with _load(oft_dir, num_actions_chunk=3, num_images_in_input=1) as pol:
        chunk = pol.predict_chunk(frames(1)[0], INSTRUCTION, proprio=np.zeros(8))
        assert chunk.actions.shape == (3, 7)
        with pytest.raises(InputError, match="takes 1 image"):
            pol.predict_chunk(frames(2), INSTRUCTION, proprio=np.zeros(8))


# -- robot-side image preparation (lanczos3 without TensorFlow) ----------------------------------------------
def _pattern(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 37 + y * 91 + c * 53 + ((x * y) % 17) * 11) % 256 for c in range(3)], -1).astype(np.uint8)


def test_lanczos3_matches_tensorflow_outputs():
    """Stored TensorFlow 2.21 outputs (test/oft_tf_golden.json; TensorFlow is not a dependency):
    the resize alone and the full JPEG round trip + resize agree to MAX_ABS_DIFF_VS_TF (1) level."""
    from openvla_model.oft_preprocess import MAX_ABS_DIFF_VS_TF, jpeg_round_trip, resize_lanczos3

    golden = json.loads((HERE / "oft_tf_golden.json").read_text())
    for case in golden["cases"]:
        h, w = case["input"]
        size, rows = case["size"], case["rows"]
        img = _pattern(h, w)
        ours = resize_lanczos3(jpeg_round_trip(img) if case["kind"] == "full" else img, size)
        if rows is not None:
            ours = ours[rows]
        ref = np.frombuffer(zlib.decompress(base64.b64decode(case["data"])), np.uint8).reshape(ours.shape)
        diff = np.abs(ours.astype(int) - ref)
        assert diff.max() <= MAX_ABS_DIFF_VS_TF, (case["kind"], h, w, diff.max())
        assert (diff > 0).mean() < 0.01, (case["kind"], h, w)


def test_lanczos3_kernel_and_weights():
    """The TF kernel stretched by the downscale factor, weights normalised; upscaling unstretched."""
    from openvla_model.oft_preprocess import lanczos3_matrix, prepare_image

    def kernel(x):
        x = abs(x)
        return 1.0 if x < 1e-3 else 0.0 if x > 3 else 3 * np.sin(np.pi * x) * np.sin(np.pi * x / 3) / (np.pi * x) ** 2

    w = lanczos3_matrix(448, 224)  # downscale by 2: support 6 input pixels each side
    centre = (100 + 0.5) * 2.0
    raw = np.array([kernel((s + 0.5 - centre) / 2.0) for s in range(448)])
    np.testing.assert_allclose(w[100], raw / raw.sum(), atol=1e-6)
    assert np.count_nonzero(w[100]) == 12
    up = lanczos3_matrix(100, 224)
    centre = (50 + 0.5) * 100 / 224
    raw = np.array([kernel(s + 0.5 - centre) for s in range(100)])
    np.testing.assert_allclose(up[50], raw / raw.sum(), atol=1e-6)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    flat = np.full((300, 200, 3), 77, np.uint8)
    assert (prepare_image(flat) == 77).all()
    img = frames(1)[0]
    assert prepare_image(img) is img  # already 224x224: untouched, as the official code


def test_normalisation_formulas():
    """Un-normalisation and proprio normalisation by type (q01/q99 or min/max), mask, 1e-8, clip."""
    from openvla_model.oft import normalize_proprio, unnormalize_actions

    stats = {"action": {"q01": [-0.5, 0.0, 0.0], "q99": [0.5, 2.0, 1.0], "min": [-1.0, -1.0, 0.0],
                        "max": [1.0, 3.0, 1.0], "mask": [True, True, False]},
             "proprio": {"q01": [0.0, 10.0], "q99": [1.0, 20.0], "min": [-1.0, 0.0], "max": [1.0, 40.0]}}
    n = np.array([[-1.0, 0.0, 0.25], [1.0, 0.5, -0.75]])
    lo, hi = np.array([-0.5, 0.0, 0.0]), np.array([0.5, 2.0, 1.0])
    want = np.where([True, True, False], 0.5 * (n + 1) * (hi - lo + 1e-8) + lo, n)
    np.testing.assert_allclose(unnormalize_actions(n, stats, "bounds_q99"), want, rtol=1e-6)
    lo, hi = np.array([-1.0, -1.0, 0.0]), np.array([1.0, 3.0, 1.0])
    want = np.where([True, True, False], 0.5 * (n + 1) * (hi - lo + 1e-8) + lo, n)
    np.testing.assert_allclose(unnormalize_actions(n, stats, "bounds"), want, rtol=1e-6)
    p = np.array([0.25, 35.0])
    np.testing.assert_allclose(normalize_proprio(p, stats, "bounds_q99"), [-0.5, 1.0], atol=1e-7)  # 2.0 clipped
    np.testing.assert_allclose(normalize_proprio(p, stats, "bounds"), [0.25, 0.75], atol=1e-7)
