#!/usr/bin/env python
"""Peak resident memory per rank of a distributed checkpoint save and of a resume in another layout
(CPU, gloo, 4 processes under torchrun), and the scale of a checkpoint of a large config.

    python tools/measure_checkpoint_memory.py --out notes/checkpoint/after           # the code on PYTHONPATH
    PYTHONPATH=/tmp/old-wt python tools/measure_checkpoint_memory.py --out notes/checkpoint/before
    python tools/measure_checkpoint_memory.py --table notes/checkpoint/before notes/checkpoint/after
    python tools/measure_checkpoint_memory.py --estimate configs/deepseek_v3_671b.yaml --ranks 256 --pp 16 --ep 16

A MoE model of about 40M parameters (~0.5 GB of fp32 weights and Adam moments) trains one step with
4 processes in the save layout (DeepSpeed ZeRO-1, EP=2 x DP=4) and saves a checkpoint; a second torchrun
resumes it in the native engine at TP=2 x PP=2 (the checkpoint lives in a temporary directory). Each rank
resets its peak RSS (Linux VmHWM) right before the save and right before the load, and writes a JSON
record to --out: RSS before, peak during, seconds, the bytes of model and optimizer tensors it holds, and
the size of the shard file it wrote (sharded code). The table is made from those files. The script
drives only the trainer's public methods (train_step, save, and the resume its constructor does), so it
runs unchanged against the code before sharded checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SAVE_LAYOUT = {"parallel.ep": 2, "parallel.zero_stage": 1, "parallel.engine": "deepspeed"}
RESUME_LAYOUT = {"parallel.tp": 2, "parallel.pp": 2, "parallel.zero_stage": 1, "parallel.engine": "native"}
MODEL = {"vocab_size": 8192, "hidden_size": 512, "num_layers": 4, "num_heads": 8, "first_k_dense_replace": 1,
         "intermediate_size": 1536, "moe_intermediate_size": 512, "n_routed_experts": 8, "n_shared_experts": 1,
         "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "q_lora_rank": 128, "kv_lora_rank": 128,
         "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "max_position_embeddings": 128,
         "mtp_depth": 1}
TRAIN = {"seq_len": 32, "micro_batch_size": 4, "grad_accum": 1, "steps": 1, "warmup_steps": 0, "keep_last": 1,
         "log_interval": 1, "eval_interval": 1000, "save_interval": 1000}


# ----------------------------------------------------------------------------------------------
# One rank (under torchrun)


def status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return status("VmRSS")


def held_bytes(trainer) -> int:
    """Bytes of the model's and the optimizer's tensors on this rank (ZeRO's fp32 masters included)."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # DeepSpeed wraps the torch optimizer
    tensors = list(trainer.model.state_dict().values())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors += list(getattr(trainer.optimizer, "single_partition_of_fp32_groups", []))
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(phase: str, out: Path, work: Path) -> None:
    from dsmtp.config import load_config
    from dsmtp.parallel import topology
    from dsmtp.train.distributed import DistributedTrainer
    from dsmtp.train.trainer import Data

    layout = SAVE_LAYOUT if phase == "save" else RESUME_LAYOUT
    sets = {**{f"model.{k}": v for k, v in MODEL.items()}, **{f"train.{k}": v for k, v in TRAIN.items()},
            "train.out_dir": str(work / "run"), **layout}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    lay = topology.init_distributed(cfg)
    torch.set_num_threads(1)

    class RandomBatches:
        position = 0

        def __next__(self):
            g = torch.Generator().manual_seed(self.position * 1000 + lay.dp_rank)
            self.position += 1
            return torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size // lay.dp,
                                                           cfg.train.seq_len + cfg.model.mtp_depth + 1), generator=g)

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, state):
            self.position = state["position"]

    record = {"rank": lay.rank, "phase": phase, "layout": lay.describe()}

    class Measured(DistributedTrainer):
        def load(self, ckpt):
            record["rss_before"] = reset_peak()
            start = time.perf_counter()
            super().load(ckpt)
            record.update(peak=status("VmHWM"), seconds=time.perf_counter() - start, held=held_bytes(self))

    data = Data(train=RandomBatches(), val=[], val_tokens=torch.zeros(1, dtype=torch.long),
                tokenizer_path=work / "tokenizer.model", unigram_baseline={})
    trainer = Measured(cfg, data=data, resume="require" if phase == "resume" else "auto")
    if phase == "save":
        trainer.train_step()
        record.update(rss_before=reset_peak(), held=held_bytes(trainer))
        start = time.perf_counter()
        trainer.save()
        record.update(peak=status("VmHWM"), seconds=time.perf_counter() - start)
        shard = work / "run" / "checkpoints" / "step_00000001" / "shards" / f"rank{lay.rank:05d}.safetensors"
        record["shard"] = shard.stat().st_size if shard.is_file() else None
    (out / f"{phase}_rank{lay.rank}.json").write_text(json.dumps(record))
    topology.shutdown()


def run(out: Path) -> None:
    """Both torchruns, with the checkpoint in a temporary directory; the records go to `out`."""
    from dsmtp.config import ModelConfig
    from dsmtp.convert.names import our_shapes

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    code = env.get("PYTHONPATH", "").split(os.pathsep)[0] or "."
    commit = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="dsmtp-ckpt-memory-") as work:
        (Path(work) / "tokenizer.model").write_bytes(b"a stand-in: trainers copy and hash it, nothing reads it")
        for phase in ("save", "resume"):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                            __file__, "--phase", phase, "--out", str(out), "--work", work], env=env, check=True,
                           timeout=1800)
        files = [p for p in (Path(work) / "run" / "checkpoints").rglob("*") if p.is_file()]
        (out / "run.json").write_text(json.dumps({
            "code": os.path.abspath(code), "commit": commit.strip(), "machine": machine(),
            "parameters": sum(math.prod(s) for s in our_shapes(ModelConfig(**MODEL)).values()),
            "checkpoint_bytes": sum(p.stat().st_size for p in files), "checkpoint_files": len(files)}))


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------
# The table


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def table(before: Path, after: Path) -> str:
    runs = {name: json.loads((d / "run.json").read_text()) for name, d in (("before", before), ("after", after))}
    rec = {(name, p, r["rank"]): r for name, d in (("before", before), ("after", after))
           for p in ("save", "resume") for r in (json.loads(f.read_text()) for f in d.glob(f"{p}_rank*.json"))}
    ranks = sorted({r for _, _, r in rec})
    lines = [f"Machine: {runs['after']['machine']}. Model: {runs['after']['parameters'] / 1e6:.1f}M parameters "
             f"(tools/measure_checkpoint_memory.py); checkpoint {gib(runs['after']['checkpoint_bytes'])} GiB in "
             f"{runs['after']['checkpoint_files']} files (before: {gib(runs['before']['checkpoint_bytes'])} GiB in "
             f"{runs['before']['checkpoint_files']} files). Before: {runs['before']['commit']}, after: "
             f"{runs['after']['commit']}.",
             f"Save: {rec[('after', 'save', 0)]['layout']}. Resume: {rec[('after', 'resume', 0)]['layout']}.",
             "Memory in GiB; 'extra' is the peak RSS during the save (or load) minus the RSS just before it.", "",
             "| rank | shard written (after) | held at save | save extra before | save extra after | "
             "save peak before | save peak after | held at resume | resume extra before | resume extra after | "
             "resume peak before | resume peak after |",
             "|" + " --- |" * 12]
    for r in ranks:
        cells = [str(r), gib(rec[("after", "save", r)]["shard"]), gib(rec[("after", "save", r)]["held"])]
        for phase in ("save", "resume"):
            if phase == "resume":
                cells.append(gib(rec[("after", "resume", r)]["held"]))
            cells += [gib(rec[(n, phase, r)]["peak"] - rec[(n, phase, r)]["rss_before"]) for n in ("before", "after")]
            cells += [gib(rec[(n, phase, r)]["peak"]) for n in ("before", "after")]
        lines.append("| " + " | ".join(cells) + " |")
    seconds = {k: max(v["seconds"] for (n, p, _), v in rec.items() if (n, p) == k)
               for k in {(n, p) for n, p, _ in rec}}
    lines += ["", "Slowest rank, seconds: " + ", ".join(f"{p} {n} {seconds[(n, p)]:.1f}"
                                                     for p in ("save", "resume") for n in ("before", "after"))]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The estimate for a large config


def estimate(config: str, ranks: int, pp: int, ep: int, rank_gbps: float, aggregate_gbps: float) -> str:
    """Bytes each rank writes (and reads back in the same layout) for fp32 weights and Adam moments, with
    replicas spread over their holders as the save planner spreads them; TP=1."""
    from dsmtp.config import load_config
    from dsmtp.convert.names import our_shapes
    from dsmtp.parallel.pipeline import stage_layers

    m = load_config(config).model
    dp = ranks // pp
    if dp * pp != ranks or dp % ep:
        raise SystemExit(f"--ranks {ranks} is not pp x dp with dp a multiple of ep")
    stage_of_layer = {i: s for s in range(pp) for i in stage_layers(m.num_layers, pp, s)}
    per_stage = [0] * pp
    total = chunks = blocks = 0
    for name, shape in our_shapes(m).items():
        nbytes = 12 * math.prod(shape)  # fp32 weight, Adam exp_avg and exp_avg_sq
        total += nbytes
        slices = ep if ".experts.w" in name else 1  # a ZeRO-1 owner holds a whole slice's moments
        chunks += 3 * slices
        blocks += 3 * slices * math.ceil(nbytes / 3 / slices / (64 << 20))
        parts = name.split(".")
        stage = stage_of_layer[int(parts[1])] if parts[0] == "layers" else 0 if parts[0] == "embed" else pp - 1
        per_stage[stage] += nbytes  # experts: ep ranks of a stage split them, dp / ep replicas share the writes
    per_rank = max(per_stage) / dp
    write_s = max(per_rank / (rank_gbps * 1e9), total / (aggregate_gbps * 1e9))
    hash_s = per_rank / 1.74e9  # sha256 with SHA-NI, measured on the dev machine, one core per rank
    rows = [("config", config), ("layout", f"{ranks} ranks = PP {pp} x DP {dp}, EP {ep} (TP 1, ZeRO-1)"),
            ("parameters", f"{sum(math.prod(s) for s in our_shapes(m).values()) / 1e9:.1f}B"),
            ("checkpoint (fp32 weights + Adam)", f"{total / 1e12:.2f} TB"),
            ("largest / smallest stage", f"{max(per_stage) / 1e12:.3f} / {min(per_stage) / 1e12:.3f} TB"),
            ("bytes per rank (slowest stage)", f"{per_rank / 1e9:.1f} GB"),
            ("files", f"{ranks} shards + index.json, manifest.json, config.yaml, tokenizer.model, trainer_state.pt"),
            ("chunks, sha256 blocks (64 MiB) in index.json", f"{chunks:,}, {blocks:,} (about "
                                                             f"{(chunks * 200 + blocks * 70) / 1e6:.0f} MB of JSON)"),
            (f"write time at {rank_gbps} GB/s per rank, {aggregate_gbps} GB/s in all", f"{write_s:.0f} s"),
            ("hashing (not overlapped with the write)", f"+{hash_s:.0f} s"),
            ("before: rank 0 alone", f"{total / 1e12:.2f} TB through one process")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="directory for the run's checkpoint and per-rank records")
    parser.add_argument("--phase", choices=["save", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--estimate", metavar="CONFIG")
    parser.add_argument("--ranks", type=int, default=256)
    parser.add_argument("--pp", type=int, default=16)
    parser.add_argument("--ep", type=int, default=16)
    parser.add_argument("--rank-gbps", type=float, default=2.0, help="write bandwidth of one rank, GB/s")
    parser.add_argument("--aggregate-gbps", type=float, default=100.0, help="the file system's total, GB/s")
    args = parser.parse_args()
    if args.phase:
        worker(args.phase, args.out, args.work)
    elif args.table:
        print(table(*args.table))
    elif args.estimate:
        print(estimate(args.estimate, args.ranks, args.pp, args.ep, args.rank_gbps, args.aggregate_gbps))
    else:
        run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
