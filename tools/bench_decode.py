"""Decoding speed: plain vs MTP self-speculative (K = 1..4) at batch 1 and 8, as one table.

    python tools/bench_decode.py --ckpt runs/tiny [--device cuda] [--max-new-tokens 128]

Every configuration decodes the same prompts for exactly --max-new-tokens tokens (stop tokens are
ignored, so all do the same work), greedy, after one warm-up; the best of --repeats runs is kept, the
configurations taking turns. tokens/s counts generated tokens over the whole generate call (prefill
included).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmtp.serve.engine import Engine, Request  # noqa: E402
from dsmtp.serve.loading import encode_prompt, load  # noqa: E402

DEFAULT_PROMPTS = ["import os\n", "def main(", "class Config:\n", "    return ", "for i in range(",
                   "if __name__ == ", "# Copyright", "from typing import "]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def best_rates(engines: dict[int, Engine], requests: list[Request], repeats: int, device: torch.device):
    """Best tokens/s, stats and generated tokens of every engine; repeats interleave the engines, so
    load that comes and goes on a shared machine hits them alike."""
    best: dict[int, float] = {k: 0.0 for k in engines}
    stats, tokens = {}, {}
    for _ in range(repeats):
        for k, engine in engines.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            results, stats[k] = engine.generate(requests)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[k] = max(best[k], sum(len(r.tokens) for r in results) / (time.perf_counter() - start))
            tokens[k] = [r.tokens for r in results]
    return best, stats, tokens


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: as stored")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", action="append", help="repeatable; default: a few code openings")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model, cfg, tokenizer = load(args.ckpt, device, getattr(torch, args.dtype) if args.dtype else None)
    prompts = [encode_prompt(tokenizer, p) for p in (args.prompt or DEFAULT_PROMPTS)]
    max_k = min(args.max_k, model.mtp.max_drafts or args.max_k) if cfg.model.mtp_depth else 0  # parallel heads: K <= D
    ks = [0] + list(range(1, max_k + 1))
    print(f"# {args.ckpt}: {cfg.model.num_layers} layers + {cfg.model.mtp_depth} {cfg.model.mtp_kind} MTP, "
          f"hidden {cfg.model.hidden_size}, "
          f"dtype {next(model.parameters()).dtype}")
    print(f"# machine: {machine(device)}")
    print(f"# greedy, {args.max_new_tokens} new tokens per sequence, best of {args.repeats}; tok/fwd: tokens per "
          "trunk forward; same: tokens identical to plain decoding")
    header = (f"{'batch':>5} {'mode':>6} {'tokens/s':>10} {'speedup':>8} {'tok/fwd':>8} {'same':>5}  "
              "acceptance per draft position")
    print(header + "\n" + "-" * len(header))
    engines = {k: Engine(model, k) for k in ks}
    for batch_size in args.batch_sizes:
        requests = [Request(prompts[i % len(prompts)], args.max_new_tokens) for i in range(batch_size)]
        for engine in engines.values():
            engine.generate(requests)  # warm-up
        rates, stats, tokens = best_rates(engines, requests, args.repeats, device)
        for k in ks:
            acceptance = " ".join(f"{a:.3f}" for a in stats[k].acceptance)
            mode = f"K={k}" if k else "plain"
            same = "yes" if tokens[k] == tokens[0] else "NO"
            print(f"{batch_size:>5} {mode:>6} {rates[k]:>10.1f} {rates[k] / rates[0]:>7.2f}x "
                  f"{stats[k].tokens_per_forward:>8.3f} {same:>5}  {acceptance}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
