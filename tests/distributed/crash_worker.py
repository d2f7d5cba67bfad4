"""One rank of `dsmtp train` under torchrun that SIGKILLs itself (as the OOM killer or a failing node would)
at one moment of the checkpoint save of step DSMTP_TEST_CRASH_STEP (tests/distributed/test_checkpoint_crash.py):

    shard     rank 1, after writing the second chunk of its shard file (rank 0's may be complete)
    index     rank 0, after every shard is on disk and index.json is written
    manifest  rank 0, after the manifest is written, before the directory is renamed into place
    rename    rank 0, after the complete step directory is in place, before `latest` moves
    pointer   rank 0, after the new pointer is written under its temporary name, before it replaces `latest`
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dsmtp import checkpoint  # noqa: E402
from dsmtp.train.trainer import main  # noqa: E402

MOMENT = os.environ["DSMTP_TEST_CRASH_AT"]
TARGET = checkpoint.step_dir_name(int(os.environ["DSMTP_TEST_CRASH_STEP"]))
RANK = int(os.environ["RANK"])


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def after(function, crash_if):
    def wrapped(*args):
        result = function(*args)
        if crash_if(*args):
            die()
        return result
    return wrapped


written: list[str] = []


def shard_chunk_written(shard, name, offsets, tensor) -> bool:
    if RANK == 1 and checkpoint.TEMPORARY + TARGET in str(shard.writer.path):
        written.append(name)
    return len(written) == 2


def small_file_written(path: Path, write) -> bool:
    if MOMENT == "pointer":
        return path.name == checkpoint.TEMPORARY + checkpoint.LATEST and path.read_text().strip() == TARGET
    wanted = {"index": checkpoint.INDEX, "manifest": checkpoint.MANIFEST}.get(MOMENT)
    return path.name == wanted and path.parent.name == checkpoint.TEMPORARY + TARGET


if MOMENT == "shard":
    checkpoint._ShardFile.write = after(checkpoint._ShardFile.write, shard_chunk_written)
elif MOMENT == "rename":
    checkpoint._rename = after(checkpoint._rename, lambda src, dst: dst.name == TARGET)
else:
    checkpoint.write_file = after(checkpoint.write_file, small_file_written)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
