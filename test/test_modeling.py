"""The network built from config matches the published OpenVLA-7B structure (openvla-spec.md
sections 1, 3, 4, 6), and each faithful-port rule holds on the tiny checkpoint."""
import json

import pytest
import torch

from openvla_model.config import TIMM_KWARGS_FIELD, load_config
from openvla_model.modeling import COMPONENT_PREFIXES, OpenVLAModules
from openvla_model.tiny_checkpoint import preprocessor_config_json, tiny_config_json

# The released config.json has a sparse text_config: everything else is LlamaConfig's default.
REAL_TEXT_CONFIG = {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064}


@pytest.fixture(scope="module")
def full_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("openvla_7b_config")
    cfg = tiny_config_json()
    del cfg[TIMM_KWARGS_FIELD], cfg["openvla_ros_tiny_random"]
    cfg["text_config"] = REAL_TEXT_CONFIG
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").write_text(json.dumps(preprocessor_config_json()))
    return load_config(d)


def test_full_size_parameter_counts_match_openvla_7b(full_config):
    with torch.device("meta"):
        m = OpenVLAModules(full_config)
    count = {c: sum(p.numel() for p in m.component(c).parameters()) for c in COMPONENT_PREFIXES}
    assert count["featurizer"] == 303_230_976
    assert count["fused_featurizer"] == 427_680_704
    assert count["projector"] == 71_385_600
    assert sum(count.values()) == 7_541_237_184
    assert m.vision_dim == 2176


def test_full_size_llm_facts(full_config):
    llm = full_config.llm
    assert (llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers) == (4096, 11008, 32)
    assert (llm.num_attention_heads, llm.num_key_value_heads, llm.vocab_size) == (32, 32, 32064)
    assert llm.rms_norm_eps == 1e-6  # not in the released text_config: LlamaConfig's default applies
    assert full_config.action_vocab_size == 32000 and full_config.num_patches == 256
    assert full_config.action_dim == 7


def test_full_size_expected_shapes(full_config):
    with torch.device("meta"):
        shapes = OpenVLAModules(full_config).expected_checkpoint_shapes()
    assert shapes["vision_backbone.featurizer.pos_embed"] == (1, 256, 1024)  # patches only
    assert shapes["vision_backbone.featurizer.reg_token"] == (1, 4, 1024)
    assert shapes["vision_backbone.featurizer.blocks.23.ls2.scale_factor"] == (1024,)
    assert shapes["vision_backbone.fused_featurizer.pos_embed"] == (1, 256, 1152)
    assert shapes["vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["projector.fc1.weight"] == (8704, 2176)
    assert shapes["language_model.model.layers.31.self_attn.q_proj.weight"] == (4096, 4096)
    assert shapes["language_model.lm_head.weight"] == (32064, 4096)


def test_rms_norm_eps_comes_from_the_checkpoint(tiny_policy):
    assert tiny_policy.config.llm.rms_norm_eps == 1e-5  # the tiny text_config says 1e-5
    assert tiny_policy.backend.modules.llm.model.norm.variance_epsilon == 1e-5


def _manual_tower(vit, x):
    """Second-to-last block output, prefix tokens dropped, no final norm — computed by hand."""
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.norm_pre(x)
    for blk in vit.blocks[: len(vit.blocks) - 1]:
        x = blk(x)
    return x[:, vit.num_prefix_tokens:]


def test_vision_uses_second_to_last_block_without_prefix_tokens(tiny_policy):
    m = tiny_policy.backend.modules
    px = torch.randn(1, 6, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m.vision(px)
        dino = _manual_tower(m.featurizer.vit, px[:, :3])
        siglip = _manual_tower(m.fused_featurizer.vit, px[:, 3:])
    assert m.featurizer.vit.num_prefix_tokens == 5 and m.fused_featurizer.vit.num_prefix_tokens == 0
    assert out.shape == (1, 256, 64 + 144)
    torch.testing.assert_close(out, torch.cat([dino, siglip], dim=2))
    # SigLIP's absolute position embedding is part of its output (the seed port forgot it)
    with torch.no_grad():
        pe = m.fused_featurizer.vit.pos_embed
        saved = pe.clone()
        pe.zero_()
        changed = m.vision(px)
        pe.copy_(saved)
    assert (changed[..., 64:] - out[..., 64:]).abs().max() > 1e-3


def test_vision_layernorm_eps_is_1e6(tiny_policy):
    m = tiny_policy.backend.modules
    for tower in (m.featurizer.vit, m.fused_featurizer.vit):
        assert tower.blocks[0].norm1.eps == 1e-6
