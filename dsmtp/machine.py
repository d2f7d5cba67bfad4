"""The machine a measurement ran on, in words, for the rows benchmarks and the study write."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

import psutil
import torch


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: Optional[torch.device] = None) -> str:
    """The GPU (when `device` is one) or the CPU: its name, cores, RAM, and torch's version and threads."""
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"{cpu_name()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"{torch.get_num_threads()} torch threads (torch {torch.__version__})")
