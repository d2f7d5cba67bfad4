"""Data step: tokenizer, prepare (bad input, up-to-date, atomicity), shards and the loader.

The corpus is a copy of real standard-library files (about 250 kB) with a 512-piece tokenizer; the
shard size is lowered so that every split spans several shards and reads cross shard boundaries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import socket
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dsmtp.config import DataConfig
from dsmtp.data import prepare as prepare_mod
from dsmtp.data import shards
from dsmtp.data.corpus import SourceFile, split_files
from dsmtp.data.errors import DataError
from dsmtp.data.loader import TrainBatches, val_batches
from dsmtp.data.prepare import prepare
from dsmtp.data.shards import ShardWriter, TokenSplit, load_manifest, token_dtype
from dsmtp.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = ["textwrap", "bisect", "heapq", "colorsys", "keyword", "glob", "fnmatch", "string", "shlex", "queue",
          "copy", "numbers", "abc", "json/decoder", "json/encoder", "email/utils", "fractions", "html/entities"]
VOCAB = 512
SEQ, EXTRA = 64, 2


def make_corpus(root: Path) -> Path:
    for name in CORPUS:
        dst = root / f"{name}.py"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STDLIB / f"{name}.py", dst)
    return root


def data_config(src: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(source_dir=str(src), data_dir=str(out), val_fraction=0.15, num_workers=1, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "SHARD_TOKENS", 20_000)  # several shards per split
        return prepare(data_config(corpus, tmp_path_factory.mktemp("data") / "d"), VOCAB)


def stream(data_dir: Path, split: str) -> np.ndarray:
    s = TokenSplit(data_dir, split)
    return s.read(0, s.num_tokens)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trips_real_files_exactly(data_dir):
    tok = Tokenizer.load(data_dir)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (VOCAB, 0, 1, 2)
    # corpus files, and unseen ones with non-ASCII text, form feeds, long lines
    for path in [STDLIB / f"{n}.py" for n in CORPUS + ["statistics", "locale", "stringprep"]]:
        text = path.read_text(encoding="utf-8")
        ids = tok.encode(text)
        assert tok.decode(ids) == text, path
        assert min(ids) > tok.eos_id and max(ids) < VOCAB  # specials never come from text
        if path.stem in CORPUS:
            assert len(ids) < 0.7 * len(text.encode())  # it learned merges, not just bytes
    tricky = "a\u2581b \u2581\u2581x\r\n\tz\x00\x0c\x1b \ufeff\u200b é 😀 \n\n\n    \n"
    assert tok.decode(tok.encode(tricky)) == tricky


def test_tokenizer_refuses_vocab_size_mismatch(data_dir):
    assert Tokenizer.load(data_dir / "tokenizer.model", expected_vocab_size=VOCAB).vocab_size == VOCAB
    with pytest.raises(DataError, match="vocab size 512 but model.vocab_size is 1024"):
        Tokenizer.load(data_dir, expected_vocab_size=1024)
    with pytest.raises(DataError, match="no tokenizer"):
        Tokenizer.load(data_dir / "train")


# ----------------------------------------------------------------------------------------------
# Prepare: contents


def test_shards_hold_every_usable_file_once_eos_separated(data_dir, corpus):
    manifest = load_manifest(data_dir)
    tok = Tokenizer.load(data_dir)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["sha256"] == tok.sha256
    assert manifest["files"]["matched"] == manifest["files"]["used"] == len(CORPUS)
    docs: Counter = Counter()
    for split in ("train", "val"):
        ts = TokenSplit(data_dir, split)
        assert len(manifest["splits"][split]["shards"]) >= 2 or split == "val"
        tokens = stream(data_dir, split)
        assert ts.dtype == np.uint16 and len(tokens) == manifest["splits"][split]["tokens"]
        *documents, after_last_eos = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)
        assert len(after_last_eos) == 0 and len(documents) == manifest["splits"][split]["documents"] >= 1
        for document in documents:
            docs[tok.decode(document[:-1].tolist())] += 1
    # independent reference: the files themselves, each exactly once over both splits
    assert docs == Counter((corpus / f"{n}.py").read_text() for n in CORPUS)


def test_unigram_baseline_matches_hand_computation(data_dir):
    train, val = Counter(stream(data_dir, "train").tolist()), Counter(stream(data_dir, "val").tolist())
    n_train, n_val = sum(train.values()), sum(val.values())
    entropy = -sum(c / n_train * math.log(c / n_train) for c in train.values())
    cross = -sum(c * math.log((train[t] + 1) / (n_train + VOCAB)) for t, c in val.items()) / n_val
    unigram = load_manifest(data_dir)["unigram"]
    assert unigram["train_entropy_nats"] == pytest.approx(entropy, rel=1e-9)
    assert unigram["val_cross_entropy_nats"] == pytest.approx(cross, rel=1e-9)


def test_split_by_path_hash_is_stable_and_near_fraction():
    files = [SourceFile(f"pkg{i % 7}/mod_{i}.py", Path("x"), 1, 1) for i in range(2000)]
    splits = split_files(files, 0.1)
    val = {f.rel for f in splits["val"]}
    assert 150 < len(val) < 250 and len(val) + len(splits["train"]) == 2000
    more = split_files(list(reversed(files)) + [SourceFile("new.py", Path("x"), 1, 1)], 0.1)
    assert val - {"new.py"} == {f.rel for f in more["val"]} - {"new.py"}  # adding a file moves no other
    two = split_files(files[:2], 0.01)
    assert len(two["val"]) == len(two["train"]) == 1


def test_skips_and_counts_bad_files(tmp_path, capsys):
    src = make_corpus(tmp_path / "src")
    (src / "blob.py").write_bytes(b"x = 1\n\x00\x01\x02")
    (src / "latin1.py").write_bytes(b"name = 'caf\xe9'\n")
    (src / "empty.py").write_text("  \n")
    (src / "dangling.py").symlink_to(tmp_path / "missing")
    out = prepare(data_config(src, tmp_path / "d"), VOCAB)
    files = load_manifest(out)["files"]
    assert files["skipped"] == {"unreadable": 1, "binary": 1, "not_utf8": 1, "empty": 1}
    assert files["matched"] == len(CORPUS) + 4 and files["used"] == len(CORPUS)
    assert "skipped: 1 unreadable, 1 binary, 1 not_utf8, 1 empty" in capsys.readouterr().out


def test_dedup_keeps_the_first_file_of_each_content(tmp_path):
    src = make_corpus(tmp_path / "src")
    (src / "vendored").mkdir()
    shutil.copyfile(src / "heapq.py", src / "vendored" / "heapq_copy.py")  # a later path, the same bytes
    shutil.copyfile(src / "bisect.py", src / "a_bisect.py")  # an earlier path: it is the one kept
    plain = load_manifest(prepare(data_config(src, tmp_path / "plain"), VOCAB))
    assert "duplicate" not in plain["files"]["skipped"] and plain["files"]["used"] == len(CORPUS) + 2
    out = prepare(data_config(src, tmp_path / "dedup", dedup=True), VOCAB)
    manifest = load_manifest(out)
    assert manifest["files"]["skipped"]["duplicate"] == 2 and manifest["files"]["used"] == len(CORPUS)
    assert sorted(manifest["files"]["skipped_examples"]["duplicate"]) == ["bisect.py", "vendored/heapq_copy.py"]
    assert manifest["fingerprint"] != plain["fingerprint"]  # dedup is part of what the data dir was built from


# ----------------------------------------------------------------------------------------------
# Prepare: bad input (clear error, before any data dir is made)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("file", "is a file, not a directory"),
    ("empty", "is empty"),
    ("no_match", "no file under .* matches data.include"),
    ("all_binary", "0 of the 2 files matched .* are usable text"),
])
def test_bad_source_is_refused_before_work(tmp_path, case, message):
    src = tmp_path / "src"
    if case == "file":
        src.write_text("x")
    elif case != "missing":
        src.mkdir()
    if case == "no_match":
        (src / "notes.txt").write_text("text")
    if case == "all_binary":
        for name in ("a.py", "b.py"):
            (src / name).write_bytes(b"\x00\xff")
    with pytest.raises(DataError, match=message):
        prepare(data_config(src, tmp_path / "d"), VOCAB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if case == "missing" else ["src"])  # no data dir


def test_bad_settings_and_foreign_data_dir_are_refused(tmp_path, corpus):
    with pytest.raises(DataError, match="change model.vocab_size"):
        prepare(data_config(corpus, tmp_path / "d"), 60_000)
    with pytest.raises(DataError, match="data.tokenizer_sample_bytes=0 must be positive"):
        prepare(data_config(corpus, tmp_path / "d", tokenizer_sample_bytes=0), VOCAB)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a dsmtp data dir"):
        prepare(data_config(corpus, foreign), VOCAB)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_reports_bad_input_and_wrapper_script_runs(tmp_path):
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.source_dir={tmp_path / 'nope'}",
            "--set", f"data.data_dir={tmp_path / 'd'}"]
    proc = subprocess.run([sys.executable, str(REPO / "tools/prepare_data.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert prepare_mod.main([*args[:2], "--set", "data.val_fraction=1.5"]) == 2  # config errors too


# ----------------------------------------------------------------------------------------------
# Prepare: up to date, rebuild, atomicity


def _stamp(data_dir: Path) -> tuple:
    m = data_dir / "manifest.json"
    return m.stat().st_ino, m.stat().st_mtime_ns, json.loads(m.read_text())["fingerprint"]


def test_rerun_is_noop_and_changed_inputs_rebuild(tmp_path, capsys):
    src = make_corpus(tmp_path / "src")
    cfg = data_config(src, tmp_path / "d")
    out = prepare(cfg, VOCAB)
    first = _stamp(out)
    capsys.readouterr()
    prepare(cfg, VOCAB)
    assert "is up to date" in capsys.readouterr().out and _stamp(out) == first

    seen = {first[2]}
    (src / "keyword.py").write_text((src / "keyword.py").read_text() + "\nEXTRA = 1\n")
    prepare(cfg, VOCAB)
    seen.add(_stamp(out)[2])
    prepare(cfg, VOCAB + 64)
    assert Tokenizer.load(out).vocab_size == VOCAB + 64
    seen.add(_stamp(out)[2])
    prepare(data_config(src, tmp_path / "d", exclude=["json/**"]), VOCAB + 64)
    seen.add(_stamp(out)[2])
    assert load_manifest(out)["files"]["matched"] == len(CORPUS) - 2
    assert len(seen) == 4 and not list(tmp_path.glob(".d.*"))  # four builds, no leftovers


def test_worker_processes_give_identical_output(tmp_path, data_dir, corpus):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "SHARD_TOKENS", 20_000)
        out = prepare(dataclasses.replace(data_config(corpus, tmp_path / "d"), num_workers=2), VOCAB)
    for name in ["tokenizer.model"] + [p.relative_to(data_dir).as_posix() for p in data_dir.glob("*/*")]:
        assert (out / name).read_bytes() == (data_dir / name).read_bytes(), name


def test_crash_mid_prepare_leaves_nothing_loadable(tmp_path, monkeypatch):
    src = make_corpus(tmp_path / "src")
    cfg = data_config(src, tmp_path / "d")
    calls = []

    def crash(self, tokens):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-tokenization
        real_add(self, tokens)

    real_add = ShardWriter.add
    monkeypatch.setattr(ShardWriter, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, VOCAB)
    for load in (load_manifest, Tokenizer.load, lambda d: TrainBatches(d, SEQ, EXTRA, 2, 0)):
        with pytest.raises(DataError):
            load(tmp_path / "d")
    assert not list(tmp_path.glob(".d.*"))

    # a killed run (no finally, no cleanup: os._exit mid-tokenization) leaves its temp dir behind:
    # nothing loadable, and the next run removes it
    killed = (f"import os, dsmtp.data.shards as s, dsmtp.data.prepare as p, dsmtp.config as c\n"
              f"s.ShardWriter.add = lambda self, tokens: os._exit(9)\n"
              f"p.prepare(c.DataConfig(source_dir={str(src)!r}, data_dir={str(tmp_path / 'd')!r}, num_workers=1), {VOCAB})")
    proc = subprocess.run([sys.executable, "-c", killed], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 9
    (stale,) = tmp_path.glob(f".d.tmp-*@{socket.gethostname()}")
    assert (stale / "tokenizer.model").is_file()
    with pytest.raises(DataError):
        load_manifest(tmp_path / "d")
    monkeypatch.setattr(ShardWriter, "add", real_add)
    prepare(cfg, VOCAB)
    assert not stale.exists() and load_manifest(tmp_path / "d")["files"]["used"] == len(CORPUS)

    # a failed rebuild leaves the previous complete data dir as it was
    before = _stamp(tmp_path / "d")
    calls.clear()
    monkeypatch.setattr(ShardWriter, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, VOCAB + 64)
    assert _stamp(tmp_path / "d") == before and Tokenizer.load(tmp_path / "d").vocab_size == VOCAB


def test_truncated_shard_is_refused(tmp_path, data_dir):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = copy / load_manifest(copy)["splits"]["train"]["shards"][0]["tokens"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        TrainBatches(copy, SEQ, EXTRA, 2, 0)


def test_uint32_shards_round_trip_across_shard_boundaries(tmp_path):
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    docs = [np.arange(n, dtype=np.uint32) + 70_000 for n in (3, 11, 1, 7)]
    written = ShardWriter(tmp_path / "train", np.uint32, eos_id=2, max_shard_tokens=8)
    for d in docs:
        written.add(d)
    manifest = {"schema_version": shards.SCHEMA_VERSION, "dtype": "uint32", "tokenizer": {"vocab_size": 70_011},
                "splits": {"train": {"shards": written.close()}, "val": {"shards": []}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    expected = np.concatenate([np.append(d, 2) for d in docs])
    split = TokenSplit(tmp_path, "train")
    assert len(manifest["splits"]["train"]["shards"]) == 4 and split.num_tokens == len(expected)
    assert split.read(0, len(expected)).tolist() == expected.tolist()
    assert split.read(2, 9).tolist() == expected[2:11].tolist()
    shard_sizes = [(s["num_tokens"], s["num_documents"]) for s in manifest["splits"]["train"]["shards"]]
    assert shard_sizes == [(4, 1), (12, 1), (2, 1), (8, 1)]


# ----------------------------------------------------------------------------------------------
# Loader


def windows(data_dir: Path) -> list[tuple]:
    """Reference: every SEQ-strided window of SEQ + EXTRA + 1 tokens of the train stream."""
    s = stream(data_dir, "train").astype(np.int64)
    return [tuple(s[k:k + SEQ + EXTRA + 1]) for k in range(0, len(s) - SEQ - EXTRA, SEQ)]


def rows(batches) -> list[tuple]:
    return [tuple(r.tolist()) for b in batches for r in b]


def test_samples_are_stream_windows_each_once_per_epoch(data_dir):
    loader = TrainBatches(data_dir, SEQ, EXTRA, micro_batch_size=4, seed=7)
    ref = windows(data_dir)
    assert loader.num_samples == len(ref)
    batches = [next(loader) for _ in range(-(-2 * len(ref) // 4))]
    assert all(b.shape == (4, SEQ + EXTRA + 1) and b.dtype == torch.int64 for b in batches)
    got = rows(batches)
    assert sorted(got[:len(ref)]) == sorted(ref) and sorted(got[len(ref):2 * len(ref)]) == sorted(ref)
    assert got[:len(ref)] != ref and got[:len(ref)] != got[len(ref):2 * len(ref)]  # shuffled, reshuffled
    again = TrainBatches(data_dir, SEQ, EXTRA, 4, seed=7)
    other = TrainBatches(data_dir, SEQ, EXTRA, 4, seed=8)
    assert torch.equal(next(again), batches[0]) and not torch.equal(next(other), batches[0])


def test_resume_continues_with_next_unseen_sample(data_dir):
    n = TrainBatches(data_dir, SEQ, EXTRA, 3, seed=1).num_samples // 3 + 5  # resume after an epoch boundary
    full = TrainBatches(data_dir, SEQ, EXTRA, 3, seed=1)
    expected = [next(full) for _ in range(n + 10)]
    first = TrainBatches(data_dir, SEQ, EXTRA, 3, seed=1)
    for _ in range(n):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    resumed = TrainBatches(data_dir, SEQ, EXTRA, 3, seed=1)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    for want in expected[n:]:
        assert torch.equal(next(resumed), want)
    with pytest.raises(DataError, match="seed=1 but this loader has 2"):
        TrainBatches(data_dir, SEQ, EXTRA, 3, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="sample_len"):
        TrainBatches(data_dir, SEQ, EXTRA + 1, 3, seed=1).load_state_dict(state)


def test_dp_ranks_are_disjoint_slices_of_the_single_rank_stream(data_dir):
    dp, mbs = 3, 2
    single = TrainBatches(data_dir, SEQ, EXTRA, mbs * dp, seed=5)
    ranks = [TrainBatches(data_dir, SEQ, EXTRA, mbs, seed=5, dp_rank=r, dp_size=dp) for r in range(dp)]
    steps = single.num_samples // (mbs * dp) + 2  # crosses an epoch boundary
    seen = []
    for _ in range(steps):
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat(parts), next(single))
        seen.append([set(rows([p])) for p in parts])
    first_epoch = seen[: single.num_samples // (mbs * dp)]
    per_rank = [set().union(*(step[r] for step in first_epoch)) for r in range(dp)]
    assert all(not (per_rank[a] & per_rank[b]) for a in range(dp) for b in range(a + 1, dp))
    with pytest.raises(DataError, match="dp_rank=3"):
        TrainBatches(data_dir, SEQ, EXTRA, mbs, seed=5, dp_rank=3, dp_size=3)


def test_val_batches_are_fixed_distinct_and_bounded(data_dir):
    a = val_batches(data_dir, SEQ, EXTRA, micro_batch_size=2, num_batches=3)
    b = val_batches(data_dir, SEQ, EXTRA, micro_batch_size=2, num_batches=3)
    assert len(a) == 3 and all(x.shape == (2, SEQ + EXTRA + 1) and x.dtype == torch.int64 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    s = stream(data_dir, "val").astype(np.int64)
    val_windows = {tuple(s[k:k + SEQ + EXTRA + 1]) for k in range(0, len(s) - SEQ - EXTRA, SEQ)}
    got = rows(a)
    assert len(set(got)) == 6 and set(got) <= val_windows
    with pytest.raises(DataError, match="lower train.eval_batches"):
        val_batches(data_dir, SEQ, EXTRA, 2, len(val_windows))
    with pytest.raises(DataError, match="fewer than one sample"):
        val_batches(data_dir, 10**6, EXTRA, 1, 1)
