"""AdamW with bf16 moments (train.optimizer_state_dtype=bf16) against independent references: torch's
AdamW when the moments are fp32, a float64 AdamW that rounds its stored moments to bf16 as ours does,
clipping and skipped steps as clipped_step drives them, and its state through a save and a load."""

from __future__ import annotations

import io

import pytest
import torch

from dsmtp.config import Config, ConfigError, TrainConfig, validate
from dsmtp.train.optim import AdamWLowPrecisionMoments, build_optimizer, clipped_step


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape)) for shape in ((6, 5), (3, 4, 2), (7,))]


def set_grads(params, step: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale


def groups(params, weight_decay: float = 0.1):
    return [{"params": params[:2], "weight_decay": weight_decay}, {"params": params[2:], "weight_decay": 0.0}]


HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def test_fp32_moments_equal_torch_adamw_with_clipping():
    """state_dtype fp32: the same update as torch.optim.AdamW after clip_grad_norm_, for gradient norms
    below and far above the limit."""
    ours, ref = make_params(), make_params()
    opt = AdamWLowPrecisionMoments(groups(ours), **HYPER, state_dtype=torch.float32)
    torch_opt = torch.optim.AdamW(groups(ref), **HYPER, foreach=False)
    for step in range(6):
        scale = 100.0 if step % 2 else 0.01
        set_grads(ours, step, scale)
        set_grads(ref, step, scale)
        clipped_step(opt, ours, max_norm=1.0)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        torch_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(ours, ref):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], torch_opt.state[q][key], rtol=1e-6, atol=1e-12)
        assert float(opt.state[p]["step"]) == 6


def reference_adamw_bf16_moments(params64, grads_per_step, lr, betas, eps, weight_decays):
    """Float64 AdamW whose stored moments are rounded to bf16 after every update (this step's update
    uses them unrounded, as the kernel does)."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params64]
    v = [torch.zeros_like(p) for p in params64]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params64, grads)):
            g = g.double()
            m_new = b1 * m[i] + (1 - b1) * g
            v_new = b2 * v[i] + (1 - b2) * g * g
            update = (m_new / (1 - b1 ** t)) / (v_new.sqrt() / (1 - b2 ** t) ** 0.5 + eps)
            p.mul_(1 - lr * weight_decays[i]).sub_(lr * update)
            m[i], v[i] = m_new.bfloat16().double(), v_new.bfloat16().double()
    return params64, m, v


def test_bf16_moments_match_a_float64_reference_with_bf16_rounding():
    params = make_params()
    params64 = [p.detach().double().clone() for p in params]
    opt = AdamWLowPrecisionMoments(groups(params), **HYPER)
    grads_per_step = []
    for step in range(20):
        set_grads(params, step)
        grads_per_step.append([p.grad.clone() for p in params])
        opt.step()
    ref, m, v = reference_adamw_bf16_moments(params64, grads_per_step, HYPER["lr"], HYPER["betas"], HYPER["eps"],
                                             [0.1, 0.1, 0.0])
    for p, r, m_ref, v_ref in zip(params, ref, m, v):
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        # fp32 arithmetic before the rounding can land on the neighbouring bf16 value: one ulp (2^-8)
        torch.testing.assert_close(state["exp_avg"].double(), m_ref, rtol=2**-7, atol=1e-30)
        torch.testing.assert_close(state["exp_avg_sq"].double(), v_ref, rtol=2**-7, atol=1e-30)
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)
    # and the rounding matters: fp32 moments give measurably different parameters
    fp32_params = make_params()
    fp32_opt = AdamWLowPrecisionMoments(groups(fp32_params), **HYPER, state_dtype=torch.float32)
    for step in range(20):
        set_grads(fp32_params, step)
        fp32_opt.step()
    assert max((p - q).abs().max().item() for p, q in zip(params, fp32_params)) > 1e-5


def test_skipped_step_changes_nothing():
    params = make_params()
    opt = AdamWLowPrecisionMoments(groups(params), **HYPER)
    set_grads(params, 0)
    clipped_step(opt, params, 1.0)
    before = [p.detach().clone() for p in params]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    set_grads(params, 1)
    params[0].grad[0, 0] = float("nan")
    norm, skipped = clipped_step(opt, params, 1.0)
    assert bool(skipped) and not torch.isfinite(norm)
    set_grads(params, 2)
    _, skipped = clipped_step(opt, params, 1.0, skip=torch.tensor(True))
    assert bool(skipped)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        for key, value in opt.state[p].items():
            assert torch.equal(value, state[id(p)][key]), key


def test_state_dict_round_trip_keeps_bf16_and_continues_exactly():
    params = make_params()
    opt = AdamWLowPrecisionMoments(groups(params), **HYPER)
    for step in range(3):
        set_grads(params, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in saved["optim"]["state"].values())
    copies = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = AdamWLowPrecisionMoments(groups(copies), **HYPER)
    resumed.load_state_dict(saved["optim"])  # torch casts floating state to fp32 on load: stored back as bf16
    assert all(s[k].dtype == torch.bfloat16 for s in resumed.state.values() for k in ("exp_avg", "exp_avg_sq"))
    for step in range(3, 6):
        for ps in (params, copies):
            set_grads(ps, step)
        opt.step()
        resumed.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)


def test_fp32_checkpoint_state_loads_into_bf16_moments():
    params = make_params()
    fp32 = torch.optim.AdamW(groups(params), **HYPER)
    set_grads(params, 0)
    fp32.step()
    opt = AdamWLowPrecisionMoments(groups(params), **HYPER)
    opt.load_state_dict(fp32.state_dict())
    for p in params:
        torch.testing.assert_close(opt.state[p]["exp_avg"], fp32.state[p]["exp_avg"].bfloat16(), rtol=0, atol=0)


def test_build_optimizer_picks_by_config():
    params = make_params()
    assert isinstance(build_optimizer(params, TrainConfig()), torch.optim.AdamW)
    opt = build_optimizer(params, TrainConfig(optimizer_state_dtype="bf16", weight_decay=0.2))
    assert isinstance(opt, AdamWLowPrecisionMoments) and opt.state_dtype == torch.bfloat16
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


def test_deepspeed_engine_refuses_bf16_moments():
    cfg = Config()
    cfg.train.optimizer_state_dtype = "bf16"
    with pytest.raises(ConfigError, match=r"train.optimizer_state_dtype=bf16 .*parallel.engine=native"):
        validate(cfg, world_size=2)  # under torchrun (the rule lives in the one validate)


def test_memory_estimate_counts_bf16_moments_at_half():
    from dsmtp.model.params import training_memory

    cfg = Config()
    fp32 = training_memory(cfg).optimizer
    cfg.train.optimizer_state_dtype = "bf16"
    assert training_memory(cfg).optimizer * 2 == fp32
