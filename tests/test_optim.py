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


def bf16_representable_grads(params, step: int, scale: float = 1.0) -> None:
    """set_grads rounded to bf16 and kept in the parameters' dtype: the same gradient values reach a bf16
    and an fp32 parameter."""
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).bfloat16().to(p.dtype)


def test_bf16_params_update_fp32_masters_as_torch_adamw_updates_fp32_params():
    """train.param_dtype=bf16: the master weights follow torch.optim.AdamW on fp32 parameters given the
    same gradients (clipped, norms below and far above the limit), the bf16 parameters are their rounded
    copies, and the gradients' norm is accumulated in fp32."""
    ours, ref = make_params(), make_params()
    opt = AdamWLowPrecisionMoments(groups(ours), **HYPER, state_dtype=torch.float32, param_dtype=torch.bfloat16)
    assert {p.dtype for p in ours} == {torch.bfloat16}
    torch_opt = torch.optim.AdamW(groups(ref), **HYPER, foreach=False)
    for step in range(6):
        scale = 100.0 if step % 2 else 0.01
        bf16_representable_grads(ours, step, scale)
        bf16_representable_grads(ref, step, scale)
        norm, _ = clipped_step(opt, ours, max_norm=1.0)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 1.0), rtol=1e-6, atol=0)
        torch_opt.step()
    for p, q in zip(ours, ref):
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
        torch.testing.assert_close(master, q.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p, master.to(torch.bfloat16))
        assert not torch.equal(master, p.float())  # the masters hold what bf16 cannot


def test_build_optimizer_casts_parameters_not_buffers():
    """The fp32 values become the master weights exactly; the routers' expert_bias buffers stay fp32."""
    from dsmtp.model.model import DeepSeekV3
    from tests.helpers import tiny_model_config

    model = DeepSeekV3(tiny_model_config())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = build_optimizer(model, TrainConfig(optimizer_state_dtype="bf16", param_dtype="bf16", precision="bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for name, b in model.named_buffers() if name.endswith("expert_bias")} == {torch.float32}
    for name, p in model.named_parameters():
        assert torch.equal(opt.state[p]["master"], before[name]), name


def test_fp32_param_checkpoint_loads_into_bf16_params():
    """A state without master weights (an fp32-parameter run) gives the loaded parameters' values to the
    masters at the next step, instead of keeping the masters of the freshly built model."""
    params = make_params()
    fp32 = AdamWLowPrecisionMoments(groups(params), **HYPER)
    set_grads(params, 0)
    fp32.step()
    copies = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    opt = AdamWLowPrecisionMoments(groups(copies), **HYPER, param_dtype=torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(copies, params):
            p.copy_(q)  # the checkpoint's model weights, rounded into the bf16 parameters
    opt.load_state_dict(fp32.state_dict())
    assert all("master" not in opt.state[p] for p in copies)
    bf16_representable_grads(copies, 1)
    opt.step()
    for p in copies:
        assert opt.state[p]["master"].dtype == torch.float32 and float(opt.state[p]["step"]) == 2
        assert torch.equal(p, opt.state[p]["master"].bfloat16())
    assert max((p.float() - q).abs().max().item() for p, q in zip(copies, params)) < 0.1  # moved from there, not from 0


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_update_matches_the_reference_in_triton_interpreter(param_dtype, iters):
    """multi_tensor_adamw's kernel (Triton's interpreter on the CPU: tests/conftest.py turns it on without
    CUDA) against adamw_update_all: bf16 moments, fp32 parameters or bf16 ones over fp32 masters, partial
    blocks (and, with 3 blocks a program, programs whose last blocks lie past the tensor's end), one skipped
    step. The compiled kernel runs against the same reference in tests/gpu."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off where CUDA is present: tests/gpu runs the compiled kernel")
    from dsmtp.train.multi_tensor_adamw import MultiTensorAdamW
    from dsmtp.train.optim import adamw_update_all

    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 13), (7,), (3, 200)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    runs = {}
    for name, update in (("reference", adamw_update_all), ("kernel", MultiTensorAdamW(block=128, iters=iters))):
        masters = [w.clone() for w in weights] if param_dtype != torch.float32 else None
        params = [w.to(param_dtype) for w in weights] if masters else [w.clone() for w in weights]
        moments = [[torch.zeros(s, dtype=torch.bfloat16) for s in shapes] for _ in range(2)]
        steps = [torch.zeros(()) for _ in shapes]
        step_gen = torch.Generator().manual_seed(1)
        for step in range(4):
            grads = [torch.randn(s, generator=step_gen).to(param_dtype) for s in shapes]
            update(params, grads, *moments, steps, torch.tensor(1e-2), 0.9, 0.95, 1e-8, 0.1,
                   torch.tensor(1.5), torch.tensor(step == 2), masters)
        runs[name] = dict(params=params, weights=masters or params, exp_avg=moments[0], exp_avg_sq=moments[1])
        runs[name]["steps"] = steps
    # The bf16 moments may round a tie the other way, which moves a weight by ~lr * 2^-8 = 4e-5 and
    # compounds over the steps (a wrong formula moves it by ~lr = 1e-2); a bf16 parameter then by one ulp.
    for kind in ("params", "weights", "exp_avg", "exp_avg_sq"):
        for a, b in zip(runs["kernel"][kind], runs["reference"][kind]):
            assert a.dtype == b.dtype
            rtol = 0 if kind == "weights" or a.dtype == torch.float32 and kind == "params" else 2**-7
            atol = 5e-4 if kind in ("params", "weights") else 2**-7 * b.float().abs().max().item()
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)
    assert all(float(s) == 3 for s in runs["kernel"]["steps"])


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_sum_of_squares_in_triton_interpreter(dtype, iters):
    """The clipping norm's kernel (MultiTensorAdamW.sum_of_squares, Triton's interpreter) against a float64
    sum over tensors that end inside a block, and inside a program's blocks."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off where CUDA is present: tests/gpu runs the compiled kernel")
    from dsmtp.train.multi_tensor_adamw import MultiTensorAdamW

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen).to(dtype) for s in [(40, 13), (7,), (3, 200), (128,)]]
    expected = sum(t.double().square().sum() for t in tensors)
    got = MultiTensorAdamW(block=128, iters=iters).sum_of_squares(tensors)
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()


def test_param_dtype_bf16_is_refused_where_its_gradients_would_round_or_its_masters_cannot_live():
    cfg = Config()
    cfg.train.param_dtype, cfg.train.precision, cfg.train.grad_accum = "bf16", "bf16", 2
    with pytest.raises(ConfigError, match=r"train.param_dtype=bf16 .*train.grad_accum to 1"):
        validate(cfg)
    cfg.train.grad_accum, cfg.train.precision = 1, "auto"
    with pytest.raises(ConfigError, match=r"train.param_dtype=bf16 .*train.precision to bf16"):
        validate(cfg)
    cfg.train.precision = "bf16"
    validate(cfg)
    with pytest.raises(ConfigError, match=r"train.param_dtype=bf16 .*not under torchrun"):
        validate(cfg, world_size=2)
    cfg.train.param_dtype = "fp16"
    with pytest.raises(ConfigError, match=r"train.param_dtype='fp16' must be one of fp32, bf16"):
        validate(cfg)


def test_memory_estimate_counts_bf16_params_and_their_masters():
    from dsmtp.model.params import training_memory

    cfg = Config()
    fp32 = training_memory(cfg)
    cfg.train.param_dtype = "bf16"
    bf16 = training_memory(cfg)
    assert bf16.parameters * 2 == fp32.parameters and bf16.gradients * 2 == fp32.gradients
    assert bf16.optimizer == fp32.optimizer + fp32.parameters  # two moments plus a 4-byte master per parameter


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_staged_step_equals_one_step(param_dtype):
    """step(stages=...) (dsmtp.train.overlap's order: stage by stage, each across the parameter groups)
    against the plain step, over clipped steps and a skipped one: the same weights, moments and masters
    bit for bit, and after_stage called once a stage, in order."""
    runs = []
    for staged in (False, True):
        params = make_params()
        optimizer = AdamWLowPrecisionMoments(groups(params), **HYPER, param_dtype=param_dtype)
        stages = [[params[2], params[0]], [params[1]]]  # across the groups, out of group order
        called = []
        for step in range(4):
            gen = torch.Generator().manual_seed(100 + step)
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * (float("inf") if step == 2 else 1.0)).to(p.dtype)
            stepper = (lambda: optimizer.step(stages=stages, after_stage=called.append)) if staged else None
            clipped_step(optimizer, params, max_norm=1.0, step=stepper)
        assert called == ([0, 1] * 4 if staged else [])
        runs.append([params, [optimizer.state[p] for p in params]])
    for a, b in zip(*(params for params, _ in runs)):
        assert a.dtype == b.dtype == param_dtype and torch.equal(a, b)
    for a, b in zip(*(states for _, states in runs)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_forward_stages_hold_every_parameter_once_in_forward_order():
    """dsmtp.train.overlap's stages: the model's own parameters (embedding, head, final norm) first, then each
    trunk layer's, then each MTP module's; together every parameter exactly once."""
    from dsmtp.config import ModelConfig
    from dsmtp.model import DeepSeekV3
    from dsmtp.parallel.topology import ensure_initialized
    from dsmtp.train.overlap import forward_stages

    ensure_initialized()
    model = DeepSeekV3(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                   moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                                   topk_group=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=8, max_position_embeddings=64, mtp_depth=2))
    entries, stages = forward_stages(model)
    assert entries == [model, *model.layers, *model.mtp] and len(stages) == 1 + 2 + 2
    names = {id(p): n for n, p in model.named_parameters()}
    staged = [names[id(p)] for stage in stages for p in stage]
    assert sorted(staged) == sorted(names.values())  # every parameter, none twice
    assert {names[id(p)] for p in stages[0]} == {"embed.weight", "norm.weight", "head.weight"}
    for i in range(2):
        assert all(names[id(p)].startswith(f"layers.{i}.") for p in stages[1 + i])
        assert all(names[id(p)].startswith(f"mtp.{i}.") for p in stages[3 + i])


def test_overlap_update_is_refused_where_it_cannot_run():
    cfg = Config()
    cfg.train.overlap_update = True
    with pytest.raises(ConfigError, match=r"train.overlap_update=true .*train.optimizer_state_dtype=bf16"):
        validate(cfg)
    cfg.train.optimizer_state_dtype = "bf16"
    validate(cfg)
    cfg.train.cuda_graph = True
    with pytest.raises(ConfigError, match=r"train.overlap_update=true with train.cuda_graph=true: .*set "
                                          r"train.cuda_graph=false or train.overlap_update=false"):
        validate(cfg)
    cfg.train.cuda_graph = False
    with pytest.raises(ConfigError, match=r"train.overlap_update=true .*not a step under torchrun"):
        validate(cfg, world_size=2)
    cfg.parallel.tp = 2
    with pytest.raises(ConfigError, match=r"set train.overlap_update=false or parallel.tp, pp and ep to 1"):
        validate(cfg)
