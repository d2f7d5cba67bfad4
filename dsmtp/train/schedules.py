"""Schedules as pure functions of progress, so resuming needs only the step and token counters.

- learning rate by optimizer step: linear warmup, then either cosine decay to min_lr over the rest
  of the run ("cosine"), or DeepSeek-V3's constant plateau followed by a cosine decay to min_lr that
  starts at `decay_start_fraction` of the run ("constant_decay");
- MTP loss weight lambda and router bias-update rate gamma by tokens seen: piecewise constant.
"""

from __future__ import annotations

import math

from dsmtp.config import TrainConfig, piecewise


def _cosine(start: float, end: float, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate(t: TrainConfig, step: int) -> float:
    """LR for the optimizer step with 0-based index `step` (the (step+1)-th update)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        decay_start = t.warmup_steps
    else:  # constant_decay
        decay_start = max(t.warmup_steps, int(t.decay_start_fraction * t.steps))
    if step < decay_start:
        return t.lr
    decay_steps = max(t.steps - 1 - decay_start, 1)  # the last step lands exactly on min_lr
    return _cosine(t.lr, t.min_lr, (step - decay_start) / decay_steps)


def mtp_weight(t: TrainConfig, tokens: int) -> float:
    """lambda, the MTP loss weight, after `tokens` training tokens."""
    return piecewise(t.mtp_weight_schedule, tokens)


def bias_update_rate(t: TrainConfig, tokens: int) -> float:
    """gamma, the router bias update speed, after `tokens` training tokens."""
    return piecewise(t.bias_update_schedule, tokens)
