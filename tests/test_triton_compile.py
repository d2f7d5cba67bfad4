"""Every dsmtp Triton kernel compiles for Hopper here, without a GPU (tests/triton_compile_check.py):
the interpreter tests check what the kernels compute, this what the compiler accepts. A module-level
float read inside a kernel passed the interpreter and failed on the first GPU run (session 14)."""

import os
import subprocess
import sys
from pathlib import Path

from tests.triton_compile_check import KERNELS


def test_every_triton_kernel_compiles_for_hopper():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, set: its warning says the default will change
    run = subprocess.run([sys.executable, "-m", "tests.triton_compile_check"], cwd=Path(__file__).parents[1],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    compiled = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("compiled ")]
    assert sorted(compiled) == sorted(KERNELS)
