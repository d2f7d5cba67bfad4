from __future__ import annotations

import torch
from torch import nn

from dsmtp.model.linear import ColumnParallelLinear, RowParallelLinear
from dsmtp.parallel.sequence import gather_sequence


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and shared experts), split over tensor-parallel ranks."""

    def __init__(self, dim: int, inter_dim: int, init_std: float):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, inter_dim, init_std)  # gate
        self.w3 = ColumnParallelLinear(dim, inter_dim, init_std)  # up
        self.w2 = RowParallelLinear(inter_dim, dim, init_std)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_sequence(x)  # a sequence shard under sequence parallelism; w2 scatters it back
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))
