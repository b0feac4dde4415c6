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
        self._prefill_traces: dict = {}  # (padded length S, LM-head rows) -> (trace id, argmax output tensor)
        self._prefill_pending = None  # (S, rows, num_tokens): the prefill just run op by op, to capture
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

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: np.ndarray, num_tokens: int, draft=None):
        """One action. Host traffic: the image and the prompt ids (+ the decode start position,
        2 x 4 B) in, the num_tokens ids out in ONE read at the end; between stages nothing is
        written, read or synchronised (argmax feeds the next step on the device, llm.py).

        draft: token ids (speculative.sanitize_draft: a bad draft is dropped, never raised)
        verified in the prefill; self.last_accepted says how many were accepted (0 without one).
        A drafted action adds one read (the m+1 argmax ids of the prompt and draft rows) and
        writes the start token + position after it (3 x 4 B) instead of before the prefill; with
        every draft accepted that read is the action's only one and no decode step runs.

        timings_ms: with profile_stages False (the timed path) the stages are only enqueued, so
        vision / projector / prefill are host dispatch times (a drafted prefill ends with its
        verification read) and "decode" runs until the tokens are back (their sum is the
        action's wall time); with profile_stages True every stage is followed by
        synchronize_device and each entry is that stage's own time."""
        self._guard()
        llm, clock, t = self.llm, time.perf_counter, {}
        sync = self._sync if self.profile_stages else (lambda: None)
        drafts = sanitize_draft(draft, num_tokens, self.config.vocab_size).tokens
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
            ids = np.asarray(input_ids, np.int64).reshape(-1)
            length = llm.sequence_length(ids.size, projected.shape[2])
            if drafts is not None and not llm.draft_fits(length, drafts.size):
                log.debug("draft dropped: %d draft rows after %d positions exceed max_seq_len %d",
                          drafts.size, length, llm.max_seq)
                drafts = None
            if drafts is None:
                llm.set_decode_start(length)
                self._prefill(ids, projected, num_tokens, None)
                known, accepted = [], 0
            else:
                known, accepted = self._verify_drafts(ids, projected, num_tokens, drafts)
            sync(); t3 = clock()
            stage = "decode"
            steps = num_tokens - 1 - accepted
            if steps == 0:  # every draft accepted: the verification read returned the whole action
                tokens = known
            else:
                rest = llm.read_tokens(self._decode(steps))
                if known and rest[0] != known[-1]:
                    raise BackendError(f"internal: decode started from token {rest[0]}, verification chose "
                                       f"{known[-1]}")
                tokens = known[:-1] + rest
            t4 = clock()
            if self._prefill_pending is not None:
                self._capture_prefill_trace(*self._prefill_pending)
            if self.trace and steps > 0 and steps not in self._traces:
                self._capture_decode_trace(steps, length + accepted)
        except OpenVLAError:
            raise
        except Exception as e:
            self._fail(stage, e)
        self.last_accepted, self.last_decode_steps = accepted, steps
        t.update(vision=(t1 - t0) * 1e3, projector=(t2 - t1) * 1e3, prefill=(t3 - t2) * 1e3, decode=(t4 - t3) * 1e3)
        return np.asarray(tokens, dtype=np.int64), t

    def _verify_drafts(self, ids: np.ndarray, projected, num_tokens: int, drafts: np.ndarray):
        """The drafted prefill: [BOS, patches, prompt, d1..dm], the LM head on rows L-1..L-1+m,
        their argmax p_0..p_m on the device, ONE read of them, k = accepted_length(d, p) on the
        host (the one verifier every backend uses). Returns (p_0..p_k, k): tokens 1..k+1 of the
        action. Unless the action is complete, the decode steps are then set to start at
        position L+k from token p_k (3 writes of 4 bytes: the device is idle after the read)."""
        llm = self.llm
        out, length = self._prefill(ids, projected, num_tokens, drafts)
        predicted = llm.read_tokens(out)
        accepted = int(accepted_length(drafts, np.asarray(predicted, np.int64)))
        if accepted < num_tokens - 1:
            llm.set_start_token(predicted[accepted])
            llm.set_decode_start(length + accepted)
        return predicted[:accepted + 1], accepted

    def _prefill(self, ids: np.ndarray, projected, num_tokens: int, drafts):
        """The prefill of [BOS, patches, ids[1:], drafts]: its inputs written into their fixed
        device tensors (llm.write_prefill_inputs: the ids, the LM-head row indices, the patches
        copied on the device), then the trace captured for this (padded length S, rows) replayed
        when there is one, else the same graph op by op (the warm-up; generate() captures it
        after the action). rows = 1 (plain) or m+1 (m drafts). Returns (the argmax output
        tensor: token_bufs[0], or the draft predictions, L)."""
        llm = self.llm
        rows = 1 if drafts is None else drafts.size + 1
        self._prefill_pending = None
        if not self.trace:
            x, length = llm.embed_sequence(ids, projected, num_tokens, draft=drafts)
            return llm.prefill_argmax(llm.prefill(x, rows), rows, num_tokens), length
        seq, length = llm.write_prefill_inputs(ids, projected, num_tokens, drafts)
        traced = self._prefill_traces.get((seq, rows))
        if traced is None:
            self._prefill_pending = (seq, rows, num_tokens)
            return llm.prefill_graph(seq, rows, num_tokens), length
        tid, out = traced
        self.tt.execute_trace(self.mesh.device, tid, cq_id=0, blocking=False)
        return out, length

    def _capture_prefill_trace(self, seq: int, rows: int, num_tokens: int):
        """After its warm-up (the same prefill_graph run op by op by this action), record the
        prefill of padded length `seq` with `rows` LM-head rows as one trace. It reads only the
        fixed input tensors of write_prefill_inputs (ids per S, row indices per rows, patch_buf)
        and writes the KV caches and the argmax buffer, so it serves every prompt length L of the
        bucket. One trace per (S, rows): at most max_seq_len/32 buckets x (1 + drafted row counts)."""
        tt, dev = self.tt, self.mesh.device
        self._prefill_pending = None
        self.llm.ccl.reset()  # the trace records the semaphores of its collectives (as the decode trace)
        tid = tt.begin_trace_capture(dev, cq_id=0)
        try:
            out = self.llm.prefill_graph(seq, rows, num_tokens)
        finally:
            tt.end_trace_capture(dev, tid, cq_id=0)
        self._prefill_traces[(seq, rows)] = (tid, out)
        log.info("prefill of %d rows (%d LM-head rows) captured as trace %s", seq, rows, tid)

    def _decode(self, steps: int):
        """`steps` decode steps from token_bufs[0] at the position in step_pos: the trace captured
        for that many steps when there is one, else the same llm.decode_steps run op by op.
        Returns the device tensor of the steps + 1 ids (the start token first)."""
        traced = self._traces.get(steps)
        if traced is not None:
            tid, out = traced
            self.tt.execute_trace(self.mesh.device, tid, cq_id=0, blocking=False)
            return out
        return self.llm.decode_steps(steps + 1)

    def _capture_decode_trace(self, steps: int, start: int):
        """After a warm-up call (every decode op compiled, every token buffer allocated), record
        `steps` decode steps as one trace: a replay reads the start token (token_bufs[0]) and
        position from their device tensors and leaves the tokens in the returned tensor. One
        trace per step count: 6 for a plain action, 6-k after k accepted drafts (k = 0 shares
        the plain one)."""
        tt, dev = self.tt, self.mesh.device
        self.llm.set_decode_start(start)  # capture records commands; nothing runs until replay
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
        self._traces, self._prefill_traces = {}, {}
        try:
            if getattr(self, "vision", None) is not None:
                self.vision.release()
        except Exception as e:
            log.warning("releasing the vision trace failed: %s", e)
        self.mesh.close()
