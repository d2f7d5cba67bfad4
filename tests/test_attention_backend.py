"""model.attention_backend on the CPU: the validator, the backend resolution and its errors, the
flash-attn-4 custom ops' wiring (forward, backward, fake shapes under torch.compile) against SDPA with a
stand-in for the package, and the prefill switch. The kernels themselves are checked on the GPU
(tests/gpu/test_gpu_flash.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsmtp.config import Config, ConfigError, validate
from dsmtp.model import kernels
from dsmtp.serve.cache import ModelCache
from dsmtp.train.trainer import apply_train_settings
from tests.serve_models import random_model, tiny_config


def sdpa_reference(q, k, v, scale):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                          scale=scale).transpose(1, 2)


def test_validator_names_the_field():
    cfg = Config()
    cfg.model.attention_backend = "flashy"
    with pytest.raises(ConfigError, match=r"model.attention_backend='flashy' must be one of auto, sdpa, flash"):
        validate(cfg)
    cfg = Config()
    cfg.model.attention_backend, cfg.train.precision = "flash", "fp32"
    with pytest.raises(ConfigError, match=r"model.attention_backend=flash .* train.precision=fp32"):
        validate(cfg)
    for backend in ("auto", "sdpa", "flash"):
        cfg = Config()
        cfg.model.attention_backend = backend
        validate(cfg)  # bf16 / auto precision: fine


def test_resolution_on_a_cpu():
    cpu = torch.device("cpu")
    assert kernels.resolve_attention_backend("auto", cpu) == "sdpa"
    assert kernels.resolve_attention_backend("sdpa", cpu) == "sdpa"
    with pytest.raises(ConfigError, match=r"model.attention_backend=flash, but it runs on CUDA devices only.*"
                                          r"set model.attention_backend to auto"):
        kernels.resolve_attention_backend("flash", cpu)


@pytest.mark.parametrize("capability, installed, expected", [
    ((9, 0), True, "flash"), ((10, 0), True, "flash"), ((8, 0), True, "sdpa"), ((9, 0), False, "sdpa")])
def test_resolution_on_cuda_devices(monkeypatch, capability, installed, expected):
    """auto takes flash only on sm90+ with the package importable; a forced flash that cannot run says why."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    monkeypatch.setattr(kernels, "_flash_interface", lambda: object() if installed else None)
    cuda = torch.device("cuda")
    assert kernels.resolve_attention_backend("auto", cuda) == expected
    assert kernels.resolve_attention_backend("sdpa", cuda) == "sdpa"
    if expected == "flash":
        assert kernels.resolve_attention_backend("flash", cuda) == "flash"
        return
    fix = r"pip install 'dsmtp\[gpu\]', or pip install flash-attn-4" if not installed else r"compute capability 9.0"
    with pytest.raises(ConfigError, match=r"model.attention_backend=flash, but .*" + fix):
        kernels.resolve_attention_backend("flash", cuda)


def test_training_set_up_refuses_a_forced_flash_on_a_cpu():
    model = random_model(tiny_config(mtp_depth=0))
    model.cfg.attention_backend = "flash"
    with pytest.raises(ConfigError, match="model.attention_backend=flash"):
        apply_train_settings(model, Config().train)
    model.cfg.attention_backend = "auto"
    apply_train_settings(model, Config().train)
    assert {m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")} == {"sdpa"}


def test_cpu_tensors_keep_the_reference_path():
    q, k = torch.randn(2, 2, 7, 3, 12, dtype=torch.float64)
    v = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    for backend in ("sdpa", "flash"):
        torch.testing.assert_close(kernels.attention(q, k, v, 0.3, backend), sdpa_reference(q, k, v, 0.3))


class StandInFlash:
    """flash_attn.cute.interface's two entry points as dsmtp calls them, computed by SDPA in float64:
    checks that the custom ops pass the right tensors, layouts and scale, and hand the gradients back."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, softmax_scale, causal, return_lse):
        assert causal and return_lse and all(t.stride(-1) == 1 for t in (q, k, v))
        self.calls.append("forward")
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * softmax_scale
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
        lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1).float()  # [B, h, Sq]
        return sdpa_reference(q.double(), k.double(), v.double(), softmax_scale).to(q.dtype), lse

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, softmax_scale, causal):
        assert causal and lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
        self.calls.append("backward")
        # By hand (a custom op's body runs below autograd): P = softmax(S), dS = P * (dO V^T - rowsum(dO * O)).
        q, k, v, dout = (t.double() for t in (q, k, v, dout))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        do = dout.transpose(1, 2)  # [B, h, Sq, dv]
        dv = torch.einsum("bhqk,bhqd->bkhd", p, do)
        dp = torch.einsum("bhqd,bkhd->bhqk", do, v)
        ds = p * (dp - (do * out.double().transpose(1, 2)).sum(-1, keepdim=True)) * softmax_scale
        dq, dk = torch.einsum("bhqk,bkhd->bqhd", ds, k), torch.einsum("bhqk,bqhd->bkhd", ds, q)
        return dq.to(out.dtype), dk.to(out.dtype), dv.to(out.dtype)


@pytest.mark.parametrize("dims", [(96, 64), (192, 128)])
def test_flash_custom_ops_forward_and_backward(monkeypatch, dims):
    stand_in = StandInFlash()
    monkeypatch.setattr(kernels, "_flash_interface", lambda: stand_in)
    d_qk, d_v = dims
    leaves = [torch.randn(2, 9, 3, d, dtype=torch.float64, requires_grad=True) for d in (d_qk, d_qk, d_v)]
    v_strided = torch.randn(2, 9, 3, d_v + 4, dtype=torch.float64)[..., 4:]  # a split of a wider tensor, as MLA's v
    grad = torch.randn(2, 9, 3, d_v, dtype=torch.float64)
    for fn in (kernels.flash_attention, torch.compile(kernels.flash_attention, backend="aot_eager", fullgraph=True)):
        stand_in.calls.clear()
        out = fn(*leaves, d_qk ** -0.5)
        got = torch.autograd.grad(out, leaves, grad)
        ref_leaves = [t.detach().requires_grad_() for t in leaves]
        ref = sdpa_reference(*ref_leaves, d_qk ** -0.5)
        torch.testing.assert_close(out, ref)
        for a, b in zip(got, torch.autograd.grad(ref, ref_leaves, grad)):
            torch.testing.assert_close(a, b)
        assert stand_in.calls == ["forward", "backward"]
    torch.testing.assert_close(kernels.flash_attention(leaves[0], leaves[1], v_strided, 0.2),
                               sdpa_reference(leaves[0], leaves[1], v_strided, 0.2))


def test_cache_knows_a_prefill_from_its_start():
    cache = ModelCache.empty(tiny_config(mtp_depth=0), batch=2, capacity=12, dtype=torch.float32,
                             device=torch.device("cpu"))
    stack = cache.trunk
    stack.begin(5)
    assert stack.from_start and stack.layers[0].from_start
    stack.truncate(torch.tensor([5, 3]))
    stack.begin(1)
    assert not stack.from_start
    fresh = ModelCache.empty(tiny_config(mtp_depth=0), 2, 12, torch.float32, torch.device("cpu")).trunk
    fresh.begin(3, last=torch.tensor([1, 2]))  # repeated positions: not plain causal attention
    assert not fresh.from_start


@torch.no_grad()
def test_flash_prefill_takes_the_expanded_form():
    """With attention_backend=flash a prefill attends in the expanded form (the flash kernel's; SDPA on a
    CPU), later steps in the absorbed one; both equal the SDPA backend's cached forward."""
    model = random_model(tiny_config(mtp_depth=0), dtype=torch.float64)
    tokens = torch.randint(0, 64, (2, 10))
    outs = {}
    for backend in ("sdpa", "flash"):
        model.set_attention_backend(backend)
        cache = ModelCache.empty(model.cfg, 2, 16, torch.float64, torch.device("cpu"))
        calls = []
        mla = model.layers[0].attn
        attend, mla.attend = mla.attend, lambda *a: calls.append("expanded") or attend(*a)
        try:
            steps = []
            for chunk in (tokens[:, :7], tokens[:, 7:8], tokens[:, 8:]):
                cos, sin = model.rope(cache.trunk.begin(chunk.shape[1]))
                steps.append(model.trunk(model.embed(chunk), cos, sin, cache.trunk.layers)[0])
        finally:
            del mla.attend
        outs[backend] = torch.cat(steps, dim=1)
        assert calls == (["expanded"] if backend == "flash" else [])
    torch.testing.assert_close(outs["flash"], outs["sdpa"], rtol=0, atol=1e-10)
