"""Prompt template + tokenizer (the one implementation every backend uses).

Facts (openvla-spec.md section 4): "In: What action should the robot take to {instr.lower()}?\\nOut:"
tokenized with BOS (id 1) first; then token 29871 ("▁") is appended unless already last
(training saw "Out: " + action tokens). Forgetting 29871 makes every image give the same action.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
SPACE_TOKEN_ID = 29871  # "▁" in the Llama-2 vocabulary
MAX_INSTRUCTION_CHARS = 2000


def build_prompt(instruction: str) -> str:
    return PROMPT_TEMPLATE.format(instruction=instruction.lower())


def clean_instruction(instruction) -> str:
    if not isinstance(instruction, str):
        raise InputError(f"instruction must be a string, got {type(instruction).__name__}")
    text = instruction.strip()
    if not text:
        raise InputError("instruction is empty")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise InputError(f"instruction is {len(text)} characters; at most {MAX_INSTRUCTION_CHARS} are accepted")
    return text


class PromptTokenizer:
    """tokenizer.json from the weights dir (what LlamaTokenizerFast wraps), no hub access."""

    def __init__(self, weights_dir: str | Path):
        from tokenizers import Tokenizer

        d = Path(weights_dir)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"tokenizer.json not found in {d} (the HF openvla-7b repo ships it)")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a plain Exception on bad files
            raise ConfigError(f"{tok_file}: cannot load tokenizer: {e}") from e
        bos = "<s>"
        cfg_file = d / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{cfg_file}: cannot parse JSON: {e}") from e
            b = cfg.get("bos_token", bos)
            bos = b.get("content", bos) if isinstance(b, dict) else (b or bos)
        self.bos_id = self.tokenizer.token_to_id(bos)
        if self.bos_id is None:
            raise ConfigError(f"{tok_file}: BOS token {bos!r} not in the vocabulary")

    def encode_prompt(self, instruction: str) -> np.ndarray:
        """Instruction -> prompt ids: [BOS, prompt..., 29871]."""
        text = build_prompt(clean_instruction(instruction))
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        ids = [self.bos_id] + list(ids)
        if ids[-1] != SPACE_TOKEN_ID:
            ids.append(SPACE_TOKEN_ID)
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
