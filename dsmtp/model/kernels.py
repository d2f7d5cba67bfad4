"""Compute kernels behind small functions: each has a reference path that runs anywhere.

GPU speed paths (grouped GEMM, FP8, fused kernels) plug in here and are tested against the
reference path on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention. q [B, Sq, h, d_qk], k [B, Skv, h, d_qk], v [B, Skv, h, d_v] -> [B, Sq, h, d_v].

    When Sq < Skv (decoding after a cached prefix) the queries are the last Sq positions. With
    `q_positions` [B, Sq] (a KV cache holding sequences of different lengths) key j is visible to a
    query at position p iff j <= p: keys past a sequence's own position (padding, stale entries)
    are masked per sequence.
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
                   w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU per expert over tokens sorted by expert.

    x [N, H] holds tokens_per_expert[e] rows for expert e, in expert order; w1/w3 [E, I, H], w2 [E, H, I].
    """
    chunks = x.split(tokens_per_expert.tolist())
    return torch.cat([swiglu(chunk, w1[e], w2[e], w3[e]) for e, chunk in enumerate(chunks)])
