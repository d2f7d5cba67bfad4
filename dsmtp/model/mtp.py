"""Multi-Token Prediction module (DeepSeek-V3, section 2.2).

Depth k combines the previous depth's hidden state h_{k-1,i} with the embedding of token t_{i+k},
runs one transformer layer, and (through the shared output head) predicts token t_{i+k+1}:

    h'_k = eh_proj(cat[enorm(Emb(t_{i+k})), hnorm(h_{k-1,i})])
    h_k  = norm(TransformerLayer_k(h'_k))

The embedding comes first in the concatenation, as in the released weights (the paper writes the
other order). The embedding and output head are the trunk's own, shared.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dsmtp.config import ModelConfig
from dsmtp.model import recompute
from dsmtp.model.attention import LatentCache
from dsmtp.model.layer import TransformerLayer
from dsmtp.model.linear import replicated_linear
from dsmtp.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = replicated_linear(2 * cfg.hidden_size, cfg.hidden_size, cfg.init_std)
        # Same kind of layer as the trunk's last one.
        self.layer = TransformerLayer(cfg, layer_id=cfg.num_layers - 1)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, next_token_embedding: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, cache: Optional[LatentCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h_prev [B, S, H] (post-norm), next_token_embedding [B, S, H] -> (h_k, aux loss).
        `cache`: the module's own KV cache when decoding (see MLA.forward)."""
        h = self.eh_proj(torch.cat([self.enorm(next_token_embedding), self.hnorm(h_prev)], dim=-1))
        h, aux = recompute.run(self.layer, h, cos, sin, cache)
        return self.norm(h), aux
