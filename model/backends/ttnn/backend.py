"""TtnnBackend: OpenVLA resident on an N300 (1x2) or T3K (1x8) Tenstorrent mesh.

Same interface as TorchBackend: generate(pixel_values, input_ids, num_tokens) -> (tokens,
timings_ms). Preprocessing, prompt and action decoding stay in the policy (one implementation).

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
        self._traces: dict = {}  # decode steps per action -> (trace id, tokens tensor)
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
        self.projector = Projector(tt, mesh, profile, self.store)
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
    def generate(self, pixel_values: torch.Tensor, input_ids: np.ndarray, num_tokens: int):
        """One action. Host traffic: the image and the prompt ids (+ the decode start position,
        2 x 4 B) in, the num_tokens ids out in ONE read at the end; between stages nothing is
        written, read or synchronised (argmax feeds the next step on the device, llm.py).

        timings_ms: with profile_stages False (the timed path) the stages are only enqueued, so
        vision / projector / prefill are host dispatch times and "decode" runs until the tokens
        are back (their sum is the action's wall time); with profile_stages True every stage is
        followed by synchronize_device and each entry is that stage's own time."""
        self._guard()
        llm, clock, t = self.llm, time.perf_counter, {}
        sync = self._sync if self.profile_stages else (lambda: None)
        stage = "vision"
        try:
            t0 = clock()
            feats = self.vision(pixel_values)
            sync(); t1 = clock()
            stage = "projector"
            projected = self.projector(feats)
            sync(); t2 = clock()
            stage = "prefill"
            x, length = llm.embed_sequence(input_ids, projected, num_tokens)
            llm.set_decode_start(length)
            llm.prefill_token(llm.prefill(x, length), num_tokens)
            sync(); t3 = clock()
            stage = "decode"
            tokens = llm.read_tokens(self._decode(num_tokens))
            t4 = clock()
            steps = num_tokens - 1
            if self.trace and steps > 0 and steps not in self._traces:
                self._capture_decode_trace(num_tokens, length)
        except OpenVLAError:
            raise
        except Exception as e:
            self._fail(stage, e)
        t.update(vision=(t1 - t0) * 1e3, projector=(t2 - t1) * 1e3, prefill=(t3 - t2) * 1e3, decode=(t4 - t3) * 1e3)
        return np.asarray(tokens, dtype=np.int64), t

    def _decode(self, num_tokens: int):
        """Tokens 2..num_tokens: the captured trace replayed when there is one, else the same
        llm.decode_steps run op by op. Returns the device tensor of all num_tokens ids."""
        traced = self._traces.get(num_tokens - 1)
        if traced is not None:
            tid, out = traced
            self.tt.execute_trace(self.mesh.device, tid, cq_id=0, blocking=False)
            return out
        return self.llm.decode_steps(num_tokens)

    def _capture_decode_trace(self, num_tokens: int, length: int):
        """After a warm-up call (every decode op compiled, every token buffer allocated), record
        ALL the decode steps of an action as one trace: a replay reads token 1 and the start
        position from their device tensors and leaves the tokens in the returned tensor."""
        tt, dev = self.tt, self.mesh.device
        self.llm.set_decode_start(length)  # capture records commands; nothing runs until replay
        # The trace records the semaphores its collectives use: start from a known point of the cycle.
        self.llm.ccl.reset()
        tid = tt.begin_trace_capture(dev, cq_id=0)
        try:
            out = self.llm.decode_steps(num_tokens)
        finally:
            tt.end_trace_capture(dev, tid, cq_id=0)
        self._traces[num_tokens - 1] = (tid, out)
        log.info("%d decode steps captured as trace %s", num_tokens - 1, tid)

    # ---- per-stage outputs (tests, PCC checks) ---------------------------------------------------
    @torch.inference_mode()
    def stage_outputs(self, pixel_values: torch.Tensor, input_ids: np.ndarray) -> dict:
        """Host copies of each stage's output for one input: the two towers, the fused features,
        the projector, decoder layer 0's hidden states (rows 0..L-1) and the prefill logits."""
        self._guard()
        towers = self.vision.tower_outputs(pixel_values)
        feats = self.tt.concat(towers, dim=3)
        projected = self.projector(feats)
        x, length = self.llm.embed_sequence(input_ids, projected, 1)
        layer0 = self._replicated_to_torch(self.llm.prefill_layers(x, 1))[..., :length, :]
        logits = self.llm.prefill(x, length)
        return {"dinov2": self._replicated_to_torch(towers[0]), "siglip": self._replicated_to_torch(towers[1]),
                "vision": self._replicated_to_torch(feats), "projector": self._replicated_to_torch(projected),
                "decoder_layer0": layer0, "prefill_logits": self.llm.logits_to_torch(logits)}

    def close(self):
        if self.mesh is None:
            return
        for tid, _ in self._traces.values():
            if self.mesh.device is None:
                break
            try:
                self.tt.release_trace(self.mesh.device, tid)
            except Exception as e:
                log.warning("releasing the decode trace failed: %s", e)
        self._traces = {}
        self.mesh.close()
