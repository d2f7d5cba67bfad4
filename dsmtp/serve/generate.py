"""`dsmtp generate`: complete prompts with a trained model, optionally with MTP speculative decoding.

    dsmtp generate --ckpt runs/tiny --prompt "def main(" --speculative 2 --max-new-tokens 128

Prints each completion, then tokens/s, the acceptance rate per draft position and the mean number of
tokens each trunk forward produced. On CUDA each decoding step replays a CUDA graph over a preallocated
cache (dsmtp.serve.static); `--engine dynamic` decodes kernel by kernel instead.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dsmtp.serve.engine import DecodeStats, Request
from dsmtp.serve.loading import completion_text, encode_prompt, load, utf8_text
from dsmtp.serve.sampling import SamplingParams
from dsmtp.serve.static import add_engine_arguments, compile_for_decoding, make_engine


def describe(stats: DecodeStats, new_tokens: int, seconds: float) -> str:
    lines = [f"{new_tokens} tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s"]
    if stats.draft_tokens:
        rates = "  ".join(f"{i + 1}: {r:.3f}" for i, r in enumerate(stats.acceptance))
        lines.append(f"acceptance per draft position  {rates}")
    lines.append(f"mean tokens per trunk forward: {stats.tokens_per_forward:.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsmtp generate", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint step dir, run out_dir, or HF export dir")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    parser.add_argument("--speculative", type=int, default=0, metavar="K", help="draft K tokens with the MTP modules")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: as stored")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)

    try:  # bad arguments or checkpoint: one clear message before any work
        for prompt in args.prompt:
            utf8_text(prompt, "--prompt")
        # One random stream per prompt, so a batch of prompts does not share its draws.
        sampling = [SamplingParams(args.temperature, args.top_k, args.top_p, args.seed + i)
                    for i in range(len(args.prompt))]
        model, _, tokenizer = load(args.ckpt, args.device, getattr(torch, args.dtype) if args.dtype else None, args.set)
        requests = [Request(encode_prompt(tokenizer, p), args.max_new_tokens, s, (tokenizer.eos_id,))
                    for p, s in zip(args.prompt, sampling)]
        if args.compile:
            compile_for_decoding(model)
        longest = max(len(r.prompt) for r in requests) + args.max_new_tokens
        engine = make_engine(model, args.speculative, args.engine, max_batch=len(requests),
                             max_length=min(longest, model.cfg.max_position_embeddings))
        for r in requests:
            engine.check(r)
    except (ValueError, OSError) as e:
        print(f"dsmtp generate: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results, stats = engine.generate(requests)
    seconds = time.perf_counter() - start
    for prompt, request, result in zip(args.prompt, requests, results):
        text = completion_text(tokenizer, request.prompt, result.tokens)
        print(f"--- {prompt!r} ({result.finish_reason})\n{prompt}{text}")
    print("---\n" + describe(stats, sum(len(r.tokens) for r in results), seconds))
    return 0
