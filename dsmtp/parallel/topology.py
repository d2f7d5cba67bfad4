"""Process-group topology: the single source of truth for rank layout.

megatron-core's `parallel_state` builds the TP, PP, EP, DP and expert-DP groups; every other part of
dsmtp (the engine's gradient reduction, ZeRO sharding, checkpoint shards, the data loader's slice)
reads the layout from `layout()` and nothing else.

A single process with no launcher still gets a (world size 1, gloo) process group, so the same
megatron-core layers run in a notebook, a unit test and a 1000-GPU job.

Rank order is megatron's default 'tp-cp-ep-dp-pp': TP ranks are adjacent, then expert/data-parallel
ranks, then pipeline stages. Expert parallelism is carved out of the data-parallel ranks: a DP group
of size dp holds dp/ep expert-data-parallel replicas of each EP group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from dsmtp.config import Config, validate
from dsmtp.parallel.sequence import set_sequence_parallel


def ensure_initialized() -> None:
    """Make sure torch.distributed and megatron-core's groups exist; default to one process."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)


def init_distributed(cfg: Config, timeout_minutes: int = 30) -> "Layout":
    """Join the job started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and build every
    process group. Without those variables this is a one-process run. NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size)  # the layout over this many processes, before any group exists
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        else:
            use_cuda = torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                    **_restart_safe_store(timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp, expert_model_parallel_size=p.ep,
        # Routed experts are replicated over TP ranks (each TP rank routes the same tokens): the expert
        # groups then pair ranks of equal TP rank, as megatron's expert-TP = TP layout does.
        expert_tensor_parallel_size=p.tp,
        distributed_timeout_minutes=timeout_minutes, create_gloo_process_groups=False)
    set_sequence_parallel(p.sequence_parallel)
    found = layout()
    check_layout(found, cfg)
    return found


def check_layout(lay: "Layout", cfg: Config) -> None:
    """Start-up check that the groups megatron built are the layout every other part assumes: the
    sizes asked for, expert groups inside the data-parallel group, and the embedding group pairing
    the first and last stage of this rank's pipeline. Raises RuntimeError on any mismatch."""
    p = cfg.parallel
    ranks = dist.get_process_group_ranks
    problems = []
    if (lay.tp, lay.pp, lay.ep, lay.dp * lay.tp * lay.pp) != (p.tp, p.pp, p.ep, lay.world_size):
        problems.append(f"sizes tp/pp/ep/dp = {lay.tp}/{lay.pp}/{lay.ep}/{lay.dp} for world {lay.world_size}")
    dp_ranks = set(ranks(lay.dp_group))
    if not set(ranks(lay.ep_group)) <= dp_ranks or not set(ranks(lay.edp_group)) <= dp_ranks:
        problems.append("expert groups are not inside the data-parallel group")
    if len(ranks(lay.ep_group)) * len(ranks(lay.edp_group)) != lay.dp:
        problems.append("ep x expert-dp != dp")
    if lay.embedding_group is not None and lay.rank in (lay.pp_ranks[0], lay.pp_ranks[-1]) \
            and ranks(lay.embedding_group) != [lay.pp_ranks[0], lay.pp_ranks[-1]]:
        problems.append("embedding group is not (first stage, last stage)")
    if problems:
        raise RuntimeError(f"process groups do not match the layout ({lay.describe()}): " + "; ".join(problems))


def _restart_safe_store(timeout_minutes: int) -> dict:
    """Under torchrun, a store namespace of our own for each restart of the worker group.

    torchrun's restarted workers reuse the agent's store, where the dead attempt's gloo/NCCL
    rendezvous keys are still present: the new workers would read the dead peers' addresses and wait
    for them forever. Prefixing every key with the restart count gives each attempt a clean slate.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=timeout_minutes))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"dsmtp/attempt_{attempt}", store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def shutdown() -> None:
    set_sequence_parallel(False)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Layout:
    """Where this rank sits, and the groups each kind of collective runs over."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    edp_rank: int  # rank among the replicas that hold the same experts
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup  # non-expert gradients, router loads
    ep_group: dist.ProcessGroup  # token all-to-all
    edp_group: dist.ProcessGroup  # expert gradients
    embedding_group: dist.ProcessGroup | None  # first and last stage: the tied embedding
    pp_ranks: tuple[int, ...]  # global ranks of this rank's pipeline, stage order

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp} pp {self.pp_rank}/{self.pp} "
                f"dp {self.dp_rank}/{self.dp} ep {self.ep_rank}/{self.ep} edp {self.edp_rank}/{self.edp}")


def layout() -> Layout:
    ensure_initialized()
    ps = parallel_state
    pp = ps.get_pipeline_model_parallel_world_size()
    return Layout(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(), pp=pp,
        dp=ps.get_data_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(), ep_group=ps.get_expert_model_parallel_group(),
        edp_group=ps.get_expert_data_parallel_group(),
        embedding_group=ps.get_embedding_group() if pp > 1 else None,
        pp_ranks=tuple(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())),
    )


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
