"""Train the same model from the same initialisation on the same batches in bf16 and in FP8, and
compare the training-loss curves (one JSON of both curves, one plot).

    python tools/fp8_vs_bf16.py --config configs/small.yaml --text-dir /usr/lib/python3.12 \
        --steps 500 --out runs/fp8_vs_bf16 [--set train.seq_len=1024 ...]

Text is read as bytes (token id = byte value): a real corpus that needs no tokenizer, so the run
fits a bare GPU machine. The step is bench_train's (bf16 autocast over fp32 params, fused AdamW,
clipping, router-bias update), with linear warm-up to train.lr over train.warmup_steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from dsmtp.config import load_config  # noqa: E402
from dsmtp.model import DeepSeekV3, fp8, update_expert_bias  # noqa: E402
from dsmtp.parallel.topology import ensure_initialized  # noqa: E402


def byte_corpus(text_dir: str, max_bytes: int) -> torch.Tensor:
    chunks, total = [], 0
    for path in sorted(Path(text_dir).rglob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total == 0:
        raise SystemExit(f"--text-dir {text_dir}: no .py files found; name a directory of Python sources")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def train(cfg, precision: str, init_state: dict, batches: torch.Tensor, steps: int) -> list[float]:
    model = DeepSeekV3(cfg.model).cuda()
    model.load_state_dict(init_state, strict=False)
    if precision == "fp8":
        fp8.enable(model)
    model.train()
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, t.warmup_steps)))
    s, losses = t.seq_len, []
    for i in range(steps):
        sample = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16), fp8.autocast(precision == "fp8"):
            out = model(sample[:, :s], sample[:, 1:], mtp_weight=0.3)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model, 1e-3)
        losses.append(out.main_loss)
        if (i + 1) % 100 == 0:
            print(f"  {precision} step {i + 1}: main loss {out.main_loss.item():.4f}", flush=True)
    return [x.item() for x in losses]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--text-dir", required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    ensure_initialized()
    b, s, d = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.mtp_depth
    corpus = byte_corpus(args.text_dir, args.steps * b * (s + d + 1))
    n = corpus.numel() // (s + d + 1)
    batches = corpus[: n * (s + d + 1)].view(n, s + d + 1)
    batches = batches[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    batches = batches[: (n // b) * b].view(-1, b, s + d + 1).cuda()
    torch.manual_seed(cfg.train.seed)
    init_state = DeepSeekV3(cfg.model).state_dict()
    curves = {p: train(cfg, p, init_state, batches, args.steps) for p in ("bf16", "fp8")}
    window = min(50, args.steps)
    tail = {p: sum(c[-window:]) / window for p, c in curves.items()}
    rel = (tail["fp8"] - tail["bf16"]) / tail["bf16"]
    summary = dict(steps=args.steps, batches=len(batches), tokens_per_step=b * s, tail_window=window,
                   bf16_tail_loss=tail["bf16"], fp8_tail_loss=tail["fp8"], fp8_relative_difference=rel,
                   device=torch.cuda.get_device_name(), overrides=args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "curves.json.tmp"
    tmp.write_text(json.dumps(dict(summary=summary, curves=curves)))
    os.replace(tmp, out / "curves.json")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, label=p, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("main training loss (bytes)")
    ax.set_title(f"bf16 vs FP8, {torch.cuda.get_device_name()}: last-{window} mean differs {rel * 100:+.2f}%")
    ax.legend()
    fig.savefig(out / "fp8_vs_bf16.png", dpi=120, bbox_inches="tight")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
