"""Process-group topology: the single source of truth for rank layout.

megatron-core's `parallel_state` builds the TP, PP, EP, DP and expert-DP groups; every other engine
(DeepSpeed's grid and expert groups) is built from or checked against these groups.

A single process with no launcher still gets a (world size 1, gloo) process group, so the same
megatron-core layers run in a notebook, a unit test and a 1000-GPU job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def ensure_initialized() -> None:
    """Make sure torch.distributed and megatron-core's groups exist; default to one process."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def tp_group() -> dist.ProcessGroup:
    ensure_initialized()
    return parallel_state.get_tensor_model_parallel_group()


def tp_size() -> int:
    ensure_initialized()
    return parallel_state.get_tensor_model_parallel_world_size()


def ep_size() -> int:
    ensure_initialized()
    return parallel_state.get_expert_model_parallel_world_size()


def ep_rank() -> int:
    ensure_initialized()
    return parallel_state.get_expert_model_parallel_rank()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
