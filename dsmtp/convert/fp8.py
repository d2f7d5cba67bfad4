"""Block-wise FP8 weights in the layout of the released DeepSeek-V3 checkpoint.

Every linear weight inside a decoder layer (attention projections, dense / shared / routed expert
projections) is stored as float8_e4m3fn with one float32 `weight_scale_inv` per 128 x 128 block, and
dequantizes as `weight = fp8 * scale_inv` (block-broadcast). Embedding, output head, norms, router
and the MTP eh_proj stay in bf16, as released.
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}
SCALE_SUFFIX = "_scale_inv"


def is_quantized(hf_name: str) -> bool:
    """Whether the released layout stores this tensor in fp8."""
    return hf_name.endswith("_proj.weight") and (".self_attn." in hf_name or ".mlp." in hf_name)


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = shape
    return (-(-rows // BLOCK), -(-cols // BLOCK))


def _blocks(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """[R, C] -> [R/128, C/128, 128, 128] (padded with `fill`)."""
    rows, cols = x.shape
    br, bc = scale_shape(x.shape)
    padded = torch.nn.functional.pad(x, (0, bc * BLOCK - cols, 0, br * BLOCK - rows), value=fill)
    return padded.view(br, BLOCK, bc, BLOCK).transpose(1, 2)


def _unblocks(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    br, bc = blocks.shape[:2]
    return blocks.transpose(1, 2).reshape(br * BLOCK, bc * BLOCK)[:shape[0], :shape[1]]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] weight -> (fp8 weight [R, C], float32 scale_inv [ceil(R/128), ceil(C/128)])."""
    blocks = _blocks(weight.float())
    amax = blocks.abs().amax(dim=(-2, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return _unblocks(q, tuple(weight.shape)).contiguous(), scale


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """fp8 weight and its block scales -> float32 weight."""
    blocks = _blocks(weight.float())
    return _unblocks(blocks * scale_inv.float()[..., None, None], tuple(weight.shape)).contiguous()
