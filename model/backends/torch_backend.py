"""PyTorch reference backend (CPU or CUDA): timm towers, projector, transformers Llama,
greedy decoding with a KV cache. This is the path every other backend is checked against."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..config import OpenVLAConfig
from ..errors import BackendError, CheckpointError
from ..modeling import COMPONENT_PREFIXES, OpenVLAModules, checkpoint_to_module_key, multimodal_embeddings
from ..speculative import accepted_length, sanitize_draft

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # not a device string at all, e.g. "tpu"
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise BackendError(f"unsupported torch device {device!r}; valid devices: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise BackendError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_modules(config: OpenVLAConfig, checkpoint: Checkpoint, device: torch.device,
                 dtype: torch.dtype) -> OpenVLAModules:
    """Build the modules without allocating (meta device), validate the checkpoint against
    them, then assign the checkpoint tensors (converted to dtype, on device)."""
    with torch.device("meta"):
        modules = OpenVLAModules(config)
    checkpoint.validate(modules.expected_checkpoint_shapes())
    states: dict[str, dict] = {c: {} for c in COMPONENT_PREFIXES}
    for key, tensor in checkpoint.load(checkpoint.keys(), dtype=dtype, device=device):
        comp, local = checkpoint_to_module_key(key)
        states[comp][local] = tensor
    for comp, sd in states.items():
        modules.component(comp).load_state_dict(sd, strict=True, assign=True)
    # Non-persistent buffers (RoPE inverse frequencies) are not in checkpoints: rebuild them.
    with torch.device(device):
        modules.llm.model.rotary_emb = type(modules.llm.model.rotary_emb)(config.llm)
    for name, t in list(modules.named_parameters()) + list(modules.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"internal: {name} was not initialised from the checkpoint")
    modules.eval().requires_grad_(False)
    return modules


def cache_kwarg(llm) -> str:
    """transformers >= 5.2x names the KV-cache argument `cache`; earlier versions `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def new_cache(llm):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=llm.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


def crop_cache(cache, length: int) -> bool:
    """Keep the first `length` positions of a transformers DynamicCache (drops the KV rows of
    rejected drafts). Returns False if that did not work out (the caller recomputes).

    crop()'s argument changed meaning across versions: 4.x takes the length to keep (a negative
    value: how many to remove; crop(0) empties the cache), 5.x only how many to remove, as a
    negative number (a positive value raises). A negative count means "remove" in both."""
    remove = cache.get_seq_length() - int(length)
    if remove == 0:
        return True
    crop = getattr(cache, "crop", None)
    if crop is None or remove < 0:
        return False
    try:
        crop(-remove)
    except Exception:  # an API we do not know: recompute instead
        return False
    return cache.get_seq_length() == int(length)


class TorchBackend:
    name = "torch"
    supports_draft = True  # generate(..., draft=) verifies drafts in the prefill

    def __init__(self, config: OpenVLAConfig, checkpoint: Checkpoint, device=None, dtype=None):
        self.config = config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.modules = load_modules(config, checkpoint, self.device, self.dtype)
        self._cache_kw = cache_kwarg(self.modules.llm)
        self.last_accepted = 0  # drafts accepted by the last generate()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: np.ndarray, num_tokens: int, draft=None):
        """Greedy action tokens. draft: token ids (see speculative.sanitize_draft) verified in the
        prefill; self.last_accepted says how many were accepted (0 without a draft). The tokens
        are those of plain greedy decoding, with or without a draft."""
        m, llm, t = self.modules, self.modules.llm, {}
        clock = time.perf_counter
        t0 = clock()
        px = pixel_values.to(self.device, self.dtype, non_blocking=True)
        patches = m.vision(px)
        self._sync(); t1 = clock()
        projected = m.projector(patches)
        self._sync(); t2 = clock()

        # [BOS, 256 patches, prompt tokens after BOS, drafts]; positions 0..L+m-1 over the whole
        # sequence (the drafts continue the prompt's positions: d_j sits at L+j-1)
        seq = multimodal_embeddings(llm, projected, np.asarray(input_ids))
        length = seq.shape[1]
        drafts = sanitize_draft(draft, num_tokens, self.config.vocab_size).tokens
        if drafts is not None:
            drafts = torch.as_tensor(drafts, device=self.device)
            seq = torch.cat([seq, llm.get_input_embeddings()(drafts.view(1, -1))], dim=1)
        rows = 1 if drafts is None else 1 + drafts.numel()
        cache = new_cache(llm)
        out = llm(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1], device=self.device).view(1, -1),
                  use_cache=True, logits_to_keep=rows, **{self._cache_kw: cache})
        predicted = out.logits[0].argmax(-1)  # (rows,): the greedy token after each kept row
        accepted = 0
        if drafts is not None:
            accepted = int(accepted_length(drafts, predicted))  # the host reads the accepted count
            keep = length + accepted
            if not crop_cache(cache, keep):  # drop the KV rows of the rejected drafts, or recompute
                cache = new_cache(llm)
                llm(inputs_embeds=seq[:, :keep], position_ids=torch.arange(keep, device=self.device).view(1, -1),
                    use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        tokens = list(predicted[:accepted + 1].view(-1, 1))
        tok = tokens[-1]
        self._sync(); t3 = clock()
        for i in range(accepted + 1, num_tokens):  # token i: feed token i-1 at position L+i-1
            out = llm(input_ids=tok.view(1, 1), position_ids=torch.tensor([[length + i - 1]], device=self.device),
                      use_cache=True, **{self._cache_kw: cache})
            tok = out.logits[:, -1].argmax(-1)
            tokens.append(tok)
        result = torch.cat(tokens).cpu().numpy().astype(np.int64)
        t4 = clock()
        self.last_accepted = accepted
        t.update(vision=(t1 - t0) * 1e3, projector=(t2 - t1) * 1e3, prefill=(t3 - t2) * 1e3, decode=(t4 - t3) * 1e3)
        return result, t

    def close(self):
        self.modules = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
