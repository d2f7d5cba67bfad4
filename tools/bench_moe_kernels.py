"""Issue 25's MoE kernel levers alone: a config's routed experts with their token gather and gated
combine (moe.dispatch_local), forward and backward, compiled as the training step compiles its layers,
under bf16 autocast. The torch path (torch._grouped_mm, the SwiGLU and the gathers fused by
torch.compile: the triton_* switches off) against each kernels.backends switch: triton_gather and
triton_swiglu (dsmtp.model.moe_triton's row gathers and SwiGLU gradient), quack_experts (quack's
grouped GEMMs, the flash-attn-4 dependency, with the SwiGLU in the first GEMM's epilogue and its gradient
in the epilogue of the backward GEMM that makes it), and quack_tuned (quack's autotuner). CUDA only.

    python tools/bench_moe_kernels.py --config configs/small.yaml [--results FILE]
    python tools/bench_moe_kernels.py --table FILE     # the table of a results file

Prints one table: time per forward+backward and each output's and gradient's largest difference from the torch
path relative to that tensor's largest entry. Rows are appended to --results as they are measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from bench_common import (difference_cells, header, median_ms, parse_arguments,  # noqa: E402
                          print_results_table, relative_differences, report)
from dsmtp.config import load_config  # noqa: E402
from dsmtp.model import kernels  # noqa: E402
from dsmtp.model.moe import RoutedExperts, dispatch_local  # noqa: E402
from dsmtp.parallel.topology import ensure_initialized  # noqa: E402

TORCH = {"triton_gather": False, "triton_swiglu": False}
DEFAULT = dict(TORCH, triton_gather=True, triton_swiglu=True)
PATHS = [("torch: torch._grouped_mm, compiled", TORCH),
         ("triton_swiglu", dict(TORCH, triton_swiglu=True)),
         ("triton_gather", dict(TORCH, triton_gather=True)),
         ("triton_gather + triton_swiglu (the default)", DEFAULT),
         ("quack_experts: SwiGLU in the GEMM epilogues", dict(TORCH, quack_experts=True)),
         ("quack_experts, quack's autotuner on (quack_tuned)", dict(TORCH, quack_experts=True, quack_tuned=True))]


def routed(switches: dict[str, bool]):
    """dispatch_local compiled, under bf16 autocast, with `switches` set on kernels.backends while it
    traces and runs."""
    compiled = torch.compile(dispatch_local)

    def run(*args):
        before = {name: getattr(kernels.backends, name) for name in switches}
        for name, value in switches.items():
            setattr(kernels.backends, name, value)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return compiled(*args)
        finally:
            for name, value in before.items():
                setattr(kernels.backends, name, value)
    return run


def routed_inputs(cfg, tokens: int, seed: int):
    """`tokens` fp32 token rows (the residual stream), each routed to k distinct random experts with
    random gates, the routed experts (fp32 master weights), and an output gradient."""
    m, gen = cfg.model, torch.Generator(device="cuda").manual_seed(seed)
    e, h, k = m.n_routed_experts, m.hidden_size, m.num_experts_per_tok
    torch.manual_seed(seed)
    experts = RoutedExperts(m).cuda()
    expert_ids = torch.rand(tokens, e, device="cuda", generator=gen).topk(k, dim=1).indices
    x = torch.randn(tokens, h, device="cuda", generator=gen)
    gates = torch.rand(tokens, k, device="cuda", generator=gen)
    grad = torch.randn(tokens, h, device="cuda", generator=gen)
    return x, expert_ids, gates, experts, grad


def forward_backward(fn, x, expert_ids, gates, experts, grad):
    x, gates = x.detach().requires_grad_(), gates.detach().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = fn(x, expert_ids, gates, experts)
    out.backward(grad)
    return [out, x.grad, gates.grad, experts.w13.grad, experts.w2.grad]


NAMES = ["out", "grad x", "grad gates", "grad w13", "grad w2"]


COLUMNS = ["ms fwd+bwd"]


def table_line(row: dict) -> str:
    return f"| {row['path']} | {row['ms']:.3f} | {difference_cells(row)} |"


def main(argv: list[str]) -> None:
    args = parse_arguments(__doc__, argv)
    if args.table:
        return print_results_table(args.table, "", COLUMNS, table_line)
    ensure_initialized()
    cfg = load_config(args.config)
    tokens = cfg.train.seq_len * cfg.train.micro_batch_size
    inputs = routed_inputs(cfg, tokens, seed=0)
    device = torch.cuda.get_device_name()
    reference = forward_backward(routed(TORCH), *inputs)
    print(f"{device}, {args.config}: {tokens} tokens x top-{cfg.model.num_experts_per_tok}, "
          "routed experts with their gather and combine")
    print(header(COLUMNS, NAMES))
    for label, switches in PATHS:
        fn = routed(switches)
        try:
            for _ in range(3):
                forward_backward(fn, *inputs)
            ms = median_ms(lambda: forward_backward(fn, *inputs), args.iters)
            differences = relative_differences(forward_backward(fn, *inputs), reference, NAMES)
        except Exception as err:  # a probe of a young kernel or library: report what broke and go on
            print(f"| {label} | failed: {type(err).__name__}: {str(err)[:300]} |")
            continue
        report({"device": device, "config": args.config, "path": label, "ms": ms,
                "relative_difference": differences}, table_line, args.results)


if __name__ == "__main__":
    main(sys.argv[1:])
