"""AdamW with decoupled weight decay, applied to matrices only.

Norm weights and any other 1-D parameters (biases) are not decayed: shrinking a norm's gain or a
bias toward zero is not regularization. The router's expert_bias is a buffer updated by the
balancing rule, never by the optimizer.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dsmtp.config import TrainConfig


def parameter_groups(model: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay / no-decay groups of a model's parameters (or of a rank's share of them, in model order)."""
    decay, no_decay = [], []
    for p in (model.parameters() if isinstance(model, nn.Module) else model):
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module | Iterable[nn.Parameter], t: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, t.weight_decay), lr=t.lr,
                             betas=(t.beta1, t.beta2), eps=t.adam_eps)
