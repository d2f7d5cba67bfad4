"""Distributed checkpoints: per-rank shards, consolidated to the single-process layout, and loaded back
into any layout.

A shard holds the tensors this rank is the canonical writer of (see `Engine.shard_pieces`), each with
where it sits in the full tensor (split dim, piece index, number of pieces). Consolidation
concatenates the pieces: no rank needs to hold the whole model during training, and the result is
the contract's `model.safetensors` (full tensors, our names, router biases included) plus the
optimizer state as full tensors keyed by parameter name (`consolidate` writes it as
`optimizer_by_name.pt`; the trainer converts it to its own `optimizer.pt`, see
dsmtp.train.distributed). Resuming, in the same or another layout, slices those full tensors again,
so a TP=2 x PP=2 checkpoint resumes at EP=2 x DP=2.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_DIR = "shards"
OPTIMIZER_BY_NAME = "optimizer_by_name.pt"


@dataclass
class Piece:
    tensor: torch.Tensor
    dim: int  # dimension the full tensor is split along (ignored when parts == 1)
    index: int
    parts: int


def save_shard(ckpt_dir: Path, rank: int, pieces: dict[str, Piece]) -> None:
    """Write this rank's pieces (model tensors and optimizer state, keyed 'model/<name>' and
    'optim/<name>/<key>') atomically."""
    folder = Path(ckpt_dir) / SHARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.tensor.detach().contiguous().cpu() for k, p in pieces.items()}
    where = {k: [p.dim, p.index, p.parts] for k, p in pieces.items()}
    final = folder / f"rank{rank:05d}.safetensors"
    tmp = final.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"pieces": json.dumps(where)})
    os.replace(tmp, final)


def merge_shards(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """All shards of a checkpoint -> full tensors keyed as in the shards."""
    pieces: dict[str, list[tuple[int, int, int, torch.Tensor]]] = {}
    for path in sorted((Path(ckpt_dir) / SHARD_DIR).glob("rank*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where = json.loads(f.metadata()["pieces"])
            for key in f.keys():
                dim, index, parts = where[key]
                pieces.setdefault(key, []).append((index, dim, parts, f.get_tensor(key)))
    full = {}
    for key, found in pieces.items():
        found.sort(key=lambda x: x[0])
        parts = found[0][2]
        if [x[0] for x in found] != list(range(parts)):
            raise ValueError(f"{ckpt_dir}: pieces of {key} are {[x[0] for x in found]}, expected 0..{parts - 1} "
                             "(a shard is missing: the checkpoint is incomplete)")
        full[key] = found[0][3] if parts == 1 else torch.cat([x[3] for x in found], dim=found[0][1])
    return full


def consolidate(ckpt_dir: Path) -> None:
    """Write model.safetensors (full float32 tensors) and optimizer_by_name.pt (Adam state by parameter
    name), for runs driven by the engine directly rather than by the trainer."""
    ckpt_dir = Path(ckpt_dir)
    full = merge_shards(ckpt_dir)
    model = {k[len("model/"):]: v.float().contiguous() for k, v in full.items() if k.startswith("model/")}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in full.items():
        if k.startswith("optim/"):
            name, key = k[len("optim/"):].rsplit("/", 1)
            state.setdefault(name, {})[key] = v
    tmp = ckpt_dir / "model.safetensors.tmp"
    save_file(model, str(tmp))
    os.replace(tmp, ckpt_dir / "model.safetensors")
    tmp = ckpt_dir / f"{OPTIMIZER_BY_NAME}.tmp"
    torch.save({"state": state}, tmp)
    os.replace(tmp, ckpt_dir / OPTIMIZER_BY_NAME)


def load_consolidated(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    model = load_file(str(ckpt_dir / "model.safetensors"))
    optim_path = ckpt_dir / OPTIMIZER_BY_NAME
    state = torch.load(optim_path, weights_only=True)["state"] if optim_path.exists() else {}
    return model, state
