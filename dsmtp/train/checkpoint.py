"""Checkpoints: one directory per step, written atomically, verified on load.

    <out_dir>/checkpoints/step_00000200/
        model.safetensors    our parameter names, full float32 tensors, router expert_bias included
        config.yaml          the full Config
        tokenizer.model      copy of the sentencepiece model the run trained with (or tokenizer.json and its
                             tokenizer_config.json, for a HuggingFace tokenizer)
        optimizer.pt         optimizer state_dict
        trainer_state.pt     step, tokens, data-loader position, RNG states, skip counters
        manifest.json        {files: {name: sha256}, step, tokens, tokenizer_sha256, config_sha256}
    <out_dir>/checkpoints/latest   names the newest complete step directory; written last

A step directory is filled under a temporary name and renamed into place only when every file and
the manifest are on disk, and `latest` moves only after that rename: a crash at any point leaves the
previous checkpoint as `latest`, intact. The LR, lambda and gamma schedules are pure functions of
step and tokens, so their state is those two counters.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from dsmtp.config import Config, ConfigError, config_from_dict, config_to_dict
from dsmtp.data.tokenizer import tokenizer_files

if TYPE_CHECKING:  # imported where used: the converters read checkpoints without building a model
    from dsmtp.model import DeepSeekV3

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory or file and what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# RNG states, in a form torch.load(weights_only=True) accepts


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Saving


def _model_tensors(model: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's tensors, or an already consolidated {name: full tensor} (distributed runs)."""
    tensors = model if isinstance(model, dict) else model.state_dict()
    return {name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}


def save_checkpoint(out_dir: Path, step: int, tokens: int, model: torch.nn.Module | dict[str, torch.Tensor], cfg: Config,
                    tokenizer_path: Path, optimizer_state: dict, trainer_state: dict, keep_last: int) -> Path:
    """Write `<out_dir>/checkpoints/step_<step>` atomically, point `latest` at it, prune old ones."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    writers: dict[str, Callable[[Path], Any]] = {
        "model.safetensors": lambda p: save_file(_model_tensors(model), str(p)),
        "config.yaml": lambda p: p.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)),
        **{path.name: lambda p, src=path: shutil.copyfile(src, p) for path in tokenizer_files(tokenizer_path)},
        "optimizer.pt": lambda p: torch.save(optimizer_state, p),
        "trainer_state.pt": lambda p: torch.save(trainer_state, p),
    }
    files = {}
    for filename, write in writers.items():
        write_file(tmp / filename, write)
        files[filename] = sha256_file(tmp / filename)
    manifest = {"files": files, "step": step, "tokens": tokens,
                "tokenizer_sha256": files[Path(tokenizer_path).name], "config_sha256": files["config.yaml"]}
    write_file(tmp / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    _fsync(tmp)

    final = root / name
    if final.exists():  # a complete dir from a run that crashed before moving `latest` to it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_text_atomic(root / LATEST, name + "\n")
    _prune(root, keep_last, keep=name)
    return final


def write_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Write one checkpoint file and flush it to disk (a seam tests use to simulate a crash)."""
    write(path)
    _fsync(path)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p.name for p in root.iterdir() if STEP_DIR.match(p.name))
    for name in steps[:-keep_last]:
        if name != keep:
            shutil.rmtree(root / name)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete half-written step directories left by a crash during a save."""
    root = Path(out_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


# ----------------------------------------------------------------------------------------------
# Finding, verifying, loading


def read_latest(checkpoints: Path) -> Optional[str]:
    """What the `latest` file of a checkpoints directory names (a directory relative to it), or None when
    there is no such file. Unchecked: callers decide what a usable target is."""
    pointer = Path(checkpoints) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The step directory `latest` names, or None when the run has no checkpoint yet."""
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    name = read_latest(pointer.parent)
    if name is None:
        return None
    path = pointer.parent / name
    if not STEP_DIR.match(name) or not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory next to it; "
                              f"write the name of an existing step_XXXXXXXX directory into it, or delete it")
    return path


def resolve(path: Path) -> Path:
    """A step directory, a checkpoints/ directory or a run's out_dir -> the step directory to load."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    for root in (path, path.parent):
        found = latest_checkpoint(root) if (root / CHECKPOINTS).is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint at {path}: expected a step directory with {MANIFEST}, or a run "
                          f"directory with {CHECKPOINTS}/{LATEST}")


def verify(ckpt: Path) -> dict:
    """Check that every file the manifest lists is present with its recorded sha256; return the manifest."""
    fix = (f"the checkpoint {ckpt} is damaged (an interrupted copy or a disk problem): delete it and write "
           f"the previous step_XXXXXXXX name into {ckpt.parent / LATEST}, or start a new train.out_dir")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {ckpt / MANIFEST} ({e}); {fix}") from None
    for filename, expected in files.items():
        path = ckpt / filename
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; {fix}")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path} does not match the sha256 in {MANIFEST} (truncated or modified); {fix}")
    return manifest


def checkpoint_config(ckpt: Path) -> Config:
    try:
        return config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / 'config.yaml'} is not a valid config: {e}") from None


def check_compatible(ckpt: Path, manifest: dict, cfg: Config, tokenizer_sha256: str) -> None:
    """Refuse to resume from a checkpoint of a different model or tokenizer."""
    saved = config_to_dict(checkpoint_config(ckpt).model)
    wanted = config_to_dict(cfg.model)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs run {wanted.get(k)!r}"
             for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt} was trained with a different model config ("
                              + "; ".join(diffs) + "): use the same model settings, or a new train.out_dir")
    if manifest.get("tokenizer_sha256") != tokenizer_sha256:
        raise CheckpointError(f"checkpoint {ckpt} was trained with a different tokenizer (sha256 "
                              f"{manifest.get('tokenizer_sha256')} vs this run's {tokenizer_sha256}): point "
                              "data.data_dir at the data it was trained on, or use a new train.out_dir")


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    device = next(model.parameters()).device
    result = model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
    # megatron-core's linears add an empty `_extra_state` entry while loading: not a tensor of ours
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / 'model.safetensors'} does not fit the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")


def load_training_state(ckpt: Path) -> tuple[dict, dict]:
    """(optimizer state_dict, trainer state) of a verified checkpoint."""
    optimizer_state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
    trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    return optimizer_state, trainer_state


def load_model(path: Path | str, device: Optional[torch.device] = None) -> tuple[DeepSeekV3, Config]:
    """Load a verified checkpoint for inference or conversion: a step directory, or a run's out_dir
    (its `latest` checkpoint). Returns the model in eval mode and the run's Config."""
    from dsmtp.model import DeepSeekV3
    from dsmtp.parallel.topology import ensure_initialized

    ckpt = resolve(Path(path))
    verify(ckpt)
    cfg = checkpoint_config(ckpt)
    ensure_initialized()
    model = DeepSeekV3(cfg.model)
    if device is not None:
        model.to(device)
    load_weights(model, ckpt)
    return model.eval(), cfg
