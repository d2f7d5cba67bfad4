"""train.overlap_update: the optimizer update overlapped with the next step's forward.

The update is memory-bound (every weight, gradient and moment read and written once) and, in turn, holds up
the next forward for all of its length. The next forward's first layers need only their own weights, so the
update runs on a side stream, one stage at a time in forward order: the parameters outside the transformer
layers and MTP modules (embedding, output head, final norm: all used from the model's entry on), then each
trunk layer's, then each MTP module's. An event marks each stage's end, and the forward waits for stage i's
event as it enters stage i's module. Each tensor's arithmetic is the in-turn update's, so the parameters
match it bit for bit (tests/gpu/test_gpu_train.py).

Concurrent kernels share the SMs block by block: forward and backward run on a stream of the highest
priority (`computing`) and the update on one of the lowest, so that as the update's short blocks finish, the
forward's blocks are dispatched first. The gradients and clipping's scale the side stream reads are marked as
in use by it, so releasing them (zero_grad) cannot hand their memory to the next forward before the update
has read them. Anything else that reads the parameters or the optimizer's state (a checkpoint) calls
`synchronize` first.

Not under train.cuda_graph (the validator refuses the pair): captured into a graph as external-event waits,
the forward's waits did not hold when it was replayed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from dsmtp.train.optim import AdamWLowPrecisionMoments


def forward_stages(model: nn.Module) -> tuple[list[nn.Module], list[list[nn.Parameter]]]:
    """(entry modules, their stages' parameters) in forward order: the model itself with every parameter
    outside its trunk layers and MTP modules, then each trunk layer, then each MTP module (a module's
    parameters are used only inside it; the shared embedding and head belong to the first stage)."""
    entries = [model, *model.layers, *model.mtp]
    owned = {id(p) for module in entries[1:] for p in module.parameters()}
    stages = [[p for p in model.parameters() if id(p) not in owned]]
    return entries, stages + [list(module.parameters()) for module in entries[1:]]


@torch.compiler.disable  # trunk layers are compiled with their hooks: the wait stays outside the graph
def _wait(event: torch.cuda.Event) -> None:
    torch.cuda.current_stream().wait_event(event)


class OverlappedUpdate:
    """Steps `optimizer` stage by stage on a side stream (see the module's docstring); `step` is what
    optim.clipped_step calls in place of optimizer.step()."""

    def __init__(self, model: nn.Module, optimizer: AdamWLowPrecisionMoments):
        if not isinstance(optimizer, AdamWLowPrecisionMoments):
            raise ValueError(f"train.overlap_update steps dsmtp's AdamW stage by stage, not {type(optimizer).__name__}: "
                             "set train.optimizer_state_dtype=bf16 (or train.param_dtype=bf16)")
        entries, self.stages = forward_stages(model)
        self.optimizer = optimizer
        self.stream = torch.cuda.Stream(priority=0)  # the lowest priority there is (the default stream's)
        self.compute = torch.cuda.Stream(priority=-100)  # clamped to the highest
        self.events = [torch.cuda.Event() for _ in self.stages]
        for module, event in zip(entries, self.events):
            module.register_forward_pre_hook(lambda module, args, event=event: _wait(event))

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Runs the enclosed work (a training step: forward, backward, clipping, the update's launch) on the
        high-priority compute stream, ordered after and before the caller's stream."""
        outer = torch.cuda.current_stream()
        self.compute.wait_stream(outer)
        with torch.cuda.stream(self.compute):
            yield
        outer.wait_stream(self.compute)

    def step(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())  # backward and clipping's norm are done
        read = [p.grad for stage in self.stages for p in stage if p.grad is not None]
        for tensor in read + [self.optimizer.grad_scale, self.optimizer.found_inf]:
            tensor.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            self.optimizer.step(stages=self.stages, after_stage=lambda i: self.events[i].record())

    def synchronize(self) -> None:
        """The current stream waits for the last update: before anything but the forward reads parameters."""
        torch.cuda.current_stream().wait_stream(self.stream)
