"""Every parallel layout trains exactly as one process does (float32, gloo, CPU).

Each test runs K=3 optimizer steps of a tiny MoE model (group-limited routing, aux loss on, MTP D=2
with depth weights [1, 0.5], gradient accumulation 2, clipping active, router bias updates) under
torchrun and compares the main and per-depth MTP losses, the gradient norm and the saved parameters
(router biases included) with `common.reference_run`, a plain single-process PyTorch loop.
Sequential MTP modules run in every layout; parallel heads, with their one-head-at-a-time backward,
in layouts that cover each parallelism and both engines, against the plain single-process backward.
"""

from __future__ import annotations

import pytest

from tests.distributed import common
from tests.distributed.launch import relative_error, run_layout

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
TOL = 1e-5


def assert_same_training(result: dict, reference: dict, first_step: int = 0) -> None:
    steps = len(result["history"])
    expected = reference["history"][first_step:first_step + steps]
    for step, (got, want) in enumerate(zip(result["history"], expected), start=first_step):
        assert got["main_loss"] == pytest.approx(want["main_loss"], rel=TOL), f"main loss, step {step}"
        assert got["mtp_losses"] == pytest.approx(want["mtp_losses"], rel=TOL), f"MTP losses, step {step}"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), f"grad norm, step {step}"


def assert_same_parameters(state: dict, reference_state: dict, tol: float = TOL) -> None:
    assert set(state) == set(reference_state)
    errors = {k: relative_error(state[k], v) for k, v in reference_state.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < tol, f"{worst}: relative error {errors[worst]:.2e}"
    biases = [k for k in state if k.endswith("expert_bias")]
    assert len(biases) == 4 and all(state[k].abs().sum() > 0 for k in biases)  # the biases moved, and match


LAYOUTS = {
    "tp2": (2, {"tp": 2}),
    "ep2": (2, {"ep": 2}),
    "pp2": (2, {"pp": 2}),
    "dp2_zero1": (2, {"zero": 1}),
    "dp2_zero2": (2, {"zero": 2}),
    "pp2_ep2": (4, {"pp": 2, "ep": 2}),
    "dp4_ep2_zero2": (4, {"ep": 2, "zero": 2}),  # experts' ZeRO-2 shards over the expert-DP group
    "tp2_ep2": (4, {"tp": 2, "ep": 2}),  # experts replicated over TP, all-to-all within each TP rank's EP group
    "tp2_sp": (2, {"tp": 2, "sp": 1}),  # sequence parallel: norms, router, experts, MTP projections on S/2
    "tp2_ep2_sp": (4, {"tp": 2, "ep": 2, "sp": 1}),  # each TP rank's sequence shard through its EP group
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, reference_after_k, tmp_path):
    nproc, layout = LAYOUTS[name]
    result = run_layout(tmp_path, nproc, layout)
    assert result["sequence_parallel"] == bool(layout.get("sp")), "the worker ran sequence_parallel as asked"
    assert_same_training(result, reference)
    assert_same_parameters(result["state"], reference_after_k)


def test_resume_sharded_checkpoint_in_another_layout(reference, reference_after_k, tmp_path):
    """Save at TP=2 x PP=2 after K steps (each rank its shard), resume at EP=2 x DP=2 for 2 more steps (each
    rank reading only its slices)."""
    saved = run_layout(tmp_path / "tp2pp2", 4, {"tp": 2, "pp": 2})
    assert_same_training(saved, reference)
    assert_same_parameters(saved["state"], reference_after_k)
    resumed = run_layout(tmp_path / "ep2dp2", 2, {"ep": 2}, extra=[
        f"--resume={tmp_path / 'tp2pp2' / 'ckpt'}", f"--first-step={common.STEPS}", "--steps=2"])
    assert_same_training(resumed, reference, first_step=common.STEPS)
    assert_same_parameters(resumed["state"], reference["state"])


PARALLEL_HEAD_LAYOUTS = {
    "tp2_sp": (2, {"tp": 2, "sp": 1}),
    "pp2_ep2": (4, {"pp": 2, "ep": 2}),  # heads on the last stage, experts across EP
    "dp2_zero2": (2, {"zero": 2}),
    "deepspeed_tp2_dp2_zero1": (4, {"tp": 2, "zero": 1, "engine": "deepspeed"}),
}


@pytest.fixture(scope="module")
def parallel_heads_reference() -> dict:
    return common.reference_run(common.tiny_config(mtp_kind="parallel"))


@pytest.mark.parametrize("name", list(PARALLEL_HEAD_LAYOUTS))
def test_parallel_heads_layout_matches_single_process(name, parallel_heads_reference, tmp_path):
    nproc, layout = PARALLEL_HEAD_LAYOUTS[name]
    result = run_layout(tmp_path, nproc, {**layout, "mtp-kind": "parallel", "heads-one-at-a-time": 1})
    assert_same_training(result, parallel_heads_reference)
    assert_same_parameters(result["state"], parallel_heads_reference["state"])


def test_bf16_optimizer_states_under_the_native_engine(tmp_path):
    """train.optimizer_state_dtype=bf16: ZeRO-2 over two ranks with experts over EP trains as one process
    with the same optimizer (its moments rounded to bf16 the same way). Gradients summed in another
    order can round a moment to the neighbouring bf16 value (2^-8 apart), which moves that element's
    update by as much: the parameters get 1e-4 (measured worst: 1.0e-5 after 3 steps), losses and grad
    norms the usual tolerance."""
    reference = common.reference_run(common.tiny_config(state_dtype="bf16"))
    result = run_layout(tmp_path, 2, {"ep": 2, "zero": 2, "state-dtype": "bf16"})
    assert_same_training(result, reference)
    assert_same_parameters(result["state"], reference["state"], tol=1e-4)


def test_parallel_heads_resume_in_another_layout(tmp_path):
    """The checkpoint format knows no parameter names: parallel MTP heads save at PP=2 x EP=2 (native engine,
    heads on the last stage) and resume under DeepSpeed at DP=2 (ZeRO-1 fragments) for 2 more steps."""
    cfg = common.tiny_config(mtp_kind="parallel")
    reference, after_k = common.reference_run(cfg, steps=common.STEPS + 2), common.reference_run(cfg)["state"]
    heads = {"mtp-kind": "parallel", "heads-one-at-a-time": 1}
    saved = run_layout(tmp_path / "pp2ep2", 4, {"pp": 2, "ep": 2, **heads})
    assert_same_training(saved, reference)
    assert_same_parameters(saved["state"], after_k)
    resumed = run_layout(tmp_path / "dp2", 2, {"zero": 1, "engine": "deepspeed", **heads}, extra=[
        f"--resume={tmp_path / 'pp2ep2' / 'ckpt'}", f"--first-step={common.STEPS}", "--steps=2"])
    assert_same_training(resumed, reference, first_step=common.STEPS)
    assert_same_parameters(resumed["state"], reference["state"])
