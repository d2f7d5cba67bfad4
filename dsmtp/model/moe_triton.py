"""Triton kernels for memory-bound passes of the routed experts on CUDA, behind kernels.gather_rows
and kernels.swiglu_activation (the torch expressions they replace are the reference paths; tests/gpu compares them).

Each works on [rows, columns] tiles with one index or one row offset per tile row, so the compiler sees
each row's columns as contiguous and moves 16 bytes a load. torch.compile's own kernels for these passes
index every element on its own: a gathered row's address depends on a loaded index, and the SwiGLU
gradient, written as two slices of one tensor, reads each gate and up value twice. The tile sizes are
within 7% of the best in session 14's sweep on an H200 (notes/gpu/moe_triton_sweep_s14_h200.txt).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 16
BLOCK_COLUMNS = 256
NUM_WARPS = 8
OUT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _gather_rows(src, index, scale, out, n_rows, n_columns, HAS_SCALE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    columns = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (columns < n_columns)[None, :]
    source_rows = tl.load(index + rows, mask=row_mask, other=0).to(tl.int64)
    values = tl.load(src + source_rows[:, None] * n_columns + columns[None, :], mask=mask)
    if HAS_SCALE:
        values = values.to(tl.float32) * tl.load(scale + rows, mask=row_mask, other=0).to(tl.float32)[:, None]
    tl.store(out + rows.to(tl.int64)[:, None] * n_columns + columns[None, :], values.to(OUT_DTYPE), mask=mask)


def gather_rows(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    """out[i] = src[index[i]] * scale[i] (scale None: 1), in out_dtype; src [T, H] contiguous."""
    n_rows, n_columns = index.numel(), src.shape[1]
    out = torch.empty(n_rows, n_columns, dtype=out_dtype, device=src.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(n_columns, BLOCK_COLUMNS))
    _gather_rows[grid](src, index, index if scale is None else scale, out, n_rows, n_columns,
                       HAS_SCALE=scale is not None, OUT_DTYPE=OUT_DTYPES[out_dtype],
                       BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS, num_warps=NUM_WARPS)
    return out


@triton.jit
def _swiglu_backward(gate_up, grad_h, grad_gate_up, n_rows, inter, OUT_DTYPE: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    columns = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    mask = (rows < n_rows)[:, None] & (columns < inter)[None, :]
    gate_offsets = rows[:, None] * (2 * inter) + columns[None, :]
    gate = tl.load(gate_up + gate_offsets, mask=mask).to(tl.float32)
    up = tl.load(gate_up + gate_offsets + inter, mask=mask).to(tl.float32)
    grad = tl.load(grad_h + rows[:, None] * inter + columns[None, :], mask=mask).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    silu = gate * sigmoid
    # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    tl.store(grad_gate_up + gate_offsets, (grad * up * sigmoid * (1 + gate * (1 - sigmoid))).to(OUT_DTYPE), mask=mask)
    tl.store(grad_gate_up + gate_offsets + inter, (grad * silu).to(OUT_DTYPE), mask=mask)


def swiglu_backward(gate_up: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
    """The gradient of h = silu(gate) * up w.r.t. gate_up = [gate | up] [N, 2I], from grad_h [N, I];
    both contiguous."""
    n_rows, inter = grad_h.shape
    grad_gate_up = torch.empty_like(gate_up)
    if grad_gate_up.numel() == 0:
        return grad_gate_up
    grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(inter, BLOCK_COLUMNS))
    _swiglu_backward[grid](gate_up, grad_h, grad_gate_up, n_rows, inter, OUT_DTYPE=OUT_DTYPES[gate_up.dtype],
                           BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS, num_warps=NUM_WARPS)
    return grad_gate_up
