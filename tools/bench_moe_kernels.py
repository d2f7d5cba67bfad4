"""Sizing issue 25's grouped-GEMM fusion lever before building it: a config's routed experts, forward and
backward, through main's path (kernels.grouped_swiglu: torch._grouped_mm, SwiGLU fused by torch.compile)
against quack's grouped GEMMs (the flash-attn-4 dependency) with SwiGLU in the first GEMM's epilogue and
its gradient in the epilogue of the backward GEMM that makes it (SonicMoE's design). CUDA only.

    python tools/bench_moe_kernels.py --config configs/small.yaml [--results FILE]

Prints one table: time per forward+backward and each output's and gradient's largest difference from main's
path relative to that tensor's largest entry. Rows are appended to --results as they are measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from dsmtp.config import load_config  # noqa: E402
from dsmtp.model import kernels  # noqa: E402


class QuackGroupedSwiGLU(torch.autograd.Function):
    """Rows sorted by expert [M, H] -> w2(swiglu(w13 x)) per expert, with w13 [E, 2I, H] holding the gate
    and up rows interleaved (quack's gated epilogue pairs column 2j with 2j+1)."""

    @staticmethod
    def forward(ctx, x, w13, w2, cu_seqlens):
        from quack.gemm_interface import gemm, gemm_gated

        preact, h = gemm_gated(x, w13.transpose(1, 2), activation="swiglu", cu_seqlens_m=cu_seqlens, tuned=False)
        ctx.save_for_backward(x, w13, w2, cu_seqlens, preact)
        return gemm(h, w2.transpose(1, 2), cu_seqlens_m=cu_seqlens, tuned=False)

    @staticmethod
    def backward(ctx, grad):
        from quack.gemm_interface import gemm, gemm_dgated

        x, w13, w2, cu_seqlens, preact = ctx.saved_tensors
        grad = grad.contiguous()
        grad_preact, h = gemm_dgated(grad, w2, preact, activation="swiglu", cu_seqlens_m=cu_seqlens, tuned=False)
        offsets = cu_seqlens[1:]
        grad_w2 = torch._grouped_mm(grad.t(), h, offs=offsets)
        grad_w13 = torch._grouped_mm(grad_preact.t(), x, offs=offsets)
        grad_x = gemm(grad_preact, w13, cu_seqlens_m=cu_seqlens, tuned=False)
        return grad_x, grad_w13, grad_w2, None


def quack_swiglu(x, tokens_per_expert, w1, w2, w3):
    e, i, h = w1.shape
    w13 = torch.stack([w1.to(torch.bfloat16), w3.to(torch.bfloat16)], dim=2).reshape(e, 2 * i, h)
    cu_seqlens = torch.nn.functional.pad(tokens_per_expert.cumsum(0), (1, 0)).to(torch.int32)
    return QuackGroupedSwiGLU.apply(x, w13, w2.to(torch.bfloat16), cu_seqlens)


def main_swiglu(x, tokens_per_expert, w1, w2, w3):
    return kernels.grouped_swiglu(x, tokens_per_expert, w1, w2, w3)


def routed_inputs(cfg, tokens: int, seed: int):
    """Rows of `tokens` tokens, each routed to k distinct random experts, sorted by expert (bf16, as the
    dispatch hands them over), fp32 master weights, and an output gradient."""
    m, gen = cfg.model, torch.Generator(device="cuda").manual_seed(seed)
    e, h, i, k = m.n_routed_experts, m.hidden_size, m.moe_intermediate_size, m.num_experts_per_tok
    expert_ids = torch.rand(tokens, e, device="cuda", generator=gen).topk(k, dim=1).indices
    tokens_per_expert = torch.bincount(expert_ids.flatten(), minlength=e)
    x = torch.randn(tokens * k, h, device="cuda", generator=gen).to(torch.bfloat16)
    weights = [torch.randn(shape, device="cuda", generator=gen) * m.init_std for shape in ((e, i, h), (e, h, i), (e, i, h))]
    grad = torch.randn(tokens * k, h, device="cuda", generator=gen).to(torch.bfloat16)
    return x, tokens_per_expert, weights, grad


def forward_backward(fn, x, tokens_per_expert, weights, grad):
    x = x.detach().requires_grad_()
    weights = [w.detach().requires_grad_() for w in weights]
    out = fn(x, tokens_per_expert, *weights)
    out.backward(grad)
    return [out, x.grad, *(w.grad for w in weights)]


def time_ms(fn, args, iters: int) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward_backward(fn, *args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    cfg = load_config(args.config)
    tokens = cfg.train.seq_len * cfg.train.micro_batch_size
    inputs = routed_inputs(cfg, tokens, seed=0)
    device = torch.cuda.get_device_name()
    names = ["out", "grad x", "grad w1", "grad w2", "grad w3"]
    reference = forward_backward(torch.compile(main_swiglu), *inputs)
    print(f"{device}, {args.config}: {tokens} tokens x top-{cfg.model.num_experts_per_tok}, routed experts only")
    print(f"| path | ms fwd+bwd | {' | '.join(names)} (max diff / max) |")
    print("|---|---|" + "---|" * len(names))
    for label, fn in (("main: torch._grouped_mm, compiled", torch.compile(main_swiglu)),
                      ("quack: SwiGLU in the GEMM epilogues", quack_swiglu)):
        try:
            for _ in range(3):
                forward_backward(fn, *inputs)
            ms = time_ms(fn, inputs, args.iters)
            diffs = [relative_difference(a, b) for a, b in zip(forward_backward(fn, *inputs), reference)]
        except Exception as err:  # a probe of a young library: report what broke and go on
            print(f"| {label} | failed: {type(err).__name__}: {str(err)[:300]} |")
            continue
        print(f"| {label} | {ms:.3f} | " + " | ".join(f"{d:.1e}" for d in diffs) + " |")
        if args.results:
            with args.results.open("a") as f:
                f.write(json.dumps({"device": device, "config": args.config, "path": label, "ms": ms,
                                    "relative_difference": dict(zip(names, diffs))}) + "\n")


if __name__ == "__main__":
    main()
