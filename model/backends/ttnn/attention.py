"""Llama self-attention, tensor-parallel over the mesh: each chip owns num_heads / N query heads
and num_kv_heads / N KV heads (column-parallel fused QKV), its slice of the KV cache, and the
matching rows of WO (row-parallel); the partial outputs are summed with an all-reduce (ccl.py:
asynchronous reduce-scatter + all-gather with persistent semaphores).

RoPE is HF's rotate_half form, so the checkpoint's Q/K weights are used as they are (no
permutation to the interleaved layout of ttnn.experimental.rotary_embedding_llama: the seed's
defect 3 cannot occur): in prefill computed from ttnn ops, x*cos + (x @ R)*sin with R the
rotate_half matrix; in the fused decode graph `ttnn.experimental.rotary_embedding_hf` (the same
HF formula in one op per tensor).

Decode graph (`decode_fused`, tt_transformers' attention.forward_decode with the ops ttnn 0.81.1
ships; used with decode_matmul: dram_sharded): the normed row arrives width-sharded in L1 in
WQKV's input layout -> DRAM-sharded WQKV -> nlp_create_qkv_heads_decode (q, k, v height-sharded)
-> rotary_embedding_hf on q and k -> paged_update_cache of k and v straight from the heads op ->
sdpa decode -> one reshard to height-sharded -> nlp_concat_heads_decode -> a view back to the
logical single row (no device op) -> reshard to WO's input -> DRAM-sharded WO -> all-reduce
(ccl.py) into the residual's layout: 13 device ops, 2 of them collectives.

Batch: the KV cache holds profile.max_batch sequences (slots); decode tensors carry one row per
slot ([1, 1, batch, hidden] -> [1, batch, heads, d], positions per row), and the prefill of a batch
item fills its slot (`fill_cache(cache, k, slot)`).

Prefill: fused QKV matmul -> `nlp_create_qkv_heads` (the per-chip [Q | K | V] row -> (1, heads,
rows, d) each, K untransposed) -> RoPE -> fill_cache -> SDPA -> `nlp_concat_heads` -> WO ->
all-reduce (28 device ops per decoder layer with the norms and the MLP; 37 with the former slice +
reshape + permute head split, which also uploaded an index table inside each tiled reshape).
"""
from __future__ import annotations

import math

import torch

from .linear import Linear
from .weights import TILE


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R with x @ R == rotate_half(x) == cat(-x[d/2:], x[:d/2])."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    idx = torch.arange(half)
    r[idx + half, idx] = -1.0
    r[idx, idx + half] = 1.0
    return r


class Rope:
    """cos/sin tables for every position of the KV cache (from transformers' own rotary
    embedding, so rope_theta / rope scaling follow the checkpoint's config), on the mesh twice:
    tiled (prefill slices rows 0..S) and row-major (decode looks a position up with embedding)."""

    def __init__(self, tt, mesh, llm_cfg, max_seq: int):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.tt = tt
        self.head_dim = getattr(llm_cfg, "head_dim", None) or llm_cfg.hidden_size // llm_cfg.num_attention_heads
        rope = LlamaRotaryEmbedding(llm_cfg)
        pos = torch.arange(max_seq).view(1, -1)
        cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos)
        cos, sin = cos[0].float(), sin[0].float()  # (max_seq, head_dim)
        rep = tt.ReplicateTensorToMesh(mesh.device)
        put = lambda t, layout, dtype=tt.bfloat16: tt.from_torch(  # noqa: E731
            t, dtype=dtype, layout=layout, device=mesh.device, mesh_mapper=rep)
        self.cos_tiles = put(cos.view(1, 1, max_seq, -1), tt.TILE_LAYOUT)
        self.sin_tiles = put(sin.view(1, 1, max_seq, -1), tt.TILE_LAYOUT)
        self.cos_rows = put(cos, tt.ROW_MAJOR_LAYOUT)
        self.sin_rows = put(sin, tt.ROW_MAJOR_LAYOUT)
        self.rot = put(rotate_half_matrix(self.head_dim), tt.TILE_LAYOUT)

    def prefill_tables(self, seq: int):
        tt, d = self.tt, self.head_dim
        return (tt.slice(self.cos_tiles, [0, 0, 0, 0], [1, 1, seq, d]),
                tt.slice(self.sin_tiles, [0, 0, 0, 0], [1, 1, seq, d]))

    def decode_tables_sharded(self, pos_rows, memcfg):
        """The fused decode graph's cos / sin: (1, batch, 1, d) height-sharded one row per core
        (rotary_embedding_hf's decode mode wants cos/sin [1, batch, 1, d] height-sharded)."""
        cos, sin = self.decode_tables(pos_rows)
        return self.tt.to_memory_config(cos, memcfg), self.tt.to_memory_config(sin, memcfg)

    def decode_tables(self, pos_rows):
        """pos_rows: (batch, 1) uint32 positions on the mesh -> (1, batch, 1, d) cos, sin (row b
        at slot b's position; broadcast over the heads). The lookup gives (batch, 1, d), one tile
        per row: the same tiles as [1, batch, 1, d], so the reshape is a view (no device op)."""
        tt, d = self.tt, self.head_dim
        b = pos_rows.shape[0]
        cos = tt.embedding(pos_rows, self.cos_rows, layout=tt.TILE_LAYOUT)
        sin = tt.embedding(pos_rows, self.sin_rows, layout=tt.TILE_LAYOUT)
        return tt.reshape(cos, (1, b, 1, d)), tt.reshape(sin, (1, b, 1, d))

    def apply(self, x, cos, sin, compute):
        tt = self.tt
        rotated = tt.matmul(x, self.rot, compute_kernel_config=compute)
        return tt.add(tt.multiply(x, cos), tt.multiply(rotated, sin))


class Attention:
    def __init__(self, tt, mesh, profile, store, llm_cfg, layer: int, rope: Rope, max_seq: int, ccl):
        self.tt, self.mesh, self.rope, self.ccl = tt, mesh, rope, ccl
        n = mesh.num_devices
        self.hidden = llm_cfg.hidden_size
        self.heads = llm_cfg.num_attention_heads
        self.kv_heads = getattr(llm_cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = rope.head_dim
        self.local_heads, self.local_kv = self.heads // n, self.kv_heads // n
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.act_dtype = profile.dtype(tt, "activations")
        self.qkv_compute = profile.compute_config(tt, "qkv")
        self.sdpa_compute = profile.compute_config(tt, "sdpa")
        self.wo_compute = profile.compute_config(tt, "wo")
        decode_compute = profile.compute_config(tt, "decode")
        d, hl, kl = self.head_dim, self.local_heads, self.local_kv
        pre = f"model.layers.{layer}.self_attn."
        raw = lambda name: store.raw("llm", pre + name)  # noqa: E731

        def wqkv():
            q, k, v = raw("q_proj.weight"), raw("k_proj.weight"), raw("v_proj.weight")  # (out, in)
            blocks = [torch.cat([q[i * hl * d:(i + 1) * hl * d], k[i * kl * d:(i + 1) * kl * d],
                                 v[i * kl * d:(i + 1) * kl * d]], 0) for i in range(n)]
            return torch.cat(blocks, 0).transpose(0, 1)  # (hidden, n * (hl + 2 kl) d): chip i gets block i

        self.wqkv = Linear(tt, mesh, profile, store, f"llm.{layer}.wqkv", wqkv, profile.dtype(tt, "wqkv"), shard_dim=1,
                           in_features=self.hidden, out_features=(hl + 2 * kl) * d, compute=self.qkv_compute,
                           decode_compute=decode_compute)
        self.wo = Linear(tt, mesh, profile, store, f"llm.{layer}.wo", lambda: raw("o_proj.weight").transpose(0, 1),
                         profile.dtype(tt, "wo"), shard_dim=0, in_features=hl * d, out_features=self.hidden,
                         compute=self.wo_compute, decode_compute=decode_compute)
        # Preallocated once for `batch` sequences of the longest length and reused: the prefill of
        # the item in slot b overwrites rows 0..S-1 of cache row b, decode writes row p of every
        # slot before attending to rows 0..p of that slot, so stale rows are never read and no
        # reset is needed between calls.
        self.batch = int(profile.max_batch)
        zeros = torch.zeros(self.batch, self.kv_heads, max_seq, d)
        put = dict(dtype=profile.dtype(tt, "kv_cache"), layout=tt.TILE_LAYOUT, device=mesh.device,
                   mesh_mapper=tt.ShardTensorToMesh(mesh.device, dim=1))
        self.k_cache = tt.from_torch(zeros, **put)
        self.v_cache = tt.from_torch(zeros, **put)
        # decode rows height-sharded one user per core ([1, batch, heads (32 padded), d]): what
        # paged_update_cache, rotary_embedding_hf and nlp_concat_heads_decode want
        self.update_memcfg = tt.create_sharded_memory_config(
            shape=(TILE, d), core_grid=tt.num_cores_to_corerangeset(
                self.batch, mesh.device.compute_with_storage_grid_size(), row_wise=True),
            strategy=tt.ShardStrategy.HEIGHT, use_height_and_width_as_shard_shape=True)

    def _split(self, qkv, rows: int):
        """(1, 1, rows, (hl + 2 kl) d) -> q, k, v slices (1, 1, rows, heads * d)."""
        tt, d, hl, kl = self.tt, self.head_dim, self.local_heads, self.local_kv
        edges = [0, hl * d, (hl + kl) * d, (hl + 2 * kl) * d]
        return [tt.slice(qkv, [0, 0, 0, edges[j]], [1, 1, rows, edges[j + 1]]) for j in range(3)]

    def prefill(self, x, seq: int, cos, sin, causal: bool = True, attn_mask=None, slot: int = 0):
        """x: (1, 1, seq, hidden) normed, replicated -> all-reduced (1, 1, seq, hidden).
        Fills rows 0..seq-1 of cache row `slot` (the batch item's own sequence), this chip's heads. causal=False: every row attends to every
        key not masked by attn_mask ((1, 1, seq, seq) additive; OpenVLA-OFT, backends/ttnn/oft.py)."""
        tt, d = self.tt, self.head_dim
        qkv = self.wqkv.prefill(x, self.act_dtype)
        # the per-chip fused row is [Q heads | K heads | V heads]: one op gives (1, heads, seq, d) each
        q, k, v = tt.experimental.nlp_create_qkv_heads(qkv, num_heads=self.local_heads, num_kv_heads=self.local_kv,
                                                       transpose_k_heads=False, memory_config=tt.DRAM_MEMORY_CONFIG)
        q = self.rope.apply(q, cos, sin, self.qkv_compute)
        k = self.rope.apply(k, cos, sin, self.qkv_compute)
        tt.fill_cache(self.k_cache, k, slot)
        tt.fill_cache(self.v_cache, v, slot)
        o = tt.transformer.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale,
                                                        compute_kernel_config=self.sdpa_compute,
                                                        **({} if attn_mask is None else {"attn_mask": attn_mask}))
        o = tt.experimental.nlp_concat_heads(o, memory_config=tt.DRAM_MEMORY_CONFIG)  # (1, 1, seq, hl * d)
        out = self.wo.prefill(o, self.act_dtype)
        return self.ccl.all_reduce(out, prefill=True)

    def decode(self, x, pos, cos, sin):
        """x: (1, 1, batch, hidden) normed, row b = slot b's token; pos: (batch,) int32 positions
        on the mesh (a device tensor, so the step can be captured as a trace). Writes KV row
        pos[b] of slot b, which then attends to its rows 0..pos[b]."""
        tt, d, b = self.tt, self.head_dim, self.batch
        qkv = self.wqkv.decode(x, self.act_dtype, dram_output=True)
        q, k, v = self._split(qkv, b)
        q = tt.reshape(q, (1, b, self.local_heads, d))  # [1, batch, heads, d]
        k = tt.reshape(k, (1, b, self.local_kv, d))
        v = tt.reshape(v, (1, b, self.local_kv, d))
        q = self.rope.apply(q, cos, sin, self.qkv_compute)
        k = self.rope.apply(k, cos, sin, self.qkv_compute)
        tt.experimental.paged_update_cache(self.k_cache, tt.to_memory_config(k, self.update_memcfg),
                                           update_idxs_tensor=pos)
        tt.experimental.paged_update_cache(self.v_cache, tt.to_memory_config(v, self.update_memcfg),
                                           update_idxs_tensor=pos)
        o = tt.transformer.scaled_dot_product_attention_decode(
            q, self.k_cache, self.v_cache, cur_pos_tensor=pos, scale=self.scale,
            compute_kernel_config=self.sdpa_compute)
        o = tt.reshape(o, (1, 1, b, self.local_heads * d))
        out = self.wo.decode(o, self.act_dtype)
        return self.ccl.all_reduce(out)

    def decode_fused(self, x, pos, cos, sin, residual_memcfg):
        """x: (1, 1, batch, hidden) normed, width-sharded in WQKV's decode input layout; cos / sin
        from Rope.decode_tables_sharded. Returns the all-reduced output in `residual_memcfg`."""
        tt, d, hl = self.tt, self.head_dim, self.local_heads
        qkv = self.wqkv.decode_sharded(x, self.act_dtype)
        q, k, v = tt.experimental.nlp_create_qkv_heads_decode(
            qkv, num_heads=hl, num_kv_heads=self.local_kv, memory_config=tt.L1_HEIGHT_SHARDED_MEMORY_CONFIG)
        q = tt.experimental.rotary_embedding_hf(q, cos, sin, is_decode_mode=True)
        k = tt.experimental.rotary_embedding_hf(k, cos, sin, is_decode_mode=True)
        tt.experimental.paged_update_cache(self.k_cache, k, update_idxs_tensor=pos)
        tt.experimental.paged_update_cache(self.v_cache, v, update_idxs_tensor=pos)
        o = tt.transformer.scaled_dot_product_attention_decode(
            q, self.k_cache, self.v_cache, cur_pos_tensor=pos, scale=self.scale,
            compute_kernel_config=self.sdpa_compute)
        o = tt.experimental.nlp_concat_heads_decode(tt.to_memory_config(o, self.update_memcfg), num_heads=hl)
        # the op pads the batch to 32 rows: view it as the batch's logical rows (same padded shape: no op)
        o = tt.reshape(o, tt.Shape([1, 1, self.batch, hl * d]), tt.Shape([1, 1, TILE, hl * d]))
        out = self.wo.decode_sharded(tt.to_memory_config(o, self.wo.decode_input), self.act_dtype)
        return self.ccl.all_reduce(out, memory_config=residual_memcfg)
