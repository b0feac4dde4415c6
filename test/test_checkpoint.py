"""Weight loading: sharded + index, single file, bf16 and fp32 files, and a clear error for each
bad case (naming the file or key)."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from openvla_model import load_policy
from openvla_model.checkpoint import Checkpoint
from openvla_model.errors import CheckpointError, ConfigError
from openvla_model.synthetic import synthetic_rgb
from openvla_model.tiny_checkpoint import write_tiny_checkpoint

RGB = synthetic_rgb(11)
INSTR = "put the spoon on the towel"


def tokens_of(weights, dtype="float32"):
    with load_policy(weights, device="cpu", dtype=dtype, default_unnorm_key="bridge_orig") as p:
        return p.predict(RGB, INSTR).tokens


@pytest.fixture
def ckpt(tiny_weights, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_weights, out)
    return out


def test_layout_matches_hf_openvla(tiny_weights):
    names = {p.name for p in tiny_weights.iterdir()}
    assert {"config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
            "dataset_statistics.json", "model.safetensors.index.json"} <= names
    index = json.loads((tiny_weights / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    keys = set(index["weight_map"])
    for k in ("vision_backbone.featurizer.cls_token", "vision_backbone.featurizer.reg_token",
              "vision_backbone.featurizer.blocks.0.ls1.scale_factor", "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
              "vision_backbone.fused_featurizer.pos_embed", "vision_backbone.fused_featurizer.attn_pool.latent",
              "projector.fc1.weight", "projector.fc3.bias", "language_model.model.embed_tokens.weight",
              "language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.1.mlp.gate_proj.weight",
              "language_model.model.norm.weight", "language_model.lm_head.weight"):
        assert k in keys, k
    assert not any(k.endswith(".gamma") for k in keys)  # HF names LayerScale scale_factor
    ck = Checkpoint(tiny_weights)
    assert ck.shapes["language_model.model.embed_tokens.weight"] == (32064, 256)
    assert ck.shapes["language_model.lm_head.weight"] == (32064, 256)
    assert set(ck.dtypes.values()) == {"BF16"}


def test_single_file_and_fp32_file_load(tmp_path, tiny_weights):
    single = write_tiny_checkpoint(tmp_path / "single", seed=0, num_shards=1)
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    assert np.array_equal(tokens_of(single), tokens_of(tiny_weights))  # same weights, other layout
    fp32 = write_tiny_checkpoint(tmp_path / "fp32", seed=0, dtype=torch.float32)
    assert set(Checkpoint(fp32).dtypes.values()) == {"F32"}
    # the same random weights stored unrounded in float32: the same tokens as the bf16 file (measured)
    assert tokens_of(fp32).tolist() == tokens_of(tiny_weights).tolist()


def test_layerscale_scale_factor_is_loaded_into_timm_gamma(tiny_weights, tiny_policy):
    ck = Checkpoint(tiny_weights)
    (key, want), = ck.load(["vision_backbone.featurizer.blocks.1.ls2.scale_factor"], dtype=torch.float32)
    got = tiny_policy.backend.modules.featurizer.vit.blocks[1].ls2.gamma
    assert torch.equal(got, want) and want.abs().min() > 0.01  # real values, not timm's 1e-5 init


def _rewrite_shard(path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_shard(ckpt):
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*missing"):
        load_policy(ckpt, device="cpu")


def test_corrupt_shard(ckpt):
    p = ckpt / "model-00001-of-00003.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model-00001-of-00003.safetensors"):
        load_policy(ckpt, device="cpu")


def test_missing_tensor(ckpt):
    shard = ckpt / "model-00003-of-00003.safetensors"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    victim = next(k for k, v in index["weight_map"].items() if v == shard.name)
    _rewrite_shard(shard, lambda t: t.pop(victim))
    del index["weight_map"][victim]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing.*{victim}"):
        load_policy(ckpt, device="cpu")


def test_index_names_a_tensor_the_shard_lacks(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.extra.weight"] = "model-00001-of-00003.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="language_model.model.extra.weight"):
        load_policy(ckpt, device="cpu")


def test_misshaped_tensor(ckpt):
    key = "projector.fc2.bias"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    _rewrite_shard(ckpt / index["weight_map"][key], lambda t: t.__setitem__(key, torch.zeros(3, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"projector.fc2.bias .* shape \[3\], expected \[256\]"):
        load_policy(ckpt, device="cpu")


def test_unknown_tensor(ckpt):
    key = "vision_backbone.featurizer.blocks.0.mystery"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    _rewrite_shard(ckpt / "model-00001-of-00003.safetensors",
                   lambda t: t.__setitem__(key, torch.zeros(2, dtype=torch.bfloat16)))
    index["weight_map"][key] = "model-00001-of-00003.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"unknown.*{key}"):
        load_policy(ckpt, device="cpu")


def test_no_weights_at_all(ckpt):
    for p in ckpt.glob("model*"):
        p.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        load_policy(ckpt, device="cpu")


def test_bad_index_json(ckpt):
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_policy(ckpt, device="cpu")


@pytest.mark.parametrize("name,match", [("config.json", "config.json not found"),
                                        ("tokenizer.json", "tokenizer.json not found")])
def test_missing_config_or_tokenizer(ckpt, name, match):
    (ckpt / name).unlink()
    with pytest.raises(ConfigError, match=match):
        load_policy(ckpt, device="cpu")


def test_corrupt_config(ckpt):
    (ckpt / "config.json").write_text('{"text_config": ')
    with pytest.raises(ConfigError, match="config.json: cannot parse JSON"):
        load_policy(ckpt, device="cpu")


def test_missing_weights_dir(tmp_path):
    with pytest.raises(ConfigError, match="weights directory not found"):
        load_policy(tmp_path / "nope", device="cpu")


def test_config_and_weights_disagree(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 640
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp.*shape .* expected .*config.json does not match"):
        load_policy(ckpt, device="cpu")
