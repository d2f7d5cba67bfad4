"""Sequence parallelism (Megatron-style, for our batch-first [B, S, H] activations).

Outside the tensor-parallel regions (norms, residual adds, router, routed experts, MTP's
enorm/hnorm/eh_proj) each TP rank holds S / tp positions of the sequence. A TP region (attention,
dense MLP / shared experts, output head) starts with `gather_sequence` and its row-parallel
projection ends it with `reduce_scatter_sequence`. Inside a region the column-parallel layers do no
gradient all-reduce of their own: every gradient reaching the gathered input is a TP-partial sum,
which the gather's backward reduce-scatter adds up. Parameters not split over TP therefore get
TP-partial gradients (their rank saw other tokens, or only its own heads' share): hooks sum them
over TP (`reduce_replicated_grads`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from dsmtp.parallel import flat

SEQ_DIM = 1
_sequence_parallel = False


def set_sequence_parallel(enabled: bool) -> None:
    """Set once by dsmtp.parallel.topology.init_distributed from parallel.sequence_parallel."""
    global _sequence_parallel
    _sequence_parallel = enabled


def sequence_parallel() -> bool:
    return _sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1


def _tp():
    group = parallel_state.get_tensor_model_parallel_group()
    return group, dist.get_world_size(group), dist.get_rank(group)


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    group, size, _ = _tp()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    group, size, rank = _tp()
    # gloo has no reduce_scatter: all-reduce, then keep this rank's slice (NCCL would do both at once).
    if dist.get_backend(group) == "nccl":
        parts = [p.contiguous() for p in x.chunk(size, dim=SEQ_DIM)]
        out = torch.empty_like(parts[rank])
        dist.reduce_scatter(out, parts, group=group)
        return out
    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total.chunk(size, dim=SEQ_DIM)[rank].contiguous()


def _split(x: torch.Tensor) -> torch.Tensor:
    _, size, rank = _tp()
    return x.chunk(size, dim=SEQ_DIM)[rank].contiguous()


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, partial_grad: bool) -> torch.Tensor:
        ctx.partial_grad = partial_grad
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (_reduce_scatter(grad) if ctx.partial_grad else _split(grad)), None


class _ShardSequence(torch.autograd.Function):
    """Whole sequence -> this rank's shard: its slice of a replicated x, or of the sum of partial x's;
    the backward all-gathers either way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, partial: bool) -> torch.Tensor:
        return _reduce_scatter(x) if partial else _split(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad), None


def gather_sequence(x: torch.Tensor, partial_grad: bool = True) -> torch.Tensor:
    """[B, S/tp, ...] shard -> [B, S, ...] whole sequence (identity without sequence parallelism).

    partial_grad=True (entering a TP region): each rank's gradient is a partial sum, reduce-scattered
    in backward. False (a replicated computation, e.g. the sequence-wise balance loss): every rank
    holds the full gradient and keeps its own slice."""
    if not sequence_parallel():
        return x
    return _GatherSequence.apply(x, partial_grad)


def scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    """A replicated [B, S, ...] -> this rank's [B, S/tp, ...] slice (backward: all-gather)."""
    if not sequence_parallel():
        return x
    check_sequence_divisible(x.shape[SEQ_DIM])
    return _ShardSequence.apply(x, False)


def reduce_scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    """Partial sums [B, S, ...] of a row-parallel projection -> this rank's slice of their sum."""
    return _ShardSequence.apply(x, True)


def check_sequence_divisible(seq_len: int) -> None:
    _, size, _ = _tp()
    if seq_len % size:
        raise ValueError(f"sequence length {seq_len} is not divisible by parallel.tp={size}: sequence parallelism "
                         "splits it evenly over the TP ranks (set train.seq_len to a multiple of tp)")


def _sum_over_tp(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad


def reduce_replicated_grads(model: torch.nn.Module) -> None:
    """Under sequence parallelism, sum the gradient of every parameter not split over TP over the TP
    ranks as it accumulates into .grad, so every engine sees the full gradient, identical on all TP
    ranks. No-op otherwise.

    The sum runs where backward accumulates (a pre-hook of the parameter's AccumulateGrad node), not
    wherever a gradient for the parameter is computed (Tensor.register_hook): torch.autograd.grad
    inside a forward pass (dsmtp.model.mtp's one-head-at-a-time backward) must not sum too, or a
    gradient it hands back to backward would be summed twice."""
    if not sequence_parallel():
        return
    for p in model.parameters():
        if p.requires_grad and not getattr(p, "tensor_model_parallel", False):
            accumulate = p.view_as(p).grad_fn.next_functions[0][0]
            accumulate.register_prehook(lambda grads: (_sum_over_tp(grads[0]),))
            p.accumulate_grad_node = accumulate  # autograd keeps the node only while a graph refers to it


@torch.no_grad()
def sum_counts_over_sequence_shards_(tensors: list[torch.Tensor]) -> None:
    """Token counts (router loads) taken on sequence shards -> counts of the whole sequence."""
    if not sequence_parallel() or not tensors:
        return
    flat.all_reduce_(tensors, parallel_state.get_tensor_model_parallel_group(), dtype=torch.float64)
