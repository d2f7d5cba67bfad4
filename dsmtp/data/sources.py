"""The sources of a corpus (data.sources): what their input files are, and their documents, streamed.

Kinds:
    files     a tree of files, each file one document (include/exclude globs; dsmtp.data.corpus)
    jsonl     JSON Lines, one object per line with the text under `text_field`; plain, .gz or .zst
    parquet   Parquet files, the text in the `text_field` column, read one record batch at a time
    hf_disk   a directory written by HuggingFace `datasets`' `Dataset.save_to_disk` (needs `datasets`)
A jsonl or parquet path is one file or a directory searched with the source's include globs.

The main process reads a source as a stream of `Batch`es (raw lines, or texts of a few thousand rows)
and worker processes turn each batch into documents (`documents`): JSON parsing, the checks, the split.
So a corpus is never held in memory, and a bad record is refused naming the source, file and line.

A record's split is fixed by a hash of its text (`text_key`), so exact duplicates share a split and
adding a record moves no other; a file's by the hash of its relative path, as before sources existed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from dsmtp.config import SourceConfig
from dsmtp.data.corpus import SourceFile, read_text, resolve_source_dir, scan, split_files
from dsmtp.data.errors import DataError

BATCH_BYTES = 4 << 20  # jsonl: lines per batch, by bytes
BATCH_ROWS = 2048  # parquet, hf_disk: rows per batch
DATASETS_EXTRA = "pip install 'dsmtp[datasets]' (or pip install datasets)"


@dataclass
class Batch:
    """Consecutive documents of one source, for one worker task."""

    source: str  # "data.sources[i] (name)", for messages
    kind: str  # the source's kind
    where: str  # the input file (or dataset directory)
    first: int  # jsonl: the 1-based line number of items[0]; parquet, hf_disk: its row index
    items: list  # jsonl: raw lines (bytes); parquet, hf_disk: texts; files: (path, split)
    progress: int  # units of the source's progress bar this batch completes


@dataclass
class Document:
    text: Optional[str]  # None: skipped, for `skip`
    skip: Optional[str]  # a SKIP_REASON
    split: str  # "train" or "val"
    key: float  # the split key in [0, 1)


def text_key(text: str) -> float:
    """A uniform number in [0, 1) fixed by the text alone."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


class Source:
    """One entry of data.sources, opened: its input files are listed and checked (paths exist, the
    text field is there where a schema says so) before any work starts."""

    def __init__(self, index: int, cfg: SourceConfig, fields: Optional[tuple[str, str]] = None):
        """fields: the config names of the path and include globs, when they are not data.sources[index]'s
        (the single tree of data.source_dir and data.include)."""
        self.index, self.cfg, self.name = index, cfg, cfg.label
        self.path_field, self.include_field = fields or (f"data.sources[{index}].path", f"data.sources[{index}].include")
        self.label = self.path_field if fields else f"data.sources[{index}] ({self.name})"
        self.splits: dict[str, str] = {}  # files: rel path -> split, once `assign_files` has run
        self.inputs = self._list_inputs()

    # ------------------------------------------------------------------------------------------
    # Listing

    def _list_inputs(self) -> list[SourceFile]:
        cfg = self.cfg
        if cfg.kind == "files":
            root = resolve_source_dir(cfg.path, self.path_field)
            self.root = root
            return scan(root, *cfg.globs, self.path_field, self.include_field)
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f"{self.path_field}={path} does not exist: give the {cfg.kind} file or directory of "
                            f"{self.label}")
        self.root = path.resolve()
        if cfg.kind == "hf_disk":
            return self._list_hf_disk()
        if path.is_file():
            st = path.stat()
            files = [SourceFile(path.name, self.root, st.st_size, st.st_mtime_ns)]
        else:
            files = scan(self.root, *cfg.globs, self.path_field, self.include_field)
        if cfg.kind == "parquet":
            for f in files:
                self._check_parquet(f.path)
        return files

    def _list_hf_disk(self) -> list[SourceFile]:
        if (self.root / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in self.root.iterdir() if (p / "state.json").is_file())
            raise DataError(f"{self.path_field}={self.root} is a DatasetDict with splits {splits}: point the path at "
                            f"one split's directory (e.g. {self.root / (splits[0] if splits else 'train')})")
        if not (self.root / "state.json").is_file():
            raise DataError(f"{self.path_field}={self.root} is not a directory written by datasets' save_to_disk "
                            "(no state.json): save the dataset with Dataset.save_to_disk, or use kind jsonl/parquet")
        columns = self._hf_dataset().column_names
        if self.cfg.text_field not in columns:
            raise DataError(f"{self.label}: {self.root} has no column {self.cfg.text_field!r} (its columns: "
                            f"{columns}): set data.sources[{self.index}].text_field to the text column")
        return scan(self.root, ["**"], [], self.path_field, f"data.sources[{self.index}].path")

    def _check_parquet(self, path: Path) -> None:
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses, among others
            raise DataError(f"{self.label}: {path} is not a Parquet file ({str(e)[:200]}): remove it, or narrow "
                            f"{self.include_field}") from None
        field = self.cfg.text_field
        if field not in schema.names:
            raise DataError(f"{self.label}: {path} has no column {field!r} (its columns: {schema.names[:20]}): set "
                            f"data.sources[{self.index}].text_field to the text column")
        kind = str(schema.field(field).type)
        if kind not in ("string", "large_string", "string_view"):
            raise DataError(f"{self.label}: {path}: column {field!r} holds {kind}, not text: set "
                            f"data.sources[{self.index}].text_field to a string column")

    def _hf_dataset(self):
        try:
            import datasets
        except ImportError:
            raise DataError(f"{self.label} is kind hf_disk, which reads with the datasets package, not installed "
                            f"here: {DATASETS_EXTRA}") from None
        return datasets.load_from_disk(str(self.root))

    @property
    def progress_total(self) -> tuple[int, str]:
        """(total, unit) of this source's progress bar."""
        if self.cfg.kind == "files":
            return len(self.inputs), "file"
        if self.cfg.kind == "hf_disk":
            return len(self._hf_dataset()), "row"
        return sum(f.size for f in self.inputs), "B"

    # ------------------------------------------------------------------------------------------
    # Files: split by path, before reading (as dsmtp always did)

    def assign_files(self, usable: list[SourceFile], skipped: dict[str, int], val_fraction: float
                     ) -> dict[str, list[SourceFile]]:
        """Split the usable files (both splits get one at least) and remember each file's split."""
        if len(usable) < 2:
            counts = {reason: n for reason, n in skipped.items() if n}
            raise DataError(
                f"{len(usable)} of the {len(self.inputs)} files matched under {self.root} are usable text (skipped: "
                f"{counts}): a train and a val split need 2; point {self.path_field}/{self.include_field} at UTF-8 "
                "text files")
        splits = split_files(usable, val_fraction)
        self.splits = {f.rel: split for split, files in splits.items() for f in files}
        return splits

    # ------------------------------------------------------------------------------------------
    # Reading, in the main process

    def batches(self) -> Iterator[Batch]:
        kind = self.cfg.kind
        if kind == "files":
            files = [f for f in self.inputs if f.rel in self.splits]
            for i in range(0, len(files), 16):
                part = files[i:i + 16]
                yield Batch(self.label, kind, str(self.root), i, [(f.path, self.splits[f.rel]) for f in part], len(part))
        elif kind == "jsonl":
            for f in self.inputs:
                yield from self._jsonl_batches(f.path)
        elif kind == "parquet":
            for f in self.inputs:
                yield from self._parquet_batches(f.path)
        else:
            yield from self._hf_disk_batches()

    def _jsonl_batches(self, path: Path) -> Iterator[Batch]:
        raw = open(path, "rb")
        with raw, _decompressed(raw, path, self.label) as lines:
            line_no, done = 1, 0
            while True:
                try:
                    batch = lines.readlines(BATCH_BYTES)
                except (OSError, EOFError, ValueError) as e:  # gzip/zstd: a truncated or damaged stream
                    raise DataError(f"{self.label}: {path}: cannot decompress past line {line_no} ({e}): "
                                    "the file is damaged or truncated; fetch or compress it again") from None
                if not batch:
                    break
                position = raw.tell()
                yield Batch(self.label, "jsonl", str(path), line_no, batch, position - done)
                line_no, done = line_no + len(batch), position

    def _parquet_batches(self, path: Path) -> Iterator[Batch]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        row, size = 0, path.stat().st_size
        rows = max(parquet.metadata.num_rows, 1)
        for record_batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[self.cfg.text_field]):
            texts = record_batch.column(0).to_pylist()
            done = size * (row + len(texts)) // rows - size * row // rows
            yield Batch(self.label, "parquet", str(path), row, texts, done)
            row += len(texts)

    def _hf_disk_batches(self) -> Iterator[Batch]:
        dataset = self._hf_dataset().select_columns([self.cfg.text_field])
        for start in range(0, len(dataset), BATCH_ROWS):
            texts = dataset[start:start + BATCH_ROWS][self.cfg.text_field]
            yield Batch(self.label, "hf_disk", str(self.root), start, texts, len(texts))


def _decompressed(raw: io.BufferedReader, path: Path, label: str):
    """A binary line reader over `raw`, through gzip or zstandard by the file's suffix."""
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if path.suffix == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return io.BufferedReader(_Unclosing(raw))


class _Unclosing(io.RawIOBase):
    """A view of a file that leaves it open when the view is closed (the caller closes it)."""

    def __init__(self, f):
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.f.readinto(buffer)


# ----------------------------------------------------------------------------------------------
# Documents of a batch, in a worker process


def documents(batch: Batch, text_field: str, val_fraction: float) -> Iterator[Document]:
    if batch.kind == "files":
        for path, split in batch.items:
            text, reason = read_text(path)
            yield Document(text, reason, split, 0.0)
        return
    for i, item in enumerate(batch.items):
        if batch.kind == "jsonl":
            if not item.strip():  # a blank line
                continue
            where = f"{batch.where}:{batch.first + i}"
            text = _record_text(item, text_field, where, batch.source)
        else:
            where, text = f"{batch.where}: row {batch.first + i}", item
        if not isinstance(text, str):
            raise DataError(f"{batch.source}: {where}: {text_field!r} is {_type_name(text)}, not text: fix the "
                            "record, or set text_field to the field that holds the text")
        try:
            key = text_key(text)
        except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape: not text
            yield Document(None, "not_utf8", "train", 0.0)
            continue
        if not text.strip():
            yield Document(None, "empty", "train", key)
            continue
        yield Document(text, None, "val" if key < val_fraction else "train", key)


def _record_text(line: bytes, text_field: str, where: str, source: str):
    """The `text_field` value of one JSON line."""
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise DataError(f"{source}: {where}: not a JSON object ({e}): fix or remove that line") from None
    if not isinstance(record, dict):
        raise DataError(f"{source}: {where}: a JSON {_type_name(record)}, not an object with a {text_field!r} key: "
                        "fix or remove that line")
    if text_field not in record:
        raise DataError(f"{source}: {where}: no {text_field!r} key (the record has {sorted(record)[:10]}): set "
                        "text_field to the key that holds the text")
    return record[text_field]


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__
