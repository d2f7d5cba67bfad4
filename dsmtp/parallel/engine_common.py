"""What the native engine (dsmtp.parallel.engine) and the DeepSpeed engine (dsmtp.parallel.deepspeed_engine)
share: the trainer-facing collectives, the router-bias update, loss statistics, and where this rank's
slice of each tensor sits in the full tensor (what its checkpoint chunks are, dsmtp.checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsmtp.checkpoint import Chunk
from dsmtp.config import Config
from dsmtp.model import DeepSeekV3, ModelOutput, update_expert_bias
from dsmtp.parallel import collectives
from dsmtp.parallel.expert import is_expert_param
from dsmtp.parallel.pipeline import MicroBatch
from dsmtp.parallel.topology import Layout


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_model_parallel", False)


@dataclass
class StepStats:
    main_loss: float
    mtp_losses: list[float]
    aux_loss: float
    grad_norm: float


class EngineBase:
    """One rank's engine over its part of the model; subclasses set model, cfg, layout and device."""

    model: DeepSeekV3
    cfg: Config
    layout: Layout
    device: torch.device

    def _split_batches(self, micro_batches: list[torch.Tensor]) -> list[MicroBatch]:
        seq_len = micro_batches[0].shape[1] - self.cfg.model.mtp_depth - 1
        return [MicroBatch(mb[:, :seq_len], mb[:, 1:]) for mb in micro_batches]

    def _loss_stats(self, outputs: list[ModelOutput], n: int) -> StepStats:
        """[main, mtp_1..D, aux] from the last stage, averaged over micro-batches and DP ranks, on every rank."""
        depth = self.cfg.model.mtp_depth
        vec = torch.zeros(2 + depth, dtype=torch.float64, device=self.device)
        for out in outputs:
            vec[0] += out.main_loss.double()
            vec[1:1 + depth] += out.mtp_losses.double()
            vec[1 + depth] += out.aux_loss.double()
        vec /= n * self.layout.dp
        if self.layout.pp > 1:
            dist.all_reduce(vec, group=self.layout.pp_group)
        if self.layout.dp > 1:
            dist.all_reduce(vec, group=self.layout.dp_group)
        values = vec.tolist()
        return StepStats(values[0], values[1:1 + depth], values[1 + depth], 0.0)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (e.g. a non-finite loss: all skip the step)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        if self.layout.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    @torch.no_grad()
    def update_expert_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing with the loads of the global batch (every MoE layer, MTP included)."""
        collectives.reduce_expert_loads(self.model)
        update_expert_bias(self.model, gamma)

    # ------------------------------------------------------------------------------------------
    # Checkpoints: where this rank's slice of a tensor sits in the full tensor.

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
