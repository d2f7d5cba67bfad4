"""DeepSpeed as the training engine of layouts without pipeline parallelism (DP with ZeRO-1/2, with TP
and EP), behind the same methods the trainer calls on the native `dsmtp.parallel.engine.Engine`.

DeepSpeed's ZeRO optimizer does the gradient reduction, partitioning, clipping and the optimizer
step; dsmtp keeps the model, the process groups, the router-bias update and the checkpoint layout.
Three things DeepSpeed would get wrong on its own are set up explicitly here:

  - Groups: DeepSpeed reads the data-parallel and tensor-parallel groups from an `mpu`; we pass
    `MegatronMPU`, which answers from megatron's `parallel_state` (our topology), so its ZeRO
    partitions are our DP group and clipping counts a replicated (non TP-split) gradient on TP rank 0
    only.
  - Experts: DeepSpeed treats a parameter as an expert (reduced over the expert-data-parallel group,
    not the whole DP group) only when `param.allreduce` is False, its `param.group_name` names an
    entry of `deepspeed.utils.groups`' expert groups, it sits in an optimizer group marked
    `moe: True`, and the engine found one of DeepSpeed's own `MoE` modules in the model. We mark our
    routed-expert parameters, register megatron's EP / expert-DP groups under that name after
    checking them against the ranks DeepSpeed's own helper would choose, and give the engine
    `_ExpertGroups`, an empty `MoE` subclass whose only job is to switch DeepSpeed's MoE handling on.
  - Scaling: ZeRO divides every gradient bucket (experts included) by the DP size, then sums expert
    gradients over the expert-DP group. Each EP rank's expert already holds the gradient of the tokens
    of its whole EP group (the all-to-all brought them), so sum over expert-DP / DP size is the mean
    over the global batch, as one process computes it: no correction is needed (checked by
    tests/distributed/test_deepspeed.py against one process). Without the marking, DeepSpeed averages
    expert gradients over the whole DP group, mixing different experts: at EP=2 x DP=4 the first
    gradient norm came out 2.371 instead of 2.441 and the losses drifted by 3e-3 from the second step.

Without EP, routed experts are ordinary replicated parameters and DeepSpeed's MoE path stays off.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from dsmtp.checkpoint import MODEL, OPTIM, Chunk, State, flat_range_boxes, whole
from dsmtp.config import Config
from dsmtp.model import DeepSeekV3, ModelOutput
from dsmtp.parallel.engine_common import EngineBase, StepStats
from dsmtp.parallel.expert import is_expert_param
from dsmtp.parallel.topology import Layout

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
import deepspeed  # noqa: E402  (after DS_ACCELERATOR: DeepSpeed picks its accelerator at import)
from deepspeed.moe.layer import MoE as _DeepSpeedMoE  # noqa: E402
from deepspeed.utils import groups as ds_groups  # noqa: E402
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state  # noqa: E402

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class MegatronMPU:
    """The `mpu` DeepSpeed asks for its groups: megatron's parallel_state (without PP, the model-parallel
    group is the TP group)."""

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_model_parallel_group(self):
        return parallel_state.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(parallel_state.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(parallel_state.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()


def expert_group_name(layout: Layout) -> str:
    return f"ep_size_{layout.ep}"  # DeepSpeed's own naming (deepspeed.utils.groups)


def register_expert_groups(layout: Layout) -> None:
    """Put megatron's EP and expert-DP groups into DeepSpeed's group registry, after checking that they
    are the groups DeepSpeed would build for this (TP, EP, DP) layout itself."""
    ds_ep, ds_edp = ds_groups._get_expert_parallel_ranks(layout.world_size, layout.tp, layout.ep, layout.pp)
    ours_ep = dist.get_process_group_ranks(layout.ep_group)
    ours_edp = dist.get_process_group_ranks(layout.edp_group)
    expected_ep = next(list(r) for r in ds_ep if layout.rank in r)
    expected_edp = next(list(r) for r in ds_edp if layout.rank in r)
    if (ours_ep, ours_edp) != (expected_ep, expected_edp):
        raise RuntimeError(f"expert groups differ from DeepSpeed's layout ({layout.describe()}): "
                           f"megatron EP {ours_ep}, "
                           f"expert-DP {ours_edp}; DeepSpeed EP {expected_ep}, expert-DP {expected_edp}")
    name = expert_group_name(layout)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = layout.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ours_ep
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = layout.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = ours_edp


class _ExpertGroups(_DeepSpeedMoE):
    """Switches DeepSpeed's MoE handling on for our own MoE layers (DeepSpeed looks for an instance of
    its `MoE` class). Holds nothing and never runs; the groups are registered beforehand."""

    def __init__(self, num_experts: int, ep_size: int, group_name: str):
        nn.Module.__init__(self)  # not MoE.__init__: it would build DeepSpeed's own experts and gate
        self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if self.expert_group_name not in ds_groups._get_expert_data_parallel_group_dict():
            raise RuntimeError(f"expert group {self.expert_group_name} was not registered")

    def forward(self, *args, **kwargs):
        raise RuntimeError("_ExpertGroups only marks the model as MoE for DeepSpeed")


class _Wrapped(nn.Module):
    """What DeepSpeed sees: our model, plus the MoE marker under expert parallelism."""

    def __init__(self, model: DeepSeekV3, expert_groups: _ExpertGroups | None):
        super().__init__()
        self.model = model
        self.expert_groups = expert_groups

    def forward(self, input_ids, labels, mtp_weight: float) -> ModelOutput:
        return self.model(input_ids, labels, mtp_weight=mtp_weight)


def deepspeed_config(cfg: Config, layout: Layout, device: torch.device) -> dict:
    t = cfg.train
    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size // layout.dp,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # check_grad_overflow: skip the update on non-finite gradients in bf16 too (fp32 always checks).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 2**62,  # our trainer logs
        "wall_clock_breakdown": False,
    }


def _split_expert_groups(optimizer: torch.optim.Optimizer, group_name: str) -> None:
    """Move routed-expert parameters into optimizer groups of their own, marked as DeepSpeed expects."""
    groups = []
    for group in optimizer.param_groups:
        experts = [p for p in group["params"] if is_expert_param(p)]
        others = [p for p in group["params"] if not is_expert_param(p)]
        groups.append({**group, "params": others})
        if experts:
            groups.append({**group, "params": experts, "moe": True, "name": group_name})
    optimizer.param_groups[:] = groups


class DeepSpeedEngine(EngineBase):
    """One rank's DeepSpeed engine over this rank's part of the model (TP slice, EP experts)."""

    def __init__(self, model: DeepSeekV3, cfg: Config, layout: Layout, optimizer: torch.optim.Optimizer):
        if layout.pp > 1:
            raise ValueError("DeepSpeedEngine runs layouts without pipeline parallelism (parallel.pp=1)")
        self.model, self.cfg, self.layout = model, cfg, layout
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            # DeepSpeed's shared-memory all-reduce serves only its inference kernels; building it is a
            # C++ JIT compile of about a minute at a machine's first start. The registry is meant to be
            # edited (deepspeed/ops/__init__.py).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Joins the torch.distributed world that topology.init_distributed created (gloo or NCCL).
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        marker = None
        if layout.ep > 1:
            register_expert_groups(layout)
            name = expert_group_name(layout)
            for p in model.parameters():
                if is_expert_param(p):
                    p.allreduce, p.group_name = False, name
            _split_expert_groups(optimizer, name)
            marker = _ExpertGroups(cfg.model.n_routed_experts, layout.ep, name)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_Wrapped(model, marker), optimizer=optimizer, mpu=MegatronMPU(),
            config=deepspeed_config(cfg, layout, self.device))
        self._check_groups()

    def _check_groups(self) -> None:
        """The groups DeepSpeed ended up with are ours."""
        ranks = dist.get_process_group_ranks
        zero = self.optimizer
        want_dp = ranks(self.layout.dp_group)
        if ranks(self.engine.data_parallel_group) != want_dp or ranks(zero.dp_process_group) != want_dp:
            raise RuntimeError(f"DeepSpeed's data-parallel group differs from ours ({self.layout.describe()})")
        ours_tp = (self.layout.tp_rank, ranks(self.layout.tp_group))
        if (zero.model_parallel_rank, ranks(zero.model_parallel_group)) != ours_tp:
            raise RuntimeError(f"DeepSpeed's model-parallel rank/group {zero.model_parallel_rank} "
                               f"{ranks(zero.model_parallel_group)} differ from our TP rank/group "
                               f"({self.layout.describe()}): clipping would count gradients wrongly")
        for i, group in enumerate(zero.optimizer.param_groups):
            want = self.layout.edp_group if group.get("moe") else self.layout.dp_group
            if ranks(zero.real_dp_process_group[i]) != ranks(want):
                raise RuntimeError(f"DeepSpeed partitions optimizer group {i} over "
                                   f"{ranks(zero.real_dp_process_group[i])}, expected {ranks(want)}")

    # ------------------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[torch.Tensor], mtp_weight: float) -> list[ModelOutput]:
        """Forward and backward over this rank's micro-batches; DeepSpeed divides each loss by the
        number of accumulation steps and reduces the gradients after the last one. DeepSpeed counts
        micro-batches in `engine.step()`, called after every backward (a no-op but for the count until
        the last one): the last call is `step` below."""
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"{len(micro_batches)} micro-batches, DeepSpeed was set up for "
                             f"{self.engine.gradient_accumulation_steps()} (train.grad_accum)")
        self.engine.train()
        outputs = []
        for i, mb in enumerate(self._split_batches(micro_batches)):
            if i > 0:
                self.engine.step()
            out = self.engine(mb.input_ids, mb.labels, mtp_weight)
            self.engine.backward(out.loss)
            outputs.append(out)
        return outputs

    @torch.no_grad()
    def evaluate(self, micro_batches: list[torch.Tensor], mtp_weight: float) -> list[ModelOutput]:
        self.model.eval()
        try:
            return [self.model(mb.input_ids, mb.labels, mtp_weight=mtp_weight)
                    for mb in self._split_batches(micro_batches)]
        finally:
            self.model.train()

    def apply_gradients(self, lr: float, max_norm: float, finite_loss: bool) -> tuple[float, bool]:
        """Clip to the global norm and apply the accumulated gradients at learning rate `lr`. DeepSpeed
        skips the update when the gradients are not finite (a non-finite loss anywhere makes them so).
        Returns (norm before clipping, whether the update was applied)."""
        if max_norm != self.cfg.train.grad_clip:
            raise ValueError(f"DeepSpeed clips to train.grad_clip={self.cfg.train.grad_clip}, set at start-up")
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("apply_gradients() before forward_backward() of a whole optimizer step")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan"), self.engine.was_step_applied()

    def train_step(self, micro_batches: list[torch.Tensor], mtp_weight: float, grad_clip: float) -> StepStats:
        """forward_backward and apply_gradients: losses averaged over micro-batches and the DP batch."""
        outputs = self.forward_backward(micro_batches, mtp_weight)
        stats = self._loss_stats(outputs, len(micro_batches))
        stats.grad_norm, _ = self.apply_gradients(self.optimizer.param_groups[0]["lr"], grad_clip, True)
        return stats

    # The trainer's pipeline hooks: nothing to do without PP.
    def share_from_last_stage(self, tensors: list[torch.Tensor]) -> None:
        pass

    def over_stages(self, sums: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
        return sums, maxima

    # ------------------------------------------------------------------------------------------
    # Checkpoints (dsmtp.checkpoint): ZeRO keeps each DP rank's contiguous range of every group's flattened
    # fp32 master weights and Adam state; a parameter's share of that range (its fragment) is a flat range
    # of the parameter, which `flat_range_boxes` turns into chunks of the full tensor. Each rank saves
    # and loads only its fragments: nothing is gathered.

    def _trained(self) -> list[tuple[str, nn.Parameter]]:
        return sorted((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def _adam_state(self) -> list[dict]:
        """AdamW's state of ZeRO's flat partitions (empty before the first step)."""
        return [s for s in self.optimizer.optimizer.state.values() if "step" in s]

    def _fragment(self, param: nn.Parameter, key: str | None = None) -> list[Chunk]:
        """This rank's fragment of `param`'s fp32 master weights (or, with `key`, of its Adam state) as chunks
        of the full tensor."""
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return []
        fragment = mapping.get_hp_fragment(key)
        local = self._chunk(param, param)  # where this rank's TP / EP slice sits in the full tensor
        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        return [Chunk(fragment[at - start:at - start + math.prod(sizes)].view(sizes),
                      tuple(o + b for o, b in zip(local.offsets, offsets)), local.shape)
                for at, offsets, sizes in flat_range_boxes(tuple(param.shape), start, start + numel)]

    def _state(self, with_optimizer: bool) -> State:
        trained = dict(self._trained())
        state = {MODEL + name: self._fragment(trained[name]) if name in trained else [self._chunk(tensor, tensor)]
                 for name, tensor in self.model.state_dict().items()}
        if with_optimizer:
            self._link_optimizer_state()
            for name, p in trained.items():
                for key in ADAM_MOMENTS:
                    state[f"{OPTIM}{name}/{key}"] = self._fragment(p, key)
            state[OPTIM + "step"] = [whole(s["step"]) for s in self._adam_state()]
        return state

    def state_to_save(self) -> State:
        """This rank's fragments of the fp32 master weights (under bf16 the module holds bf16 copies) and of
        the Adam state, and the buffers (router biases)."""
        return self._state(with_optimizer=bool(self._adam_state()))

    @torch.no_grad()
    def state_to_load(self, with_optimizer: bool) -> State:
        """The fragments as in `state_to_save` (creating the Adam state first, as its first step would), and the
        module's own copy of every parameter (bf16 under bf16), which ZeRO-1/2 keeps whole on every DP rank."""
        if with_optimizer:
            zero = self.optimizer
            for group in zero.optimizer.param_groups:
                for flat in group["params"]:  # AdamW keeps the step on the device only when fused or capturable
                    on_device = group.get("fused") or group.get("capturable")
                    zero.optimizer.state[flat] = {
                        "step": torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu"),
                        **{key: torch.zeros_like(flat) for key in ADAM_MOMENTS}}
        state = self._state(with_optimizer)
        for name, p in self._trained():
            state[MODEL + name].append(self._chunk(p.detach(), p))
        return state

    def _link_optimizer_state(self) -> None:
        """Point every parameter's optimizer-state fragment at ZeRO's flat Adam state. DeepSpeed 0.19 links
        them once, right after stepping the first optimizer group, so the parameters of every later
        group (here: the expert groups) are never linked and safe_get/set_full_optimizer_state fail."""
        zero = self.optimizer
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], flat, zero.optimizer.state)

