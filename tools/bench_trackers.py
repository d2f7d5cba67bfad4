"""Do the trackers slow training? The same `dsmtp train` run once per train.trackers setting, each in a
fresh process, and the tokens/s each run's metrics.jsonl reports. The trainer's interval clock runs on
through the writing of a record (the next interval starts where the last stopped), so what writing to
TensorBoard or W&B costs shows in tokens/s; evaluation and checkpoints stay off the clock.

    WANDB_MODE=offline python tools/bench_trackers.py --config configs/small.yaml [--steps 200] \
        [--warmup 20] [--set train.log_interval=1] [--trackers jsonl jsonl,tensorboard,wandb ...] \
        [--results trackers.jsonl]
    python tools/bench_trackers.py --table trackers.jsonl     # the table of every row the file holds

The default settings end with jsonl alone again: the two jsonl-only rows show the run-to-run noise.
W&B runs offline unless WANDB_MODE says otherwise. Each setting's row is appended to --results as soon as
its run ends (a run cut short keeps the rows it finished); the table is printed from that file: the median
and the overall tokens/s of the intervals after --warmup steps, and the overall rate against the first row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsmtp.machine import describe  # noqa: E402
from dsmtp.train.metrics import MetricsLog  # noqa: E402

DEFAULT_TRACKERS = ["jsonl", "jsonl,tensorboard", "jsonl,wandb", "jsonl,tensorboard,wandb", "jsonl"]


def train(config: str, overrides: list[str], trackers: str, out_dir: Path) -> list[dict]:
    """One `dsmtp train` in its own process; its train records."""
    sets = [*overrides, f"train.trackers=[{trackers}]", f"train.out_dir={out_dir}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("WANDB_MODE", "offline")
    proc = subprocess.run([sys.executable, "-m", "dsmtp.cli", "train", "--config", config,
                           *[arg for s in sets for arg in ("--set", s)]],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.trackers=[{trackers}] failed:\n{proc.stderr[-4000:]}")
    return [r for r in MetricsLog(out_dir / "metrics.jsonl").records() if r["kind"] == "train"]


def rate_row(trackers: str, records: list[dict], warmup: int) -> dict:
    """The rates of one run's train records past `warmup`: the median interval rate and the overall rate
    (tokens over summed interval times)."""
    intervals = [(r["tokens"] - prev["tokens"], r["tokens_per_second"])
                 for prev, r in zip(records, records[1:]) if r["step"] > warmup]
    if not intervals:
        raise SystemExit(f"no record after step {warmup}: raise --steps or lower train.log_interval")
    seconds = sum(tokens / rate for tokens, rate in intervals)
    return dict(trackers=trackers, records=len(intervals), median=statistics.median(rate for _, rate in intervals),
                overall=sum(tokens for tokens, _ in intervals) / seconds)


def table(rows: list[dict]) -> str:
    lines = []
    for setting in dict.fromkeys((r["machine"], r["steps"], r["warmup"], r["overrides"]) for r in rows):
        machine, steps, warmup, overrides = setting
        group = [r for r in rows if (r["machine"], r["steps"], r["warmup"], r["overrides"]) == setting]
        lines += [f"machine: {machine}; {steps} steps, rates over the records after step {warmup}; "
                  f"overrides: {overrides or 'none'}",
                  f"{'train.trackers':<28}{'records':>8}{'median tok/s':>14}{'overall tok/s':>15}{'vs first':>10}"]
        lines += [f"{r['trackers']:<28}{r['records']:>8}{r['median']:>14,.0f}{r['overall']:>15,.0f}"
                  f"{r['overall'] / group[0]['overall'] - 1:>+10.2%}" for r in group]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. train.log_interval=1 (a record every step)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the rates")
    parser.add_argument("--trackers", nargs="+", default=DEFAULT_TRACKERS,
                        help="train.trackers settings to run in turn, comma-separated names each")
    parser.add_argument("--results", default="bench_trackers.jsonl", help="rows are appended here as they finish")
    parser.add_argument("--table", help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.table:
        if not Path(args.table).is_file():
            parser.error(f"--table {args.table}: no such results file (a run writes it with --results)")
        print(table(MetricsLog(args.table).records()))
        return 0
    if not args.config:
        parser.error("--config is required")
    if args.warmup >= args.steps:
        parser.error(f"--warmup={args.warmup} must be below --steps={args.steps}")
    # The final evaluation and checkpoint are off the clock; none in between.
    overrides = [f"train.steps={args.steps}", f"train.eval_interval={args.steps}",
                 f"train.save_interval={args.steps}", *args.set]
    here = describe(torch.device("cuda") if torch.cuda.is_available() else None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_trackers_") as tmp:
        for i, trackers in enumerate(args.trackers):
            print(f"train.trackers=[{trackers}] ...", flush=True)
            row = {**rate_row(trackers, train(args.config, overrides, trackers, Path(tmp) / f"run{i}"), args.warmup),
                   "machine": here, "steps": args.steps, "warmup": args.warmup, "overrides": " ".join(args.set)}
            MetricsLog(args.results).append(row)
            rows.append(row)
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
