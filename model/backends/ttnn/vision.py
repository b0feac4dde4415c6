"""DINOv2 and SigLIP towers from ttnn ops, replicated on every chip of the mesh.

Faithful to timm / OpenVLA (openvla-spec.md section 1): patch embedding (conv as one matmul over
host-side im2col), absolute position embedding added to the 256 patches (both towers — the
seed forgot SigLIP's), DINOv2's CLS + 4 register tokens, LayerNorm eps read from the tower's
timm model (1e-6 for both; the seed left SigLIP at ttnn's default), exact GELU, LayerScale
(DINOv2), output = the second-to-last block before the final norm, prefix tokens dropped; the
last block is not computed.

Device layout: attention is permutation-equivariant (no positional bias inside the blocks), so
DINOv2's 5 prefix tokens go AFTER the 256 patches, padded with zero rows to 288 = 9 tiles; an
additive mask keeps the 27 padding rows out of every softmax. Patch outputs are rows 0..255.
SigLIP's head dim 72 is zero-padded to 96 (q.k unchanged; scale stays 1/sqrt(72)).
"""
from __future__ import annotations

import math

import torch

from .weights import TILE, as_row, pad_dim, pad_heads, patch_weight, patchify, round_up

MASK_NEG = -1e9


def _layer_norm_eps(vit) -> float:
    """The eps of the tower's block LayerNorms, as timm built them (one value for every block)."""
    eps = {float(getattr(blk, n).eps) for blk in vit.blocks for n in ("norm1", "norm2")}
    if len(eps) != 1:
        raise ValueError(f"vision tower: block LayerNorms disagree on eps ({sorted(eps)})")
    return eps.pop()


class VisionTower:
    def __init__(self, tt, mesh, profile, store, comp: str, tower_cfg, image_size: int):
        import timm  # only for the architecture's sizes (no weights, built on the meta device)

        self.tt, self.mesh, self.profile, self.comp = tt, mesh, profile, comp
        with torch.device("meta"):
            vit = timm.create_model(tower_cfg.timm_id, pretrained=False, num_classes=0, img_size=image_size,
                                    act_layer=tower_cfg.act_layer, **tower_cfg.kwargs)
        self.embed_dim = e = vit.embed_dim
        self.heads = vit.blocks[0].attn.num_heads
        self.head_dim = e // self.heads
        self.head_dim_padded = round_up(self.head_dim, TILE)
        self.patch = vit.patch_embed.patch_size[0]
        self.channels = vit.patch_embed.proj.in_channels
        self.num_patches = (image_size // self.patch) ** 2
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 0))
        self.has_layer_scale = hasattr(vit.blocks[0].ls1, "gamma")
        self.mlp_hidden = vit.blocks[0].mlp.fc1.out_features
        self.mlp_hidden_padded = round_up(self.mlp_hidden, TILE)
        self.k_padded = round_up(self.channels * self.patch * self.patch, TILE)
        # get_intermediate_layers(n={depth-2}): blocks 0..depth-2 run, the last one never.
        self.num_blocks_run = len(vit.blocks) - 1
        self.seq = self.num_patches + (round_up(self.num_prefix, TILE) if self.num_prefix else 0)
        self.eps = _layer_norm_eps(vit)
        del vit

        dt = profile.dtype(tt, "vision")
        self.act_dtype = profile.dtype(tt, "activations")
        self.compute = profile.compute_config(tt, "vision")
        self.sdpa_compute = profile.compute_config(tt, "sdpa")
        raw = lambda local: store.raw(comp, local)  # noqa: E731
        p = f"{comp}"
        self.w_patch = store.put(f"{p}.patch.w", lambda: patch_weight(raw("patch_embed.proj.weight"), self.k_padded), dt)
        self.b_patch = store.put(f"{p}.patch.b", lambda: as_row(raw("patch_embed.proj.bias")), dt)
        self.pos = store.put(f"{p}.pos", lambda: raw("pos_embed").reshape(1, 1, self.num_patches, e), self.act_dtype)
        self.prefix = None
        self.mask = None
        if self.num_prefix:
            def prefix():
                toks = [raw("cls_token").reshape(-1, e)]
                if self.num_prefix > 1:
                    toks.append(raw("reg_token").reshape(-1, e))
                return pad_dim(torch.cat(toks, 0), 0, self.seq - self.num_patches).reshape(1, 1, -1, e)

            def mask():
                m = torch.zeros(1, 1, self.seq, self.seq)
                m[..., self.num_patches + self.num_prefix:] = MASK_NEG  # padding keys
                return m

            self.prefix = store.put(f"{p}.prefix", prefix, self.act_dtype)
            self.mask = store.put(f"{p}.mask", mask, tt.bfloat16)
        h, d, dp = self.heads, self.head_dim, self.head_dim_padded
        self.blocks = []
        for i in range(self.num_blocks_run):
            b = f"blocks.{i}."
            blk = {
                "n1w": store.put(f"{p}.{b}n1w", lambda b=b: as_row(raw(b + "norm1.weight")), tt.bfloat16),
                "n1b": store.put(f"{p}.{b}n1b", lambda b=b: as_row(raw(b + "norm1.bias")), tt.bfloat16),
                "n2w": store.put(f"{p}.{b}n2w", lambda b=b: as_row(raw(b + "norm2.weight")), tt.bfloat16),
                "n2b": store.put(f"{p}.{b}n2b", lambda b=b: as_row(raw(b + "norm2.bias")), tt.bfloat16),
                "qkv_w": store.put(f"{p}.{b}qkv_w", lambda b=b: pad_heads(
                    raw(b + "attn.qkv.weight"), 3, h, d, dp).transpose(0, 1), dt),
                "qkv_b": store.put(f"{p}.{b}qkv_b", lambda b=b: as_row(pad_heads(
                    raw(b + "attn.qkv.bias"), 3, h, d, dp)), dt),
                "proj_w": store.put(f"{p}.{b}proj_w", lambda b=b: pad_heads(
                    raw(b + "attn.proj.weight"), 1, h, d, dp, dim=1).transpose(0, 1), dt),
                "proj_b": store.put(f"{p}.{b}proj_b", lambda b=b: as_row(raw(b + "attn.proj.bias")), dt),
                "fc1_w": store.put(f"{p}.{b}fc1_w", lambda b=b: pad_dim(
                    raw(b + "mlp.fc1.weight").transpose(0, 1), 1, self.mlp_hidden_padded), dt),
                "fc1_b": store.put(f"{p}.{b}fc1_b", lambda b=b: as_row(pad_dim(
                    raw(b + "mlp.fc1.bias"), 0, self.mlp_hidden_padded)), dt),
                "fc2_w": store.put(f"{p}.{b}fc2_w", lambda b=b: pad_dim(
                    raw(b + "mlp.fc2.weight").transpose(0, 1), 0, self.mlp_hidden_padded), dt),
                "fc2_b": store.put(f"{p}.{b}fc2_b", lambda b=b: as_row(raw(b + "mlp.fc2.bias")), dt),
            }
            if self.has_layer_scale:
                blk["ls1"] = store.put(f"{p}.{b}ls1", lambda b=b: as_row(raw(b + "ls1.gamma")), tt.bfloat16)
                blk["ls2"] = store.put(f"{p}.{b}ls2", lambda b=b: as_row(raw(b + "ls2.gamma")), tt.bfloat16)
            self.blocks.append(blk)

    def patches_to_device(self, pixels: torch.Tensor):
        """(1, 3, H, W) float normalised pixels -> replicated (1, 1, 256, K) im2col on the mesh."""
        tt = self.tt
        host = patchify(pixels.float(), self.patch, self.k_padded)
        return tt.from_torch(host, dtype=tt.bfloat16, layout=tt.TILE_LAYOUT, device=self.mesh.device,
                             mesh_mapper=tt.ReplicateTensorToMesh(self.mesh.device))

    def _attention(self, x, blk):
        tt, s = self.tt, self.seq
        h, dp = self.heads, self.head_dim_padded
        qkv = tt.linear(x, blk["qkv_w"], bias=blk["qkv_b"], compute_kernel_config=self.compute, dtype=self.act_dtype)
        heads = []
        for j in range(3):
            part = tt.slice(qkv, [0, 0, 0, j * h * dp], [1, 1, s, (j + 1) * h * dp])
            heads.append(tt.permute(tt.reshape(part, (1, s, h, dp)), (0, 2, 1, 3)))  # (1, h, s, dp)
        q, k, v = heads
        o = tt.transformer.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, is_causal=False, scale=1.0 / math.sqrt(self.head_dim),
            compute_kernel_config=self.sdpa_compute)
        o = tt.reshape(tt.permute(o, (0, 2, 1, 3)), (1, 1, s, h * dp))
        return tt.linear(o, blk["proj_w"], bias=blk["proj_b"], compute_kernel_config=self.compute, dtype=self.act_dtype)

    def _mlp(self, x, blk):
        tt = self.tt
        h = tt.linear(x, blk["fc1_w"], bias=blk["fc1_b"], compute_kernel_config=self.compute, dtype=self.act_dtype)
        h = tt.gelu(h)  # exact (erf) GELU, as timm's nn.GELU
        return tt.linear(h, blk["fc2_w"], bias=blk["fc2_b"], compute_kernel_config=self.compute, dtype=self.act_dtype)

    def __call__(self, patches):
        """Replicated im2col patches -> (1, 1, 256, E) patch features of the second-to-last block."""
        tt = self.tt
        x = tt.linear(patches, self.w_patch, bias=self.b_patch, compute_kernel_config=self.compute, dtype=self.act_dtype)
        x = tt.add(x, self.pos)  # pos_embed on the patches only (prefix tokens get none)
        if self.prefix is not None:
            x = tt.concat([x, self.prefix], dim=2)
        for blk in self.blocks:
            y = tt.layer_norm(x, weight=blk["n1w"], bias=blk["n1b"], epsilon=self.eps, compute_kernel_config=self.compute)
            y = self._attention(y, blk)
            if "ls1" in blk:
                y = tt.multiply(y, blk["ls1"])
            x = tt.add(x, y)
            y = tt.layer_norm(x, weight=blk["n2w"], bias=blk["n2b"], epsilon=self.eps, compute_kernel_config=self.compute)
            y = self._mlp(y, blk)
            if "ls2" in blk:
                y = tt.multiply(y, blk["ls2"])
            x = tt.add(x, y)
        if self.seq != self.num_patches:
            x = tt.slice(x, [0, 0, 0, 0], [1, 1, self.num_patches, self.embed_dim])
        return x


class FusedVision:
    """DINOv2 on channels 0-2, SigLIP on 3-5, features concatenated -> (1, 1, 256, 2176)."""

    def __init__(self, tt, mesh, profile, store, config):
        self.tt = tt
        self.towers = [VisionTower(tt, mesh, profile, store, "featurizer", config.towers[0], config.image_size),
                       VisionTower(tt, mesh, profile, store, "fused_featurizer", config.towers[1], config.image_size)]
        self.dim = sum(t.embed_dim for t in self.towers)

    def tower_outputs(self, pixel_values: torch.Tensor):
        px = pixel_values[:1]
        return [t(t.patches_to_device(px[:, 3 * i:3 * i + 3])) for i, t in enumerate(self.towers)]

    def __call__(self, pixel_values: torch.Tensor):
        return self.tt.concat(self.tower_outputs(pixel_values), dim=3)
