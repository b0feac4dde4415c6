"""TtnnBackend: OpenVLA resident on an N300 (1x2) or T3K (1x8) Tenstorrent mesh.

Same interface as TorchBackend: generate(pixel_values, input_ids, num_tokens, draft=None) ->
(tokens, timings_ms), last_accepted after a drafted call. Preprocessing, prompt and action
decoding stay in the policy (one implementation).

Speculative action decoding (generate(..., draft=)): the draft ids ride in the prefill as rows
L..L+m-1 (the same upload as the prompt ids), the LM head runs on the last prompt row and the m
draft rows, their argmax is taken on the device and read back ONCE ((m+1) x 4 bytes); the host
verifies them with speculative.accepted_length (it must know the count anyway: it picks how many
decode steps to launch, and a trace cannot branch), writes the first unconfirmed token and the
position L+k (3 x 4 bytes), and the remaining num_tokens-1-k steps run from the decode trace
captured for that many steps (one per count, on first use). Tokens are those of plain greedy
decoding by construction; docs/ttnn.md "Speculative action decoding".

`tt` is the ttnn module. The golden-function tests pass an emulator with the same names in its
place; everything else (this file, the blocks, weight conversion) is the production code.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
import sys
import time

import numpy as np
import torch

from ...errors import BackendError, OpenVLAError
from ...speculative import accepted_length, sanitize_draft
from .mesh import MESH_SHAPES, open_mesh
from .model_config import check_against_ttnn, load_profile, overrides_from_node_precision

log = logging.getLogger("openvla_model.ttnn")


def import_ttnn():
    try:
        import ttnn
    except Exception as e:  # ImportError, or its C++ runtime failing to load
        raise BackendError(f"backend 'ttnn' needs the ttnn package (pip install ttnn==0.81.1): {e}") from e
    return ttnn


def on_mock_cluster() -> bool:
    """A mock cluster (TT_METAL_MOCK_CLUSTER_DESC_PATH) validates ops but runs nothing."""
    return bool(os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH"))


def _check_divisible(config, n: int, mesh_name: str):
    llm = config.llm
    kv = getattr(llm, "num_key_value_heads", None) or llm.num_attention_heads
    if llm.num_attention_heads % n or kv % n:
        raise BackendError(f"{mesh_name}: {llm.num_attention_heads} query / {kv} KV heads do not split over {n} chips")


class TtnnBackend:
    name = "ttnn"
    supports_draft = True  # generate(..., draft=) verifies drafts in the prefill's draft rows

    def __init__(self, config, checkpoint, mesh_device: str | None = None, *, tt=None, precision: dict | None = None,
                 profile_overrides: dict | None = None, cache_dir="auto", trace: bool | None = None, config_dir=None):
        """mesh_device: N300 | T3K | auto. precision: the ROS node's precision.* parameters.
        profile_overrides: keys of config/ttnn/<MESH>.yaml (e.g. {"decode_matmul": "dram_sharded"}).
        cache_dir: converted-weight cache ("auto": keyed by checkpoint + mesh + dtypes; None: off).
        trace: capture all decode steps of an action as one trace (default: the profile's trace_decode,
        never on mock devices: their trace capture crashes).
        tt: the ttnn module, or a stand-in with the same names (the golden-function tests)."""
        start = time.perf_counter()
        self.config = config
        self.tt = tt if tt is not None else import_ttnn()
        self.mesh = None
        self._dead: str | None = None
        self._traces: dict = {}  # decode steps -> (trace id, tokens tensor): 6 plain, 6-k after k drafts
        # (padded length S, LM-head rows, slot) -> (trace id, argmax output), least recently used first;
        # at most profile.max_prefill_traces (the trace region is shared with decode and vision)
        self._prefill_traces: OrderedDict = OrderedDict()
        self.last_accepted = 0  # drafts accepted by the last generate()
        self.last_decode_steps = 0  # decode steps the last generate() ran (num_tokens-1-accepted)
        self.profile_stages = False  # True: synchronise after each stage (per-stage timings)
        overrides = {**(profile_overrides or {}), **overrides_from_node_precision(precision)}

        def profile_loader(name):
            p = load_profile(name, config_dir, overrides)
            check_against_ttnn(p, self.tt)
            _check_divisible(config, MESH_SHAPES[name][1], name)
            # Missing / mis-shaped weights are reported before any device is opened.
            from ...modeling import OpenVLAModules

            with torch.device("meta"):
                expected = OpenVLAModules(config).expected_checkpoint_shapes()
            checkpoint.validate(expected)
            return p

        self.mesh, self.profile = open_mesh(self.tt, mesh_device, profile_loader)
        try:
            self._build(checkpoint, cache_dir)
        except BaseException as e:
            self.close()
            if isinstance(e, OpenVLAError):
                raise
            if isinstance(e, Exception):
                raise BackendError(f"loading OpenVLA onto the {self.profile.mesh_name} mesh failed: {e}") from e
            raise
        self.trace = (self.profile.trace_decode and not on_mock_cluster()) if trace is None else bool(trace)
        self.vision.trace = self.trace  # vision is captured once as its own trace too (vision.py)
        self.load_s = time.perf_counter() - start
        print(f"[openvla ttnn] {self.profile.mesh_name} ready in {self.load_s:.1f} s (weights: "
              f"{self.store.hits} from cache, {self.store.misses} converted"
              f"{', cache ' + str(self.store.cache_dir) if self.store.cache_dir else ''})", file=sys.stderr)

    def _build(self, checkpoint, cache_dir):
        from .llm import LLM
        from .projector import Projector
        from .vision import FusedVision
        from .weights import WeightStore

        tt, mesh, profile = self.tt, self.mesh, self.profile
        self.store = WeightStore(tt, mesh, checkpoint, profile, cache_dir)
        self.vision = FusedVision(tt, mesh, profile, self.store, self.config)
        self.num_patches = self.vision.num_patches
        self.projector = Projector(tt, mesh, profile, self.store, self.vision.feature_layout, self.vision.dim)
        self.llm = LLM(tt, mesh, profile, self.store, self.config.llm, profile.max_seq_len)

    # ---- interface -----------------------------------------------------------------------------
    def describe(self) -> dict:
        p = self.profile
        return {"backend": self.name, "device": f"{p.mesh_name} mesh {list(p.mesh_shape)}",
                "dtype": ", ".join(f"{k}={v}" for k, v in p.dtypes.items()),
                "trace_decode": bool(self.trace), "decode_matmul": p.decode_matmul,
                "decode_graph": "fused" if self.llm.fused else "legacy", "load_s": round(self.load_s, 2),
                "weight_cache": str(self.store.cache_dir) if self.store.cache_dir else None,
                "state": "error: " + self._dead if self._dead else "ok"}

    def _sync(self):
        self.tt.synchronize_device(self.mesh.device)

    def _replicated_to_torch(self, t) -> torch.Tensor:
        tt = self.tt
        return tt.to_torch(tt.get_device_tensors(t)[0]).float()

    def _guard(self):
        if self._dead:
            raise BackendError(f"the TT-NN backend failed earlier and its mesh is closed ({self._dead}); "
                               "reload the policy")
        if self.mesh is None or self.mesh.device is None:
            raise BackendError("the TT-NN backend is closed")

    def _fail(self, stage: str, e: Exception):
        self._dead = f"{stage}: {e}"
        self.close()
        raise BackendError(f"TT-NN device failed during {stage}: {e} (mesh closed)") from e

    def check_prompt(self, input_ids, num_tokens: int) -> None:
        """InputError when this prompt (+ 256 patches + the action) does not fit the KV cache
        (the profile's max_seq_len): policy.predict_batch asks it per item, so one robot's too
        long instruction fails that robot's item only, never the batch it would have joined."""
        ids = np.asarray(input_ids).reshape(-1)
        self.llm.check_fits(self.llm.sequence_length(ids.size, self.num_patches), num_tokens)

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: np.ndarray, num_tokens: int, draft=None):
        """One action: a batch of one (slot 0; the other decode rows idle). Host traffic: the
        image and the prompt ids (+ the decode start positions) in, the tokens out in ONE read at
        the end; between stages nothing is written, read or synchronised (argmax feeds the next
        step on the device, llm.py).

        draft: token ids (speculative.sanitize_draft: a bad draft is dropped, never raised)
        verified in the prefill; self.last_accepted says how many were accepted (0 without one).
        A drafted action adds one read (the m+1 argmax ids of the prompt and draft rows) and
        writes the start token + positions after it; with every draft accepted that read is the
        action's only one and no decode step runs.

        timings_ms: with profile_stages False (the timed path) the stages are only enqueued, so
        vision / projector / prefill are host dispatch times (a drafted prefill ends with its
        verification read) and "decode" runs until the tokens are back (their sum is the
        action's wall time); with profile_stages True every stage is followed by
        synchronize_device and each entry is that stage's own time."""
        tokens, accepted, t = self.generate_batch(pixel_values[:1], [input_ids], num_tokens,
                                                  drafts=None if draft is None else [draft])
        return tokens[0], t

    @torch.inference_mode()
    def generate_batch(self, pixel_values: torch.Tensor, input_ids, num_tokens: int, drafts=None):
        """Greedy action tokens for B items: pixel_values (B, 6, S, S), input_ids a list of B
        prompt id arrays (any lengths), drafts None or B drafts (None per item allowed). Returns
        (tokens int64[B, num_tokens], accepted int64[B], timings_ms summed over the groups).

        Items are run in groups of the profile's max_batch (the KV-cache slots): per group one
        batched vision + projector pass, one prefill per item filling its own cache slot (each
        replayed from its (S, rows, slot) trace), then ONE decode of every slot's row per step.
        Each item's tokens are what generate() gives it alone: its prefill is its own, and decode
        rows never read another slot's cache (docs/ttnn.md "Several robots")."""
        self._guard()
        batch = len(input_ids)
        if pixel_values.shape[0] != batch:
            raise BackendError(f"generate_batch: {pixel_values.shape[0]} images for {batch} prompts")
        if drafts is not None and len(drafts) != batch:
            raise BackendError(f"generate_batch: {len(drafts)} drafts for {batch} prompts")
        size = self.llm.batch
        tokens, accepted, timings = [], [], {}
        for g in range(0, batch, size):
            tok, acc, t = self._generate_group(pixel_values[g:g + size], list(input_ids[g:g + size]), num_tokens,
                                               None if drafts is None else list(drafts[g:g + size]))
            tokens += tok
            accepted += acc
            for k, v in t.items():
                timings[k] = timings.get(k, 0.0) + v
        self.last_accepted = accepted[0] if batch == 1 else 0
        return np.asarray(tokens, np.int64).reshape(batch, num_tokens), np.asarray(accepted, np.int64), timings

    def _generate_group(self, pixel_values, input_ids: list, num_tokens: int, drafts):
        """At most max_batch items; item i in KV-cache slot i (generate_batch)."""
        llm, clock, t = self.llm, time.perf_counter, {}
        sync = self._sync if self.profile_stages else (lambda: None)
        count = len(input_ids)
        ids = [np.asarray(x, np.int64).reshape(-1) for x in input_ids]
        lengths = [llm.sequence_length(x.size, self.num_patches) for x in ids]
        item_drafts = []
        for i, length in enumerate(lengths):
            d = sanitize_draft(None if drafts is None else drafts[i], num_tokens, self.config.vocab_size).tokens
            if d is not None and not llm.draft_fits(length, d.size, num_tokens, batched=count > 1):
                log.debug("draft dropped: %d draft rows after %d positions exceed max_seq_len %d",
                          d.size, length, llm.max_seq)
                d = None
            llm.check_fits(length, num_tokens, 0 if d is None else d.size)  # every item before any device work
            item_drafts.append(d)
        self.last_accepted = self.last_decode_steps = 0
        stage = "vision"
        try:
            t0 = clock()
            feats = self.vision(pixel_values)
            sync(); t1 = clock()
            stage = "projector"
            projected = self.projector(feats)
            sync(); t2 = clock()
            stage = "prefill"
            outs = [self._prefill(ids[i], projected, num_tokens, item_drafts[i], slot=i) for i in range(count)]
            known, accepted, starts = [[] for _ in range(count)], [0] * count, list(lengths)
            for i, d in enumerate(item_drafts):
                if d is not None:
                    known[i], accepted[i], starts[i] = self._verify_drafts(outs[i], d, lengths[i], num_tokens, i)
            steps = max(num_tokens - 1 - a for a in accepted)
            if steps > 0:
                llm.set_decode_start(starts)
            sync(); t3 = clock()
            stage = "decode"
            rows = llm.read_token_rows(self._decode(steps)) if steps > 0 else None
            tokens = []
            for i in range(count):
                need = num_tokens - 1 - accepted[i]  # this item's own decode steps
                if need == 0:  # every draft accepted: the verification read returned the whole action
                    tokens.append(known[i])
                    continue
                rest = rows[i][:need + 1]
                if known[i] and rest[0] != known[i][-1]:
                    raise BackendError(f"internal: slot {i} decoded from token {rest[0]}, verification chose "
                                       f"{known[i][-1]}")
                tokens.append(known[i][:-1] + rest)
            t4 = clock()
            if self.trace and steps > 0 and steps not in self._traces:
                self._capture_decode_trace(steps, starts)
        except OpenVLAError:
            raise
        except Exception as e:
            self._fail(stage, e)
        self.last_accepted, self.last_decode_steps = accepted[0], steps
        t.update(vision=(t1 - t0) * 1e3, projector=(t2 - t1) * 1e3, prefill=(t3 - t2) * 1e3, decode=(t4 - t3) * 1e3)
        return tokens, accepted, t

    def _verify_drafts(self, out, drafts: np.ndarray, length: int, num_tokens: int, slot: int):
        """After the drafted prefill of the item in `slot` ([BOS, patches, prompt, d1..dm], the
        LM head on rows L-1..L-1+m, their argmax p_0..p_m on the device): ONE read of them,
        k = accepted_length(d, p) on the host (the one verifier every backend uses). Returns
        (p_0..p_k, k, start position): tokens 1..k+1 of the action. Unless the action is
        complete, the slot's decode is set to start at position L+k from token p_k (a 4-byte
        write: the device is idle after the read); a complete action's row idles at 0."""
        llm = self.llm
        predicted = llm.read_tokens(out)
        accepted = int(accepted_length(drafts, np.asarray(predicted, np.int64)))
        if accepted == num_tokens - 1:
            return predicted[:accepted + 1], accepted, 0
        llm.set_start_token(predicted[accepted], slot)
        return predicted[:accepted + 1], accepted, length + accepted

    def _prefill(self, ids: np.ndarray, projected, num_tokens: int, drafts, slot: int = 0):
        """The prefill of [BOS, patches, ids[1:], drafts] of the item in `slot` (its patches are
        projected[slot]): its inputs written into their fixed device tensors
        (llm.write_prefill_inputs: the ids, the LM-head row indices, the patches copied on the
        device), then the trace captured for this (padded length S, rows, slot) replayed when
        there is one, else the same graph op by op (the warm-up), then captured at once (the
        next item of a batch rewrites the shared input tensors: a capture after the action would
        record from another item's inputs; a device only records, but the emulator runs what it
        records). rows = 1 (plain) or m+1 (m drafts). Returns the argmax output tensor: the
        slot's start token, or its draft predictions."""
        llm = self.llm
        rows = 1 if drafts is None else drafts.size + 1
        if not self.trace:
            x, _ = llm.embed_sequence(ids, projected, num_tokens, draft=drafts, item=slot)
            return llm.prefill_argmax(llm.prefill(x, rows, slot), rows, num_tokens, slot)
        seq, _ = llm.write_prefill_inputs(ids, projected, num_tokens, drafts, item=slot)
        traced = self._prefill_traces.get((seq, rows, slot))
        if traced is None:
            out = llm.prefill_graph(seq, rows, num_tokens, slot)
            if self.profile.max_prefill_traces > 0:
                self._capture_prefill_trace(seq, rows, num_tokens, slot)
            return out
        self._prefill_traces.move_to_end((seq, rows, slot))
        tid, out = traced
        self.tt.execute_trace(self.mesh.device, tid, cq_id=0, blocking=False)
        return out

    def _capture_prefill_trace(self, seq: int, rows: int, num_tokens: int, slot: int = 0):
        """Right after its warm-up (the same prefill_graph run op by op by this action, its inputs
        still in place), record the prefill of padded length `seq` with `rows` LM-head rows into
        cache slot `slot` as one trace. The device is synchronised first: the warm-up's
        collectives must be done before their semaphores are reset for the capture (the first
        action of a bucket and slot only). It reads only the fixed input tensors of write_prefill_inputs (ids per S, row
        indices per rows, patch_buf) and writes the slot's KV rows and its argmax buffer, so it
        serves every prompt length L of the bucket. One trace per (S, rows, slot): up to
        max_seq_len/32 buckets x (1 + drafted row counts) x max_batch keys, of which the profile's
        max_prefill_traces most recently used are kept (the others are released, and captured
        again when they come back): their commands share trace_region_size with the decode and
        vision traces."""
        tt, dev = self.tt, self.mesh.device
        self._sync()
        while len(self._prefill_traces) >= self.profile.max_prefill_traces:  # the least recently used goes
            key, (old, _) = self._prefill_traces.popitem(last=False)
            tt.release_trace(dev, old)
            log.info("prefill trace %s of %s released (max_prefill_traces %d)", old, key,
                     self.profile.max_prefill_traces)
        self.llm.ccl.reset()  # the trace records the semaphores of its collectives (as the decode trace)
        tid = tt.begin_trace_capture(dev, cq_id=0)
        try:
            out = self.llm.prefill_graph(seq, rows, num_tokens, slot)
        finally:
            tt.end_trace_capture(dev, tid, cq_id=0)
        self._prefill_traces[(seq, rows, slot)] = (tid, out)
        log.info("prefill of %d rows (%d LM-head rows, slot %d) captured as trace %s", seq, rows, slot, tid)

    def _decode(self, steps: int):
        """`steps` decode steps of every row from the slots' start tokens at the positions in
        step_pos: the trace captured for that many steps when there is one, else the same
        llm.decode_steps run op by op. Returns the device tensor of every row's steps + 1 ids
        (its start token first)."""
        traced = self._traces.get(steps)
        if traced is not None:
            tid, out = traced
            self.tt.execute_trace(self.mesh.device, tid, cq_id=0, blocking=False)
            return out
        return self.llm.decode_steps(steps + 1)

    def _capture_decode_trace(self, steps: int, starts):
        """After a warm-up call (every decode op compiled, every token buffer allocated), record
        `steps` decode steps as one trace: a replay reads the slots' start tokens and positions
        from their device tensors and leaves every row's tokens in the returned tensor. One
        trace per step count (the most steps any row of the batch needs): 6 for plain actions,
        6-k after k accepted drafts (k = 0 shares the plain one)."""
        tt, dev = self.tt, self.mesh.device
        self.llm.set_decode_start(starts)  # capture records commands; nothing runs until replay
        # The trace records the semaphores its collectives use: start from a known point of the cycle.
        self.llm.ccl.reset()
        tid = tt.begin_trace_capture(dev, cq_id=0)
        try:
            out = self.llm.decode_steps(steps + 1)
        finally:
            tt.end_trace_capture(dev, tid, cq_id=0)
        self._traces[steps] = (tid, out)
        log.info("%d decode steps captured as trace %s", steps, tid)

    # ---- per-stage outputs (tests, PCC checks) ---------------------------------------------------
    @torch.inference_mode()
    def stage_outputs(self, pixel_values: torch.Tensor, input_ids: np.ndarray) -> dict:
        """Host copies of each stage's output for one input: the two towers, the fused features,
        the projector, decoder layer 0's hidden states (rows 0..L-1) and the prefill logits."""
        self._guard()
        feats = self.vision(pixel_values)
        towers = self.vision.tower_features(feats)
        projected = self.projector(feats)
        x, length = self.llm.embed_sequence(input_ids, projected, 1)
        layer0 = self._replicated_to_torch(self.llm.prefill_layers(x, 1))[..., :length, :]
        logits = self.llm.prefill(x)
        return {"dinov2": towers[0], "siglip": towers[1],
                "vision": torch.cat(towers, -1), "projector": self._replicated_to_torch(projected),
                "decoder_layer0": layer0, "prefill_logits": self.llm.logits_to_torch(logits)}

    def close(self):
        if self.mesh is None:
            return
        for tid, _ in [*self._traces.values(), *self._prefill_traces.values()]:
            if self.mesh.device is None:
                break
            try:
                self.tt.release_trace(self.mesh.device, tid)
            except Exception as e:
                log.warning("releasing a decode / prefill trace failed: %s", e)
        self._traces, self._prefill_traces = {}, OrderedDict()
        try:
            if getattr(self, "vision", None) is not None:
                self.vision.release()
        except Exception as e:
            log.warning("releasing the vision trace failed: %s", e)
        self.mesh.close()
