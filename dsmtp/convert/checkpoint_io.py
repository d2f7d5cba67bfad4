"""Reading and writing checkpoints tensor by tensor.

Converters read through `TensorSource` (names, shapes, one tensor or one expert row at a time), so a
reader of another layout plugs in without touching them: the consolidated dsmtp checkpoint and HF
safetensors directories are both `SafetensorsSource`s; a sharded (TP/PP/EP/ZeRO) reader only has to
implement `shapes()` and `read()` returning full (consolidated) tensors in our names.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional, Protocol

import torch
import yaml
from safetensors import safe_open

from dsmtp.config import Config, config_to_dict, load_config

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"


class TensorSource(Protocol):
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name with its full (unsharded) shape."""

    def read(self, name: str, row: Optional[int] = None) -> torch.Tensor:
        """The whole tensor, or only its `row`-th slice along dim 0 (one expert of a stacked tensor)."""


class SafetensorsSource:
    """Tensors of one or more safetensors files, read lazily (memory-mapped, one tensor at a time)."""

    def __init__(self, files: list[Path]):
        self._files = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where: dict[str, int] = {}
        for i, f in enumerate(self._files):
            for name in f.keys():
                self._where[name] = i

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self._files[i].get_slice(n).get_shape()) for n, i in self._where.items()}

    def read(self, name: str, row: Optional[int] = None) -> torch.Tensor:
        f = self._files[self._where[name]]
        return f.get_tensor(name) if row is None else f.get_slice(name)[row]


def resolve_checkpoint_dir(path: Path) -> Path:
    """A step directory, or a run's out_dir / checkpoints dir whose `latest` file names the newest step."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / MODEL_FILE).is_file():
            return candidate
        latest = candidate / "latest"
        if latest.is_file():
            step_dir = candidate / latest.read_text().strip()
            if (step_dir / MODEL_FILE).is_file():
                return step_dir
            raise FileNotFoundError(f"{latest} names {step_dir}, which has no {MODEL_FILE}")
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint_metadata(ckpt: Path, cfg: Config, tokenizer: Optional[Path]) -> None:
    """config.yaml, tokenizer.model and manifest.json next to an already written model.safetensors."""
    (ckpt / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, ckpt / TOKENIZER_FILE)
    files = [MODEL_FILE, CONFIG_FILE] + ([TOKENIZER_FILE] if tokenizer is not None else [])
    hashes = {name: _sha256(ckpt / name) for name in files}
    manifest = {"files": hashes, "step": 0, "tokens": 0,
                "tokenizer_sha256": hashes.get(TOKENIZER_FILE), "config_sha256": hashes[CONFIG_FILE]}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
