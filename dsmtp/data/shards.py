"""Token shards on disk: raw little-endian token ids, memory-mapped for reading, with checksums.

A split (`train/`, `val/`) is a sequence of shards; its token stream is their concatenation, each
document followed by EOS. Each shard holds documents of one source (data.sources), the sources in
config order, so a source's own stream is the concatenation of its shards. Per shard:
    NNNNN.tokens     token ids, dtype uint16 when every id fits (vocab <= 65536), else uint32
`manifest.json` (written last) lists every shard with its token and document counts and a checksum of
each block of BLOCK_TOKENS tokens. A data dir is accepted when its manifest has a schema this dsmtp reads
and every shard has exactly the recorded size. Opening a split verifies one block of each shard, chosen
at random (its checksum, and its ids inside the vocabulary); every read checks the ids it returns. So
damage is reported naming the shard and offset, not met as an index error inside the model, and
`dsmtp prepare` (which verifies every block before it calls a data dir up to date) repairs it.

Schema 1 (written before the checksums) still loads, its blocks checked for ids only; the document index
it wrote beside each shard (NNNNN.docs.npy, never read) is ignored. Schemas 1 and 2 (before data.sources)
hold one source. `dsmtp prepare` rewrites either as schema 3.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from dsmtp.data.errors import DataError

SCHEMA_VERSION = 3  # 2: block checksums, no document index; 3: sources, each shard of one
READABLE_SCHEMAS = (1, 2, 3)
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
SHARD_TOKENS = 1 << 28  # start a new shard past this many tokens (512 MiB at uint16)
BLOCK_TOKENS = 1 << 20  # one checksum per this many tokens (2 MiB at uint16)
REBUILD = "run `dsmtp prepare --config CONFIG` to (re)build it"


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
        self._source: Optional[str] = None

    def start_source(self, name: str) -> None:
        """The documents added from now on are `name`'s: they start a new shard."""
        self._finish_shard()
        self._source = name

    def add(self, tokens: np.ndarray) -> None:
        if self._file is None or (self._size + len(tokens) + 1 > self.max_shard_tokens and self._size > 0):
            self._finish_shard()
            self._open_shard()
        np.append(np.asarray(tokens, dtype=self.dtype), self.dtype.type(self.eos_id)).tofile(self._file)
        self._size += len(tokens) + 1
        self._documents += 1

    def close(self) -> list[dict]:
        self._finish_shard()
        return self.shards

    def _open_shard(self) -> None:
        name = f"{len(self.shards):05d}"
        self._name, self._file = name, open(self.split_dir / f"{name}.tokens", "wb")
        self._size = self._documents = 0

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        path = self.split_dir / f"{self._name}.tokens"
        self.shards.append({"tokens": f"{self.split_dir.name}/{path.name}", "num_tokens": self._size,
                            "num_documents": self._documents, "source": self._source,
                            "checksums": {"block_tokens": BLOCK_TOKENS, "blocks": block_checksums(path, self.dtype)}})


def _checksum(tokens: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(tokens).data, digest_size=8).hexdigest()


def block_checksums(path: Path, dtype: np.dtype) -> list[str]:
    """A checksum of each BLOCK_TOKENS tokens of a shard file."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    return [_checksum(tokens[i:i + BLOCK_TOKENS]) for i in range(0, len(tokens), BLOCK_TOKENS)]


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: Path, offset: int) -> None:
    """Refuse ids outside the vocabulary (`tokens` start at `offset` in the shard `path`)."""
    if tokens.size and tokens.max() >= vocab_size:
        i = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {tokens[i]} at offset {offset + i} is outside the vocabulary "
                        f"(vocab_size {vocab_size}): the shard is damaged or was written for another tokenizer; "
                        f"{REBUILD}")


def load_manifest(data_dir: Union[str, Path]) -> dict:
    """The manifest of a complete data dir of a schema this dsmtp reads, or a DataError saying what to run."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared data dir (no {MANIFEST_FILE}): {REBUILD}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}): {REBUILD}") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") not in READABLE_SCHEMAS:
        schema = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise DataError(f"{path} has schema {schema}, this dsmtp reads {list(READABLE_SCHEMAS)}: {REBUILD}")
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        int(manifest["tokenizer"]["vocab_size"])
        shards = [(data_dir / s["tokens"], s["num_tokens"])
                  for split in SPLITS for s in manifest["splits"][split]["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is malformed ({type(e).__name__}: {e}): {REBUILD}") from None
    for tokens, num_tokens in shards:
        expected = num_tokens * itemsize
        actual = tokens.stat().st_size if tokens.is_file() else None
        if actual != expected:
            raise DataError(f"{tokens}: expected {expected} bytes, found {actual} (truncated or missing): {REBUILD}")
    return manifest


def verify_split(data_dir: Union[str, Path], manifest: dict, split: str, every_block: bool = False) -> None:
    """Check one random block of each shard of `split` (or every block): its checksum, where the manifest
    has them, and that its ids are inside the vocabulary. Raises DataError naming the shard and offset."""
    data_dir, rng = Path(data_dir), np.random.default_rng()
    dtype, vocab_size = np.dtype(manifest["dtype"]), manifest["tokenizer"]["vocab_size"]
    for shard in manifest["splits"][split]["shards"]:
        if not shard["num_tokens"]:
            continue
        path = data_dir / shard["tokens"]
        tokens = np.memmap(path, dtype=dtype, mode="r")
        checksums = shard.get("checksums")
        block = checksums["block_tokens"] if checksums else BLOCK_TOKENS
        count = -(-len(tokens) // block)
        if checksums and len(checksums["blocks"]) != count:
            raise DataError(f"the manifest lists {len(checksums['blocks'])} checksums for the {count} blocks of "
                            f"{path}: {REBUILD}")
        for b in range(count) if every_block else [int(rng.integers(count))]:
            start = b * block
            part = tokens[start:start + block]
            if checksums and _checksum(part) != checksums["blocks"][b]:
                raise DataError(
                    f"{path}: tokens {start}..{start + len(part) - 1} do not match their checksum in the manifest: "
                    f"the shard changed after `dsmtp prepare` wrote it (disk damage or an overwrite); {REBUILD}")
            check_token_ids(part, vocab_size, path, start)


class TokenStream:
    """Random access to the concatenated tokens of some shards, memory-mapped (nothing is read until
    asked for); every read checks its ids against the vocabulary."""

    def __init__(self, paths: list[Path], sizes: list[int], dtype: np.dtype, vocab_size: int):
        self._paths, self.dtype, self.vocab_size = paths, dtype, vocab_size
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self._starts[-1])
        self._maps: dict[int, np.memmap] = {}

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self._paths[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, crossing shard boundaries as needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the stream's {self.num_tokens}")
        parts, pos, end = [], start, start + length
        while pos < end:
            i = int(np.searchsorted(self._starts, pos, side="right")) - 1
            stop = min(end, int(self._starts[i + 1]))
            offset = pos - int(self._starts[i])
            parts.append(np.array(self._shard(i)[offset: offset + stop - pos]))
            check_token_ids(parts[-1], self.vocab_size, self._paths[i], offset)
            pos = stop
        return np.concatenate(parts) if len(parts) != 1 else parts[0]


class TokenSplit(TokenStream):
    """One split's token stream (all sources), and each source's own (`sources`, `source`)."""

    def __init__(self, data_dir: Union[str, Path], split: str):
        data_dir = Path(data_dir)
        self.manifest = load_manifest(data_dir)
        verify_split(data_dir, self.manifest, split)
        dtype = np.dtype(self.manifest["dtype"])
        shards = self.manifest["splits"][split]["shards"]
        super().__init__([data_dir / s["tokens"] for s in shards], [s["num_tokens"] for s in shards], dtype,
                         self.manifest["tokenizer"]["vocab_size"])
        self.num_documents = sum(s["num_documents"] for s in shards)
        self._shards = shards
        # the sources in manifest order; a data dir from before data.sources has one, named None
        self.sources: list[Optional[str]] = [s["name"] for s in self.manifest.get("sources", [{"name": None}])]

    def source(self, name: Optional[str]) -> TokenStream:
        """The stream of one source's documents in this split (empty when it has none here)."""
        mine = [(path, s["num_tokens"]) for path, s in zip(self._paths, self._shards) if s.get("source") == name]
        return TokenStream([p for p, _ in mine], [n for _, n in mine], self.dtype, self.vocab_size)
