"""One rank of a distributed equivalence run (started by torchrun from the tests):
K optimizer steps of `common.tiny_config` in the given layout, then a (sharded) checkpoint.

    torchrun --nproc-per-node 2 tests/distributed/worker.py --tp 2 --out DIR [--resume CKPT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dsmtp import checkpoint  # noqa: E402
from dsmtp.model import update_expert_bias  # noqa: E402
from dsmtp.parallel import collectives  # noqa: E402
from dsmtp.parallel.rank import build_engine, build_model  # noqa: E402
from dsmtp.parallel.sequence import sequence_parallel  # noqa: E402
from dsmtp.parallel.topology import init_distributed, shutdown  # noqa: E402
from dsmtp.train.trainer import apply_train_settings  # noqa: E402
from tests.distributed import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("tp", "pp", "ep"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--sp", type=int, default=0, help="1: sequence parallelism (with --tp > 1)")
    parser.add_argument("--engine", choices=["native", "deepspeed"], default="native")
    parser.add_argument("--mtp-kind", choices=["sequential", "parallel"], default="sequential")
    parser.add_argument("--heads-one-at-a-time", type=int, default=0)
    parser.add_argument("--state-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=common.STEPS)
    parser.add_argument("--first-step", type=int, default=0)
    parser.add_argument("--resume", help="checkpoint dir to start from (any layout)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = common.tiny_config(args.tp, args.pp, args.ep, args.zero, bool(args.sp), args.mtp_kind,
                             bool(args.heads_one_at_a_time), args.state_dtype, args.engine)
    layout = init_distributed(cfg)
    model, layers = build_model(cfg, layout, common.SEED)
    apply_train_settings(model, cfg.train)
    engine = build_engine(cfg, layout, model, layers, lambda named: common.make_optimizer(named, cfg))
    if args.resume:
        checkpoint.verify(Path(args.resume))
        checkpoint.load_sharded(Path(args.resume), engine.state_to_load)
    history, times = [], []
    for step in range(args.first_step, args.first_step + args.steps):
        start = time.perf_counter()
        micro = common.dp_slice(common.global_batches(cfg, step), layout.dp_rank, layout.dp)
        # The trainer's step (dsmtp.train.distributed.DistributedTrainer.optimizer_step) at a constant lr.
        outputs = engine.forward_backward(micro, mtp_weight=0.3)
        stats = common.loss_stats(outputs, cfg, layout, engine.device)
        grad_norm, applied = engine.apply_gradients(cfg.train.lr, cfg.train.grad_clip, finite_loss=True)
        collectives.reduce_expert_loads(model)
        update_expert_bias(model, common.GAMMA if applied else 0.0)
        times.append(time.perf_counter() - start)
        history.append({"main_loss": stats["main_loss"], "mtp_losses": stats["mtp_losses"], "grad_norm": grad_norm})
    out = Path(args.out)
    checkpoint.save_sharded(out / "ckpt", engine.state_to_save(), cfg, step=args.first_step + args.steps)
    if layout.rank == 0:
        (out / "result.json").write_text(json.dumps({"history": history, "step_seconds": times,
                                                     "layout": layout.describe(),
                                                     "sequence_parallel": sequence_parallel()}))
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
