"""Collectives over many tensors in one message: flatten them into one buffer, make one call, copy the
result back. One call instead of one per tensor is what makes gradient and counter syncs cheap."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist


def _one_message(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], object],
                 dtype: Optional[torch.dtype], write_back: bool = True) -> None:
    if not tensors:
        return
    dtype = dtype or tensors[0].dtype
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    collective(flat)
    if write_back:
        for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(chunk.view_as(t))


def all_reduce_(tensors: list[torch.Tensor], group, dtype: Optional[torch.dtype] = None) -> None:
    """Sum each tensor in place over `group`; `dtype` for the message (e.g. float64 for exact counts)."""
    _one_message(tensors, lambda flat: dist.all_reduce(flat, group=group), dtype)


def reduce_(tensors: list[torch.Tensor], dst: int, group) -> None:
    """Sum each tensor over `group` into global rank `dst` (the others keep theirs)."""
    _one_message(tensors, lambda flat: dist.reduce(flat, dst=dst, group=group), None,
                 write_back=dist.get_rank() == dst)


def broadcast_(tensors: list[torch.Tensor], src: int, group) -> None:
    """Every rank of `group` gets global rank `src`'s values."""
    _one_message(tensors, lambda flat: dist.broadcast(flat, src=src, group=group), None)
