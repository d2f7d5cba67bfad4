"""dsmtp.model.moe_triton's kernels run by Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by
tests/conftest.py without CUDA: the same kernel code, executed with numpy), against float64 torch
references, on shapes that leave partial tiles in both directions; the custom ops around them
(kernels.gather_rows, kernels.gather_sum_rows, kernels.swiglu_activation, kernels.combine_backward) checked by
torch.library.opcheck; the combine's fused backward inside moe._CombinePairs. The compiled kernels run
against the same references in tests/gpu/test_gpu_kernels.py."""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from dsmtp.model import kernels


@pytest.fixture
def moe_triton():
    """The module, its kernels run by Triton's interpreter (tests/conftest.py turns it on without CUDA)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off where CUDA is present: tests/gpu runs the compiled kernels")
    return importlib.import_module("dsmtp.model.moe_triton")


ROWS, COLUMNS = 45, 300  # neither a multiple of the kernels' tile sizes


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16)])
def test_gather_rows_matches_index_select(moe_triton, scaled, src_dtype, out_dtype):
    src = torch.randn(20, COLUMNS, dtype=torch.float64)
    index = torch.randint(0, 20, (ROWS,))
    scale = torch.rand(ROWS, dtype=torch.float64) if scaled else None
    ref = src[index] * (scale[:, None] if scaled else 1)
    out = moe_triton.gather_rows(src.to(src_dtype), index, None if scale is None else scale.float(), out_dtype)
    assert out.dtype == out_dtype and out.shape == (ROWS, COLUMNS)
    # one rounding of src, one of the output (relative 2^-8 each in bf16)
    tolerance = 1e-6 if out_dtype == src_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), ref, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_swiglu_backward_matches_autograd(moe_triton, dtype, tolerance):
    gate_up = torch.randn(ROWS, 2 * COLUMNS, dtype=torch.float64, requires_grad=True)
    grad_h = torch.randn(ROWS, COLUMNS, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(grad_h)
    out = moe_triton.swiglu_backward(gate_up.detach().to(dtype), grad_h.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), gate_up.grad, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gather_sum_rows_matches_float64(moe_triton, dtype, tolerance):
    """Each token's k rows, found through a shuffled index, summed (the gather's backward)."""
    t, k = 15, 3
    src, index = torch.randn(t * k, COLUMNS, dtype=torch.float64), torch.randperm(t * k)
    ref = src[index].view(t, k, COLUMNS).sum(dim=1)
    out = moe_triton.gather_sum_rows(src.to(dtype), index, k)
    assert out.dtype == dtype and out.shape == (t, COLUMNS)
    torch.testing.assert_close(out.double(), ref, rtol=tolerance, atol=tolerance)


def test_combine_backward_matches_float64(moe_triton):
    """Both gradients of the combine from rows in a shuffled pair order; the hidden size spans two of
    the kernel's 1,024-column blocks, the second partial, and the rows leave a partial tile."""
    t, k, h = 13, 3, 1300
    order = torch.randperm(t * k)
    y = torch.randn(t * k, h).to(torch.bfloat16).double()  # as the experts hand them over, exactly
    gates, grad = torch.rand(t, k, dtype=torch.float64), torch.randn(t, h, dtype=torch.float64)
    tokens, flat_gates = order // k, gates.flatten()[order]
    ref_grad_y = grad[tokens] * flat_gates[:, None]
    ref_grad_gates = torch.zeros(t * k, dtype=torch.float64).index_put_((order,), (y * grad[tokens]).sum(dim=-1))
    grad_y, grad_gates = moe_triton.combine_backward(grad.float(), y.to(torch.bfloat16), order, gates.float())
    assert grad_y.dtype == torch.bfloat16 and grad_gates.dtype == torch.float32
    torch.testing.assert_close(grad_y.double(), ref_grad_y, rtol=8e-3, atol=8e-3)  # bf16 output
    torch.testing.assert_close(grad_gates.double(), ref_grad_gates, rtol=1e-4, atol=1e-3)  # float32 sums


def test_combine_through_the_fused_backward_matches_the_reference_path(moe_triton, monkeypatch):
    """moe._CombinePairs with kernels.fuses_combine_backward forced on for the CPU (the kernel
    interpreted): the gradients of the expert outputs and of the gates as its torch expressions give."""
    from dsmtp.model.moe import combine_pairs, sort_pairs_by_expert

    t, k, h = 21, 2, 64
    order, inverse = sort_pairs_by_expert(torch.rand(t, 8).topk(k, dim=1).indices)
    y, gates, grad = torch.randn(t * k, h), torch.rand(t, k), torch.randn(t, h)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(kernels, "fuses_combine_backward", lambda grad, fused=fused: fused)
        leaves = y.clone().requires_grad_(), gates.clone().requires_grad_()
        combine_pairs(leaves[0], order, inverse, leaves[1]).backward(grad)
        results.append([leaf.grad for leaf in leaves])
    for fast, slow in zip(results[1], results[0]):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_no_rows(moe_triton):
    """An empty batch (a rank that routes no tokens, an empty decode step) returns empty tensors."""
    src = torch.randn(4, 64)
    assert moe_triton.gather_rows(src, torch.zeros(0, dtype=torch.int64), None, torch.bfloat16).shape == (0, 64)
    assert moe_triton.swiglu_backward(torch.randn(0, 128), torch.randn(0, 64)).shape == (0, 128)


def test_custom_ops_pass_opcheck(moe_triton):
    """Schemas, fake (shape-only) implementations for torch.compile, and the SwiGLU's autograd."""
    src, index, scale = torch.randn(20, 64), torch.randint(0, 20, (33,)), torch.rand(33)
    torch.library.opcheck(kernels._gather_rows_triton, (src, index, scale, torch.bfloat16))
    torch.library.opcheck(kernels._gather_rows_triton, (src, index, None, torch.float32))
    gate_up, grad_h = torch.randn(33, 128), torch.randn(33, 64)
    torch.library.opcheck(kernels._swiglu_backward_triton, (gate_up, grad_h))
    torch.library.opcheck(kernels._gather_sum_rows_triton, (torch.randn(33, 64), torch.randperm(33), 3))
    order, gates = torch.randperm(33), torch.rand(11, 3)
    torch.library.opcheck(kernels._combine_backward_triton, (torch.randn(11, 64), torch.randn(33, 64), order, gates))
    gate_up.requires_grad_()
    ref = gate_up.detach().clone().requires_grad_()
    kernels._SwigluActivation.apply(gate_up).backward(grad_h)
    kernels.swiglu_activation(ref).backward(grad_h)  # a CPU tensor: the torch expression
    torch.testing.assert_close(gate_up.grad, ref.grad, rtol=1e-5, atol=1e-5)
