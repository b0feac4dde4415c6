"""The OpenVLA network as PyTorch modules, built from the config alone (no I/O here).

Used by the torch backend, the tiny-checkpoint generator, and as the reference the TT-NN
backend is compared against.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import OpenVLAConfig, TowerConfig

# Checkpoint prefixes (HF openvla/openvla-7b) -> our component names. One place for key mapping.
COMPONENT_PREFIXES = {
    "featurizer": "vision_backbone.featurizer.",
    "fused_featurizer": "vision_backbone.fused_featurizer.",
    "projector": "projector.",
    "llm": "language_model.",
}
# HF checkpoints rename timm's LayerScale `gamma` to `scale_factor` (the official code patches timm).
_LS_CKPT, _LS_TIMM = ".scale_factor", ".gamma"


def checkpoint_to_module_key(ckpt_key: str) -> tuple[str, str] | None:
    """'vision_backbone.featurizer.blocks.0.ls1.scale_factor' -> ('featurizer', 'blocks.0.ls1.gamma')."""
    for comp, prefix in COMPONENT_PREFIXES.items():
        if ckpt_key.startswith(prefix):
            local = ckpt_key[len(prefix):]
            if comp in ("featurizer", "fused_featurizer") and local.endswith(_LS_CKPT):
                local = local[: -len(_LS_CKPT)] + _LS_TIMM
            return comp, local
    return None


def module_to_checkpoint_key(comp: str, local: str) -> str:
    if comp in ("featurizer", "fused_featurizer") and local.endswith(_LS_TIMM):
        local = local[: -len(_LS_TIMM)] + _LS_CKPT
    return COMPONENT_PREFIXES[comp] + local


class VisionTower(nn.Module):
    """A timm ViT returning the second-to-last block's patch tokens (prefix tokens dropped,
    no final norm), exactly what OpenVLA's get_intermediate_layers(n={depth-2}) gives. The last
    block is not computed (its output is thrown away by the official code)."""

    def __init__(self, tower: TowerConfig):
        super().__init__()
        import timm

        self.vit = timm.create_model(
            tower.timm_id, pretrained=False, num_classes=0, img_size=tower.image_size,
            act_layer=tower.act_layer, **tower.kwargs)
        self.layer_index = len(self.vit.blocks) - 2

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_intermediates(
            pixels, indices=[self.layer_index], norm=False, output_fmt="NLC",
            intermediates_only=True, stop_early=True)[0]


class Projector(nn.Module):
    """no-align+fused-gelu-mlp: fc1 (vd->4vd) GELU fc2 (4vd->llm) GELU fc3 (llm->llm)."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def multimodal_embeddings(llm: nn.Module, projected: torch.Tensor, input_ids) -> torch.Tensor:
    """The LLM input (openvla-spec.md section 4): [emb(BOS), projected patches, emb(prompt[1:])]."""
    ids = torch.as_tensor(input_ids, device=projected.device).view(1, -1)
    emb = llm.get_input_embeddings()(ids)
    return torch.cat([emb[:, :1], projected.to(emb.dtype), emb[:, 1:]], dim=1)


def build_llm(config: OpenVLAConfig) -> nn.Module:
    from transformers import LlamaForCausalLM

    llm_cfg = config.llm
    llm_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(llm_cfg)


class OpenVLAModules(nn.Module):
    """Container with the four components under the names COMPONENT_PREFIXES uses."""

    def __init__(self, config: OpenVLAConfig):
        super().__init__()
        self.featurizer = VisionTower(config.towers[0])
        self.fused_featurizer = VisionTower(config.towers[1])
        self.projector = Projector(self.vision_dim, config.llm.hidden_size)
        self.llm = build_llm(config)

    @property
    def vision_dim(self) -> int:
        return self.featurizer.embed_dim + self.fused_featurizer.embed_dim  # 1024 + 1152 = 2176

    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 6, 224, 224) -> (B, 256, 2176): DINOv2 on channels 0-2, SigLIP on 3-5, concatenated."""
        return torch.cat([self.featurizer(pixel_values[:, :3]), self.fused_featurizer(pixel_values[:, 3:])], dim=2)

    def component(self, name: str) -> nn.Module:
        """The module whose state_dict keys follow a checkpoint prefix (towers: the timm ViT)."""
        module = getattr(self, name)
        return module.vit if isinstance(module, VisionTower) else module

    def expected_checkpoint_shapes(self) -> dict[str, tuple]:
        """Every checkpoint key this architecture needs, with its shape."""
        out = {}
        for comp in COMPONENT_PREFIXES:
            for k, v in self.component(comp).state_dict(keep_vars=True).items():
                out[module_to_checkpoint_key(comp, k)] = tuple(v.shape)
        return out
