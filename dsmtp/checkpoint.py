"""Checkpoints: the one module that knows their layout, writes them atomically, checks their integrity
and reads them, for every entry point (training and resuming in any layout, generate, serve, export-hf,
import-hf).

    <out_dir>/checkpoints/step_00000200/
        manifest.json        format, step, tokens, and the sha256 of every file below but the shards
        config.yaml          the full Config
        tokenizer.model      the sentencepiece model the run trained with (when there is one), or
                             tokenizer.json and its tokenizer_config.json for a HuggingFace tokenizer
        trainer_state.pt     step, tokens, data-loader position, RNG states, skip counters (training only)
        index.json           every tensor: dtype, full shape and its chunks, each with where it sits in the
                             full tensor (offsets, sizes), the shard file and byte range holding it, and the
                             sha256 of each block of its rows; per shard file: size and header sha256
        shards/rank00003.safetensors   the chunks rank 3 wrote (a valid safetensors file)
    <out_dir>/checkpoints/latest       names the newest complete step directory; written last

Tensor names: model/<parameter or buffer name> (our single-process names, whatever the model defines),
optim/<parameter name>/<state> for optimizer state shaped like its parameter (Adam's moments), and
optim/<state> for scalar state (Adam's step count, one for all parameters).

Saving is torch.distributed.checkpoint (DCP) with a storage layer of our own. Each rank describes the
chunks it holds in full-tensor coordinates (`Chunk`: a TP slice, an EP rank's experts, a ZeRO fragment);
DCP gathers these plans; the coordinator (rank 0) gives each chunk held by several ranks one writer (the
one with the fewest bytes so far) and checks that the chunks tile every tensor; then every rank writes its
own shard file in parallel, hashing each block of rows as it writes, and flushes it to disk. Only when
every rank has reported its file durable does the coordinator write index.json, the small files and the
manifest into the temporary directory, rename it into place, and move `latest`. A kill at any moment
leaves `latest` naming a complete checkpoint, and temporaries (`.tmp-*`) that the next start removes.

Loading reads only what each rank needs: DCP maps each chunk a rank holds in its (possibly different)
layout to the overlapping saved chunks, and only the blocks of rows covering it are read, each checked
against its sha256 as it is read. One process (generate, serve, export-hf) reads one tensor, or one
expert's row of a stacked tensor, at a time the same way. Nothing is unpickled: shards are safetensors,
the index and manifest JSON, trainer_state.pt is read with torch.load(weights_only=True).

Why not DCP's own FileSystemWriter/Reader: its metadata file is a pickle (we load checkpoints only
through safetensors or weights_only loads), it records no checksums, and its per-tensor torch.save
records cannot be read row by row. Its planning, resharding and error propagation are what we use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import (ChunkStorageMetadata, LoadPlanner, Metadata, SavePlanner, StorageReader,
                                          StorageWriter, TensorStorageMetadata)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (LoadPlan, ReadItem, SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from dsmtp.config import Config, ConfigError, config_to_dict, load_config
from dsmtp.data.tokenizer import HF_FILE, tokenizer_files
from dsmtp.safetensors_stream import DTYPE_CODES, SafetensorsWriter

if TYPE_CHECKING:  # imported where used: converters read checkpoints without building a model
    from dsmtp.model import DeepSeekV3

FORMAT = "dsmtp-sharded-1"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
INDEX = "index.json"
SHARDS = "shards"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
TRAINER_STATE = "trainer_state.pt"
MODEL = "model/"
OPTIM = "optim/"
TEMPORARY = ".tmp-"  # every temporary file or directory under checkpoints/ starts so; a start removes them
STEP_DIR = re.compile(r"^step_(\d{8})$")
BLOCK_BYTES = 64 << 20  # rows are hashed (and read) in blocks of at most this many bytes (or one row)
DTYPE_FROM_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}
LEGACY_MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the directory or file and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Write one small checkpoint file and flush it to disk (a seam tests use to simulate a crash)."""
    write(path)
    _fsync(path)


def _rename(src: Path, dst: Path) -> None:
    """Move a finished file or directory into place, durably (a seam tests use to simulate a crash)."""
    os.replace(src, dst)
    _fsync(dst.parent)


def _remove(path: Path) -> None:
    """Delete a step directory so that a crash midway leaves only a temporary: rename, then delete."""
    doomed = path.with_name(f"{TEMPORARY}removing-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


# ----------------------------------------------------------------------------------------------
# What a process holds: chunks of full tensors


@dataclass
class Chunk:
    """A process's part of one tensor: `tensor` sits at `offsets` in a full tensor of shape `shape`.
    Saving reads it; loading copies into it, so it is the process's own storage (or a view of it)."""

    tensor: torch.Tensor
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


State = dict[str, list[Chunk]]  # tensor name -> the chunks of it this process holds (often one, maybe none)


def whole(tensor: torch.Tensor) -> Chunk:
    return Chunk(tensor, (0,) * tensor.dim(), tuple(tensor.shape))


def flat_range_boxes(shape: tuple[int, ...], begin: int,
                     end: int) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """The boxes that the flat range [begin, end) of a row-major tensor of `shape` covers, in order, each as
    (flat index where it starts, offsets, sizes): a partial first row, whole rows, a partial last row, the
    partial rows split the same way one dimension down. Each box is contiguous in the flat order."""
    if begin >= end:
        return []
    if len(shape) <= 1:
        return [(begin, (begin,) if shape else (), (end - begin,) if shape else ())]
    inner = math.prod(shape[1:])
    boxes = []
    row, col = divmod(begin, inner)
    if col:  # a partial first row
        stop = min(end, (row + 1) * inner)
        boxes += [(row * inner + at, (row, *o), (1, *s))
                  for at, o, s in flat_range_boxes(shape[1:], col, stop - row * inner)]
        begin, row = stop, row + 1
    rows = (end - begin) // inner if begin < end else 0
    if rows:
        boxes.append((begin, (row,) + (0,) * (len(shape) - 1), (rows, *shape[1:])))
        begin, row = begin + rows * inner, row + rows
    if begin < end:  # a partial last row
        boxes += [(row * inner + at, (row, *o), (1, *s)) for at, o, s in flat_range_boxes(shape[1:], 0, end - begin)]
    return boxes


def module_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 place: Callable[[torch.Tensor, torch.Tensor], Chunk] = lambda tensor, source: whole(tensor),
                 create: bool = False) -> State:
    """model/<name> for every tensor of model.state_dict(), and with an optimizer its state: optim/<name>/<key>
    for state shaped like the parameter, optim/<key> for scalars (Adam's step, the same for every parameter).
    `place(tensor, parameter)` says where a tensor (the parameter, a buffer, or state shaped like the
    parameter) sits in the full tensor; by default it is the full tensor. `create`: first create the
    optimizer's state, so that a load can fill it in place."""
    params = dict(model.named_parameters())
    state = {MODEL + name: [place(t, params.get(name, t))] for name, t in model.state_dict().items()}
    if optimizer is None:
        return state
    if create:
        _create_optimizer_state(optimizer)
    names = {id(p): n for n, p in params.items()}
    for p, values in optimizer.state.items():
        for key, value in values.items():
            if value.dim() == 0:
                state.setdefault(OPTIM + key, []).append(whole(value))
            else:
                state[f"{OPTIM}{names[id(p)]}/{key}"] = [place(value, p)]
    return state


@torch.no_grad()
def _create_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """The state an optimizer's first step creates, made by such a step with zero gradients at learning
    rate 0: AdamW then changes no parameter (decay and update are both scaled by the rate)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads, rates = [p.grad for p in params], [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad


# ----------------------------------------------------------------------------------------------
# Shard files: safetensors laid out from their chunks, every block of rows hashed as it is written


def _shard_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def _chunk_key(name: str, offsets: Sequence[int]) -> str:
    """A chunk's name inside its shard file (readable; index.json is what readers use)."""
    return name if not any(offsets) else f"{name}@{','.join(map(str, offsets))}"


def _rows_per_block(sizes: Sequence[int], itemsize: int) -> int:
    return max(1, BLOCK_BYTES // max(1, itemsize * math.prod(sizes[1:])))


def _row_count(sizes: Sequence[int]) -> int:
    return sizes[0] if sizes else 1  # a 0-d tensor is one row


class _ShardFile:
    """One shard file being written: `chunks` are (name, offsets, sizes, dtype), each written once."""

    def __init__(self, path: Path, chunks: Iterable[tuple[str, tuple[int, ...], tuple[int, ...], torch.dtype]]):
        self.chunks = {(name, tuple(offsets)): (tuple(sizes), dtype) for name, offsets, sizes, dtype in chunks}
        for sizes, dtype in self.chunks.values():
            if dtype not in DTYPE_CODES:
                raise CheckpointError(f"cannot store a {dtype} tensor in a checkpoint (supported: "
                                      f"{', '.join(map(str, DTYPE_CODES))})")
        self.writer = SafetensorsWriter(path, {_chunk_key(n, o): (d, s) for (n, o), (s, d) in self.chunks.items()})
        self.records: dict[tuple[str, tuple[int, ...]], dict] = {}

    def write(self, name: str, offsets: tuple[int, ...], tensor: torch.Tensor) -> None:
        key = (name, tuple(offsets))
        sizes, dtype = self.chunks[key]
        data = self.writer.write(_chunk_key(*key), tensor)
        per_block = _rows_per_block(sizes, dtype.itemsize)
        step = max(1, per_block * (data.nbytes // max(1, _row_count(sizes))))
        begin = self.writer.data_start + self.writer.offsets[_chunk_key(*key)]
        self.records[key] = {"file": self.writer.path.name, "begin": begin, "end": begin + data.nbytes,
                             "rows_per_block": per_block,
                             "sha256": [hashlib.sha256(data[i:i + step]).hexdigest()
                                        for i in range(0, max(1, data.nbytes), step)]}

    def close(self) -> dict:
        """Flush the file to disk; returns its entry of index.json's `files`."""
        self.writer.close()
        return {"size": self.writer.size, "data_start": self.writer.data_start,
                "header_sha256": hashlib.sha256(self.writer.header).hexdigest()}

    def abort(self) -> None:
        self.writer.abort()


def _index(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
           chunks: Iterable[tuple[str, tuple[int, ...], tuple[int, ...], dict]], files: dict[str, dict]) -> dict:
    """index.json: tensors (dtype, shape, chunks with their records) and shard files."""
    out = {name: {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "chunks": []}
           for name, (dtype, shape) in tensors.items()}
    for name, offsets, sizes, record in chunks:
        out[name]["chunks"].append({"offsets": list(offsets), "sizes": list(sizes), **record})
    return {"format": FORMAT, "tensors": out, "files": files}


def _check_tiling(name: str, shape: Sequence[int], boxes: list[tuple[Sequence[int], Sequence[int]]]) -> None:
    """The chunks of a tensor cover it exactly once (else saving would lose or duplicate values)."""
    for offsets, sizes in boxes:
        if any(o < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape)):
            raise CheckpointError(f"a chunk of {name} at {list(offsets)} of size {list(sizes)} lies outside its "
                                  f"shape {list(shape)} (a bug in the engine's checkpoint state)")
    for i, (a_off, a_size) in enumerate(boxes):
        for b_off, b_size in boxes[i + 1:]:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a_off, a_size, b_off, b_size)):
                raise CheckpointError(f"two ranks hold different overlapping chunks of {name} (at {list(a_off)} and "
                                      f"{list(b_off)}): a bug in the engine's checkpoint state")
    covered = sum(math.prod(sizes) for _, sizes in boxes)
    if covered != math.prod(shape):
        raise CheckpointError(f"the ranks hold {covered} of the {math.prod(shape)} values of {name}: a part no rank "
                              "holds would be lost (a bug in the engine's checkpoint state)")


# ----------------------------------------------------------------------------------------------
# Saving through DCP: planner (who writes what) and storage (our shard files, index and commit)


def _write_item(name: str, chunk: Chunk) -> WriteItem:
    offsets = torch.Size(chunk.offsets)
    return WriteItem(index=MetadataIndex(name, offsets), type=WriteItemType.SHARD, tensor_data=TensorWriteData(
        chunk=ChunkStorageMetadata(offsets=offsets, sizes=chunk.tensor.shape),
        properties=TensorProperties(dtype=chunk.tensor.dtype), size=torch.Size(chunk.shape)))


def _item_bytes(item: WriteItem) -> int:
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


class _SavePlanner(SavePlanner):
    """Each rank offers every chunk it holds; the coordinator keeps one writer per chunk."""

    def __init__(self, state: State):
        self.state = state
        self.chunks: dict[MetadataIndex, Chunk] = {}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        items = []
        for name, chunks in self.state.items():
            for chunk in chunks:
                item = _write_item(name, chunk)
                if item.index not in self.chunks:  # a scalar held once per parameter (Adam's step): write one
                    self.chunks[item.index] = chunk
                    items.append(item)
        return SavePlan(items)

    def create_global_plan(self, plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """A chunk several ranks hold (a replica over DP or TP) goes to the holder with the fewest bytes so far,
        largest chunks first, so replicated tensors spread over their holders."""
        holders: dict[MetadataIndex, list[int]] = {}
        items: dict[MetadataIndex, WriteItem] = {}
        for rank, plan in enumerate(plans):
            for item in plan.items:
                if items.setdefault(item.index, item).tensor_data != item.tensor_data:
                    raise CheckpointError(f"ranks hold different chunks of {item.index.fqn} at "
                                          f"{list(item.index.offset)}: {items[item.index].tensor_data} vs "
                                          f"{item.tensor_data}")
                holders.setdefault(item.index, []).append(rank)
        written, writer = [0] * len(plans), {}
        for index in sorted(items, key=lambda i: -_item_bytes(items[i])):
            writer[index] = min(holders[index], key=lambda r: (written[r], r))
            written[writer[index]] += _item_bytes(items[index])
        tensors: dict[str, TensorStorageMetadata] = {}
        for index, item in items.items():
            data = item.tensor_data
            md = tensors.setdefault(index.fqn, TensorStorageMetadata(data.properties, data.size, []))
            if (md.size, md.properties.dtype) != (data.size, data.properties.dtype):
                raise CheckpointError(f"ranks disagree on the shape or dtype of {index.fqn}: {list(md.size)} "
                                      f"{md.properties.dtype} vs {list(data.size)} {data.properties.dtype}")
            md.chunks.append(data.chunk)
        for name, md in tensors.items():
            _check_tiling(name, md.size, [(c.offsets, c.sizes) for c in md.chunks])
        return ([dataclasses.replace(plan, items=[i for i in plan.items if writer[i.index] == rank])
                 for rank, plan in enumerate(plans)], Metadata(state_dict_metadata=tensors))

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.chunks[write_item.index].tensor


class _ShardWriter(StorageWriter):
    """Every rank writes its chunks into shards/rank<r>.safetensors; the coordinator prepares the directory
    before anyone writes (`start`) and, once every rank's file is on disk, hands index.json's content to
    `commit`."""

    def __init__(self, folder: Path, start: Callable[[], None], commit: Callable[[dict], None]):
        super().__init__()
        self.folder, self.start, self.commit = folder, start, commit

    def reset(self, checkpoint_id=None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.start()
        return [dataclasses.replace(plan, storage_data=_shard_name(rank)) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results = []
        if plan.items:
            chunks = [(i.index.fqn, tuple(i.index.offset), tuple(i.tensor_data.chunk.sizes),
                       i.tensor_data.properties.dtype) for i in plan.items]
            shard = _ShardFile(self.folder / SHARDS / plan.storage_data, chunks)
            try:
                for item in plan.items:  # one chunk on the host at a time
                    shard.write(item.index.fqn, tuple(item.index.offset), planner.resolve_data(item).detach().cpu())
            except BaseException:
                shard.abort()
                raise
            file = shard.close()
            results = [WriteResult(index=i.index, size_in_bytes=_item_bytes(i), storage_data={
                **shard.records[(i.index.fqn, tuple(i.index.offset))], "file_entry": file}) for i in plan.items]
        future: Future = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        records = {r.index: r.storage_data for rank in results for r in rank}
        files = {record["file"]: record.pop("file_entry") for record in records.values()}
        tensors = {name: (md.properties.dtype, tuple(md.size)) for name, md in metadata.state_dict_metadata.items()}
        chunks = [(name, tuple(c.offsets), tuple(c.sizes), records[MetadataIndex(name, c.offsets)])
                  for name, md in metadata.state_dict_metadata.items() for c in md.chunks]
        self.commit(_index(tensors, chunks, files))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False


def _collective(function: Callable, *args, **kwargs) -> Any:
    """Run a DCP save or load; a failure on any rank (DCP reports it to all) is raised on every rank as the
    error the failing rank raised (the lowest such rank's)."""
    try:
        return function(*args, **kwargs)
    except CheckpointException as e:
        _, (error, _) = min(e.failures.items())
        raise error from None


def save_sharded(ckpt: Path, state: State, cfg: Config, step: int = 0, tokens: int = 0,
                 tokenizer: Optional[Path] = None, trainer_state: Optional[dict] = None,
                 then: Callable[[], None] = lambda: None) -> Path:
    """Write the checkpoint directory `ckpt`; collective: every rank calls it with the chunks it holds.
    Filled under `.tmp-<name>` next to it and renamed into place once complete; `then` runs on the
    coordinator after that (e.g. moving `latest`). Errors on any rank are raised on every rank."""
    ckpt = Path(ckpt)
    tmp = ckpt.with_name(TEMPORARY + ckpt.name)

    def start() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / SHARDS).mkdir(parents=True)

    def commit(index: dict) -> None:
        _write_checkpoint_files(tmp, index, cfg, tokenizer, step, tokens, trainer_state)
        if ckpt.exists():  # a complete directory from a run that crashed before moving `latest` to it
            _remove(ckpt)
        _rename(tmp, ckpt)
        then()

    _collective(dcp.save, state, storage_writer=_ShardWriter(tmp, start, commit), planner=_SavePlanner(state))
    return ckpt


def _write_checkpoint_files(folder: Path, index: dict, cfg: Config, tokenizer: Optional[Path], step: int,
                            tokens: int, trainer_state: Optional[dict]) -> None:
    """index.json and the small files, each flushed to disk, then the manifest listing their sha256."""
    writers: dict[str, Callable[[Path], Any]] = {
        INDEX: lambda p: p.write_text(json.dumps(index)),
        CONFIG: lambda p: p.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)),
    }
    tokenizer_name = None
    if tokenizer is not None:  # stored under the standard names, whatever the source files are called
        tokenizer = Path(tokenizer)
        tokenizer_name = HF_FILE if tokenizer.suffix == ".json" else TOKENIZER
        for path in tokenizer_files(tokenizer):
            name = tokenizer_name if path == tokenizer else path.name
            writers[name] = lambda p, src=path: shutil.copyfile(src, p)
    if trainer_state is not None:
        writers[TRAINER_STATE] = lambda p: torch.save(trainer_state, p)
    files = {}
    for name, write in writers.items():
        write_file(folder / name, write)
        files[name] = sha256_file(folder / name)
    manifest = {"format": FORMAT, "step": step, "tokens": tokens, "tokenizer_sha256": files.get(tokenizer_name),
                "config_sha256": files[CONFIG], "files": files}
    write_file(folder / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    _fsync(folder / SHARDS)
    _fsync(folder)


# ----------------------------------------------------------------------------------------------
# Training checkpoints: step directories, `latest`, pruning


def save_training(out_dir: Path, step: int, tokens: int, state: State, cfg: Config, tokenizer: Path,
                  trainer_state: dict, keep_last: int) -> Path:
    """Write `<out_dir>/checkpoints/step_<step>` (collective), then point `latest` at it and prune old ones."""
    root = Path(out_dir) / CHECKPOINTS
    name = step_dir_name(step)
    root.mkdir(parents=True, exist_ok=True)

    def publish() -> None:
        pointer = root / f"{TEMPORARY}{LATEST}"
        write_file(pointer, lambda p: p.write_text(name + "\n"))
        _rename(pointer, root / LATEST)
        prune(root, keep_last, keep=name)

    return save_sharded(root / name, state, cfg, step, tokens, tokenizer, trainer_state, then=publish)


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Keep the newest `keep_last` step directories up to `keep` (the one `latest` names); remove older
    ones, and newer ones (written by a save that was interrupted before it moved `latest`)."""
    steps = sorted(p.name for p in Path(root).iterdir() if STEP_DIR.match(p.name))
    kept = [name for name in steps if name <= keep][-keep_last:]
    for name in steps:
        if name not in kept:
            _remove(root / name)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete what a crash during a save left: half-written step directories and pointer files."""
    root = Path(out_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TEMPORARY):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


# ----------------------------------------------------------------------------------------------
# Finding and verifying


def _follow_latest(root: Path) -> Path:
    pointer = root / LATEST
    name = pointer.read_text().strip()
    target = root / name
    if not name or not (target / MANIFEST).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory next to it; write the "
                              "name of an existing step_XXXXXXXX directory into it, or delete it")
    return target


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The step directory `latest` names, or None when the run has no checkpoint yet."""
    root = Path(out_dir) / CHECKPOINTS
    return _follow_latest(root) if (root / LATEST).is_file() else None


def resolve(path: Path) -> Path:
    """A checkpoint directory, a run's out_dir or its checkpoints/ directory -> the checkpoint directory to read."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    for root in (path, path / CHECKPOINTS):
        if (root / LATEST).is_file():
            return _follow_latest(root)
    if (path / LEGACY_MODEL_FILE).is_file():
        raise CheckpointError(_legacy_message(path))
    raise CheckpointError(f"{path}: not a dsmtp checkpoint (expected {MANIFEST} in it, or a run directory with "
                          f"{CHECKPOINTS}/{LATEST})")


def _legacy_message(ckpt: Path) -> str:
    return (f"{ckpt} is a consolidated checkpoint ({LEGACY_MODEL_FILE}), the layout of dsmtp before sharded "
            f"checkpoints: convert it once with `python tools/upgrade_checkpoint.py {ckpt}` (in place; weights, "
            "optimizer state and training position are kept)")


def _damaged(ckpt: Path) -> str:
    """What to do about a damaged checkpoint directory."""
    if ckpt.parent.name == CHECKPOINTS:
        return (f"the checkpoint {ckpt} is damaged (an interrupted copy or a disk problem): delete it and write the "
                f"previous step_XXXXXXXX name into {ckpt.parent / LATEST}, or start a new train.out_dir")
    return f"the checkpoint {ckpt} is damaged (an interrupted copy or a disk problem): write it again"


def verify(ckpt: Path) -> dict:
    """Check the manifest and the sha256 of every file it lists (shard files are checked as they are read:
    size and header when opened, every block of rows as it is read). Returns the manifest."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {ckpt / MANIFEST} ({e}); {_damaged(ckpt)}") from None
    if manifest.get("format") != FORMAT:
        if LEGACY_MODEL_FILE in files:
            raise CheckpointError(_legacy_message(ckpt))
        raise CheckpointError(f"{ckpt / MANIFEST} has format {manifest.get('format')!r}, this dsmtp reads {FORMAT!r}: "
                              "use the dsmtp version that wrote it")
    for name, expected in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; {_damaged(ckpt)}")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path} does not match the sha256 in {MANIFEST} (truncated or modified); "
                                  f"{_damaged(ckpt)}")
    return manifest


def checkpoint_config(ckpt: Path, overrides: Sequence[str] = ()) -> Config:
    """The checkpoint's Config, with `overrides` (key=value) applied."""
    try:
        cfg = load_config(ckpt / CONFIG)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / CONFIG} is not a valid config: {e}") from None
    return load_config(ckpt / CONFIG, list(overrides)) if overrides else cfg


def check_compatible(ckpt: Path, manifest: dict, cfg: Config, tokenizer_sha256: str) -> None:
    """Refuse to resume from a checkpoint of a different model or tokenizer."""
    saved = config_to_dict(checkpoint_config(ckpt).model)
    wanted = config_to_dict(cfg.model)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs run {wanted.get(k)!r}"
             for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt} was trained with a different model config ("
                              + "; ".join(diffs) + "): use the same model settings, or a new train.out_dir")
    if manifest.get("tokenizer_sha256") != tokenizer_sha256:
        raise CheckpointError(f"checkpoint {ckpt} was trained with a different tokenizer (sha256 "
                              f"{manifest.get('tokenizer_sha256')} vs this run's {tokenizer_sha256}): point "
                              "data.data_dir at the data it was trained on, or use a new train.out_dir")


# ----------------------------------------------------------------------------------------------
# Reading: any region of any tensor, from the blocks of rows that cover it, each checked


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor


class StoredTensors:
    """The tensors of a verified checkpoint directory (index.json), read with plain file reads (a memory map
    would keep every page it touched resident: a streaming reader would grow to the checkpoint's size)."""

    def __init__(self, ckpt: Path):
        self.ckpt = Path(ckpt)
        try:
            index = json.loads((self.ckpt / INDEX).read_text())
            self.tensors: dict[str, dict] = index["tensors"]
            self.files: dict[str, dict] = index["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read {self.ckpt / INDEX} ({e}); {_damaged(self.ckpt)}") from None
        self._opened: set[str] = set()
        self._cached: tuple[tuple, Optional[torch.Tensor]] = ((), None)  # the last blocks read

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPE_FROM_CODE[self.tensors[name]["dtype"]]

    def storage_metadata(self, name: str) -> TensorStorageMetadata:
        entry = self.tensors[name]
        return TensorStorageMetadata(TensorProperties(dtype=self.dtype(name)), torch.Size(entry["shape"]),
                                     [ChunkStorageMetadata(torch.Size(c["offsets"]), torch.Size(c["sizes"]))
                                      for c in entry["chunks"]])

    def read(self, name: str, offsets: Optional[Sequence[int]] = None,
             sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The region of tensor `name` at `offsets` of size `sizes` (default: all of it)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.ckpt / INDEX} has no tensor {name}")
        offsets = tuple(offsets) if offsets is not None else (0,) * len(self.shape(name))
        sizes = tuple(sizes) if sizes is not None else self.shape(name)
        out = torch.empty(sizes, dtype=self.dtype(name))
        wanted = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        self.copy(create_read_items_for_chunk_list(name, self.storage_metadata(name), [wanted]),
                  lambda item: _narrow(out, item.dest_offsets, item.lengths))
        return out

    def copy(self, items: list[ReadItem], target: Callable[[ReadItem], torch.Tensor]) -> None:
        """For each read item, copy its region of a saved chunk into `target(item)`. Items are grouped by saved
        chunk (in file order), and each group's rows are read once."""
        groups: dict[tuple[str, int], list[ReadItem]] = {}
        for item in items:
            groups.setdefault((item.storage_index.fqn, item.storage_index.index), []).append(item)

        def file_order(key):
            chunk = self.tensors[key[0]]["chunks"][key[1]]
            return chunk["file"], chunk["begin"]

        for name, i in sorted(groups, key=file_order):
            chunk, group = self.tensors[name]["chunks"][i], groups[(name, i)]
            if not chunk["sizes"]:
                rows, first = self._rows(name, chunk, 0, 1), 0
            else:
                first = min(item.storage_offsets[0] for item in group)
                stop = max(item.storage_offsets[0] + item.lengths[0] for item in group)
                rows = self._rows(name, chunk, first, stop)
            for item in group:
                offsets = (item.storage_offsets[0] - first, *item.storage_offsets[1:]) if chunk["sizes"] else ()
                target(item).copy_(_narrow(rows, offsets, item.lengths))

    def _rows(self, name: str, chunk: dict, first: int, stop: int) -> torch.Tensor:
        """Rows [first, stop) of a saved chunk (a 0-d chunk: the value), read in whole blocks, each checked."""
        dtype, sizes = self.dtype(name), chunk["sizes"]
        row_bytes = math.prod(sizes[1:]) * dtype.itemsize
        per_block, count = chunk["rows_per_block"], _row_count(sizes)
        b0, b1 = first // per_block, -(-stop // per_block)
        begin = chunk["begin"] + b0 * per_block * row_bytes
        end = chunk["begin"] + min(b1 * per_block, count) * row_bytes
        key = (chunk["file"], begin, end)
        if self._cached[0] != key:
            path = self._open(chunk["file"])
            buffer = bytearray(end - begin)
            with open(path, "rb") as f:
                f.seek(begin)
                if f.readinto(buffer) != len(buffer):
                    raise CheckpointError(f"{path} is shorter than {INDEX} records (truncated); {_damaged(self.ckpt)}")
            step = max(1, per_block * row_bytes)
            for block, at in zip(range(b0, b1), range(0, max(1, len(buffer)), step)):
                if hashlib.sha256(memoryview(buffer)[at:at + step]).hexdigest() != chunk["sha256"][block]:
                    raise CheckpointError(f"{path} does not match the sha256 in {INDEX} (block {block} of the chunk of "
                                          f"{name} at {chunk['offsets']}: modified or damaged); {_damaged(self.ckpt)}")
            values = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            self._cached = (key, values.view((min(b1 * per_block, count) - b0 * per_block, *sizes[1:])) if sizes
                            else values.view(()))
        rows = self._cached[1]
        return rows[first - b0 * per_block:stop - b0 * per_block] if sizes else rows

    def _open(self, file: str) -> Path:
        """A shard file's path, after checking (once) its size and header against index.json."""
        path = self.ckpt / SHARDS / file
        if file in self._opened:
            return path
        expected = self.files.get(file)
        if expected is None or not path.is_file():
            raise CheckpointError(f"{path} is missing; {_damaged(self.ckpt)}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(expected["data_start"])
        if size != expected["size"] or hashlib.sha256(header).hexdigest() != expected["header_sha256"]:
            raise CheckpointError(f"{path} does not match the sha256 in {INDEX} ({size} bytes, {expected['size']} "
                                  f"written; header {'intact' if size == expected['size'] else 'unchecked'}: truncated "
                                  f"or modified); {_damaged(self.ckpt)}")
        self._opened.add(file)
        return path


class _LoadPlanner(LoadPlanner):
    """Reads into the chunks a rank holds: DCP maps each to the saved chunks it overlaps."""

    def __init__(self, state: State, ckpt: Path):
        self.state, self.ckpt = state, ckpt

    def set_up_planner(self, state_dict, metadata: Optional[Metadata] = None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        saved = self.metadata.state_dict_metadata
        missing = sorted(name for name, chunks in self.state.items() if chunks and name not in saved)
        if missing:
            raise CheckpointError(f"{self.ckpt} lacks {len(missing)} tensors of this model, e.g. {missing[:3]} "
                                  "(saved from a different model config or dsmtp version?)")
        items = []
        for name, chunks in self.state.items():
            if chunks and tuple(saved[name].size) != chunks[0].shape:
                raise CheckpointError(f"{name} is {list(saved[name].size)} in {self.ckpt}, {list(chunks[0].shape)} in "
                                      "this model (saved from a different model config?)")
            wanted = [ChunkStorageMetadata(torch.Size(c.offsets), c.tensor.shape) for c in chunks]
            items += create_read_items_for_chunk_list(name, saved[name], wanted)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise CheckpointError(f"{read_item.storage_index.fqn}: dsmtp checkpoints hold tensors only")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        chunk = self.state[read_item.dest_index.fqn][read_item.dest_index.index]
        return _narrow(chunk.tensor.detach(), read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class _ShardReader(StorageReader):
    def __init__(self, stored: StoredTensors):
        super().__init__()
        self.stored = stored

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return Metadata(state_dict_metadata={name: self.stored.storage_metadata(name) for name in self.stored.tensors})

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self.stored.copy(plan.items, planner.resolve_tensor)
        future: Future = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False


def load_sharded(ckpt: Path, state_for: Callable[[bool], State]) -> None:
    """Fill this rank's chunks from a verified checkpoint, in any layout; collective: every rank calls it.
    `state_for(with_optimizer)` gives the chunks to fill; the optimizer's only when the checkpoint has its state."""
    stored = StoredTensors(ckpt)
    state = state_for(any(name.startswith(OPTIM) for name in stored.tensors))
    _collective(dcp.load, state, storage_reader=_ShardReader(stored), planner=_LoadPlanner(state, Path(ckpt)))


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} holds weights only (no {TRAINER_STATE}): training cannot resume from it; "
                              "point train.out_dir at a training run")
    return torch.load(path, weights_only=True, map_location="cpu")


# ----------------------------------------------------------------------------------------------
# One process: writing a checkpoint tensor by tensor, reading the model for inference and conversion


class CheckpointWriter:
    """A checkpoint directory written by one process, tensor by tensor, e.g. while converting from another
    format (peak memory: one tensor). `tensors` gives every tensor's dtype and full shape, in file order;
    `pieces` names those written a piece at a time, with how many leading dimensions a piece's index has
    (each piece its own chunk: 1 for one expert of a stacked tensor, 2 for its gate or up projection)."""

    def __init__(self, folder: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 pieces: Optional[dict[str, int]] = None):
        self.folder, self.tensors, self.pieces = Path(folder), tensors, pieces or {}
        chunks = []
        for name, (dtype, shape) in tensors.items():
            depth = self.pieces.get(name, 0)
            chunks += [(name, index + (0,) * (len(shape) - depth), (1,) * depth + tuple(shape[depth:]), dtype)
                       for index in itertools.product(*map(range, shape[:depth]))]
        (self.folder / SHARDS).mkdir(parents=True, exist_ok=True)
        self.shard = _ShardFile(self.folder / SHARDS / _shard_name(0), chunks)

    def write(self, name: str, tensor: torch.Tensor, index: tuple[int, ...] = ()) -> None:
        """The whole tensor `name`, or its piece name[index]."""
        if len(index) != self.pieces.get(name, 0):
            raise ValueError(f"{name} is written in pieces of {self.pieces.get(name, 0)} leading indices, "
                             f"not {len(index)}")
        self.shard.write(name, index + (0,) * tensor.dim(), tensor.reshape((1,) * len(index) + tensor.shape))

    def finish(self, cfg: Config, tokenizer: Optional[Path] = None, step: int = 0, tokens: int = 0,
               trainer_state: Optional[dict] = None) -> Path:
        """Flush the shard, then write index.json, the small files and the manifest."""
        files = {_shard_name(0): self.shard.close()}
        chunks = [(name, offsets, self.shard.chunks[(name, offsets)][0], record)
                  for (name, offsets), record in self.shard.records.items()]
        _write_checkpoint_files(self.folder, _index(self.tensors, chunks, files), cfg, tokenizer, step, tokens,
                                trainer_state)
        return self.folder

    def abort(self) -> None:
        self.shard.abort()


def save_weights(folder: Path, cfg: Config, tensors: dict[str, torch.Tensor], tokenizer: Optional[Path] = None) -> Path:
    """A weights checkpoint (no optimizer or training state) of model tensors {our name: tensor}."""
    writer = CheckpointWriter(folder, {MODEL + n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    for name, tensor in tensors.items():
        writer.write(MODEL + name, tensor)
    return writer.finish(cfg, tokenizer)


class ModelTensors:
    """The model tensors of a checkpoint by our names, one tensor or one expert row at a time: the
    converters' TensorSource (dsmtp.convert.checkpoint_io)."""

    def __init__(self, stored: StoredTensors):
        self.stored = stored

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name[len(MODEL):]: self.stored.shape(name) for name in self.stored.tensors if name.startswith(MODEL)}

    def read(self, name: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self.stored.shape(MODEL + name)
        if not all(0 <= i < n for i, n in zip(index, shape)) or len(index) > len(shape):
            raise IndexError(f"{name}: index {list(index)} out of range for shape {list(shape)}")
        rest = tuple(shape[len(index):])
        return self.stored.read(MODEL + name, index + (0,) * len(rest), (1,) * len(index) + rest).view(rest)


def open_checkpoint(path: Path, overrides: Sequence[str] = ()) -> tuple[Config, ModelTensors, Path]:
    """(config, model tensors, checkpoint directory) of a verified checkpoint: a step directory, or a run's
    out_dir or checkpoints/ directory (its `latest`)."""
    ckpt = resolve(Path(path))
    verify(ckpt)
    return checkpoint_config(ckpt, overrides), ModelTensors(StoredTensors(ckpt)), ckpt


@torch.no_grad()
def load_model(path: Path | str, device: Optional[torch.device] = None,
               overrides: Sequence[str] = ()) -> tuple[DeepSeekV3, Config]:
    """The model of a verified checkpoint (see `open_checkpoint`) in eval mode, and its Config with `overrides`
    applied; read tensor by tensor."""
    from dsmtp.model import DeepSeekV3
    from dsmtp.parallel.topology import ensure_initialized

    cfg, tensors, ckpt = open_checkpoint(Path(path), overrides)
    ensure_initialized()
    model = DeepSeekV3(cfg.model)
    if device is not None:
        model.to(device)
    state, saved = model.state_dict(), tensors.shapes()
    missing, unexpected = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    wrong = [f"{n} {list(saved[n])} vs {list(t.shape)}" for n, t in state.items() if n in saved and saved[n] != t.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{ckpt} does not fit its {CONFIG}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                              f"other shapes {wrong[:5]}")
    for name, tensor in state.items():
        tensor.copy_(tensors.read(name))
    return model.eval(), cfg
