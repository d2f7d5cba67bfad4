"""`dsmtp prepare --config CONFIG [--set k=v ...]`: sources -> tokenizer -> token shards.

Steps: open every source of data.sources (list its input files; check paths, Parquet columns, the
brought tokenizer and its vocabulary size, all before any work). Files sources: check every file in
worker processes (binary, non-UTF-8, unreadable and empty files are skipped and counted; with data.dedup,
so are later copies of a content) and split by a hash of each relative path. To train the tokenizer (data.tokenizer=train), take the train documents
of smallest split key until data.tokenizer_sample_bytes are covered (record sources are read once for
it, keeping no more than that in memory). Then tokenize every source in turn, its batches in worker
processes, into one stream of shards per split, each shard of one source (dsmtp.data.shards).

Everything is built in a temporary sibling dir and renamed into place once complete, so an
interrupted run leaves nothing that `load_manifest` accepts. A run whose inputs (every input file's
name, size and mtime, the source settings, the tokenizer, split and sample settings) match the
manifest's fingerprint does nothing. Sources' weights are not inputs: the loader reads them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import heapq
import itertools
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
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import sentencepiece
from tqdm import tqdm

from dsmtp.config import ConfigError, DataConfig, load_config
from dsmtp.data.corpus import SKIP_REASONS, SourceFile, check_file, drop_duplicates, read_text
from dsmtp.data.errors import DataError
from dsmtp.data.shards import (MANIFEST_FILE, SCHEMA_VERSION, SPLITS, ShardWriter, load_manifest, token_dtype,
                               verify_split)
from dsmtp.data.sources import Batch, Source, documents
from dsmtp.data.tokenizer import HF_FILE, MODEL_FILE, Tokenizer, tokenizer_file, train_tokenizer

ROUND_TRIP_EVERY = 64  # a brought tokenizer: check decode(encode(text)) == text on every 64th document


def open_sources(data: DataConfig) -> list[Source]:
    if not data.sources:  # the single tree of data.source_dir, named by those fields in messages
        return [Source(0, data.corpus[0], ("data.source_dir", "data.include"))]
    return [Source(i, s) for i, s in enumerate(data.sources)]


def brought_tokenizer(data: DataConfig, vocab_size: int) -> Optional[Tokenizer]:
    """The tokenizer data.tokenizer names, checked against model.vocab_size; None to train one."""
    if data.tokenizer == "train":
        return None
    path = tokenizer_file(Path(data.tokenizer).expanduser())
    if not path.is_file():
        raise DataError(f"data.tokenizer={data.tokenizer}: no tokenizer.model or tokenizer.json there: give the path "
                        "of one (or of the directory holding it), or data.tokenizer=train to learn one")
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != vocab_size:
        raise DataError(f"data.tokenizer={path} has {tokenizer.vocab_size} token ids but model.vocab_size is "
                        f"{vocab_size}: set model.vocab_size={tokenizer.vocab_size} (one embedding row per id)")
    return tokenizer


def prepare(data: DataConfig, vocab_size: int) -> Path:
    """Build `data.data_dir` (the tokenizer, manifest.json, train/, val/); a no-op if up to date."""
    started = time.perf_counter()
    if data.tokenizer_sample_bytes <= 0:
        raise DataError(f"data.tokenizer_sample_bytes={data.tokenizer_sample_bytes} must be positive, e.g. 20000000")
    data_dir = Path(data.data_dir)
    sources = open_sources(data)
    tokenizer = brought_tokenizer(data, vocab_size)
    fingerprint = input_fingerprint(sources, data, vocab_size, tokenizer)
    inputs = sum(len(s.inputs) for s in sources)
    if _is_up_to_date(data_dir, fingerprint):
        print(f"{data_dir} is up to date ({inputs} input files in {len(sources)} source(s), vocab {vocab_size}): "
              "nothing to do")
        return data_dir
    _check_replaceable(data_dir)
    _remove_stale_builds(data_dir)
    build = _work_dir(data_dir, "tmp")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        manifest = _build(build, sources, data, vocab_size, tokenizer, fingerprint, started)
        _publish(build, data_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    print(summary(data_dir, manifest))
    return data_dir


def input_fingerprint(sources: list[Source], data: DataConfig, vocab_size: int,
                      tokenizer: Optional[Tokenizer]) -> str:
    """Everything the output depends on; num_workers, data_dir and the weights are not among them."""
    if tokenizer is None:
        how = {"train": vocab_size, "sentencepiece": sentencepiece.__version__,
               "tokenizer_sample_bytes": data.tokenizer_sample_bytes}
    else:
        import tokenizers

        how = {"files": [hashlib.sha256(f.read_bytes()).hexdigest() for f in tokenizer.files],
               "sentencepiece": sentencepiece.__version__, "tokenizers": tokenizers.__version__}
    inputs = {
        "schema_version": SCHEMA_VERSION,
        "sources": [{"name": s.name, "kind": s.cfg.kind, "path": str(s.root), "globs": s.cfg.globs,
                     "text_field": s.cfg.text_field, "files": [[f.rel, f.size, f.mtime_ns] for f in s.inputs]}
                    for s in sources],
        "val_fraction": data.val_fraction,
        "tokenizer": how,
        **({"dedup": True} if data.dedup else {}),  # absent when off: data dirs built before it stay valid
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _is_up_to_date(data_dir: Path, fingerprint: str) -> bool:
    """The data dir was built from these inputs and is intact: every block of every shard matches its
    checksum (the one full check; loading samples)."""
    try:
        manifest = load_manifest(data_dir)
        tokenizer_sha = hashlib.sha256(tokenizer_file(data_dir).read_bytes()).hexdigest()
    except (DataError, OSError):
        return False
    if manifest["schema_version"] != SCHEMA_VERSION:
        # the fingerprint's inputs changed with the schema: a data dir from an older dsmtp is rebuilt, once
        print(f"{data_dir} was prepared by an older dsmtp (data schema {manifest['schema_version']}); preparing it "
              f"once more as schema {SCHEMA_VERSION}, which records each shard's source (`dsmtp train` reads either)",
              flush=True)
        return False
    if manifest.get("fingerprint") != fingerprint or manifest["tokenizer"]["sha256"] != tokenizer_sha:
        print(f"{data_dir} was prepared from other inputs (data.sources or their files, data.tokenizer, "
              "model.vocab_size, the split or sample settings): preparing it again", flush=True)
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


def _build(build: Path, sources: list[Source], data: DataConfig, vocab_size: int, tokenizer: Optional[Tokenizer],
           fingerprint: str, started: float) -> dict:
    seconds = {"open": time.perf_counter() - started}
    stats = [_source_stats(source, data) for source in sources]
    with worker_pool(data.num_workers) as pmap:
        t = time.perf_counter()
        train_files = {source.index: _check_files(source, st, data, pmap)
                       for source, st in zip(sources, stats) if source.cfg.kind == "files"}
        seconds["check"] = time.perf_counter() - t

        t = time.perf_counter()
        trained = tokenizer is None
        if trained:
            sample = _tokenizer_sample(sources, train_files, data, pmap)
            print(f"training a {vocab_size}-piece BPE tokenizer on {len(sample)} train documents "
                  f"({sum(size for _, size, _ in sample) / 1e6:.1f} MB)", flush=True)
            texts = (item if isinstance(item, str) else read_text(item)[0] for _, _, item in sample)
            tokenizer = train_tokenizer((text for text in texts if text is not None), vocab_size, build / MODEL_FILE)
        else:
            tokenizer = _copy_tokenizer(tokenizer, build)
        seconds["tokenizer"] = time.perf_counter() - t

        t = time.perf_counter()
        dtype = token_dtype(vocab_size)
        writers = {split: ShardWriter(build / split, dtype, tokenizer.eos_id) for split in SPLITS}
        for source, st in zip(sources, stats):
            _tokenize_source(source, st, writers, tokenizer, not trained, data.val_fraction, pmap)
        split_stats = {split: {"documents": sum(st["documents"][split] for st in stats),
                               "chars": sum(st["chars"][split] for st in stats),
                               "tokens": sum(st["tokens"][split] for st in stats),
                               "shards": writers[split].close()} for split in SPLITS}
        for split, other in zip(SPLITS, reversed(SPLITS)):
            if not split_stats[split]["documents"]:
                raise DataError(f"the {split} split got no documents (the {other} split got "
                                f"{split_stats[other]['documents']}): {_more_for(split)}")
        unigram = unigram_baseline(build, split_stats, dtype, vocab_size)
        seconds["tokenize"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    _warn_lossy(tokenizer, stats)

    files = [st for st in stats if st["kind"] == "files"]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {**dataclasses.asdict(data), "vocab_size": vocab_size},
        "sources": stats,
        "tokenizer": {"file": tokenizer.model_path.name, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "trained": trained, "brought_from": None if trained else data.tokenizer,
                      "sample_documents": len(sample) if trained else 0, "sentencepiece": sentencepiece.__version__},
        "dtype": dtype.name,
        "splits": split_stats,
        "unigram": unigram,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    if files:  # every file tree together, as before data.sources
        manifest["files"] = {
            "matched": sum(st["inputs"] for st in files),
            "used": sum(sum(st["documents"].values()) for st in files),
            "skipped": {r: sum(st["skipped"][r] for st in files) for r in skip_reasons(data)},
            "skipped_examples": {r: [e for st in files for e in st.get("skipped_examples", {}).get(r, [])][:5]
                                 for r in skip_reasons(data) if any(st["skipped"][r] for st in files)},
        }
    write_json_atomic(build / MANIFEST_FILE, manifest)
    return manifest


def _more_for(split: str) -> str:
    if split == "val":
        return "raise data.val_fraction, or add documents"
    return "lower data.val_fraction, or add documents"


def skip_reasons(data: DataConfig) -> tuple[str, ...]:
    return SKIP_REASONS + (("duplicate",) if data.dedup else ())


def _source_stats(source: Source, data: DataConfig) -> dict:
    """The manifest's record of one source, filled in as it is read."""
    zero = dict.fromkeys(SPLITS, 0)
    return {"name": source.name, "kind": source.cfg.kind, "path": str(source.root), "text_field": source.cfg.text_field,
            "weight": source.cfg.weight, "inputs": len(source.inputs), "documents": dict(zero), "tokens": dict(zero),
            "chars": dict(zero), "skipped": dict.fromkeys(skip_reasons(data), 0),
            "round_trip": {"checked": 0, "differ": 0}}


def _check_files(source: Source, st: dict, data: DataConfig, pmap: Callable) -> list[SourceFile]:
    """Check every file of a files source (in workers), drop later copies of a content (data.dedup), split
    the usable ones; the train files."""
    skipped: dict[str, list[SourceFile]] = {reason: [] for reason in skip_reasons(data)}
    usable, digests = [], []
    checks = pmap(check_file, [f.path for f in source.inputs])
    for (reason, _, digest), f in zip(tqdm(checks, total=len(source.inputs), desc=f"check {source.name}",
                                           unit="file"), source.inputs):
        (skipped[reason] if reason else usable).append(f)
        if not reason:
            digests.append(digest)
    if data.dedup:
        usable, skipped["duplicate"] = drop_duplicates(usable, digests)
    st["skipped"] = {reason: len(v) for reason, v in skipped.items()}
    st["skipped_examples"] = {reason: [f.rel for f in v[:5]] for reason, v in skipped.items() if v}
    return source.assign_files(usable, st["skipped"], data.val_fraction)["train"]


def _tokenizer_sample(sources: list[Source], train_files: dict[int, list[SourceFile]], data: DataConfig,
                      pmap: Callable) -> list[tuple[float, int, object]]:
    """(key, bytes, text or file path) of the train documents of smallest split key that cover
    data.tokenizer_sample_bytes, in key order: a fixed pseudo-random sample, whatever the reading order."""
    sample = SmallestKeys(data.tokenizer_sample_bytes)
    for source in sources:
        if source.cfg.kind == "files":
            for f in train_files[source.index]:
                sample.add(f.split_key, f.size, f.path)
            continue
        tasks = ((batch, source.cfg.text_field, data.val_fraction, data.tokenizer_sample_bytes)
                 for batch in source.batches())
        for result in _progress(pmap(sample_batch, tasks), source, "sample"):
            for key, text in result["kept"]:
                sample.add(key, len(text.encode()), text)
    return sample.items()


def _copy_tokenizer(tokenizer: Tokenizer, build: Path) -> Tokenizer:
    """The brought tokenizer's files, copied into the build under dsmtp's names."""
    for i, path in enumerate(tokenizer.files):
        name = (HF_FILE if path.suffix == ".json" else MODEL_FILE) if i == 0 else path.name
        shutil.copyfile(path, build / name)
    return Tokenizer.load(build)


def _tokenize_source(source: Source, st: dict, writers: dict[str, ShardWriter], tokenizer: Tokenizer,
                     check_round_trip: bool, val_fraction: float, pmap: Callable) -> None:
    for writer in writers.values():
        writer.start_source(source.name)
    tasks = ((batch, source.cfg.text_field, val_fraction, str(tokenizer.model_path), check_round_trip)
             for batch in source.batches())
    for result in _progress(pmap(encode_batch, tasks), source, "tokenize"):
        for split in SPLITS:
            tokens, lengths = result["tokens"][split]
            end = 0
            for length in lengths.tolist():
                writers[split].add(tokens[end:end + length])
                end += length
            st["documents"][split] += len(lengths)
            st["tokens"][split] += end + len(lengths)  # with each document's EOS, as in the shards
            st["chars"][split] += result["chars"][split]
        for reason, n in result["skipped"].items():
            st["skipped"][reason] += n
        for key in ("checked", "differ"):
            st["round_trip"][key] += result["round_trip"][key]


def _progress(results: Iterable[dict], source: Source, verb: str) -> Iterator[dict]:
    total, unit = source.progress_total
    with tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=f"{verb} {source.name}") as bar:
        for result in results:
            bar.update(result["progress"])
            yield result


def _warn_lossy(tokenizer: Tokenizer, stats: list[dict]) -> None:
    checked = sum(st["round_trip"]["checked"] for st in stats)
    differ = sum(st["round_trip"]["differ"] for st in stats)
    if differ:
        print(f"note: {tokenizer.model_path.name} does not give back the text of {differ} of {checked} documents "
              "checked (decode(encode(text)) != text: it normalizes text or maps characters to <unk>); the model "
              "learns the normalized text", file=sys.stderr)


class SmallestKeys:
    """The items of smallest key whose sizes add up to at least `budget` (all of them, if they add up to
    less), kept in bounded memory while items stream past: a max-heap from which the largest key is
    dropped whenever the rest still cover the budget."""

    def __init__(self, budget: int):
        self.budget, self.total, self._heap, self._order = budget, 0, [], itertools.count()

    def add(self, key: float, size: int, item: object) -> None:
        heapq.heappush(self._heap, (-key, next(self._order), size, item))
        self.total += size
        while self.total - self._heap[0][2] >= self.budget:
            self.total -= heapq.heappop(self._heap)[2]

    def items(self) -> list[tuple[float, int, object]]:
        """(key, size, item) in key order."""
        return [(-neg_key, size, item) for neg_key, _, size, item in sorted(self._heap, reverse=True)]


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


# ----------------------------------------------------------------------------------------------
# Worker tasks (run in worker processes; each gets one batch of one source)


_worker_tokenizers: dict[str, Tokenizer] = {}  # per worker process: loaded once, used for every batch


def sample_batch(task: tuple[Batch, str, float, int]) -> dict:
    """The batch's train documents of smallest key covering the sample budget: {"kept": [(key, text)]}.
    Reading them also checks every record (a bad one raises DataError naming its line)."""
    batch, text_field, val_fraction, budget = task
    kept = SmallestKeys(budget)
    for doc in documents(batch, text_field, val_fraction):
        if doc.text is not None and doc.split == "train":
            kept.add(doc.key, len(doc.text.encode()), doc.text)
    return {"kept": [(key, text) for key, _, text in kept.items()], "progress": batch.progress}


def encode_batch(task: tuple[Batch, str, float, str, bool]) -> dict:
    """The batch's documents as token ids, by split: {"tokens": {split: (ids, lengths)}, "chars", "skipped",
    "round_trip"}; ids are the documents' ids concatenated (no EOS), lengths their counts."""
    batch, text_field, val_fraction, model_path, check_round_trip = task
    if model_path not in _worker_tokenizers:
        _worker_tokenizers[model_path] = Tokenizer.load(model_path)
    tokenizer = _worker_tokenizers[model_path]
    texts: dict[str, list[str]] = {split: [] for split in SPLITS}
    skipped: collections.Counter = collections.Counter()
    for doc in documents(batch, text_field, val_fraction):
        if doc.text is None:
            skipped[doc.skip] += 1
        else:
            texts[doc.split].append(doc.text)
    dtype = token_dtype(tokenizer.vocab_size)
    result = {"tokens": {}, "chars": {}, "skipped": dict(skipped), "round_trip": {"checked": 0, "differ": 0},
              "progress": batch.progress}
    for split, docs in texts.items():
        ids = tokenizer.encode_batch(docs)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        result["tokens"][split] = (np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                                               count=int(lengths.sum())), lengths)
        result["chars"][split] = sum(map(len, docs))
        if check_round_trip:
            checks = [tokenizer.decode(i) != text for text, i in zip(docs[::ROUND_TRIP_EVERY], ids[::ROUND_TRIP_EVERY])]
            result["round_trip"]["checked"] += len(checks)
            result["round_trip"]["differ"] += sum(checks)
    return result


def _worker_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the worker processes are the parallelism


@contextmanager
def worker_pool(num_workers: int) -> Iterator[Callable]:
    """Yields an ordered, lazy map over `num_workers` processes (this process when 1) that keeps at most
    two tasks per worker in flight, so memory stays bounded however long the input."""
    if num_workers == 1:
        yield map
        return
    # spawn: the caller may hold threads (torch) that fork would copy in a locked state
    with multiprocessing.get_context("spawn").Pool(num_workers, initializer=_worker_init) as pool:
        def bounded_map(fn: Callable, items: Iterable) -> Iterator:
            pending: collections.deque = collections.deque()
            for item in items:
                pending.append(pool.apply_async(fn, (item,)))
                if len(pending) >= 2 * num_workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield bounded_map


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def summary(data_dir: Path, manifest: dict) -> str:
    splits, tok, seconds = manifest["splits"], manifest["tokenizer"], manifest["seconds"]
    lines = [f"prepared {data_dir} in {seconds['total']:.1f} s (tokenizer {seconds['tokenizer']:.1f} s, "
             f"tokenize {seconds['tokenize']:.1f} s)"]
    for st in manifest["sources"]:
        skipped = ", ".join(f"{n} {r}" for r, n in st["skipped"].items() if n) or "none"
        lines.append(f"  source {st['name']} ({st['kind']} {st['path']}, weight {st['weight']:g}): {st['inputs']} "
                     f"input files, documents {st['documents']['train']:,} train / {st['documents']['val']:,} val, "
                     f"tokens {st['tokens']['train']:,} / {st['tokens']['val']:,}, skipped: {skipped}")
    how = "trained" if tok["trained"] else f"from {tok['brought_from']}"
    lines.append(f"  tokenizer: {tok['file']} {how}, vocab {tok['vocab_size']}, sha256 {tok['sha256'][:16]}")
    for split, s in splits.items():
        lines.append(f"  {split}: {s['documents']:,} documents, {s['tokens']:,} tokens ({manifest['dtype']}), "
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
