"""train.cuda_graph: a training step's forward and backward replayed as one CUDA graph.

A step is a few thousand kernels (compiled layers, attention, grouped GEMMs and their backward),
launched one by one from Python. A CUDA graph records them once, with their arguments and memory
addresses, and replays them all with one launch. At small.yaml the host keeps ahead of the GPU
anyway; the graph removes what is left of the gaps between kernels (notes/code-measurements.md).
It needs what the step already guarantees: static shapes, and no host read (the step's statistics
and its skip decision stay on the device).

What crosses the graph's boundary:
- inputs: each call copies its micro-batches and MTP weight into the buffers the graph reads;
- outputs: the tensors the recorded call returned, overwritten by every replay: consume them (queue
  the kernels that read them) before the next call;
- gradients: every replay writes them into the buffers recorded at capture, and hands those back to the
  parameters (the optimizer's zero_grad(set_to_none=True) drops them after each step).
The optimizer step and the router-bias update stay outside: a few fused kernels, launched while the
GPU still runs the graph.

Megatron-LM's full-iteration CUDA graphs do the same; torch.compile's mode="reduce-overhead" captures
each compiled region on its own, which leaves the launches between regions and all of backward's
bookkeeping on the host.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

import torch
from torch import nn

Outputs = TypeVar("Outputs")
EAGER_STEPS = 3  # calls run eagerly before the capture


class GraphedBackward(Generic[Outputs]):
    """Runs `backward(batches, mtp_weight)` (forward and backward of one step's micro-batches; returns
    device tensors) eagerly for its first EAGER_STEPS calls, then captures it once and replays it.

    The eager calls are real training steps: they compile what train.compile compiles and create the
    libraries' workspaces, on a side stream as capture requires (PyTorch's CUDA graphs notes, whole
    network capture). The capture itself runs nothing, so the call that captures also replays.
    """

    def __init__(self, backward: Callable[[torch.Tensor, torch.Tensor], Outputs], params: list[nn.Parameter]):
        self.backward = backward
        self.params = params
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.batches: torch.Tensor | None = None  # the graph's input buffers
        self.mtp_weight = torch.zeros((), device="cuda")
        self.outputs: Outputs | None = None
        self.grads: list[torch.Tensor | None] = []

    def __call__(self, batches: torch.Tensor, mtp_weight: float) -> Outputs:
        """batches [grad_accum, micro_batch, S + D + 1] tokens (on any device); the step's MTP loss weight."""
        if self.batches is None:
            self.batches = torch.empty(batches.shape, dtype=batches.dtype, device="cuda")
        if batches.shape != self.batches.shape:
            raise ValueError(f"a CUDA graph replays one batch shape: got {tuple(batches.shape)}, "
                             f"captured {tuple(self.batches.shape)}")
        self.batches.copy_(batches, non_blocking=True)
        self.mtp_weight.fill_(mtp_weight)
        if self.calls < EAGER_STEPS:
            self.calls += 1
            return self._eager()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        return self.outputs

    def _eager(self) -> Outputs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.backward(self.batches, self.mtp_weight)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture(self) -> None:
        for p in self.params:  # gradients allocated inside the graph, at the addresses every replay writes
            p.grad = None
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.backward(self.batches, self.mtp_weight)
        self.grads = [p.grad for p in self.params]
