"""A full-size OpenVLA-7B model with RANDOM weights, for benchmarks (no download).

`write_full_config(dir)` writes a weights directory WITHOUT weights: config.json with the
released OpenVLA-7B sizes (DINOv2 ViT-L/14 + SigLIP So400m/14 at 224 px, Llama-2-7B text
config, vocab 32064), preprocessor_config.json, norm_stats, and the offline Llama-style test
tokenizer (real special ids; prompt lengths are close to, not equal to, the real tokenizer's).

`RandomCheckpoint` stands in for `Checkpoint`: it yields every tensor the architecture needs,
random-initialised directly on the target device in the target dtype, so a 7B model in bf16
never exists in fp32 or on the host. Its actions are MEANINGLESS: use it for speed and memory
figures and for comparing two implementations on the same weights, nothing else.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch

from .config import TIMM_KWARGS_FIELD
from .tiny_checkpoint import tiny_config_json, write_model_files

# Llama-2-7B as used by OpenVLA (openvla-spec.md section 4). rms_norm_eps: the LlamaConfig
# default (1e-6); the released checkpoint's text_config is what a real run must read instead.
FULL_TEXT_CONFIG = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 32064, "pad_token_id": 32000,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
# openvla-spec.md section 6: total parameters of the released model.
FULL_PARAM_COUNT = 7_541_237_184

INIT_STD = 0.02  # transformers' / timm's initializer range
LAYER_SCALE_INIT = 0.1  # DINOv2 LayerScale: trained values are O(0.1), not timm's 1e-5 init


def full_config_json() -> dict:
    cfg = tiny_config_json()
    cfg.pop(TIMM_KWARGS_FIELD, None)  # real timm tower sizes
    cfg.pop("openvla_ros_tiny_random", None)
    cfg["text_config"] = dict(FULL_TEXT_CONFIG)
    cfg["openvla_ros_full_random"] = True
    return cfg


def write_full_config(out_dir: str | Path) -> Path:
    """Write config.json, preprocessor_config.json, dataset_statistics.json and the test
    tokenizer (no weights) for the full-size architecture."""
    return write_model_files(
        out_dir, full_config_json(),
        "Full-size OpenVLA-7B config WITHOUT weights, written by openvla_model.full_config for benchmarks.\n"
        "Pair it with RandomCheckpoint: random weights, meaningless actions.\n")


class RandomCheckpoint:
    """Duck-types `checkpoint.Checkpoint` (validate / keys / load) with random tensors.

    validate() records the shapes the architecture expects; load() creates each tensor on the
    requested device and dtype and fills it there (deterministic per key and seed)."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.shapes: dict[str, tuple] = {}
        self.dir = None

    def validate(self, expected: dict[str, tuple]) -> None:
        self.shapes = {k: tuple(v) for k, v in expected.items()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def load(self, keys, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        device = torch.device(device)
        dtype = dtype or torch.bfloat16
        gen = torch.Generator(device=device)
        for key in keys:
            shape = self.shapes[key]
            t = torch.empty(shape, dtype=dtype, device=device)
            gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            _fill(key, t, gen)
            yield key, t


def _fill(key: str, t: torch.Tensor, gen: torch.Generator) -> None:
    leaf = key.rsplit(".", 1)[-1]
    parts = key.split(".")
    is_norm = len(parts) >= 2 and "norm" in parts[-2]
    if leaf == "scale_factor":
        t.fill_(LAYER_SCALE_INIT)
    elif is_norm and leaf == "weight":
        t.fill_(1.0)  # LayerNorm / RMSNorm gains
    elif is_norm and leaf == "bias":
        t.zero_()
    else:  # linear / conv weights and biases, embeddings, pos_embed, cls / register tokens
        t.normal_(0.0, INIT_STD, generator=gen)
