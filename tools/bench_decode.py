"""Decoding speed: plain vs MTP self-speculative (K = 1..4) at batch 1 and 8, as one table.

    python tools/bench_decode.py --ckpt runs/tiny [--device cuda] [--max-new-tokens 128] [--engine static|dynamic]
    python tools/bench_decode.py --config configs/small.yaml --device cuda    # random weights: speed only
    python tools/bench_decode.py --ckpt RUN --hf HF_EXPORT                   # and transformers' generate
    python tools/bench_decode.py --table FILE [FILE ...]                     # the rows --results files hold

On CUDA the static engine (dsmtp.serve.static: a preallocated cache, each step one CUDA graph) is the
default; `--engine dynamic` measures the dynamic engine. `--hf` times HF transformers' `generate` on an
export of the same checkpoint (greedy, same prompts and token counts), the reference a user already has.

Every configuration decodes the same prompts for exactly --max-new-tokens tokens (stop tokens are
ignored, so all do the same work), greedy, after one warm-up; the best of --repeats runs is kept, the
configurations taking turns. tokens/s counts generated tokens over the whole generate call (prefill
included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsmtp.config import load_config  # noqa: E402
from dsmtp.machine import describe as machine  # noqa: E402
from dsmtp.model import DeepSeekV3  # noqa: E402
from dsmtp.parallel.topology import ensure_initialized  # noqa: E402
from dsmtp.serve.engine import Engine, Request  # noqa: E402
from dsmtp.serve.loading import encode_prompt, load  # noqa: E402
from dsmtp.serve.static import add_engine_arguments, compile_for_decoding, engine_kind, make_engine  # noqa: E402

DEFAULT_PROMPTS = ["import os\n", "def main(", "class Config:\n", "    return ", "for i in range(",
                   "if __name__ == ", "# Copyright", "from typing import "]


def best_rates(engines: dict[int, Engine], requests: list[Request], repeats: int, device: torch.device):
    """Best tokens/s, stats and generated tokens of every engine; repeats interleave the engines, so
    load that comes and goes on a shared machine hits them alike."""
    best: dict[int, float] = {k: 0.0 for k in engines}
    stats, tokens = {}, {}
    for _ in range(repeats):
        for k, engine in engines.items():
            synchronize(device)
            start = time.perf_counter()
            results, stats[k] = engine.generate(requests)
            synchronize(device)
            best[k] = max(best[k], sum(len(r.tokens) for r in results) / (time.perf_counter() - start))
            tokens[k] = [r.tokens for r in results]
    return best, stats, tokens


def load_model(args, device: torch.device):
    """(model, config, prompts as token ids) from --ckpt, or a randomly initialised --config model."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.ckpt:
        model, cfg, tokenizer = load(args.ckpt, device, dtype)
        return model, cfg, [encode_prompt(tokenizer, p) for p in (args.prompt or DEFAULT_PROMPTS)]
    cfg = load_config(args.config, args.set)
    ensure_initialized()
    torch.manual_seed(0)
    model = DeepSeekV3(cfg.model).to(device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.model.vocab_size, (n,), generator=g).tolist() for n in (3, 5, 8, 4, 6, 7, 2, 9)]
    return model.eval(), cfg, prompts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_rates(hf_dir: str, prompts: list[list[int]], batch_sizes: list[int], new_tokens: int, repeats: int,
             device: torch.device) -> dict[int, float]:
    """HF transformers' greedy generate on an export of the same model, left-padded batches, exactly
    `new_tokens` each: best tokens/s per batch size."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval()
    rates = {}
    for batch_size in batch_sizes:
        batch = [prompts[i % len(prompts)] for i in range(batch_size)]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        best = 0.0
        for _ in range(repeats + 1):  # the first is the warm-up
            synchronize(device)
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
            synchronize(device)
            best = max(best, batch_size * new_tokens / (time.perf_counter() - start))
        rates[batch_size] = best
    return rates


def print_table(rows: list[dict]) -> None:
    """One line per measurement, grouped by label (a run); speedups against the run's plain decoding."""
    print(f"{'run':<32}{'engine':<22}{'batch':>5}{'mode':>7}{'tokens/s':>10}{'speedup':>9}{'tok/fwd':>8}{'same':>5}"
          "  acceptance per draft position")
    for r in rows:
        mode = "HF" if r["engine"] == "hf-transformers" else (f"K={r['k']}" if r["k"] else "plain")
        dtype = "bf16" if r["engine"] == "hf-transformers" or r["model"].endswith("bfloat16") else "fp32"
        engine = f"{r['engine']}{' compiled' if r.get('compile') else ''} {dtype}"
        extra = "" if "speedup" not in r else (f"{r['speedup']:>8.2f}x{r['tokens_per_forward']:>8.3f}"
                                               f"{'yes' if r['same'] else 'NO':>5}  " + " ".join(
                                                   f"{a:.3f}" for a in r["acceptance"]))
        print(f"{r['label'][:31]:<32}{engine:<22}{r['batch']:>5}{mode:>7}{r['tokens_per_s']:>10.1f}{extra}")
    print("machines: " + "; ".join(sorted({r["machine"] for r in rows})))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if argv[:1] == ["--table"]:
        print_table([json.loads(line) for f in argv[1:] for line in Path(f).read_text().splitlines() if line.strip()])
        return 0
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint (step dir, run out_dir or HF export)")
    source.add_argument("--config", help="a config to build with random weights (decoding speed only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: as stored (--config: bfloat16 on CUDA)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", action="append", help="repeatable; default: a few code openings")
    add_engine_arguments(parser)
    parser.add_argument("--hf", help="an HF export of the same model: also time transformers' generate")
    parser.add_argument("--label", default="")
    parser.add_argument("--results", help="append one JSON row per measurement to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    kind = engine_kind(device, args.engine)
    model, cfg, prompts = load_model(args, device)
    if args.compile:
        compile_for_decoding(model)
    max_k = min(args.max_k, model.mtp.max_drafts or args.max_k) if cfg.model.mtp_depth else 0  # parallel heads: K <= D
    ks = [0] + list(range(1, max_k + 1))
    described = (f"{args.ckpt or args.config}: {cfg.model.num_layers} layers + {cfg.model.mtp_depth} "
                 f"{cfg.model.mtp_kind} MTP, hidden {cfg.model.hidden_size}, dtype {next(model.parameters()).dtype}")
    print(f"# {described}\n# machine: {machine(device)}; engine: {kind}")
    print(f"# greedy, {args.max_new_tokens} new tokens per sequence, best of {args.repeats}; tok/fwd: tokens per "
          "trunk forward; same: tokens identical to plain decoding")
    header = (f"{'batch':>5} {'mode':>6} {'tokens/s':>10} {'speedup':>8} {'tok/fwd':>8} {'same':>5}  "
              "acceptance per draft position")
    print(header + "\n" + "-" * len(header))

    longest = max(map(len, prompts)) + args.max_new_tokens
    engines = {k: make_engine(model, k, kind, max_batch=max(args.batch_sizes), max_length=longest) for k in ks}
    rows = []
    for batch_size in args.batch_sizes:
        requests = [Request(prompts[i % len(prompts)], args.max_new_tokens) for i in range(batch_size)]
        for e in engines.values():
            e.generate(requests)  # warm-up (and, for the static engine, graph capture)
        rates, stats, tokens = best_rates(engines, requests, args.repeats, device)
        for k in ks:
            row = dict(label=args.label, model=described, machine=machine(device), engine=kind,
                       compile=args.compile,
                       batch=batch_size, k=k, tokens_per_s=rates[k], speedup=rates[k] / rates[0],
                       tokens_per_forward=stats[k].tokens_per_forward, same=tokens[k] == tokens[0],
                       acceptance=stats[k].acceptance, new_tokens=args.max_new_tokens)
            rows.append(row)
            acceptance = " ".join(f"{a:.3f}" for a in row["acceptance"])
            print(f"{batch_size:>5} {f'K={k}' if k else 'plain':>6} {rates[k]:>10.1f} {row['speedup']:>7.2f}x "
                  f"{row['tokens_per_forward']:>8.3f} {'yes' if row['same'] else 'NO':>5}  {acceptance}", flush=True)
    if args.hf:
        for batch_size, rate in hf_rates(args.hf, prompts, args.batch_sizes, args.max_new_tokens, args.repeats,
                                         device).items():
            rows.append(dict(label=args.label, model=described, machine=machine(device), engine="hf-transformers",
                             batch=batch_size, k=0, tokens_per_s=rate, new_tokens=args.max_new_tokens))
            print(f"{batch_size:>5} {'HF':>6} {rate:>10.1f}   (transformers generate, bf16)", flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
