"""End-of-run outputs: the metrics plot and the terminal summary table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats/token) of the token frequencies in `tokens`: the loss of the best model that
    ignores context, the bar a trained model's val loss must clear."""
    counts = torch.bincount(tokens.reshape(-1)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def nan_for_null(record: dict) -> dict:
    """metrics.jsonl writes null for a value that had no tokens; matplotlib wants NaN there."""
    fix = lambda v: math.nan if v is None else v  # noqa: E731
    return {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in record.items()}


def plot_metrics(records: list[dict], path: Path, unigram_entropy: Optional[float] = None) -> None:
    """Train/val loss and per-depth MTP accuracy against tokens seen, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [nan_for_null(r) for r in records if r["kind"] == "train"]
    val = [nan_for_null(r) for r in records if r["kind"] == "eval"]
    depth = len((train or val or [{"mtp_loss": []}])[0]["mtp_loss"])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    tok = lambda rs: [r["tokens"] / 1e6 for r in rs]  # noqa: E731
    ax_loss.plot(tok(train), [r["loss"] for r in train], label="train main", color="C0", alpha=0.7)
    ax_loss.plot(tok(val), [r["loss"] for r in val], "o-", label="val main", color="C0")
    if unigram_entropy is not None:
        ax_loss.axhline(unigram_entropy, color="gray", linestyle=":", label="unigram entropy (val)")
    ax_acc.plot(tok(train), [r["accuracy"] for r in train], label="train main (next token)", color="C0", alpha=0.7)
    ax_acc.plot(tok(val), [r["accuracy"] for r in val], "o-", label="val main", color="C0")
    for k in range(depth):
        color = f"C{k + 1}"
        ax_loss.plot(tok(train), [r["mtp_loss"][k] for r in train], label=f"train MTP depth {k + 1}",
                     color=color, alpha=0.7)
        ax_loss.plot(tok(val), [r["mtp_loss"][k] for r in val], "o--", label=f"val MTP depth {k + 1}", color=color)
        ax_acc.plot(tok(train), [r["mtp_accuracy"][k] for r in train], label=f"train MTP depth {k + 1}",
                    color=color, alpha=0.7)
        ax_acc.plot(tok(val), [r["mtp_accuracy"][k] for r in val], "o--", label=f"val MTP depth {k + 1}", color=color)
    ax_loss.set(xlabel="tokens (M)", ylabel="cross-entropy (nats)", title="loss")
    ax_acc.set(xlabel="tokens (M)", ylabel="top-1 accuracy", title="accuracy")
    save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Grid and legend on every panel, then write the PNG atomically (a reader never sees half of it)."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)


def summary_table(records: list[dict], entropy: float, baseline: dict, tokens_per_second: float,
                  wall_seconds: float, files: dict[str, Path]) -> str:
    """baseline: the data manifest's unigram numbers (train_entropy_nats, val_cross_entropy_nats), if any."""
    val = [r for r in records if r["kind"] == "eval"]
    lines = []
    if val:
        first, last = val[0], val[-1]
        rows = [("main (next token)", first["loss"], last["loss"], last["accuracy"])]
        rows += [(f"MTP depth {k + 1} (token +{k + 2})", first["mtp_loss"][k], last["mtp_loss"][k],
                  last["mtp_accuracy"][k]) for k in range(len(last["mtp_loss"]))]
        lines.append(f"val loss (nats/token)     {'step ' + str(first['step']):>10}  {'step ' + str(last['step']):>10}"
                     f"  {'val acc':>8}")
        lines += [f"{name:<24}  {a:>10.4f}  {b:>10.4f}  {acc:>8.3f}" for name, a, b, acc in rows]
    lines.append(f"{'unigram entropy (val)':<24}  {entropy:>10.4f}  (a context-free model's loss)")
    if "val_cross_entropy_nats" in baseline:
        lines.append(f"{'unigram of train, on val':<24}  {baseline['val_cross_entropy_nats']:>10.4f}  "
                     f"(train-split frequencies scored on val; train entropy {baseline['train_entropy_nats']:.4f})")
    lines.append(f"throughput {tokens_per_second:,.0f} tokens/s, wall time {wall_seconds / 60:.1f} min"
                 + ("" if math.isfinite(tokens_per_second) else " (no steps run)"))
    lines += [f"{name + ':':<11} {path}" for name, path in files.items()]
    return "\n".join(lines)
