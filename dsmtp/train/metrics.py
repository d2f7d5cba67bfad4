"""Training and eval metrics, averaged correctly.

Losses and accuracies are token-weighted sums over *every* micro-batch of *every* step in a log
interval (then divided by the token count), not the value of the last micro-batch or the mean of
per-step means: Megatron-LM logged MTP loss wrong exactly there (#1686). Sums are reduced over the
data-parallel group before dividing, so a record describes the global batch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsmtp.model import ModelOutput, moe_layers
from dsmtp.parallel.collectives import all_reduce_sum_


class LossSums:
    """Token-weighted sums of main / per-depth MTP loss and accuracy, and the aux loss."""

    def __init__(self, depth: int):
        self.depth = depth
        # main: [loss * n, accuracy * n, aux * n, n]; mtp: [depth, (loss * n_k, accuracy * n_k, n_k)]
        self.main = torch.zeros(4, dtype=torch.float64)
        self.mtp = torch.zeros(depth, 3, dtype=torch.float64)

    def add(self, out: ModelOutput) -> None:
        n = out.main_tokens.detach().double()
        main = torch.stack([out.main_loss.double() * n, out.main_accuracy.detach().double() * n,
                            out.aux_loss.double() * n, n])
        nk = out.mtp_tokens.detach().double()
        mtp = torch.stack([out.mtp_losses.double() * nk, out.mtp_accuracies.detach().double() * nk, nk], dim=1)
        both = torch.cat([main, mtp.flatten()]).cpu()  # one device-to-host copy per micro-batch
        self.main += both[:4]
        self.mtp += both[4:].view(self.depth, 3)

    def merge(self, other: "LossSums") -> None:
        self.main += other.main
        self.mtp += other.mtp

    def all_reduce(self) -> None:
        all_reduce_sum_([self.main, self.mtp])

    @property
    def tokens(self) -> int:
        return int(self.main[3].item())

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.main).all() and torch.isfinite(self.mtp).all())

    def averages(self) -> dict:
        """Token-weighted means; NaN where there were no tokens (e.g. an interval of skipped steps)."""
        n = self.main[3].item() or math.nan
        out = {"loss": self.main[0].item() / n, "accuracy": self.main[1].item() / n,
               "aux_loss": self.main[2].item() / n}
        nk = self.mtp[:, 2].masked_fill(self.mtp[:, 2] == 0, math.nan)
        out["mtp_loss"] = (self.mtp[:, 0] / nk).tolist()
        out["mtp_accuracy"] = (self.mtp[:, 1] / nk).tolist()
        return out


def expert_load_ratios(model: torch.nn.Module) -> list[float]:
    """max/mean of tokens_per_expert for each MoE layer that saw tokens (1.0 = perfectly balanced),
    read from the device in one transfer. Call after the loads are reduced over the data-parallel
    group, before the bias update resets them."""
    loads = [moe.tokens_per_expert for moe in moe_layers(model)]
    if not loads:
        return []
    stacked = torch.stack(loads).double()
    ratios = (stacked.max(dim=1).values / stacked.mean(dim=1)).tolist()
    return [r for r in ratios if math.isfinite(r)]  # a layer without tokens gives 0/0


def expert_load_imbalance(model: torch.nn.Module) -> tuple[float, float]:
    """expert_load_ratios summarized over layers as (mean, max)."""
    ratios = expert_load_ratios(model)
    if not ratios:
        return float("nan"), float("nan")
    return sum(ratios) / len(ratios), max(ratios)


@dataclass
class IntervalMeter:
    """Everything one log record summarizes: the optimizer steps since the last record."""

    depth: int
    sums: LossSums = None  # type: ignore[assignment]
    grad_norms: list[float] = field(default_factory=list)
    imbalance_means: list[float] = field(default_factory=list)
    imbalance_maxes: list[float] = field(default_factory=list)
    skipped: int = 0
    tokens: int = 0  # every token consumed, skipped steps included
    seconds: float = 0.0

    def __post_init__(self):
        self.sums = LossSums(self.depth)

    def add_step(self, step_sums: LossSums, tokens: int, seconds: float, grad_norm: float,
                 imbalance: tuple[float, float], skipped: bool) -> None:
        """One optimizer step; a skipped (non-finite) step contributes only its count, tokens and time."""
        self.tokens += tokens
        self.seconds += seconds
        if skipped:
            self.skipped += 1
            return
        self.sums.merge(step_sums)
        self.grad_norms.append(grad_norm)
        self.imbalance_means.append(imbalance[0])
        self.imbalance_maxes.append(imbalance[1])

    def record(self) -> dict:
        """The averaged interval (sums must already be reduced over data-parallel ranks)."""
        rec = self.sums.averages()
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        rec.update(grad_norm=mean(self.grad_norms), expert_imbalance_mean=mean(self.imbalance_means),
                   expert_imbalance_max=max(self.imbalance_maxes, default=float("nan")),
                   skipped_steps=self.skipped,
                   tokens_per_second=self.tokens / self.seconds if self.seconds > 0 else float("nan"))
        return rec


def _finite_or_null(value):
    """NaN/inf -> null, so every line is strict JSON that any tool can read."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


class MetricsLog:
    """Append-only JSONL file of train and eval records, one JSON object per line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(_finite_or_null(record)) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: on resume they would be logged again by the repeated steps."""
        if not self.path.exists():
            return
        kept = [r for r in self.records() if r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
