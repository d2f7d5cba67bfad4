"""Issue 25's grouped-GEMM fusion lever alone: a config's routed experts, forward and backward, through
kernels.grouped_swiglu's default CUDA path (torch._grouped_mm, SwiGLU fused by torch.compile) and through
kernels.backends.quack_experts (quack's grouped GEMMs, the flash-attn-4 dependency, with the SwiGLU in the
first GEMM's epilogue and its gradient in the epilogue of the backward GEMM that makes it), with quack's
default tile configuration and with its autotuner (kernels.backends.quack_tuned). CUDA only.

    python tools/bench_moe_kernels.py --config configs/small.yaml [--results FILE]
    python tools/bench_moe_kernels.py --table FILE     # the table of a results file

Prints one table: time per forward+backward and each output's and gradient's largest difference from main's
path relative to that tensor's largest entry. Rows are appended to --results as they are measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from dsmtp.config import load_config  # noqa: E402
from dsmtp.model import kernels  # noqa: E402
from dsmtp.train.metrics import MetricsLog  # noqa: E402


def experts(quack: bool, tuned: bool = False):
    """kernels.grouped_swiglu, compiled as the training step compiles its layers, with
    kernels.backends.quack_experts and quack_tuned set while it traces and runs."""
    compiled = torch.compile(kernels.grouped_swiglu)

    def run(*args):
        before = kernels.backends.quack_experts, kernels.backends.quack_tuned
        kernels.backends.quack_experts, kernels.backends.quack_tuned = quack, tuned
        try:
            return compiled(*args)
        finally:
            kernels.backends.quack_experts, kernels.backends.quack_tuned = before
    return run


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


NAMES = ["out", "grad x", "grad w1", "grad w2", "grad w3"]
HEADER = f"| path | ms fwd+bwd | {' | '.join(NAMES)} (max diff / max) |\n|---|---|" + "---|" * len(NAMES)


def table_line(row: dict) -> str:
    return f"| {row['path']} | {row['ms']:.3f} | " + " | ".join(f"{row['relative_difference'][n]:.1e}" for n in NAMES) + " |"


def print_table(path: Path) -> None:
    rows = list(MetricsLog(path).records())
    print(f"{rows[0]['device']}, {rows[0]['config']}\n{HEADER}")
    for row in rows:
        print(table_line(row))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--table", type=Path, help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.table:
        return print_table(args.table)
    cfg = load_config(args.config)
    tokens = cfg.train.seq_len * cfg.train.micro_batch_size
    inputs = routed_inputs(cfg, tokens, seed=0)
    device = torch.cuda.get_device_name()
    reference = forward_backward(experts(quack=False), *inputs)
    print(f"{device}, {args.config}: {tokens} tokens x top-{cfg.model.num_experts_per_tok}, routed experts only")
    print(HEADER)
    for label, fn in (("torch._grouped_mm, compiled", experts(quack=False)),
                      ("quack_experts: SwiGLU in the GEMM epilogues, compiled", experts(quack=True)),
                      ("quack_experts, quack's autotuner on (quack_tuned)", experts(quack=True, tuned=True))):
        try:
            for _ in range(3):
                forward_backward(fn, *inputs)
            ms = time_ms(fn, inputs, args.iters)
            diffs = [relative_difference(a, b) for a, b in zip(forward_backward(fn, *inputs), reference)]
        except Exception as err:  # a probe of a young library: report what broke and go on
            print(f"| {label} | failed: {type(err).__name__}: {str(err)[:300]} |")
            continue
        row = {"device": device, "config": args.config, "path": label, "ms": ms,
               "relative_difference": dict(zip(NAMES, diffs))}
        print(table_line(row))
        if args.results:
            MetricsLog(args.results).append(row)


if __name__ == "__main__":
    main(sys.argv[1:])
