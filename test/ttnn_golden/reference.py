"""Per-stage outputs of the torch reference (the TorchBackend's modules) with the same keys as
TtnnBackend.stage_outputs, and the Pearson correlation used to compare them."""
from __future__ import annotations

import numpy as np
import torch

from openvla_model.modeling import multimodal_embeddings

STAGES = ("dinov2", "siglip", "vision", "projector", "decoder_layer0", "prefill_logits")


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double().reshape(-1)
    b = b.detach().double().reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if torch.equal(a, b):
        return 1.0
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


@torch.inference_mode()
def torch_stage_outputs(modules, pixel_values: torch.Tensor, input_ids: np.ndarray) -> dict:
    dtype = next(modules.parameters()).dtype
    device = next(modules.parameters()).device
    px = pixel_values.to(device, dtype)
    dino = modules.featurizer(px[:, :3])
    sig = modules.fused_featurizer(px[:, 3:])
    feats = torch.cat([dino, sig], dim=2)
    projected = modules.projector(feats)
    llm = modules.llm
    seq = multimodal_embeddings(llm, projected, np.asarray(input_ids))
    out = llm(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1], device=device).view(1, -1),
              output_hidden_states=True, use_cache=False)
    f = lambda t: t.float().cpu()  # noqa: E731
    return {"dinov2": f(dino[0]), "siglip": f(sig[0]), "vision": f(feats[0]), "projector": f(projected[0]),
            "decoder_layer0": f(out.hidden_states[1][0]), "prefill_logits": f(out.logits[0, -1])}


def stage_pccs(ttnn_out: dict, torch_out: dict) -> dict:
    return {k: pcc(ttnn_out[k].reshape(torch_out[k].shape), torch_out[k]) for k in STAGES}


def stage_max_abs_diff(ttnn_out: dict, torch_out: dict) -> dict:
    return {k: float((ttnn_out[k].reshape(torch_out[k].shape).double() - torch_out[k].double()).abs().max())
            for k in STAGES}
