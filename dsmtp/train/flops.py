"""Model FLOPs per trained token, the numerator of MFU (docs/design.md, "Model FLOPs per token
and MFU"):

    6 * (activated parameters - input embedding + D * output head)
  + 6 * (layers + D) * heads * (qk_head_dim + v_head_dim) * seq_len / 2

The first term is forward + backward of every matmul a token touches (each MTP depth runs the
shared output head once more; the embedding lookup is not a matmul); the second is attention
scores and values, halved for the causal mask.
"""

from __future__ import annotations

from dsmtp.config import ModelConfig
from dsmtp.model.params import count_parameters

# Dense bf16 peak of one H100 / H200 SXM, the denominator of reported MFU.
PEAK_BF16_FLOPS = 989e12


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    c = count_parameters(m)
    matmul_params = c.activated - c.embedding + m.mtp_depth * c.output_head
    attention = (m.num_layers + m.mtp_depth) * m.num_heads * (m.qk_head_dim + m.v_head_dim) * seq_len / 2
    return 6.0 * matmul_params + 6.0 * attention


def mfu(tokens_per_second: float, m: ModelConfig, seq_len: int, num_devices: int = 1) -> float:
    """Model FLOPs utilization against the bf16 dense peak of `num_devices` H100/H200 cards."""
    return tokens_per_second * flops_per_token(m, seq_len) / (PEAK_BF16_FLOPS * num_devices)
