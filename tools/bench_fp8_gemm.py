"""Where FP8 training GEMMs pay: dsmtp's FP8 paths against bf16, forward + backward, by model width.

    python tools/bench_fp8_gemm.py [--widths 1024 2048 4096 7168] [--tokens 16384] [--experts 32 --top-k 6]

For each hidden width H it times, on the GPU, what one training step runs per layer:
  - dense: x [tokens, H] @ W^T, W [H, H] (fp32 master weight), `dsmtp.model.fp8.linear` (1x128 / 128x128
    blockwise scales) against bf16 autocast `F.linear`;
  - grouped: tokens * top_k rows split evenly over the experts, each x_e @ W_e^T with W_e [H, H],
    `dsmtp.model.fp8.grouped_mm` (row-wise scales, Wgrad in bf16) against bf16 `torch._grouped_mm`.
Both sides are compiled (as `train.compile` does: the quantization fuses into the neighbouring kernels),
quantization and casts included. Median of 20 timed forward+backward passes after 5 warm-up ones.
TFLOP/s counts the three GEMMs (forward, Dgrad, Wgrad): 6 x rows x H x H.
Times are CUDA-event wall times, so a shape whose GEMMs take less than the host needs to launch them
(dense below H = 4096 at 16,384 tokens on an H100) measures launches, not kernels: read those rows as
"no gain", not as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmtp.model import fp8  # noqa: E402


def time_fwd_bwd(fn, x: torch.Tensor, w: torch.Tensor, *extra, steps: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of fn(x, w, *extra) forward and backward."""
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = fn(x, w, *extra)
        y.backward(torch.ones_like(y))
        end.record()
        x.grad = w.grad = None
        if i >= warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def bf16_linear(x, w):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return F.linear(x, w)


def bf16_grouped(x, w, offsets):
    return torch._grouped_mm(x, w.to(torch.bfloat16).transpose(1, 2), offs=offsets)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 7168])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=6)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_gemm needs a CUDA device", file=sys.stderr)
        return 2
    for h in args.widths:
        if h % 512:
            parser.error(f"--widths {h}: the FP8 paths need multiples of 512")
    rows = args.tokens * args.top_k
    if rows % args.experts or (rows // args.experts) % 16:
        parser.error("--tokens x --top-k must split over --experts into groups of a multiple of 16 rows")
    torch._dynamo.config.cache_size_limit = 64
    compiled = lambda fn: torch.compile(fn, dynamic=False)  # noqa: E731  (inductor lowers blockwise FP8 for static shapes only)
    paths = {"dense": (compiled(bf16_linear), compiled(fp8.linear)),
             "grouped": (compiled(bf16_grouped), compiled(fp8.grouped_mm))}
    print(f"device: {torch.cuda.get_device_name()}; forward + backward, compiled, median of 20")
    print(f"{'GEMM':<9}{'H':>6}{'rows':>8}{'bf16 ms':>9}{'fp8 ms':>9}{'bf16 TF/s':>11}{'fp8 TF/s':>10}{'fp8 speed-up':>14}")
    for kind, (bf16_fn, fp8_fn) in paths.items():
        for h in args.widths:
            m = args.tokens if kind == "dense" else rows
            x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            shape = (h, h) if kind == "dense" else (args.experts, h, h)
            w = (torch.randn(*shape, device="cuda") * h ** -0.5).requires_grad_()
            extra = () if kind == "dense" else (
                torch.arange(1, args.experts + 1, device="cuda", dtype=torch.int32) * (rows // args.experts),)
            ms = [time_fwd_bwd(fn, x, w, *extra) for fn in (bf16_fn, fp8_fn)]
            tflops = [6 * m * h * h / t / 1e9 for t in ms]
            print(f"{kind:<9}{h:>6}{m:>8}{ms[0]:>9.3f}{ms[1]:>9.3f}{tflops[0]:>11.0f}{tflops[1]:>10.0f}"
                  f"{ms[0] / ms[1]:>13.2f}x", flush=True)
            del x, w
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
