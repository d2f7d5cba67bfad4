"""`dsmtp study`: train and measure a grid of arms that differ only in the MTP objective, then report.

    dsmtp study --config configs/study/h200.yaml [--arms ntp,seq1] [--seeds 0] [--set base.data.source_dir=DIR]
                [--train-until SECONDS] [--plan]
    dsmtp study --report RESULTS_DIR [...] [--doc docs/mtp-study.md] [--plots DIR]

Each arm and seed trains in <out_dir>/<arm>-s<seed> with `dsmtp train`'s Trainer (so it resumes from its last
checkpoint), is measured there (dsmtp.study.evaluate) and writes results.json; an arm and seed whose
results.json exists is skipped. What the arms share, and how that is checked:
  - data: one prepared corpus; every arm draws samples of seq_len + 1 + (the deepest arm's D) tokens, so the
    sample count and the shuffle are the same, and the seed orders them. Every batch an arm trains on goes
    into a chained sha256 (`checks.data_order_sha256`), equal across arms of one seed;
  - initialisation: the model is built under the seed with the trunk (embedding, layers, final norm, output
    head) before the MTP depths, so every shared parameter starts the same. Its hash before the first step is
    `checks.shared_init_sha256`;
  - the token budget (train.steps x tokens per step), the schedules, and lambda over the same fractions of it.
`--train-until SECONDS` stops training at a checkpoint once the next `train.save_interval` steps would end past
that many seconds after the start (exit status 3: run the same command again to continue); evaluation runs
once an arm's training is complete. `--plan` prints what would run, and each run's state, without doing it;
`--prepare` only builds the corpus and checks the token budget against it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from dsmtp import checkpoint
from dsmtp.machine import describe as describe_machine
from dsmtp.config import (Config, ConfigError, StudyArm, StudyConfig, arm_config, config_to_dict, load_study_config,
                          tokens_per_run)
from dsmtp.data.errors import DataError
from dsmtp.data.shards import TokenSplit, load_manifest
from dsmtp.data.tokenizer import Tokenizer
from dsmtp.model import DeepSeekV3
from dsmtp.model.params import count_parameters
from dsmtp.study import evaluate, humaneval, report
from dsmtp.train.trainer import BatchStream, Trainer, TrainingStopped, open_data

RESULTS_FILE = "results.json"
INIT_FILE = "init.json"
WALL_FILE = "train_wall.json"  # training seconds (compilation included) summed over the processes that trained the arm
SCHEMA_VERSION = 1
RESUME_EXIT = 3


class OrderHashing:
    """A training batch stream that chains the sha256 of every batch it serves; the chain is part of the
    loader state, so a resumed run continues it."""

    def __init__(self, inner: BatchStream):
        self.inner = inner
        self.digest = hashlib.sha256(b"dsmtp data order").hexdigest()
        self.batches = 0

    def __next__(self) -> torch.Tensor:
        batch = next(self.inner)
        self.digest = hashlib.sha256(bytes.fromhex(self.digest) + batch.numpy().tobytes()).hexdigest()
        self.batches += 1
        return batch

    def source_tokens(self) -> dict[str, int]:
        return self.inner.source_tokens()

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "order_sha256": self.digest, "order_batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.digest, self.batches = state.pop("order_sha256"), state.pop("order_batches")
        self.inner.load_state_dict(state)


def parameter_digests(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of the shared parameters and buffers (everything but mtp.*) and of the MTP depths' own."""
    digests = {"shared": hashlib.sha256(), "mtp": hashlib.sha256()}
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue  # megatron's empty _extra_state entries
        part = digests["mtp" if name.startswith("mtp.") else "shared"]
        part.update(name.encode())
        part.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {key: d.hexdigest() for key, d in digests.items()}


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def selected_runs(study: StudyConfig, arms: Optional[str], seeds: Optional[str]) -> list[tuple[StudyArm, int]]:
    """(arm, seed) pairs picked by --arms and --seeds (default: all), in the config's order."""
    names = [a.name for a in study.arms]
    wanted = names if arms is None else [a.strip() for a in arms.split(",") if a.strip()]
    for name in wanted:
        if name not in names:
            raise ConfigError(f"--arms {name}: the study has arms {', '.join(names)}")
    try:
        wanted_seeds = None if seeds is None else [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: expected seeds separated by commas, e.g. 0,1") from None
    runs = [(study.arm(name), seed) for name in wanted for seed in study.arm_seeds(study.arm(name))
            if wanted_seeds is None or seed in wanted_seeds]
    if not runs:
        raise ConfigError(f"--arms {arms} --seeds {seeds} selects no run: the arms' seeds are "
                          + "; ".join(f"{a.name} {study.arm_seeds(a)}" for a in study.arms))
    return runs


def run_state(cfg: Config) -> str:
    out = Path(cfg.train.out_dir)
    if (out / RESULTS_FILE).is_file():
        return "done"
    ckpt = checkpoint.latest_checkpoint(out) if out.is_dir() else None
    return f"resumes from {ckpt.name}" if ckpt else "new"


def prepare_corpus(study: StudyConfig) -> dict:
    """Build (or check) the study's corpus and refuse a token budget that would repeat training tokens."""
    from dsmtp.data.prepare import prepare

    base = study.base
    data_dir = prepare(base.data, base.model.vocab_size)
    manifest = load_manifest(data_dir)
    t = base.train
    extra = max(a.mtp_depth for a in study.arms)
    available = (TokenSplit(data_dir, "train").num_tokens - (t.seq_len + extra + 1)) // t.seq_len + 1
    samples = t.steps * t.micro_batch_size * t.grad_accum
    if samples > available and not study.allow_repeated_tokens:
        raise ConfigError(
            f"the token budget ({tokens_per_run(t):,} tokens: base.train.steps={t.steps} of "
            f"{t.micro_batch_size * t.grad_accum} samples of {t.seq_len}) exceeds the train split of {data_dir} "
            f"({available} samples, {available * t.seq_len:,} tokens), so tokens would repeat: lower base.train.steps "
            f"to {available // (t.micro_batch_size * t.grad_accum)}, point base.data.source_dir at a larger corpus, "
            "or set allow_repeated_tokens: true")
    splits = manifest["splits"]
    # What the arms read, by content (the fingerprint also holds file times and paths): the tokenizer and
    # every block checksum of every shard.
    content = hashlib.sha256(manifest["tokenizer"]["sha256"].encode())
    for split in ("train", "val"):
        for shard in splits[split]["shards"]:
            content.update(json.dumps([shard["num_tokens"], shard.get("checksums")]).encode())
    return {"data_dir": str(data_dir), "source": manifest.get("source") or ", ".join(s["path"] for s in manifest["sources"]), "content_sha256": content.hexdigest(),
            "fingerprint": manifest["fingerprint"],
            "tokenizer_sha256": manifest["tokenizer"]["sha256"], "vocab_size": manifest["tokenizer"]["vocab_size"],
            "train_files": splits["train"]["documents"], "val_files": splits["val"]["documents"],
            "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
            "files_skipped": manifest.get("files", {}).get("skipped", {}), "dedup": manifest["config"].get("dedup", False)}


def train_arm(cfg: Config, deadline: Optional[float]) -> Optional[Trainer]:
    """Train (or resume) one arm to train.steps; None when the deadline stopped it at a checkpoint first."""
    data = open_data(cfg)
    data.train = OrderHashing(data.train)
    trainer = Trainer(cfg, data=data)
    out = trainer.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if trainer.step == 0:
        digests = parameter_digests(trainer.model)
        write_json_atomic(out / INIT_FILE, {"shared_init_sha256": digests["shared"], "mtp_init_sha256": digests["mtp"]})
    elif trainer.resumed_from is not None:
        print(f"resuming {out} from {trainer.resumed_from} (step {trainer.step})")
    t = cfg.train
    seconds_per_step = None
    wall = json.loads((out / WALL_FILE).read_text()) if (out / WALL_FILE).is_file() else {"seconds": 0.0, "starts": 0}
    wall["starts"] += 1
    try:
        while trainer.step < t.steps:
            if deadline is not None and seconds_per_step is not None \
                    and time.monotonic() + seconds_per_step * t.save_interval > deadline:
                return None
            first, started = trainer.step, time.monotonic()
            trainer.run(stop_after=min(trainer.step + t.save_interval, t.steps))
            seconds_per_step = (time.monotonic() - started) / max(trainer.step - first, 1)
            wall["seconds"] += time.monotonic() - started
    finally:
        write_json_atomic(out / WALL_FILE, wall)
    print(trainer.finish())
    return trainer


def evaluation_model(trainer: Trainer) -> DeepSeekV3:
    """An uncompiled copy of the trained model in eval mode (the trainer's layers may be compiled for
    training shapes)."""
    model = DeepSeekV3(trainer.cfg.model)
    state = {k: v for k, v in trainer.model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"the evaluation copy lacks {missing[:5]}")
    return model.to(trainer.device).eval()


def measure(study: StudyConfig, arm: StudyArm, seed: int, cfg: Config, trainer: Trainer, corpus: dict) -> dict:
    """Every metric of one trained arm, as results.json holds them."""
    started = time.perf_counter()
    e, t, m = study.eval, cfg.train, cfg.model
    model = evaluation_model(trainer)
    tokenizer = Tokenizer.load(corpus["data_dir"], expected_vocab_size=m.vocab_size)
    byte_lengths = evaluate.token_byte_lengths(tokenizer)
    problems = humaneval.load_problems(e.humaneval_problems)
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args):
        print(f"measuring {t.out_dir}: {name}", flush=True)
        clock = time.perf_counter()
        value = fn(*args)
        seconds[name] = round(time.perf_counter() - clock, 2)
        return value

    val = timed("validation", evaluate.validation, model, corpus["data_dir"], t.seq_len, t.sample_extra_tokens, e,
                trainer.autocast, byte_lengths)
    he_loss = timed("humaneval_loss", evaluate.humaneval_loss, model, tokenizer, problems, t.seq_len, trainer.autocast,
                    byte_lengths)
    # Decoding in bf16 on CUDA: the static engine's fast expert path (fp32 takes the reference path).
    decoder = model.to(torch.bfloat16) if trainer.device.type == "cuda" else model
    he_pass = timed("humaneval_pass", evaluate.humaneval_pass, decoder, tokenizer, problems, e, t.seq_len)
    prompts = [evaluate.prompt_tokens(tokenizer, p.prompt, t.seq_len - e.decode_new_tokens)[0]
               for p in problems[:e.decode_prompts]]
    decoding = timed("decoding", evaluate.decoding, decoder, prompts, e)
    records = trainer.log.records()
    init = json.loads((trainer.out_dir / INIT_FILE).read_text())
    counts = count_parameters(m)
    return {
        "schema": SCHEMA_VERSION, "study": study.name, "arm": arm.name, "seed": seed,
        "objective": {"mtp_kind": m.mtp_kind if m.mtp_depth else "none", "mtp_depth": m.mtp_depth,
                      "mtp_weight_schedule": t.mtp_weight_schedule, "mtp_depth_weights": t.mtp_depth_weights,
                      "mtp_heads_one_at_a_time": t.mtp_heads_one_at_a_time},
        "parameters": {"total": counts.total, "activated": counts.activated, "trunk_total": counts.trunk_total,
                       "trunk_activated": counts.trunk_activated},
        "machine": describe_machine(trainer.device), "device": trainer.device.type,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "corpus": corpus,
        "checks": {**init, "data_order_sha256": trainer.data.train.digest,
                   "data_order_batches": trainer.data.train.batches,
                   "step0_val_loss": next((r["loss"] for r in records if r["kind"] == "eval" and r["step"] == 0),
                                          None)},
        "training": {"steps": trainer.step, "tokens": trainer.tokens,
                     "tokens_per_step": trainer.tokens_per_step,
                     **{f"wall_{k}": v for k, v in json.loads((trainer.out_dir / WALL_FILE).read_text()).items()},
                     **evaluate.training_costs(records, trainer.tokens_per_step)},
        "val": val,
        "humaneval": {"loss": he_loss, "pass": he_pass},
        "decoding": decoding,
        "evaluation_seconds": {**seconds, "total": round(time.perf_counter() - started, 2)},
        "config": config_to_dict(cfg),
    }


def run(study: StudyConfig, runs: list[tuple[StudyArm, int]], deadline: Optional[float]) -> int:
    todo = [(arm, seed) for arm, seed in runs if run_state(arm_config(study, arm, seed)) != "done"]
    for arm, seed in runs:
        if (arm, seed) not in todo:
            print(f"{arm.name} seed {seed}: done ({arm_config(study, arm, seed).train.out_dir}/{RESULTS_FILE})")
    if todo:
        humaneval.data_file()  # before any training: the package must be there
        corpus = prepare_corpus(study)
    for arm, seed in todo:
        cfg = arm_config(study, arm, seed)
        print(f"=== {study.name}: arm {arm.name}, seed {seed} -> {cfg.train.out_dir}", flush=True)
        trainer = train_arm(cfg, deadline)
        if trainer is None:
            print(f"stopped at a checkpoint before the --train-until limit: run the same command again to continue "
                  f"{cfg.train.out_dir}", file=sys.stderr)
            return RESUME_EXIT
        results = measure(study, arm, seed, cfg, trainer, corpus)
        write_json_atomic(Path(cfg.train.out_dir) / RESULTS_FILE, results)
        print(f"wrote {cfg.train.out_dir}/{RESULTS_FILE}")
    print(closing_summary(Path(study.out_dir)))
    return 0


def closing_summary(out_dir: Path) -> str:
    """The study's tables so far; arms run before the next-token baseline have nothing to be compared with yet
    (a finished run is not an error)."""
    results = report.load_results([out_dir])
    if not report.next_token_arms(report.arms_of(results)):
        return (f"{len(results)} results in {out_dir}, none of them the next-token baseline (mtp_depth 0): "
                "the tables compare against it once it has run")
    return report.text_summary(results)


def plan(study: StudyConfig, runs: list[tuple[StudyArm, int]]) -> None:
    t = study.base.train
    print(f"study {study.name}: {len(runs)} runs of {tokens_per_run(t):,} tokens ({t.steps} steps of "
          f"{t.micro_batch_size * t.seq_len * t.grad_accum:,}), samples of {t.seq_len} + 1 + "
          f"{max(a.mtp_depth for a in study.arms)} tokens; corpus {study.base.data.source_dir or 'stdlib'} -> "
          f"{study.base.data.data_dir}")
    for arm, seed in runs:
        cfg = arm_config(study, arm, seed)
        m = cfg.model
        objective = "next-token only" if not m.mtp_depth else \
            f"{m.mtp_kind} D={m.mtp_depth}, lambda {cfg.train.mtp_weight_schedule}, weights {cfg.train.mtp_depth_weights}"
        print(f"  {arm.name:<10} seed {seed:<3} {run_state(cfg):<24} {cfg.train.out_dir}  ({objective})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsmtp study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a study config, e.g. configs/study/h200.yaml")
    source.add_argument("--report", nargs="+", metavar="DIR", help="tables (and --doc, --plots) from the "
                                                                   "results.json files under these dirs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study config field, e.g. base.data.source_dir=/path (repeatable)")
    parser.add_argument("--arms", help="run only these arms (comma-separated names)")
    parser.add_argument("--seeds", help="run only these seeds (comma-separated)")
    parser.add_argument("--train-until", type=float, metavar="SECONDS",
                        help="stop training at a checkpoint before this many seconds have passed (exit status 3)")
    parser.add_argument("--plan", action="store_true", help="print the runs and their state; run nothing")
    parser.add_argument("--prepare", action="store_true",
                        help="only build (or check) the corpus and the token budget against it, and print them")
    parser.add_argument("--doc", help="with --report: rewrite the generated part of this markdown file")
    parser.add_argument("--plots", help="with --report: write the plots (PNG) into this dir")
    args = parser.parse_args(argv)
    if args.report:
        return report.main(args.report, args.doc, args.plots)
    started = time.monotonic()
    study = load_study_config(args.config, args.set)
    runs = selected_runs(study, args.arms, args.seeds)
    if args.plan:
        plan(study, runs)
        return 0
    deadline = None if args.train_until is None else started + args.train_until
    if args.prepare:
        print(json.dumps(prepare_corpus(study), indent=1))
        return 0
    try:
        return run(study, runs, deadline)
    except (DataError, checkpoint.CheckpointError, TrainingStopped, humaneval.HumanEvalMissing) as e:
        print(f"dsmtp study: error: {e}", file=sys.stderr)
        return 1
