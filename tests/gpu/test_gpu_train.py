"""The training loop on CUDA: a step queues its work and returns without waiting for the device."""

from __future__ import annotations

import pytest
import torch

from dsmtp.parallel.topology import ensure_initialized
from dsmtp.train.trainer import Trainer
from tests.train_helpers import prepare_tiny_corpus, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_training_step_never_waits_for_the_device(tmp_path):
    """CUDA's sync debug mode raises on any host-device synchronisation (.item(), .cpu(), a blocking
    copy, nonzero, ...) inside a whole optimizer step: forward, backward, clipping, the skip decision,
    AdamW, router-bias update. The statistics it returns are read afterwards, once."""
    ensure_initialized()
    data = prepare_tiny_corpus(tmp_path / "data")
    trainer = Trainer(tiny_config(tmp_path / "run", data, steps=4, log_interval=100, save_interval=100,
                                  eval_interval=100))
    assert trainer.device.type == "cuda"
    trainer.train_step()  # the first step creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.grad_norm.is_cuda and result.skipped.is_cuda
    assert not result.skipped.item() and torch.isfinite(result.grad_norm).item()
    assert result.sums.averages()["loss"] > 0


@pytest.mark.parametrize("compile_layers", [False, True])
def test_cuda_graph_training_matches_eager(tmp_path, compile_layers):
    """train.cuda_graph against the same run launched kernel by kernel: 3 eager warm-up steps, then the
    captured graph replays steps 4-7 (with an evaluation and a checkpoint between replays). Same losses
    at every step, same weights, same router biases at the end."""
    ensure_initialized()
    data = prepare_tiny_corpus(tmp_path / "data")
    runs = {}
    for graph in (False, True):
        trainer = Trainer(tiny_config(tmp_path / f"run-{graph}", data, steps=7, log_interval=1, eval_interval=5,
                                      save_interval=5, cuda_graph=graph, compile=compile_layers))
        trainer.run()
        runs[graph] = trainer
    assert runs[True].graphed_backward.graph is not None  # the later steps really were replays
    losses = {g: [r["loss"] for r in t.log.records() if r["kind"] == "train"] for g, t in runs.items()}
    assert len(losses[True]) == 7
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-3, atol=0)
    eager, graphed = (dict(t.model.state_dict()) for t in (runs[False], runs[True]))
    for name, value in eager.items():
        torch.testing.assert_close(graphed[name], value, rtol=2e-2, atol=2e-4, msg=name)
