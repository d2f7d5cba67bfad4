"""Experiment trackers beside metrics.jsonl: TensorBoard and Weights & Biases (`train.trackers`).

The trainer's one `write` call hands every record it appends to metrics.jsonl to each tracker too, on
the logging rank only, so a dashboard shows exactly what the file holds. A record is a dict of Python
numbers already read from the device, so a tracker never makes the host wait for the GPU.

Tags are `{kind}/{field}` (`train/loss`, `eval/loss`, `train/grad_norm`, ...), a per-depth list as
`{kind}/{field}_depth{k}` (`train/mtp_loss_depth1`), a per-source mapping as `{kind}/{field}/{source}`; the x
axis is the record's optimizer step.

TensorBoard writes `out_dir/tensorboard` (`tensorboard --logdir runs` compares runs); the run's config
is its hparams and a text summary. A resumed run makes TensorBoard drop the events an interrupted run
wrote past the checkpoint (`purge_step`), as metrics.jsonl drops those records. W&B starts one run per
`dsmtp train` under `out_dir/wandb` with the config attached; it reads its usual environment
(`WANDB_MODE=offline` writes locally without network, `wandb sync` uploads later; `WANDB_PROJECT`,
default "dsmtp"; `WANDB_ENTITY`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from typing import Iterator

import yaml

from dsmtp.config import Config, ConfigError, config_to_dict

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the module it needs
EXTRA = "tracking"  # pyproject's optional dependencies that bring them


def require_packages(names: list[str]) -> None:
    """Refuse, before any work, a tracker whose package cannot be imported."""
    for name in names:
        if name not in PACKAGES:
            continue
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError as e:
            raise ConfigError(f"train.trackers lists {name}, but its package cannot be imported ({e}): "
                              f"pip install 'dsmtp[{EXTRA}]' (or pip install {PACKAGES[name]}), or take {name} "
                              "out of train.trackers") from None


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers as tracker tags (its kind prefixes them, its step is the x axis)."""
    kind, tags = record["kind"], {}
    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        if isinstance(value, list):
            tags.update({f"{kind}/{key}_depth{k}": v for k, v in enumerate(value, start=1)})
        elif isinstance(value, dict):  # e.g. source_tokens: one tag per source
            tags.update({f"{kind}/{key}/{name}": v for name, v in value.items()})
        else:
            tags[f"{kind}/{key}"] = value
    return tags


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"model.hidden_size": 1024, ...}; lists as JSON text (hparams take scalars)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


class TensorBoardWriter:
    def __init__(self, out_dir: Path, cfg: Config, first_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=first_step)
        config = config_to_dict(cfg)
        # The hparams dashboard lists runs by config, with these metrics as columns.
        for summary in hparams(flat_config(config), {"eval/loss": None, "train/loss": None}):
            self.writer.file_writer.add_summary(summary, first_step)
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), first_step)

    def append(self, record: dict) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        # One event holding every value rather than an add_scalar event per tag: far less host time a record.
        values = [Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars(record).items()]
        self.writer.file_writer.add_summary(Summary(value=values), record["step"])

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbWriter:
    def __init__(self, out_dir: Path, cfg: Config, first_step: int):
        import wandb

        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dsmtp"), name=out_dir.resolve().name,
                                  dir=str(out_dir), config=config_to_dict(cfg))
        except wandb.errors.UsageError as e:
            raise ConfigError(f"train.trackers lists wandb, but W&B could not start a run ({e}): run `wandb login`, "
                              f"or set WANDB_MODE=offline to write the run under {out_dir / 'wandb'} and upload it "
                              "later with `wandb sync`") from None

    def append(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


WRITERS = {"tensorboard": TensorBoardWriter, "wandb": WandbWriter}


@contextlib.contextmanager
def opened(cfg: Config, out_dir: Path, first_step: int) -> Iterator[list]:
    """The writers of cfg.train.trackers beyond metrics.jsonl, open for one run; `first_step` is the
    step of the first record the run writes. On exit they close (a W&B run that raised is marked
    failed) and the list empties, so a record written afterwards reaches metrics.jsonl only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writers: list = []
    failed = True
    try:
        for name in cfg.train.trackers:
            if name in WRITERS:
                writers.append(WRITERS[name](out_dir, cfg, first_step))
        yield writers
        failed = False
    finally:
        for writer in writers:
            writer.close(failed)
        writers.clear()
