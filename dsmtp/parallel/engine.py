"""The distributed training step: micro-batches (1F1B across pipeline stages), gradient reduction over
the right group for each parameter, ZeRO-1/2 sharded optimizer, global-norm clipping, router loads.

Gradient groups (all means over the global batch, i.e. sums divided by the DP size):
  - routed-expert parameters under EP: summed over the expert-data-parallel group (the replicas that
    hold the same experts). The all-to-all already brought every EP rank's tokens to them.
  - every other parameter: summed over the data-parallel group.
  - the embedding under PP: then also summed over the embedding group (first and last stage).
  Replicated parameters under TP (norms, wq_a, wkv_a, router, eh_proj, experts) need no TP reduction:
  every TP rank sees the same activations and, with megatron's layers and
  `dsmtp.parallel.tensor.shared_by_local_heads`, the same full gradients. Under sequence parallelism
  each TP rank sees a shard of the sequence instead, and `dsmtp.parallel.tensor.reduce_replicated_grads`
  sums those gradients over TP as they are produced.

ZeRO: within each reduction group every parameter has one owner rank (greedy by size). Stage 1: grads
are all-reduced, only the owner keeps optimizer state and steps; owners broadcast the new values.
Stage 2: grads are reduced to the owner only (others drop theirs). Stage 0: all-reduce, every rank
steps. Clipping uses the norm of the whole model with each distinct gradient counted once:
by its owner, on TP rank 0 unless it is TP-split, and not for the last stage's embedding copy.

This engine runs pipeline-parallel layouts (parallel.engine=auto picks it when pp > 1, or `native` for
any layout); DeepSpeed (dsmtp.parallel.deepspeed_engine) runs the others. Why not DeepSpeed with PP:
ZeRO-2/3 refuse its pipeline engine, and its pipeline engine cannot carry the MTP inputs and per-stage
aux losses (see pipeline.py). Its ZeRO optimizer treats parameters as experts only when the model holds
one of DeepSpeed's own MoE modules; deepspeed_engine.py arranges that for our experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from dsmtp.checkpoint import State, module_state
from dsmtp.config import Config
from dsmtp.model import DeepSeekV3, ModelOutput
from dsmtp.parallel import flat
from dsmtp.parallel.engine_common import EngineBase, StepStats, is_tensor_parallel
from dsmtp.parallel.expert import is_expert_param, shard_experts
from dsmtp.parallel.pipeline import PipelineSchedule, is_tied_copy, prune_to_stage
from dsmtp.parallel.tensor import reduce_replicated_grads
from dsmtp.parallel.topology import Layout

OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]


def build_model(cfg: Config, layout: Layout, seed: int) -> tuple[DeepSeekV3, range]:
    """This rank's part of the model. Every rank draws the same full initialisation as one process
    (megatron's CPU init draws the full matrix, then slices), then keeps its TP slice, its experts and
    its stage. Returns the model and the stage's layer indices."""
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg.model)
    layers = prune_to_stage(model, layout)
    if layout.ep > 1:
        shard_experts(model, layout.ep_rank, layout.ep, layout.ep_group)
    reduce_replicated_grads(model)  # sequence parallelism only
    return model, layers


@dataclass
class _Group:
    """Parameters reduced and sharded over one process group."""

    group: dist.ProcessGroup
    names: list[str]
    params: list[nn.Parameter]
    owners: list[int]  # group rank that owns each parameter's optimizer state

    @property
    def ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.group)


def _assign_owners(params: list[nn.Parameter], group_size: int) -> list[int]:
    load = [0] * group_size
    owners = []
    for p in params:
        owner = min(range(group_size), key=lambda r: (load[r], r))
        load[owner] += p.numel()
        owners.append(owner)
    return owners


class Engine(EngineBase):
    def __init__(self, model: DeepSeekV3, layers: range, cfg: Config, layout: Layout,
                 make_optimizer: OptimizerFactory):
        self.model, self.cfg, self.layout = model, cfg, layout
        self.device = next(model.parameters()).device
        self.zero_stage = cfg.parallel.zero_stage
        self.schedule = PipelineSchedule(model, layout, layers, cfg.model.hidden_size) if layout.pp > 1 else None
        named = sorted((n, p) for n, p in model.named_parameters())
        self.groups: list[_Group] = []
        for is_expert, group in ((False, layout.dp_group), (True, layout.edp_group)):
            chosen = [(n, p) for n, p in named if is_expert_param(p) == is_expert]
            if chosen:
                size = dist.get_world_size(group)
                params = [p for _, p in chosen]
                owners = _assign_owners(params, size) if self.zero_stage > 0 else [-1] * len(params)
                self.groups.append(_Group(group, [n for n, _ in chosen], params, owners))
        mine = [(n, p) for g in self.groups for n, p, o in zip(g.names, g.params, g.owners)
                if o in (-1, dist.get_rank(g.group))]
        self.optimizer = make_optimizer(mine)

    # ------------------------------------------------------------------------------------------
    # One optimizer step, in the pieces the trainer calls (train_step strings them together).

    def forward_backward(self, micro_batches: list[torch.Tensor], mtp_weight: float) -> list[ModelOutput]:
        """Forward and backward over this rank's micro-batches (each [b, S + D + 1] tokens), gradients
        accumulated as the mean over micro-batches. Returns each micro-batch's ModelOutput on the last
        pipeline stage (with every stage's aux loss in `aux_loss`), nothing on the other stages."""
        self.model.train()
        split = self._split_batches(micro_batches)
        if self.schedule is None:
            outputs = []
            for mb in split:
                out = self.model(mb.input_ids, mb.labels, mtp_weight=mtp_weight)
                (out.loss / len(split)).backward()
                outputs.append(out)
            return outputs
        outputs, stage_aux = [], []
        self.schedule.run(split, mtp_weight, outputs.append, stage_aux.append)
        return self._with_all_stages_aux(outputs, stage_aux, len(split))

    @torch.no_grad()
    def evaluate(self, micro_batches: list[torch.Tensor], mtp_weight: float) -> list[ModelOutput]:
        """Forward only, in eval mode; outputs on the last stage as in `forward_backward`."""
        self.model.eval()
        split = self._split_batches(micro_batches)
        try:
            if self.schedule is None:
                return [self.model(mb.input_ids, mb.labels, mtp_weight=mtp_weight) for mb in split]
            outputs, stage_aux = [], []
            for mb in split:
                self.schedule.forward_only(mb, mtp_weight, outputs.append, stage_aux.append)
            return self._with_all_stages_aux(outputs, stage_aux, len(split))
        finally:
            self.model.train()

    def reduce_and_clip(self, max_norm: float) -> float:
        """Reduce the accumulated gradients over their groups and clip them to the global norm
        (max_norm <= 0: no clipping). Returns the norm before clipping, the same on every rank."""
        self._reduce_gradients()
        return self._clip(max_norm)

    def step(self, lr: float | None = None) -> None:
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        self._share_updated_params()

    def apply_gradients(self, lr: float, max_norm: float, finite_loss: bool) -> tuple[float, bool]:
        """reduce_and_clip, then step unless the loss (on any rank) or the norm is not finite; gradients
        are cleared either way. Returns (norm before clipping, whether the update was applied)."""
        grad_norm = self.reduce_and_clip(max_norm)
        applied = not self.any_rank(not (finite_loss and math.isfinite(grad_norm)))
        if applied:
            self.step(lr)
        self.zero_grad()
        return grad_norm, applied

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def train_step(self, micro_batches: list[torch.Tensor], mtp_weight: float, grad_clip: float) -> StepStats:
        """forward_backward, reduce_and_clip, step: losses averaged over micro-batches and the DP batch."""
        outputs = self.forward_backward(micro_batches, mtp_weight)
        stats = self._loss_stats(outputs, len(micro_batches))
        stats.grad_norm = self.reduce_and_clip(grad_clip)
        self.step()
        self.zero_grad()
        return stats

    def _with_all_stages_aux(self, outputs: list[ModelOutput], stage_aux: list[torch.Tensor],
                             n: int) -> list[ModelOutput]:
        """Add the earlier stages' aux losses (for logging) to the last stage's outputs."""
        aux = torch.stack(stage_aux).double() if stage_aux else torch.zeros(n, dtype=torch.float64, device=self.device)
        dist.all_reduce(aux, group=self.layout.pp_group)
        return [replace(out, aux_loss=out.aux_loss + a.to(out.aux_loss.dtype)) for out, a in zip(outputs, aux)]

    def share_from_last_stage(self, tensors: list[torch.Tensor]) -> None:
        """Statistics only the last stage computed (zeros elsewhere) -> every stage of the pipeline."""
        if self.layout.pp > 1:
            for t in tensors:
                _all_reduce_via(t, self.device, self.layout.pp_group)

    def over_stages(self, sums: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
        """Per-stage statistics summed / maximised over the pipeline (identity without PP)."""
        if self.layout.pp == 1:
            return sums, maxima
        s = torch.tensor(sums, dtype=torch.float64, device=self.device)
        m = torch.tensor(maxima, dtype=torch.float64, device=self.device)
        dist.all_reduce(s, group=self.layout.pp_group)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.layout.pp_group)
        return s.tolist(), m.tolist()

    # ------------------------------------------------------------------------------------------
    # Checkpoints (dsmtp.checkpoint): every tensor this rank holds, as a chunk of the full tensor. Replicas
    # (over DP, over TP for replicated tensors, the last stage's embedding copy) are offered by every holder
    # and written by one; the optimizer state is where ZeRO put it, on its owner.

    def state_to_save(self) -> State:
        return module_state(self.model, self.optimizer, self._chunk)

    def state_to_load(self, with_optimizer: bool) -> State:
        return module_state(self.model, self.optimizer if with_optimizer else None, self._chunk, create=True)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _reduce_gradients(self) -> None:
        for g in self.groups:
            for p in g.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.div_(self.layout.dp)
            if dist.get_world_size(g.group) == 1:
                continue
            if self.zero_stage == 2:
                ranks = g.ranks
                for owner in range(len(ranks)):
                    owned = [p for p, o in zip(g.params, g.owners) if o == owner]
                    flat.reduce_([p.grad for p in owned], ranks[owner], g.group)
                me = dist.get_rank(g.group)
                for p, o in zip(g.params, g.owners):
                    if o != me:
                        p.grad = None  # gradient partitioning: only the owner keeps it
            else:
                flat.all_reduce_([p.grad for p in g.params], g.group)
        if self.layout.embedding_group is not None and self.model.embed is not None:
            flat.all_reduce_([p.grad for p in self.model.embed.parameters()], self.layout.embedding_group)

    def _counted_grads(self) -> Iterable[torch.Tensor]:
        lay = self.layout
        for g in self.groups:
            me = dist.get_rank(g.group)
            for name, p, owner in zip(g.names, g.params, g.owners):
                if owner not in (-1, me) or (owner == -1 and me != 0):
                    continue
                if lay.tp_rank != 0 and not is_tensor_parallel(p):
                    continue
                if is_tied_copy(name, lay):
                    continue
                yield p.grad

    @torch.no_grad()
    def _clip(self, max_norm: float) -> float:
        """Clip to the global gradient norm, as torch.nn.utils.clip_grad_norm_ does on one process."""
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for grad in self._counted_grads():
            squares += grad.double().pow(2).sum()
        if self.layout.world_size > 1:
            dist.all_reduce(squares)
        norm = squares.sqrt().float()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in self.groups:
                for p in g.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return float(norm)

    @torch.no_grad()
    def _share_updated_params(self) -> None:
        if self.zero_stage == 0:
            return
        for g in self.groups:
            ranks = g.ranks
            if len(ranks) == 1:
                continue
            for owner in range(len(ranks)):
                owned = [p.data for p, o in zip(g.params, g.owners) if o == owner]
                flat.broadcast_(owned, ranks[owner], g.group)


def _all_reduce_via(t: torch.Tensor, device: torch.device, group) -> None:
    """All-reduce a host tensor through the communication device (NCCL reduces CUDA tensors only)."""
    on_device = t.to(device)
    dist.all_reduce(on_device, group=group)
    t.copy_(on_device.to(t.device))
