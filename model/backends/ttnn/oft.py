"""OpenVLA-OFT on the TT-NN mesh: ONE bidirectional prefill-shaped pass per action chunk, the
L1-regression head on the device, (CHUNK, ACTION_DIM) normalised actions read back once.

The facts (docs/oft.md; model/oft.py is the CPU reference this is tested against):
  sequence  [emb(BOS), N x 256 fused patches, (proprio token), emb(prompt[1:]), CHUNK x DIM zero
            rows (the placeholders' embeddings are zeroed), emb(2)], padded to S = a multiple of 32
  attention FULLY bidirectional: `LLM.prefill_layers(causal=False, attn_mask=...)`; the additive
            (1, 1, S, S) mask is 0 everywhere except MASK_NEG at the padding keys L..S-1 (with
            is_causal=False the SDPA would otherwise attend to them); no mask when S == L
  rows      final RMSNorm of the CHUNK x DIM rows starting at the last prompt token
            (OFTLayout.action_rows_start), reshaped row-major to (CHUNK, DIM x hidden)
  head      MLPResNet on the device: LayerNorm, fc1 + ReLU (column-sharded over the chips, one
            all-gather), 2 x [x + ReLU(Linear(LayerNorm(x)))], LayerNorm, fc2 (float32 output);
            without a head: the LM head on the rows, argmax per row on the device (LLM.next_token)

Everything else is the OpenVLA TT-NN backend's, unchanged and not re-implemented: a TtnnBackend
is built underneath and its vision towers (one call per image), projector (one call over all
images' patches), embedding table, decoder layers, final norm, LM head, collectives and weight
store run the pass. Only the head and the proprio projector (2 x fc + GELU) are converted here,
from the modules load_oft_policy validated.

Host traffic per chunk: in, each image's patches (the vision stage's own upload, once per image), the prompt
ids (1), the normalised proprio (1, with a projector) and the padding mask only when the
sequence length changes (cached per length); out, the (CHUNK, DIM) actions in one read (CHUNK x
32 float32 padded row tiles: 1 kB for LIBERO). Why the head runs on the device, not on the host
(docs/oft.md, "TT-NN"): reading the rows back is cheap (56 x 4096 x 2 B = 460 kB), but the head
is 151 M parameters (fc1 alone 28672 x 4096): on the host that is ~600 MB of float32 weights
streamed per chunk (tens of ms on a CPU), on the device ~10 ops and 0.19 GB of bf16 weights per
chip (N300, fc1 sharded): ~1.2 ms by the op report's cost model.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict

import numpy as np
import torch

from ...errors import BackendError, InputError, OpenVLAError
from ...oft import STOP_TOKEN_ID, OFTLayout, OFTPassOutput
from .vision import MASK_NEG
from .weights import TILE, as_row, pad_dim, round_up

# The prompt budget of the KV cache (the OpenVLA profile's: 512 - 256 patches - 7 actions), on top
# of the OFT rows (images x 256, proprio, CHUNK x DIM placeholders, stop token).
PROMPT_BUDGET = 249
DEFAULT_MAX_IMAGES = 2  # when the checkpoint does not fix num_images_in_input (primary + wrist)
MASK_CACHE = 8  # padding masks kept on the device (one per sequence length seen recently)


def oft_max_seq_len(spec, num_patches: int, max_images: int) -> int:
    """KV-cache / RoPE rows for the longest OFT sequence: images, proprio, prompt, action rows, stop."""
    return round_up(max_images * num_patches + 1 + PROMPT_BUDGET + spec.num_action_tokens + 1, TILE)


def padding_mask(length: int, padded: int) -> torch.Tensor:
    """(1, 1, S, S) additive mask: 0 for every (query, key) with key < L, MASK_NEG at the padding
    keys (every query row, padding rows included, so no softmax row is all-masked)."""
    m = torch.zeros(1, 1, padded, padded)
    m[..., length:] = MASK_NEG
    return m


class _Put:
    """Host tensor -> mesh tensor (tiles), replicated or split along `shard_dim` (not cached on disk:
    the .pt files are not part of the weight cache's checkpoint fingerprint)."""

    def __init__(self, tt, mesh):
        self.tt, self.mesh = tt, mesh

    def __call__(self, t: torch.Tensor, dtype, shard_dim: int | None = None):
        tt, dev = self.tt, self.mesh.device
        mapper = tt.ReplicateTensorToMesh(dev) if shard_dim is None else tt.ShardTensorToMesh(dev, dim=shard_dim)
        return tt.from_torch(t.detach().float().contiguous(), dtype=dtype, layout=tt.TILE_LAYOUT, device=dev,
                             mesh_mapper=mapper)


class DeviceProprioProjector:
    """ProprioProjector on the mesh (replicated): (P,) normalised state -> one (1, 1, 1, H) row:
    fc1 (K zero-padded to 32), GELU (exact, as nn.GELU), fc2."""

    def __init__(self, tt, mesh, profile, module):
        put = _Put(tt, mesh)
        self.tt, self.mesh = tt, mesh
        self.dim = module.fc1.in_features
        self.k_padded = round_up(self.dim, TILE)
        dt, self.act_dtype = profile.dtype(tt, "projector"), profile.dtype(tt, "activations")
        self.compute = profile.compute_config(tt, "projector")
        self.w1 = put(pad_dim(module.fc1.weight.detach().float().t(), 0, self.k_padded), dt)
        self.b1 = put(as_row(module.fc1.bias), dt)
        self.w2 = put(module.fc2.weight.detach().float().t(), dt)
        self.b2 = put(as_row(module.fc2.bias), dt)

    def __call__(self, proprio_normalized):
        tt = self.tt
        p = torch.as_tensor(np.asarray(proprio_normalized, np.float32)).reshape(1, 1, 1, -1)
        x = tt.from_torch(pad_dim(p, 3, self.k_padded), dtype=self.act_dtype, layout=tt.TILE_LAYOUT,
                          device=self.mesh.device, mesh_mapper=tt.ReplicateTensorToMesh(self.mesh.device))
        x = tt.gelu(tt.linear(x, self.w1, bias=self.b1, compute_kernel_config=self.compute, dtype=self.act_dtype))
        return tt.linear(x, self.w2, bias=self.b2, compute_kernel_config=self.compute, dtype=self.act_dtype)


class DeviceActionHead:
    """L1RegressionActionHead (MLPResNet) on the mesh. fc1 (DIM x H -> hidden, 77 % of the head's
    weights at full size) is column-sharded: each chip computes hidden / N columns (ReLU fused),
    one all-gather joins them; the residual blocks, norms and fc2 are replicated. fc2's DIM outputs
    are padded to 32 columns and computed in float32."""

    def __init__(self, tt, mesh, profile, ccl, head, num_actions_chunk: int):
        m = head.model
        put = _Put(tt, mesh)
        self.tt, self.ccl = tt, ccl
        self.chunk, self.action_dim = num_actions_chunk, head.action_dim
        self.in_dim, self.hidden = m.fc1.in_features, m.fc1.out_features
        norms = [m.layer_norm1, m.layer_norm2] + [b.ffn[0] for b in m.mlp_resnet_blocks]
        eps = {float(n.eps) for n in norms}
        if len(eps) != 1:
            raise ValueError(f"action head: LayerNorms disagree on eps ({sorted(eps)})")
        self.eps = eps.pop()
        dt, self.act_dtype = profile.dtype(tt, "projector"), profile.dtype(tt, "activations")
        self.compute = profile.compute_config(tt, "projector")
        w = lambda lin: lin.weight.detach().float().t()  # noqa: E731  (out, in) -> (in, out)
        ln = lambda n: (put(as_row(n.weight), tt.bfloat16), put(as_row(n.bias), tt.bfloat16))  # noqa: E731
        # Column-shard fc1 when every chip gets whole tiles (no padding: the LayerNorm after it sees
        # the true width); else keep it replicated.
        self.fc1_sharded = mesh.num_devices > 1 and self.hidden % (TILE * mesh.num_devices) == 0
        shard = 3 if self.fc1_sharded else None
        self.ln1 = ln(m.layer_norm1)
        self.fc1 = (put(w(m.fc1).reshape(1, 1, self.in_dim, self.hidden), dt, shard),
                    put(as_row(m.fc1.bias), dt, shard))
        self.blocks = [(ln(b.ffn[0]), put(w(b.ffn[1]), dt), put(as_row(b.ffn[1].bias), dt))
                       for b in m.mlp_resnet_blocks]
        self.ln2 = ln(m.layer_norm2)
        out_padded = round_up(self.action_dim, TILE)
        self.fc2 = (put(pad_dim(w(m.fc2), 1, out_padded), dt), put(as_row(pad_dim(m.fc2.bias.detach(), 0, out_padded)),
                                                                     dt))

    def _linear(self, x, wb, dtype=None, activation=None):
        kw = {"activation": activation} if activation else {}
        return self.tt.linear(x, wb[0], bias=wb[1], compute_kernel_config=self.compute,
                              dtype=dtype or self.act_dtype, **kw)

    def _norm(self, x, wb):
        return self.tt.layer_norm(x, weight=wb[0], bias=wb[1], epsilon=self.eps, compute_kernel_config=self.compute)

    def __call__(self, rows):
        """rows: (1, 1, CHUNK x DIM, H) final-norm hidden states -> (1, 1, CHUNK, 32) float32, the
        first DIM columns the normalised actions."""
        tt = self.tt
        x = tt.reshape(rows, (1, 1, self.chunk, self.in_dim))  # step t = rows t*DIM .. t*DIM+DIM-1 side by side
        x = self._linear(self._norm(x, self.ln1), self.fc1, activation="relu")
        if self.fc1_sharded:
            x = self.ccl.all_gather(x, dim=3)
        for norm, wt, b in self.blocks:
            x = tt.add(x, self._linear(self._norm(x, norm), (wt, b), activation="relu"))
        return self._linear(self._norm(x, self.ln2), self.fc2, dtype=tt.float32)


class TtnnOFTModel:
    """The OFT pass on a TT-NN mesh, with OFTTorchModel's interface (run / layout / describe / close,
    `head` and `proprio_projector` None when the checkpoint has none)."""

    name = "ttnn"

    def __init__(self, config, checkpoint, spec, head, proprio_projector, codec, mesh_device: str | None = None, *,
                 tt=None, precision: dict | None = None, profile_overrides: dict | None = None, cache_dir="auto",
                 config_dir=None, max_images: int | None = None):
        """mesh_device: N300 | T3K | auto (None: $MESH_DEVICE, else auto). max_images: the most images
        per chunk the KV cache is sized for (default: the spec's num_images_in_input, else 2).
        The other arguments as TtnnBackend's (tt: the ttnn module or the golden emulator)."""
        from .backend import TtnnBackend

        self.config, self.spec, self.codec = config, spec, codec
        self.max_images = int(max_images or spec.num_images_in_input or DEFAULT_MAX_IMAGES)
        overrides = {"max_seq_len": oft_max_seq_len(spec, config.num_patches, self.max_images),
                     **(profile_overrides or {})}
        self.backend = TtnnBackend(config, checkpoint, mesh_device or os.environ.get("MESH_DEVICE"), tt=tt,
                                   precision=precision, profile_overrides=overrides, cache_dir=cache_dir, trace=False,
                                   config_dir=config_dir)
        be = self.backend
        self.tt, self.llm = be.tt, be.llm
        try:
            self.head = None if head is None else DeviceActionHead(be.tt, be.mesh, be.profile, be.llm.ccl, head,
                                                                   spec.num_actions_chunk)
            self.proprio_projector = None if proprio_projector is None else \
                DeviceProprioProjector(be.tt, be.mesh, be.profile, proprio_projector)
            rep = be.tt.ReplicateTensorToMesh(be.mesh.device)
            # placeholders (zeroed embeddings), stop token, and up to 31 padding rows: sliced per call
            zeros = be.tt.from_torch(torch.zeros(1, 1, spec.num_action_tokens, self.llm.hidden), dtype=be.tt.bfloat16,
                                     layout=be.tt.ROW_MAJOR_LAYOUT, device=be.mesh.device, mesh_mapper=rep)
            pad = be.tt.from_torch(torch.zeros(1, 1, TILE - 1, self.llm.hidden), dtype=be.tt.bfloat16,
                                   layout=be.tt.ROW_MAJOR_LAYOUT, device=be.mesh.device, mesh_mapper=rep)
            self._tail = be.tt.concat([zeros, self.llm._embed(np.array([STOP_TOKEN_ID])), pad], dim=2)
        except BaseException as e:
            be.close()
            if isinstance(e, Exception) and not isinstance(e, OpenVLAError):
                raise BackendError(f"loading the OFT head / proprio projector onto the {be.profile.mesh_name} mesh "
                                   f"failed: {e}") from e
            raise
        self._bos: dict = {}  # BOS id -> its embedding row on the mesh
        self._masks: OrderedDict = OrderedDict()  # sequence length -> padding mask on the mesh
        self.return_rows = False  # True: also read the action rows back (tests, PCC checks)

    # ---- interface (OFTTorchModel's) ------------------------------------------------------------
    def describe(self) -> dict:
        d = self.backend.describe()
        return {**d, "oft_head": "device" if self.head is not None else "discrete (LM logits, argmax on device)",
                "oft_attention": "bidirectional (padding keys masked)", "max_seq_len": self.llm.max_seq,
                "max_images": self.max_images}

    def layout(self, prompt_len: int, num_images: int, with_proprio: bool) -> OFTLayout:
        return OFTLayout(prompt_len, num_images * self.config.num_patches + int(with_proprio),
                         self.spec.num_action_tokens)

    def _bos_row(self, bos: int):
        if bos not in self._bos:
            self._bos[bos] = self.llm._embed(np.array([bos], np.int64))
        return self._bos[bos]

    def _mask(self, length: int, padded: int):
        if padded == length:
            return None  # nothing to mask: plain non-causal attention
        if length in self._masks:
            self._masks.move_to_end(length)
            return self._masks[length]
        be = self.backend
        mask = be.tt.from_torch(padding_mask(length, padded), dtype=be.tt.bfloat16, layout=be.tt.TILE_LAYOUT,
                                device=be.mesh.device, mesh_mapper=be.tt.ReplicateTensorToMesh(be.mesh.device))
        self._masks[length] = mask
        while len(self._masks) > MASK_CACHE:
            be.tt.deallocate(self._masks.popitem(last=False)[1])
        return mask

    def _lm_logits(self, rows, n: int):
        """This chip's vocabulary slice of the logits of the n action rows, (1, 1, n, V/N): the LM
        head's one-tile-row (decode) matmul per 32 rows, as OpenVLA's prefill uses it. Its prefill
        program over 56 rows does not fit: its 2D-multicast blocks of the vocabulary-wide weight
        need 1.54 MB of L1 per core (> 1.43 MB; ttnn's validation on the mock N300)."""
        tt, llm = self.tt, self.llm
        parts = [llm.lm_head.decode(tt.slice(rows, [0, 0, i, 0], [1, 1, min(i + TILE, n), llm.hidden]), tt.bfloat16)
                 for i in range(0, n, TILE)]
        return parts[0] if len(parts) == 1 else tt.concat(parts, dim=2, memory_config=tt.DRAM_MEMORY_CONFIG)

    def _chip0(self, t) -> torch.Tensor:
        tt = self.tt
        return tt.to_torch(tt.get_device_tensors(t)[0])

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor, prompt_ids, proprio_normalized=None) -> OFTPassOutput:
        """pixel_values (N, 6, S, S), one row per image (primary first); prompt_ids [BOS ... 29871];
        proprio_normalized (PROPRIO_DIM,) in [-1, 1] or None. Timings as TtnnBackend.generate: the
        stages are only enqueued (vision / projector / llm are host dispatch times, "head" runs until
        the actions are back) unless backend.profile_stages synchronises after each."""
        if (proprio_normalized is None) != (self.proprio_projector is None):
            raise InputError("proprio is required by this checkpoint's proprio projector" if proprio_normalized is None
                             else "this checkpoint has no proprio projector: proprio must be None")
        be, tt, llm, spec = self.backend, self.tt, self.llm, self.spec
        be._guard()
        ids = np.asarray(prompt_ids, np.int64).reshape(-1)
        n_img = int(pixel_values.shape[0])
        layout = self.layout(ids.size, n_img, proprio_normalized is not None)
        seq = round_up(layout.length, TILE)
        if seq > llm.max_seq:
            raise InputError(f"OFT sequence too long for the preallocated KV cache: {layout.length} rows ({n_img} "
                             f"image(s), {ids.size} prompt tokens, {layout.num_action_tokens} action rows) exceed "
                             f"max_seq_len {llm.max_seq} (sized for {self.max_images} image(s); load with max_images=)")
        sync = be._sync if be.profile_stages else (lambda: None)
        clock, stage = time.perf_counter, "vision"
        rows_host = tokens = oor = None
        try:
            t0 = clock()
            feats = [be.vision(pixel_values[i:i + 1]) for i in range(n_img)]
            feats = feats[0] if n_img == 1 else tt.concat(feats, dim=2)  # images along the sequence
            sync(); t1 = clock()
            stage = "projector"
            parts = [self._bos_row(int(ids[0])), tt.to_layout(be.projector(feats), tt.ROW_MAJOR_LAYOUT)]
            if self.proprio_projector is not None:
                parts.append(tt.to_layout(self.proprio_projector(proprio_normalized), tt.ROW_MAJOR_LAYOUT))
            sync(); t2 = clock()
            stage = "llm"
            if ids.size > 1:
                parts.append(llm._embed(ids[1:]))
            tail = layout.num_action_tokens + 1 + seq - layout.length  # zero rows, stop token, padding
            parts.append(tt.slice(self._tail, [0, 0, 0, 0], [1, 1, tail, llm.hidden]))
            x = tt.to_layout(tt.concat(parts, dim=2), tt.TILE_LAYOUT)
            h = llm.prefill_layers(x, causal=False, attn_mask=self._mask(layout.length, seq))
            r0, n = layout.action_rows_start, layout.num_action_tokens
            rows = tt.rms_norm(tt.slice(h, [0, 0, r0, 0], [1, 1, r0 + n, llm.hidden]), weight=llm.norm,
                               epsilon=llm.eps, compute_kernel_config=llm.norm_compute)
            sync(); t3 = clock()
            stage = "head"
            shape = (spec.num_actions_chunk, spec.action_dim)
            if self.head is not None:
                out = self._chip0(self.head(rows)).float()  # (1, 1, CHUNK, 32)
                normalized = out.reshape(-1, out.shape[-1])[: spec.num_actions_chunk, : spec.action_dim].numpy()
            else:  # discrete fallback: the LM's greedy token at each action row, decoded as OpenVLA bins
                tokens = np.asarray(llm.read_tokens(llm.next_token(self._lm_logits(rows, n), rows=n)), np.int64)
                decoded = self.codec.decode_tokens(tokens)
                normalized, tokens, oor = (decoded.normalized.reshape(shape), tokens.reshape(shape),
                                           decoded.out_of_range.reshape(shape))
            t4 = clock()
            if self.return_rows:
                rows_host = self._chip0(rows).float().reshape(1, n, llm.hidden)
        except OpenVLAError:
            raise
        except Exception as e:
            be._fail(stage, e)
        timings = {"vision": (t1 - t0) * 1e3, "projector": (t2 - t1) * 1e3, "llm": (t3 - t2) * 1e3,
                   "head": (t4 - t3) * 1e3}
        return OFTPassOutput(rows_host, np.asarray(normalized, np.float32), tokens, oor, layout, timings)

    def close(self):
        if self.backend is not None:
            self.backend.close()
        self.head = self.proprio_projector = None
        self._masks.clear()
        self._bos.clear()
