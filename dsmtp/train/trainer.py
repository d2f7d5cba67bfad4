"""The training loop with MTP, in one process (`dsmtp train`: dsmtp.train.command).

The loop is split so a distributed engine can replace one piece at a time:
  - `forward_backward`: one micro-batch, forward under autocast and backward of the scaled loss;
  - `optimizer_step`: clip, skip if non-finite, step, then the router bias update over the
    data-parallel batch (collectives in dsmtp.parallel);
  - `backward_pass`: forward and backward of a step's micro-batches, which train.cuda_graph captures
    once and then replays as one CUDA graph (dsmtp.train.cuda_graph);
  - `train_step`: one optimizer step of `grad_accum` micro-batches, returning its statistics;
  - `run`: logging, evaluation and checkpoint orchestration.

In one process a step never waits for the device: its losses, gradient norm, load imbalance and
whether it was skipped stay device tensors (a non-finite step is dropped inside the fused optimizer
kernel) and are read once per log interval, or before a checkpoint. (Under torchrun the engines still
agree on skipping a step on the host.) A host read per step would drain the GPU's
queue every step (notes/code-measurements.md). So a run of non-finite steps is noticed
at the next log or checkpoint step, at most `log_interval - 1` steps late; those steps changed nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch
from tqdm import tqdm

from dsmtp import checkpoint
from dsmtp.config import Config, ConfigError
from dsmtp.model import DeepSeekV3, ModelOutput, fp8, kernels, update_expert_bias
from dsmtp.model.mtp import depth_weights, split_sample
from dsmtp.parallel import topology
from dsmtp.train import memory, report, schedules, trackers
from dsmtp.train.cuda_graph import GraphedBackward
from dsmtp.train.flops import mfu
from dsmtp.train.metrics import IntervalMeter, LossSums, MetricsLog, expert_load_imbalance
from dsmtp.train.optim import build_optimizer, clipped_step
from dsmtp.train.overlap import OverlappedUpdate


class BatchStream(Protocol):
    """What the trainer needs from a training data loader (dsmtp.data.loader.TrainBatches)."""

    def __next__(self) -> torch.Tensor: ...
    def source_tokens(self) -> dict[str, int]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Data:
    train: BatchStream  # micro-batches [micro_batch_size, seq_len + 1 + extra]: extra = train.sample_extra_tokens or mtp_depth
    val: list[torch.Tensor]
    val_tokens: torch.Tensor  # the whole val split, for its unigram entropy
    tokenizer_path: Path
    unigram_baseline: dict  # the data manifest's context-free losses (train entropy, val cross-entropy)


def open_data(cfg: Config, dp_rank: int = 0, dp_size: int = 1) -> Data:
    """The prepared corpus of `data.data_dir`, checked against the model config (DataError if unusable)."""
    from dsmtp.data.loader import TrainBatches, val_batches
    from dsmtp.data.shards import TokenSplit
    from dsmtp.data.tokenizer import Tokenizer

    data_dir = Path(cfg.data.data_dir)
    tokenizer = Tokenizer.load(data_dir, expected_vocab_size=cfg.model.vocab_size)
    t = cfg.train
    extra = cfg.model.mtp_depth if t.sample_extra_tokens is None else t.sample_extra_tokens
    val_split = TokenSplit(data_dir, "val")
    # train.micro_batch_size counts the samples of all data-parallel ranks together: each reads its slice.
    weights = {source.label: source.weight for source in cfg.data.corpus}
    return Data(train=TrainBatches(data_dir, t.seq_len, extra, t.micro_batch_size // dp_size, t.seed, dp_rank, dp_size,
                                   weights),
                val=val_batches(data_dir, t.seq_len, extra, t.micro_batch_size, t.eval_batches),
                val_tokens=torch.from_numpy(val_split.read(0, val_split.num_tokens).astype("int64")),
                tokenizer_path=tokenizer.model_path, unigram_baseline=val_split.manifest.get("unigram", {}))


def autocast_for(precision: str, device: torch.device, fp8_backend: str = "torch"):
    """bf16 autocast on CUDA (or when asked for), full fp32 otherwise; fp8 adds the FP8 GEMM context
    (Transformer Engine's, with train.fp8_backend=transformer_engine) on top of bf16 autocast.

    Autocast's cache of cast weights is off: with it, a weight used twice in one forward (the output
    head, shared by the trunk and the MTP modules) has its two gradients summed in bf16 before the cast
    back to fp32, without it in fp32; and a CUDA graph's capture cannot keep the cache. Off, a graphed
    step and an eager one are the same arithmetic."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp8" and device.type != "cuda":
        raise ConfigError("train.precision=fp8 needs a CUDA device with FP8 support (Hopper or newer): "
                          "use auto, bf16 or fp32 here")
    if precision == "fp32":
        return contextlib.nullcontext

    @contextlib.contextmanager
    def bf16_and_maybe_fp8():
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False), \
                fp8.autocast(fp8_backend if precision == "fp8" else None):
            yield

    return bf16_and_maybe_fp8


def apply_train_settings(model: DeepSeekV3, t) -> None:
    """The train section's settings that live on the model: the MTP depth weights (and, for parallel
    heads, one-at-a-time backward); train.precision=fp8 switches the eligible GEMMs to FP8;
    train.activation_recompute_every marks layers for recomputation; train.compile compiles layer by layer
    (in train.compile_mode).
    Also model.attention_backend, resolved for the model's device (a forced flash that cannot run stops here)."""
    model.set_attention_backend(kernels.resolve_attention_backend(model.cfg.attention_backend,
                                                                  next(model.parameters()).device))
    model.mtp.depth_weights = depth_weights(t.mtp_depth_weights, model.cfg.mtp_depth)
    if t.mtp_heads_one_at_a_time:
        model.mtp.one_at_a_time = True
    if t.precision == "fp8":
        model.enable_fp8(t.fp8_backend)
    model.set_activation_recompute(t.activation_recompute_every)
    if t.compile:
        model.compile_layers(t.compile_mode)


def rng_state() -> dict:
    """This process's random states, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many consecutive non-finite steps); the message says why."""


@dataclass
class StepResult:
    sums: LossSums  # token-weighted losses of this step's micro-batches (this rank)
    tokens: int  # tokens consumed by the step over all data-parallel ranks
    grad_norm: torch.Tensor | float
    imbalance: torch.Tensor | tuple[float, float]  # expert load max/mean: mean and max over MoE layers
    skipped: torch.Tensor | bool


class Trainer:
    def __init__(self, cfg: Config, data: Optional[Data] = None, resume: str = "auto"):
        """resume: "auto" continues from out_dir's latest checkpoint if there is one; "require" also
        fails when there is none."""
        topology.ensure_initialized()
        self.cfg, t = cfg, cfg.train
        trackers.require_packages(t.trackers)
        self.device = topology.device()
        if t.cuda_graph and self.device.type != "cuda":
            raise ConfigError("train.cuda_graph=true needs a CUDA device: set it to false here")
        if t.overlap_update and self.device.type != "cuda":
            raise ConfigError("train.overlap_update=true overlaps CUDA streams: set it to false here")
        memory.check_training_memory(cfg, self.device, torch.distributed.get_world_size(),
                                     int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.autocast = autocast_for(t.precision, self.device, t.fp8_backend)
        self.out_dir = Path(t.out_dir)
        self.is_writer = torch.distributed.get_rank() == 0
        self.build_model()
        self.graphed_backward = GraphedBackward(self.backward_pass, list(self.model.parameters())) \
            if t.cuda_graph else None
        self.overlap = OverlappedUpdate(self.model, self.optimizer) if t.overlap_update else None
        self.data = data if data is not None else self.open_data()
        self.log = MetricsLog(self.out_dir / "metrics.jsonl")
        self.trackers: list = []  # train.trackers' writers beside self.log while run() runs (logging rank)
        self.step = 0
        self.tokens = 0
        self.consecutive_skips = 0
        self.total_skips = 0
        self.saved_step: Optional[int] = None
        self.resumed_from: Optional[Path] = None
        self.started = time.perf_counter()
        self.train_seconds = 0.0
        self.trained_tokens = 0

        if self.is_writer:
            checkpoint.remove_stale_temporaries(self.out_dir)
        ckpt = checkpoint.latest_checkpoint(self.out_dir)
        if ckpt is None and resume == "require":
            raise checkpoint.CheckpointError(f"--resume: {self.out_dir / checkpoint.CHECKPOINTS} has no checkpoint")
        if ckpt is not None:
            self.load(ckpt)
        if self.is_writer:
            self.log.truncate_after(self.step if ckpt is not None else -1)

    def build_model(self) -> None:
        """self.model and self.optimizer (a distributed trainer builds this rank's part instead)."""
        torch.manual_seed(self.cfg.train.seed)
        self.model = DeepSeekV3(self.cfg.model).to(self.device).train()
        apply_train_settings(self.model, self.cfg.train)
        self.optimizer = build_optimizer(self.model, self.cfg.train)

    def open_data(self) -> Data:
        return open_data(self.cfg)

    @property
    def tokens_per_step(self) -> int:
        """The global batch in tokens: the same for every parallel layout."""
        t = self.cfg.train
        return t.micro_batch_size * t.seq_len * t.grad_accum

    # ------------------------------------------------------------------------------------------
    # One micro-batch, one optimizer step

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of a micro-batch (dsmtp.model.mtp.split_sample), on the device."""
        return split_sample(batch.to(self.device, non_blocking=True), self.cfg.train.seq_len)

    def forward_backward(self, batch: torch.Tensor, mtp_weight: float | torch.Tensor, loss_scale: float) -> ModelOutput:
        input_ids, labels = self.split(batch)
        with self.autocast():
            out = self.model(input_ids, labels, mtp_weight=mtp_weight)
        (out.loss * loss_scale).backward()
        return out

    def optimizer_step(self, lr: float, gamma: float, finite_loss: torch.Tensor):
        """Clip and apply the accumulated gradients, then update the router biases from the batch's
        expert loads. Non-finite loss or gradients: no update at all, decided on the device. Returns
        (grad norm, load imbalance [mean, max], skipped) as device tensors."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm, skipped = clipped_step(self.optimizer, self.model.parameters(), self.cfg.train.grad_clip,
                                          skip=~finite_loss, step=None if self.overlap is None else self.overlap.step)
        imbalance = expert_load_imbalance(self.model)
        update_expert_bias(self.model, gamma * ~skipped)  # a skipped step only resets the counts
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, imbalance, skipped

    def accumulate_gradients(self, mtp_weight: float) -> tuple[LossSums, torch.Tensor]:
        """Forward and backward of grad_accum micro-batches: (their loss sums, all losses finite)."""
        batches = torch.stack([next(self.data.train) for _ in range(self.cfg.train.grad_accum)])
        if self.graphed_backward is not None:
            return self.graphed_backward(batches, mtp_weight)
        return self.backward_pass(batches, mtp_weight)

    def backward_pass(self, batches: torch.Tensor, mtp_weight: float | torch.Tensor) -> tuple[LossSums, torch.Tensor]:
        """accumulate_gradients' device work, on batches [grad_accum, micro_batch, S + 1 + extra]: what
        train.cuda_graph captures."""
        sums = LossSums(self.cfg.model.mtp_depth, self.device)
        for batch in batches:
            sums.add(self.forward_backward(batch, mtp_weight, 1.0 / len(batches)))
        return sums, sums.is_finite()  # the loss is the sum of these terms: finite exactly when they are

    def train_step(self) -> StepResult:
        t = self.cfg.train
        lam = schedules.mtp_weight(t, self.tokens)
        with contextlib.nullcontext() if self.overlap is None else self.overlap.computing():
            sums, finite = self.accumulate_gradients(lam)
            grad_norm, imbalance, skipped = self.optimizer_step(
                schedules.learning_rate(t, self.step), schedules.bias_update_rate(t, self.tokens), finite)
        self.step += 1
        self.tokens += self.tokens_per_step
        return StepResult(sums, self.tokens_per_step, grad_norm, imbalance, skipped)

    def count_skips(self, meter: IntervalMeter) -> None:
        """Bring consecutive_skips and total_skips up to date with the steps the meter holds."""
        for skipped in meter.new_skip_flags():
            self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
            self.total_skips += int(skipped)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        sums = LossSums(self.cfg.model.mtp_depth, self.device)
        for batch in self.data.val:
            input_ids, labels = self.split(batch)
            with self.autocast():
                sums.add(self.model(input_ids, labels))
        self.model.train()
        sums.all_reduce()
        return {"kind": "eval", "step": self.step, "tokens": self.tokens, **sums.averages()}

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "loader": self.data.train.state_dict(),
                "rng": rng_state(), "consecutive_skips": self.consecutive_skips,
                "total_skips": self.total_skips}

    def state_to_save(self) -> checkpoint.State:
        """The model and optimizer tensors this process holds (a distributed trainer: this rank's chunks)."""
        if self.overlap is not None:
            self.overlap.synchronize()
        return checkpoint.module_state(self.model, self.optimizer)

    def state_to_load(self, with_optimizer: bool) -> checkpoint.State:
        """Where a checkpoint's tensors go, in place (the optimizer's state is created first when asked)."""
        return checkpoint.module_state(self.model, self.optimizer if with_optimizer else None, create=True)

    def save(self) -> None:
        """Every process writes its part of the checkpoint (dsmtp.checkpoint)."""
        checkpoint.save_training(self.out_dir, self.step, self.tokens, self.state_to_save(), self.cfg,
                                 self.data.tokenizer_path, self.trainer_state(), self.cfg.train.keep_last)
        self.saved_step = self.step

    def load(self, ckpt: Path) -> None:
        manifest = checkpoint.verify(ckpt)
        checkpoint.check_compatible(ckpt, manifest, self.cfg, checkpoint.sha256_file(self.data.tokenizer_path))
        state = checkpoint.load_trainer_state(ckpt)
        checkpoint.load_sharded(ckpt, self.state_to_load)
        self.data.train.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.consecutive_skips, self.total_skips = state["consecutive_skips"], state["total_skips"]
        self.saved_step = self.step
        self.resumed_from = ckpt
        if self.is_writer:  # train.keep_last may have changed since those checkpoints were written
            checkpoint.prune(ckpt.parent, self.cfg.train.keep_last, keep=ckpt.name)

    # ------------------------------------------------------------------------------------------
    # Orchestration

    def write(self, record: dict, line: str) -> None:
        """The one path of every record: metrics.jsonl and each tracker get the same dict."""
        if self.is_writer:
            for writer in (self.log, *self.trackers):
                writer.append(record)
            tqdm.write(line)

    def log_interval(self, meter: IntervalMeter) -> dict:
        t = self.cfg.train
        meter.sums.all_reduce()
        rec = meter.record()
        self.train_seconds += meter.seconds
        self.trained_tokens += meter.tokens
        rec = {"kind": "train", "step": self.step, "tokens": self.tokens, "lr": schedules.learning_rate(t, self.step - 1),
               "mtp_weight": schedules.mtp_weight(t, self.tokens - self.tokens_per_step),
               "bias_rate": schedules.bias_update_rate(t, self.tokens - self.tokens_per_step), **rec}
        source_tokens = self.data.train.source_tokens()
        if len(source_tokens) > 1:  # a mixture: the main-loss tokens each source has served so far
            rec["source_tokens"] = source_tokens
        if self.device.type == "cuda":
            rec["mfu"] = mfu(rec["tokens_per_second"], self.cfg.model, t.seq_len, torch.distributed.get_world_size())
            rec["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        mtp = " ".join(f"d{k + 1} {l:.3f}/{a:.3f}" for k, (l, a) in enumerate(zip(rec["mtp_loss"], rec["mtp_accuracy"])))
        line = (f"step {self.step}/{t.steps} | tokens {self.tokens / 1e6:.2f}M | loss {rec['loss']:.4f} | "
                f"mtp loss/acc {mtp or '-'} | aux {rec['aux_loss']:.3g} | lr {rec['lr']:.2e} | "
                f"gnorm {rec['grad_norm']:.3f} | imbalance {rec['expert_imbalance_mean']:.2f}/"
                f"{rec['expert_imbalance_max']:.2f} | {rec['tokens_per_second']:,.0f} tok/s | skipped {rec['skipped_steps']}")
        if "mfu" in rec:
            line += f" | MFU {rec['mfu']:.1%} | mem {rec['peak_memory_gib']:.1f} GiB"
        self.write(rec, line)
        return rec

    def log_eval(self) -> dict:
        rec = self.evaluate()
        mtp = " ".join(f"d{k + 1} {l:.4f}/{a:.3f}" for k, (l, a) in enumerate(zip(rec["mtp_loss"], rec["mtp_accuracy"])))
        self.write(rec, f"eval step {self.step} | val loss {rec['loss']:.4f} acc {rec['accuracy']:.3f} | "
                        f"mtp loss/acc {mtp or '-'}")
        return rec

    def run(self, stop_after: Optional[int] = None) -> None:
        """Train to train.steps (or stop after step `stop_after`, saving a checkpoint there)."""
        t = self.cfg.train
        end = t.steps if stop_after is None else min(stop_after, t.steps)
        first_record_step = self.step + 1 if self.step else 0  # records past a resumed checkpoint are new
        tracking = trackers.opened(self.cfg, self.out_dir, first_record_step) if self.is_writer \
            else contextlib.nullcontext([])
        with tracking as self.trackers, tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                                             disable=not self.is_writer, dynamic_ncols=True, mininterval=1.0) as bar:
            if self.step == 0:
                self.log_eval()
            meter = IntervalMeter(self.cfg.model.mtp_depth, self.device)
            while self.step < end:
                result = self.train_step()
                meter.add_step(result.sums, result.tokens, result.grad_norm, result.imbalance, result.skipped)
                bar.update(1)
                last = self.step == end
                log_due = self.step % t.log_interval == 0 or last
                save_due = self.step % t.save_interval == 0 or last
                if log_due or save_due:  # the only places the loop reads the device
                    self.count_skips(meter)
                stopping = self.consecutive_skips >= t.max_skipped_steps
                if log_due or stopping:
                    rec = self.log_interval(meter)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_second']:,.0f}")
                    # The next interval's clock starts where this one stopped: writing the record (trackers
                    # included) counts as training time, so its cost shows in tokens/s.
                    meter = IntervalMeter(self.cfg.model.mtp_depth, self.device, started=meter.stopped)
                if stopping:
                    good = checkpoint.latest_checkpoint(self.out_dir)
                    raise TrainingStopped(
                        f"stopped at step {self.step}: {self.consecutive_skips} consecutive steps had a non-finite "
                        f"loss or gradient (train.max_skipped_steps={t.max_skipped_steps}). The last good checkpoint "
                        f"is {good or 'none (no checkpoint was written yet)'}; lower train.lr or raise "
                        "train.warmup_steps and resume from it")
                eval_due = self.step % t.eval_interval == 0 or self.step == t.steps
                # Never checkpoint inside a run of skipped steps: the last good checkpoint stays `latest`.
                save_now = save_due and self.consecutive_skips == 0
                if eval_due or save_now:
                    with meter.off_the_clock():
                        if eval_due:
                            self.log_eval()
                        if save_now:
                            self.save()
        if self.step >= t.steps and self.saved_step != self.step and self.consecutive_skips == 0:
            self.save()  # e.g. a resumed run that was already complete but whose last save was lost

    def finish(self) -> str:
        """Plot and summary table of the whole run (all records, across resumes)."""
        records = self.log.records()
        plot = self.out_dir / "metrics.png"
        entropy = report.unigram_entropy(self.data.val_tokens)
        report.plot_metrics(records, plot, entropy)
        tokens_per_second = self.trained_tokens / self.train_seconds if self.train_seconds else float("nan")
        wall = time.perf_counter() - self.started
        ckpt = checkpoint.latest_checkpoint(self.out_dir)
        val = [r for r in records if r["kind"] == "eval"]
        summary = {"step": self.step, "tokens": self.tokens, "unigram_entropy": entropy,
                   "unigram_baseline": self.data.unigram_baseline,
                   "tokens_per_second": tokens_per_second, "wall_seconds": wall,
                   "first_eval": val[0] if val else None, "last_eval": val[-1] if val else None,
                   "checkpoint": str(ckpt), "skipped_steps": self.total_skips}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return report.summary_table(records, entropy, self.data.unigram_baseline, tokens_per_second, wall,
                                    {"metrics": self.log.path, "plot": plot, "checkpoint": ckpt,
                                     "summary": self.out_dir / "summary.json"})
