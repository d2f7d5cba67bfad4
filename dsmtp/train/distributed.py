"""The trainer under torchrun: the same loop, logging, evaluation and checkpoints as `Trainer`, with
this rank's part of the model driven by an engine chosen by `parallel.engine`: DeepSpeed
(`dsmtp.parallel.deepspeed_engine`, ZeRO-1/2 with TP and EP; the default when pp == 1) or dsmtp's own
`dsmtp.parallel.engine.Engine` (TP, PP, EP, DP with ZeRO-1/2; the default when pp > 1). Both offer
the same methods, and write and read the same consolidated checkpoints.

Batch semantics do not depend on the layout: `train.micro_batch_size` is the micro-batch of the whole
data-parallel group, each DP rank reads its disjoint `micro_batch_size / dp` slice, and a step is
`grad_accum` such micro-batches (the pipeline's micro-batches under PP). So any layout trains on the
same global batches as one process, and a checkpoint resumes in any layout.

Checkpoints are the single-process layout: every rank writes its shard (dsmtp.parallel.checkpoint),
rank 0 concatenates them into full tensors and writes the usual step directory (model.safetensors,
optimizer.pt in `torch.optim.AdamW.state_dict()` form of the single-process model, ...) with the
same atomic rename and `latest` pointer; the shards are a temporary directory removed afterwards.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsmtp.config import ConfigError
from dsmtp.model import DeepSeekV3, moe_layers, update_expert_bias
from dsmtp.parallel import checkpoint as shards
from dsmtp.parallel import collectives, topology
from dsmtp.parallel.engine import Engine, build_model
from dsmtp.train import checkpoint
from dsmtp.train.metrics import LossSums, expert_load_ratios
from dsmtp.train.optim import build_optimizer, parameter_groups
from dsmtp.train.trainer import Data, Trainer, open_data, apply_train_settings


def single_process_parameter_order(cfg) -> list[list[str]]:
    """Names of the single-process optimizer's parameter groups, in order (its state_dict indexes
    parameters by position in these groups). Built on the meta device: no memory, no init."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in parameter_groups(model, 0.0)]


class DistributedTrainer(Trainer):
    def build_model(self) -> None:
        if self.cfg.train.cuda_graph:
            raise ConfigError("train.cuda_graph=true replays the single-process step, not a step under torchrun: "
                              "set it to false")
        if self.cfg.parallel.resolved_engine == "deepspeed" and self.cfg.train.optimizer_state_dtype != "fp32":
            raise ConfigError(f"train.optimizer_state_dtype={self.cfg.train.optimizer_state_dtype} under DeepSpeed "
                              f"(parallel.engine={self.cfg.parallel.engine}): its ZeRO optimizer keeps the moments "
                              "in fp32 partitions of its own; use parallel.engine=native, or "
                              "train.optimizer_state_dtype=fp32")
        self.layout = topology.layout()
        model, layers = build_model(self.cfg, self.layout, self.cfg.train.seed)
        self.model = model.to(self.device).train()
        apply_train_settings(self.model, self.cfg.train)
        if self.cfg.parallel.resolved_engine == "deepspeed":
            from dsmtp.parallel.deepspeed_engine import DeepSpeedEngine  # imports DeepSpeed: only when used

            self.engine = DeepSpeedEngine(self.model, self.cfg, self.layout,
                                          build_optimizer(self.model, self.cfg.train))
        else:
            self.engine = Engine(self.model, layers, self.cfg, self.layout,
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
        if applied:
            update_expert_bias(self.model, gamma)
        else:
            for moe in moe_layers(self.model):
                moe.tokens_per_expert.zero_()
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
    def save(self) -> None:
        shard_dir = self.out_dir / checkpoint.CHECKPOINTS / f".tmp-shards-{self.step}"
        shards.save_shard(shard_dir, self.layout.rank, self.engine.shard_pieces())
        self.engine.barrier()
        if self.is_writer:
            full = shards.merge_shards(shard_dir)
            tensors = {k[len("model/"):]: v for k, v in full.items() if k.startswith("model/")}
            checkpoint.save_checkpoint(self.out_dir, self.step, self.tokens, tensors, self.cfg,
                                       self.data.tokenizer_path, self._single_process_optimizer_state(full),
                                       self.trainer_state(), self.cfg.train.keep_last)
            shutil.rmtree(shard_dir)
        self.engine.barrier()
        self.saved_step = self.step

    def _single_process_optimizer_state(self, full: dict[str, torch.Tensor]) -> dict:
        by_name: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in full.items():
            if key.startswith("optim/"):
                name, field = key[len("optim/"):].rsplit("/", 1)
                by_name.setdefault(name, {})[field] = value
        state, groups, index = {}, [], 0
        hyper = {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups}
        for group_names, group in zip(single_process_parameter_order(self.cfg), ("decay", "no_decay")):
            groups.append({**hyper[group], "params": list(range(index, index + len(group_names)))})
            for name in group_names:
                if name in by_name:
                    state[index] = by_name[name]
                index += 1
        return {"state": state, "param_groups": groups}

    def load_model_and_optimizer(self, ckpt: Path) -> dict:
        tensors = load_file(str(ckpt / "model.safetensors"))
        optimizer_state, state = checkpoint.load_training_state(ckpt)
        names = [n for group in single_process_parameter_order(self.cfg) for n in group]
        by_name = {names[int(i)]: s for i, s in optimizer_state["state"].items()}
        self.engine.load_full({k: v.to(self.device) for k, v in tensors.items()},
                              {n: {k: v.to(self.device) for k, v in s.items()} for n, s in by_name.items()})
        return state
