"""Compute kernels behind small functions: each has a reference path that runs anywhere.

GPU speed paths plug in here, chosen by the tensors' device and what is installed, and are tested
against the reference path on the device (tests/gpu). `backends` switches a fast path off, for
benchmarks that measure what each one buys (tools/bench_train.py --disable NAME) and for tests, or on,
for one not yet measured to pay (--enable NAME).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from dsmtp.config import ConfigError
from dsmtp.model import fp8


@dataclass
class Backends:
    grouped_mm: bool = True  # routed experts through torch._grouped_mm (CUDA, bf16), no host sync
    quack_experts: bool = False  # their SwiGLU inside quack's grouped GEMMs instead (needs grouped_mm's case)
    quack_tuned: bool = False  # quack's autotuner times its tile configurations per GEMM on first use
    triton_gather: bool = True  # the token rows the experts read, and their gated gradients, by moe_triton
    triton_swiglu: bool = True  # the routed SwiGLU's gradient by moe_triton, gate and up read once
    triton_cross_entropy: bool = True  # an unsplit head's loss by cross_entropy_triton, logits read once


backends = Backends()
_static_shapes = False


@contextlib.contextmanager
def static_shapes() -> Iterator[None]:
    """Inside, every kernel keeps the host out of the loop (no reads of device values), so the work can
    be captured as a CUDA graph (dsmtp.serve.static)."""
    global _static_shapes
    before, _static_shapes = _static_shapes, True
    try:
        yield
    finally:
        _static_shapes = before


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str = "sdpa") -> torch.Tensor:
    """Causal attention. q [B, Sq, h, d_qk], k [B, Skv, h, d_qk], v [B, Skv, h, d_v] -> [B, Sq, h, d_v].

    When Sq < Skv (decoding after a cached prefix) the queries are the last Sq positions.
    backend: "flash" (resolved by `resolve_attention_backend`) runs CUDA tensors in bf16 or fp16, or
    under autocast, through flash-attn-4; everything else, and every CPU tensor, through SDPA.
    SDPA picks its cuDNN backend for MLA's shapes itself (q/k head dim != v head dim, which its flash
    backend refuses): forcing that order gains nothing (notes/code-measurements.md).
    """
    if backend == "flash" and q.is_cuda:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
        if dtype in (torch.bfloat16, torch.float16):
            return flash_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    sq, skv = q.shape[2], k.shape[2]
    if sq == skv:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        visible = torch.arange(skv, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (skv - sq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return out.transpose(1, 2)


# flash-attn-4 (PyPI flash-attn-4, CuTe-DSL kernels; import name flash_attn.cute). Its interface is an
# autograd.Function that torch.compile cannot trace into, so its forward and backward are wrapped as
# two custom ops with fake (shape-only) implementations: compiled layers keep attention in their graph.
# Its causal mask is bottom-right aligned when Sq < Skv, as `attention`'s.
FLASH_PACKAGE = "flash-attn-4"
FLASH_MIN_CAPABILITY = (9, 0)  # its sm90 kernels (Hopper); sm100+ has its own


@functools.cache
def _optional_module(name: str):
    """The module `name`, or None when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken install (a CUDA-DSL runtime that fails to load)
        return None


def _flash_interface():
    return _optional_module("flash_attn.cute.interface")


def flash_unavailable(device: torch.device) -> str | None:
    """Why flash-attn-4 cannot run attention on `device`, or None when it can."""
    if device.type != "cuda":
        return f"it runs on CUDA devices only, and this run's device is {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FLASH_MIN_CAPABILITY:
        return (f"its kernels need compute capability {FLASH_MIN_CAPABILITY[0]}.{FLASH_MIN_CAPABILITY[1]} or newer "
                f"(Hopper), and {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    if _flash_interface() is None:
        return f"the {FLASH_PACKAGE} package is not importable (pip install 'dsmtp[gpu]', or pip install {FLASH_PACKAGE})"
    return None


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """model.attention_backend for a run on `device`: "flash" or "sdpa". auto takes flash-attn-4 where it
    can run; a forced flash that cannot is a ConfigError saying why, before any work starts."""
    if name == "sdpa":
        return "sdpa"
    reason = flash_unavailable(device)
    if reason is None:
        return "flash"
    if name == "flash":
        raise ConfigError(f"model.attention_backend=flash, but {reason}: install it, or set "
                          "model.attention_backend to auto (flash where it can run, SDPA elsewhere) or sdpa")
    return "sdpa"


@torch.library.custom_op("dsmtp::flash_attention_forward", mutates_args=())
def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out, lse = _flash_interface().flash_attn_func(q, k, v, softmax_scale=scale, causal=True, return_lse=True)[:2]
    return out, lse


@_flash_forward.register_fake
def _(q, k, v, scale):
    b, sq, h, _ = q.shape
    return q.new_empty(b, sq, h, v.shape[-1]), q.new_empty(b, h, sq, dtype=torch.float32)


@torch.library.custom_op("dsmtp::flash_attention_backward", mutates_args=())
def _flash_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
                    lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The interface's own backward calls this with the tensors its forward saved (4.0.0b36).
    dq, dk, dv = _flash_interface()._flash_attn_bwd(q, k, v, out, grad_out.contiguous(), lse,
                                                    softmax_scale=scale, causal=True)[:3]
    return dq, dk, dv


@_flash_backward.register_fake
def _(q, k, v, out, grad_out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _flash_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_backward(q, k, v, out, grad_out, lse, ctx.scale)
    return dq, dk, dv, None


_flash_forward.register_autograd(_flash_grad, setup_context=_flash_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention through flash-attn-4, layout as `attention`'s; q, k, v bf16 or fp16 on CUDA.
    Its kernels take MLA's q/k head dim != v head dim (sm90: each between 8 and 256, multiples of 8)."""
    return _flash_forward(q.contiguous(), k.contiguous(), v.contiguous(), scale)[0]


# Scores one call of shared_key_attention may hold ([B, Sq, h, Skv] elements); longer queries go in chunks.
SHARED_KEY_SCORES = 2**26


def shared_key_attention(q: torch.Tensor, keys: torch.Tensor, value_dim: int, scale: float,
                         q_positions: torch.Tensor) -> torch.Tensor:
    """Attention of every head over one set of keys (multi-query attention; MLA's absorbed form):
    q [B, Sq, h, d] against keys [B, Skv, d] whose first `value_dim` features are also the values.
    Key j is visible to a query at position p iff j <= p (q_positions [B, Sq]). Returns [B, Sq, h, value_dim].

    Two batched matrix products over the B x (Sq x h) query rows read each sequence's keys once for
    all heads, where SDPA needs them expanded to every head."""
    b, sq, h, d = q.shape
    skv = keys.shape[1]
    rows = max(1, SHARED_KEY_SCORES // (b * h * skv))
    if sq > rows:  # a long prefill: bound the scores' memory
        return torch.cat([shared_key_attention(q[:, i:i + rows], keys, value_dim, scale, q_positions[:, i:i + rows])
                          for i in range(0, sq, rows)], dim=1)
    scores = torch.bmm(q.reshape(b, sq * h, d), keys.transpose(1, 2)).view(b, sq, h, skv)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    visible = torch.arange(skv, device=q.device) <= q_positions[..., None]  # [B, Sq, Skv]
    probs = torch.softmax(scores.masked_fill(~visible[:, :, None], float("-inf")), dim=-1)
    return torch.bmm(probs.to(keys.dtype).view(b, sq * h, skv), keys[..., :value_dim]).view(b, sq, h, value_dim)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x), weights in nn.Linear layout [out, in]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def grouped_swiglu(x: torch.Tensor, tokens_per_expert: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   use_fp8: bool = False) -> torch.Tensor:
    """SwiGLU per expert over tokens sorted by expert.

    x [N, H] holds tokens_per_expert[e] rows for expert e, in expert order; w13 [E, 2, I, H] (gate, up),
    w2 [E, H, I]. `use_fp8` runs the CUDA grouped GEMMs in FP8 (dsmtp.model.fp8).
    """
    # The grouped GEMM computes in bf16: it serves bf16 inputs (autocast casts the dispatched rows) and
    # leaves an fp32 model, e.g. an fp32 inference run, at full precision.
    if x.is_cuda and (use_fp8 or (backends.grouped_mm and x.dtype == torch.bfloat16)):
        if backends.quack_experts and not use_fp8:
            return quack_grouped_swiglu(x, tokens_per_expert, w13, w2)
        return _grouped_swiglu_cuda(x, tokens_per_expert, w13, w2, use_fp8)
    if x.is_cuda and _static_shapes:
        return _masked_swiglu(x, tokens_per_expert, w13, w2)
    # Reference path: one GEMM per expert; the split sizes need the counts on the host.
    chunks = x.split(tokens_per_expert.tolist())
    return torch.cat([swiglu(chunk, w13[e, 0], w2[e], w13[e, 1]) for e, chunk in enumerate(chunks)])


def _masked_swiglu(x: torch.Tensor, tokens_per_expert: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The reference path without the host: every expert over every row, each row keeping its own
    expert's output. num_experts times the work, for the few rows of a decoding step (fp32 on CUDA)."""
    rows = torch.arange(x.shape[0], device=x.device)
    expert_of_row = (rows[:, None] >= tokens_per_expert.cumsum(0)[None, :]).sum(dim=1)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)
    for e in range(w13.shape[0]):
        out = torch.where((expert_of_row == e)[:, None], swiglu(x, w13[e, 0], w2[e], w13[e, 1]), out)
    return out


def _triton_kernels(name: str):
    """dsmtp.model.<name>, imported when a custom op first runs: it imports triton, which CPU-only
    installs may lack."""
    return importlib.import_module(f"dsmtp.model.{name}")


@torch.library.custom_op("dsmtp::gather_rows", mutates_args=())
def _gather_rows_triton(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    return _triton_kernels("moe_triton").gather_rows(src.contiguous(), index.contiguous(), scale, out_dtype)


@_gather_rows_triton.register_fake
def _(src, index, scale, out_dtype):
    return src.new_empty(index.numel(), src.shape[1], dtype=out_dtype)


def gather_rows(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows src[index] [N, H], row i times scale[i] when a scale is given, in out_dtype (default src's).
    Not differentiable: the MoE dispatch's autograd functions call it in both directions."""
    out_dtype = out_dtype or src.dtype
    if src.is_cuda and backends.triton_gather:
        return _gather_rows_triton(src, index, None if scale is None else scale.contiguous(), out_dtype)
    rows = src.index_select(0, index)
    if scale is not None:
        rows = rows * scale.to(rows.dtype).unsqueeze(-1)
    # not a no-op .to(): an autograd.Function's forward returning an alias loses its input's gradient
    # when torch 2.11 compiles it (tests/gpu/test_gpu_kernels.py)
    return rows if rows.dtype == out_dtype else rows.to(out_dtype)


@torch.library.custom_op("dsmtp::swiglu_backward", mutates_args=())
def _swiglu_backward_triton(gate_up: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
    # the kernel works on [rows, columns]; the dense MLPs' activations are [batch, seq, columns]
    columns = gate_up.shape[-1]
    grad = _triton_kernels("moe_triton").swiglu_backward(gate_up.reshape(-1, columns).contiguous(),
                                                         grad_h.reshape(-1, columns // 2).contiguous())
    return grad.view(gate_up.shape)


@_swiglu_backward_triton.register_fake
def _(gate_up, grad_h):
    return torch.empty_like(gate_up)


def _silu_gate_times_up(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwigluActivation(torch.autograd.Function):
    """silu(gate) * up of gate_up = [gate | up], its gradient by one Triton pass (moe_triton)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        return _silu_gate_times_up(gate_up)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return _swiglu_backward_triton(gate_up, grad_h)


def swiglu_activation(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, gate_up = [gate | up] along the last dimension."""
    if gate_up.is_cuda and backends.triton_swiglu:
        return _SwigluActivation.apply(gate_up)
    return _silu_gate_times_up(gate_up)


@torch.library.custom_op("dsmtp::cross_entropy_rows_", mutates_args=("logits",))
def _cross_entropy_rows_triton(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels("cross_entropy_triton").cross_entropy_rows_(logits, targets.contiguous())


@_cross_entropy_rows_triton.register_fake
def _(logits, targets):
    return logits.new_empty(logits.shape[0], dtype=torch.float32), logits.new_empty(logits.shape[0], dtype=torch.bool)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of h @ weight^T and the top-1 hits, the logits turned into their gradient
    while the loss reads them (cross_entropy_triton). Backward folds each row's loss gradient into the
    GEMMs' [rows, hidden] operands: no pass over [rows, vocabulary] is left for it."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else h.dtype
        x, w = h.to(dtype), weight.to(dtype)
        grad_logits = x @ w.t()
        loss, correct = _cross_entropy_rows_triton(grad_logits, targets)
        ctx.save_for_backward(x, w, grad_logits)
        ctx.dtypes = h.dtype, weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_correct: torch.Tensor):
        x, w, grad_logits = ctx.saved_tensors
        h_dtype, weight_dtype = ctx.dtypes
        row_scale = grad_loss.float().unsqueeze(-1)
        grad_h = ((grad_logits @ w).float() * row_scale).to(h_dtype)
        grad_weight = grad_logits.t() @ (x.float() * row_scale).to(x.dtype)
        return grad_h, grad_weight.to(weight_dtype), None


def fuses_cross_entropy(h: torch.Tensor) -> bool:
    """Whether linear_cross_entropy takes an unsplit head's loss for hidden states h."""
    return h.is_cuda and backends.triton_cross_entropy


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy (float32) of the logits h @ weight^T, which are never kept, and whether
    each target is a largest logit: h [..., H], weight [V, H], targets [...] in [0, V). The reference
    path is the head's linear layer followed by vocab.cross_entropy and vocab.top1_correct."""
    loss, correct = _LinearCrossEntropy.apply(h.flatten(0, -2), weight, targets.flatten())
    return loss.view(targets.shape), correct.view(targets.shape)


def _bf16_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] times weight[e]^T ([E, N, K]) for the rows of each group; _grouped_mm takes bf16 only
    (the cast is what autocast would do for a plain linear)."""
    return torch._grouped_mm(x.to(torch.bfloat16), weight.to(torch.bfloat16).transpose(1, 2), offs=offsets)


def _grouped_swiglu_cuda(x: torch.Tensor, tokens_per_expert: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         use_fp8: bool) -> torch.Tensor:
    # One grouped GEMM per projection for all experts; group boundaries stay on the device, so the
    # host never waits for the router. Gate and up projections share one GEMM (twice the width).
    if use_fp8:
        x, offsets, rows = fp8.pad_groups(x.to(torch.bfloat16), tokens_per_expert)
        # FP8 scales are taken from the fp32 weights: bf16-rounded ones trained worse (notes/code-measurements.md)
        mm = fp8.grouped_mm
    else:
        offsets, rows, mm = tokens_per_expert.cumsum(0).to(torch.int32), None, _bf16_grouped_mm
    gate_up = mm(x, w13.flatten(1, 2), offsets)
    out = mm(swiglu_activation(gate_up), w2, offsets)
    return out if rows is None else fp8.unpad_groups(out, rows)


# quack (PyPI quack-kernels, Tri Dao's CuTe-DSL GEMMs; flash-attn-4 depends on it): grouped GEMMs over
# rows sorted by expert (varlen_m) with the SwiGLU in the first GEMM's epilogue and its gradient in the
# epilogue of the backward GEMM that produces it, as SonicMoE does: the [rows, 2I] gate/up output is
# never re-read by a separate activation kernel. Wrapped as custom ops, as flash-attn-4 is.
def _quack_gemm():
    return _optional_module("quack.gemm_interface")


def _quack():
    # looked up inside the custom ops, at run time: tracing never imports
    quack = _quack_gemm()
    if quack is None:
        raise RuntimeError("kernels.backends.quack_experts is on, but quack-kernels is not importable "
                           "(pip install quack-kernels, which flash-attn-4 brings), or switch it off")
    return quack


@torch.library.custom_op("dsmtp::quack_swiglu_forward", mutates_args=())
def _quack_swiglu_forward(x: torch.Tensor, w13i: torch.Tensor, w2: torch.Tensor,
                          cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    quack, tuned = _quack(), backends.quack_tuned
    preact, h = quack.gemm_gated(x, w13i.transpose(1, 2), activation="swiglu", cu_seqlens_m=cu_seqlens, tuned=tuned)
    return quack.gemm(h, w2.transpose(1, 2), cu_seqlens_m=cu_seqlens, tuned=tuned), preact


@_quack_swiglu_forward.register_fake
def _(x, w13i, w2, cu_seqlens):
    return x.new_empty(x.shape[0], w2.shape[1]), x.new_empty(x.shape[0], w13i.shape[1])


@torch.library.custom_op("dsmtp::quack_swiglu_backward", mutates_args=())
def _quack_swiglu_backward(grad: torch.Tensor, x: torch.Tensor, w13i: torch.Tensor, w2: torch.Tensor,
                           cu_seqlens: torch.Tensor, preact: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    quack, tuned = _quack(), backends.quack_tuned
    # the gate/up gradient and the recomputed activation (w2's gradient needs it) in one GEMM
    grad_preact, h = quack.gemm_dgated(grad, w2, preact, activation="swiglu", cu_seqlens_m=cu_seqlens, tuned=tuned)
    offsets = cu_seqlens[1:]
    grad_w2 = torch._grouped_mm(grad.t(), h, offs=offsets)
    grad_w13i = torch._grouped_mm(grad_preact.t(), x, offs=offsets)
    return quack.gemm(grad_preact, w13i, cu_seqlens_m=cu_seqlens, tuned=tuned), grad_w13i, grad_w2


@_quack_swiglu_backward.register_fake
def _(grad, x, w13i, w2, cu_seqlens, preact):
    return torch.empty_like(x), torch.empty_like(w13i), torch.empty_like(w2)


def _quack_swiglu_setup_context(ctx, inputs, output):
    x, w13i, w2, cu_seqlens = inputs
    ctx.save_for_backward(x, w13i, w2, cu_seqlens, output[1])


def _quack_swiglu_grad(ctx, grad_out, grad_preact):
    x, w13i, w2, cu_seqlens, preact = ctx.saved_tensors
    return (*_quack_swiglu_backward(grad_out.contiguous(), x, w13i, w2, cu_seqlens, preact), None)


_quack_swiglu_forward.register_autograd(_quack_swiglu_grad, setup_context=_quack_swiglu_setup_context)


def quack_grouped_swiglu(x: torch.Tensor, tokens_per_expert: torch.Tensor, w13: torch.Tensor,
                         w2: torch.Tensor) -> torch.Tensor:
    """grouped_swiglu's CUDA bf16 case through quack. Gate and up rows interleaved into one [E, 2I, H]
    weight: quack's gated epilogue pairs output column 2j (gate) with 2j + 1 (up)."""
    e, _, i, h = w13.shape
    interleaved = w13.to(torch.bfloat16).transpose(1, 2).reshape(e, 2 * i, h)
    cu_seqlens = F.pad(tokens_per_expert.cumsum(0), (1, 0)).to(torch.int32)
    return _quack_swiglu_forward(x.to(torch.bfloat16), interleaved, w2.to(torch.bfloat16), cu_seqlens)[0]
