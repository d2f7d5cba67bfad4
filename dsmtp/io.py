"""Small file-system helpers shared by the commands that write output directories."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Fill a fresh sibling `.NAME.partial` directory, then rename it to `out` (which must be absent or
    empty); on any failure the partial directory is removed and `out` is left as it was."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
