"""`dsmtp plot RUN... --out plot.png`: several `dsmtp train` runs' curves overlaid in one PNG.

    dsmtp plot runs/mtp runs/ntp --out mtp_vs_ntp.png

Each RUN is a train.out_dir (its metrics.jsonl); x is tokens seen, so runs with different batches line
up. Panels: main (next-token) loss on train and val, then each MTP depth's loss on train and val
(colour: run, line style: depth) when any run has MTP. Prints each run's last val losses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsmtp.train.metrics import MetricsLog
from dsmtp.train.report import nan_for_null, save_figure

DEPTH_STYLES = ("-", "--", ":", "-.")


def read_runs(runs: list[Path]) -> dict[str, list[dict]]:
    """Run label (its directory name, or the path as given where names repeat) -> its records."""
    names = [run.name for run in runs]
    out = {}
    for run in runs:
        path = run / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: name a train.out_dir that `dsmtp train` wrote")
        label = run.name if names.count(run.name) == 1 else str(run)
        out[label] = [nan_for_null(r) for r in MetricsLog(path).records()]
    return out


def plot_runs(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    depth = max((len(r["mtp_loss"]) for records in runs.values() for r in records), default=0)
    fig, axes = plt.subplots(2 if depth else 1, 2, figsize=(13, 9 if depth else 4.5), squeeze=False)
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        for col, kind in enumerate(("train", "eval")):
            rs = [r for r in records if r["kind"] == kind]
            tokens = [r["tokens"] for r in rs]
            marker = "o" if kind == "eval" else None
            axes[0][col].plot(tokens, [r["loss"] for r in rs], color=color, marker=marker, label=label)
            for k in range(len(rs[0]["mtp_loss"]) if rs else 0):
                axes[1][col].plot(tokens, [r["mtp_loss"][k] for r in rs], color=color, marker=marker,
                                  linestyle=DEPTH_STYLES[k % len(DEPTH_STYLES)], label=f"{label} depth {k + 1}")
    for row, what in enumerate(("main (next token)", "MTP")[:len(axes)]):
        for col, split in enumerate(("train", "val")):
            axes[row][col].set(xlabel="tokens", ylabel="cross-entropy (nats/token)", title=f"{split} loss, {what}")
            axes[row][col].xaxis.set_major_formatter(EngFormatter())  # 500k, 2M, 1G: any run length
    save_figure(fig, path)


def last_eval_table(runs: dict[str, list[dict]]) -> str:
    width = max(len("run"), *map(len, runs))
    lines = [f"{'run':<{width}}  {'step':>7}  {'tokens':>10}  {'val loss':>9}  val MTP loss by depth"]
    for label, records in runs.items():
        evals = [r for r in records if r["kind"] == "eval"]
        if not evals:
            lines.append(f"{label:<{width}}  (no eval record yet)")
            continue
        last = evals[-1]
        mtp = " ".join(f"{x:.4f}" for x in last["mtp_loss"]) or "-"
        lines.append(f"{label:<{width}}  {last['step']:>7}  {last['tokens']:>10,}  {last['loss']:>9.4f}  {mtp}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsmtp plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="train.out_dir of each run")
    parser.add_argument("--out", type=Path, default=Path("plot.png"), help="PNG to write (default plot.png)")
    args = parser.parse_args(argv)
    try:
        runs = read_runs(args.runs)
    except FileNotFoundError as e:
        print(f"dsmtp plot: {e}", file=sys.stderr)
        return 1
    plot_runs(runs, args.out)
    print(last_eval_table(runs))
    print(f"plot: {args.out}")
    return 0
