import math

import pytest
import torch

from dsmtp.config import config_from_dict, load_config
from dsmtp.model import DeepSeekV3
from dsmtp.parallel.topology import ensure_initialized
from dsmtp.train import schedules
from dsmtp.train.flops import flops_per_token
from dsmtp.train.optim import build_optimizer, clipped_step, parameter_groups
from tests.train_helpers import TINY_MODEL


def train_cfg(**kw):
    return config_from_dict({"train": kw}).train


def test_warmup_then_cosine_by_hand():
    t = train_cfg(steps=10, warmup_steps=2, lr=1.0, min_lr=0.1, lr_schedule="cosine")
    lrs = [schedules.learning_rate(t, s) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    # steps 2..9 decay over 7 intervals: step 2 at the peak, step 9 at min_lr, halfway point at step 5.5
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1)
    assert schedules.learning_rate(t, 4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 7)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_constant_then_decay_by_hand():
    t = train_cfg(steps=20, warmup_steps=2, lr=2.0, min_lr=0.2, lr_schedule="constant_decay",
                  decay_start_fraction=0.5)
    assert schedules.learning_rate(t, 0) == pytest.approx(1.0)
    assert [schedules.learning_rate(t, s) for s in range(2, 11)] == [2.0] * 9  # plateau up to step 10
    # decay from step 10 to step 19 (9 intervals)
    assert schedules.learning_rate(t, 13) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 3 / 9)))
    assert schedules.learning_rate(t, 19) == pytest.approx(0.2)


def test_lambda_and_gamma_piecewise_by_tokens():
    t = train_cfg(mtp_weight_schedule=[[0, 0.3], [1000, 0.1]], bias_update_schedule=[[0, 0.001], [500, 0.0005], [2000, 0]])
    assert [schedules.mtp_weight(t, n) for n in (0, 999, 1000, 10**9)] == [0.3, 0.3, 0.1, 0.1]
    assert [schedules.bias_update_rate(t, n) for n in (0, 499, 500, 1999, 2000)] == [0.001, 0.001, 0.0005, 0.0005, 0.0]


def test_no_weight_decay_on_norms_and_vectors():
    ensure_initialized()
    model = DeepSeekV3(config_from_dict({"model": TINY_MODEL, "train": {"seq_len": 16}}).model)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "layers.0.attn_norm.weight" in no_decay_names and "mtp.0.enorm.weight" in no_decay_names
    assert all(n.endswith("norm.weight") for n in no_decay_names)  # this model has no biases
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"embed.weight", "head.weight", "layers.1.ffn.router.weight", "layers.1.ffn.experts.w13"} <= decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    assert not any("expert_bias" in n for n in decay_names | no_decay_names)  # a buffer, never optimized


def _two_models_with_grads(grad_scale: float):
    """Two identical tiny MLPs with the same gradients (times grad_scale), and the config."""
    cfg = train_cfg(lr=1e-2, weight_decay=0.1, grad_clip=1.0)
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(32, 8)
    for m in models:
        (m(x).pow(2).sum() * grad_scale).backward()
    return cfg, models


@pytest.mark.parametrize("grad_scale", [1e-3, 1e3])  # norm below the clip (no clipping) and far above it
def test_clipped_step_equals_clip_grad_norm_then_adamw(grad_scale):
    cfg, (ours, ref) = _two_models_with_grads(grad_scale)
    opt, ref_opt = build_optimizer(ours, cfg), build_optimizer(ref, cfg)
    initial = ours[0].weight.detach().clone()
    for _ in range(3):
        norm, skipped = clipped_step(opt, ours.parameters(), cfg.grad_clip)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
        ref_opt.step()
        assert not skipped and norm.item() == pytest.approx(ref_norm.item(), rel=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert not torch.equal(ours[0].weight, initial)  # it did train


@pytest.mark.parametrize("bad", ["nan_grad", "skip_flag"])
def test_clipped_step_skip_changes_nothing(bad):
    cfg, (model, _) = _two_models_with_grads(1.0)
    opt = build_optimizer(model, cfg)
    clipped_step(opt, model.parameters(), cfg.grad_clip)  # one real step: moments exist
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    if bad == "nan_grad":
        model[0].weight.grad[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    norm, skipped = clipped_step(opt, model.parameters(), cfg.grad_clip, skip=torch.tensor(bad == "skip_flag"))
    assert skipped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in state.items())  # moments and step count
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # nothing left for a later step


def test_flops_per_token_matches_design_reference():
    cfg = load_config("configs/small.yaml")
    assert flops_per_token(cfg.model, 4096) / 1e9 == pytest.approx(1.95, abs=0.01)
    cfg = load_config("configs/small.yaml", ["model.mtp_depth=0"])
    assert flops_per_token(cfg.model, 4096) / 1e9 == pytest.approx(1.63, abs=0.01)
