"""Losses and statistics over a vocabulary that may be split across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as _megatron_vocab_ce


class _CrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over the whole vocabulary: logits [..., V], targets [...] -> loss [...],
    written for torch.compile.

    Computes in float32 (at least) but keeps only the logits as they came (bf16 under autocast) and one
    log-sum-exp per row for backward, which rebuilds the softmax from them; compiled, each direction is
    one fused pass. F.cross_entropy on logits.float() saved its float32 log-softmax instead: twice the
    logits' bytes written in forward and read again in backward (notes/code-measurements.md).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lse = torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return lse - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        probs = torch.exp(logits.to(lse.dtype) - lse.unsqueeze(-1))
        # softmax - one_hot(target), as a comparison with the column index so it fuses into one kernel
        is_target = torch.arange(logits.shape[-1], device=logits.device) == targets.unsqueeze(-1)
        return ((probs - is_target.to(probs.dtype)) * grad.unsqueeze(-1)).to(logits.dtype), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in float32 (float64 for float64 logits); `logits` hold this rank's
    vocabulary slice."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        if torch.compiler.is_compiling():
            return _CrossEntropy.apply(logits, targets)
        # Eager, PyTorch's own fused kernels are faster than _CrossEntropy's ops one by one
        # (notes/code-measurements.md).
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(x.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
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
