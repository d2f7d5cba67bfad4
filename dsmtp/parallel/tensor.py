"""Tensor-parallel regions the megatron-core layers do not cover themselves."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region


def shared_by_local_heads(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; in backward, sum the gradient over TP ranks.

    For a replicated activation that each TP rank consumes only partly (MLA's RoPE key, shared by all
    heads while a rank holds num_heads / tp of them). Without it the replicated parameters upstream
    (wkv_a, the attention norm) and the residual stream would get rank-local partial gradients.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x
    return copy_to_tensor_model_parallel_region(x)
