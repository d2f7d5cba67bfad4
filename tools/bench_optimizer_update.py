"""The optimizer update alone, over a config's parameters: torch's fused AdamW with fp32 moments (the
default) against multi_tensor_adamw's one-launch update with bf16 moments at each block size and warp
count and blocks a program, over fp32 parameters and over bf16 parameters with fp32 master weights (train.param_dtype). CUDA only.

    python tools/bench_optimizer_update.py --config configs/small.yaml [--results FILE]
    python tools/bench_optimizer_update.py --table FILE     # the table of a results file

Each row: milliseconds per update (back-to-back updates between two CUDA events, so launch latency hides
behind the previous update as in training), the bytes it must move over that time, and for ours the largest
difference of parameters and moments from the first block size's (the same arithmetic per element: 0).
Rows are appended to --results as they are measured; the table is printed as it goes.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from dsmtp.config import load_config  # noqa: E402
from dsmtp.model.model import DeepSeekV3  # noqa: E402
from dsmtp.train.metrics import MetricsLog  # noqa: E402


def time_ms(update, iters: int) -> float:
    for _ in range(3):
        update()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        update()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


HEADER = ("| update | params | block | warps | blocks a program | ms | GB moved | TB/s | max diff vs first |\n"
          "|---|---|---|---|---|---|---|---|---|")


def table_line(row: dict) -> str:
    diff = row["diff_vs_first"]
    return (f"| {row['update']} | {row.get('param_dtype', 'fp32')} | {row['block'] or '-'} | "
            f"{row['num_warps'] or '-'} | {row.get('iters', 1) if row['block'] else '-'} | {row['ms']:.3f} | "
            f"{row['gb_moved']:.1f} | {row['gb_moved'] / row['ms']:.2f} | {'-' if diff is None else f'{diff:.1e}'} |")


def print_table(path: Path) -> None:
    rows = list(MetricsLog(path).records())
    print(f"{rows[0]['device']}, {rows[0]['config']}\n{HEADER}")
    for row in rows:
        print(table_line(row))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--blocks", default="512,1024,2048,4096")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--blocks-a-program", default="1,2,4,8")
    parser.add_argument("--param-dtypes", default="fp32,bf16",
                        help="fp32 parameters; bf16 parameters and gradients over fp32 master weights")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--table", type=Path, help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.table:
        return print_table(args.table)
    from dsmtp.train.multi_tensor_adamw import MultiTensorAdamW  # triton: CUDA installs only

    cfg = load_config(args.config)
    cfg.model.mtp_depth = max(cfg.model.mtp_depth, 1)
    with torch.device("cuda"):  # initialised where it runs: 0.7B parameters initialise slowly on a CPU
        params = [p.detach() for p in DeepSeekV3(cfg.model).parameters()]
    numel = sum(p.numel() for p in params)
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    device = torch.cuda.get_device_name()
    print(f"{device}, {args.config}: {len(params)} tensors, {numel / 1e6:.1f}M parameters, one group")
    print(HEADER)

    def report(label: str, param_dtype: str, block, warps, iters, ms: float, bytes_per_param: int, diff) -> None:
        row = dict(device=device, config=args.config, update=label, param_dtype=param_dtype, block=block,
                   num_warps=warps, iters=iters, ms=ms, gb_moved=numel * bytes_per_param / 1e9, diff_vs_first=diff)
        print(table_line(row))
        if args.results:
            MetricsLog(args.results).append(row)

    fused_params = [p.clone() for p in params]
    for p, g in zip(fused_params, grads):
        p.grad = g
    fused = torch.optim.AdamW(fused_params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    # parameter, gradient read; parameter written; two fp32 moments read and written
    report("torch fused AdamW, fp32 moments", "fp32", None, None, None, time_ms(fused.step, args.iters),
           4 * 3 + 4 * 4, None)
    del fused, fused_params

    for param_dtype in args.param_dtypes.split(","):
        bf16 = param_dtype == "bf16"
        first = None
        for block, warps, iters in itertools.product(*(map(int, v.split(",")) for v in (args.blocks, args.warps,
                                                                                       args.blocks_a_program))):
            ours = [p.to(torch.bfloat16 if bf16 else torch.float32, copy=True) for p in params]
            masters = [p.clone() for p in params] if bf16 else None
            our_grads = [g.to(ours[0].dtype) for g in grads]
            moments = [[torch.zeros_like(p, dtype=torch.bfloat16) for p in params] for _ in range(2)]
            steps = [torch.zeros((), device="cuda") for _ in params]
            lr, scale = torch.full((), 1e-4, device="cuda"), torch.ones((), device="cuda")
            skip = torch.zeros((), dtype=torch.bool, device="cuda")
            update = MultiTensorAdamW(block=block, num_warps=warps, iters=iters)
            ms = time_ms(lambda: update(ours, our_grads, *moments, steps, lr, 0.9, 0.95, 1e-8, 0.1, scale, skip,
                                        masters), args.iters)
            result = [*ours, *moments[0], *moments[1], *(masters or [])]
            diff = 0.0 if first is None else max((a.float() - b.float()).abs().max().item()
                                                   for a, b in zip(result, first))
            first = first or result
            # fp32: parameter, gradient read, parameter written; bf16: bf16 gradient read, fp32 master read
            # and written, bf16 parameter written; both: two bf16 moments read and written
            report("multi_tensor_adamw, bf16 moments", param_dtype, block, warps, iters, ms,
                   (2 + 4 * 2 + 2 if bf16 else 4 * 3) + 2 * 4, diff)


if __name__ == "__main__":
    main(sys.argv[1:])
