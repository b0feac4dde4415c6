"""The Llama-2 LM on the mesh: embedding (replicated), decoder layers (tensor-parallel), final
norm, LM head sharded over the vocabulary, greedy next token chosen on the device.

Sequence (openvla-spec.md section 4): [emb(BOS), 256 projected patches, emb(ids[1:])], positions
0..L-1; prefill gives action token 1 (it is kept: the seed's one-token shift is defect 1),
decode steps at positions L, L+1, ... give tokens 2..7.

Device-side feedback (`decode_steps`): the prefill's argmax writes token 1 into a preallocated
device tensor (`token_bufs[0]`, argmax's `output_tensor`); decode step k embeds `token_bufs[k]`,
writes its argmax into `token_bufs[k + 1]` and advances both position tensors on the device
(`ttnn.plus_one`, in place). The 7 tokens are concatenated on the device and read back once. The
same `decode_steps` runs untraced (emulator, mock devices, warm-up) and is what the backend
captures as ONE trace per action: the trace reads and writes only those fixed device tensors.

Prefill inputs (`write_prefill_inputs`): the ids (one uint32 upload per padded length S), the
LM-head row indices L-1..L-1+m (one upload per row count) and the projected patches (copied on
the device into `patch_buf`) live in fixed device tensors; `prefill_graph(S, rows)` reads only
those (the rows are picked by an embedding lookup of the row indices, not a slice at L), so the
backend captures it as one trace per (S, rows) that serves every prompt length of the bucket.

Draft rows (speculative action decoding, model/speculative.py): `embed_sequence(..., draft=d)`
puts the m draft ids right after the prompt, at positions L..L+m-1 (inside the 32-row padding of
the prefill when L+m stays in L's bucket, else one bucket more); `prefill(x, rows=m+1)` runs
the LM head on rows L-1..L-1+m and `draft_predictions` writes their argmax (on the device) into a
preallocated (1, 1, m+1) uint32 tensor, read back ONCE by the backend, which verifies the drafts.
The remaining decode steps start at L+k from `set_start_token` + `set_decode_start`; the KV rows
of rejected drafts (L+k.. L+m-1) are overwritten by those steps before any step can read them
(SDPA decode at position p reads rows 0..p only).

Batch (several robots, backend.generate_batch; docs/ttnn.md "Several robots"): the KV cache has
profile.max_batch slots and every decode step runs that many rows, row b = slot b (token_bufs are
(1, 1, batch), positions (batch,)); each item's prefill fills its own slot and writes its token 1
into slot_start[slot], which decode step 0 gathers into token_bufs[0]. Idle rows start at
position 0 of their own slot (rows 0..5 of it written and read, nothing of another slot's). With max_batch 1 the graph is the single-robot one exactly.
"""
from __future__ import annotations

import numpy as np
import torch

from ...errors import InputError
from .attention import Rope
from .ccl import CCL
from .decoder import DecoderLayer
from .linear import Linear
from .weights import TILE, as_row, pad_dim, round_up


ACTION_TOKENS = 7  # token buffers allocated with the model (an action's 7 tokens; more grow on demand)


class LLM:
    def __init__(self, tt, mesh, profile, store, llm_cfg, max_seq: int):
        self.tt, self.mesh, self.profile = tt, mesh, profile
        n = mesh.num_devices
        self.hidden = llm_cfg.hidden_size
        self.vocab = int(llm_cfg.vocab_size)
        self.vocab_padded = round_up(self.vocab, TILE * n)  # whole tiles per chip
        self.max_seq = max_seq
        self.eps = float(llm_cfg.rms_norm_eps)
        self.act_dtype = profile.dtype(tt, "activations")
        self.head_compute = profile.compute_config(tt, "lm_head")
        self.norm_compute = profile.compute_config(tt, "qkv")
        raw = lambda name: store.raw("llm", name)  # noqa: E731
        self.embedding = store.put("llm.embed", lambda: raw("model.embed_tokens.weight"),
                                   profile.dtype(tt, "embedding"), layout=tt.ROW_MAJOR_LAYOUT)
        self.rope = Rope(tt, mesh, llm_cfg, max_seq)
        self.ccl = CCL(tt, mesh, profile)  # every collective of the LM (persistent semaphores)
        self.layers = [DecoderLayer(tt, mesh, profile, store, llm_cfg, i, self.rope, max_seq, self.ccl)
                       for i in range(llm_cfg.num_hidden_layers)]
        self.norm = store.put("llm.norm", lambda: as_row(raw("model.norm.weight")), tt.bfloat16)
        self.lm_head = Linear(tt, mesh, profile, store, "llm.lm_head",
                              lambda: pad_dim(raw("lm_head.weight").transpose(0, 1), 1, self.vocab_padded),
                              profile.dtype(tt, "lm_head"), shard_dim=1, in_features=self.hidden,
                              out_features=self.vocab_padded // n, compute=self.head_compute)
        # Fused decode graph (decoder.py): the residual row width-sharded in L1 in the decode input
        # layout shared by WQKV, W1, W3 and the LM head (all K = hidden), and the sharded RMSNorm's
        # program over that grid.
        self.fused = profile.decode_matmul == "dram_sharded" and profile.decode_graph == "fused"
        if self.fused:
            self.residual_memcfg = self.lm_head.decode_input  # = WQKV's, W1's and W3's (same K, same grid)
            cores = self.hidden // self.residual_memcfg.shard_spec.shape[1]
            grid_x = mesh.device.compute_with_storage_grid_size().x
            if cores % grid_x:
                raise ValueError(f"fused decode: the residual's {cores} cores do not fill rows of {grid_x}")
            block_w = self.hidden // TILE // cores
            self.norm_program = tt.LayerNormShardedMultiCoreProgramConfig(
                compute_with_storage_grid_size=(grid_x, cores // grid_x), subblock_w=block_w, block_h=1,
                block_w=block_w, inplace=False)
            for layer in self.layers:
                layer.fused = (self.residual_memcfg, self.norm_program)
        rep = tt.ReplicateTensorToMesh(mesh.device)
        # Batch: every decode step runs `batch` rows (one per KV-cache slot; module docstring).
        self.batch = int(profile.max_batch)
        # Decode inputs: written from the host before the steps (4 bytes per row), read by them.
        self.step_token = self._host_ids(np.zeros((1, self.batch), np.int64), rep, device=True)
        self.step_pos = tt.from_torch(torch.zeros(self.batch, dtype=torch.int32), dtype=tt.int32,
                                      device=mesh.device, mesh_mapper=rep)
        # (batch, 1): row b's cos/sin lookup is then (batch, 1, d) = one tile per row, viewed as
        # rotary's [1, batch, 1, d] without a device op ((1, batch) would need a ReshapeView per step)
        self.step_pos_rows = self._host_ids(np.zeros((self.batch, 1), np.int64), rep, device=True)
        # Device-side feedback: token k of every row lives in token_bufs[k] (argmax's output
        # shape, (1, 1, batch) uint32 row-major); allocated once, so a captured trace can address
        # them. Allocated here (not on first use: the first action is the one a trace is captured
        # from, and a tensor allocated after a capture may alias the trace's intermediates).
        self.token_bufs: list = []
        self._token_buffers(ACTION_TOKENS)
        # Token 1 of the item in each slot ((1, 1, 1): its prefill's argmax, or written by the
        # host after draft verification); decode step 0 gathers them into token_bufs[0]. With
        # one slot it IS token_bufs[0] (the single-robot graph, no gather).
        self.slot_start = [self.token_bufs[0]] if self.batch == 1 else [
            self._host_ids(np.zeros((1, 1, 1), np.int64), rep, device=True) for _ in range(self.batch)]
        self._pred_bufs: dict = {}  # (slot, draft rows + 1) -> (1, 1, rows) uint32: the prefill's argmax per row
        # Every draft length of an action (1..6 drafts) for every slot: allocated with the model, not in
        # an action. A buffer allocated after a trace capture may sit where that trace keeps its
        # intermediates; in a batch the host reads item i's predictions only after the later items'
        # prefill traces have replayed, so none may be allocated late.
        for slot in range(self.batch):
            for rows in range(2, ACTION_TOKENS + 1):
                self._pred_buffer(rows, slot)
        # Prefill inputs (written before the prefill runs or a trace of it replays; the prefill
        # reads only these): the ids per padded length S (1, S - patches) uint32 [BOS, ids[1:],
        # drafts, 0...]; the rows the LM head runs on, per row count (1, rows) uint32 [L-1, ...];
        # the projected patches (1, 1, patches, hidden), copied in on the device.
        self._ids_bufs: dict = {}
        self._row_bufs: dict = {}
        self.patch_buf = None

    def _token_buffers(self, count: int) -> list:
        while len(self.token_bufs) < count:
            self.token_bufs.append(self._host_ids(np.zeros((1, 1, self.batch), np.int64),
                                                  self.tt.ReplicateTensorToMesh(self.mesh.device), device=True))
        return self.token_bufs[:count]

    # ---- helpers -----------------------------------------------------------------------------
    def _host_ids(self, ids: np.ndarray, mapper, device: bool = False):
        tt = self.tt
        t = torch.as_tensor(np.asarray(ids, np.int64)).to(torch.int32)
        return tt.from_torch(t, dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT,
                             device=self.mesh.device if device else None, mesh_mapper=mapper)

    def _embed(self, ids: np.ndarray):
        tt = self.tt
        rows = self._host_ids(ids.reshape(1, -1), tt.ReplicateTensorToMesh(self.mesh.device), device=True)
        e = tt.embedding(rows, self.embedding, layout=tt.ROW_MAJOR_LAYOUT)
        return tt.reshape(e, (1, 1, ids.size, self.hidden))

    def sequence_length(self, num_prompt_ids: int, num_patches: int) -> int:
        return num_prompt_ids + num_patches

    def check_fits(self, length: int, num_tokens: int, draft_rows: int = 0) -> int:
        """The prefill's padded row count (L + draft rows rounded up to a tile)."""
        padded = round_up(length + draft_rows, TILE)
        if padded > self.max_seq or length + num_tokens - 1 > self.max_seq:
            raise InputError(
                f"prompt too long for the preallocated KV cache: {length} prompt+patch positions + {num_tokens} "
                f"actions exceed max_seq_len {self.max_seq} ({self.profile.source})")
        return padded

    def draft_fits(self, length: int, draft_rows: int, num_tokens: int = 0, batched: bool = False) -> bool:
        """Whether the prefill with draft_rows more rows still fits the KV cache (always true when
        max_seq_len is a multiple of 32 and the plain action fits). batched: the item shares its
        decode steps with others, so after k < num_tokens-1 accepted drafts its row may run up to
        num_tokens-1 steps (as many as the row needing most) from L+k: positions up to
        L + 2 num_tokens - 4 must stay in the cache (a row whose action is complete idles at 0)."""
        if batched and length + 2 * num_tokens - 3 > self.max_seq:
            return False
        return round_up(length + draft_rows, TILE) <= self.max_seq

    # ---- the multimodal sequence -------------------------------------------------------------
    def embed_sequence(self, input_ids: np.ndarray, projected, num_tokens: int, draft=None, item: int = 0):
        """[emb(BOS), patches, emb(ids[1:]), emb(draft)] -> ((1, 1, S, hidden) tiles, L):
        write_prefill_inputs, then embed_inputs (S = L + m rounded up to a tile row)."""
        seq, length = self.write_prefill_inputs(input_ids, projected, num_tokens, draft, item)
        return self.embed_inputs(seq), length

    def write_prefill_inputs(self, input_ids: np.ndarray, projected, num_tokens: int, draft=None, item: int = 0):
        """Everything the prefill of this prompt reads, into its fixed device tensors (what a
        replay of the prefill trace for this (S, rows) reads): the ids in ONE upload
        ([BOS, ids[1:], draft, 0...], S - patches ids), the LM-head rows L-1..L-1+m in one
        (1, m+1) upload, and the projected patches copied (one device op) into patch_buf.
        Returns (S, L). projected may hold a batch of images' patches (B, 1, patches, hidden): item
        picks this prompt's (one slice on the device; the buffers are shared by the items of a
        batch, whose prefills run one after another in the command queue's order).
        The m draft ids (None: none) sit at positions L..L+m-1. Rows past them
        hold embeddings of token 0: causal attention keeps them out of every real row, and the
        KV rows they write are overwritten by decode before they could be read."""
        tt = self.tt
        ids = np.asarray(input_ids, np.int64).reshape(-1)
        draft = np.zeros(0, np.int64) if draft is None else np.asarray(draft, np.int64).reshape(-1)
        num_patches = projected.shape[2]
        length = self.sequence_length(ids.size, num_patches)
        seq = self.check_fits(length, num_tokens, draft.size)
        rep = tt.ReplicateTensorToMesh(self.mesh.device)
        tokens = np.concatenate([ids, draft, np.zeros(seq - length - draft.size, np.int64)]).reshape(1, -1)
        rows = np.arange(length - 1, length + draft.size, dtype=np.int64).reshape(1, -1)
        for bufs, key, host in ((self._ids_bufs, seq, tokens), (self._row_bufs, rows.size, rows)):
            if key in bufs:
                tt.copy_host_to_device_tensor(self._host_ids(host, rep), bufs[key])
            else:  # first use (an op-by-op run, before any trace reads it): allocated by this upload
                bufs[key] = self._host_ids(host, rep, device=True)
        if projected.shape[0] > 1:
            projected = tt.slice(projected, [item, 0, 0, 0], [item + 1, 1, num_patches, self.hidden])
        if self.patch_buf is None:
            self.patch_buf = tt.clone(projected)
        else:
            tt.copy(projected, self.patch_buf)
        return seq, length

    def embed_inputs(self, seq: int):
        """The (1, 1, S, hidden) tiled sequence from the ids and patch buffers (device ops only)."""
        tt = self.tt
        ids = self._ids_bufs[seq]
        n = ids.shape[-1]
        e = tt.reshape(tt.embedding(ids, self.embedding, layout=tt.ROW_MAJOR_LAYOUT), (1, 1, n, self.hidden))
        bos = tt.slice(e, [0, 0, 0, 0], [1, 1, 1, self.hidden])
        rest = tt.slice(e, [0, 0, 1, 0], [1, 1, n, self.hidden])
        x = tt.concat([bos, tt.to_layout(self.patch_buf, tt.ROW_MAJOR_LAYOUT), rest], dim=2)
        return tt.to_layout(x, tt.TILE_LAYOUT)

    # ---- prefill / decode ----------------------------------------------------------------------
    def _head(self, x_row):
        tt = self.tt
        x_row = tt.rms_norm(x_row, weight=self.norm, epsilon=self.eps, compute_kernel_config=self.norm_compute)
        # Logits stay bf16 whatever the LM-head weight dtype (action logits differ by 0.06-0.25).
        # One row in prefill and decode alike: the decode (one-row) matmul.
        return self.lm_head.decode(x_row, tt.bfloat16)

    def prefill_layers(self, x, count: int | None = None, causal: bool = True, attn_mask=None, slot: int = 0):
        """Run the first `count` (default all) decoder layers over the whole sequence, filling
        KV-cache row `slot` (the batch item's own); returns the hidden states (1, 1, S, hidden).
        causal=False + attn_mask: the bidirectional pass of OpenVLA-OFT (attention.Attention.prefill,
        backends/ttnn/oft.py)."""
        seq = x.shape[2]
        cos, sin = self.rope.prefill_tables(seq)
        for layer in self.layers[:count]:
            x = layer.prefill(x, seq, cos, sin, causal, attn_mask, slot)
        return x

    def prefill(self, x, rows: int = 1, slot: int = 0):
        """(1, 1, S, hidden) -> this chip's vocab slice of the logits at positions L-1..L-2+rows,
        (1, 1, rows, V/N): the last prompt position, and with draft rows each draft's position.
        The rows are picked by an embedding lookup of the row indices written by
        write_prefill_inputs (a device tensor, so one trace serves every L of a 32-row bucket).
        Up to 32 rows are one tile row: the LM head's one-row (decode) matmul reads its weights
        once either way."""
        tt = self.tt
        x = self.prefill_layers(x, slot=slot)
        table = tt.reshape(tt.to_layout(x, tt.ROW_MAJOR_LAYOUT), (x.shape[2], self.hidden))
        last = tt.embedding(self._row_bufs[rows], table, layout=tt.TILE_LAYOUT)
        return self._head(tt.reshape(last, (1, 1, rows, self.hidden)))

    def prefill_graph(self, seq: int, rows: int, num_tokens: int, slot: int = 0):
        """The whole prefill from its input buffers (write_prefill_inputs): embedding, decoder
        layers filling cache row `slot`, norm + LM head on the `rows` rows, argmax into the
        slot's start token (rows 1) or its draft prediction buffer. Device ops only: THE
        function the backend captures as one trace per (S, rows, slot). Returns the argmax's
        (fixed) output tensor."""
        return self.prefill_argmax(self.prefill(self.embed_inputs(seq), rows, slot), rows, num_tokens, slot)

    def prefill_argmax(self, logits, rows: int, num_tokens: int, slot: int = 0):
        """Token 1 into the slot's start token (rows 1), or the m+1 draft predictions (rows m+1)."""
        if rows == 1:
            return self.prefill_token(logits, num_tokens, slot)
        return self.draft_predictions(logits, rows, slot)

    def decode_step(self, token=None):
        """One token for every row at its position in self.step_pos: reads only device tensors
        (`token`, a (1, 1, batch) argmax output, or by default step_token (1, batch); the
        step_pos* tensors). Returns this chip's vocab slice of the logits (1, 1, batch, V/N)."""
        b = self.batch
        token = self.step_token if token is None else self.tt.reshape(token, (1, b))
        if self.fused:
            return self._decode_step_fused(token)
        tt = self.tt
        x = tt.reshape(tt.embedding(token, self.embedding, layout=tt.TILE_LAYOUT), (1, 1, b, self.hidden))
        cos, sin = self.rope.decode_tables(self.step_pos_rows)
        for layer in self.layers:
            x = layer.decode(x, self.step_pos, cos, sin)
        return self._head(x)

    def _decode_step_fused(self, token):
        """tt_transformers' decode graph: the residual stays width-sharded in L1 (decoder.py)."""
        tt, mem = self.tt, self.residual_memcfg
        x = tt.reshape(tt.embedding(token, self.embedding, layout=tt.TILE_LAYOUT), (1, 1, self.batch, self.hidden))
        x = tt.to_memory_config(x, mem)
        cos, sin = self.rope.decode_tables_sharded(self.step_pos_rows, self.layers[0].attention.update_memcfg)
        for layer in self.layers:
            x = layer.decode(x, self.step_pos, cos, sin)
        x = tt.rms_norm(x, weight=self.norm, epsilon=self.eps, program_config=self.norm_program, memory_config=mem,
                        compute_kernel_config=self.norm_compute)
        return tt.sharded_to_interleaved(self.lm_head.decode_sharded(x, tt.bfloat16), tt.L1_MEMORY_CONFIG)

    def next_token(self, logits, out=None, rows: int = 1):
        """Greedy argmax over all real vocabulary entries (padding columns excluded) of each of
        the `rows` rows, on the mesh; written into `out` (a preallocated (1, 1, rows) uint32
        tensor) when given."""
        tt = self.tt
        logits = self.ccl.all_gather(logits, dim=3)
        logits = tt.slice(logits, [0, 0, 0, 0], [1, 1, rows, self.vocab])
        if out is None:
            return tt.argmax(logits, dim=3)
        return tt.argmax(logits, dim=3, output_tensor=out)

    # ---- device-side feedback: the decode steps of one action ----------------------------------
    def prefill_token(self, logits, num_tokens: int, slot: int = 0):
        """Token 1 (the prefill's argmax) into the slot's start token, on the device."""
        self._token_buffers(num_tokens)
        return self.next_token(logits, out=self.slot_start[slot])

    def draft_predictions(self, logits, rows: int, slot: int = 0):
        """The greedy token after each of the `rows` prefill rows (the last prompt position and
        each draft), argmax on the device into a preallocated (1, 1, rows) uint32 tensor of the
        slot (one 28-byte read for an action's 6 drafts)."""
        return self.next_token(logits, out=self._pred_buffer(rows, slot), rows=rows)

    def _pred_buffer(self, rows: int, slot: int = 0):
        if (slot, rows) not in self._pred_bufs:
            self._pred_bufs[slot, rows] = self._host_ids(np.zeros((1, 1, rows), np.int64),
                                                         self.tt.ReplicateTensorToMesh(self.mesh.device), device=True)
        return self._pred_bufs[slot, rows]

    def set_start_token(self, token: int, slot: int = 0):
        """Token 1 of the slot's decode steps from the host: after draft verification, the
        first token greedy decoding has not confirmed yet (one 4-byte write)."""
        tt = self.tt
        tt.copy_host_to_device_tensor(
            self._host_ids(np.array([[[token]]]), tt.ReplicateTensorToMesh(self.mesh.device)), self.slot_start[slot])

    def feedback_step(self, k: int):
        """Decode step k (0-based): embeds token_bufs[k] (row b: slot b's token) at the positions
        in step_pos, writes the argmax of every row into token_bufs[k + 1], then advances step_pos
        and step_pos_rows by one on the device. Step 0 first gathers the slots' start tokens
        into token_bufs[0] (concat + copy: three device ops; none with one slot)."""
        tt, bufs = self.tt, self._token_buffers(k + 2)
        if k == 0 and self.batch > 1:
            tt.copy(tt.concat(self.slot_start, dim=2), bufs[0])
        self.next_token(self.decode_step(bufs[k]), out=bufs[k + 1], rows=self.batch)
        self.tt.plus_one(self.step_pos)
        self.tt.plus_one(self.step_pos_rows)

    def gather_tokens(self, num_tokens: int):
        """Every row's tokens as one (1, num_tokens, batch) device tensor (one read for all)."""
        bufs = self._token_buffers(num_tokens)
        return bufs[0] if num_tokens == 1 else self.tt.concat(bufs, dim=1)

    def decode_steps(self, num_tokens: int):
        """Tokens 2..num_tokens with device-side feedback; no host transfer. Returns
        gather_tokens(num_tokens). THE function the backend captures as one trace."""
        for k in range(num_tokens - 1):
            self.feedback_step(k)
        return self.gather_tokens(num_tokens)

    def set_decode_start(self, pos):
        """Position of decode step 0 of every row (an int: slot 0, the other rows at 0; or one
        per slot): the slot's sequence length L (+ accepted drafts); an idle row (no item, or
        its action already complete) at 0, where it writes and reads only its own slot's row 0.
        Two writes of 4 bytes per row, made before any decode op runs."""
        tt = self.tt
        rows = np.zeros(self.batch, np.int64)
        given = np.atleast_1d(np.asarray(pos, np.int64))
        if given.size > self.batch or (given < 0).any() or (given >= self.max_seq).any():
            raise ValueError(f"decode start positions {given.tolist()} for {self.batch} rows of {self.max_seq}")
        rows[:given.size] = given
        rep = tt.ReplicateTensorToMesh(self.mesh.device)
        tt.copy_host_to_device_tensor(self._host_ids(rows.reshape(-1, 1), rep), self.step_pos_rows)
        tt.copy_host_to_device_tensor(
            tt.from_torch(torch.as_tensor(rows, dtype=torch.int32), dtype=tt.int32, mesh_mapper=rep), self.step_pos)

    def read_tokens(self, tokens_tensor) -> list:
        """A (1, 1, n) id tensor (draft predictions) -> the ids, from chip 0 (one blocking read)."""
        tt = self.tt
        return [int(v) for v in tt.to_torch(tt.get_device_tensors(tokens_tensor)[0]).reshape(-1)]

    def read_token_rows(self, tokens_tensor) -> list:
        """gather_tokens' (1, n, batch) tensor -> one id list per row (slot), from chip 0 (one
        blocking read)."""
        tt = self.tt
        host = tt.to_torch(tt.get_device_tensors(tokens_tensor)[0]).reshape(-1, self.batch)
        return [[int(v) for v in host[:, b]] for b in range(self.batch)]

    def set_step_inputs(self, token: int, pos: int):
        """Row 0's decode input (token, position) from the host, the other rows token 0 at 0
        (tests: one op-by-op step through decode_step())."""
        tt = self.tt
        rep = tt.ReplicateTensorToMesh(self.mesh.device)
        ids = np.zeros((1, self.batch), np.int64)
        ids[0, 0] = token
        tt.copy_host_to_device_tensor(self._host_ids(ids, rep), self.step_token)
        self.set_decode_start(pos)

    def logits_to_torch(self, logits) -> torch.Tensor:
        """This chip's vocab slices gathered on the host -> (vocab,) float (tests / PCC only)."""
        tt = self.tt
        full = tt.to_torch(logits, mesh_composer=tt.ConcatMeshToTensor(self.mesh.device, dim=3))
        return full.reshape(-1)[: self.vocab].float()
