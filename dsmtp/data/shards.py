"""Token shards on disk: raw little-endian token ids, memory-mapped for reading, plus a document index.

A split (`train/`, `val/`) is a sequence of shards; its token stream is their concatenation, each
document followed by EOS. Per shard:
    NNNNN.tokens     token ids, dtype uint16 when every id fits (vocab <= 65536), else uint32
    NNNNN.docs.npy   int64 offsets into the shard: start of each document, then the shard's end
`manifest.json` (written last) lists every shard with its token count; a data dir is accepted only
when its manifest has the current schema and every shard has exactly the recorded size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from dsmtp.data.errors import DataError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
SHARD_TOKENS = 1 << 28  # start a new shard past this many tokens (512 MiB at uint16)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)  # ids are < vocab_size


class ShardWriter:
    """Appends documents (EOS-terminated) to the shards of one split."""

    def __init__(self, split_dir: Path, dtype: np.dtype, eos_id: int, max_shard_tokens: Optional[int] = None):
        self.split_dir, self.dtype, self.eos_id = split_dir, np.dtype(dtype), eos_id
        self.max_shard_tokens = max_shard_tokens or SHARD_TOKENS
        split_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._file = None

    def add(self, tokens: np.ndarray) -> None:
        if self._file is None or (self._size + len(tokens) + 1 > self.max_shard_tokens and self._size > 0):
            self._finish_shard()
            self._open_shard()
        self._starts.append(self._size)
        np.append(np.asarray(tokens, dtype=self.dtype), self.dtype.type(self.eos_id)).tofile(self._file)
        self._size += len(tokens) + 1

    def close(self) -> list[dict]:
        self._finish_shard()
        return self.shards

    def _open_shard(self) -> None:
        name = f"{len(self.shards):05d}"
        self._name, self._file, self._size, self._starts = name, open(self.split_dir / f"{name}.tokens", "wb"), 0, []

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        np.save(self.split_dir / f"{self._name}.docs.npy", np.array(self._starts + [self._size], dtype=np.int64))
        rel = f"{self.split_dir.name}/{self._name}"
        self.shards.append({"tokens": f"{rel}.tokens", "docs": f"{rel}.docs.npy",
                            "num_tokens": self._size, "num_documents": len(self._starts)})


def load_manifest(data_dir: Union[str, Path]) -> dict:
    """The manifest of a complete, current data dir, or a DataError saying what to run."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_FILE
    rebuild = "run `dsmtp prepare --config CONFIG` to (re)build it"
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared data dir (no {MANIFEST_FILE}): {rebuild}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}): {rebuild}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path} has schema {manifest.get('schema_version')}, this dsmtp reads {SCHEMA_VERSION}: {rebuild}")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            tokens = data_dir / shard["tokens"]
            expected = shard["num_tokens"] * itemsize
            actual = tokens.stat().st_size if tokens.is_file() else None
            if actual != expected or not (data_dir / shard["docs"]).is_file():
                raise DataError(f"{tokens}: expected {expected} bytes, found {actual} (truncated or missing): {rebuild}")
    return manifest


class TokenSplit:
    """Random access to one split's token stream, memory-mapped (nothing is read until asked for)."""

    def __init__(self, data_dir: Union[str, Path], split: str):
        data_dir = Path(data_dir)
        self.manifest = load_manifest(data_dir)
        self.dtype = np.dtype(self.manifest["dtype"])
        shards = self.manifest["splits"][split]["shards"]
        self._paths = [data_dir / s["tokens"] for s in shards]
        self._docs = [data_dir / s["docs"] for s in shards]
        sizes = [s["num_tokens"] for s in shards]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self._starts[-1])
        self.num_documents = sum(s["num_documents"] for s in shards)
        self._maps: dict[int, np.memmap] = {}

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self._paths[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, crossing shard boundaries as needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the split's {self.num_tokens}")
        parts, pos, end = [], start, start + length
        while pos < end:
            i = int(np.searchsorted(self._starts, pos, side="right")) - 1
            stop = min(end, int(self._starts[i + 1]))
            parts.append(self._shard(i)[pos - self._starts[i]: stop - self._starts[i]])
            pos = stop
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def document_starts(self) -> np.ndarray:
        """Offset in the stream of every document's first token."""
        return np.concatenate([np.load(p)[:-1] + self._starts[i] for i, p in enumerate(self._docs)])
