"""Training and eval metrics, averaged correctly.

Losses and accuracies are token-weighted sums over *every* micro-batch of *every* step in a log
interval (then divided by the token count), not the value of the last micro-batch or the mean of
per-step means: Megatron-LM logged MTP loss wrong exactly there (#1686). Sums are reduced over the
data-parallel group before dividing, so a record describes the global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Iterator

import torch

from dsmtp.model import ModelOutput, moe_layers
from dsmtp.parallel.collectives import all_reduce_sum_


class LossSums:
    """Token-weighted sums of main / per-depth MTP loss and accuracy, and the aux loss.

    They stay on the device the losses are on and are read once per log interval: reading them per
    micro-batch would make the host wait for every step's GPU work before it can queue the next.
    """

    def __init__(self, depth: int, device: torch.device | str | None = None):
        self.depth = depth
        # main: [loss * n, accuracy * n, aux * n, n]; mtp: [depth, (loss * n_k, accuracy * n_k, n_k)]
        self.main = torch.zeros(4, dtype=torch.float64, device=device)
        self.mtp = torch.zeros(depth, 3, dtype=torch.float64, device=device)

    def add(self, out: ModelOutput) -> None:
        n = out.main_tokens.detach().double()
        self.main += torch.stack([out.main_loss.double() * n, out.main_accuracy.detach().double() * n,
                                  out.aux_loss.double() * n, n]).to(self.main.device)
        nk = out.mtp_tokens.detach().double()
        self.mtp += torch.stack([out.mtp_losses.double() * nk, out.mtp_accuracies.detach().double() * nk, nk],
                                dim=1).to(self.mtp.device)

    def merge(self, other: "LossSums", skipped: torch.Tensor | bool = False) -> None:
        """Add another's sums, unless `skipped` (a step whose update was dropped; its sums may be NaN)."""
        skipped = torch.as_tensor(skipped, device=self.main.device)
        self.main += torch.where(skipped, 0.0, other.main)
        self.mtp += torch.where(skipped, 0.0, other.mtp)

    def all_reduce(self) -> None:
        all_reduce_sum_([self.main, self.mtp])

    @property
    def tokens(self) -> int:
        return int(self.main[3].item())

    def is_finite(self) -> torch.Tensor:
        """Whether every sum is finite, as a bool on the sums' device (no host read)."""
        return torch.isfinite(self.main).all() & torch.isfinite(self.mtp).all()

    def averages(self) -> dict:
        """Token-weighted means; NaN where there were no tokens (e.g. an interval of skipped steps)."""
        main, mtp = self.main.cpu(), self.mtp.cpu()
        n = main[3].item() or math.nan
        out = {"loss": main[0].item() / n, "accuracy": main[1].item() / n, "aux_loss": main[2].item() / n}
        nk = mtp[:, 2].masked_fill(mtp[:, 2] == 0, math.nan)
        out["mtp_loss"] = (mtp[:, 0] / nk).tolist()
        out["mtp_accuracy"] = (mtp[:, 1] / nk).tolist()
        return out


def expert_load_ratios(model: torch.nn.Module) -> torch.Tensor:
    """max/mean of tokens_per_expert for each MoE layer (1.0 = perfectly balanced; NaN for a layer that
    saw no tokens), on the device. Call after the loads are reduced over the data-parallel group,
    before the bias update resets them."""
    loads = [moe.tokens_per_expert for moe in moe_layers(model)]
    if not loads:
        return torch.zeros(0, dtype=torch.float64)
    stacked = torch.stack(loads).double()
    return stacked.max(dim=1).values / stacked.mean(dim=1)


def expert_load_imbalance(model: torch.nn.Module) -> torch.Tensor:
    """expert_load_ratios over the layers that saw tokens, summarized as [mean, max] on the device
    (NaN, NaN when none did)."""
    ratios = expert_load_ratios(model)
    seen = torch.isfinite(ratios)
    if not seen.numel():
        return torch.full((2,), math.nan, dtype=torch.float64)
    worst = torch.where(seen, ratios, -math.inf).amax()
    return torch.stack([ratios.nanmean(), torch.where(seen.any(), worst, math.nan)])


class IntervalMeter:
    """Everything one log record summarizes: the optimizer steps since the last record.

    Per-step statistics arrive as device tensors (or floats) and are read in one transfer when asked
    for, so a step never waits for the device. Throughput is tokens over the wall time from `started`
    (the meter's creation, or the previous meter's `stopped`) to `record()`, which reads the device and
    so includes all the queued work.
    """

    def __init__(self, depth: int, device: torch.device | str | None = None, started: float | None = None):
        self.sums = LossSums(depth, device)
        self.device = device
        self.tokens = 0  # every token consumed, skipped steps included
        self.started = time.perf_counter() if started is None else started
        self.stopped = self.seconds = math.nan  # set by record()
        self._steps: list[torch.Tensor] = []  # per step: [grad norm, imbalance mean, imbalance max, skipped]
        self._read: list[list[float]] = []
        self._reported = 0

    def add_step(self, step_sums: LossSums, tokens: int, grad_norm, imbalance, skipped) -> None:
        """One optimizer step; a skipped (non-finite) step contributes only its count and tokens."""
        self.tokens += tokens
        self.sums.merge(step_sums, skipped)
        as_t = lambda x: torch.as_tensor(x, dtype=torch.float64, device=self.device).reshape(-1)  # noqa: E731
        self._steps.append(torch.cat([as_t(grad_norm), as_t(imbalance), as_t(skipped)]))

    def steps(self) -> list[list[float]]:
        """[grad norm, imbalance mean, imbalance max, skipped] of every step so far, on the host."""
        if len(self._read) < len(self._steps):
            self._read += torch.stack(self._steps[len(self._read):]).cpu().tolist()
        return self._read

    @contextlib.contextmanager
    def off_the_clock(self) -> Iterator[None]:
        """Work inside (evaluation, checkpoints) does not count as training time. The device finishes
        the queued training steps first: their time does count."""
        if self.device is not None and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - paused

    def new_skip_flags(self) -> list[bool]:
        """Whether each step added since the last call was skipped (reads the device)."""
        flags = [bool(row[3]) for row in self.steps()[self._reported:]]
        self._reported = len(self._read)
        return flags

    def record(self) -> dict:
        """The averaged interval (sums must already be reduced over data-parallel ranks)."""
        rec = self.sums.averages()
        applied = [row for row in self.steps() if not row[3]]
        self.stopped = time.perf_counter()
        self.seconds = self.stopped - self.started
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        rec.update(grad_norm=mean([r[0] for r in applied]),
                   expert_imbalance_mean=mean([r[1] for r in applied]),
                   expert_imbalance_max=max((r[2] for r in applied), default=float("nan")),
                   skipped_steps=len(self._read) - len(applied),
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
