"""dsmtp.model.moe_triton's kernels run by Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by
tests/conftest.py without CUDA: the same kernel code, executed with numpy), against float64 torch
references, on shapes that leave partial tiles in both directions; the custom ops around them
(kernels.gather_rows, kernels.swiglu_activation) checked by torch.library.opcheck. The compiled kernels run
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
    gate_up.requires_grad_()
    ref = gate_up.detach().clone().requires_grad_()
    kernels._SwigluActivation.apply(gate_up).backward(grad_h)
    kernels.swiglu_activation(ref).backward(grad_h)  # a CPU tensor: the torch expression
    torch.testing.assert_close(gate_up.grad, ref.grad, rtol=1e-5, atol=1e-5)
