"""kernels.quack_grouped_swiglu's own part on the CPU: the custom ops and their autograd, the gate/up
interleave, group boundaries (empty and unaligned groups), the weight gradients, tracing by torch.compile.
quack's three GEMMs are stood in by what its documentation says they compute, in float32; the GPU test
runs the real kernels against the same float64 reference (tests/gpu/test_gpu_kernels.py)."""

import pytest
import torch
import torch.nn.functional as F

from dsmtp.model import kernels


class DocumentedQuack:
    """quack.gemm_interface's gemm, gemm_gated and gemm_dgated with varlen_m: rows cu_seqlens_m[e] to
    cu_seqlens_m[e + 1] of A times B[e] ([K, N]); the gated pair of output column 2j is 2j + 1."""

    @staticmethod
    def _grouped(a, b, cu_seqlens_m):
        out = torch.zeros(a.shape[0], b.shape[-1])
        for e in range(b.shape[0]):
            rows = slice(int(cu_seqlens_m[e]), int(cu_seqlens_m[e + 1]))
            out[rows] = a[rows].float() @ b[e].float()
        return out

    def gemm(self, A, B, cu_seqlens_m, tuned):
        return self._grouped(A, B, cu_seqlens_m).to(A.dtype)

    def gemm_gated(self, A, B, activation, cu_seqlens_m, tuned):
        assert activation == "swiglu"
        preact = self._grouped(A, B, cu_seqlens_m)
        return preact.to(A.dtype), (F.silu(preact[:, 0::2]) * preact[:, 1::2]).to(A.dtype)

    def gemm_dgated(self, A, B, PreAct, activation, cu_seqlens_m, tuned):
        assert activation == "swiglu"
        grad_h = self._grouped(A, B, cu_seqlens_m)
        gate, up = PreAct[:, 0::2].float(), PreAct[:, 1::2].float()
        sigmoid = torch.sigmoid(gate)
        grad_gate = grad_h * up * sigmoid * (1 + gate * (1 - sigmoid))
        grad_up = grad_h * gate * sigmoid
        grad_preact = torch.stack([grad_gate, grad_up], dim=-1).reshape(PreAct.shape)
        return grad_preact.to(A.dtype), (gate * sigmoid * up).to(A.dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("compiled", [False, True])
def test_quack_grouped_swiglu_glue_matches_reference(monkeypatch, compiled):
    monkeypatch.setattr(kernels, "_quack_gemm", lambda: DocumentedQuack())
    torch.manual_seed(0)
    e, h, i = 6, 64, 32
    counts = torch.tensor([0, 7, 3, 20, 0, 9])
    x = torch.randn(int(counts.sum()), h, dtype=torch.float64)
    ws = [torch.randn(e, 2, i, h, dtype=torch.float64) * 0.1, torch.randn(e, h, i, dtype=torch.float64) * 0.1]
    grad_out = torch.randn(x.shape[0], h, dtype=torch.float64)

    ref_in = [t.clone().requires_grad_() for t in (x, *ws)]
    kernels.grouped_swiglu(ref_in[0], counts, *ref_in[1:]).backward(grad_out)  # per-expert reference, float64

    # bf16 rows and fp32 weights, as the CUDA path receives them
    ours_in = [t.to(dtype).requires_grad_()
               for t, dtype in zip((x, *ws), (torch.bfloat16, torch.float32, torch.float32))]
    fn = torch.compile(kernels.quack_grouped_swiglu, backend="aot_eager") if compiled else kernels.quack_grouped_swiglu
    out = fn(ours_in[0], counts, *ours_in[1:])
    out.backward(grad_out.to(out.dtype))
    assert out.dtype == torch.bfloat16
    reference_out = kernels.grouped_swiglu(x, counts, *ws)
    assert rel_err(out, reference_out) < 1e-2
    for ours, ref in zip(ours_in, ref_in):
        assert ours.grad.shape == ref.grad.shape and rel_err(ours.grad, ref.grad) < 1e-2


def test_quack_experts_without_quack_says_so(monkeypatch):
    monkeypatch.setattr(kernels, "_quack_gemm", lambda: None)
    counts = torch.tensor([2, 2])
    with pytest.raises(RuntimeError, match="quack-kernels is not importable"):
        kernels.quack_grouped_swiglu(torch.randn(4, 16), counts, torch.randn(2, 2, 8, 16), torch.randn(2, 16, 8))
