"""This rank's part of the model and the engine that trains it: what the distributed trainer
(dsmtp.train.distributed) and the distributed tests both start from."""

from __future__ import annotations

import torch

from dsmtp.config import Config
from dsmtp.model import DeepSeekV3
from dsmtp.parallel.expert import shard_experts
from dsmtp.parallel.native_engine import NativeEngine
from dsmtp.parallel.pipeline import prune_to_stage
from dsmtp.parallel.sequence import reduce_replicated_grads
from dsmtp.parallel.topology import Layout
from dsmtp.parallel.train_engine import OptimizerFactory, TrainEngine


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


def build_engine(cfg: Config, layout: Layout, model: DeepSeekV3, layers: range,
                 make_optimizer: OptimizerFactory) -> TrainEngine:
    """The engine `parallel.engine` names (auto: DeepSpeed when pp == 1, the native engine when pp > 1)."""
    if cfg.parallel.resolved_engine == "deepspeed":
        from dsmtp.parallel.deepspeed_engine import DeepSpeedEngine  # imports DeepSpeed: only when used

        return DeepSpeedEngine(model, cfg, layout, make_optimizer(list(model.named_parameters())))
    return NativeEngine(model, layers, cfg, layout, make_optimizer)
