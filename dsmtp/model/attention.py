"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent per token (kv_lora_rank) plus one RoPE key shared by
all heads; queries optionally go through their own low-rank latent (q_lora_rank).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import nn

from dsmtp.config import ModelConfig
from dsmtp.model import kernels
from dsmtp.model.linear import ColumnParallelLinear, RowParallelLinear, replicated_linear
from dsmtp.model.norm import RMSNorm
from dsmtp.model.rope import apply_rotary, softmax_scale
from dsmtp.parallel.sequence import gather_sequence
from dsmtp.parallel.tensor import shared_by_local_heads
from dsmtp.parallel.topology import tp_size

# DeepSeek's reference code and HF transformers build the latent norms with the default eps,
# independent of rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentCache(Protocol):
    """What MLA needs from a KV cache when decoding (dsmtp.serve.cache.LayerCache implements it)."""

    def append(self, kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' latents [B, S, kv_lora_rank] and rope keys [B, S, rope_dim]; return the
        cached keys [latent, rope key] [B, Skv, kv_lora_rank + rope_dim] and the new tokens' positions [B, S]."""
        ...


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_local_heads = cfg.num_heads // tp_size()
        self.q_lora_rank = cfg.q_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = softmax_scale(cfg)
        # "sdpa" until the run resolves model.attention_backend for its device (DeepSeekV3.set_attention_backend)
        self.attention_backend = "sdpa"
        std = cfg.init_std
        q_out = cfg.num_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.wq = ColumnParallelLinear(cfg.hidden_size, q_out, std)
        else:
            self.wq_a = replicated_linear(cfg.hidden_size, cfg.q_lora_rank, std)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = ColumnParallelLinear(cfg.q_lora_rank, q_out, std)
        self.wkv_a = replicated_linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, std)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = ColumnParallelLinear(cfg.kv_lora_rank, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), std)
        self.wo = RowParallelLinear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size, std)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head (q_nope, q_rope) for x [B, S, H]; q_rope already rotated."""
        b, s, _ = x.shape
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, s, self.n_local_heads, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary(q_rope, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a KV cache stores per token: the normed latent [B, S, kv_lora_rank] and the rotated
        shared RoPE key [B, S, qk_rope_head_dim]."""
        kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_norm(kv), k_rope

    def attend(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Expand the latent to per-head keys and values and attend causally; returns [B, Sq, H]."""
        b, skv, _ = kv.shape
        kv = self.wkv_b(kv).view(b, skv, self.n_local_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        # The RoPE key is shared by all heads, but each tensor-parallel rank uses it for its own heads
        # only: its gradient must be summed over the TP ranks.
        k_rope = shared_by_local_heads(k_rope)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_local_heads, -1)], dim=-1)
        out = kernels.attention(q, k, v, self.softmax_scale, self.attention_backend)
        return self.wo(out.flatten(2))

    def attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, keys: torch.Tensor,
                        q_positions: torch.Tensor) -> torch.Tensor:
        """Attend straight over cached latents (DeepSeek-V3's "absorb" inference form); returns [B, Sq, H].

        wkv_b's key half is folded into the query (q_nope . W_k kv = (W_k^T q_nope) . kv) and its value
        half applied after attention, so per-head keys and values are never built from the cache:
        every head attends over the same keys [latent, rope key] of each cached token [B, Skv, r + d],
        with the latents as values. Same result as `attend`. q_positions [B, Sq]: each query's
        position; cached keys past it are masked.
        """
        w = self.wkv_b.weight.view(self.n_local_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_k, w_v = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q = torch.cat([torch.einsum("bshd,hdr->bshr", q_nope, w_k), q_rope], dim=-1)
        latent_out = kernels.shared_key_attention(q, keys, self.kv_lora_rank, self.softmax_scale, q_positions)
        return self.wo(torch.einsum("bshr,hvr->bshv", latent_out, w_v).flatten(2))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[LatentCache] = None) -> torch.Tensor:
        """With a KV cache x holds only the new tokens (cos/sin at their positions): their latents are
        appended to the cache and attention runs over everything cached, in the absorbed form.
        Under sequence parallelism x is this rank's sequence shard and so is the output."""
        x = gather_sequence(x)  # causal attention needs the whole sequence
        q_nope, q_rope = self.query(x, cos, sin)
        kv, k_rope = self.latent(x, cos, sin)
        if cache is None:
            return self.attend(q_nope, q_rope, kv, k_rope)
        keys, q_positions = cache.append(kv, k_rope)
        if self.attention_backend == "flash" and cache.from_start:
            # A prefill into an empty cache: the new tokens are every key, at positions 0..S-1 (ragged
            # prompts right-padded), which is plain causal attention: the flash kernel's case.
            return self.attend(q_nope, q_rope, kv, k_rope)
        return self.attend_absorbed(q_nope, q_rope, keys, q_positions)
