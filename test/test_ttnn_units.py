"""TT-NN backend pieces that need no device: mesh names, precision profiles, the weight layout
transforms (each checked against the torch op it replaces), and the failure paths."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ttnn  # noqa: E402  (a required dependency of the venv: its absence is a failure, not a skip)

from openvla_model.backends.ttnn.mesh import resolve_mesh_name  # noqa: E402
from openvla_model.backends.ttnn.model_config import (  # noqa: E402
    CONFIG_DIR, check_against_ttnn, load_profile, overrides_from_node_precision)
from openvla_model.errors import BackendError  # noqa: E402


# ---- mesh names ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,available,want", [
    ("N300", 2, "N300"), ("n300", 8, "N300"), ("T3K", 8, "T3K"), ("auto", 2, "N300"), ("auto", 8, "T3K"),
    (None, 4, "N300"), ("AUTO", 32, "T3K")])
def test_mesh_names_resolve(name, available, want):
    assert resolve_mesh_name(name, available) == want


@pytest.mark.parametrize("name,available,msg", [
    ("N150", 1, "single-chip board"), ("P150", 1, "single-chip board"), ("auto", 1, "only 1 Tenstorrent chip"),
    ("auto", 0, "no Tenstorrent device found"), ("T3K", 2, "T3K needs 8 Tenstorrent chips, 2 found"),
    ("N300", 0, "no Tenstorrent card found"), ("TG", 32, "unknown mesh_device 'TG'")])
def test_mesh_names_refused_with_the_reason(name, available, msg):
    with pytest.raises(BackendError, match=msg) as e:
        resolve_mesh_name(name, available)
    if "single-chip" in msg:
        assert "BF16" in str(e.value) and "N300" in str(e.value)


# ---- precision profiles ----------------------------------------------------------------------
def test_profiles_follow_the_spec():
    n300, t3k = load_profile("N300"), load_profile("T3K")
    assert n300.mesh_shape == (1, 2) and t3k.mesh_shape == (1, 8)
    for role in ("wqkv", "wo", "kv_cache", "activations", "lm_head"):
        assert n300.dtypes[role] == "bfloat16"
    assert n300.dtypes["ffn"] == "bfloat8_b" and n300.fidelity["ffn"] == "HiFi2"
    assert all(n300.fidelity[r] == "HiFi4" for r in ("qkv", "sdpa", "wo"))
    assert set(t3k.dtypes.values()) == {"bfloat16"}
    assert {v for k, v in t3k.fidelity.items() if k != "decode"} == {"HiFi4"}
    # the DRAM-sharded decode matmuls run at HiFi2 (tt_transformers; issue 12), prefill keeps the above
    assert n300.fidelity["decode"] == t3k.fidelity["decode"] == "HiFi2"
    for p in (n300, t3k):
        check_against_ttnn(p, ttnn)  # every name exists in the installed ttnn
        cfg = p.compute_config(ttnn, "sdpa")
        assert cfg.math_fidelity == ttnn.MathFidelity.HiFi4
        assert p.max_seq_len >= 256 + 7 + 32
        assert p.decode_matmul == "dram_sharded" and p.trace_decode


def test_profile_errors_name_file_and_key(tmp_path):
    text = (CONFIG_DIR / "N300.yaml").read_text()
    (tmp_path / "N300.yaml").write_text(text.replace("ffn: bfloat8_b", "ffn: bfp8_typo"))
    with pytest.raises(BackendError, match=r"N300.yaml: dtypes.ffn = 'bfp8_typo'"):
        load_profile("N300", tmp_path)
    (tmp_path / "N300.yaml").write_text(text.replace("ffn: HiFi2", "ffn: HiFi5"))
    with pytest.raises(BackendError, match=r"fidelity.ffn = 'HiFi5'"):
        load_profile("N300", tmp_path)
    (tmp_path / "N300.yaml").write_text(text.replace("embedding: bfloat16", "embedding: bfloat8_b"))
    with pytest.raises(BackendError, match="dtypes.embedding must be bfloat16"):
        load_profile("N300", tmp_path)
    (tmp_path / "N300.yaml").write_text(text.replace("decode_matmul: dram_sharded", "decode_matmul: sharded"))
    with pytest.raises(BackendError, match="decode_matmul = 'sharded'"):
        load_profile("N300", tmp_path)
    with pytest.raises(BackendError, match="no TT-NN precision profile for mesh 'T3K'"):
        load_profile("T3K", tmp_path)
    # max_batch: the KV-cache slots / decode rows (several robots), an integer 1..32
    for bad in ("0", "33", "true", "2.5", "'4'"):
        (tmp_path / "N300.yaml").write_text(text.replace("max_batch: 4", f"max_batch: {bad}"))
        with pytest.raises(BackendError, match="N300.yaml: max_batch must be an integer 1..32"):
            load_profile("N300", tmp_path)
    assert load_profile("N300").max_batch == 4 and load_profile("T3K").max_batch == 8
    assert load_profile("N300", overrides={"max_batch": 1}).max_batch == 1
    for bad in ("-1", "true", "'8'"):
        (tmp_path / "N300.yaml").write_text(text.replace("max_prefill_traces: 8", f"max_prefill_traces: {bad}"))
        with pytest.raises(BackendError, match="N300.yaml: max_prefill_traces must be an integer >= 0"):
            load_profile("N300", tmp_path)


def test_node_precision_parameters_override_the_profile():
    over = overrides_from_node_precision({"ffn_weight_dtype": "bf16", "sdpa_math_fidelity": "hifi2",
                                          "lm_head_logits_dtype": "bf16"})
    p = load_profile("N300", overrides=over)
    assert p.dtypes["ffn"] == "bfloat16" and p.fidelity["sdpa"] == "HiFi2" and p.dtypes["wqkv"] == "bfloat16"
    with pytest.raises(BackendError, match="always bf16"):
        overrides_from_node_precision({"lm_head_logits_dtype": "bfp8"})
    with pytest.raises(BackendError, match="unknown precision parameter"):
        overrides_from_node_precision({"wqkv": "bf16"})
    with pytest.raises(BackendError, match="expected one of"):
        overrides_from_node_precision({"wo_dtype": "int8"})


def test_node_mesh_configs_are_accepted_when_present():
    """config/mesh/<MESH>.yaml (the ROS node's parameters) translate into valid overrides."""
    import yaml

    for mesh in ("N300", "T3K"):
        path = CONFIG_DIR.parent / "mesh" / f"{mesh}.yaml"
        if not path.is_file():
            pytest.skip(f"{path} not present")
        params = yaml.safe_load(path.read_text())["/**"]["ros__parameters"]
        load_profile(mesh, overrides=overrides_from_node_precision(params.get("precision")))


# ---- weight layout transforms, each against the torch op it stands for ---------------------------
def test_rotate_half_matrix_is_hf_rotate_half():
    from transformers.models.llama.modeling_llama import rotate_half

    from openvla_model.backends.ttnn.attention import rotate_half_matrix

    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(x @ rotate_half_matrix(128), rotate_half(x))


def test_patchify_times_patch_weight_is_the_conv():
    from openvla_model.backends.ttnn.weights import patch_weight, patchify

    conv = torch.nn.Conv2d(3, 40, 14, 14)
    px = torch.randn(1, 3, 224, 224)
    want = conv(px).flatten(2).transpose(1, 2)  # (1, 256, 40), timm's patch order
    got = patchify(px, 14, 608) @ patch_weight(conv.weight.detach(), 608) + conv.bias.detach()
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)


def test_padded_heads_leave_attention_unchanged():
    """SigLIP head dim 72 padded to 96: same attention output after the padded projection."""
    from openvla_model.backends.ttnn.weights import pad_heads

    e, h, d, dp, s = 144, 2, 72, 96, 10
    qkv, proj = torch.nn.Linear(e, 3 * e), torch.nn.Linear(e, e)
    x = torch.randn(s, e)

    def attn(x, wqkv, bqkv, wproj, hd):
        q, k, v = (x @ wqkv.T + bqkv).reshape(s, 3, h, hd).permute(1, 2, 0, 3)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
        return o.permute(1, 0, 2).reshape(s, h * hd) @ wproj.T

    with torch.no_grad():
        want = attn(x, qkv.weight, qkv.bias, proj.weight, d)
        got = attn(x, pad_heads(qkv.weight, 3, h, d, dp), pad_heads(qkv.bias, 3, h, d, dp),
                   pad_heads(proj.weight, 1, h, d, dp, dim=1), dp)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- failure paths (golden emulator as the device) -------------------------------------------
def test_no_card_here_gives_a_clear_error(tiny_weights):
    from openvla_model import load_policy

    if Path("/dev/tenstorrent").exists():
        pytest.skip("a Tenstorrent card is present")
    with pytest.raises(BackendError, match="ttnn backend: mesh_device N300 needs 2 Tenstorrent chips, no Tenstorrent card found"):
        load_policy(tiny_weights, backend="ttnn", mesh_device="N300")


def test_device_that_fails_to_open_leaves_the_fabric_off(tiny_policy):
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    class Broken(GoldenTTNN):
        def open_mesh_device(self, *a, **k):
            raise RuntimeError("ethernet link training failed (simulated)")

    emu = Broken(8)
    with pytest.raises(BackendError, match="cannot open the T3K mesh.*link training failed"):
        TtnnBackend(tiny_policy.config, Checkpoint(tiny_policy.config.weights_dir), mesh_device="T3K", tt=emu)
    assert emu.fabric == ttnn.FabricConfig.DISABLED


def test_mismatched_weights_are_refused_before_the_device_opens(tiny_policy, tmp_path):
    """A checkpoint that does not match config.json: CheckpointError, and no mesh was opened."""
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint
    from openvla_model.errors import CheckpointError
    from openvla_model.tiny_checkpoint import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    cfg = other / "config.json"
    cfg.write_text(cfg.read_text().replace('"intermediate_size": 512', '"intermediate_size": 640'))
    from openvla_model.config import load_config

    opened = []

    class Counting(GoldenTTNN):
        def open_mesh_device(self, *a, **k):
            opened.append(1)
            return super().open_mesh_device(*a, **k)

    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight .* has shape"):
        TtnnBackend(load_config(other), Checkpoint(other), mesh_device="N300", tt=Counting(2), cache_dir=None)
    assert not opened


def test_device_dying_mid_run_closes_the_mesh(tiny_policy):
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    class Dying(GoldenTTNN):
        def _experimental_reduce_scatter_minimal_async(self, *a, **k):  # the first CCL after vision's all-gather
            raise RuntimeError("TT_THROW: timeout waiting for ethernet core (simulated)")

    emu = Dying(2)
    be = TtnnBackend(tiny_policy.config, Checkpoint(tiny_policy.config.weights_dir), mesh_device="N300", tt=emu,
                     cache_dir=None, trace=False)
    mesh = be.mesh
    px = torch.zeros(1, 6, 224, 224)
    ids = np.array([1, 300, 29871])
    with pytest.raises(BackendError, match="device failed during prefill.*timeout.*mesh closed"):
        be.generate(px, ids, 7)
    assert mesh.device is None and be.describe()["state"].startswith("error")
    with pytest.raises(BackendError, match="failed earlier"):
        be.generate(px, ids, 7)
    be.close()  # idempotent


def test_prompt_longer_than_the_kv_cache_is_an_input_error(tiny_policy):
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint
    from openvla_model.errors import InputError

    be = TtnnBackend(tiny_policy.config, Checkpoint(tiny_policy.config.weights_dir), mesh_device="N300",
                     tt=GoldenTTNN(2), cache_dir=None, trace=False)
    try:
        with pytest.raises(InputError, match="max_seq_len 512"):
            be.generate(torch.zeros(1, 6, 224, 224), np.ones(300, np.int64), 7)
        assert be.describe()["state"] == "ok"  # bad input does not kill the device
    finally:
        be.close()


# ---- weight cache (golden emulator: ttnn's cache-file contract, emulated) ----------------------
@pytest.mark.parametrize("where", ["explicit", "auto"])
def test_weight_cache_is_keyed_by_checkpoint_and_precision(tmp_path, monkeypatch, where):
    """An explicit cache_dir and the default root alike: the second start loads every tensor from
    the cache; a checkpoint rewritten in place, or another precision, converts again (a stale
    cache would give the old weights' tokens)."""
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model import load_policy
    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint
    from openvla_model.config import load_config
    from openvla_model.tiny_checkpoint import write_tiny_checkpoint

    weights = write_tiny_checkpoint(tmp_path / "weights", seed=0)
    root = tmp_path / "cache"
    monkeypatch.setenv("OPENVLA_TTNN_CACHE", str(root))
    cache_dir = root if where == "explicit" else "auto"

    def start(**kw):
        emu = GoldenTTNN(2)
        be = TtnnBackend(load_config(weights), Checkpoint(weights), mesh_device="N300", tt=emu, cache_dir=cache_dir,
                         trace=False, **kw)
        return be, (be.store.hits, be.store.misses, emu.cache_files_read)

    px, ids = torch.zeros(1, 6, 224, 224), np.array([1, 300, 1000, 29871])
    be, first = start()
    old_tokens = be.generate(px, ids, 7)[0].tolist() if where == "explicit" else None
    be.close()
    n = first[1]
    assert first == (0, n, 0) and n > 50, first
    be, again = start()
    be.close()
    assert again == (n, 0, n), again  # every tensor from the cache, nothing converted

    be, other_precision = start(precision={"ffn_weight_dtype": "bf16"})  # N300's FFN is BFP8 by default
    be.close()
    assert other_precision == (0, n, 0), other_precision

    write_tiny_checkpoint(weights, seed=1)  # same names and sizes, other values
    be, rewritten = start()
    try:
        assert rewritten == (0, n, 0), rewritten
        if where == "auto":
            return  # the tokens below: once is enough
        with load_policy(weights, backend="torch", device="cpu", dtype="float32") as ref:
            want = ref.backend.generate(px, ids, 7)[0].tolist()
        assert want != old_tokens  # the two checkpoints are told apart by their tokens
        assert be.generate(px, ids, 7)[0].tolist() == want
    finally:
        be.close()
