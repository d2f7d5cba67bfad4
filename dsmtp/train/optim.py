"""AdamW with decoupled weight decay, applied to matrices only, as one fused kernel.

Norm weights and any other 1-D parameters (biases) are not decayed: shrinking a norm's gain or a
bias toward zero is not regularization. The router's expert_bias is a buffer updated by the
balancing rule, never by the optimizer.

The fused kernel reads and writes each parameter, gradient and moment once per step; the default
(foreach) implementation makes a dozen passes: on an H100, small.yaml trained 12% faster with it.
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
                             betas=(t.beta1, t.beta2), eps=t.adam_eps, fused=True)


def clipped_step(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], max_norm: float,
                 skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients to a global norm of max_norm (<= 0: no clipping) and take one step of a fused
    optimizer, unless the norm is not finite or `skip` (a device bool) is set: then nothing changes.
    Returns (norm before clipping, skipped), both on the device.

    The fused kernel does both jobs as it goes: it divides every gradient by `grad_scale` and returns
    early when `found_inf` is set (torch.amp.GradScaler's hooks). So clipping costs no extra pass over
    the gradients, and neither it nor the skip waits for the host to read the norm.
    """
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    skipped = ~torch.isfinite(norm)
    if skip is not None:
        skipped |= skip
    # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the kernel divides by its inverse.
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0) if max_norm > 0 else torch.ones_like(norm)
    optimizer.found_inf = skipped.float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    return norm, skipped
