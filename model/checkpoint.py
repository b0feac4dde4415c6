"""Weights in the HF openvla/openvla-7b layout: safetensors (single file, or shards + index).

No hub access, no trust_remote_code. Every failure names the file and/or key at fault.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """Index of the tensors in a weights directory (reads headers only until load())."""

    def __init__(self, weights_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(weights_dir)
        index = self.dir / INDEX_NAME
        single = self.dir / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise CheckpointError(f"no {INDEX_NAME} or {SINGLE_NAME} in {self.dir}")

        self.key_file: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise CheckpointError(f"shard {name} listed in {INDEX_NAME} is missing from {self.dir}")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.key_file[key] = name
                        self.shapes[key] = tuple(sl.get_shape())
                        self.dtypes[key] = sl.get_dtype()
            except Exception as e:  # safetensors raises SafetensorError / OSError on bad files
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.key_file.get(key) != name:
                    raise CheckpointError(f"{INDEX_NAME} maps {key} to {name}, but {name} does not contain it")

    def keys(self) -> list[str]:
        return list(self.key_file)

    def validate(self, expected: dict[str, tuple]) -> None:
        """Raise unless the checkpoint holds exactly the expected keys with the expected shapes."""
        missing = [k for k in expected if k not in self.shapes]
        unknown = [k for k in self.shapes if k not in expected]
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensor(s) missing from {self.dir}: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else ""))
        if unknown:
            raise CheckpointError(
                f"{len(unknown)} unknown tensor(s) in {self.dir} (in {self.key_file[unknown[0]]}): "
                f"{', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
        for k, shape in expected.items():
            if self.shapes[k] != tuple(shape):
                raise CheckpointError(
                    f"{k} in {self.key_file[k]} has shape {list(self.shapes[k])}, expected {list(shape)} "
                    "(config.json does not match the weights)")

    def load(self, keys, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """Yield (key, tensor) for the given keys, converted to dtype, file by file."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.key_file[k], []).append(k)
        for name, file_keys in by_file.items():
            path = self.dir / name
            try:
                with safe_open(str(path), framework="pt", device=str(device)) as f:
                    for k in file_keys:
                        t = f.get_tensor(k)
                        if dtype is not None and t.is_floating_point():
                            t = t.to(dtype)
                        yield k, t
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor data ({e})") from e
