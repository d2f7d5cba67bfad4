"""The source side of `dsmtp prepare`: which files, which split, and what their text is.

Globs match the path relative to the source dir with `/` separators: `*` and `?` stay inside one
path segment, `**` spans any number of segments (`**/test/**` matches `test/a.py` and `x/test/b/c.py`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from dsmtp.data.errors import DataError

SKIP_REASONS = ("unreadable", "binary", "not_utf8", "empty")  # and "duplicate", with data.dedup


def glob_regex(pattern: str) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("(?:/.*)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class SourceFile:
    rel: str  # posix path relative to the source dir: the file's identity (split, fingerprint)
    path: Path
    size: int
    mtime_ns: int

    @property
    def split_key(self) -> float:
        """A uniform number in [0, 1) fixed by the relative path alone."""
        return int(hashlib.sha256(self.rel.encode()).hexdigest()[:15], 16) / 16**15


def default_source_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_source_dir(source_dir: Optional[str], field: str = "data.source_dir") -> Path:
    root = Path(source_dir).expanduser() if source_dir else default_source_dir()
    if not root.exists():
        raise DataError(
            f"{field}={root} does not exist: point it at a directory of text or code, or leave it "
            "unset to use the Python standard library"
        )
    if not root.is_dir():
        raise DataError(f"{field}={root} is a file, not a directory: give the directory that holds it")
    return root.resolve()


def scan(root: Path, include: list[str], exclude: list[str], path_field: str = "data.source_dir",
         include_field: str = "data.include") -> list[SourceFile]:
    """Every regular file under `root` matching an include glob and no exclude glob, sorted by path.
    Directories excluded as a whole (`.../**` globs) are never entered, so a site-packages with
    thousands of files under the standard library costs nothing."""
    include_re = [glob_regex(p) for p in include]
    exclude_re = [glob_regex(p) for p in exclude]
    pruned_dirs = [glob_regex(p[:-3]) for p in exclude if p.endswith("/**")]
    try:
        empty = not any(root.iterdir())
    except OSError as e:
        raise DataError(f"{path_field}={root} cannot be listed ({e.strerror}): check its permissions") from None
    if empty:
        raise DataError(f"{path_field}={root} is empty: point it at a directory of text or code files")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not any(r.match(prefix + d) for r in pruned_dirs))
        for name in filenames:
            rel = prefix + name
            if not any(r.match(rel) for r in include_re) or any(r.match(rel) for r in exclude_re):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:  # a dangling link: listed, then skipped as unreadable when read
                files.append(SourceFile(rel, path, -1, -1))
                continue
            if stat.S_ISREG(st.st_mode):  # not sockets or fifos (reading a fifo would block)
                files.append(SourceFile(rel, path, st.st_size, st.st_mtime_ns))
    if not files:
        raise DataError(
            f"no file under {root} matches {include_field}={include} and not "
            f"{include_field.replace('include', 'exclude')}={exclude}: fix the globs (paths are relative to "
            f"{path_field}, e.g. '**/*.py')"
        )
    return sorted(files, key=lambda f: f.rel)


def split_files(files: list[SourceFile], val_fraction: float) -> dict[str, list[SourceFile]]:
    """Deterministic split by the hash of each relative path; both splits get at least one file."""
    if len(files) < 2:
        raise DataError(
            f"only {len(files)} usable file: a train and a val split need at least 2 "
            "(widen data.include or use a larger data.source_dir)"
        )
    by_key = sorted(files, key=lambda f: f.split_key)
    n_val = sum(f.split_key < val_fraction for f in files)
    n_val = min(max(n_val, 1), len(files) - 1)
    val = {f.rel for f in by_key[:n_val]}
    return {
        "train": [f for f in files if f.rel not in val],
        "val": [f for f in files if f.rel in val],
    }


def read_text(path: Union[str, Path]) -> tuple[Optional[str], Optional[str]]:
    """(text, None) for a usable file, else (None, reason) with reason in SKIP_REASONS."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, "unreadable"
    if b"\0" in data:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    if not text.strip():
        return None, "empty"
    return text, None


def check_file(path: Path) -> tuple[Optional[str], int, Optional[str]]:
    """Worker task: (skip reason or None, length in characters, digest of the text or None)."""
    text, reason = read_text(path)
    if text is None:
        return reason, 0, None
    return None, len(text), hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def drop_duplicates(files: list[SourceFile], digests: list[str]) -> tuple[list[SourceFile], list[SourceFile]]:
    """(files whose content comes first in this order, the later copies) for data.dedup."""
    seen: set[str] = set()
    kept, copies = [], []
    for f, digest in zip(files, digests):
        (copies if digest in seen else kept).append(f)
        seen.add(digest)
    return kept, copies
