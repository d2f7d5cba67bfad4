from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmtp.model import kernels
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
        if self.split_gemms():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(kernels.swiglu_activation(F.linear(x, torch.cat([self.w1.weight, self.w3.weight]))))

    def split_gemms(self) -> bool:
        """Gate and up as two GEMMs where each layer runs its own (split over TP ranks, or FP8) and without
        gradients (decoding reads each weight once; concatenating them would copy both every step). Else,
        training on one rank: one GEMM over both weights, twice as wide for the same input, and in backward
        one input-gradient GEMM (not two and their sum) and one weight-gradient GEMM."""
        return (not torch.is_grad_enabled() or not self.w1.unsplit
                or self.w1.fp8 is not None or self.w3.fp8 is not None)
