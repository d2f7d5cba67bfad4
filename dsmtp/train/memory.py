"""Will a training run fit? The config's memory estimate (dsmtp.model.params.training_memory) against what
this process's device has free, checked before the model is built: a model too large for the machine is
refused at once, with its sizes named, instead of filling memory for minutes and dying in the allocator.

The estimate is a lower bound, so a refused run would not have fitted; a run that passes may still run
out of memory by the estimate's margin (temporary buffers, allocator slack). `train.skip_memory_check`
is for the expert who knows better (memory another process is about to free, offloading).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import psutil
import torch

from dsmtp.config import Config, ConfigError
from dsmtp.model.params import GiB, TrainingMemory, count_parameters, routed_expert_parameters, training_memory

FIX = ("make the model smaller, lower train.micro_batch_size or train.seq_len, set train.activation_recompute_every, "
       "or spread the run over more devices (parallel.tp, pp, ep, zero_stage); train.skip_memory_check=true skips "
       "this check")


CGROUP_FS = Path("/sys/fs/cgroup")
NO_LIMIT = 2 ** 60  # cgroup v1 writes "no limit" as a huge page-rounded number


def cgroup_memory_free(proc_cgroup: Path = Path("/proc/self/cgroup"), fs: Path = CGROUP_FS) -> Optional[int]:
    """Bytes this process's memory cgroup still allows (a container's or a slurm job's limit): the
    tightest limit minus usage over its cgroup and their ancestors, v2 (memory.max, memory.current) or v1
    (memory.limit_in_bytes, memory.usage_in_bytes); None where no limit applies or none can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    groups = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            groups.append((fs / path.lstrip("/"), "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            groups.append((fs / "memory" / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"))
    free = None
    for leaf, limit_file, usage_file in groups:
        for group in [leaf, *leaf.parents]:
            if not group.is_relative_to(fs):
                break
            try:
                limit = (group / limit_file).read_text().strip()
                usage = int((group / usage_file).read_text())
            except (OSError, ValueError):
                continue
            if limit == "max" or int(limit) >= NO_LIMIT:
                continue
            left = max(int(limit) - usage, 0)
            free = left if free is None else min(free, left)
    return free


def free_memory(device: torch.device) -> tuple[int, str]:
    """(bytes this process can still allocate on `device`, the device in words)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} ({torch.cuda.get_device_name(device)})"
    ram = psutil.virtual_memory().available
    allowed = cgroup_memory_free()
    if allowed is not None and allowed < ram:
        return allowed, "this process's memory cgroup (the limit of its container or job)"
    return ram, "this machine's RAM"


def largest_part(cfg: Config, need: TrainingMemory) -> str:
    """The part of the model that takes the most memory (its weights, gradients, moments and
    activations), with the config fields that size it."""
    m, t = cfg.model, cfg.train
    c = count_parameters(m)
    trunk_experts = routed_expert_parameters(dataclasses.replace(m, mtp_depth=0))
    embedding = c.embedding + c.output_head
    per_parameter = (need.parameters + need.gradients + need.optimizer) / c.total
    act = need.activations_by_part
    parts = {
        f"the {m.mtp_depth} MTP modules (model.mtp_depth={m.mtp_depth})": c.mtp_total * per_parameter + act["mtp"],
        f"the routed experts (model.n_routed_experts={m.n_routed_experts} x model.moe_intermediate_size="
        f"{m.moe_intermediate_size} in {m.num_moe_layers} layers)": trunk_experts * per_parameter,
        f"the embedding and output head (model.vocab_size={m.vocab_size} x model.hidden_size={m.hidden_size})":
            embedding * per_parameter + act["output"],
        f"the transformer layers (model.num_layers={m.num_layers}, model.hidden_size={m.hidden_size})":
            (c.trunk_total - embedding - trunk_experts) * per_parameter + act["layers"],
    }
    part = max(parts, key=parts.get)
    if need.activations > need.total / 2:
        part += f", mostly activations of train.micro_batch_size={t.micro_batch_size} x train.seq_len={t.seq_len}"
    return part


def check_training_memory(cfg: Config, device: torch.device, world_size: int = 1, processes_here: int = 1) -> None:
    """Raise ConfigError when this process's share of the run (and `processes_here` processes of this
    machine together, where they share its RAM) exceeds the free memory. Every process first builds the
    whole model in host memory (fp32), then keeps its part and moves it to its device."""
    if cfg.train.skip_memory_check:
        return
    need = training_memory(cfg, world_size, device.type)
    built = 4 * count_parameters(cfg.model).total
    per_process = f"an estimated {need.describe()} per process"
    if device.type == "cpu":
        checks = [(torch.device("cpu"), max(need.total, built) * processes_here, per_process)]
    else:
        checks = [(device, need.total, per_process),
                  (torch.device("cpu"), built * processes_here,
                   f"{built / GiB:,.1f} GiB of host memory per process to build the model before it moves to {device}")]
    for where, required, what in checks:
        free, name = free_memory(where)
        if required > free:
            shared = processes_here > 1 and where.type == "cpu"
            together = f" ({processes_here} processes on this machine)" if shared else ""
            raise ConfigError(
                f"this run needs {what}{together}, most of it for {largest_part(cfg, need)}, and {name} has "
                f"{free / GiB:,.1f} GiB free: {FIX}")
