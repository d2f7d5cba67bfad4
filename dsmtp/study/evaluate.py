"""What a study measures on each trained arm (the results.json sections; dsmtp.study.runner calls these).

- `validation`: over the whole validation split (held-out files), in windows of seq_len: the main head's
  loss, accuracy and bits per byte, its loss by context position, and every MTP depth's loss and accuracy.
- `humaneval_loss`: the loss of each canonical solution given its prompt.
- `humaneval_pass`: greedy completions of the prompts, run in the sandbox (dsmtp.study.humaneval).
- `decoding`: plain and MTP self-speculative decoding of HumanEval prompts at batch 1.
- `training_costs`: tokens/s, step time and peak memory from the run's own metrics.jsonl.

Which tokens feed and train each MTP depth is dsmtp.model.mtp's business: these functions ask it.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dsmtp.config import StudyEval
from dsmtp.data.shards import TokenSplit
from dsmtp.data.tokenizer import Tokenizer
from dsmtp.model import DeepSeekV3
from dsmtp.model.mtp import IGNORE_INDEX, split_sample
from dsmtp.serve.engine import DecodeStats, Request
from dsmtp.serve.loading import completion_text
from dsmtp.serve.static import make_engine
from dsmtp.study import humaneval

Autocast = Callable[[], object]  # a context manager factory (dsmtp.train.trainer.autocast_for)


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token stands for in decoded text (0 for <eos> and the other control tokens)."""
    return torch.tensor([len(b) for b in tokenizer.token_bytes()], dtype=torch.float64)


def _losses(model: DeepSeekV3, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy (nats) and whether the arg-max is right, [B, S] each (0 where no target)."""
    logits = model.logits(h).float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none").view_as(targets)
    valid = targets != IGNORE_INDEX
    return loss * valid, (logits.argmax(-1) == targets) & valid


@torch.no_grad()
def validation(model: DeepSeekV3, data_dir, seq_len: int, extra_tokens: int, cfg: StudyEval, autocast: Autocast,
               byte_lengths: torch.Tensor) -> dict:
    """Every window of the validation split: window k holds tokens [k S, (k + 1) S + extra + 1), so every
    token after the first is a main-head target exactly once; depth d's targets are the tokens d further on."""
    split = TokenSplit(data_dir, "val")
    device = next(model.parameters()).device
    sample_len = seq_len + extra_tokens + 1
    windows = (split.num_tokens - sample_len) // seq_len + 1
    if cfg.val_max_tokens is not None:
        windows = min(windows, cfg.val_max_tokens // seq_len)
    depth = model.mtp.depth
    by_position = torch.zeros(3, seq_len, dtype=torch.float64)  # loss sum, correct, count
    by_depth = torch.zeros(depth, 3, dtype=torch.float64)
    target_bytes = 0.0
    for start in range(0, windows, cfg.micro_batch_size):
        rows = [split.read(k * seq_len, sample_len) for k in range(start, min(start + cfg.micro_batch_size, windows))]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        tokens, labels = model.mtp.inputs(*split_sample(batch, seq_len))
        with autocast():
            hidden, _ = model.hidden_states(tokens.clamp(min=0), seq_len)
            for k, h in enumerate(hidden):
                targets = labels[:, :seq_len] if k == 0 else model.mtp.targets(k, labels, tokens, seq_len)
                loss, correct = _losses(model, h, targets)
                counts = (targets != IGNORE_INDEX).double()
                if k == 0:
                    by_position += torch.stack([loss.double().sum(0), correct.double().sum(0), counts.sum(0)]).cpu()
                    target_bytes += float(byte_lengths[targets.clamp(min=0).cpu()].sum())
                else:
                    by_depth[k - 1] += torch.stack([loss.double().sum(), correct.double().sum(), counts.sum()]).cpu()
    total_loss, total_correct, total = by_position.sum(1).tolist()
    bounds = list(cfg.position_buckets) + [seq_len]
    buckets = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        loss_sum, correct, count = by_position[:, lo:hi].sum(1).tolist()
        buckets.append({"from": lo, "to": hi, "loss": loss_sum / count, "accuracy": correct / count,
                        "tokens": int(count)})
    return {"windows": windows, "tokens": int(total), "bytes": int(target_bytes),
            "loss": total_loss / total, "accuracy": total_correct / total,
            "bits_per_byte": total_loss / math.log(2) / target_bytes,
            "by_position": buckets,
            "depths": [{"depth": k + 1, "loss": s / n, "accuracy": c / n, "tokens": int(n)}
                       for k, (s, c, n) in enumerate(by_depth.tolist())]}


def prompt_tokens(tokenizer: Tokenizer, text: str, room: int) -> tuple[list[int], bool]:
    """A document start (<eos>) and the text's tokens, the last `room` of them if longer; (ids, cut)."""
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    return ids[-room:], len(ids) > room


@torch.no_grad()
def humaneval_loss(model: DeepSeekV3, tokenizer: Tokenizer, problems: list[humaneval.Problem], context: int,
                   autocast: Autocast, byte_lengths: torch.Tensor) -> dict:
    """Loss of each canonical solution's tokens given the prompt: the text prompt + solution is tokenized as
    one, and the solution's tokens are those past the longest prefix it shares with the prompt's tokens
    (a token spanning the boundary counts as the solution's)."""
    device = next(model.parameters()).device
    loss_sum = tokens = solution_bytes = 0.0
    cut = 0
    for p in problems:
        prompt = [tokenizer.eos_id] + tokenizer.encode(p.prompt)
        full = [tokenizer.eos_id] + tokenizer.encode(p.prompt + p.canonical_solution)
        shared = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
        drop = max(0, len(full) - context)  # keep the last `context` tokens (the solution first)
        cut += drop > 0
        ids = torch.tensor(full[drop:], device=device)
        first = max(shared - drop, 1)  # index in ids of the first solution token
        with autocast():
            logits = model(ids[None, :-1]).float()[0]
        ce = F.cross_entropy(logits[first - 1:], ids[first:], reduction="sum")
        loss_sum += float(ce)
        tokens += len(ids) - first
        solution_bytes += float(byte_lengths[ids[first:].cpu()].sum())
    return {"problems": len(problems), "tokens": int(tokens), "loss": loss_sum / tokens,
            "bits_per_byte": loss_sum / math.log(2) / solution_bytes, "truncated": cut}


@torch.no_grad()
def humaneval_completions(model: DeepSeekV3, tokenizer: Tokenizer, problems: list[humaneval.Problem],
                          cfg: StudyEval, context: int) -> tuple[list[str], int]:
    """Greedy completions, each ended at <eos>, a stop sequence or eval.humaneval_max_new_tokens;
    (completions cut at the first stop sequence, prompts that had to be shortened to fit)."""
    new = cfg.humaneval_max_new_tokens
    prompts = [prompt_tokens(tokenizer, p.prompt, context - new) for p in problems]
    engine = make_engine(model, 0, max_batch=cfg.humaneval_batch_size, max_length=context)
    generated: list[list[int]] = [[] for _ in problems]

    def watcher(i: int):
        def on_tokens(tokens: list[int], _logprobs) -> bool:
            generated[i].extend(tokens)
            text = completion_text(tokenizer, prompts[i][0], generated[i])
            return not any(stop in text for stop in humaneval.STOP_SEQUENCES)
        return on_tokens

    requests = [Request(ids, new, stop_ids=(tokenizer.eos_id,), on_tokens=watcher(i))
                for i, (ids, _) in enumerate(prompts)]
    engine.generate(requests)
    completions = [humaneval.truncate_at_stop(completion_text(tokenizer, ids, tokens))
                   for (ids, _), tokens in zip(prompts, generated)]
    return completions, sum(cut for _, cut in prompts)


def humaneval_pass(model: DeepSeekV3, tokenizer: Tokenizer, problems: list[humaneval.Problem], cfg: StudyEval,
                   context: int) -> dict:
    """pass@1 of greedy completions (one sample, so pass@1 is the fraction passed). The canonical solutions run
    through the same sandbox as a check of the sandbox itself: all of them pass where it works."""
    completions, cut = humaneval_completions(model, tokenizer, problems, cfg, context)
    programs = [p.program(c) for p, c in zip(problems, completions)]
    programs += [p.program(p.canonical_solution) for p in problems]
    outcomes = humaneval.run_programs(programs, cfg.humaneval_timeout_s, cfg.exec_workers)
    ours, canonical = outcomes[:len(problems)], outcomes[len(problems):]
    results: dict[str, int] = {}
    for o in ours:
        kind = o.result.split(":")[0]
        results[kind] = results.get(kind, 0) + 1
    return {"problems": len(problems), "passed": sum(o.passed for o in ours),
            "pass_at_1": sum(o.passed for o in ours) / len(problems),
            "passed_tasks": [p.task_id for p, o in zip(problems, ours) if o.passed],
            "outcomes": results, "canonical_passed": sum(o.passed for o in canonical),
            "max_new_tokens": cfg.humaneval_max_new_tokens, "truncated_prompts": cut,
            "stop_sequences": list(humaneval.STOP_SEQUENCES), "sandbox": humaneval.network_isolation(),
            "timeout_s": cfg.humaneval_timeout_s,
            "examples": [{"task_id": p.task_id, "completion": c} for p, c in zip(problems[:3], completions)]}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decoding(model: DeepSeekV3, prompts: list[list[int]], cfg: StudyEval) -> dict:
    """Plain decoding and self-speculative decoding with K = 1 .. D drafts (the depths trained), greedy, at
    batch 1: each prompt decoded alone for exactly eval.decode_new_tokens tokens, after a warm-up; tokens/s is
    the best of eval.decode_repeats passes over all prompts, the draft counts taking turns."""
    device = model.embed.weight.device
    new = cfg.decode_new_tokens
    ks = [0] + list(range(1, min(model.mtp.depth, model.mtp.max_drafts or model.mtp.depth) + 1))
    length = max(map(len, prompts)) + new
    engines = {k: make_engine(model, k, max_batch=1, max_length=length) for k in ks}
    for engine in engines.values():
        engine.generate([Request(prompts[0], new)])  # warm-up (and, on CUDA, graph capture)
    best = {k: 0.0 for k in ks}
    stats: dict[int, DecodeStats] = {}
    outputs: dict[int, list[list[int]]] = {}
    for _ in range(cfg.decode_repeats):
        for k, engine in engines.items():
            stats[k], outputs[k] = DecodeStats(k), []
            _synchronize(device)
            started = time.perf_counter()
            for prompt in prompts:
                [result], one = engine.generate([Request(prompt, new)])
                outputs[k].append(result.tokens)
                stats[k].steps += one.steps
                stats[k].step_tokens += one.step_tokens
                stats[k].drafted = [a + b for a, b in zip(stats[k].drafted, one.drafted)]
                stats[k].accepted = [a + b for a, b in zip(stats[k].accepted, one.accepted)]
            _synchronize(device)
            best[k] = max(best[k], len(prompts) * new / (time.perf_counter() - started))
    return {"engine": type(engines[0]).__name__, "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
            "device": device.type, "prompts": len(prompts), "new_tokens": new, "repeats": cfg.decode_repeats,
            "plain_tokens_per_second": best[0],
            "speculative": [{"k": k, "acceptance": stats[k].acceptance, "tokens_per_forward": stats[k].tokens_per_forward,
                             "tokens_per_second": best[k], "speedup": best[k] / best[0],
                             "same_as_plain": outputs[k] == outputs[0]} for k in ks[1:]]}


def training_costs(records: list[dict], tokens_per_step: int) -> dict:
    """From a run's metrics.jsonl records: median tokens/s of its train records (the first left out when there
    are others: it holds the compilation), the step time that gives, peak memory, and the eval curve."""
    train = [r for r in records if r.get("kind") == "train" and r.get("tokens_per_second")]
    rates = [r["tokens_per_second"] for r in (train[1:] if len(train) > 1 else train)]
    tokens_per_second = statistics.median(rates) if rates else None
    memory = [r["peak_memory_gib"] for r in train if r.get("peak_memory_gib") is not None]
    curve = [{"step": r["step"], "tokens": r["tokens"], "loss": r["loss"], "accuracy": r["accuracy"],
              "mtp_loss": r.get("mtp_loss", [])} for r in records if r.get("kind") == "eval"]
    return {"tokens_per_second": tokens_per_second,
            "step_seconds": tokens_per_step / tokens_per_second if tokens_per_second else None,
            "peak_memory_gib": max(memory) if memory else None, "curve": curve}
