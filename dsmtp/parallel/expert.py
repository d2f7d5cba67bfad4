"""Expert parallelism: each EP rank holds n_routed_experts / ep of the routed experts, and tokens travel
to the rank that owns their expert and back with two all-to-alls over the EP group.

The router, the shared experts and everything else stay replicated; only `RoutedExperts` is sharded.
Expert gradients are reduced over the expert-data-parallel group by the engine (dsmtp.parallel.native_engine,
dsmtp.parallel.deepspeed_engine).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from dsmtp.model.moe import (RoutedExperts, combine_pairs, compute_dtype, gather_pairs, moe_layers,
                             sort_pairs_by_expert)

EXPERT_ATTR = "dsmtp_expert"  # set on sharded routed-expert parameters


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, EXPERT_ATTR, False)


@torch.no_grad()
def shard_experts(model: nn.Module, ep_rank: int, ep_size: int, ep_group: dist.ProcessGroup) -> None:
    """Keep this rank's contiguous slice of every MoE layer's experts and swap in the all-to-all
    dispatch. Expert e lives on EP rank e // (E / ep)."""
    for moe in moe_layers(model):
        experts = moe.experts
        local = experts.num_experts // ep_size
        for name in ("w13", "w2"):
            full = getattr(experts, name)
            shard = nn.Parameter(full[ep_rank * local:(ep_rank + 1) * local].clone())
            setattr(shard, EXPERT_ATTR, True)
            setattr(experts, name, shard)
        moe.dispatch = partial(dispatch_all_to_all, group=ep_group)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with explicit split sizes; the gradient goes back along the reversed splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def dispatch_all_to_all(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, experts: RoutedExperts,
                        group: dist.ProcessGroup) -> torch.Tensor:
    """`MoE.dispatch` under expert parallelism; same contract and same summation order as
    `dispatch_local`.

    1. sort this rank's (token, expert) pairs by expert: the send buffer is grouped by owner rank;
    2. exchange per-expert counts, then the tokens (all-to-all);
    3. regroup the received tokens by local expert, run the local experts, undo the regrouping;
    4. send the outputs back (all-to-all) and sum the gated outputs per token.
    """
    ep = dist.get_world_size(group)
    local = experts.num_experts
    flat_ids = expert_ids.flatten()
    order, inverse = sort_pairs_by_expert(expert_ids)
    counts = torch.bincount(flat_ids, minlength=local * ep)  # [E] this rank's tokens per global expert
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)  # [ep_src * local]: per source, per local expert
    send_splits = counts.view(ep, local).sum(1).tolist()
    recv_matrix = recv_counts.view(ep, local)
    recv_splits = recv_matrix.sum(1).tolist()

    received = all_to_all(gather_pairs(compute_dtype(x), order, inverse), send_splits, recv_splits, group)
    local_expert = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(ep), recv_matrix.flatten())
    by_expert = local_expert.argsort(stable=True)
    y = experts(received[by_expert], recv_matrix.sum(0))
    y = torch.empty_like(y).index_copy(0, by_expert, y)  # back to arrival order (differentiable in y)
    y = all_to_all(y, recv_splits, send_splits, group)
    return combine_pairs(y, order, inverse, gates).to(x.dtype)
