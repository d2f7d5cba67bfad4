"""optim.adamw_update over a whole parameter group in one Triton launch, for CUDA.

torch's fused AdamW does this for moments in the parameters' dtype; ours keeps them in bf16 over fp32
parameters, which no torch kernel takes, and per-parameter calls from Python leave the GPU waiting for
the host (notes/gpu/NOTES.md, issue 25). So each program updates a few consecutive blocks of one tensor,
finding the tensor's parameter, gradient, moments and step count through a table of addresses, as
multi-tensor kernels do. The table is rebuilt only when an address changes and is uploaded without a host
wait. Clipping's global gradient norm runs over the same block map, also in one launch.

The arithmetic is optim.adamw_update's (the CPU reference; the GPU test compares them).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# (Elements a block, warps a program, blocks a program) by the parameters' dtype: the fastest of those
# tools/bench_optimizer_update.py measured on an H200 (notes/gpu/NOTES.md, issue 25). 4 elements a thread
# (512 over 4 warps): with 8 a thread the sm90 build needs over three times the registers, and a
# memory-bound kernel wants every warp an SM can hold.
LAUNCH = {torch.float32: (512, 4, 8), torch.bfloat16: (512, 4, 8)}
DTYPES = {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _tensor_pointer(addresses, row, n_tensors, t, dtype: tl.constexpr):
    # torch's allocator aligns every tensor it hands out: the hint lets loads and stores be vectorized
    return tl.multiple_of(tl.load(addresses + row * n_tensors + t).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _adamw_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, offsets, mask, step, lr, grad_scale,
                 beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay, PARAM_DTYPE: tl.constexpr,
                 MOMENT_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr):
    # IEEE division and square root (Triton's defaults approximate them), as torch computes them
    g = tl.div_rn(tl.load(grad_ptr + offsets, mask=mask).to(tl.float32), grad_scale)
    m = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
    m = m + (1 - beta1) * (g - m)
    v = v * beta2 + (1 - beta2) * g * g
    bias1 = 1 - tl.exp2(step * log2_beta1)
    bias2 = 1 - tl.exp2(step * log2_beta2)
    update = tl.div_rn(tl.div_rn(m, bias1), tl.div_rn(tl.sqrt_rn(v), tl.sqrt_rn(bias2)) + eps)
    if HAS_MASTER:
        weights = tl.load(master_ptr + offsets, mask=mask)
    else:
        weights = tl.load(param_ptr + offsets, mask=mask)
    weights = weights * (1 - lr * weight_decay) - lr * update
    if HAS_MASTER:
        tl.store(master_ptr + offsets, weights, mask=mask)
    tl.store(param_ptr + offsets, weights.to(PARAM_DTYPE), mask=mask)
    tl.store(exp_avg_ptr + offsets, m.to(MOMENT_DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v.to(MOMENT_DTYPE), mask=mask)


@triton.jit
def _adamw_blocks(addresses, block_tensor, block_start, numels, n_tensors, lr_ptr, grad_scale_ptr, skip_ptr,
                  beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
                  PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                  BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # A program updates ITERS consecutive blocks of one tensor: the table lookups below are a chain of
    # dependent loads, paid once per program, and a loop keeps one block's values in registers at a time.
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK * ITERS)
    numel = tl.load(numels + t)
    param = _tensor_pointer(addresses, 0, n_tensors, t, PARAM_DTYPE)
    grad = _tensor_pointer(addresses, 1, n_tensors, t, PARAM_DTYPE)
    exp_avg = _tensor_pointer(addresses, 2, n_tensors, t, MOMENT_DTYPE)
    exp_avg_sq = _tensor_pointer(addresses, 3, n_tensors, t, MOMENT_DTYPE)
    step = tl.load(_tensor_pointer(addresses, 4, n_tensors, t, tl.float32))  # this step already counted
    master = _tensor_pointer(addresses, 5 if HAS_MASTER else 0, n_tensors, t, tl.float32)
    lr, grad_scale = tl.load(lr_ptr), tl.load(grad_scale_ptr)
    if tl.load(skip_ptr) == 0:  # a skipped step writes nothing
        for i in range(ITERS):
            offsets = start + i * BLOCK + tl.arange(0, BLOCK)
            if start + (i + 1) * BLOCK <= numel:  # whole blocks unmasked, so their loads and stores are vectorized
                _adamw_block(param, grad, exp_avg, exp_avg_sq, master, offsets, None, step, lr, grad_scale,
                             beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay, PARAM_DTYPE, MOMENT_DTYPE,
                             HAS_MASTER)
            else:
                _adamw_block(param, grad, exp_avg, exp_avg_sq, master, offsets, offsets < numel, step, lr,
                             grad_scale, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay, PARAM_DTYPE,
                             MOMENT_DTYPE, HAS_MASTER)


@triton.jit
def _sum_squares_blocks(addresses, block_tensor, block_start, numels, partial_sums, DTYPE: tl.constexpr,
                        BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # one partial sum a program, accumulated in fp32 (the update's block map: ITERS blocks of one tensor)
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK * ITERS)
    numel = tl.load(numels + t)
    tensor = _tensor_pointer(addresses, 0, 1, t, DTYPE)
    total = tl.zeros([BLOCK], tl.float32)
    for i in range(ITERS):
        offsets = start + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(tensor + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
        total += x * x
    tl.store(partial_sums + pid, tl.sum(total))


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf  # beta ** step = 0 for every step >= 1


class MultiTensorAdamW:
    """adamw_update_all's signature, one launch per call. Keeps, per parameter group, the block map
    (static: sizes do not change) and the address table of the last call. `block` elements a block,
    `num_warps` and `iters` blocks a program (defaults: LAUNCH's for the parameters' dtype):
    tools/bench_optimizer_update.py times the choices."""

    def __init__(self, block: int | None = None, num_warps: int | None = None, iters: int | None = None):
        if block is not None and (block & (block - 1) or block < 128):
            raise ValueError(f"block={block}: a power of two >= 128 (Triton's block sizes)")
        self.block, self.num_warps, self.iters = block, num_warps, iters
        self._blocks: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._addresses: dict[tuple, tuple[list[int], torch.Tensor]] = {}

    def _launch(self, dtype: torch.dtype) -> tuple[int, int, int]:
        """(block, warps, blocks a program): this instance's choices, else LAUNCH's for `dtype`."""
        block, num_warps, iters = LAUNCH.get(dtype, LAUNCH[torch.float32])
        return self.block or block, self.num_warps or num_warps, self.iters or iters

    def _block_map(self, key: tuple, params: list[torch.Tensor], block: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tensor of each program, its first element, every tensor's size); a program covers `block` elements."""
        key = key + (block,)
        if key not in self._blocks:
            numels = [p.numel() for p in params]
            counts = [math.ceil(n / block) for n in numels]
            tensor_of_block = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32),
                                                      torch.tensor(counts))
            start_of_block = torch.cat([torch.arange(c, dtype=torch.int64) * block for c in counts])
            device = params[0].device
            # built once, at the first step: the only blocking copies this class makes
            self._blocks[key] = (tensor_of_block.to(device), start_of_block.to(device),
                                 torch.tensor(numels, dtype=torch.int64, device=device))
        return self._blocks[key]

    def _address_table(self, key: tuple, tensors: list[list[torch.Tensor]], check) -> torch.Tensor:
        """The data addresses of `tensors`, one row a list, on the device; `check(tensors)` runs when they change."""
        addresses = [t.data_ptr() for group in tensors for t in group]
        cached = self._addresses.get(key)
        if cached is None or cached[0] != addresses:
            check(tensors)
            # pinned staging and an asynchronous copy: the host does not wait for the device
            table = torch.tensor(addresses, dtype=torch.int64)
            device = tensors[0][0].device
            if device.type == "cuda":  # (Triton's interpreter runs the kernel on host tensors)
                table = table.pin_memory().to(device, non_blocking=True)
            self._addresses[key] = (addresses, table)
        return self._addresses[key][1]

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lr: torch.Tensor, beta1: float,
                 beta2: float, eps: float, weight_decay: float, grad_scale: torch.Tensor,
                 skip: torch.Tensor, masters: list[torch.Tensor] | None = None) -> None:
        key = tuple(id(p) for p in params)
        block, num_warps, iters = self._launch(params[0].dtype)
        tensor_of_block, start_of_block, numels = self._block_map(key, params, block * iters)
        table = self._address_table(key, [params, grads, exp_avgs, exp_avg_sqs, steps] + ([masters] if masters else []),
                                    _check_update)
        # alpha picks the Tensor overload: without it the 0-d tensor binds as a Scalar, an .item() sync
        torch._foreach_add_(steps, (~skip).float(), alpha=1.0)
        _adamw_blocks[(tensor_of_block.numel(),)](
            table, tensor_of_block, start_of_block, numels, len(params), lr, grad_scale.float(),
            skip.to(torch.uint8), beta1, beta2, _log2(beta1), _log2(beta2), eps, weight_decay,
            PARAM_DTYPE=DTYPES[params[0].dtype], MOMENT_DTYPE=DTYPES[exp_avgs[0].dtype], HAS_MASTER=masters is not None,
            BLOCK=block, ITERS=iters, num_warps=num_warps)

    def sum_of_squares(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The sum of the squares of every element of `tensors` (contiguous, fp32 or bf16, one dtype), in
        fp32 on the device: one launch for the list, as the update's (clipping's global gradient norm)."""
        key = ("sum_of_squares",) + tuple(t.numel() for t in tensors)
        block, num_warps, iters = self._launch(tensors[0].dtype)
        tensor_of_block, start_of_block, numels = self._block_map(key, tensors, block * iters)
        table = self._address_table(key, [tensors], _check_summed)
        partial_sums = torch.empty(tensor_of_block.numel(), dtype=torch.float32, device=tensors[0].device)
        _sum_squares_blocks[(tensor_of_block.numel(),)](table, tensor_of_block, start_of_block, numels, partial_sums,
                                                        DTYPE=DTYPES[tensors[0].dtype], BLOCK=block, ITERS=iters,
                                                        num_warps=num_warps)
        return partial_sums.sum()


def _check_update(tensors: list[list[torch.Tensor]]) -> None:
    params, grads, exp_avgs, exp_avg_sqs, _, *masters = tensors
    weights = masters[0] if masters else params
    if (any(t.dtype != torch.float32 for t in weights)
            or any(t.dtype not in DTYPES or t.dtype != params[0].dtype for t in params + grads)
            or not all(t.is_contiguous() for group in tensors[:4] + masters for t in group)):
        raise ValueError("MultiTensorAdamW updates contiguous fp32 weights (the parameters, or their "
                         "master weights) from gradients in the parameters' dtype, fp32 or bf16; keep "
                         "train.optimizer_state_dtype and train.param_dtype at fp32 for other dtypes")


def _check_summed(tensors: list[list[torch.Tensor]]) -> None:
    (summed,) = tensors
    if any(t.dtype != summed[0].dtype or t.dtype not in DTYPES or not t.is_contiguous() for t in summed):
        raise ValueError("MultiTensorAdamW.sum_of_squares takes contiguous tensors of one dtype, fp32 or bf16")
