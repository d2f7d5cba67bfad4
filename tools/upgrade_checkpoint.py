#!/usr/bin/env python
"""Convert consolidated checkpoints (dsmtp before sharded checkpoints: model.safetensors, optimizer.pt) to
the sharded layout of dsmtp.checkpoint, keeping weights, optimizer state and training position.

    python tools/upgrade_checkpoint.py runs/tiny            # every step directory of a run
    python tools/upgrade_checkpoint.py path/to/checkpoint   # one checkpoint (a step directory, an import-hf output)

Each legacy checkpoint is verified against its manifest, converted into a temporary directory next to
it, then swapped in: the original is kept as `<name>.consolidated` (delete it once the upgraded one
works). model.safetensors is read one tensor at a time; optimizer.pt, a torch.save of the single-process
AdamW state (read with weights_only), is read whole: the old layout allows nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsmtp.checkpoint import (CHECKPOINTS, CONFIG, LEGACY_MODEL_FILE, MANIFEST, MODEL, OPTIM, STEP_DIR,  # noqa: E402
                              TEMPORARY, TOKENIZER, TRAINER_STATE, CheckpointError, CheckpointWriter, sha256_file)
from dsmtp.config import load_config  # noqa: E402
from dsmtp.convert.checkpoint_io import SafetensorsSource  # noqa: E402
from dsmtp.model import DeepSeekV3  # noqa: E402
from dsmtp.train.optim import parameter_groups  # noqa: E402

OPTIMIZER_FILE = "optimizer.pt"


def parameter_order(cfg) -> list[str]:
    """The single-process optimizer's parameters in state_dict order (it indexes them by position).
    Built on the meta device: no memory, no init."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in parameter_groups(model, 0.0) for p in group["params"]]


def optimizer_tensors(path: Path, cfg) -> dict[str, torch.Tensor]:
    """optim/<name>/<key> and optim/step from a single-process AdamW state_dict."""
    state = torch.load(path, weights_only=True, map_location="cpu")["state"]
    names = parameter_order(cfg)
    out, steps = {}, set()
    for i, values in state.items():
        for key, value in values.items():
            if value.dim() == 0:
                steps.add(float(value))
                out[OPTIM + key] = value
            else:
                out[f"{OPTIM}{names[int(i)]}/{key}"] = value
    if len(steps) > 1:
        raise CheckpointError(f"{path}: parameters at different step counts {sorted(steps)}")
    return out


def upgrade(ckpt: Path) -> Path:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    if LEGACY_MODEL_FILE not in manifest.get("files", {}):
        print(f"{ckpt}: not a consolidated checkpoint, left as it is")
        return ckpt
    for name, expected in manifest["files"].items():
        if sha256_file(ckpt / name) != expected:
            raise CheckpointError(f"{ckpt / name} does not match the sha256 in {ckpt / MANIFEST}: not upgrading a "
                                  "damaged checkpoint")
    cfg = load_config(ckpt / CONFIG)
    model = SafetensorsSource([ckpt / LEGACY_MODEL_FILE])
    optim = optimizer_tensors(ckpt / OPTIMIZER_FILE, cfg) if (ckpt / OPTIMIZER_FILE).is_file() else {}
    tensors = {MODEL + n: (model.dtype(n), shape) for n, shape in model.shapes().items()}
    tensors.update({n: (t.dtype, tuple(t.shape)) for n, t in optim.items()})

    tmp = ckpt.with_name(f"{TEMPORARY}upgrade-{ckpt.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = CheckpointWriter(tmp, tensors)
    for name in model.shapes():
        writer.write(MODEL + name, model.read(name))
    for name, tensor in optim.items():
        writer.write(name, tensor)
    trainer_state = ckpt / TRAINER_STATE
    writer.finish(cfg, ckpt / TOKENIZER if (ckpt / TOKENIZER).is_file() else None, manifest.get("step", 0),
                  manifest.get("tokens", 0),
                  torch.load(trainer_state, weights_only=True) if trainer_state.is_file() else None)
    kept = ckpt.with_name(f"{ckpt.name}.consolidated")
    os.replace(ckpt, kept)
    os.replace(tmp, ckpt)
    print(f"{ckpt}: upgraded (the consolidated original is kept as {kept}; delete it once the upgraded one works)")
    return ckpt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run's out_dir, its checkpoints/ directory, or one checkpoint")
    args = parser.parse_args()
    root = next((p for p in (args.path / CHECKPOINTS, args.path) if p.is_dir() and any(
        STEP_DIR.match(c.name) for c in p.iterdir())), None)
    targets = sorted(c for c in root.iterdir() if STEP_DIR.match(c.name)) if root else [args.path]
    try:
        for ckpt in targets:
            upgrade(ckpt)
    except (OSError, ValueError) as e:
        print(f"upgrade_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
