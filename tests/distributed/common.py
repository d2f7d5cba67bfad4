"""Shared by the distributed tests and their worker: a tiny MoE + MTP config, deterministic global
batches, and the single-process reference training loop every layout must reproduce."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from dsmtp.config import Config, load_config
from dsmtp.model import DeepSeekV3, ModelOutput, moe_layers, update_expert_bias
from dsmtp.parallel.topology import Layout
from dsmtp.train.optim import AdamWLowPrecisionMoments
from dsmtp.train.trainer import apply_train_settings

SEED = 1234
STEPS = 3
GRAD_ACCUM = 2
GLOBAL_MICRO_BATCH = 4  # samples per micro-batch over all DP ranks
LR = 3e-3
GAMMA = 0.01  # router bias update rate: large, so biases visibly move within 3 steps
GRAD_CLIP = 0.05  # small enough to clip: the test checks it is active


def tiny_config(tp: int = 1, pp: int = 1, ep: int = 1, zero: int = 1, sp: bool = False,
                mtp_kind: str = "sequential", heads_one_at_a_time: bool = False, state_dtype: str = "fp32",
                engine: str = "auto") -> Config:
    overrides = {
        "model.vocab_size": 256, "model.hidden_size": 64, "model.num_layers": 3, "model.num_heads": 2,
        "model.first_k_dense_replace": 1, "model.intermediate_size": 96, "model.moe_intermediate_size": 32,
        "model.n_routed_experts": 8, "model.n_shared_experts": 1, "model.num_experts_per_tok": 2,
        "model.n_group": 4, "model.topk_group": 2, "model.q_lora_rank": 32, "model.kv_lora_rank": 32,
        "model.qk_nope_head_dim": 16, "model.qk_rope_head_dim": 8, "model.v_head_dim": 16,
        "model.max_position_embeddings": 64, "model.mtp_depth": 2, "model.aux_loss_alpha": 0.01,
        "model.mtp_kind": mtp_kind, "train.mtp_heads_one_at_a_time": heads_one_at_a_time,
        "train.mtp_depth_weights": "[1.0, 0.5]",
        "model.init_std": 0.05,
        "train.seq_len": 16, "train.micro_batch_size": GLOBAL_MICRO_BATCH, "train.grad_accum": GRAD_ACCUM,
        "train.steps": STEPS, "train.lr": LR, "train.warmup_steps": 0, "train.grad_clip": GRAD_CLIP,
        "parallel.tp": tp, "parallel.pp": pp, "parallel.ep": ep, "parallel.zero_stage": zero,
        "parallel.sequence_parallel": sp, "train.optimizer_state_dtype": state_dtype, "parallel.engine": engine,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def global_batches(cfg: Config, step: int) -> torch.Tensor:
    """[grad_accum, GLOBAL_MICRO_BATCH, S + D + 1] tokens of optimizer step `step`."""
    g = torch.Generator().manual_seed(SEED + step)
    shape = (GRAD_ACCUM, GLOBAL_MICRO_BATCH, cfg.train.seq_len + cfg.model.mtp_depth + 1)
    return torch.randint(0, cfg.model.vocab_size, shape, generator=g)


def dp_slice(batch: torch.Tensor, dp_rank: int, dp: int) -> list[torch.Tensor]:
    """This DP rank's disjoint share of each micro-batch (the loader's dp_rank/dp_size contract)."""
    per = batch.shape[1] // dp
    return [mb[dp_rank * per:(dp_rank + 1) * per] for mb in batch]


def loss_stats(outputs: list[ModelOutput], cfg: Config, layout: Layout, device: torch.device) -> dict:
    """Main and per-depth MTP losses of a step, from the last stage's outputs, averaged over micro-batches
    and DP ranks, on every rank: what `reference_run` records."""
    depth, n = cfg.model.mtp_depth, cfg.train.grad_accum
    vec = torch.zeros(1 + depth, dtype=torch.float64, device=device)
    for out in outputs:
        vec[0] += out.main_loss.double()
        vec[1:] += out.mtp_losses.double()
    vec /= n * layout.dp
    if layout.pp > 1:
        dist.all_reduce(vec, group=layout.pp_group)
    if layout.dp > 1:
        dist.all_reduce(vec, group=layout.dp_group)
    values = vec.tolist()
    return {"main_loss": values[0], "mtp_losses": values[1:]}


def make_optimizer(named_params, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for _, p in named_params]
    if t.optimizer_state_dtype == "bf16":
        return AdamWLowPrecisionMoments(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps,
                                        weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, weight_decay=t.weight_decay)


def reference_run(cfg: Config, steps: int = STEPS) -> dict:
    """One process, plain PyTorch: the training every layout must reproduce."""
    torch.manual_seed(SEED)
    model = DeepSeekV3(cfg.model)
    apply_train_settings(model, cfg.train)
    opt = make_optimizer(model.named_parameters(), cfg)
    history, times = [], []
    for step in range(steps):
        start = time.perf_counter()
        batch = global_batches(cfg, step)
        d = cfg.model.mtp_depth
        main, mtp = 0.0, torch.zeros(d, dtype=torch.float64)
        for mb in batch:
            out = model(mb[:, :cfg.train.seq_len], mb[:, 1:], mtp_weight=0.3)
            (out.loss / len(batch)).backward()
            main += out.main_loss.item() / len(batch)
            mtp += out.mtp_losses.double() / len(batch)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model, GAMMA)
        times.append(time.perf_counter() - start)
        history.append({"main_loss": main, "mtp_losses": mtp.tolist(), "grad_norm": float(norm)})
    assert sum(1 for _ in moe_layers(model)) == 4  # 2 trunk MoE layers + 2 MTP layers
    return {"history": history, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "step_seconds": times}
