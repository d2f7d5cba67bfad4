"""The engine contract: what the trainer (dsmtp.train.distributed) and the distributed tests call on the
engine that trains this rank's part of the model, and what the engines share.

Two engines implement it: `dsmtp.parallel.native_engine.NativeEngine` (every layout: TP, PP with 1F1B, EP,
DP with ZeRO-0/1/2) and `dsmtp.parallel.deepspeed_engine.DeepSpeedEngine` (DeepSpeed's ZeRO-1/2 for layouts
without PP). `dsmtp.parallel.rank.build_engine` picks one from `parallel.engine`. A new engine subclasses
`TrainEngine`, implements its abstract methods, and must pass tests/distributed/test_equivalence.py's
comparison with one process.

One optimizer step, as the trainer drives it:

    outputs = engine.forward_backward(micro_batches, mtp_weight)    # this rank's samples of each micro-batch
    engine.share_from_last_stage([...loss sums...])                 # statistics only the last stage computed
    grad_norm, applied = engine.apply_gradients(lr, max_norm, finite_loss)
    # then the router-bias update from the global batch's expert loads (dsmtp.parallel.collectives)

plus `evaluate` (forward only), `over_stages` (per-stage statistics over the pipeline) and, for
checkpoints (dsmtp.checkpoint), `state_to_save` / `state_to_load`: every tensor this rank holds, as a chunk
of the full tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from dsmtp.checkpoint import Chunk, State
from dsmtp.config import Config
from dsmtp.model import DeepSeekV3, ModelOutput
from dsmtp.model.mtp import split_sample
from dsmtp.parallel.expert import is_expert_param
from dsmtp.parallel.pipeline import MicroBatch
from dsmtp.parallel.topology import Layout


# Builds the optimizer over the (name, parameter) pairs whose state this rank keeps.
OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_model_parallel", False)


class TrainEngine(ABC):
    """One rank's engine over its part of the model; subclasses set model, cfg, layout, device, optimizer."""

    model: DeepSeekV3
    cfg: Config
    layout: Layout
    device: torch.device
    optimizer: torch.optim.Optimizer

    @abstractmethod
    def forward_backward(self, micro_batches: list[torch.Tensor], mtp_weight: float) -> list[ModelOutput]:
        """Forward and backward over this rank's micro-batches (each [b, seq_len + 1 + extra] tokens),
        gradients accumulated as the mean over micro-batches. Returns each micro-batch's ModelOutput on the
        last pipeline stage (with every stage's aux loss in `aux_loss`), nothing on the other stages."""

    @abstractmethod
    def evaluate(self, micro_batches: list[torch.Tensor], mtp_weight: float) -> list[ModelOutput]:
        """Forward only, in eval mode; outputs on the last stage as in `forward_backward`."""

    @abstractmethod
    def apply_gradients(self, lr: float, max_norm: float, finite_loss: bool) -> tuple[float, bool]:
        """Reduce the accumulated gradients, clip them to the global norm `max_norm` and step at learning
        rate `lr`, unless the loss (on any rank) or the gradients are not finite; gradients are cleared
        either way. Returns (norm before clipping, whether the update was applied), the same on every rank."""

    @abstractmethod
    def share_from_last_stage(self, tensors: list[torch.Tensor]) -> None:
        """Statistics only the last stage computed (zeros elsewhere) -> every stage of the pipeline."""

    @abstractmethod
    def over_stages(self, sums: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
        """Per-stage statistics summed / maximised over the pipeline (identity without PP)."""

    @abstractmethod
    def state_to_save(self) -> State:
        """Every tensor this rank holds (parameters, buffers, optimizer state) as chunks of the full tensors."""

    @abstractmethod
    def state_to_load(self, with_optimizer: bool) -> State:
        """Where a checkpoint's chunks go, in place (the optimizer state created first when asked for)."""

    # ------------------------------------------------------------------------------------------
    # Shared by the engines.

    def _micro_batches(self, micro_batches: list[torch.Tensor]) -> list[MicroBatch]:
        return [MicroBatch(*split_sample(mb, self.cfg.train.seq_len)) for mb in micro_batches]

    def _split(self, tensor: torch.Tensor) -> tuple[int, int, int]:
        """(dim, index, parts) of a local parameter within its full tensor."""
        lay = self.layout
        if is_tensor_parallel(tensor):
            return tensor.partition_dim, lay.tp_rank, lay.tp
        if is_expert_param(tensor):
            return 0, lay.ep_rank, lay.ep
        return 0, 0, 1

    def _chunk(self, tensor: torch.Tensor, param: torch.Tensor) -> Chunk:
        """`tensor` (this rank's `param`, or state shaped like it) as a chunk of the full tensor."""
        dim, index, parts = self._split(param)
        offsets, shape = [0] * tensor.dim(), list(tensor.shape)
        if parts > 1:
            offsets[dim], shape[dim] = index * tensor.shape[dim], tensor.shape[dim] * parts
        return Chunk(tensor, tuple(offsets), tuple(shape))
