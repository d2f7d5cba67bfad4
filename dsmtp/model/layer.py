from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dsmtp.config import ModelConfig
from dsmtp.model.attention import MLA, LatentCache
from dsmtp.model.mlp import MLP
from dsmtp.model.moe import MoE
from dsmtp.model.norm import RMSNorm


class TransformerLayer(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(x)); the FFN is dense for the first
    `first_k_dense_replace` layers and DeepSeekMoE after."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.init_std) if layer_id < cfg.first_k_dense_replace \
            else MoE(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[LatentCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the new hidden state and this layer's auxiliary balance loss (0 when dense or off).
        `cache`: this layer's KV cache when decoding (see MLA.forward)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        if isinstance(self.ffn, MoE):
            ffn_out, aux = self.ffn(self.ffn_norm(x))
        else:
            ffn_out, aux = self.ffn(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + ffn_out, aux
