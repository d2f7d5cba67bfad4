"""Write safetensors files one tensor (or one slice of a tensor) at a time.

`safetensors.torch.save_file` needs every tensor in memory at once. Converters know every name, dtype
and shape up front (from the config), so they can lay the file out first and fill it piece by piece:
peak memory stays near the largest single piece instead of the whole file. The file is written under a
temporary name and renamed into place by `close()` once every byte is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

DTYPE_CODES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
}


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as they are stored (row-major, little-endian), as a uint8 array on the host."""
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class SafetensorsWriter:
    """specs: {name: (dtype, shape)} in file order."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.specs = specs
        header: dict = {"__metadata__": metadata} if metadata else {}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, (dtype, shape) in specs.items():
            size = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.offsets[name] = offset
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.header = len(raw).to_bytes(8, "little") + raw  # every byte before the data section
        self.data_start = len(self.header)
        self.size = self.data_start + offset
        self.remaining = {name: _numel(shape) * dtype.itemsize for name, (dtype, shape) in specs.items()}
        self.file = open(self.tmp, "wb")
        self.file.write(self.header)
        self.file.truncate(self.size)

    def write(self, name: str, tensor: torch.Tensor, row: Optional[int] = None) -> np.ndarray:
        """Write a whole tensor, or (row=i) the i-th slice along the first dimension of a stacked one.
        Returns the bytes written (a view: what a caller hashes)."""
        dtype, shape = self.specs[name]
        expected = shape if row is None else shape[1:]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"{self.path.name}: {name}{'' if row is None else f'[{row}]'} expected "
                             f"{dtype} {tuple(expected)}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor_bytes(tensor)
        start = self.offsets[name] + (0 if row is None else row * data.nbytes)
        self.file.seek(self.data_start + start)
        self.file.write(data)
        self.remaining[name] -= data.nbytes
        return data

    def close(self) -> None:
        """Check that every byte was written, flush the file to disk, then move it into place."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        missing = [name for name, left in self.remaining.items() if left != 0]
        if missing:
            self.tmp.unlink()
            raise RuntimeError(f"{self.path.name}: tensors not (fully) written: {missing[:10]}"
                               f"{' ...' if len(missing) > 10 else ''}")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
