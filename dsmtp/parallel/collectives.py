"""Collectives the training loop needs over the data-parallel group (and the whole job).

Each is a no-op in a single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from dsmtp.model import moe_layers
from dsmtp.parallel import flat
from dsmtp.parallel.sequence import sum_counts_over_sequence_shards_
from dsmtp.parallel.topology import device


def dp_group() -> Optional[dist.ProcessGroup]:
    """The data-parallel group (ranks that see different samples of the same step)."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    return parallel_state.get_data_parallel_group()


def dp_size() -> int:
    group = dp_group()
    return 1 if group is None else dist.get_world_size(group)


def dp_rank() -> int:
    group = dp_group()
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor in place over the data-parallel group, in one flat message."""
    tensors = list(tensors)
    group = dp_group()
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return
    flat.all_reduce_(tensors, group, dtype=torch.float64)  # float64: exact token counts


def reduce_expert_loads(model: torch.nn.Module) -> None:
    """Sum every MoE layer's `tokens_per_expert` over the data-parallel group, so the router bias
    update sees the load of the global batch rather than this rank's share (and, under sequence
    parallelism, of the whole sequence rather than this TP rank's shard)."""
    loads = [moe.tokens_per_expert for moe in moe_layers(model)]
    sum_counts_over_sequence_shards_(loads)
    all_reduce_sum_(loads)


def any_rank(flag: bool) -> bool:
    """True on every rank of the job when `flag` is true on any (e.g. a non-finite loss on one data-parallel
    rank or pipeline stage), so all ranks skip a step together."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())  # NCCL reduces CUDA tensors only
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
