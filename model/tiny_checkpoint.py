"""A complete tiny random OpenVLA checkpoint in the exact HF openvla/openvla-7b layout.

Same file names, tensor key names and structure as the real one (sharded safetensors + index,
config.json with norm_stats incl. bridge_orig, preprocessor_config.json, dataset_statistics.json,
a Llama-style tokenizer built offline), at tiny widths and depths. Vocabulary (32064) and the
action-token range are real, so the action codec, prompt and decoding rules are exercised
exactly. Its actions are MEANINGLESS: random weights.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import DINOV2_MEAN, DINOV2_STD, SIGLIP_MEAN, SIGLIP_STD, TIMM_KWARGS_FIELD, load_config
from .modeling import COMPONENT_PREFIXES, OpenVLAModules, module_to_checkpoint_key
from .prompt import SPACE_TOKEN_ID

log = logging.getLogger("openvla_model")

TIMM_IDS = ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
# Tiny towers keep the real structure: DINOv2 with CLS + 4 registers + LayerScale, SigLIP with
# head dim 72 (1152/16 in the real model) and the attention-pool head.
TINY_TIMM_KWARGS = [
    {"embed_dim": 64, "depth": 3, "num_heads": 2},
    {"embed_dim": 144, "depth": 3, "num_heads": 2, "mlp_ratio": 3.0},
]
# 8 heads of 32 so tensor-parallel splits over 1, 2 and 8 devices all divide evenly.
TINY_TEXT_CONFIG = {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 32064, "pad_token_id": 32000,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

BRIDGE_ORIG = {
    "action": {
        "mean": [0.00023341, 0.00013004, -0.00012762, -0.00015565, -0.00040393, 0.00023557, 0.57679],
        "std": [0.00976, 0.01368, 0.01262, 0.02854, 0.03064, 0.07659, 0.49735],
        "max": [0.41691, 0.25864, 0.21218, 3.12200, 1.86163, 6.28074, 1.0],
        "min": [-0.40469, -0.43677, -0.37917, -3.14159, -1.27046, -6.27241, 0.0],
        "q01": [-0.02872725307941437, -0.04170349963009357, -0.026093858778476715,
                -0.08092105075716972, -0.09288699507713317, -0.20718276381492615, 0.0],
        "q99": [0.028309678435325586, 0.040855254605412394, 0.040161586627364146,
                0.08192047759890528, 0.07792850524187081, 0.20382574498653397, 1.0],
        "mask": [True, True, True, True, True, True, False],
    },
    "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
    "num_transitions": 2135463,
    "num_trajectories": 60064,
}
# A second (made-up) dataset so unnorm_key is required, as with the real 7B checkpoint; no mask.
TINY_OTHER = {
    "action": {
        "mean": [0.0] * 7, "std": [0.1] * 7, "max": [1.0] * 7, "min": [-1.0] * 7,
        "q01": [-0.5, -0.4, -0.3, -0.2, -0.1, -0.05, 0.0], "q99": [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 1.0],
    },
    "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
    "num_transitions": 1000, "num_trajectories": 10,
}

_WORDS = ("in what action should the robot take to out pick up place put move open close push pull the a "
          "red green blue yellow cup block drawer door lid spoon towel bowl plate on into left right of "
          "sink table pot can knife fork carrot corn eggplant").split()


def build_tokenizer_json() -> str:
    """A Llama-2-style BPE tokenizer (byte fallback, '▁' spaces, BOS template) with the real
    special ids (<unk>=0, <s>=1, </s>=2, bytes 3..258, '▁'=29871, <PAD>=32000), 32000 base tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    vocab: dict[str, int] = {}

    def add(tok):
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for t in ("<unk>", "<s>", "</s>"):
        add(t)
    for b in range(256):
        add(f"<0x{b:02X}>")
    chars = [chr(c) for c in range(33, 127)]
    for c in chars:
        add(c)
    merges = []
    for word in dict.fromkeys(_WORDS + [w.capitalize() for w in _WORDS]):
        piece = "▁"
        for ch in word:
            merges.append((piece, ch))
            piece += ch
            add(piece)
    # Pad to the real positions: '▁' at 29871, 32000 base tokens.
    i = 0
    while len(vocab) < SPACE_TOKEN_ID:
        add(f"<tiny_{i}>"); i += 1
    add("▁")
    while len(vocab) < 32000:
        add(f"<tiny_{i}>"); i += 1
    merges = list(dict.fromkeys(merges))
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("<s>", special=True),
                            AddedToken("</s>", special=True), AddedToken("<PAD>", special=True)])
    return tok.to_str()


def tiny_config_json() -> dict:
    return {
        "architectures": ["OpenVLAForActionPrediction"],
        "model_type": "openvla",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "image_sizes": [224, 224],
        "timm_model_ids": TIMM_IDS,
        "timm_override_act_layers": [None, None],
        TIMM_KWARGS_FIELD: TINY_TIMM_KWARGS,
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "llm_max_length": 2048,
        "n_action_bins": 256,
        "pad_token_id": 32000,
        "pad_to_multiple_of": 64,
        "output_projector_states": False,
        "text_config": TINY_TEXT_CONFIG,
        "norm_stats": {"bridge_orig": BRIDGE_ORIG, "tiny_other_dataset": TINY_OTHER},
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "openvla_ros_tiny_random": True,
    }


def preprocessor_config_json() -> dict:
    means, stds = [list(DINOV2_MEAN), list(SIGLIP_MEAN)], [list(DINOV2_STD), list(SIGLIP_STD)]
    return {
        "image_processor_type": "PrismaticImageProcessor",
        "processor_class": "PrismaticProcessor",
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, 224, 224], [3, 224, 224]],
        "interpolations": ["bicubic", "bicubic"],
        "means": means,
        "stds": stds,
        "tvf_crop_params": [{"output_size": [224, 224]}, {"output_size": [224, 224]}],
        "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": m, "std": s} for m, s in zip(means, stds)],
        "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]}] * 2,
        "use_fused_vision_backbone": True,
    }


def _randomise(modules: OpenVLAModules, gen: torch.Generator, first_action: int, last_action: int) -> None:
    with torch.no_grad():
        for name, p in modules.named_parameters():
            if name.endswith(".gamma"):  # LayerScale: real values, not timm's 1e-5 init
                p.copy_(torch.rand(p.shape, generator=gen) * 0.25 + 0.05)
            elif "pos_embed" in name or "cls_token" in name or "reg_token" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        # transformers' init (std 0.02) leaves a tiny random LM that ignores its context and
        # repeats one token; larger attention/MLP weights make tokens depend on image + prompt.
        for name, p in modules.llm.named_parameters():
            if name.endswith("_proj.weight"):
                p.mul_(8.0)
        # Make the random LM prefer action tokens (so the demo and tests see valid actions):
        # damp every other row of the LM head.
        head = modules.llm.lm_head.weight
        head.mul_(0.3)
        head[first_action:last_action + 1].mul_(12.0)


def write_model_files(out_dir: str | Path, cfg: dict, readme: str) -> Path:
    """Everything of the HF layout except the weights: config.json, preprocessor_config.json,
    dataset_statistics.json, the offline tokenizer files, and a README saying what this is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config_json(), indent=2))
    (out / "dataset_statistics.json").write_text(json.dumps(cfg["norm_stats"], indent=2))
    (out / "tokenizer.json").write_text(build_tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<PAD>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
        "padding_side": "right", "legacy": False}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<PAD>"}, indent=2))
    (out / "added_tokens.json").write_text(json.dumps({"<PAD>": 32000}))
    (out / "README.txt").write_text(readme)
    return out


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                          num_shards: int = 3) -> Path:
    from safetensors.torch import save_file

    out = write_model_files(out_dir, tiny_config_json(),
                            "TINY RANDOM OpenVLA test checkpoint written by openvla-tiny-checkpoint.\n"
                            "Same layout and key names as openvla/openvla-7b at tiny sizes. Its actions are MEANINGLESS.\n")

    config = load_config(out)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    modules = OpenVLAModules(config)
    vocab = config.action_vocab_size
    _randomise(modules, gen, vocab - config.n_action_bins, vocab - 1)

    tensors = {}
    for comp in COMPONENT_PREFIXES:
        for k, v in modules.component(comp).state_dict().items():
            tensors[module_to_checkpoint_key(comp, k)] = v.detach().to(dtype).contiguous().clone()
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    keys = list(tensors)
    if num_shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        target, shards, cur, size = total / num_shards, [], [], 0
        for k in keys:
            nbytes = tensors[k].numel() * tensors[k].element_size()
            if cur and size + nbytes > target and len(shards) < num_shards - 1:
                shards.append(cur)
                cur, size = [], 0
            cur.append(k)
            size += nbytes
        if cur:
            shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in shard}, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    log.warning("wrote a TINY RANDOM OpenVLA checkpoint to %s: its actions are meaningless", out)
    return out
