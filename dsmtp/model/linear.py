"""Tensor-parallel linear and embedding layers from megatron-core, with plain-module call signatures.

Which slice a rank holds is decided by the process groups (dsmtp.parallel.topology); with one
process these are ordinary layers. Megatron's layers return (output, bias); ours return output.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from dsmtp.parallel.topology import tp_group

_MEGATRON_CONFIG = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)


def normal_init(std: float):
    return partial(nn.init.normal_, mean=0.0, std=std)


class _NoExtraState:
    # megatron's layers add an always-empty `_extra_state` entry to state dicts; drop it.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


class ColumnParallelLinear(_NoExtraState, tensor_parallel.ColumnParallelLinear):
    """y = x W^T with W's output rows split across tensor-parallel ranks (output stays split)."""

    def __init__(self, in_features: int, out_features: int, init_std: float):
        super().__init__(in_features, out_features, config=_MEGATRON_CONFIG, init_method=normal_init(init_std),
                         bias=False, gather_output=False, tp_group=tp_group())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowParallelLinear(_NoExtraState, tensor_parallel.RowParallelLinear):
    """y = x W^T with W's input columns split across ranks; partial outputs are summed."""

    def __init__(self, in_features: int, out_features: int, init_std: float):
        super().__init__(in_features, out_features, config=_MEGATRON_CONFIG, init_method=normal_init(init_std),
                         bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class VocabParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    """Token embedding with the vocabulary split across tensor-parallel ranks."""

    def __init__(self, vocab_size: int, dim: int, init_std: float):
        super().__init__(vocab_size, dim, config=_MEGATRON_CONFIG, init_method=normal_init(init_std),
                         tp_group=tp_group())


def replicated_linear(in_features: int, out_features: int, init_std: float) -> nn.Linear:
    """A linear layer every tensor-parallel rank holds whole (small latent projections)."""
    layer = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(layer.weight, std=init_std)
    return layer
