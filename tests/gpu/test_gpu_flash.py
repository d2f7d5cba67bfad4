"""flash-attn-4 against SDPA on MLA's shapes (q/k head dim != v head dim), forward and backward, and
inside a compiled MLA layer and a prefill. Skips without CUDA, without an sm90+ device or without the
package (tools/bench_speed_gpu.sh brings it to the GPU machine)."""

import pytest
import torch

from dsmtp.config import ModelConfig
from dsmtp.model import kernels
from dsmtp.model.attention import MLA
from dsmtp.model.rope import RotaryEmbedding
from dsmtp.parallel.topology import ensure_initialized

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or kernels.flash_unavailable(torch.device("cuda")),
                                 reason="needs flash-attn-4 on an sm90+ CUDA device")]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("d_qk, d_v", [(96, 64), (192, 128)])  # small.yaml; DeepSeek-V3
def test_flash_forward_and_backward_match_float64(d_qk, d_v):
    """bf16 flash and bf16 SDPA against the same float64 reference: flash within 1e-2 relative (bf16
    operands) and no more than 1.5x SDPA's own error, for the output and all three gradients."""
    torch.manual_seed(0)
    b, s, h = 2, 1024, 8
    ref_in = [torch.randn(b, s, h, d, dtype=torch.float64, device="cuda", requires_grad=True) for d in (d_qk, d_qk, d_v)]
    grad = torch.randn(b, s, h, d_v, dtype=torch.float64, device="cuda")
    ref = kernels.attention(*ref_in, d_qk ** -0.5)
    ref_grads = torch.autograd.grad(ref, ref_in, grad)
    results = {}
    for backend in ("flash", "sdpa"):
        x = [t.detach().bfloat16().requires_grad_() for t in ref_in]
        out = kernels.attention(*x, d_qk ** -0.5, backend)
        assert out.shape == (b, s, h, d_v) and out.dtype == torch.bfloat16
        results[backend] = [out, *torch.autograd.grad(out, x, grad.bfloat16())]
    for name, r, flash, sdpa in zip(("out", "dq", "dk", "dv"), (ref, *ref_grads), results["flash"], results["sdpa"]):
        assert rel_err(flash, r) < 1e-2, name
        assert rel_err(flash, r) <= 1.5 * rel_err(sdpa, r) + 1e-3, name


def test_compiled_mla_with_flash_matches_sdpa():
    """A compiled MLA layer under bf16 autocast (the training step's form): flash and SDPA outputs and
    weight gradients agree to bf16 rounding."""
    ensure_initialized()
    cfg = ModelConfig(hidden_size=512, num_heads=8)
    torch.manual_seed(0)
    mla = MLA(cfg).cuda()
    rope = RotaryEmbedding(cfg).cuda()
    x = torch.randn(2, 1024, 512, device="cuda")
    cos, sin = rope(torch.arange(1024, device="cuda"))
    results = {}
    for backend in ("flash", "sdpa"):
        mla.attention_backend = backend
        mla.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = torch.compile(mla)(x, cos, sin)
        out.float().square().mean().backward()
        results[backend] = [out.detach(), *(p.grad.clone() for p in mla.parameters())]
    for flash, sdpa in zip(results["flash"], results["sdpa"]):
        assert rel_err(flash, sdpa) < 2e-2


class _EmptyCache:
    """A KV cache before its first write (dsmtp.serve.cache's prefill case): the new tokens are every key."""

    from_start = True

    def append(self, kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(kv.shape[1], device=kv.device).expand(kv.shape[0], -1)
        return torch.cat([kv, k_rope], dim=-1), positions


def test_prefill_with_flash_matches_absorbed_attention():
    """A prefill into an empty cache takes flash (MLA.forward's from_start case); with SDPA selected the
    same call attends over the cached latents in the absorbed form. bf16 weights, as served."""
    ensure_initialized()
    cfg = ModelConfig(hidden_size=512, num_heads=8)
    torch.manual_seed(0)
    mla = MLA(cfg).cuda().to(torch.bfloat16)
    rope = RotaryEmbedding(cfg).cuda()
    x = torch.randn(2, 777, 512, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope(torch.arange(777, device="cuda"))
    outputs = {}
    with torch.no_grad():
        for backend in ("flash", "sdpa"):
            mla.attention_backend = backend
            outputs[backend] = mla(x, cos, sin, cache=_EmptyCache())
    assert rel_err(outputs["flash"], outputs["sdpa"]) < 2e-2
