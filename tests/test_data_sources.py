"""Bring your own corpus: data.sources of every kind, weighted mixtures, brought tokenizers, bad input.

Documents are real standard-library modules plus a few awkward texts; the reference for every round trip
is that list of texts itself. Batch sizes are lowered so that reads cross batch (and row-group) edges.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dsmtp.config import ConfigError, DataConfig, SourceConfig, config_from_dict
from dsmtp.data import shards, sources
from dsmtp.data.errors import DataError
from dsmtp.data.loader import TrainBatches
from dsmtp.data.prepare import SmallestKeys, prepare
from dsmtp.data.shards import TokenSplit, load_manifest
from dsmtp.data.tokenizer import HFTokenizer, Tokenizer

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap", "bisect", "heapq", "colorsys", "keyword", "glob", "fnmatch", "string", "shlex", "queue",
           "copy", "numbers", "abc", "fractions", "stringprep", "locale"]
MORE_MODULES = {"b": ["calendar", "csv", "difflib", "enum", "gettext", "hmac", "ipaddress", "mimetypes"],
                "c": ["netrc", "operator", "pprint", "quopri", "random", "sched"]}
AWKWARD = ["caf\u00e9 \u2581 \U0001f600\r\n\tx = 1\n", "x" * 5000 + "\n", "\ufeffbom first\n", "  leading and trailing  "]
VOCAB = 512
SEQ, EXTRA = 32, 1


def texts(tag: str = "") -> list[str]:
    """Distinct documents; tags "b" and "c" give other modules (sources that share no text)."""
    if tag in MORE_MODULES:
        return [f"# {tag}\n" + (STDLIB / f"{name}.py").read_text(encoding="utf-8") for name in MORE_MODULES[tag]]
    docs = [(STDLIB / f"{name}.py").read_text(encoding="utf-8") for name in MODULES] + AWKWARD
    return [f"# {tag}\n{d}" if tag else d for d in docs]


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(sources, "BATCH_BYTES", 20_000)  # jsonl: several lines per batch, many batches
    monkeypatch.setattr(sources, "BATCH_ROWS", 3)  # parquet, hf_disk


def write_source(kind: str, docs: list[str], root: Path) -> SourceConfig:
    """`docs` as a source of `kind` under `root`; extra fields ride along to show they are ignored."""
    root.mkdir(parents=True)
    records = [{"id": i, "text": d, "meta": {"n": i}} for i, d in enumerate(docs)]
    if kind == "files":
        for i, d in enumerate(docs):
            (root / f"d{i:03d}.txt").write_text(d, encoding="utf-8", newline="")
        return SourceConfig(kind="files", path=str(root), include=["*.txt"], name=kind)
    if kind.startswith("jsonl"):
        suffix = kind.partition("_")[2]
        lines = "".join(json.dumps(r) + "\n" + ("\n" if i == 3 else "") for i, r in enumerate(records)).encode()
        path = root / f"part.jsonl{'.' + suffix if suffix else ''}"
        if suffix == "gz":
            lines = gzip.compress(lines)
        elif suffix == "zst":
            import zstandard
            lines = zstandard.ZstdCompressor().compress(lines)
        path.write_bytes(lines)
        return SourceConfig(kind="jsonl", path=str(path), name=kind)
    if kind == "parquet":  # a directory of two files, row groups of 4 rows
        import pyarrow as pa
        import pyarrow.parquet as pq
        half = len(docs) // 2
        for i, part in enumerate([records[:half], records[half:]]):
            table = pa.table({"id": [r["id"] for r in part], "body": [r["text"] for r in part]})
            pq.write_table(table, root / f"part-{i}.parquet", row_group_size=4)
        return SourceConfig(kind="parquet", path=str(root), text_field="body", name=kind)
    if kind == "hf_disk":
        import datasets
        datasets.Dataset.from_dict({"id": list(range(len(docs))), "content": docs}).save_to_disk(str(root / "ds"))
        return SourceConfig(kind="hf_disk", path=str(root / "ds"), text_field="content", name=kind)
    raise AssertionError(kind)


def data_config(out: Path, srcs: list[SourceConfig], **kw) -> DataConfig:
    return DataConfig(sources=srcs, data_dir=str(out), **{"val_fraction": 0.2, "num_workers": 1, **kw})


def decoded_documents(data_dir: Path, source: str | None = None) -> Counter:
    """Every document of both splits (of one source, or all), decoded from the shards."""
    tok = Tokenizer.load(data_dir)
    docs: Counter = Counter()
    for split in ("train", "val"):
        ts = TokenSplit(data_dir, split)
        stream = ts if source is None else ts.source(source)
        tokens = stream.read(0, stream.num_tokens)
        *documents, rest = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)
        assert len(rest) == 0
        docs.update(tok.decode(d[:-1].tolist()) for d in documents)
    return docs


# ----------------------------------------------------------------------------------------------
# Each kind round-trips its documents exactly


@pytest.mark.parametrize("kind", ["files", "jsonl", "jsonl_gz", "jsonl_zst", "parquet", "hf_disk"])
def test_each_source_kind_round_trips_documents_exactly(tmp_path, kind):
    docs = texts()
    src = write_source(kind, docs, tmp_path / "src")
    out = prepare(data_config(tmp_path / "d", [src]), VOCAB)
    assert decoded_documents(out) == Counter(docs)
    manifest = load_manifest(out)
    (st,) = manifest["sources"]
    assert st["name"] == kind and sum(st["documents"].values()) == len(docs)
    assert st["tokens"] == {s: manifest["splits"][s]["tokens"] for s in ("train", "val")}
    assert all(s["source"] == kind for split in ("train", "val") for s in manifest["splits"][split]["shards"])
    if kind != "files":  # records are split by a hash of their text: an independent computation here
        val = {d for d in docs if int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "big") / 2**64 < 0.2}
        assert st["documents"]["val"] == len(val) and decoded_documents_of(out, "val") == Counter(val)


def decoded_documents_of(data_dir: Path, split: str) -> Counter:
    tok = Tokenizer.load(data_dir)
    ts = TokenSplit(data_dir, split)
    tokens = ts.read(0, ts.num_tokens)
    return Counter(tok.decode(d[:-1].tolist()) for d in np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)[:-1])


def test_empty_and_blank_records_are_skipped_and_counted(tmp_path):
    path = tmp_path / "a.jsonl"
    docs = texts()
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*docs, "", "   \n"]) + "\n\n")
    out = prepare(data_config(tmp_path / "d", [SourceConfig(kind="jsonl", path=str(path))]), VOCAB)
    (st,) = load_manifest(out)["sources"]
    assert st["skipped"]["empty"] == 2 and sum(st["documents"].values()) == len(docs)
    assert decoded_documents(out) == Counter(docs)


def test_smallest_keys_is_the_sorted_prefix_covering_the_budget():
    rng = np.random.default_rng(0)
    keys, sizes = rng.random(500), rng.integers(1, 100, 500)
    kept = SmallestKeys(2000)
    for i, (k, s) in enumerate(zip(keys, sizes)):
        kept.add(float(k), int(s), i)
    order = np.argsort(keys)
    covered = np.cumsum(sizes[order])
    prefix = order[: int(np.searchsorted(covered, 2000)) + 1]  # first prefix reaching the budget
    assert [i for _, _, i in kept.items()] == prefix.tolist()


# ----------------------------------------------------------------------------------------------
# Mixtures


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """Three sources of distinct documents (jsonl.zst, parquet, files), prepared with two workers."""
    root = tmp_path_factory.mktemp("mixture")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "BATCH_BYTES", 20_000)
        mp.setattr(sources, "BATCH_ROWS", 3)
        mp.setattr(shards, "SHARD_TOKENS", 10_000)  # several shards per source
        srcs = [write_source("jsonl_zst", texts("a"), root / "a"), write_source("parquet", texts("b"), root / "b"),
                write_source("files", texts("c"), root / "c")]
        for s, w in zip(srcs, (5, 3, 2)):
            s.weight = w
        return prepare(data_config(root / "d", srcs, num_workers=2), VOCAB)


def test_mixture_keeps_each_source_apart_and_counts_its_tokens(mixture, tmp_path):
    manifest = load_manifest(mixture)
    assert [s["name"] for s in manifest["sources"]] == ["jsonl_zst", "parquet", "files"]
    for st, tag in zip(manifest["sources"], "abc"):
        assert decoded_documents(mixture, st["name"]) == Counter(texts(tag))
        for split in ("train", "val"):
            mine = [s for s in manifest["splits"][split]["shards"] if s["source"] == st["name"]]
            assert st["tokens"][split] == sum(s["num_tokens"] for s in mine) == TokenSplit(mixture, split).source(
                st["name"]).num_tokens
    assert len([s for s in manifest["splits"]["train"]["shards"] if s["source"] == "jsonl_zst"]) >= 2
    # one worker process writes the same bytes
    srcs = [SourceConfig(**{k: v for k, v in c.items()}) for c in manifest["config"]["sources"]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "SHARD_TOKENS", 10_000)
        one = prepare(data_config(tmp_path / "one", srcs, num_workers=1), VOCAB)
    for path in sorted(mixture.rglob("*.tokens")) + [mixture / "tokenizer.model"]:
        assert (one / path.relative_to(mixture)).read_bytes() == path.read_bytes(), path


def source_windows(data_dir: Path, loader: TrainBatches) -> list[Counter]:
    """Reference: every window of every source's train stream (a repetitive text repeats windows)."""
    windows = []
    for name in loader.sources:
        stream = TokenSplit(data_dir, "train").source(name)
        tokens = stream.read(0, stream.num_tokens).astype(np.int64)
        windows.append(Counter(tuple(tokens[k:k + SEQ + EXTRA + 1]) for k in range(0, len(tokens) - SEQ - EXTRA, SEQ)))
    return windows


def source_of_rows(windows: list[Counter], rows: list[tuple]) -> list[int]:
    """Which source each row is a window of."""
    owners = [[s for s, w in enumerate(windows) if r in w] for r in rows]
    assert all(len(o) == 1 for o in owners)
    return [o[0] for o in owners]


def test_mixture_draws_in_proportion_to_weights_and_each_source_in_epochs(mixture):
    loader = TrainBatches(mixture, SEQ, EXTRA, micro_batch_size=8, seed=3, weights={"jsonl_zst": 5, "parquet": 3,
                                                                                   "files": 2})
    batches = [next(loader) for _ in range(1000)]  # 8000 samples
    rows = [tuple(r.tolist()) for b in batches for r in b]
    windows = source_windows(mixture, loader)
    owners = source_of_rows(windows, rows)
    shares = np.bincount(owners, minlength=3) / len(owners)
    # binomial standard deviation at n = 8000 is at most 0.0056: 0.02 is over 3.5 of them
    assert np.allclose(shares, [0.5, 0.3, 0.2], atol=0.02), shares
    assert loader.drawn == np.bincount(owners, minlength=3).tolist()
    assert loader.source_tokens() == {n: d * SEQ for n, d in zip(loader.sources, loader.drawn)}
    # within a source, each epoch serves every one of its samples once
    epochs = 0
    for s in range(3):
        mine = [r for r, o in zip(rows, owners) if o == s]
        n = loader.source_samples[s]
        assert n == sum(windows[s].values())
        for e in range(len(mine) // n):
            assert Counter(mine[e * n:(e + 1) * n]) == windows[s]
            epochs += 1
    assert epochs >= 2
    # another seed, another draw; weights from the manifest when none are given
    other = TrainBatches(mixture, SEQ, EXTRA, 8, seed=4)
    assert not torch.equal(next(other), batches[0]) and other.weights.tolist() == pytest.approx([0.5, 0.3, 0.2])


def test_mixture_resumes_exactly_with_another_layout(mixture):
    weights = {"jsonl_zst": 1, "parquet": 1, "files": 6}
    full = TrainBatches(mixture, SEQ, EXTRA, 6, seed=9, weights=weights)
    expected = torch.cat([next(full) for _ in range(40)])
    first = TrainBatches(mixture, SEQ, EXTRA, 6, seed=9, weights=weights)
    served = torch.cat([next(first) for _ in range(25)])
    state = json.loads(json.dumps(first.state_dict()))
    assert sum(state["drawn"]) == state["position"] == 150
    # resumed as two data-parallel ranks of 3: their union is the single-rank stream
    ranks = [TrainBatches(mixture, SEQ, EXTRA, 3, seed=9, dp_rank=r, dp_size=2, weights=weights) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    resumed = torch.cat([torch.cat([next(r) for r in ranks]) for _ in range(15)])
    assert torch.equal(torch.cat([served, resumed]), expected)
    assert ranks[0].drawn == ranks[1].drawn == full.drawn

    with pytest.raises(DataError, match="sources .* resume with the data dir and data.sources of the saved run"):
        TrainBatches(mixture, SEQ, EXTRA, 6, seed=9, weights=weights).load_state_dict(
            {**state, "drawn": state["drawn"][:2]})
    with pytest.raises(DataError, match="prepared from the sources .* run `dsmtp prepare"):
        TrainBatches(mixture, SEQ, EXTRA, 6, seed=9, weights={"jsonl_zst": 1, "web": 1, "files": 1})


def test_a_source_too_small_for_one_sample_is_named(mixture):
    with pytest.raises(DataError, match="train split of source .* fewer than one sample .* lower train.seq_len"):
        TrainBatches(mixture, 10**6, EXTRA, 2, seed=0)
    zero = TrainBatches(mixture, SEQ, EXTRA, 4, seed=0, weights={"jsonl_zst": 1, "parquet": 0, "files": 1})
    for _ in range(50):
        next(zero)
    assert zero.drawn[1] == 0 and sum(zero.drawn) == 200


# ----------------------------------------------------------------------------------------------
# Brought tokenizers


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json built with the `tokenizers` library, saved as transformers saves one."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts(), trainer)
    root = tmp_path_factory.mktemp("hf_tok")
    backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<|endoftext|>"}))
    return root


@pytest.fixture(scope="module")
def sentencepiece_json_dir(mixture, tmp_path_factory) -> Path:
    """A sentencepiece-style tokenizer.json (Metaspace, byte fallback): our trained model as transformers'
    converter rebuilds it, with the tokenizer_config.json naming </s> as eos_token."""
    from dsmtp.convert.hf_tokenizer import write_hf_tokenizer

    root = tmp_path_factory.mktemp("spm_json")
    write_hf_tokenizer(mixture / "tokenizer.model", root, 4096)
    (root / "tokenizer.model").unlink()  # so that only the tokenizer.json is brought
    return root


@pytest.mark.parametrize("kind", ["byte_level_bpe", "sentencepiece_json"])
def test_hf_tokenizer_json_encodes_as_transformers_autotokenizer(kind, request):
    from transformers import AutoTokenizer

    root = request.getfixturevalue("hf_tokenizer_dir" if kind == "byte_level_bpe" else "sentencepiece_json_dir")
    ours = Tokenizer.load(root)
    theirs = AutoTokenizer.from_pretrained(str(root))
    assert isinstance(ours, HFTokenizer) and ours.eos_id == theirs.eos_token_id
    assert ours.eos_id == (0 if kind == "byte_level_bpe" else 2) and ours.vocab_size == len(theirs)
    samples = texts() + [(STDLIB / "statistics.py").read_text(), "<|endoftext|> in text", "a\u00a0b\x00c"]
    table = ours.token_bytes()
    for text in samples:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids)
        # Metaspace decodes a literal U+2581 as a space (dsmtp's own sentencepiece path keeps it)
        lossy = kind == "sentencepiece_json" and "\u2581" in text
        assert (ours.decode(ids) == text) != lossy
    for text in samples[:5]:
        assert b"".join(table[i] for i in ours.encode(text)) == text.encode()


def test_prepare_with_hf_tokenizer_and_train_and_serve_with_it(hf_tokenizer_dir, tmp_path):
    from dsmtp.serve.loading import load
    from dsmtp.checkpoint import save_weights

    docs = texts()
    src = write_source("jsonl", docs, tmp_path / "src")
    cfg = data_config(tmp_path / "d", [src], tokenizer=str(hf_tokenizer_dir / "tokenizer.json"))
    vocab = Tokenizer.load(hf_tokenizer_dir).vocab_size
    with pytest.raises(DataError, match=rf"data.tokenizer=.*tokenizer.json has {vocab} token ids but "
                                        rf"model.vocab_size is 512: set model.vocab_size={vocab}"):
        prepare(cfg, 512)
    out = prepare(cfg, vocab)
    assert decoded_documents(out) == Counter(docs)  # byte-level BPE is lossless
    manifest = load_manifest(out)
    assert manifest["tokenizer"]["file"] == "tokenizer.json" and not manifest["tokenizer"]["trained"]
    assert (out / "tokenizer_config.json").is_file() and manifest["sources"][0]["round_trip"]["differ"] == 0

    # a checkpoint carries both files; generation loads the same tokenizer from it
    from tests.train_helpers import TINY_MODEL
    full = config_from_dict({"model": {**TINY_MODEL, "vocab_size": vocab}, "data": {"data_dir": str(out)},
                             "train": {"seq_len": 16, "out_dir": str(tmp_path / "run")}})
    from dsmtp.model import DeepSeekV3
    from dsmtp.parallel.topology import ensure_initialized
    ensure_initialized()
    model = DeepSeekV3(full.model)
    ckpt = save_weights(tmp_path / "run", full, model.state_dict(), out / "tokenizer.json")
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
    _, _, tok = load(ckpt)
    assert isinstance(tok, HFTokenizer) and tok.sha256 == manifest["tokenizer"]["sha256"] and tok.eos_id == 0
    # the HF export carries it: AutoTokenizer there gives our ids and our end-of-document token
    from transformers import AutoTokenizer
    from dsmtp.convert.export_hf import export
    exported = AutoTokenizer.from_pretrained(str(export(ckpt, tmp_path / "hf", dtype="fp32")))
    assert exported.eos_token_id == 0 and all(exported.encode(d, add_special_tokens=False) == tok.encode(d) for d in docs)


def test_brought_sentencepiece_model_and_lossy_tokenizer_note(tmp_path, capsys):
    docs = texts()
    first = prepare(data_config(tmp_path / "d1", [write_source("jsonl", docs, tmp_path / "s1")]), VOCAB)
    brought = tmp_path / "mine.model"
    shutil.copyfile(first / "tokenizer.model", brought)
    out = prepare(data_config(tmp_path / "d2", [write_source("parquet", docs, tmp_path / "s2")],
                              tokenizer=str(brought)), VOCAB)
    manifest = load_manifest(out)
    assert manifest["tokenizer"]["sha256"] == Tokenizer.load(first).sha256 and not manifest["tokenizer"]["trained"]
    assert decoded_documents(out) == Counter(docs)
    # a tokenizer that normalizes text is noted (here: NFKC folds U+00A0 to a space)
    from tokenizers import Tokenizer as Backend, models, normalizers, pre_tokenizers, trainers
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    backend.save(str(tmp_path / "lossy.json"))
    vocab = Backend.from_file(str(tmp_path / "lossy.json")).get_vocab_size()
    capsys.readouterr()
    prepare(data_config(tmp_path / "d3", [SourceConfig(kind="jsonl", path=str(tmp_path / "s1/part.jsonl"))],
                        tokenizer=str(tmp_path / "lossy.json")), vocab)
    assert "does not give back the text of" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Bad input: refused naming the source, the file and line, and the fix; nothing left behind


def jsonl_with(tmp_path: Path, bad_line: str, at: int = 12) -> Path:
    lines = [json.dumps({"text": t}) for t in texts()]
    lines.insert(at - 1, bad_line)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unterminated', r"data.sources\[0\] \(bad\): .*bad.jsonl:12: not a JSON object .* fix or remove that line"),
    ('{"body": "x"}', r"data.sources\[0\] \(bad\): .*bad.jsonl:12: no 'text' key \(the record has \['body'\]\): set "
                      r"text_field"),
    ('{"text": null}', r"bad.jsonl:12: 'text' is null, not text"),
    ('[1, 2]', r"bad.jsonl:12: a JSON list, not an object"),
])
@pytest.mark.parametrize("tokenizer", ["train", "brought"])
def test_bad_jsonl_line_is_refused_with_source_line_and_fix(tmp_path, bad_line, message, tokenizer, mixture):
    path = jsonl_with(tmp_path, bad_line)
    tok = "train" if tokenizer == "train" else str(mixture / "tokenizer.model")
    with pytest.raises(DataError, match=message):
        prepare(data_config(tmp_path / "d", [SourceConfig(kind="jsonl", path=str(path))], tokenizer=tok), VOCAB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no data dir, no temporary build


def test_bad_parquet_hf_disk_and_compressed_inputs_are_refused(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a", "b"], "n": [1, 2]}), tmp_path / "p.parquet")
    src = SourceConfig(kind="parquet", path=str(tmp_path / "p.parquet"), name="web")
    with pytest.raises(DataError, match=r"data.sources\[0\] \(web\): .*p.parquet has no column 'text' \(its columns: "
                                        r"\['body', 'n'\]\): set data.sources\[0\].text_field"):
        prepare(data_config(tmp_path / "d", [src]), VOCAB)
    src.text_field = "n"
    with pytest.raises(DataError, match="column 'n' holds int64, not text"):
        prepare(data_config(tmp_path / "d", [src]), VOCAB)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="x.parquet is not a Parquet file"):
        prepare(data_config(tmp_path / "d", [SourceConfig(kind="parquet", path=str(tmp_path / "x.parquet"))]), VOCAB)

    import datasets
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"is a DatasetDict with splits \['test', 'train'\]: point the path at one"):
        prepare(data_config(tmp_path / "d", [SourceConfig(kind="hf_disk", path=str(tmp_path / "dd"))]), VOCAB)
    with pytest.raises(DataError, match="not a directory written by datasets' save_to_disk"):
        prepare(data_config(tmp_path / "d", [SourceConfig(kind="hf_disk", path=str(tmp_path))]), VOCAB)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"kind hf_disk, which reads with the datasets package, not installed here: "
                                        r"pip install 'dsmtp\[datasets\]'"):
        prepare(data_config(tmp_path / "d", [SourceConfig(kind="hf_disk", path=str(tmp_path / "dd/train"))]), VOCAB)

    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts()).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: cannot decompress past line \d+ .* damaged or truncated"):
        prepare(data_config(tmp_path / "d", [SourceConfig(kind="jsonl", path=str(tmp_path / "cut.jsonl.gz"))]), VOCAB)
    with pytest.raises(DataError, match=r"data.sources\[0\].path=.*nope does not exist"):
        prepare(data_config(tmp_path / "d", [SourceConfig(kind="jsonl", path=str(tmp_path / "nope"))]), VOCAB)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*"))


def test_bad_tokenizers_are_refused(tmp_path, hf_tokenizer_dir):
    src = write_source("jsonl", texts(), tmp_path / "src")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model is not a sentencepiece model"):
        prepare(data_config(tmp_path / "d", [src], tokenizer=str(tmp_path / "junk.model")), VOCAB)
    with pytest.raises(DataError, match="data.tokenizer=.*missing: no tokenizer.model or tokenizer.json there"):
        prepare(data_config(tmp_path / "d", [src], tokenizer=str(tmp_path / "missing")), VOCAB)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text((hf_tokenizer_dir / "tokenizer.json").read_text().replace("endoftext", "sep"))
    with pytest.raises(DataError, match=r"no end-of-document token .* put a tokenizer_config.json with "
                                        r"\{\"eos_token\": \"...\"\} beside it"):
        prepare(data_config(tmp_path / "d", [src], tokenizer=str(bare)), VOCAB)
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|sep|>"}))
    assert Tokenizer.load(bare).eos_id == 0


@pytest.mark.parametrize("data, message", [
    ({"sources": [{"kind": "csv", "path": "x"}]},
     r"data.sources\[0\].kind='csv' is not a source kind: choose files, jsonl, parquet, hf_disk"),
    ({"sources": [{"kind": "jsonl"}]}, r"data.sources\[0\].path is missing: a jsonl source needs the path"),
    ({"sources": [{"kind": "jsonl", "path": "a/x.jsonl"}, {"kind": "parquet", "path": "b/x"}]},
     r"data.sources\[0\] and data.sources\[1\] are both named 'x': give one a different data.sources\[i\].name"),
    ({"sources": [{"kind": "jsonl", "path": "x", "weight": -1}]}, r"data.sources\[0\].weight=-1.0 must be >= 0"),
    ({"sources": [{"kind": "jsonl", "path": "x", "weight": 0}]}, "weights are all 0"),
    ({"sources": [{"kind": "jsonl", "path": "x"}], "source_dir": "/tmp"}, "data.source_dir=/tmp and data.sources are both"),
    ({"sources": [{"kind": "jsonl", "path": "x", "colour": 1}]}, r"unknown config key data.sources\[0\].colour"),
])
def test_bad_source_config_is_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": data})


def test_cli_names_a_bad_line_in_one_line(tmp_path):
    path = jsonl_with(tmp_path, "{oops", at=3)
    proc = subprocess.run(
        [sys.executable, "-m", "dsmtp.cli", "prepare", "--config", str(REPO / "configs/tiny.yaml"),
         "--set", f"data.data_dir={tmp_path / 'd'}", "--set", f"data.sources=[{{kind: jsonl, path: '{path}'}}]"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "error" in x]
    assert "bad.jsonl:3: not a JSON object" in line and "fix or remove that line" in line


# ----------------------------------------------------------------------------------------------
# Today's single tree and data dirs


def test_single_tree_fields_are_one_files_source(tmp_path):
    cfg = config_from_dict({"data": {"source_dir": str(STDLIB), "include": ["json/*.py"]}}).data
    (src,) = cfg.corpus
    assert (src.kind, src.path, src.include, src.exclude, src.weight) == ("files", str(STDLIB), ["json/*.py"],
                                                                         cfg.exclude, 1.0)
    assert config_from_dict({}).data.corpus[0].label == "stdlib"


def test_single_tree_tokenizer_is_trained_on_the_same_sample_as_before(tmp_path):
    """Before data.sources, the sample was the train files in split-key order until the budget was
    reached; the same files (so the same tokenizer, the same shards) come out of the streaming sample."""
    from dsmtp.data.corpus import scan, split_files
    from dsmtp.data.tokenizer import train_tokenizer

    tree = tmp_path / "tree"
    for name in MODULES + MORE_MODULES["b"]:
        (tree / f"{name}.py").parent.mkdir(exist_ok=True)
        shutil.copyfile(STDLIB / f"{name}.py", tree / f"{name}.py")
    cfg = DataConfig(source_dir=str(tree), include=["*.py"], data_dir=str(tmp_path / "d"), val_fraction=0.15,
                     num_workers=1, tokenizer_sample_bytes=150_000)
    out = prepare(cfg, VOCAB)
    train = split_files(scan(tree, ["*.py"], []), 0.15)["train"]
    sample, total = [], 0
    for f in sorted(train, key=lambda f: f.split_key):
        if total >= 150_000:
            break
        sample.append(f.path.read_text())
        total += f.size
    assert 2 < len(sample) < len(train)
    assert train_tokenizer(sample, VOCAB, tmp_path / "ref.model").sha256 == Tokenizer.load(out).sha256


def test_loader_state_from_before_mixtures_resumes(mixture, tmp_path):
    one = prepare(data_config(tmp_path / "d", [write_source("jsonl", texts(), tmp_path / "s")]), VOCAB)
    full = TrainBatches(one, SEQ, EXTRA, 4, seed=2)
    expected = [next(full) for _ in range(12)]
    old_state = {"position": 20, "seed": 2, "seq_len": SEQ, "sample_len": SEQ + EXTRA + 1,
                 "num_samples": full.num_samples}  # what dsmtp saved before data.sources
    resumed = TrainBatches(one, SEQ, EXTRA, 4, seed=2, weights={"jsonl": 7.0})
    resumed.load_state_dict(old_state)
    assert all(torch.equal(next(resumed), want) for want in expected[5:])
    with pytest.raises(DataError, match="loader state has the sources"):
        TrainBatches(mixture, SEQ, EXTRA, 4, seed=2).load_state_dict(
            {**old_state, "num_samples": TrainBatches(mixture, SEQ, EXTRA, 4, seed=2).num_samples})


def test_training_logs_the_tokens_each_source_served(mixture, tmp_path):
    from dsmtp.train import trackers
    from dsmtp.train.trainer import Trainer
    from tests.train_helpers import TINY_MODEL, TINY_TRAIN

    srcs = load_manifest(mixture)["config"]["sources"]
    cfg = config_from_dict({"model": {**TINY_MODEL, "vocab_size": VOCAB},
                            "data": {"data_dir": str(mixture), "sources": srcs},
                            "train": {**TINY_TRAIN, "steps": 4, "eval_interval": 100, "save_interval": 100,
                                      "out_dir": str(tmp_path / "run")}})
    trainer = Trainer(cfg)
    trainer.run()
    records = [r for r in trainer.log.records() if r["kind"] == "train"]
    assert len(records) == 4 and records[-1]["source_tokens"] == trainer.data.train.source_tokens()
    for r in records:
        assert sorted(r["source_tokens"]) == ["files", "jsonl_zst", "parquet"]
        assert sum(r["source_tokens"].values()) == r["tokens"]  # every main-loss token, from one source each
    assert trackers.scalars(records[-1])["train/source_tokens/files"] == records[-1]["source_tokens"]["files"]


def test_worker_pool_keeps_few_tasks_in_flight():
    from dsmtp.data.prepare import worker_pool

    pulled = []

    def items():
        for i in range(40):
            pulled.append(i)
            yield -i

    with worker_pool(2) as pmap:
        for consumed, value in enumerate(pmap(abs, items())):
            assert value == consumed and len(pulled) - consumed <= 2 * 2  # read ahead by at most two per worker


def test_data_dir_from_before_sources_trains_as_is_and_is_prepared_again_once(tmp_path, capsys):
    """A schema-2 data dir (one tree, shards without a source): `dsmtp train` reads it unchanged;
    `dsmtp prepare` rebuilds it once, saying why, into the same tokens; then it is up to date."""
    tree = write_source("files", texts(), tmp_path / "tree")
    cfg = DataConfig(source_dir=tree.path, include=["*.txt"], data_dir=str(tmp_path / "d"), val_fraction=0.2,
                     num_workers=1)
    new = prepare(cfg, VOCAB)
    tokens = {p.relative_to(new): p.read_bytes() for p in sorted(new.rglob("*.tokens"))}
    manifest = load_manifest(new)
    manifest["schema_version"], manifest["fingerprint"] = 2, "an older fingerprint"
    del manifest["sources"]
    for split in ("train", "val"):
        for s in manifest["splits"][split]["shards"]:
            del s["source"]
    (new / "manifest.json").write_text(json.dumps(manifest))

    weights = {s.label: s.weight for s in cfg.corpus}  # as the trainer passes them
    old = TrainBatches(new, SEQ, EXTRA, 4, seed=5, weights=weights)
    assert old.sources == [None] and next(old).shape == (4, SEQ + EXTRA + 1)
    capsys.readouterr()
    prepare(cfg, VOCAB)
    assert "prepared by an older dsmtp (data schema 2); preparing it once more as schema 3" in capsys.readouterr().out
    assert load_manifest(new)["schema_version"] == 3
    assert {p.relative_to(new): p.read_bytes() for p in sorted(new.rglob("*.tokens"))} == tokens
    prepare(cfg, VOCAB)
    assert "is up to date" in capsys.readouterr().out
