"""The training memory estimate (dsmtp.model.params.training_memory) against what a real step holds, and the
check that refuses a run the device cannot hold (dsmtp.train.memory).

References: the built model's parameters, its gradients and AdamW's state after one step (exact), and the
tensors autograd saves for the backward pass of one micro-batch, collected with saved-tensor hooks.
"""

from __future__ import annotations

import pytest
import torch

from dsmtp.config import ConfigError, config_from_dict, config_to_dict
from dsmtp.model import DeepSeekV3
from dsmtp.model.params import GiB, count_parameters, routed_expert_parameters, training_memory
from dsmtp.parallel.topology import ensure_initialized
from dsmtp.train import memory
from dsmtp.train.optim import build_optimizer
from tests.helpers import tiny_model_config

BATCH, SEQ = 2, 32


def tiny(model: dict | None = None, **train):
    return config_from_dict({"model": config_to_dict(tiny_model_config(**(model or {}))),
                             "train": {"seq_len": SEQ, "micro_batch_size": BATCH, "precision": "fp32", **train}})


def saved_activation_bytes(model: DeepSeekV3, tokens: torch.Tensor, seq_len: int) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded, shared storage once)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens[:, :seq_len], tokens[:, 1:])
    out.loss.backward()
    return sum(n for ptr, n in storages.items() if ptr not in parameters)


@pytest.mark.parametrize("model, train", [
    ({}, {}),
    ({"mtp_depth": 0, "q_lora_rank": None}, {}),
    ({"first_k_dense_replace": 0, "num_experts_per_tok": 4, "vocab_size": 1024}, {}),
    ({"hidden_size": 64, "num_heads": 8}, {"activation_recompute_every": 2}),
], ids=["tiny", "no-mtp-direct-q", "all-moe-top4-vocab1k", "wider-recompute-half"])
def test_estimate_matches_a_real_step(model, train):
    cfg = tiny(model, **train)
    estimate = training_memory(cfg)
    ensure_initialized()
    torch.manual_seed(0)
    net = DeepSeekV3(cfg.model).train()
    net.set_activation_recompute(cfg.train.activation_recompute_every)
    optimizer = build_optimizer(net, cfg.train)
    tokens = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ + cfg.model.mtp_depth + 1))
    activations = saved_activation_bytes(net, tokens, SEQ)
    optimizer.step()

    assert estimate.parameters == sum(p.numel() * p.element_size() for p in net.parameters())
    assert estimate.gradients == sum(p.grad.numel() * p.grad.element_size() for p in net.parameters())
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    assert estimate.optimizer == sum(v.numel() * v.element_size() for v in moments)
    # a lower bound, within 5% (measured: 1.0-2.5% below on these shapes)
    assert 0.95 * activations <= estimate.activations <= activations


def test_routed_expert_count_and_sharding_by_hand():
    cfg = tiny({"mtp_depth": 2})
    with torch.device("meta"):
        net = DeepSeekV3(cfg.model)
    experts = sum(p.numel() for n, p in net.named_parameters() if ".experts." in n)
    assert routed_expert_parameters(cfg.model) == experts
    dense = count_parameters(cfg.model).total - experts

    # 8 ranks as tp=2 x dp=4 with ep=2: a rank holds half the dense weights and a quarter of the experts;
    # ZeRO-1 shards the moments over dp=4 (dense) and the expert-data-parallel group of 2 (experts). Each
    # dp rank reads a quarter of the micro-batch, and tp splits its activations in two.
    sharded = config_from_dict({**config_to_dict(cfg), "parallel": {"tp": 2, "ep": 2, "zero_stage": 1},
                                "train": {**config_to_dict(cfg.train), "micro_batch_size": 4 * BATCH}})
    m = training_memory(sharded, world_size=8)
    assert m.parameters == 4 * (dense // 2 + experts // 4)
    assert m.gradients == m.parameters
    assert m.optimizer == 8 * (dense // 8 + experts // 8)
    assert m.activations == sum(v // 2 for v in training_memory(cfg).activations_by_part.values())


def test_check_refuses_what_does_not_fit_and_the_override_skips_it(monkeypatch):
    cfg = tiny()
    need = training_memory(cfg).total
    free = {"cpu": need - 1}
    monkeypatch.setattr(memory, "free_memory", lambda device: (free[device.type], f"the {device.type}"))
    with pytest.raises(ConfigError, match=r"GiB .* the cpu has .* free: .*train.skip_memory_check=true"):
        memory.check_training_memory(cfg, torch.device("cpu"))
    free["cpu"] = need
    memory.check_training_memory(cfg, torch.device("cpu"))
    # four processes on one machine share its RAM
    with pytest.raises(ConfigError, match="4 processes on this machine"):
        memory.check_training_memory(cfg, torch.device("cpu"), world_size=4, processes_here=4)

    # on a GPU: the device holds the run, host memory builds the model first (every process)
    cuda = tiny(precision="bf16")
    free.update(cuda=training_memory(cuda, 1, "cuda").total, cpu=4 * count_parameters(cuda.model).total)
    memory.check_training_memory(cuda, torch.device("cuda", 0))
    free["cuda"] -= 1
    with pytest.raises(ConfigError, match="the cuda has"):
        memory.check_training_memory(cuda, torch.device("cuda", 0))
    free["cuda"] += 1
    with pytest.raises(ConfigError, match="to build the model before it moves to cuda:0"):
        memory.check_training_memory(cuda, torch.device("cuda", 0), processes_here=2)

    free.update(cpu=0, cuda=0)
    skipping = tiny(skip_memory_check=True)
    memory.check_training_memory(skipping, torch.device("cpu"))


def test_this_machine_holds_tiny_yaml_and_refuses_100000_mtp_modules():
    """Against this machine's real free memory: configs/tiny.yaml trains; 100000 MTP modules do not."""
    from dsmtp.config import load_config

    memory.check_training_memory(load_config("configs/tiny.yaml"), torch.device("cpu"))
    huge = load_config("configs/tiny.yaml", ["model.mtp_depth=100000"])
    assert training_memory(huge).total > 1000 * GiB
    with pytest.raises(ConfigError, match=r"the 100000 MTP modules \(model.mtp_depth=100000\)"):
        memory.check_training_memory(huge, torch.device("cpu"))


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_memory_cgroup_limit_is_the_free_memory_of_a_container_or_job(tmp_path, monkeypatch):
    """A slurm job or container sees the node's RAM in psutil; its cgroup says what it may use: the
    tightest limit minus usage over its cgroup and the ancestors, v2 and v1, unlimited ones ignored."""
    fs, proc = tmp_path / "cgroup", tmp_path / "self-cgroup"
    # v2: job limit 8 GiB with 3 used, its parent (the slurm user) 6 GiB with 5 used, the root none
    _write(proc, "0::/slurm/uid_0/job_7\n")
    _write(fs / "slurm/uid_0/job_7/memory.max", f"{8 * GiB}\n")
    _write(fs / "slurm/uid_0/job_7/memory.current", f"{3 * GiB}\n")
    _write(fs / "slurm/uid_0/memory.max", f"{6 * GiB}\n")
    _write(fs / "slurm/uid_0/memory.current", f"{5 * GiB}\n")
    _write(fs / "slurm/memory.max", "max\n")
    _write(fs / "slurm/memory.current", f"{9 * GiB}\n")
    assert memory.cgroup_memory_free(proc, fs) == 1 * GiB
    # v1 (hybrid: the unified line carries no memory controller here): the memory hierarchy's files
    _write(proc, "4:memory:/docker/abc\n1:cpu:/docker/abc\n0::/\n")
    _write(fs / "memory/docker/abc/memory.limit_in_bytes", f"{2 * GiB}\n")
    _write(fs / "memory/docker/abc/memory.usage_in_bytes", f"{GiB // 2}\n")
    _write(fs / "memory/memory.limit_in_bytes", "9223372036854771712\n")
    _write(fs / "memory/memory.usage_in_bytes", f"{20 * GiB}\n")
    assert memory.cgroup_memory_free(proc, fs) == 3 * GiB // 2
    # no limit anywhere, or nothing readable
    _write(fs / "memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n")
    assert memory.cgroup_memory_free(proc, fs) is None
    assert memory.cgroup_memory_free(tmp_path / "missing", fs) is None

    # the check names the cgroup when its limit is the tighter one
    monkeypatch.setattr(memory, "cgroup_memory_free", lambda: 1024)
    with pytest.raises(ConfigError, match=r"this process's memory cgroup .* has 0.0 GiB free"):
        memory.check_training_memory(tiny(), torch.device("cpu"))
