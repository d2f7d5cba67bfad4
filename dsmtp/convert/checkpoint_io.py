"""Reading and writing checkpoints tensor by tensor.

Converters read through `TensorSource` (names, shapes, one tensor or one expert row at a time), so a
reader of another layout plugs in without touching them: the consolidated dsmtp checkpoint and HF
safetensors directories are both `SafetensorsSource`s; a sharded (TP/PP/EP/ZeRO) reader only has to
implement `shapes()` and `read()` returning full (consolidated) tensors in our names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Protocol

import torch
import yaml

from dsmtp.config import Config, config_to_dict, load_config
from dsmtp.convert.safetensors_stream import DTYPE_CODES
from dsmtp.train.checkpoint import CHECKPOINTS, LATEST, read_latest, sha256_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
DTYPE_FROM_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


class TensorSource(Protocol):
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name with its full (unsharded) shape."""

    def read(self, name: str, row: Optional[int] = None) -> torch.Tensor:
        """The whole tensor, or only its `row`-th slice along dim 0 (one expert of a stacked tensor)."""


class SafetensorsSource:
    """Tensors of one or more safetensors files, read one at a time with plain file reads.

    Not memory-mapped on purpose: pages of a mapping stay in the process's resident set once touched,
    so a streaming conversion would grow to the size of its input; reads keep it near one tensor.
    """

    def __init__(self, files: list[Path]):
        self._entries: dict[str, tuple[Path, dict, int]] = {}  # name -> (file, header entry, data start)
        for path in files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self._entries[name] = (Path(path), entry, 8 + size)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry["shape"]) for name, (_, entry, _) in self._entries.items()}

    def dtype(self, name: str) -> torch.dtype:
        return DTYPE_FROM_CODE[self._entries[name][1]["dtype"]]

    def read(self, name: str, row: Optional[int] = None) -> torch.Tensor:
        path, entry, data_start = self._entries[name]
        shape, dtype = entry["shape"], DTYPE_FROM_CODE[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if row is not None:
            if not 0 <= row < shape[0]:
                raise IndexError(f"{name}: row {row} out of range for shape {shape}")
            row_bytes = (end - begin) // shape[0]
            begin, end, shape = begin + row * row_bytes, begin + (row + 1) * row_bytes, shape[1:]
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"{path}: truncated data for tensor {name}")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).view(shape)


def resolve_checkpoint_dir(path: Path) -> Path:
    """A step directory, or a run's out_dir / checkpoints dir whose `latest` file names the newest step."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINTS):
        if (candidate / MODEL_FILE).is_file():
            return candidate
        name = read_latest(candidate)
        if name is not None:
            step_dir = candidate / name
            if (step_dir / MODEL_FILE).is_file():
                return step_dir
            raise FileNotFoundError(f"{candidate / LATEST} names {step_dir}, which has no {MODEL_FILE}")
    raise FileNotFoundError(f"{path}: not a dsmtp checkpoint (expected {MODEL_FILE} and {CONFIG_FILE} in it, or a "
                            "checkpoints/latest file naming one)")


def open_checkpoint(path: Path) -> tuple[Config, TensorSource, Path]:
    """(config, tensors, step directory) of a consolidated dsmtp checkpoint.

    This is the one place that knows the checkpoint layout; a reader of sharded (TP/PP/EP/ZeRO)
    checkpoints returns its own TensorSource here.
    """
    ckpt = resolve_checkpoint_dir(path)
    if not (ckpt / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{ckpt}: missing {CONFIG_FILE} (the run's config, written with the checkpoint)")
    return load_config(ckpt / CONFIG_FILE), SafetensorsSource([ckpt / MODEL_FILE]), ckpt


def write_checkpoint_metadata(ckpt: Path, cfg: Config, tokenizer: Optional[Path]) -> None:
    """config.yaml, tokenizer.model and manifest.json next to an already written model.safetensors."""
    (ckpt / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, ckpt / TOKENIZER_FILE)
    files = [MODEL_FILE, CONFIG_FILE] + ([TOKENIZER_FILE] if tokenizer is not None else [])
    hashes = {name: sha256_file(ckpt / name) for name in files}
    manifest = {"files": hashes, "step": 0, "tokens": 0,
                "tokenizer_sha256": hashes.get(TOKENIZER_FILE), "config_sha256": hashes[CONFIG_FILE]}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
