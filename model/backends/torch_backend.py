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


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """(B, T) key-valid columns -> (B, 1, T, T) boolean mask: causal, real keys only, and a pad
    query attends itself (never a fully masked row, which SDPA may turn into NaN). None when
    every column is valid: the plain causal prefill (what a batch of one runs)."""
    if bool(valid.all()):
        return None
    width = valid.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(width, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye).unsqueeze(1)


def _decode_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """(B, T) key-valid columns, the new token's last -> (B, 1, 1, T) mask; None if all valid."""
    return None if bool(valid.all()) else valid[:, None, None, :]


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

    def generate(self, pixel_values: torch.Tensor, input_ids: np.ndarray, num_tokens: int, draft=None):
        """Greedy action tokens. draft: token ids (see speculative.sanitize_draft) verified in the
        prefill; self.last_accepted says how many were accepted (0 without a draft). The tokens
        are those of plain greedy decoding, with or without a draft. A batch of one through
        generate_batch (no padding, nothing masked: the plain causal prefill and a cropped cache)."""
        tokens, accepted, t = self.generate_batch(pixel_values, [input_ids], num_tokens,
                                                  drafts=None if draft is None else [draft])
        self.last_accepted = int(accepted[0])
        return tokens[0], t

    @torch.inference_mode()
    def generate_batch(self, pixel_values: torch.Tensor, input_ids, num_tokens: int, drafts=None):
        """Greedy action tokens for B items at once: pixel_values (B, 6, S, S), input_ids a list of
        B prompt id arrays (any lengths), drafts None or a list of B drafts (None per item allowed;
        each sanitised with speculative.sanitize_draft, so a bad draft is dropped, never raised).
        Returns (tokens int64[B, num_tokens], accepted int64[B], timings_ms for the whole batch).

        Each row's math is that of its batch of one: sequences [BOS, patches, prompt, drafts] are
        LEFT-padded to the longest; position ids run 0..T_i-1 over each row's own tokens; the mask
        lets a row attend only its own earlier real tokens (a pad row attends only itself, so it
        stays finite and nobody reads it). Drafts are verified per row in the one prefill; the KV
        columns of a row's rejected drafts are masked for that row (columns rejected by every row
        are cropped). Decoding then runs all rows together, row i feeding its last token at its
        own next position; a row whose action is complete (more drafts accepted than others)
        keeps stepping on a dummy token whose output is discarded."""
        m, llm, t = self.modules, self.modules.llm, {}
        dev = self.device
        clock = time.perf_counter
        batch = len(input_ids)
        if pixel_values.shape[0] != batch:
            raise BackendError(f"generate_batch: {pixel_values.shape[0]} images for {batch} prompts")
        if drafts is not None and len(drafts) != batch:
            raise BackendError(f"generate_batch: {len(drafts)} drafts for {batch} prompts")
        t0 = clock()
        px = pixel_values.to(dev, self.dtype, non_blocking=True)
        patches = m.vision(px)
        self._sync(); t1 = clock()
        projected = m.projector(patches)
        self._sync(); t2 = clock()

        # row i: [BOS, 256 patches, prompt tokens after BOS, drafts]; positions 0..T_i-1 (drafts
        # continue the prompt's positions: d_j sits at L_i+j-1)
        embed = llm.get_input_embeddings()
        seqs, lengths, row_drafts = [], [], []
        for i, ids in enumerate(input_ids):
            seq = multimodal_embeddings(llm, projected[i:i + 1], np.asarray(ids))
            lengths.append(seq.shape[1])
            d = sanitize_draft(None if drafts is None else drafts[i], num_tokens, self.config.vocab_size).tokens
            d = None if d is None else torch.as_tensor(d, device=dev)
            if d is not None:
                seq = torch.cat([seq, embed(d.view(1, -1))], dim=1)
            row_drafts.append(d)
            seqs.append(seq)
        n_draft = [0 if d is None else d.numel() for d in row_drafts]
        total = [s.shape[1] for s in seqs]
        width = max(total)
        hidden = seqs[0].shape[-1]
        emb = seqs[0].new_zeros(batch, width, hidden)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=dev)  # key columns row i may attend
        pos = torch.zeros(batch, width, dtype=torch.long, device=dev)
        for i, s in enumerate(seqs):  # left padding: row i's tokens fill the last total[i] columns
            emb[i, width - total[i]:] = s[0]
            valid[i, width - total[i]:] = True
            pos[i, width - total[i]:] = torch.arange(total[i], device=dev)
        rows = 1 + max(n_draft)  # logits kept: the last prompt position and every draft position
        cache = new_cache(llm)
        out = llm(inputs_embeds=emb, position_ids=pos, attention_mask=_prefill_mask(valid), use_cache=True,
                  logits_to_keep=rows, **{self._cache_kw: cache})
        predicted = out.logits.argmax(-1)  # (B, rows): the greedy token after each kept column
        accepted = np.zeros(batch, np.int64)
        tokens: list[list] = []
        for i in range(batch):  # row i's predictions sit in its last 1 + n_draft[i] kept columns
            p = predicted[i, rows - 1 - n_draft[i]:]
            if row_drafts[i] is not None:
                accepted[i] = int(accepted_length(row_drafts[i], p))  # the host reads the count
                valid[i, width - (n_draft[i] - accepted[i]):] = False  # this row's rejected drafts
            tokens.append(list(p[:accepted[i] + 1]))
        # KV columns no row attends any more (the shortest rejected tail) are dropped from the cache
        keep = width - int(min(n_draft[i] - accepted[i] for i in range(batch)))
        if keep < width:
            valid = valid[:, :keep]
            if not crop_cache(cache, keep):  # an API we do not know: recompute the kept columns
                cache = new_cache(llm)
                llm(inputs_embeds=emb[:, :keep], position_ids=pos[:, :keep],
                    attention_mask=_prefill_mask(valid), use_cache=True, logits_to_keep=1,
                    **{self._cache_kw: cache})
        self._sync(); t3 = clock()
        steps = num_tokens - 1 - int(accepted.min())
        last = torch.stack([tk[-1] for tk in tokens]).view(batch, 1)
        done = torch.tensor([len(tk) >= num_tokens for tk in tokens], device=dev)
        # next position of row i: L_i + (tokens it has) - 1; a finished row stays where it was
        nxt = torch.tensor([lengths[i] + len(tokens[i]) - 1 for i in range(batch)], device=dev).view(batch, 1)
        for _ in range(steps):
            valid = torch.cat([valid, torch.ones(batch, 1, dtype=torch.bool, device=dev)], dim=1)
            out = llm(input_ids=last, position_ids=nxt, attention_mask=_decode_mask(valid), use_cache=True,
                      **{self._cache_kw: cache})
            tok = out.logits[:, -1].argmax(-1)
            for i in range(batch):
                if len(tokens[i]) < num_tokens:
                    tokens[i].append(tok[i])
            done = torch.tensor([len(tk) >= num_tokens for tk in tokens], device=dev)
            last = torch.where(done, last.view(-1), tok).view(batch, 1)
            nxt = nxt + (~done).long().view(batch, 1)
        result = torch.stack([torch.stack(tk) for tk in tokens]).cpu().numpy().astype(np.int64)
        t4 = clock()
        t.update(vision=(t1 - t0) * 1e3, projector=(t2 - t1) * 1e3, prefill=(t3 - t2) * 1e3, decode=(t4 - t3) * 1e3)
        return result, accepted, t

    def close(self):
        self.modules = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
