"""Pipeline parallelism: the trunk split into contiguous stages, run with a 1F1B schedule.

Stage 0 holds the embedding and the first layers; the last stage holds its layers, the final norm,
the D MTP depths (sequential modules or parallel heads), the output head and a tied copy of the
embedding (sequential MTP depth k embeds token t_{i+k}).
The copies' gradients are summed over megatron's embedding group (first and last stage) by the engine,
so both copies take identical optimizer steps.

Why our own schedule and not DeepSpeed's PipelineModule: DeepSpeed's engine passes one tensor tuple
between stages and computes the loss only on the last stage from (outputs, labels). Our stages each
add their own auxiliary balance loss, the last stage needs the raw tokens for the MTP inputs, every
stage's router counts feed the bias update, and expert parameters must be reduced over the
expert-data-parallel group, which DeepSpeed only does for its own MoE class. Here a stage runs
`DeepSeekV3`'s own pieces (run_layers, output), so the pipelined model computes the same function
as the single-process one by construction.

Each stage keeps the parameter names of the full model (layers it does not own become empty
placeholders), so checkpoint shards and optimizer state are keyed by the single-process names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from dsmtp.model import DeepSeekV3, ModelOutput
from dsmtp.parallel.topology import Layout

# Activations and their gradients travel between stages in float32 whatever the autocast dtype (the
# residual stream is float32: parameters are float32 and autocast keeps additions in float32).
WIRE_DTYPE = torch.float32


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Contiguous layers of a stage; earlier stages take the remainder (the last one also runs the
    MTP modules and the output head)."""
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


class _NotOnThisStage(nn.Module):
    """Placeholder for a layer another stage owns: holds no parameters, must never run."""

    def forward(self, *args):
        raise RuntimeError("this layer belongs to another pipeline stage")


def prune_to_stage(model: DeepSeekV3, layout: Layout) -> range:
    """Drop what this stage does not run; returns the stage's layer indices."""
    mine = stage_layers(len(model.layers), layout.pp, layout.pp_rank)
    if layout.pp == 1:
        return mine
    for i in range(len(model.layers)):
        if i not in mine:
            model.layers[i] = _NotOnThisStage()
    if not layout.is_last_stage:
        model.norm = None
        model.head = None
        del model.mtp[:]
    if not (layout.is_first_stage or layout.is_last_stage):
        model.embed = None
    return mine


def is_tied_copy(name: str, layout: Layout) -> bool:
    """The last stage's embedding is a copy of the first stage's: count its gradient once."""
    return layout.pp > 1 and not layout.is_first_stage and name.startswith("embed.")


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S + D]


class PipelineSchedule:
    """One optimizer step's forward and backward passes over `len(micro_batches)` micro-batches, 1F1B:
    stage s runs pp - s - 1 warm-up forwards, then alternates one forward and one backward.

    Sends are asynchronous and receives blocking, so no stage waits on a send (no deadlock with gloo's
    or NCCL's point-to-point). Each micro-batch's loss is divided by the number of micro-batches.
    """

    def __init__(self, model: DeepSeekV3, layout: Layout, layers: range, hidden_size: int):
        self.model, self.layout, self.layers, self.hidden_size = model, layout, layers, hidden_size
        self.prev = layout.pp_ranks[layout.pp_rank - 1] if not layout.is_first_stage else None
        self.next = layout.pp_ranks[layout.pp_rank + 1] if not layout.is_last_stage else None

    def run(self, micro_batches: list[MicroBatch], mtp_weight: float,
            on_output: Callable[[ModelOutput], None], on_aux: Callable[[torch.Tensor], None]) -> None:
        n = len(micro_batches)
        warmup = min(self.layout.pp - self.layout.pp_rank - 1, n)
        self._pending: list[dist.Work] = []
        saved: list[tuple] = []
        for i in range(warmup):
            saved.append(self._forward(micro_batches[i], mtp_weight, n, on_output, on_aux))
        for i in range(n - warmup):
            saved.append(self._forward(micro_batches[i + warmup], mtp_weight, n, on_output, on_aux))
            self._backward(*saved[i])
            saved[i] = None
        for i in range(n - warmup, n):
            self._backward(*saved[i])
            saved[i] = None
        for work in self._pending:
            work.wait()

    def forward_only(self, mb: MicroBatch, mtp_weight: float, on_output: Callable[[ModelOutput], None],
                     on_aux: Callable[[torch.Tensor], None]) -> None:
        """One micro-batch through the stages without backward (evaluation; call under no_grad)."""
        self._pending = []
        self._forward(mb, mtp_weight, 1, on_output, on_aux)
        for work in self._pending:
            work.wait()

    def _forward(self, mb: MicroBatch, mtp_weight: float, n: int, on_output, on_aux):
        model = self.model
        b, s = mb.input_ids.shape
        cos, sin = model.rope(torch.arange(s, device=mb.input_ids.device))
        if self.prev is None:
            x_in = None
            x = model.embed(mb.input_ids)
        else:
            x_in = torch.empty(b, s, self.hidden_size, dtype=WIRE_DTYPE, device=mb.input_ids.device)
            dist.recv(x_in, src=self.prev)
            x_in.requires_grad_(torch.is_grad_enabled())
            x = x_in
        x, aux = model.run_layers([model.layers[i] for i in self.layers], x, cos, sin)
        if self.next is not None:
            on_aux(aux.detach())
            self._pending.append(dist.isend(x.detach().to(WIRE_DTYPE).contiguous(), dst=self.next))
            return x_in, [x] + ([aux / n] if aux.requires_grad else []), True
        tokens, labels = model.mtp.inputs(mb.input_ids, mb.labels)
        emb = model.embed(tokens.clamp(min=0))
        out = model.output(model.norm(x), emb, tokens, labels, aux, cos, sin, mtp_weight)
        on_output(out)
        return x_in, [out.loss / n], False

    def _backward(self, x_in, outputs: list[torch.Tensor], needs_grad_from_next: bool) -> None:
        grads = [None] * len(outputs)
        if needs_grad_from_next:
            grad = torch.empty_like(outputs[0], dtype=WIRE_DTYPE)
            dist.recv(grad, src=self.next)
            grads[0] = grad
        torch.autograd.backward(outputs, grads)
        if x_in is not None:
            self._pending.append(dist.isend(x_in.grad.contiguous(), dst=self.prev))
