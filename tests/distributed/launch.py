"""Start a torchrun job from a test, bounded in time, and read back what rank 0 wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests._hf_helpers import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun puts each worker in a session of its own, so killing a
    process group does not reach them)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, as Slurm does to a job's cgroup."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def worker_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(nproc: int, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_layout(out: Path, nproc: int, layout: dict, extra: list[str] = (), timeout: int = 240) -> dict:
    """Run the equivalence worker; returns rank 0's result with the saved parameters (full tensors)."""
    flags = [f"--{k}={v}" for k, v in layout.items()]
    torchrun(nproc, [str(WORKER), *flags, f"--out={out}", *extra], timeout)
    result = json.loads((out / "result.json").read_text())
    result["state"] = read_checkpoint(out / "ckpt")
    return result


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))
