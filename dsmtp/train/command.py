"""`dsmtp train --config CONFIG [--set key=value ...] [--resume]`: pretraining with MTP, in one process
(dsmtp.train.trainer) or under torchrun, each rank training its part of the model (dsmtp.train.distributed)."""

from __future__ import annotations

import argparse
import os
import sys

from dsmtp import checkpoint
from dsmtp.config import ConfigError, load_config
from dsmtp.data.errors import DataError
from dsmtp.parallel import topology
from dsmtp.train.distributed import DistributedTrainer
from dsmtp.train.trainer import Trainer, TrainingStopped


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsmtp train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint in train.out_dir to continue from (without this flag a "
                             "checkpoint there is still picked up)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        trainer_class = Trainer
        if "WORLD_SIZE" in os.environ:  # started by torchrun: this rank's part of the model, every layout
            topology.init_distributed(cfg)
            trainer_class = DistributedTrainer
        trainer = trainer_class(cfg, resume="require" if args.resume else "auto")
        if trainer.resumed_from is not None and trainer.is_writer:
            print(f"resuming from {trainer.resumed_from} (step {trainer.step}, {trainer.tokens:,} tokens)")
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        trainer.run()
    except (ConfigError, DataError, checkpoint.CheckpointError, TrainingStopped) as e:
        print(f"dsmtp train: {e}", file=sys.stderr)
        return 1
    if trainer.is_writer:
        print(trainer.finish())
    return 0
