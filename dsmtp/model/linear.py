"""Tensor-parallel linear and embedding layers from megatron-core, with plain-module call signatures.

Which slice a rank holds is decided by the process groups (dsmtp.parallel.topology); with one
process these are ordinary layers. Megatron's layers return (output, bias); ours return output.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from dsmtp.model import fp8
from dsmtp.parallel.sequence import reduce_scatter_sequence, sequence_parallel
from dsmtp.parallel.topology import tp_group

_MEGATRON_CONFIG = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)


def normal_init(std: float):
    return partial(nn.init.normal_, mean=0.0, std=std)


class _NoExtraState:
    # megatron's layers add an always-empty `_extra_state` entry to state dicts; drop it.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


class LocalGemm:  # mixin of the linear layers below
    """The GEMM of a linear layer that is not split over tensor-parallel ranks: FP8 on CUDA once
    DeepSeekV3.enable_fp8 marks the layer, else a plain F.linear (megatron's autograd function adds
    nothing on one rank and hides the layer from torch.compile). Split layers keep megatron's forward,
    in bf16: FP8 with tensor parallelism is not built."""

    fp8: str | None = None  # None | "torch" | "te"

    def local_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output, or None when megatron's own (tensor-parallel) forward must run."""
        if not self.unsplit:
            return None
        if self.fp8 == "torch" and x.is_cuda:
            return fp8.linear(x, self.weight)
        if self.fp8 == "te" and x.is_cuda:
            return fp8.te_linear(self, x)
        return F.linear(x, self.weight)


class ColumnParallelLinear(LocalGemm, _NoExtraState, tensor_parallel.ColumnParallelLinear):
    """y = x W^T with W's output rows split across tensor-parallel ranks (output stays split)."""

    def __init__(self, in_features: int, out_features: int, init_std: float):
        super().__init__(in_features, out_features, config=_MEGATRON_CONFIG, init_method=normal_init(init_std),
                         bias=False, gather_output=False, tp_group=tp_group())
        self.unsplit = tp_group().size() == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if sequence_parallel():
            # x was gathered by dsmtp.parallel.sequence.gather_sequence, whose backward sums the
            # TP-partial input gradients: megatron's own all-reduce of them must not run too.
            return F.linear(x, self.weight)
        out = self.local_linear(x)
        return super().forward(x)[0] if out is None else out


class RowParallelLinear(LocalGemm, _NoExtraState, tensor_parallel.RowParallelLinear):
    """y = x W^T with W's input columns split across ranks; partial outputs are summed."""

    def __init__(self, in_features: int, out_features: int, init_std: float):
        super().__init__(in_features, out_features, config=_MEGATRON_CONFIG, init_method=normal_init(init_std),
                         bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group())
        self.unsplit = tp_group().size() == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if sequence_parallel():  # partial outputs reduce-scattered over the sequence, not all-reduced
            return reduce_scatter_sequence(F.linear(x, self.weight))
        out = self.local_linear(x)
        return super().forward(x)[0] if out is None else out


class VocabParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    """Token embedding with the vocabulary split across tensor-parallel ranks."""

    def __init__(self, vocab_size: int, dim: int, init_std: float):
        super().__init__(vocab_size, dim, config=_MEGATRON_CONFIG, init_method=normal_init(init_std),
                         tp_group=tp_group())


class ReplicatedLinear(LocalGemm, nn.Linear):
    """A linear layer every tensor-parallel rank holds whole (small latent projections)."""

    unsplit = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_linear(x)


def replicated_linear(in_features: int, out_features: int, init_std: float) -> nn.Linear:
    """A linear layer every tensor-parallel rank holds whole (small latent projections)."""
    layer = ReplicatedLinear(in_features, out_features, bias=False)
    nn.init.normal_(layer.weight, std=init_std)
    return layer
