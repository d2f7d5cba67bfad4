"""Tensor-parallel regions the megatron-core layers do not cover themselves (sequence parallelism:
dsmtp.parallel.sequence)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from dsmtp.parallel.sequence import sequence_parallel


class _SumGradOverTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # A fresh contiguous tensor: megatron's own copy_to_tensor_model_parallel_region all-reduces
        # `grad.contiguous()` and returns `grad`, which silently skips the reduction whenever the
        # incoming gradient is not contiguous (here: one local head, the expand's gradient is strided).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


def shared_by_local_heads(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; in backward, sum the gradient over TP ranks.

    For a replicated activation that each TP rank consumes only partly (MLA's RoPE key, shared by all
    heads while a rank holds num_heads / tp of them). Without it the replicated parameters upstream
    (wkv_a, the attention norm) and the residual stream would get rank-local partial gradients.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1 or sequence_parallel():
        return x  # under sequence parallelism the attention input's gather sums it (reduce-scatter)
    return _SumGradOverTP.apply(x)
