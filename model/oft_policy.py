"""The OpenVLA-OFT policy: one forward pass per action chunk.

    from openvla_model.oft_policy import load_oft_policy
    policy = load_oft_policy("/path/to/openvla-7b-oft-finetuned-libero-spatial", device="cpu")
    chunk = policy.predict_chunk([primary_rgb, wrist_rgb], "put the bowl on the plate",
                                 proprio=state, unnorm_key="libero_spatial_no_noops")
    chunk.actions      # (CHUNK, ACTION_DIM) float32, robot units, step 0 first

`openvla_model.load_policy` hands OFT checkpoints (checkpoint_kind() == "oft") to load_oft_policy.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .action_codec import ActionCodec, resolve_unnorm_key
from .checkpoint import Checkpoint
from .config import load_config
from .errors import BackendError, CheckpointError, ConfigError, InputError, OpenVLAError
from .oft import (ACTION_HEAD, PROPRIO_PROJECTOR, OFTSpec, OFTTorchModel, config_oft_field, build_action_head,
                  build_proprio_projector, checkpoint_kind, find_component_file, load_component_state_dict,
                  load_oft_norm_stats, normalize_proprio, resolve_spec, unnormalize_actions, validate_oft_stats)
from .oft_preprocess import prepare_image
from .preprocess import Preprocessor
from .prompt import PromptTokenizer

log = logging.getLogger("openvla_model")

CHUNK_STAGES = ("preprocess", "vision", "projector", "llm", "head", "total")


@dataclass
class ActionChunk:
    actions: np.ndarray  # float32 (CHUNK, ACTION_DIM), un-normalised (robot units of unnorm_key)
    normalized: np.ndarray  # float32 (CHUNK, ACTION_DIM), in [-1, 1] as the head / bins gave them
    unnorm_key: str
    instruction: str
    timings_ms: dict = field(default_factory=dict)  # keys: CHUNK_STAGES
    tokens: np.ndarray | None = None  # int64 (CHUNK, ACTION_DIM): discrete fallback (no head) only
    out_of_range: np.ndarray | None = None  # bool (CHUNK, ACTION_DIM): discrete fallback only
    num_images: int = 1
    used_proprio: bool = False

    @property
    def valid(self) -> bool:
        """Every value finite and, for discrete tokens, every token an action token."""
        ok = bool(np.isfinite(self.actions).all())
        return ok and (self.out_of_range is None or not self.out_of_range.any())

    def to_dict(self) -> dict:
        return {
            "actions": self.actions.astype(float).tolist(),
            "normalized": self.normalized.astype(float).tolist(),
            "tokens": None if self.tokens is None else self.tokens.astype(int).tolist(),
            "out_of_range": None if self.out_of_range is None else self.out_of_range.astype(bool).tolist(),
            "unnorm_key": self.unnorm_key, "instruction": self.instruction,
            "num_images": self.num_images, "used_proprio": self.used_proprio,
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
        }


class OFTPolicy:
    kind = "oft"

    def __init__(self, config, spec: OFTSpec, model: OFTTorchModel, tokenizer: PromptTokenizer,
                 preprocessor: Preprocessor, norm_stats_source: str, default_unnorm_key: str | None = None,
                 load_time_s: float = 0.0):
        self.config, self.spec, self.model = config, spec, model
        self.tokenizer, self.preprocessor = tokenizer, preprocessor
        self.norm_stats_source = norm_stats_source
        self.default_unnorm_key = default_unnorm_key
        self.load_time_s = load_time_s

    @property
    def weights_path(self) -> Path:
        return self.config.weights_dir

    @property
    def has_head(self) -> bool:
        return self.model.head is not None

    @property
    def uses_proprio(self) -> bool:
        return self.model.proprio_projector is not None

    def describe(self) -> dict:
        s = self.spec
        return {**self.model.describe(), "kind": self.kind, "weights_path": str(self.weights_path),
                "load_time_s": round(self.load_time_s, 3), "unnorm_keys": sorted(self.config.norm_stats),
                "num_actions_chunk": s.num_actions_chunk, "action_dim": s.action_dim, "proprio_dim": s.proprio_dim,
                "normalization": s.normalization, "num_images_in_input": s.num_images_in_input,
                "action_head": "l1_regression" if self.has_head else "discrete (LM logits)",
                "constants_from": s.source, "norm_stats_from": self.norm_stats_source}

    def _images(self, images) -> list[np.ndarray]:
        frames = [images] if isinstance(images, np.ndarray) else list(images) if isinstance(images, (list, tuple)) \
            else None
        if not frames:
            raise InputError("images must be an RGB array or a non-empty list of them (primary camera first)")
        want = self.spec.num_images_in_input
        if want is not None and len(frames) != want:
            raise InputError(f"this checkpoint takes {want} image(s) per chunk (primary first, then wrist), "
                             f"got {len(frames)}")
        return frames

    def _proprio(self, proprio, stats: dict) -> np.ndarray | None:
        if not self.uses_proprio:
            if proprio is not None:
                raise InputError("this checkpoint has no proprio projector: call predict_chunk with proprio=None")
            return None
        if proprio is None:
            raise InputError(f"this checkpoint needs the robot state: proprio with {self.spec.proprio_dim} values")
        try:
            p = np.asarray(proprio, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise InputError(f"proprio must be {self.spec.proprio_dim} numbers: {e}") from e
        if p.size != self.spec.proprio_dim:
            raise InputError(f"proprio has {p.size} values, this checkpoint takes {self.spec.proprio_dim}")
        if not np.isfinite(p).all():
            raise InputError("proprio contains NaN or infinite values")
        return normalize_proprio(p, stats, self.spec.normalization)

    def predict_chunk(self, images, instruction: str, proprio=None, unnorm_key: str | None = None) -> ActionChunk:
        """One forward pass -> the next CHUNK actions. images: one RGB uint8 HxWx3 array or a list
        (primary camera first, then wrist cameras); proprio: the raw robot state (PROPRIO_DIM values)
        when the checkpoint has a proprio projector, else None."""
        clock = time.perf_counter
        t0 = clock()
        key = resolve_unnorm_key(self.config.norm_stats, unnorm_key if unnorm_key else self.default_unnorm_key)
        stats = self.config.norm_stats[key]
        frames = self._images(images)
        p_norm = self._proprio(proprio, stats)
        ids = self.tokenizer.encode_prompt(instruction)
        size = self.config.image_size
        n_prefix = len(frames) * self.config.num_patches + int(p_norm is not None)
        needed = len(ids) + n_prefix + self.spec.num_action_tokens + 1
        if needed > self.config.max_positions:
            raise InputError(f"instruction too long: {len(ids)} prompt tokens + {n_prefix} image/proprio tokens + "
                             f"{self.spec.num_action_tokens + 1} action tokens exceed {self.config.max_positions}")
        pixels = torch.cat([self.preprocessor(prepare_image(f, size)) for f in frames], dim=0)
        t1 = clock()
        out = self.model.run(pixels, ids, p_norm)
        actions = unnormalize_actions(out.normalized, stats, self.spec.normalization)
        t2 = clock()
        timings = {"preprocess": (t1 - t0) * 1e3, **out.timings_ms, "total": (t2 - t0) * 1e3}
        return ActionChunk(actions=actions, normalized=out.normalized, unnorm_key=key, instruction=instruction,
                           timings_ms=timings, tokens=out.tokens, out_of_range=out.out_of_range,
                           num_images=len(frames), used_proprio=p_norm is not None)

    def predict(self, *args, **kwargs):
        raise OpenVLAError("this is an OpenVLA-OFT checkpoint: it predicts action chunks with "
                           "predict_chunk(images, instruction, proprio, unnorm_key), not single actions")

    def close(self):
        if self.model is not None:
            self.model.close()
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _component_file(d: Path, name: str, step, use: bool | None) -> Path | None:
    if use is False:
        return None
    if step is None:
        found = find_component_file(d, name)
    else:
        path = d / f"{name}--{step}_checkpoint.pt"
        found = path if path.is_file() else None
    if found is None and use:
        want = f"{name}--{step if step is not None else '<step>'}_checkpoint.pt"
        flag = "use_action_head" if name == ACTION_HEAD else "use_proprio"
        raise CheckpointError(f"{want} not found in {d} (required: {flag}=True)")
    return found


def load_oft_policy(weights_path, backend: str = "torch", *, device: str | None = None, dtype: str | None = None,
                    center_crop: bool = False, default_unnorm_key: str | None = None,
                    num_actions_chunk: int | None = None, action_dim: int | None = None,
                    proprio_dim: int | None = None, normalization: str | None = None,
                    num_images_in_input: int | None = None, step: int | str | None = None,
                    use_action_head: bool | None = None, use_proprio: bool | None = None,
                    force_oft: bool = False, mesh_device: str | None = None, fast: bool | None = None,
                    **backend_options) -> OFTPolicy:
    """Load an OpenVLA-OFT checkpoint directory: the HF files plus `action_head--<step>_checkpoint.pt`
    and `proprio_projector--<step>_checkpoint.pt` (each optional: no head = the discrete fallback,
    no projector = no proprio input). Platform constants come from the explicit arguments, else
    config.json's openvla_oft object, else the statistics shapes (docs/oft.md).
    step: which `--<step>_checkpoint.pt` files when several are there. use_action_head /
    use_proprio: None = use the file when present, True = required (missing -> CheckpointError),
    False = ignore it (use_action_head=False runs the discrete fallback). force_oft: treat a
    plain-looking checkpoint (no head, no projector) as OFT (discrete parallel decoding).
    backend="ttnn": mesh_device (N300 | T3K | auto; default $MESH_DEVICE) and backend_options
    (precision, profile_overrides, cache_dir, max_images, tt) go to backends/ttnn/oft.TtnnOFTModel.
    fast (torch): the fast path (backends/torch_cuda.FastOFTModel: static buffers, CUDA graphs),
    default on for CUDA and off for the CPU as for OpenVLA ($OPENVLA_TORCH_FAST=1|0 overrides)."""
    start = time.perf_counter()
    if backend not in ("torch", "ttnn"):
        raise BackendError(f"OpenVLA-OFT runs on the torch or ttnn backend (got {backend!r})")
    if backend_options and backend != "ttnn":
        raise BackendError(f"options {sorted(backend_options)} apply to the ttnn backend only")
    d = Path(weights_path)
    kind = checkpoint_kind(d)  # refuses diffusion / FiLM checkpoints
    if kind != "oft" and not force_oft:
        raise ConfigError(f"{d} is a plain OpenVLA checkpoint (no {ACTION_HEAD}/{PROPRIO_PROJECTOR} "
                          "checkpoint): load it with load_policy, or pass force_oft=True")
    config = load_config(d)
    norm_stats, stats_source = load_oft_norm_stats(config)
    config = replace(config, norm_stats=norm_stats)
    llm_dim = int(config.llm.hidden_size)

    head_file = _component_file(d, ACTION_HEAD, step, use_action_head)
    proj_file = _component_file(d, PROPRIO_PROJECTOR, step, use_proprio)
    head = proj = None
    if head_file is not None:
        head = build_action_head(head_file, load_component_state_dict(head_file), llm_dim, action_dim)
    if proj_file is not None:
        proj = build_proprio_projector(proj_file, load_component_state_dict(proj_file), llm_dim, proprio_dim)
    spec = resolve_spec(norm_stats, head_action_dim=None if head is None else head.action_dim,
                        projector_dim=None if proj is None else proj.fc1.in_features,
                        config_field=config_oft_field(d), num_actions_chunk=num_actions_chunk,
                        action_dim=action_dim, proprio_dim=proprio_dim, normalization=normalization,
                        num_images_in_input=num_images_in_input)
    validate_oft_stats(norm_stats, spec, stats_source)
    if default_unnorm_key:
        resolve_unnorm_key(norm_stats, default_unnorm_key)
    if config.raw.get("openvla_ros_tiny_random"):
        log.warning("%s is a TINY RANDOM test checkpoint: its actions are meaningless", d)
    tokenizer = PromptTokenizer(config.weights_dir)
    codec = ActionCodec(norm_stats, vocab_size=config.action_vocab_size, n_bins=config.n_action_bins)
    if backend == "ttnn":
        from .backends.ttnn.oft import TtnnOFTModel

        model = TtnnOFTModel(config, Checkpoint(config.weights_dir), spec, head, proj, codec, mesh_device,
                             **backend_options)
    else:
        model = OFTTorchModel(config, Checkpoint(config.weights_dir), spec, head, proj, codec, device=device,
                              dtype=dtype)
        from .backends.torch_cuda import FastOFTModel, use_fast_path

        if use_fast_path(model.device, fast):  # shares the reference's modules: the weights exist once
            model = FastOFTModel(model)
    pre = Preprocessor(config, center_crop=center_crop, device=getattr(model, "preprocess_device", "cpu"))
    log.info("OpenVLA-OFT %s: chunk %d x %d, proprio %s, %s (constants from %s)", d, spec.num_actions_chunk,
             spec.action_dim, spec.proprio_dim, "L1 head" if head is not None else "discrete fallback",
             spec.source)
    return OFTPolicy(config, spec, model, tokenizer, pre, stats_source, default_unnorm_key=default_unnorm_key,
                     load_time_s=time.perf_counter() - start)
