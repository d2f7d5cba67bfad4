"""Activation recomputation (train.activation_recompute_every): trade compute for memory, a layer at a
time. A recomputed layer keeps only its input for the backward pass and runs its forward again
there (torch.utils.checkpoint, non-reentrant); every N-th layer gives the "selective by layer" middle
ground of torchtitan's activation checkpointing. It wraps the layer from outside, so a layer compiled
by `DeepSeekV3.compile_layers` is recomputed by its compiled code.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

_recomputing = False


def recomputing() -> bool:
    """True while a layer's forward runs again for the backward pass: state updates that must happen
    once per step (the MoE layers' token counts) skip it."""
    return _recomputing


@contextlib.contextmanager
def _mark_recomputation() -> Iterator[None]:
    global _recomputing
    _recomputing = True
    try:
        yield
    finally:
        _recomputing = False


def _contexts():
    return contextlib.nullcontext(), _mark_recomputation()


def run(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None):
    """layer(x, cos, sin, cache), recomputed in backward when `layer.recompute` is set and gradients are
    on (training; decoding with a KV cache never recomputes)."""
    if cache is None and getattr(layer, "recompute", False) and torch.is_grad_enabled():
        return checkpoint(layer, x, cos, sin, use_reentrant=False, context_fn=_contexts)
    return layer(x, cos, sin, cache)
