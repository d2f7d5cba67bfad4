"""Data-parallel collectives of the training loop, with 2 gloo processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsmtp.config import config_from_dict
from tests.train_helpers import TINY_MODEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    from megatron.core import parallel_state

    from dsmtp.model import DeepSeekV3, moe_layers
    from dsmtp.parallel import collectives

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        torch.manual_seed(0)
        model = DeepSeekV3(config_from_dict({"model": TINY_MODEL, "train": {"seq_len": 16}}).model)
        loads = [torch.arange(4.0) * (rank + 1) + 10 * i for i, _ in enumerate(moe_layers(model))]
        for moe, load in zip(moe_layers(model), loads):
            moe.tokens_per_expert.copy_(load)
        collectives.reduce_expert_loads(model)
        results[rank] = {
            "dp": (collectives.dp_rank(), collectives.dp_size()),
            "loads": [m.tokens_per_expert.clone() for m in moe_layers(model)],
            "any": (collectives.any_rank(rank == 1), collectives.any_rank(False)),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_expert_loads_and_skip_flags_reduce_over_data_parallel_ranks():
    results = mp.Manager().dict()
    mp.start_processes(_worker, args=(_free_port(), results), nprocs=2, start_method="spawn", join=True)
    for rank in range(2):
        r = results[rank]
        assert r["dp"] == (rank, 2)
        # rank 0 holds arange(4) + 10 i, rank 1 2 * arange(4) + 10 i: the sum is 3 * arange(4) + 20 i
        for i, load in enumerate(r["loads"]):
            assert torch.equal(load, torch.arange(4.0) * 3 + 20 * i)
        assert r["any"] == (True, False)  # one rank's non-finite loss makes every rank skip
