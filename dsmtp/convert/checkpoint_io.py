"""Reading tensors one at a time, for the converters.

Converters read through `TensorSource` (names, shapes, one tensor or one expert's piece at a time), so the
exporter reads a dsmtp checkpoint (`dsmtp.checkpoint.ModelTensors`, any sharded layout) and the
importer reads HF safetensors files (`SafetensorsSource`) the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import torch

from dsmtp.checkpoint import DTYPE_FROM_CODE, CheckpointError


class TensorSource(Protocol):
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name with its full (unsharded) shape."""

    def read(self, name: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        """The whole tensor, or only its piece tensor[index] at leading indices `index` (one expert of a
        stacked tensor, or one expert's gate or up projection)."""


def _header(path: Path) -> tuple[dict, int]:
    """(the tensors' entries, where the data starts) of a safetensors file, or a CheckpointError naming it."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= file_size - 8:
                raise ValueError(f"a header of {size} bytes does not fit in the file")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            dtype = DTYPE_FROM_CODE.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{name} has dtype {entry['dtype']}, which dsmtp does not read")
            begin, end = entry["data_offsets"]
            if end - begin != dtype.itemsize * math.prod(entry["shape"]) or 8 + size + end > file_size:
                raise ValueError(f"{name}: data offsets {entry['data_offsets']} do not fit its shape {entry['shape']} "
                                 "or the file")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): it is damaged or incomplete; copy "
                              "or download it again") from None
    return header, 8 + size


class SafetensorsSource:
    """Tensors of one or more safetensors files, read one at a time with plain file reads.

    Not memory-mapped on purpose: pages of a mapping stay in the process's resident set once touched,
    so a streaming conversion would grow to the size of its input; reads keep it near one tensor.
    """

    def __init__(self, files: list[Path]):
        self._entries: dict[str, tuple[Path, dict, int]] = {}  # name -> (file, header entry, data start)
        for path in files:
            header, data_start = _header(Path(path))
            for name, entry in header.items():
                self._entries[name] = (Path(path), entry, data_start)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry["shape"]) for name, (_, entry, _) in self._entries.items()}

    def dtype(self, name: str) -> torch.dtype:
        return DTYPE_FROM_CODE[self._entries[name][1]["dtype"]]

    def read(self, name: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        path, entry, data_start = self._entries[name]
        shape, dtype = entry["shape"], DTYPE_FROM_CODE[entry["dtype"]]
        begin, _ = entry["data_offsets"]
        if not all(0 <= i < n for i, n in zip(index, shape)) or len(index) > len(shape):
            raise IndexError(f"{name}: index {list(index)} out of range for shape {shape}")
        # row-major: a piece at leading indices is one contiguous run of bytes
        shape = shape[len(index):]
        piece_bytes = dtype.itemsize * math.prod(shape)
        begin += piece_bytes * sum(i * math.prod(entry["shape"][k + 1:len(index)]) for k, i in enumerate(index))
        end = begin + piece_bytes
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{path}: truncated data for tensor {name}")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).view(shape)
