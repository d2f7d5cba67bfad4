"""Losses and statistics over a vocabulary that may be split across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as _megatron_vocab_ce


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in float32; `logits` hold this rank's vocabulary slice."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        # Whole vocabulary here: PyTorch's fused kernels make two passes over the logits where
        # megatron's vocab-parallel version makes about ten.
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
    return _megatron_vocab_ce(logits.float(), targets)


@torch.no_grad()
def top1_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether the target is the arg-max over the whole (possibly split) vocabulary."""
    group = parallel_state.get_tensor_model_parallel_group()
    vocab_local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
    best = logits.max(dim=-1).values.float()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    local_target = targets - start
    in_shard = (local_target >= 0) & (local_target < vocab_local)
    target_logit = logits.gather(-1, local_target.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1).float()
    hit = (in_shard & (target_logit >= best)).to(torch.int32)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(hit, op=dist.ReduceOp.MAX, group=group)
    return hit.bool()


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from each rank's slice (identity without tensor parallelism)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)
