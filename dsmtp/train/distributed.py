"""The trainer under torchrun: the same loop, logging, evaluation and checkpoints as `Trainer`, with
this rank's part of the model driven by an engine chosen by `parallel.engine`: DeepSpeed
(`dsmtp.parallel.deepspeed_engine`, ZeRO-1/2 with TP and EP; the default when pp == 1) or dsmtp's own
(`dsmtp.parallel.native_engine`, TP, PP, EP, DP with ZeRO-0/1/2; the default when pp > 1). Both implement
the contract of `dsmtp.parallel.train_engine.TrainEngine`, and write and read the same checkpoints.

Batch semantics do not depend on the layout: `train.micro_batch_size` is the micro-batch of the whole
data-parallel group, each DP rank reads its disjoint `micro_batch_size / dp` slice, and a step is
`grad_accum` such micro-batches (the pipeline's micro-batches under PP). So any layout trains on the
same global batches as one process, and a checkpoint resumes in any layout.

Checkpoints (dsmtp.checkpoint) are sharded: the engine describes the chunks of the full tensors this
rank holds (its TP slice, its experts, its stage, its ZeRO share of the optimizer state), every rank
writes its own in parallel and reads back only what it needs, in whatever layout it resumes.
"""

from __future__ import annotations

import math

import torch

from dsmtp.checkpoint import State
from dsmtp.model import update_expert_bias
from dsmtp.parallel import collectives, topology
from dsmtp.parallel.rank import build_engine, build_model
from dsmtp.parallel.train_engine import TrainEngine
from dsmtp.train.metrics import LossSums, expert_load_ratios
from dsmtp.train.optim import build_optimizer
from dsmtp.train.trainer import Data, Trainer, apply_train_settings, open_data


class DistributedTrainer(Trainer):
    def build_model(self) -> None:
        self.layout = topology.layout()
        model, layers = build_model(self.cfg, self.layout, self.cfg.train.seed)
        self.model = model.to(self.device).train()
        apply_train_settings(self.model, self.cfg.train)
        self.engine: TrainEngine = build_engine(self.cfg, self.layout, self.model, layers,
                                                lambda named: build_optimizer([p for _, p in named], self.cfg.train))
        self.optimizer = self.engine.optimizer

    def open_data(self) -> Data:
        return open_data(self.cfg, self.layout.dp_rank, self.layout.dp)

    # ------------------------------------------------------------------------------------------
    def _sums(self, outputs) -> LossSums:
        """Loss sums of the last stage's outputs, known to every stage (DP reduction happens when logging)."""
        sums = LossSums(self.cfg.model.mtp_depth, self.device)
        for out in outputs:
            sums.add(out)
        self.engine.share_from_last_stage([sums.main, sums.mtp])
        return sums

    def accumulate_gradients(self, mtp_weight: float) -> tuple[LossSums, torch.Tensor]:
        batches = [next(self.data.train).to(self.device) for _ in range(self.cfg.train.grad_accum)]
        with self.autocast():
            outputs = self.engine.forward_backward(batches, mtp_weight)
        sums = self._sums(outputs)
        return sums, sums.is_finite()

    def optimizer_step(self, lr: float, gamma: float, finite_loss: torch.Tensor) -> tuple[float, tuple[float, float], bool]:
        # The engines agree on skipping across ranks (and pipeline stages) on the host.
        grad_norm, applied = self.engine.apply_gradients(lr, self.cfg.train.grad_clip, bool(finite_loss))
        collectives.reduce_expert_loads(self.model)
        imbalance = self._load_imbalance()
        update_expert_bias(self.model, gamma if applied else 0.0)  # a skipped step only resets the counts
        return grad_norm, imbalance, not applied

    def _load_imbalance(self) -> tuple[float, float]:
        """(mean, max) of expert_load_ratios over the MoE layers of every pipeline stage."""
        ratios = [r for r in expert_load_ratios(self.model).tolist() if math.isfinite(r)]  # NaN: a layer saw no tokens
        (total, layers), (worst,) = self.engine.over_stages([sum(ratios), len(ratios)], [max(ratios, default=0.0)])
        return (total / layers, worst) if layers else (float("nan"), float("nan"))

    @torch.no_grad()
    def evaluate(self) -> dict:
        lay = self.layout
        per_rank = self.cfg.train.micro_batch_size // lay.dp
        batches = [b[lay.dp_rank * per_rank:(lay.dp_rank + 1) * per_rank].to(self.device) for b in self.data.val]
        with self.autocast():
            sums = self._sums(self.engine.evaluate(batches, mtp_weight=0.0))
        sums.all_reduce()
        return {"kind": "eval", "step": self.step, "tokens": self.tokens, **sums.averages()}

    # ------------------------------------------------------------------------------------------
    def state_to_save(self) -> State:
        return self.engine.state_to_save()

    def state_to_load(self, with_optimizer: bool) -> State:
        return self.engine.state_to_load(with_optimizer)
