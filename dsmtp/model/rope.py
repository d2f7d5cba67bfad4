"""Rotary position embedding with YaRN context extension, in DeepSeek's interleaved layout.

The rotary dimensions are consecutive pairs (x0, x1), (x2, x3), ... each rotated by one frequency,
as in the released DeepSeek-V3 weights, so exported q_b_proj / kv_a_proj_with_mqa rows need no
permutation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsmtp.config import ModelConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    yarn = cfg.rope_scaling
    if yarn is None:
        return inv_freq

    # YaRN: interpolate the low frequencies (long wavelengths) by `factor`, keep the high ones, and
    # ramp linearly between the dimensions that make beta_fast and beta_slow turns over the original context.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the original frequency), 0: interpolate
    return inv_freq / yarn.factor * (1 - keep) + inv_freq * keep


def rotary_scale(cfg: ModelConfig) -> float:
    """YaRN's factor on cos/sin (1 for DeepSeek-V3, whose mscale equals mscale_all_dim)."""
    y = cfg.rope_scaling
    if y is None:
        return 1.0
    if y.mscale and y.mscale_all_dim:
        return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    return yarn_mscale(y.factor, 1.0)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_qk), raised by YaRN's mscale^2 when the context is extended."""
    scale = cfg.qk_head_dim ** -0.5
    y = cfg.rope_scaling
    if y is not None and y.mscale_all_dim:
        scale *= yarn_mscale(y.factor, y.mscale_all_dim) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions 0 .. max_position_embeddings-1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        angles = positions[:, None] * inverse_frequencies(cfg)[None, :]
        scale = rotary_scale(cfg)
        self.register_buffer("cos", angles.cos() * scale, persistent=False)
        self.register_buffer("sin", angles.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [*positions.shape, rope_dim / 2]."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [batch, seq, heads, rope_dim]; cos/sin are [seq or batch x seq, rope_dim/2]."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
