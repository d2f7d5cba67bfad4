"""Compute kernels behind small functions: each has a reference path that runs anywhere.

GPU speed paths plug in here, chosen by the tensors' device and what is installed, and are tested
against the reference path on the device (tests/gpu). `backends` switches a fast path off, for
benchmarks that measure what each one buys (tools/bench_train.py --disable NAME) and for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsmtp.model import fp8


@dataclass
class Backends:
    grouped_mm: bool = True  # routed experts through torch._grouped_mm (CUDA, bf16), no host sync


backends = Backends()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention. q [B, Sq, h, d_qk], k [B, Skv, h, d_qk], v [B, Skv, h, d_v] -> [B, Sq, h, d_v].

    When Sq < Skv (decoding after a cached prefix) the queries are the last Sq positions. With
    `q_positions` [B, Sq] (a KV cache holding sequences of different lengths) key j is visible to a
    query at position p iff j <= p: keys past a sequence's own position (padding, stale entries)
    are masked per sequence.
    On an H100 with torch 2.11, SDPA already picks its cuDNN backend for MLA's shapes (q/k head dim
    != v head dim, which the flash backend refuses): forcing that order measured no gain.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    sq, skv = q.shape[2], k.shape[2]
    if q_positions is not None:
        visible = torch.arange(skv, device=q.device)[None, None, :] <= q_positions[:, :, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=scale)
    elif sq == skv:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        visible = torch.arange(skv, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (skv - sq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return out.transpose(1, 2)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x), weights in nn.Linear layout [out, in]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def grouped_swiglu(x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   w3: torch.Tensor, use_fp8: bool = False) -> torch.Tensor:
    """SwiGLU per expert over tokens sorted by expert.

    x [N, H] holds tokens_per_expert[e] rows for expert e, in expert order; w1/w3 [E, I, H], w2 [E, H, I].
    `use_fp8` runs the CUDA grouped GEMMs in FP8 (dsmtp.model.fp8).
    """
    # The grouped GEMM computes in bf16: it serves bf16 inputs (autocast casts the dispatched rows) and
    # leaves an fp32 model, e.g. an fp32 inference run, at full precision.
    if x.is_cuda and (use_fp8 or (backends.grouped_mm and x.dtype == torch.bfloat16)):
        return _grouped_swiglu_cuda(x, tokens_per_expert, w1, w2, w3, use_fp8)
    # Reference path: one GEMM per expert; the split sizes need the counts on the host.
    chunks = x.split(tokens_per_expert.tolist())
    return torch.cat([swiglu(chunk, w1[e], w2[e], w3[e]) for e, chunk in enumerate(chunks)])


def _bf16_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] times weight[e]^T ([E, N, K]) for the rows of each group; _grouped_mm takes bf16 only
    (the cast is what autocast would do for a plain linear)."""
    return torch._grouped_mm(x.to(torch.bfloat16), weight.to(torch.bfloat16).transpose(1, 2), offs=offsets)


def _grouped_swiglu_cuda(x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                         w3: torch.Tensor, use_fp8: bool) -> torch.Tensor:
    # One grouped GEMM per projection for all experts; group boundaries stay on the device, so the
    # host never waits for the router. Gate and up projections share one GEMM (twice the width).
    if use_fp8:
        x, offsets, rows = fp8.pad_groups(x.to(torch.bfloat16), tokens_per_expert)
        mm, weight_dtype = fp8.grouped_mm, w1.dtype  # FP8 scales are taken from the master weights
    else:
        offsets, rows, mm = tokens_per_expert.cumsum(0).to(torch.int32), None, _bf16_grouped_mm
        weight_dtype = torch.bfloat16
    # Cast before concatenating: each weight's gradient then arrives as a tensor of its own that `.grad`
    # takes as is, where autograd copied each slice of one fp32 gradient (24 copies, 1.1 ms of a
    # small.yaml step on an H100). Quantizing bf16-rounded weights instead of the fp32 ones made the
    # FP8 training test's loss 7% worse, so the FP8 path keeps fp32.
    inter = w1.shape[1]
    gate_up = mm(x, torch.cat([w1.to(weight_dtype), w3.to(weight_dtype)], dim=1), offsets)
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    out = mm(h, w2, offsets)
    return out if rows is None else fp8.unpad_groups(out, rows)
