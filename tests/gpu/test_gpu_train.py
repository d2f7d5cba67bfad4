"""The training loop on CUDA: a step queues its work and returns without waiting for the device."""

from __future__ import annotations

import pytest
import torch

from dsmtp.parallel.topology import ensure_initialized
from dsmtp.train.trainer import Trainer
from tests.distributed.launch import relative_error
from tests.train_helpers import prepare_tiny_corpus, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_training_step_never_waits_for_the_device(tmp_path, state_dtype):
    """CUDA's sync debug mode raises on any host-device synchronisation (.item(), .cpu(), a blocking
    copy, nonzero, ...) inside a whole optimizer step: forward, backward, clipping, the skip decision,
    AdamW (fused, or ours with bf16 moments), router-bias update. The statistics it returns are read
    afterwards, once."""
    ensure_initialized()
    data = prepare_tiny_corpus(tmp_path / "data")
    trainer = Trainer(tiny_config(tmp_path / "run", data, steps=4, log_interval=100, save_interval=100,
                                  eval_interval=100, optimizer_state_dtype=state_dtype))
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


def test_graphed_backward_gradients_match_eager(tmp_path):
    """Every call of the trainer's GraphedBackward (3 eager, then capture, then replays) against
    backward_pass run eagerly on the same weights and micro-batches, with an optimizer step between
    calls: a replay must read the current weights and the new batch, and hand back fresh gradients."""
    ensure_initialized()
    data = prepare_tiny_corpus(tmp_path / "data")
    trainer = Trainer(tiny_config(tmp_path / "run", data, steps=8, cuda_graph=True))
    params = list(trainer.model.parameters())
    worst = 0.0
    for call in range(7):
        batches = torch.stack([next(trainer.data.train) for _ in range(trainer.cfg.train.grad_accum)])
        for p in params:
            p.grad = None
        ref_sums, _ = trainer.backward_pass(batches, 0.3)  # it moves each micro-batch to the device
        ref_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        sums, finite = trainer.graphed_backward(batches, 0.3)
        assert finite.item()
        ref_avg, avg = ref_sums.averages(), sums.averages()
        for key, value in ref_avg.items():
            assert avg[key] == pytest.approx(value, rel=1e-4), (call, key)
        for (name, _), p, ref in zip(trainer.model.named_parameters(), params, ref_grads):
            assert p.grad is not None, (call, name)
            err = relative_error(p.grad, ref)
            worst = max(worst, err)
            assert err < 1e-2, (call, name, err)
        trainer.optimizer_step(1e-3, 1e-3, finite)
    assert trainer.graphed_backward.graph is not None
    print(f"worst relative gradient error, graphed vs eager: {worst:.2e}")


@pytest.mark.parametrize("compile_layers", [False, True])
def test_cuda_graph_training_matches_eager(tmp_path, compile_layers):
    """train.cuda_graph against the same run launched kernel by kernel: 3 eager warm-up steps, then the
    captured graph replays steps 4-7 (with an evaluation and a checkpoint between replays). Same losses
    at every step, and each tensor's total update (weights, router biases) the same to 1e-3 relative
    (H200: 0 with eager layers, 2e-7 compiled; before autocast's weight cache was turned off, 0.26)."""
    ensure_initialized()
    data = prepare_tiny_corpus(tmp_path / "data")
    runs, initial = {}, {}
    for graph in (False, True):
        trainer = Trainer(tiny_config(tmp_path / f"run-{graph}", data, steps=7, log_interval=1, eval_interval=5,
                                      save_interval=5, cuda_graph=graph, compile=compile_layers))
        initial[graph] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.run()
        runs[graph] = trainer
    assert runs[True].graphed_backward.graph is not None  # the later steps really were replays
    losses = {g: [r["loss"] for r in t.log.records() if r["kind"] == "train"] for g, t in runs.items()}
    assert len(losses[True]) == 7
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-3, atol=0)
    for name, value in initial[False].items():
        assert torch.equal(initial[True][name], value), name  # both runs start from the same weights
    start = initial[False]
    eager, graphed = (dict(t.model.state_dict()) for t in (runs[False], runs[True]))
    errors = {name: relative_error(graphed[name] - start[name], value - start[name])
              for name, value in eager.items() if value.is_floating_point() and not torch.equal(value, start[name])}
    assert errors
    print("largest relative update differences:", sorted(errors.items(), key=lambda kv: -kv[1])[:4])
    assert max(errors.values()) < 1e-3, errors


@pytest.mark.parametrize("compile_layers,slow_update", [(False, False), (False, True), (True, True)],
                         ids=["eager", "eager-slow_update", "compiled-slow_update"])
def test_overlapped_update_matches_the_update_in_turn(tmp_path, monkeypatch, compile_layers, slow_update):
    """train.overlap_update (the update on a side stream, stage by stage, while the next forward runs)
    against the same run updating in turn: 7 steps with an evaluation and a checkpoint between them,
    bf16 parameters over fp32 masters. Any stage the forward did not wait for would read half-updated or
    stale weights; the same kernels in the same order per tensor give the same weights, masters and
    losses bit for bit. slow_update: every stage's update starts with a ~10 ms spin on its stream and the
    loss is read only at the end, so the forward reaches each stage before its update is done and the host
    queues steps ahead of the device, as in a real run (a tiny model's update is otherwise done long before
    the next forward needs it: without the spin this test passed under a CUDA graph whose waits did not hold)."""
    ensure_initialized()
    data = prepare_tiny_corpus(tmp_path / "data")
    log_interval = 7 if slow_update else 1
    runs = {}
    for overlap in (False, True):
        trainer = Trainer(tiny_config(tmp_path / f"run-{overlap}", data, steps=7, log_interval=log_interval,
                                      eval_interval=5, save_interval=5, compile=compile_layers,
                                      optimizer_state_dtype="bf16", param_dtype="bf16", precision="bf16",
                                      grad_accum=1, overlap_update=overlap))
        assert (trainer.overlap is not None) == overlap
        if slow_update:
            update = trainer.optimizer._update

            def spun_update(*args, update=update):
                torch.cuda._sleep(20_000_000)
                update(*args)
            monkeypatch.setattr(trainer.optimizer, "_update", spun_update)
        trainer.run()
        torch.cuda.synchronize()
        runs[overlap] = trainer
    losses = {o: [r["loss"] for r in t.log.records() if r["kind"] == "train"] for o, t in runs.items()}
    assert len(losses[True]) == 7 // log_interval and losses[True] == losses[False]
    in_turn, overlapped = (dict(t.model.state_dict()) for t in (runs[False], runs[True]))
    for name, value in in_turn.items():
        assert torch.equal(overlapped[name], value), name
    for (p, q) in zip(runs[False].model.parameters(), runs[True].model.parameters()):
        assert torch.equal(runs[True].optimizer.state[q]["master"], runs[False].optimizer.state[p]["master"])


@pytest.mark.parametrize("compile_layers,graph", [(False, False), (True, False), (False, True)],
                         ids=["eager", "compiled", "cuda_graph"])
def test_parallel_heads_one_at_a_time_matches_plain_backward(tmp_path, compile_layers, graph):
    """Parallel heads (D = 3) under bf16 autocast on CUDA: the one-head-at-a-time backward (each head's
    backward inside the forward) hands back the plain backward's gradients and losses, eagerly,
    compiled, and captured in a CUDA graph (compared at a replay)."""
    ensure_initialized()
    data = prepare_tiny_corpus(tmp_path / "data")
    grads, averages = {}, {}
    for one_at_a_time in (False, True):
        trainer = Trainer(tiny_config(tmp_path / f"run-{one_at_a_time}", data, model={"mtp_kind": "parallel",
                                      "mtp_depth": 3}, compile=compile_layers, cuda_graph=graph,
                                      mtp_heads_one_at_a_time=one_at_a_time))
        batches = torch.stack([next(trainer.data.train) for _ in range(trainer.cfg.train.grad_accum)])
        run = trainer.graphed_backward or trainer.backward_pass
        for _ in range(5 if graph else 1):  # a graph: 3 eager calls, the capture, then a replay
            for p in trainer.model.parameters():
                p.grad = None
            sums, finite = run(batches, 0.3)
        assert finite.item()
        grads[one_at_a_time] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        averages[one_at_a_time] = sums.averages()
    assert set(grads[True]) == set(grads[False])
    for key, value in averages[False].items():
        assert averages[True][key] == pytest.approx(value, rel=1e-3), key
    errors = {n: relative_error(g, grads[False][n]) for n, g in grads[True].items()}
    print("largest relative gradient differences:", sorted(errors.items(), key=lambda kv: -kv[1])[:4])
    assert max(errors.values()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_norm_in_one_launch_matches_float64(dtype):
    """AdamWLowPrecisionMoments.grad_norm (clipping's norm, one Triton launch) against float64, over the
    small config's parameter shapes; an inf gradient gives an inf norm (the step is then skipped)."""
    from dsmtp.config import load_config
    from dsmtp.convert.names import our_shapes
    from dsmtp.train.optim import AdamWLowPrecisionMoments

    torch.manual_seed(0)
    grads = [torch.randn(shape, device="cuda", dtype=dtype)
             for shape in our_shapes(load_config("configs/small.yaml").model).values()]
    optimizer = AdamWLowPrecisionMoments([torch.nn.Parameter(torch.zeros(1, device="cuda"))], lr=1e-3,
                                         betas=(0.9, 0.95), eps=1e-8)
    expected = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt()
    norm = optimizer.grad_norm(grads)
    assert norm.dtype == torch.float32 and abs(norm.item() - expected.item()) <= 1e-5 * expected.item()
    grads[3][0] = float("inf")
    assert optimizer.grad_norm(grads).isinf()


@pytest.mark.parametrize("state_dtype,param_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16)])
def test_multi_tensor_adamw_matches_cpu_reference(state_dtype, param_dtype):
    """AdamWLowPrecisionMoments on CUDA (one Triton launch per group: multi_tensor_adamw) against
    adamw_update run eagerly on the CPU: 6 clipped steps, one of them skipped, over matrices, vectors
    and a 3-D expert stack; moments in bf16 and, where nothing rounds, in fp32; fp32 parameters, and
    bf16 ones over fp32 master weights (train.param_dtype=bf16).
    The bf16 moments may round a tie the other way, which moves a parameter by ~lr * 2^-8 = 4e-5 and
    compounds over the steps; a wrong formula moves it by ~lr = 1e-2."""
    from torch import nn

    from dsmtp.train.optim import AdamWLowPrecisionMoments, clipped_step, parameter_groups

    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (4, 16, 8), (1000,), (3, 5)]
    cpu = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    gpu = [nn.Parameter(p.detach().cuda()) for p in cpu]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    optimizers = [AdamWLowPrecisionMoments(parameter_groups(ps, 0.1), **hyper, state_dtype=state_dtype,
                                           param_dtype=param_dtype) for ps in (cpu, gpu)]
    for step in range(6):
        grads = [torch.randn(s, generator=gen) * (float("inf") if step == 3 and i == 0 else 1.0)
                 for i, s in enumerate(shapes)]
        for params, optimizer in zip((cpu, gpu), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.to(p.device, p.dtype)
            clipped_step(optimizer, params, max_norm=1.0)
    for a, b in zip(cpu, gpu):
        assert a.dtype == b.dtype == param_dtype
        atol = 5e-4 if state_dtype == torch.bfloat16 else 1e-6
        # a bf16 parameter: its master's rounding, which a master 5e-4 away can take one ulp (2^-8) further
        torch.testing.assert_close(b.detach().cpu().float(), a.detach().float(), atol=atol,
                                   rtol=0 if param_dtype == torch.float32 else 2 ** -7)
        if param_dtype != torch.float32:
            ours, reference = optimizers[1].state[b]["master"], optimizers[0].state[a]["master"]
            assert ours.dtype == reference.dtype == torch.float32
            torch.testing.assert_close(ours.cpu(), reference, rtol=0, atol=atol)
        for key in ("exp_avg", "exp_avg_sq"):
            ours, reference = optimizers[1].state[b][key], optimizers[0].state[a][key]
            assert ours.dtype == reference.dtype == state_dtype
            # one bf16 rounding step (2^-7 relative) at the scale of the tensor's largest entry
            rtol = 2 ** -7 if state_dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(ours.cpu().float(), reference.float(), rtol=rtol,
                                       atol=rtol * reference.float().abs().max().item())
        assert optimizers[1].state[b]["step"].item() == optimizers[0].state[a]["step"].item() == 5
