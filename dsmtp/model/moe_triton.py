"""Triton kernels for memory-bound passes of the routed experts on CUDA, behind kernels.gather_rows,
kernels.gather_sum_rows, kernels.swiglu_activation and kernels.combine_backward (the torch expressions
they replace are the reference paths; tests/gpu compares them).

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
COMBINE_ROWS = 4  # the combine's backward walks whole rows (a dot product each) in column blocks of up to 1,024
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
def _gather_sum_rows(src, index, out, n_rows, n_columns, k, OUT_DTYPE: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    columns = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (columns < n_columns)[None, :]
    total = tl.zeros((BLOCK_ROWS, BLOCK_COLUMNS), tl.float32)
    for j in range(k):
        source_rows = tl.load(index + rows * k + j, mask=row_mask, other=0).to(tl.int64)
        total += tl.load(src + source_rows[:, None] * n_columns + columns[None, :], mask=mask, other=0).to(tl.float32)
    tl.store(out + rows[:, None] * n_columns + columns[None, :], total.to(OUT_DTYPE), mask=mask)


def gather_sum_rows(src: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """out[t] = sum over j < k of src[index[t * k + j]] (float32 sums, in src's dtype); src [N, H]
    contiguous, index [T * k]."""
    n_rows, n_columns = index.numel() // k, src.shape[1]
    out = torch.empty(n_rows, n_columns, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(n_columns, BLOCK_COLUMNS))
    _gather_sum_rows[grid](src, index, out, n_rows, n_columns, k, OUT_DTYPE=OUT_DTYPES[src.dtype],
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


@triton.jit
def _combine_backward(grad, y, order, gates, grad_y, grad_gates, n_rows, n_columns, k,
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_mask = rows < n_rows
    pairs = tl.load(order + rows, mask=row_mask, other=0).to(tl.int64)
    tokens = pairs // k
    gate = tl.load(gates + pairs, mask=row_mask, other=0).to(tl.float32)
    dot = tl.zeros((BLOCK_ROWS,), tl.float32)
    for start in range(0, n_columns, BLOCK_COLUMNS):
        columns = start + tl.arange(0, BLOCK_COLUMNS)
        mask = row_mask[:, None] & (columns < n_columns)[None, :]
        token_grad = tl.load(grad + tokens[:, None] * n_columns + columns[None, :], mask=mask, other=0).to(tl.float32)
        offsets = rows[:, None] * n_columns + columns[None, :]
        output = tl.load(y + offsets, mask=mask, other=0).to(tl.float32)
        tl.store(grad_y + offsets, (token_grad * gate[:, None]).to(grad_y.dtype.element_ty), mask=mask)
        dot += tl.sum(output * token_grad, axis=1)
    tl.store(grad_gates + pairs, dot, mask=row_mask)


def combine_backward(grad: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
                     gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The combine's two gradients from one read of each row: for expert output row p of pair
    order[p] = t * k + j, grad_y[p] = grad[t] * gates[t, j] (in y's dtype) and the gate's gradient
    grad_gates[t * k + j] = y[p] . grad[t] (float32, [T * k]). grad [T, H], y [T * k, H] contiguous."""
    n_rows, n_columns = y.shape
    grad_y = torch.empty_like(y)
    grad_gates = torch.empty(n_rows, dtype=torch.float32, device=y.device)
    if n_rows:
        _combine_backward[(triton.cdiv(n_rows, COMBINE_ROWS),)](
            grad, y, order, gates, grad_y, grad_gates, n_rows, n_columns, gates.shape[-1],
            BLOCK_ROWS=COMBINE_ROWS, BLOCK_COLUMNS=min(1024, triton.next_power_of_2(n_columns)), num_warps=NUM_WARPS)
    return grad_y, grad_gates
