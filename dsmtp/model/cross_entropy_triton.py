"""A Triton kernel for the output heads' cross-entropy on CUDA, behind kernels.linear_cross_entropy (the
torch expressions in dsmtp.parallel.vocab are the reference path; tests/gpu compares them).

One program per row reads the row's logits twice (the second time mostly from L2): first for the
log-sum-exp, the target's logit and the row's largest logit, then to overwrite them with the loss's
gradient, softmax - one_hot(target). The logits' bytes are read once from memory and written once, in
forward: backward has no pass over [rows, vocabulary] left, where the compiled loss reads the logits in
forward and again in backward, and writes a second [rows, vocabulary] tensor for their gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 16
# below every logit a run produces, and finite: a lane that has seen only masked columns keeps
# exp(running max - running max) = 1 times a zero sum, where -inf would make inf - inf
_FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _cross_entropy_rows(logits, targets, loss, correct, n_columns, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = logits + row * n_columns
    target = tl.load(targets + row)
    running_max = tl.full((BLOCK,), _FLOOR, tl.float32)
    running_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_columns, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        x = tl.load(logits + columns, mask=columns < n_columns, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(x - new_max)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    log_sum_exp = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
    target_logit = tl.load(logits + target).to(tl.float32)
    tl.store(loss + row, log_sum_exp - target_logit)
    tl.store(correct + row, target_logit >= row_max)  # ties count as hits, as vocab.top1_correct
    for start in range(0, n_columns, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < n_columns
        x = tl.load(logits + columns, mask=mask).to(tl.float32)
        grad = tl.exp(x - log_sum_exp) - (columns == target).to(tl.float32)
        tl.store(logits + columns, grad.to(logits.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy (float32) and whether the target is a largest logit, for logits [N, V]
    (contiguous) and targets [N] in [0, V); overwrites the logits with softmax - one_hot(target)."""
    n_rows, n_columns = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    correct = torch.empty(n_rows, dtype=torch.bool, device=logits.device)
    if n_rows:
        _cross_entropy_rows[(n_rows,)](logits, targets, loss, correct, n_columns, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return loss, correct
