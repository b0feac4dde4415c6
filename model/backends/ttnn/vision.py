"""DINOv2 and SigLIP, split across the chips: each chip runs ONE tower, their features are
all-gathered so every chip holds both for the replicated projector.

Faithful to timm / OpenVLA (openvla-spec.md section 1): patch embedding (conv as one matmul over
host-side im2col), absolute position embedding added to the 256 patches (both towers), DINOv2's
CLS + 4 register tokens, LayerNorm eps read from the towers' timm models (1e-6 for both), exact
GELU, LayerScale (DINOv2), output = the second-to-last block before the final norm, prefix tokens
dropped; the last block is not computed.

How the towers are split (issue 12 item 4). N300: DINOv2 on chip 0, SigLIP on chip 1. T3K: chips
0-3 run DINOv2, chips 4-7 SigLIP (each group holds its tower whole). No submeshes: the two
towers are ONE op sequence over the whole mesh whose weights are sharded by tower
(`ShardTensorToMesh(dim=0)` over the chips' weights stacked along dim 0), so every op runs on
every chip on that chip's tower. That needs one shape for both towers; the weights absorb the
differences, so no op is added per block:
- width: DINOv2's residual (1024) is carried at SigLIP's 1152. The 128 extra columns hold the
  row MEAN of the real ones (every weight that writes into the residual gets extra output
  columns equal to the mean of its real columns: patch embedding, position embedding, prefix
  tokens, attention projection, fc2; all linear, so the invariant holds after every add), and
  the whole DINOv2 residual is scaled by s = sqrt(1152/1024). Then the 1152-wide LayerNorm sees
  the real mean and (8/9) s^2 v = v as variance: exactly the 1024-wide LayerNorm of the
  unscaled stream times s, which the norm gains (divided by s, zero on the extra columns)
  undo. The projector's fc1 reads DINOv2's features divided by s and never reads the 128
  extra columns (zero rows, projector.py).
- heads: DINOv2's head dim 64 and SigLIP's 72 are zero-padded to 96 (q.k unchanged; zero V
  columns meet zero rows of the projection); the softmax scale 1/sqrt(head_dim) differs per
  tower, so it is folded into each tower's Q weights and bias and SDPA runs with scale 1.
  Fewer heads than the other tower would be padded with zero heads (both have 16).
- MLP: 4096 and 4304 both zero-padded to 4320 (GELU(0) = 0 meets zero rows of fc2).
- depth: DINOv2 runs 23 blocks, SigLIP 26; DINOv2's chips run 3 more blocks with all-zero
  weights, which are the identity (LayerNorm with zero gain gives 0, so both branches add 0).
  SigLIP's chips are the critical path either way.
- rows: 288 on both (DINOv2: 256 patches + CLS + 4 registers, zero rows to 9 tiles; SigLIP: 256
  patches + 32 zero rows); a per-chip additive mask keeps the padding rows out of every softmax.
  Attention is permutation-equivariant, so DINOv2's prefix tokens go after the patches.
- LayerScale (DINOv2) is folded into the projection and fc2 weights and biases.
Cost: SigLIP's chips compute 288 rows instead of 256; DINOv2's chips compute SigLIP-sized
blocks. Per chip that is about half of running both towers (the op report's vision row).

Heads are split and merged with `nlp_create_qkv_heads` (fused [Q heads | K heads | V heads] ->
(1, heads, rows, 96) each, K not transposed) and `nlp_concat_heads`, as tt_transformers' image
attention does: no slice, tiled reshape or permute (whose ReshapeView uploaded an index table
from the host inside the op).

Traced (`trace=True`, off on mock devices: they cannot capture): the first call runs the stage
op by op (compiles every program), then captures the same ops as one trace reading a
preallocated patch tensor; later calls write the image patches into it
(`copy_host_to_device_tensor`, the only host transfer of the stage) and replay the trace, which
leaves the features in the tensor the capture produced; the call returns a copy of it (one
`copy` into one of FEATURE_BUFFERS buffers allocated before the capture, used in turn), so the
features of the last FEATURE_BUFFERS calls stay valid (OFT keeps one per image).

Batched (issue 14: one accelerator, several robots): `__call__` takes pixel_values (B, 6, H, W)
for any B >= 1 and returns (B, 1, 256, dim) on every chip, item b = image b, each item computed
exactly as alone (every op is row-wise or per item: no op mixes items).
- Layout: the batch is dim 0 of every activation, [B, 1, rows, width] per chip. The host stacks
  the chips' blocks along dim 0: chip i's block is (B, 1, 256, K), the im2col of its tower's 3
  channels for the B images, and the blocks are concatenated in chip order, so
  `ShardTensorToMesh(dim=0)` (N equal contiguous chunks of dim 0) hands chip i exactly its B
  items: still ONE upload per call. The heads ops and SDPA take the batch dim as it is
  ([B, 1, S, W] -> [B, heads, S, d] -> [B, 1, S, W]); the final slice and T3K's tower concat
  keep it.
- Weights, biases, norm gains and the position embedding are (1, 1, ., .) and broadcast over the
  batch (binary ops broadcast dim 0; the linears' activations are [B, 1, S, K] x [K, N]). The
  additive SDPA mask stays (1, 1, S, S): ttnn's SDPA broadcasts a mask of batch 1 over Q's batch
  (its validation: "Mask batch dim must either be 1 (to be broadcasted across all batches) or
  must match Q batch dimension"). The prefix rows are concatenated along the rows, which needs
  the same batch: for B > 1 ONE device op per call (`concat` of B copies of the (1, 1, 32, width)
  prefix along dim 0) makes the (B, 1, 32, width) block, inside the op sequence and so inside the
  trace. Not cached per B: a tensor allocated after a trace was captured may sit where that
  trace keeps its intermediates and be overwritten by its next replay, and a constant is read on
  every replay. B = 1 runs exactly the op sequence of the unbatched stage (no added op).
- Traced: one trace per batch size B, captured on the first call with that B (op by op first,
  then the capture, as above), each with its own preallocated (B, 1, 256, K) patch input and its
  own FEATURE_BUFFERS output copies; `release()` releases every one. A batch size's input and
  copies are allocated at its first call, possibly after another trace (another B's, the LLM's)
  was captured, so such a trace's replay may overwrite them (its intermediates may sit where
  they were allocated). The input is written right before its own replay: safe. The copies a
  call hands out stay valid until FEATURE_BUFFERS more calls with the same B, and across
  replays of traces captured after that B's first call; a trace captured before it may
  overwrite them, so consume them first (the backend runs the projector right after the
  vision; OFT's per-image features are B = 1 calls in a row). Calling each batch size once
  before the LLM's first capture puts every vision allocation before every capture.
- Cost: one upload (B x 311 kB per chip) and the op count of B = 1 (+1 concat for B > 1) per
  call, whatever B; the matmuls, norms and SDPA work on B x 288 rows per chip and read each
  weight once for all items. What B shares is the per-op overhead and the weight reads; the
  math (about 240 GFLOP per image per chip at full depth, estimate) grows with B, so the time
  per image falls with B towards the compute-bound figure. Modelled on N300 (op report
  `--batch 1,2,4`, 2026-12-01): 319 ops / 11.4 ms at B = 1, 320 ops / 18.6 ms at B = 2 (9.3 ms
  per image), 320 ops / 33.5 ms at B = 4 (8.4 ms per image).
  Activations: the largest per-chip tensor is the MLP's (B, 1, 288, 4320) bf16, 2.5 MB per
  item; the full model on the mock N300 ran vision + projector at B = 4 within its DRAM.
"""
from __future__ import annotations

import math

import torch

from .ccl import CCL
from .weights import TILE, pad_dim, patch_weight, patchify, round_up

MASK_NEG = -1e9
FEATURE_BUFFERS = 4  # traced: the features of this many consecutive calls stay valid


def _layer_norm_eps(vit) -> float:
    """The eps of the tower's block LayerNorms, as timm built them (one value for every block)."""
    eps = {float(getattr(blk, n).eps) for blk in vit.blocks for n in ("norm1", "norm2")}
    if len(eps) != 1:
        raise ValueError(f"vision tower: block LayerNorms disagree on eps ({sorted(eps)})")
    return eps.pop()


class TowerSpec:
    """One timm tower's sizes (built on the meta device: no weights)."""

    def __init__(self, comp: str, tower_cfg, image_size: int):
        import timm

        with torch.device("meta"):
            vit = timm.create_model(tower_cfg.timm_id, pretrained=False, num_classes=0, img_size=image_size,
                                    act_layer=tower_cfg.act_layer, **tower_cfg.kwargs)
        self.comp = comp
        self.embed_dim = vit.embed_dim
        self.heads = vit.blocks[0].attn.num_heads
        self.head_dim = self.embed_dim // self.heads
        self.patch = vit.patch_embed.patch_size[0]
        self.channels = vit.patch_embed.proj.in_channels
        self.num_patches = (image_size // self.patch) ** 2
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 0))
        self.has_layer_scale = hasattr(vit.blocks[0].ls1, "gamma")
        self.mlp_hidden = vit.blocks[0].mlp.fc1.out_features
        # get_intermediate_layers(n={depth-2}): blocks 0..depth-2 run, the last one never.
        self.num_blocks_run = len(vit.blocks) - 1
        self.eps = _layer_norm_eps(vit)


class TowerLayout:
    """How one tower's tensors map onto the common per-chip shape (see the module docstring)."""

    def __init__(self, spec: TowerSpec, width: int, heads: int, head_dim: int, mlp: int):
        self.spec = spec
        self.width, self.heads, self.head_dim, self.mlp = width, heads, head_dim, mlp
        self.scale = math.sqrt(width / spec.embed_dim)  # residual scale s (1 for the widest tower)

    # ---- transforms (pure torch, host; `w` in (in, out) layout) ---------------------------------
    def residual_out(self, w: torch.Tensor) -> torch.Tensor:
        """Last dim E -> width: extra columns = the mean of the real ones, all scaled by s."""
        e = self.spec.embed_dim
        if self.width > e:
            w = torch.cat([w, w.mean(-1, keepdim=True).expand(*w.shape[:-1], self.width - e)], -1)
        return w * self.scale

    def residual_in(self, w: torch.Tensor) -> torch.Tensor:
        """Rows read from a LayerNorm output (dim 0, E -> width): zero rows for the extra columns."""
        return pad_dim(w, 0, self.width)

    def norm_gain(self, g: torch.Tensor) -> torch.Tensor:
        return pad_dim(g / self.scale, 0, self.width)

    def norm_bias(self, b: torch.Tensor) -> torch.Tensor:
        return pad_dim(b, 0, self.width)

    def heads_layout(self, t: torch.Tensor, groups: int, dim: int = 0) -> torch.Tensor:
        """dim laid out as [group][head][head_dim] -> [group][heads][self.head_dim], zero-padded."""
        s = self.spec
        moved = t.movedim(dim, 0)
        rest = moved.shape[1:]
        moved = moved.reshape(groups, s.heads, s.head_dim, *rest)
        moved = pad_dim(pad_dim(moved, 2, self.head_dim), 1, self.heads)
        return moved.reshape(groups * self.heads * self.head_dim, *rest).movedim(0, dim)

    def qkv_scale(self, t: torch.Tensor) -> torch.Tensor:
        """The softmax scale 1/sqrt(head_dim) on Q (dim 0 = [Q | K | V] of the torch layout)."""
        t = t.clone()
        e = self.spec.embed_dim
        t[:e] *= 1.0 / math.sqrt(self.spec.head_dim)
        return t


class FusedVision:
    """DINOv2 on channels 0-2, SigLIP on 3-5, split over the chips (module docstring); returns
    the gathered features (B, 1, 256, 2 x width) on every chip: [DINOv2 (x s, + mean columns) |
    SigLIP], item b = image b. `feature_layout` says where each tower's real features are
    (projector.py)."""

    def __init__(self, tt, mesh, profile, store, config, trace: bool = False):
        self.tt, self.mesh, self.store = tt, mesh, store
        self.trace = bool(trace)
        n = mesh.num_devices
        if n < 2 or n % 2:
            raise ValueError(f"vision split: needs an even number of chips, the mesh has {n}")
        self.group = n // 2  # chips per tower: tower of chip i = i // group
        specs = [TowerSpec("featurizer", config.towers[0], config.image_size),
                 TowerSpec("fused_featurizer", config.towers[1], config.image_size)]
        self.specs = specs
        a, b = specs
        if (a.patch, a.channels, a.num_patches) != (b.patch, b.channels, b.num_patches):
            raise ValueError("vision split: the towers' patch embeddings differ")
        if a.eps != b.eps:
            raise ValueError(f"vision split: the towers' LayerNorm eps differ ({a.eps}, {b.eps})")
        self.eps = a.eps
        self.num_patches = a.num_patches
        self.width = max(s.embed_dim for s in specs)
        self.heads = max(s.heads for s in specs)
        self.head_dim = round_up(max(s.head_dim for s in specs), TILE)
        self.mlp = round_up(max(s.mlp_hidden for s in specs), TILE)
        self.k_padded = round_up(a.channels * a.patch * a.patch, TILE)
        prefix = max(s.num_prefix for s in specs)
        self.seq = self.num_patches + (round_up(prefix, TILE) if prefix else 0)
        self.num_blocks = max(s.num_blocks_run for s in specs)
        self.layouts = [TowerLayout(s, self.width, self.heads, self.head_dim, self.mlp) for s in specs]
        self.dim = 2 * self.width  # width of the gathered features
        # (offset in the gathered features, real width, factor that gives timm's features)
        self.feature_layout = [(j * self.width, lay.spec.embed_dim, 1.0 / lay.scale)
                               for j, lay in enumerate(self.layouts)]

        self.act_dtype = profile.dtype(tt, "activations")
        self.compute = profile.compute_config(tt, "vision")
        self.sdpa_compute = profile.compute_config(tt, "sdpa")
        dt = profile.dtype(tt, "vision")
        self.ccl = CCL(tt, mesh)  # the features' all-gather (own semaphores: the vision trace has its own cycle)
        self.w_patch = self._put("patch.w", lambda lay: lay.residual_out(
            patch_weight(self._raw(lay, "patch_embed.proj.weight"), self.k_padded)), dt)
        self.b_patch = self._put("patch.b", lambda lay: _row(lay.residual_out(self._raw(lay, "patch_embed.proj.bias"))),
                                 dt)
        self.pos = self._put("pos", lambda lay: lay.residual_out(
            self._raw(lay, "pos_embed").reshape(1, 1, self.num_patches, -1)), self.act_dtype)
        self.prefix = self.mask = None
        if self.seq != self.num_patches:
            self.prefix = self._put("prefix", self._prefix_rows, self.act_dtype)
            self.mask = self._put("mask", self._mask, tt.bfloat16)
        self.blocks = [self._block(i, dt) for i in range(self.num_blocks)]
        self._traces: dict[int, _Traced] = {}  # batch size -> its trace, input and output copies

    # ---- weights -------------------------------------------------------------------------------
    def _raw(self, lay: TowerLayout, local: str) -> torch.Tensor:
        return self.store.raw(lay.spec.comp, local)

    def _put(self, name: str, per_tower, dtype):
        """One mesh tensor: chip i holds per_tower(layout of its tower), stacked along dim 0."""
        def make():
            parts = [per_tower(lay) for lay in self.layouts]
            if any(p.is_meta for p in parts):  # shapes only (the op report's meta checkpoint)
                parts = [p.to("meta") for p in parts]
            return torch.cat([parts[i // self.group] for i in range(self.mesh.num_devices)], 0)

        return self.store.put(f"featurizers.{name}", make, dtype, shard_dim=0)

    def _prefix_rows(self, lay: TowerLayout) -> torch.Tensor:
        s, e = lay.spec, lay.spec.embed_dim
        rows = torch.zeros(self.seq - self.num_patches, e)
        if s.num_prefix:
            toks = [self._raw(lay, "cls_token").reshape(-1, e)]
            if s.num_prefix > 1:
                toks.append(self._raw(lay, "reg_token").reshape(-1, e))
            rows = pad_dim(torch.cat(toks, 0), 0, rows.shape[0])
        return lay.residual_out(rows).reshape(1, 1, -1, self.width)

    def _mask(self, lay: TowerLayout) -> torch.Tensor:
        m = torch.zeros(1, 1, self.seq, self.seq)
        m[..., self.num_patches + lay.spec.num_prefix:] = MASK_NEG  # padding keys
        return m

    def _block(self, i: int, dt):
        tt = self.tt
        b = f"blocks.{i}."

        def real(lay):
            return i < lay.spec.num_blocks_run  # else: an identity block (all-zero weights)

        def w(name, shape_fn, fn):
            def per_tower(lay):
                return fn(lay) if real(lay) else torch.zeros(shape_fn(lay))
            return per_tower

        raw = lambda lay, k: self._raw(lay, b + k)  # noqa: E731
        width, qkv_w, f = self.width, 3 * self.heads * self.head_dim, self.mlp

        def ls(lay, k):
            return raw(lay, k + ".gamma") if lay.spec.has_layer_scale else None

        def out_weight(lay, wk, bk, lsk, rows_fn):
            w_ = rows_fn(raw(lay, wk).transpose(0, 1))
            b_ = raw(lay, bk)
            g = ls(lay, lsk)
            if g is not None:  # LayerScale folded: g * (x @ W + b) = x @ (W g) + b g
                w_, b_ = w_ * g, b_ * g
            return lay.residual_out(w_), lay.residual_out(b_)

        row = lambda fn: (lambda lay: _row(fn(lay)))  # noqa: E731
        zrow = lambda n: (lambda lay: (1, 1, 1, n))  # noqa: E731
        put = lambda name, shape_fn, fn, dtype: self._put(b + name, w(name, shape_fn, fn), dtype)  # noqa: E731
        blk = {
            "n1w": put("n1w", zrow(width), row(lambda lay: lay.norm_gain(raw(lay, "norm1.weight"))), tt.bfloat16),
            "n1b": put("n1b", zrow(width), row(lambda lay: lay.norm_bias(raw(lay, "norm1.bias"))), tt.bfloat16),
            "n2w": put("n2w", zrow(width), row(lambda lay: lay.norm_gain(raw(lay, "norm2.weight"))), tt.bfloat16),
            "n2b": put("n2b", zrow(width), row(lambda lay: lay.norm_bias(raw(lay, "norm2.bias"))), tt.bfloat16),
            "qkv_w": put("qkv_w", lambda lay: (width, qkv_w), lambda lay: lay.residual_in(
                lay.heads_layout(lay.qkv_scale(raw(lay, "attn.qkv.weight")), 3).transpose(0, 1)), dt),
            "qkv_b": put("qkv_b", zrow(qkv_w), row(lambda lay: lay.heads_layout(
                lay.qkv_scale(raw(lay, "attn.qkv.bias")), 3)), dt),
            "proj_w": put("proj_w", lambda lay: (self.heads * self.head_dim, width), lambda lay: out_weight(
                lay, "attn.proj.weight", "attn.proj.bias", "ls1", lambda t: lay.heads_layout(t, 1))[0], dt),
            "proj_b": put("proj_b", zrow(width), row(lambda lay: out_weight(
                lay, "attn.proj.weight", "attn.proj.bias", "ls1", lambda t: lay.heads_layout(t, 1))[1]), dt),
            "fc1_w": put("fc1_w", lambda lay: (width, f), lambda lay: lay.residual_in(
                pad_dim(raw(lay, "mlp.fc1.weight").transpose(0, 1), 1, f)), dt),
            "fc1_b": put("fc1_b", zrow(f), row(lambda lay: pad_dim(raw(lay, "mlp.fc1.bias"), 0, f)), dt),
            "fc2_w": put("fc2_w", lambda lay: (f, width), lambda lay: out_weight(
                lay, "mlp.fc2.weight", "mlp.fc2.bias", "ls2", lambda t: pad_dim(t, 0, f))[0], dt),
            "fc2_b": put("fc2_b", zrow(width), row(lambda lay: out_weight(
                lay, "mlp.fc2.weight", "mlp.fc2.bias", "ls2", lambda t: pad_dim(t, 0, f))[1]), dt),
        }
        return blk

    # ---- the op sequence (the same on every chip, each on its tower) ---------------------------
    def _attention(self, x, blk):
        tt = self.tt
        qkv = tt.linear(x, blk["qkv_w"], bias=blk["qkv_b"], compute_kernel_config=self.compute, dtype=self.act_dtype)
        q, k, v = tt.experimental.nlp_create_qkv_heads(qkv, num_heads=self.heads, num_kv_heads=self.heads,
                                                       transpose_k_heads=False, memory_config=tt.DRAM_MEMORY_CONFIG)
        # softmax scale folded into Q (it differs per tower): scale 1 here
        o = tt.transformer.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=False, scale=1.0,
                                                        compute_kernel_config=self.sdpa_compute)
        o = tt.experimental.nlp_concat_heads(o, memory_config=tt.DRAM_MEMORY_CONFIG)
        return tt.linear(o, blk["proj_w"], bias=blk["proj_b"], compute_kernel_config=self.compute, dtype=self.act_dtype)

    def _mlp(self, x, blk):
        tt = self.tt
        h = tt.linear(x, blk["fc1_w"], bias=blk["fc1_b"], compute_kernel_config=self.compute, dtype=self.act_dtype)
        h = tt.gelu(h)  # exact (erf) GELU, as timm's nn.GELU
        return tt.linear(h, blk["fc2_w"], bias=blk["fc2_b"], compute_kernel_config=self.compute, dtype=self.act_dtype)

    def forward(self, patches, batch: int = 1):
        """Per-chip im2col patches (chip i: its tower's channels), (batch, 1, 256, K) -> gathered
        features (batch, 1, 256, dim)."""
        tt = self.tt
        x = tt.linear(patches, self.w_patch, bias=self.b_patch, compute_kernel_config=self.compute,
                      dtype=self.act_dtype)
        x = tt.add(x, self.pos)  # pos_embed on the patches only (prefix tokens get none); broadcast over items
        if self.prefix is not None:
            # every item gets the prefix rows (B > 1: one device op, inside a trace: module docstring)
            prefix = self.prefix if batch == 1 else tt.concat([self.prefix] * batch, dim=0)
            x = tt.concat([x, prefix], dim=2)
        for blk in self.blocks:
            y = tt.layer_norm(x, weight=blk["n1w"], bias=blk["n1b"], epsilon=self.eps,
                              compute_kernel_config=self.compute)
            x = tt.add(x, self._attention(y, blk))
            y = tt.layer_norm(x, weight=blk["n2w"], bias=blk["n2b"], epsilon=self.eps,
                              compute_kernel_config=self.compute)
            x = tt.add(x, self._mlp(y, blk))
        if self.seq != self.num_patches:
            x = tt.slice(x, [0, 0, 0, 0], [batch, 1, self.num_patches, self.width])
        feats = self.ccl.all_gather(x, dim=3)  # chip order: [tower 0] x group, [tower 1] x group
        if self.group > 1:  # T3K: one copy of each tower
            g = self.group * self.width
            feats = tt.concat([tt.slice(feats, [0, 0, 0, 0], [batch, 1, self.num_patches, self.width]),
                               tt.slice(feats, [0, 0, 0, g], [batch, 1, self.num_patches, g + self.width])], dim=3)
        return feats

    # ---- host side -----------------------------------------------------------------------------
    def host_patches(self, pixel_values: torch.Tensor):
        """(B, 6, H, W) -> host mesh tensor (N x B, 1, 256, K): chip i's block (B, 1, 256, K) = the
        im2col of its tower's 3 channels for every item, blocks in chip order (ShardTensorToMesh
        over dim 0 cuts N equal contiguous chunks: chip i gets its block)."""
        s = self.specs[0]
        if pixel_values.dim() != 4 or pixel_values.shape[0] < 1 or pixel_values.shape[1] != 2 * s.channels:
            raise ValueError(f"vision: pixel_values must be (B, {2 * s.channels}, H, W) with B >= 1, "
                             f"got {tuple(pixel_values.shape)}")
        px = pixel_values.float()
        per_tower = [patchify(px[:, s.channels * j:s.channels * (j + 1)], s.patch, self.k_padded) for j in range(2)]
        return torch.cat([per_tower[i // self.group] for i in range(self.mesh.num_devices)], 0)

    def _upload(self, host, device: bool):
        tt = self.tt
        return tt.from_torch(host, dtype=tt.bfloat16, layout=tt.TILE_LAYOUT,
                             device=self.mesh.device if device else None,
                             mesh_mapper=tt.ShardTensorToMesh(self.mesh.device, dim=0))

    def __call__(self, pixel_values: torch.Tensor):
        """Features (B, 1, 256, dim) on every chip for pixel_values (B, 6, H, W), item b = image
        b. Host traffic: one upload of the patches."""
        host = self.host_patches(pixel_values)
        batch = int(pixel_values.shape[0])
        if not self.trace:
            return self.forward(self._upload(host, True), batch)
        tt, dev = self.tt, self.mesh.device
        st = self._traces.get(batch)
        if st is None:
            # first call with this batch size: every program compiled and every buffer shape
            # allocated before the capture (warm-up op by op), then the capture
            st = _Traced()
            st.input = self._upload(host, True)
            out = self.forward(st.input, batch)
            # the buffers handed out after a replay, allocated BEFORE the capture: a tensor
            # allocated after it may land where the trace keeps its intermediates and be
            # overwritten by the next replay
            st.copies = [out] + [tt.clone(out) for _ in range(FEATURE_BUFFERS - 1)]
            self.ccl.reset()
            tid = tt.begin_trace_capture(dev, cq_id=0)
            try:
                st.output = self.forward(st.input, batch)
            finally:
                tt.end_trace_capture(dev, tid, cq_id=0)
            st.trace_id = tid
            self._traces[batch] = st
            return out
        tt.copy_host_to_device_tensor(self._upload(host, False), st.input)
        tt.execute_trace(dev, st.trace_id, cq_id=0, blocking=False)
        # the next replay rewrites the trace's output buffer: hand out a copy (one small op) in
        # one of FEATURE_BUFFERS preallocated buffers of this batch size, so a caller may keep
        # that many calls' features (OFT's images)
        st.calls += 1
        keep = st.copies[st.calls % FEATURE_BUFFERS]
        tt.copy(st.output, keep)
        return keep

    def tower_features(self, feats) -> list:
        """Host copies (float32) of each tower's features as timm gives them, from chip 0 of the
        gathered features, for every item: [(B, 256, 1024) DINOv2, (B, 256, 1152) SigLIP] (tests,
        PCC checks)."""
        tt = self.tt
        host = tt.to_torch(tt.get_device_tensors(feats)[0]).float()
        host = host.reshape(host.shape[0], self.num_patches, self.dim)
        return [host[..., off:off + e] * k for off, e, k in self.feature_layout]

    def release(self):
        """Release every vision trace (one per batch size; before the mesh closes)."""
        if self.mesh.device is None:
            return
        while self._traces:
            _, st = self._traces.popitem()
            self.tt.release_trace(self.mesh.device, st.trace_id)


class _Traced:
    """One batch size's trace: its id, preallocated patch input, captured output and the
    FEATURE_BUFFERS copies handed out in turn."""

    def __init__(self):
        self.trace_id = self.input = self.output = None
        self.copies: list = []
        self.calls = 0


def _row(v: torch.Tensor) -> torch.Tensor:
    """(W,) -> (1, 1, 1, W)."""
    return v.reshape(1, 1, 1, -1)
