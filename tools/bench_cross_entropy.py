"""Issue 25's fused cross-entropy lever alone: one output head's loss for a config's batch (seq_len x
micro_batch_size rows, the vocabulary, the hidden size), forward and backward under bf16 autocast,
compiled as the model compiles its loss: the torch path (the head's GEMM, then vocab.cross_entropy and
vocab.top1_correct, fused by torch.compile) against kernels.linear_cross_entropy (cross_entropy_triton's
kernel: the logits read once and overwritten by their gradient). CUDA only.

    python tools/bench_cross_entropy.py --config configs/small.yaml [--results FILE]
    python tools/bench_cross_entropy.py --table FILE     # the table of a results file

Prints one table: time per forward+backward, peak memory above the inputs, and the loss's and the two
gradients' largest difference from the torch path relative to that tensor's largest entry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))

from bench_common import (difference_cells, header, median_ms, parse_arguments,  # noqa: E402
                          print_results_table, relative_differences, report)
from dsmtp.config import load_config  # noqa: E402
from dsmtp.model import kernels  # noqa: E402
from dsmtp.parallel import vocab  # noqa: E402
from dsmtp.parallel.topology import ensure_initialized  # noqa: E402

NAMES = ["loss", "grad h", "grad weight"]


def torch_path(h, weight, targets):
    logits = F.linear(h, weight)
    return vocab.cross_entropy(logits, targets), vocab.top1_correct(logits, targets)


PATHS = [("torch: linear + cross_entropy, compiled", torch.compile(torch_path)),
         ("linear_cross_entropy (cross_entropy_triton), compiled", torch.compile(kernels.linear_cross_entropy))]


def forward_backward(fn, h, weight, targets):
    h, weight = h.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, correct = fn(h, weight, targets)
    (loss * (correct.float() + 1)).mean().backward()  # per-row loss gradients that differ
    return [loss, h.grad, weight.grad]


def measure(fn, inputs, iters: int) -> tuple[float, float]:
    """(median ms, peak GiB allocated above what was allocated before)."""
    for _ in range(3):
        forward_backward(fn, *inputs)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(lambda: forward_backward(fn, *inputs), iters)
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**30


COLUMNS = ["ms fwd+bwd", "peak GiB"]


def table_line(row: dict) -> str:
    return f"| {row['path']} | {row['ms']:.3f} | {row['peak_gib']:.2f} | {difference_cells(row)} |"


def main(argv: list[str]) -> None:
    args = parse_arguments(__doc__, argv)
    if args.table:
        return print_results_table(args.table, ", one head", COLUMNS, table_line)
    ensure_initialized()
    cfg = load_config(args.config)
    rows, gen = cfg.train.seq_len * cfg.train.micro_batch_size, torch.Generator(device="cuda").manual_seed(0)
    inputs = (torch.randn(rows, cfg.model.hidden_size, device="cuda", generator=gen),
              torch.randn(cfg.model.vocab_size, cfg.model.hidden_size, device="cuda", generator=gen) * 0.02,
              torch.randint(0, cfg.model.vocab_size, (rows,), device="cuda", generator=gen))
    device = torch.cuda.get_device_name()
    reference = forward_backward(PATHS[0][1], *inputs)
    print(f"{device}, {args.config}: {rows} rows x vocabulary {cfg.model.vocab_size}, one head")
    print(header(COLUMNS, NAMES))
    for label, fn in PATHS:
        ms, peak = measure(fn, inputs, args.iters)
        report({"device": device, "config": args.config, "path": label, "ms": ms, "peak_gib": peak,
                "relative_difference": relative_differences(forward_backward(fn, *inputs), reference, NAMES)},
               table_line, args.results)


if __name__ == "__main__":
    main(sys.argv[1:])
