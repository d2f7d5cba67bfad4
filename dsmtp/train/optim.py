"""AdamW with decoupled weight decay, applied to matrices only, as one fused kernel.

train.optimizer_state_dtype=bf16 keeps the two moments in bf16, as DeepSeek-V3 does (report, section
3.3), over fp32 master weights: `AdamWLowPrecisionMoments`. torch's AdamW (fused, foreach or single
tensor) keeps moments in the parameters' dtype, so this is our own small step: each moment is read,
updated in fp32, used at fp32 for this step's update and stored rounded to bf16 (round to nearest).
Under train.param_dtype=bf16 the same optimizer also holds the fp32 master weights ("master" in its
state): the model's bf16 parameters are their rounded copies, rewritten by every update.

Norm weights and any other 1-D parameters (biases) are not decayed: shrinking a norm's gain or a
bias toward zero is not regularization. The router's expert_bias is a buffer updated by the
balancing rule, never by the optimizer.

The fused kernel reads and writes each parameter, gradient and moment once per step; the default
(foreach) implementation makes a dozen passes (what that costs: notes/code-measurements.md).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from dsmtp.config import TrainConfig


def parameter_groups(model: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay / no-decay groups of a model's parameters (or of a rank's share of them, in model order)."""
    decay, no_decay = [], []
    for p in (model.parameters() if isinstance(model, nn.Module) else model):
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MOMENTS = ("exp_avg", "exp_avg_sq")  # torch's AdamW state names, kept so checkpoints read the same


def build_optimizer(model: nn.Module | Iterable[nn.Parameter], t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW for train's settings. Under train.param_dtype=bf16 it takes the parameters over: their fp32
    values become the master weights and the parameters themselves are cast to bf16 (buffers, such as
    the routers' expert_bias, stay as they are)."""
    groups = parameter_groups(model, t.weight_decay)
    if t.optimizer_state_dtype == "fp32" and t.param_dtype == "fp32":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, fused=True)
    return AdamWLowPrecisionMoments(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps,
                                    state_dtype=STATE_DTYPES[t.optimizer_state_dtype],
                                    param_dtype=STATE_DTYPES[t.param_dtype])


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                 grad_scale: torch.Tensor, skip: torch.Tensor, master: torch.Tensor | None = None) -> None:
    """One AdamW step of one parameter, in place, as torch.optim.AdamW computes it, with the moments
    updated in fp32 and stored in their own dtype. grad_scale divides
    the gradient (clipping); where `skip` is set nothing changes, `step` (the count before this step)
    included. With fp32 `master` weights the step updates them and param becomes their copy in its own
    dtype. Tensors, not numbers, for everything that changes between steps: compiled, one graph
    serves every step."""
    step.add_((~skip).float())
    g = grad.float() / grad_scale
    m = exp_avg.float().lerp(g, 1 - beta1)
    v = exp_avg_sq.float() * beta2 + (1 - beta2) * g * g
    step = step.float()
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    update = (m / bias1) / (v.sqrt() / bias2.sqrt() + eps)
    weights = param if master is None else master
    new_weights = weights * (1 - lr * weight_decay) - lr * update
    weights.copy_(torch.where(skip, weights, new_weights))
    if master is not None:
        param.copy_(master)
    exp_avg.copy_(torch.where(skip, exp_avg, m.to(exp_avg.dtype)))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v.to(exp_avg_sq.dtype)))


def adamw_update_all(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                     exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lr: torch.Tensor, beta1: float,
                     beta2: float, eps: float, weight_decay: float, grad_scale: torch.Tensor,
                     skip: torch.Tensor, masters: list[torch.Tensor] | None = None) -> None:
    """adamw_update over a group's parameters, one at a time: the reference that
    multi_tensor_adamw.MultiTensorAdamW computes in one CUDA launch."""
    for i, (param, grad, exp_avg, exp_avg_sq, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        adamw_update(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, grad_scale, skip,
                     None if masters is None else masters[i])


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) over fp32 weights with its moments stored in `state_dtype`: the
    parameters themselves, or, for `param_dtype` bf16, fp32 master weights in the state ("master") of which
    the parameters (cast to bf16 here) are rounded copies.

    Takes what clipped_step hands a fused optimizer: `grad_scale` (gradients are divided by it) and
    `found_inf` (skip the step: parameters, moments and step counts stay), both device tensors, so
    neither costs a host read. On CUDA a group's update is one Triton launch (multi_tensor_adamw);
    elsewhere adamw_update runs eagerly per parameter. State: "step" (a float32 device tensor, as fused
    AdamW's), the two moments under torch's names and "master"; a state loaded from a checkpoint keeps
    its moments at state_dtype and its master weights at fp32 (a checkpoint without master weights gets
    them from the loaded parameters at the next step).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0,
                 state_dtype: torch.dtype = torch.bfloat16, param_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.param_dtype = state_dtype, param_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != param_dtype:
                    self.state[p]["master"] = p.detach().float().clone()
                    p.data = p.data.to(param_dtype)
        self.register_load_state_dict_pre_hook(AdamWLowPrecisionMoments._keep_loaded_states)
        self.register_load_state_dict_post_hook(AdamWLowPrecisionMoments._restore_state_dtypes)
        self._multi_tensor = None

    @staticmethod
    def _keep_loaded_states(optimizer: "AdamWLowPrecisionMoments", state_dict: dict) -> None:
        # torch's load_state_dict casts every floating state tensor to its parameter's dtype, which would
        # round fp32 master weights (and fp32 moments) to a bf16 parameter's precision: keep the originals
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer._loaded_states = {p: state_dict["state"][i] for i, p in zip(saved_ids, params)
                                    if i in state_dict["state"]}

    @staticmethod
    def _restore_state_dtypes(optimizer: "AdamWLowPrecisionMoments") -> None:
        dtypes = {"master": torch.float32, **{key: optimizer.state_dtype for key in MOMENTS}}
        for p, loaded in optimizer.__dict__.pop("_loaded_states").items():
            state = optimizer.state[p]
            for key, dtype in dtypes.items():
                if key in loaded:
                    state[key] = loaded[key].to(device=p.device, dtype=dtype)
            if p.dtype != torch.float32 and "master" not in loaded:
                state.pop("master", None)  # taken from the loaded parameter at the next step

    def _update_fn(self, device: torch.device):
        if device.type != "cuda":
            return adamw_update_all
        if self._multi_tensor is None:
            from dsmtp.train.multi_tensor_adamw import MultiTensorAdamW  # triton: CUDA installs only

            self._multi_tensor = MultiTensorAdamW()
        return self._multi_tensor

    @torch.no_grad()
    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """The global L2 norm of `grads` in fp32 in one launch on CUDA (multi_tensor_adamw); None elsewhere."""
        if not grads or grads[0].device.type != "cuda":
            return None
        return self._update_fn(grads[0].device).sum_of_squares(grads).sqrt()

    @torch.no_grad()
    def step(self, closure=None, stages: list[list[nn.Parameter]] | None = None,
             after_stage: Callable[[int], None] | None = None):
        """One update of every parameter with a gradient. With `stages` (lists of parameters that together
        hold every one), stage by stage in their order, calling `after_stage(i)` once stage i's launches
        are queued (dsmtp.train.overlap); each tensor's arithmetic is the same either way."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not with_grads:
            return loss
        device = with_grads[0].device
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        scale = torch.ones((), device=device) if grad_scale is None else grad_scale.to(device)
        skip = torch.zeros((), dtype=torch.bool, device=device) if found_inf is None else found_inf.to(device) > 0
        # a fill kernel with the value as its argument: torch.tensor(lr, device=cuda) is a blocking copy
        lrs = [torch.full((), group["lr"], dtype=torch.float32, device=device) for group in self.param_groups]
        # each stage's parameters by group, in group order: one pass over the parameters
        stage_of = {id(p): i for i, stage in enumerate(stages) for p in stage} if stages else {}
        staged = [[[] for _ in self.param_groups] for _ in range(len(stages) if stages else 1)]
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    staged[stage_of[id(p)] if stages else 0][g].append(p)
        for i, by_group in enumerate(staged):
            for group, lr, params in zip(self.param_groups, lrs, by_group):
                if params:
                    self._update(group, params, lr, scale, skip)
            if after_stage is not None:
                after_stage(i)
        return loss

    def _update(self, group: dict, params: list[nn.Parameter], lr: torch.Tensor, scale: torch.Tensor,
                skip: torch.Tensor) -> None:
        update = self._update_fn(params[0].device)
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for key in MOMENTS:
                    state[key] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
            if p.dtype != torch.float32 and "master" not in state:
                state["master"] = p.detach().float().clone()
        states = [self.state[p] for p in params]
        masters = [s["master"] for s in states] if params[0].dtype != torch.float32 else None
        update(params, [p.grad for p in params], [s["exp_avg"] for s in states],
               [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr, beta1, beta2,
               group["eps"], group["weight_decay"], scale, skip, masters)


def global_norm(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all of `grads`, accumulated in fp32: AdamWLowPrecisionMoments' one-launch kernel on
    CUDA, torch's multi-tensor norms otherwise."""
    if isinstance(optimizer, AdamWLowPrecisionMoments) and (norm := optimizer.grad_norm(grads)) is not None:
        return norm
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    # bf16 gradients (train.param_dtype=bf16): each tensor's norm accumulated in fp32
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))


def clipped_step(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], max_norm: float,
                 skip: torch.Tensor | None = None, step: Callable[[], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients to a global norm of max_norm (<= 0: no clipping) and take one step of a fused
    optimizer, unless the norm is not finite or `skip` (a device bool) is set: then nothing changes.
    Returns (norm before clipping, skipped), both on the device. `step` takes the step in place of
    optimizer.step() (dsmtp.train.overlap's, on a side stream).

    The fused kernel does both jobs as it goes: it divides every gradient by `grad_scale` and returns
    early when `found_inf` is set (torch.amp.GradScaler's hooks). So clipping costs no extra pass over
    the gradients, and neither it nor the skip waits for the host to read the norm.
    """
    norm = global_norm(optimizer, [p.grad for p in params if p.grad is not None])
    skipped = ~torch.isfinite(norm)
    if skip is not None:
        skipped |= skip
    # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the kernel divides by its inverse.
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0) if max_norm > 0 else torch.ones_like(norm)
    optimizer.found_inf = skipped.float()
    try:
        (step or optimizer.step)()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    return norm, skipped
