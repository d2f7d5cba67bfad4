"""Compare the training-loss curves of `dsmtp train` runs that differ only in train.precision (or in
train.seed, to show run-to-run variation): the mean main training loss over the last --tail-steps,
its difference relative to the first run, the last validation loss, and all curves in one plot.

    dsmtp train --config configs/small.yaml --set train.steps=500 --set train.precision=bf16 \
        --set train.out_dir=runs/bf16
    dsmtp train ... --set train.precision=fp8 --set train.out_dir=runs/fp8
    dsmtp train ... --set train.precision=bf16 --set train.seed=1 --set train.out_dir=runs/bf16-seed1
    python tools/fp8_vs_bf16.py runs/bf16 runs/fp8 runs/bf16-seed1 --out notes/gpu/fp8_vs_bf16.png

Same seed means same initialisation and same batches, so the bf16/fp8 pair differs only in the GEMMs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))

from dsmtp.train.report import save_figure  # noqa: E402


def read_run(run: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: name a train.out_dir that `dsmtp train` wrote")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def tail_mean(train: list[dict], tail_steps: int) -> float:
    """Mean of the interval-averaged main loss over the records covering the last `tail_steps` steps."""
    last = train[-1]["step"]
    losses = [r["loss"] for r in train if r["step"] > last - tail_steps]
    return sum(losses) / len(losses)


def compare(runs: list[Path], tail_steps: int) -> list[dict]:
    rows = []
    for run in runs:
        train, evals = read_run(run)
        if not train:
            raise SystemExit(f"{run / 'metrics.jsonl'} has no train records yet")
        rows.append(dict(run=str(run), steps=train[-1]["step"], tail_loss=tail_mean(train, tail_steps),
                         val_loss=evals[-1]["loss"] if evals else float("nan"),
                         tokens_per_second=sorted(r["tokens_per_second"] for r in train)[len(train) // 2],
                         curve=[(r["step"], r["loss"]) for r in train]))
    reference = rows[0]["tail_loss"]
    for row in rows:
        row["relative_difference"] = (row["tail_loss"] - reference) / reference
    return rows


def plot(rows: list[dict], tail_steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.5))
    reference = dict(rows[0]["curve"])
    for i, row in enumerate(rows):
        steps, losses = zip(*row["curve"])
        label = f"{Path(row['run']).name}: last-{tail_steps} mean {row['tail_loss']:.4f} ({row['relative_difference']:+.2%})"
        ax_loss.plot(steps, losses, label=label, color=f"C{i}", linewidth=0.9)
        if i:
            common = [(s, (loss - reference[s]) / reference[s]) for s, loss in row["curve"] if s in reference]
            ax_diff.plot(*zip(*common), label=Path(row["run"]).name, color=f"C{i}", linewidth=0.9)
    ax_loss.set(xlabel="step", ylabel="main training loss (nats/token)", title="training loss")
    ax_diff.axhline(0, color="gray", linewidth=0.5)
    for bound in (-0.005, 0.005):
        ax_diff.axhline(bound, color="gray", linestyle=":", linewidth=0.8)
    ax_diff.set(xlabel="step", ylabel=f"relative to {Path(rows[0]['run']).name}",
                title="difference per logged interval (dotted: +-0.5%)")
    save_figure(fig, path, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="train.out_dir of each run; the first is the reference")
    parser.add_argument("--tail-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, help="PNG of the curves (needs matplotlib)")
    parser.add_argument("--json", type=Path, help="write the comparison (curves included) as JSON")
    args = parser.parse_args(argv)
    rows = compare(args.runs, args.tail_steps)
    print(f"{'run':<28}{'steps':>6}{f'last-{args.tail_steps} loss':>16}{'vs first':>10}{'val loss':>10}{'tok/s':>10}")
    for row in rows:
        print(f"{Path(row['run']).name:<28}{row['steps']:>6}{row['tail_loss']:>16.4f}{row['relative_difference']:>+10.2%}"
              f"{row['val_loss']:>10.4f}{row['tokens_per_second']:>10.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.out:
        plot(rows, args.tail_steps, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
