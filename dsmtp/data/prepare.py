"""`dsmtp prepare --config CONFIG [--set k=v ...]`: source files -> tokenizer -> token shards.

Steps: scan the source dir (include/exclude globs), check every file in worker processes (binary,
non-UTF-8, unreadable and empty files are skipped and counted; with data.dedup, so are later copies of
a content), split by a hash of each relative path, train the tokenizer on a sample of the train split, tokenize both splits in worker processes.
Everything is built in a temporary sibling dir and renamed into place once complete, so an
interrupted run leaves nothing that `load_manifest` accepts. A run whose inputs (file list, sizes,
mtimes, globs, vocab size, split and sample settings) match the manifest's fingerprint does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import sentencepiece
from tqdm import tqdm

from dsmtp.config import ConfigError, DataConfig, load_config
from dsmtp.data.corpus import (SKIP_REASONS, SourceFile, check_file, drop_duplicates, read_text, resolve_source_dir,
                               scan, split_files)
from dsmtp.data.errors import DataError
from dsmtp.data.shards import (MANIFEST_FILE, SCHEMA_VERSION, SPLITS, ShardWriter, load_manifest, token_dtype,
                               verify_split)
from dsmtp.data.tokenizer import MODEL_FILE, Tokenizer, train_tokenizer


def prepare(data: DataConfig, vocab_size: int) -> Path:
    """Build `data.data_dir` (tokenizer.model, manifest.json, train/, val/); a no-op if up to date."""
    started = time.perf_counter()
    if data.tokenizer_sample_bytes <= 0:
        raise DataError(f"data.tokenizer_sample_bytes={data.tokenizer_sample_bytes} must be positive, e.g. 20000000")
    data_dir = Path(data.data_dir)
    root = resolve_source_dir(data.source_dir)
    files = scan(root, data.include, data.exclude)
    fingerprint = input_fingerprint(root, files, data, vocab_size)
    if _is_up_to_date(data_dir, fingerprint):
        print(f"{data_dir} is up to date ({len(files)} files under {root}, vocab {vocab_size}): nothing to do")
        return data_dir
    _check_replaceable(data_dir)
    _remove_stale_builds(data_dir)
    build = _work_dir(data_dir, "tmp")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        manifest = _build(build, root, files, data, vocab_size, fingerprint, started)
        _publish(build, data_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    print(summary(data_dir, manifest))
    return data_dir


def input_fingerprint(root: Path, files: list[SourceFile], data: DataConfig, vocab_size: int) -> str:
    """Everything the output depends on; num_workers and data_dir are not among them."""
    inputs = {
        "schema_version": SCHEMA_VERSION,
        "sentencepiece": sentencepiece.__version__,
        "source": str(root),
        "files": [[f.rel, f.size, f.mtime_ns] for f in files],
        "include": data.include,
        "exclude": data.exclude,
        "val_fraction": data.val_fraction,
        "tokenizer_sample_bytes": data.tokenizer_sample_bytes,
        "vocab_size": vocab_size,
        **({"dedup": True} if data.dedup else {}),  # absent when off: data dirs built before it stay valid
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _is_up_to_date(data_dir: Path, fingerprint: str) -> bool:
    """The data dir was built from these inputs and is intact: every block of every shard matches its
    checksum (the one full check; loading samples)."""
    try:
        manifest = load_manifest(data_dir)
        tokenizer_sha = hashlib.sha256((data_dir / MODEL_FILE).read_bytes()).hexdigest()
    except (DataError, OSError):
        return False
    if manifest.get("fingerprint") != fingerprint or manifest["tokenizer"]["sha256"] != tokenizer_sha:
        return False
    try:
        for split in SPLITS:
            verify_split(data_dir, manifest, split, every_block=True)
    except DataError as e:
        print(f"{e}: rebuilding {data_dir}", flush=True)
        return False
    return True


def _check_replaceable(data_dir: Path) -> None:
    """Never move away a directory that is not ours (e.g. data.data_dir pointing at a source tree)."""
    ours = data_dir.is_dir() and (not any(data_dir.iterdir()) or (data_dir / MANIFEST_FILE).exists())
    if data_dir.exists() and not ours:
        raise DataError(
            f"data.data_dir={data_dir} exists and is not a dsmtp data dir (no {MANIFEST_FILE}): choose another "
            "data.data_dir, or remove it yourself"
        )


def _work_dir(data_dir: Path, kind: str) -> Path:
    """A sibling of data_dir owned by this process: `.NAME.tmp-PID@HOST` (host: data dirs may be shared)."""
    return data_dir.parent / f".{data_dir.name}.{kind}-{os.getpid()}@{socket.gethostname()}"


def _remove_stale_builds(data_dir: Path) -> None:
    """Delete work dirs left by prepare runs on this host that were killed (their process is gone)."""
    if not data_dir.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in data_dir.parent.glob(f".{data_dir.name}.{kind}-*@*"):
            pid, _, host = path.name.rpartition(f".{kind}-")[2].partition("@")
            if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(build: Path, data_dir: Path) -> None:
    """Swap the complete build into place. A crash between the two renames leaves no data dir at all
    (the next run rebuilds), never a mix of old and new files."""
    for path in build.rglob("*"):  # on disk before the rename makes them visible (power loss)
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    old = _work_dir(data_dir, "old")
    if data_dir.exists():
        os.replace(data_dir, old)
    os.replace(build, data_dir)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The build, inside the temporary dir


def _build(build: Path, root: Path, files: list[SourceFile], data: DataConfig, vocab_size: int,
           fingerprint: str, started: float) -> dict:
    seconds = {"scan": time.perf_counter() - started}
    with worker_pool(data.num_workers) as pmap:
        skipped = {reason: [] for reason in SKIP_REASONS}
        usable, digests = [], []
        checks = pmap(check_file, [f.path for f in files])
        for f, (reason, _, digest) in zip(files, tqdm(checks, total=len(files), desc="check files", unit="file")):
            (skipped[reason] if reason else usable).append(f)
            if not reason:
                digests.append(digest)
        if data.dedup:
            usable, skipped["duplicate"] = drop_duplicates(usable, digests)
        if len(usable) < 2:
            counts = {r: len(v) for r, v in skipped.items() if v}
            raise DataError(
                f"{len(usable)} of the {len(files)} files matched under {root} are usable text (skipped: {counts}): "
                "point data.source_dir/data.include at UTF-8 text files"
            )
        splits = split_files(usable, data.val_fraction)

        t = time.perf_counter()
        sample = _tokenizer_sample(splits["train"], data.tokenizer_sample_bytes)
        print(f"training a {vocab_size}-piece BPE tokenizer on {len(sample)} train files "
              f"({sum(f.size for f in sample) / 1e6:.1f} MB)", flush=True)
        tokenizer = train_tokenizer((text for text in map(_text_of, sample) if text is not None),
                                    vocab_size, build / MODEL_FILE)
        seconds["tokenizer"] = time.perf_counter() - t

        t = time.perf_counter()
        dtype = token_dtype(vocab_size)
        split_stats = {split: _write_split(build, splits[split], split, tokenizer, dtype, pmap, skipped)
                       for split in SPLITS}
        unigram = unigram_baseline(build, split_stats, dtype, vocab_size)
        seconds["tokenize"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(root),
        "config": {**dataclasses.asdict(data), "vocab_size": vocab_size},
        "files": {
            "matched": len(files),
            "used": sum(s["documents"] for s in split_stats.values()),  # one document per file
            "skipped": {reason: len(v) for reason, v in skipped.items()},
            "skipped_examples": {reason: [f.rel for f in v[:5]] for reason, v in skipped.items() if v},
        },
        "tokenizer": {"file": MODEL_FILE, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "sample_files": len(sample), "sentencepiece": sentencepiece.__version__},
        "dtype": dtype.name,
        "splits": split_stats,
        "unigram": unigram,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    write_json_atomic(build / MANIFEST_FILE, manifest)
    return manifest


def _write_split(build: Path, files: list[SourceFile], split: str, tokenizer: Tokenizer, dtype: np.dtype,
                 pmap: Callable, skipped: dict[str, list]) -> dict:
    writer = ShardWriter(build / split, dtype, tokenizer.eos_id)
    chars = docs = 0
    encoded = pmap(encode_file, [(f.path, tokenizer.model_path) for f in files])
    for f, (reason, n_chars, tokens) in tqdm(zip(files, encoded), total=len(files), desc=f"tokenize {split}",
                                             unit="file"):
        if reason:  # the file changed since it was checked
            skipped[reason].append(f)
            continue
        writer.add(tokens)
        chars, docs = chars + n_chars, docs + 1
    shards = writer.close()
    return {"documents": docs, "chars": chars,
            "tokens": sum(s["num_tokens"] for s in shards), "shards": shards}


def unigram_baseline(data_dir: Path, split_stats: dict, dtype: np.dtype, vocab_size: int) -> dict:
    """What a model that ignores context scores (nats/token): the entropy of the train split's token
    frequencies, and the val split's cross-entropy under them (add-one smoothed, so unseen tokens count).
    A trained model's val loss should end well below the latter."""
    counts = {split: np.zeros(vocab_size, dtype=np.int64) for split in split_stats}
    for split, stats in split_stats.items():
        for shard in stats["shards"]:
            tokens = np.memmap(data_dir / shard["tokens"], dtype=dtype, mode="r")
            for start in range(0, len(tokens), 1 << 24):  # bounded memory: bincount widens to int64
                counts[split] += np.bincount(tokens[start:start + (1 << 24)], minlength=vocab_size)
    train = counts["train"]
    freq = train[train > 0] / train.sum()
    smoothed = (train + 1) / (train.sum() + vocab_size)
    return {"train_entropy_nats": float(-(freq * np.log(freq)).sum()),
            "val_cross_entropy_nats": float(-(counts["val"] * np.log(smoothed)).sum() / counts["val"].sum())}


def _tokenizer_sample(train: list[SourceFile], sample_bytes: int) -> list[SourceFile]:
    """Train files in hash order (a fixed pseudo-random order) until `sample_bytes` are covered."""
    sample, total = [], 0
    for f in sorted(train, key=lambda f: f.split_key):
        if total >= sample_bytes:
            break
        sample.append(f)
        total += f.size
    return sample


def _text_of(f: SourceFile) -> Optional[str]:
    return read_text(f.path)[0]


_worker_tokenizers: dict[Path, Tokenizer] = {}  # per worker process: loaded once, used for every file


def encode_file(task: tuple[Path, Path]) -> tuple[Optional[str], int, Optional[np.ndarray]]:
    """Worker task: (skip reason, characters, token ids) of one file, given (file, tokenizer model)."""
    path, model_path = task
    if model_path not in _worker_tokenizers:
        _worker_tokenizers[model_path] = Tokenizer(model_path)
    tokenizer = _worker_tokenizers[model_path]
    text, reason = read_text(path)
    if text is None:
        return reason, 0, None
    return None, len(text), np.array(tokenizer.encode(text), dtype=token_dtype(tokenizer.vocab_size))


@contextmanager
def worker_pool(num_workers: int) -> Iterator[Callable]:
    """Yields an ordered, lazy map over `num_workers` processes (this process when 1)."""
    if num_workers == 1:
        yield map
        return
    # spawn: the caller may hold threads (torch) that fork would copy in a locked state
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield lambda fn, items: pool.imap(fn, items, chunksize=max(1, min(16, len(items) // (8 * num_workers))))


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def summary(data_dir: Path, manifest: dict) -> str:
    files, splits = manifest["files"], manifest["splits"]
    skipped = ", ".join(f"{n} {r}" for r, n in files["skipped"].items() if n) or "none"
    lines = [
        f"prepared {data_dir} from {manifest['source']} in {manifest['seconds']['total']:.1f} s "
        f"(tokenizer {manifest['seconds']['tokenizer']:.1f} s, tokenize {manifest['seconds']['tokenize']:.1f} s)",
        f"  files: {files['matched']} matched, {files['used']} used, skipped: {skipped}",
        f"  tokenizer: vocab {manifest['tokenizer']['vocab_size']}, sha256 {manifest['tokenizer']['sha256'][:16]}",
    ]
    for split, s in splits.items():
        lines.append(f"  {split}: {s['documents']} files, {s['tokens']:,} tokens ({manifest['dtype']}), "
                     f"{s['chars'] / max(s['tokens'] - s['documents'], 1):.2f} chars/token")
    lines.append(f"  unigram baseline: train entropy {manifest['unigram']['train_entropy_nats']:.3f} nats/token, "
                 f"val cross-entropy {manifest['unigram']['val_cross_entropy_nats']:.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsmtp prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (its data and model.vocab_size sections)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        prepare(cfg.data, cfg.model.vocab_size)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
