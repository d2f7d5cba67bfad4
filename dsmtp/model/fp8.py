"""FP8 training GEMMs after DeepSeek-V3's recipe (section 3.3), with torch._scaled_mm.

- e4m3 for the forward (Fprop), input-gradient (Dgrad) and weight-gradient (Wgrad) GEMMs;
- activations and output gradients scaled per 1x128 tile along the contraction dimension,
  weights per 128x128 block; accumulation and the scales in fp32 (cuBLAS's blockwise mode);
- the router, embedding, output head, norms and the attention core are never converted: only the
  linear layers that `enable` marks (dense and expert GEMMs) run here.

Routed experts use torch._scaled_grouped_mm, which on Hopper takes row-wise scales only (one scale
per token row and per expert output channel, over the whole contraction dimension): coarser than the
1x128 tiles. Their Wgrad stays a bf16 grouped GEMM.

`train.fp8_backend: transformer_engine` instead runs the dense linears through te.Linear under
Float8BlockScaling (DeepSeek's recipe as TE ships it). No test has run that path (Transformer Engine
does not install on the GPU machine this project is tested on), so it runs only when asked for.

Which layers switch is the model's decision (`DeepSeekV3.enable_fp8`); this file holds the kernels.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch import nn

from dsmtp.config import ConfigError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
TILE = 128
_TINY = 1e-12  # all-zero tiles get scale _TINY / 448 instead of a division by zero


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def require_transformer_engine() -> None:
    if not transformer_engine_available():
        raise ConfigError("train.fp8_backend=transformer_engine: Transformer Engine is not installed; install it "
                          "(pip install transformer-engine[pytorch]) or set train.fp8_backend=torch")


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, K/128]), one scale per 1x128 tile, x ~ q * scale.

    The scales come outer-dimension-major (stride (1, M)), the layout cuBLAS's 1x128 mode reads.
    """
    m, k = x.shape
    tiles = x.float().view(m, k // TILE, TILE)
    scale = tiles.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / E4M3_MAX
    q = (tiles / scale).to(E4M3).view(m, k)
    return q, scale.view(m, k // TILE).t().contiguous().t()


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], fp32 scales [N/128, K/128]), one scale per 128x128 block."""
    n, k = w.shape
    blocks = w.float().view(n // TILE, TILE, k // TILE, TILE)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=_TINY) / E4M3_MAX
    q = (blocks / scale).to(E4M3).view(n, k)
    return q, scale.view(n // TILE, k // TILE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3, fp32 scales [...]), one scale per row (for the grouped GEMMs)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / E4M3_MAX
    return (x / scale).to(E4M3), scale.squeeze(-1)


def _blockwise_mm(a_q, a_scale, b_q_t, b_scale_t, out_dtype):
    # a_q [M, K] row-major, b_q_t [K, N] column-major; scales as cuBLAS's blockwise modes want them.
    return torch._scaled_mm(a_q, b_q_t, scale_a=a_scale, scale_b=b_scale_t, out_dtype=out_dtype)


class _FP8Linear(torch.autograd.Function):
    """y = x W^T with all three GEMMs in FP8 (1x128 tiles for x and dy, 128x128 blocks for W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.bfloat16)
        w_q, w_scale = quantize_blocks(weight)
        x_q, x_scale = quantize_tiles(x2)
        y = _blockwise_mm(x_q, x_scale, w_q.t(), w_scale.t(), torch.bfloat16)
        ctx.save_for_backward(x2, w_q, w_scale)
        ctx.weight_dtype = weight.dtype
        return y.view(*lead, -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w_q, w_scale = ctx.saved_tensors
        lead, n = dy.shape[:-1], dy.shape[-1]
        dy2 = dy.reshape(-1, n).to(torch.bfloat16)
        # Dgrad: dx = dy W, contracting over N: dy in 1x128 tiles along N; W's blocks are square, so
        # its quantized values serve transposed (stored [K, N] row-major = [N, K] column-major).
        dy_q, dy_scale = quantize_tiles(dy2)
        w_t = w_q.t().contiguous().t()
        dx = _blockwise_mm(dy_q, dy_scale, w_t, w_scale.t().contiguous().t(), torch.bfloat16)
        # Wgrad: dW = dy^T x, contracting over tokens: both re-quantized in 1x128 tiles along tokens.
        dyt_q, dyt_scale = quantize_tiles(dy2.t().contiguous())
        xt_q, xt_scale = quantize_tiles(x2.t().contiguous())
        dw = _blockwise_mm(dyt_q, dyt_scale, xt_q.t(), xt_scale.t(), torch.float32)
        return dx.view(*lead, -1), dw.to(ctx.weight_dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FP8 x W^T (weight [N, K] with N and K multiples of 512, tokens a multiple of 512); output bf16."""
    return _FP8Linear.apply(x, weight)


class _FP8GroupedMM(torch.autograd.Function):
    """Rows of x [M, K] in expert groups (offsets) times w [E, N, K]^T per group, Fprop and Dgrad in
    FP8 with row-wise scales, Wgrad in bf16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        x_q, x_scale = quantize_rows(x)
        w_q, w_scale = quantize_rows(weight)  # one scale per (expert, output channel)
        y = torch._scaled_grouped_mm(x_q, w_q.transpose(1, 2), x_scale, w_scale, offs=offsets,
                                     out_dtype=torch.bfloat16)
        ctx.save_for_backward(x, weight, offsets)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, offsets = ctx.saved_tensors
        dy = dy.to(torch.bfloat16)
        dy_q, dy_scale = quantize_rows(dy)
        wt_q, wt_scale = quantize_rows(weight.transpose(1, 2).contiguous())  # [E, K, N], one scale per (expert, input channel)
        dx = torch._scaled_grouped_mm(dy_q, wt_q.transpose(1, 2), dy_scale, wt_scale, offs=offsets,
                                      out_dtype=torch.bfloat16)
        dw = torch._grouped_mm(dy.t(), x, offs=offsets)  # [E, N, K]
        return dx, dw.to(weight.dtype), None


GROUP_ALIGN = 16  # rows per expert group padded to this, as torch's FP8 grouped GEMM expects


def pad_groups(x: torch.Tensor, tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by expert -> (rows with each group zero-padded to GROUP_ALIGN, the padded groups'
    end offsets (int32), and where each original row went). Static shapes, no host sync: the padded
    tensor has room for the worst case, N + E * (GROUP_ALIGN - 1) rows."""
    n, e = x.shape[0], tokens_per_expert.numel()
    padded = (tokens_per_expert + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    padded_starts = padded.cumsum(0) - padded
    starts = tokens_per_expert.cumsum(0) - tokens_per_expert
    group = torch.repeat_interleave(torch.arange(e, device=x.device), tokens_per_expert, output_size=n)
    dest = padded_starts[group] + torch.arange(n, device=x.device) - starts[group]
    out = x.new_zeros(n + e * (GROUP_ALIGN - 1), x.shape[1]).index_copy(0, dest, x)
    return out, padded.cumsum(0).to(torch.int32), dest


class _UnpadGroups(torch.autograd.Function):
    """padded[dest]: the rows pad_groups placed, back in their original order. `dest` has no repeats,
    so the backward writes each gradient row to its one place (index_copy) where autograd's
    index_select backward would run an atomic scatter-add (slow in bf16)."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(dest)
        ctx.padded_rows = padded.shape[0]
        return padded.index_select(0, dest)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dest,) = ctx.saved_tensors
        return grad.new_zeros(ctx.padded_rows, grad.shape[1]).index_copy_(0, dest, grad), None


def unpad_groups(padded: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    return _UnpadGroups.apply(padded, dest)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """FP8 grouped x w[e]^T for the rows of each expert group; weight [E, N, K], offsets int32 ends."""
    return _FP8GroupedMM.apply(x, weight, offsets)


def te_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T through a te.Linear that shares the module's weight (names and optimizer state stay ours).

    Runs in FP8 inside `autocast("transformer_engine")`; train.fp8_backend=transformer_engine only (untested).
    """
    layer = module.__dict__.get("_te_layer")
    if layer is None:
        import transformer_engine.pytorch as te

        out_f, in_f = module.weight.shape
        layer = te.Linear(in_f, out_f, bias=False, params_dtype=module.weight.dtype, device=module.weight.device)
        layer.weight = module.weight
        module.__dict__["_te_layer"] = layer  # not a submodule: adds no state-dict keys
    return layer(x)


# cuBLAS reads a 128x128 scale tensor whose count of blocks along the contraction dimension is a
# multiple of 4 (it pads; torch._scaled_mm takes the unpadded shape and leaves the rest to chance, which
# gives wrong results: notes/code-measurements.md). Fprop contracts over in_features, Dgrad over out_features.
_BLOCKWISE_MULTIPLE = 4 * TILE


def eligible(module: nn.Module) -> bool:
    """Whether a linear layer can take the blockwise recipe: both dimensions multiples of 512."""
    out_f, in_f = module.weight.shape
    return out_f % _BLOCKWISE_MULTIPLE == 0 and in_f % _BLOCKWISE_MULTIPLE == 0


def autocast(backend: str | None):
    """The context a training step's forward runs in: TE's fp8_autocast with its blockwise recipe for
    the transformer_engine backend, else nothing (the torch backend scales each GEMM itself)."""
    if backend != "transformer_engine":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8BlockScaling

    return te.fp8_autocast(enabled=True, fp8_recipe=Float8BlockScaling())
