"""DeepSpeed's engine (parallel.engine=deepspeed, the default when pp == 1) trains exactly as one process.

Same harness and reference as test_equivalence.py: K=3 optimizer steps of the tiny MoE + MTP D=2 model
(group-limited routing, gradient accumulation 2, clipping active, router bias updates) under torchrun,
compared with `common.reference_run` (main and per-depth MTP losses, gradient norm, saved
parameters with router biases). The EP layout checks DeepSpeed's expert-gradient handling: experts
reduced over the expert-data-parallel group only, and scaled as one process scales them.
"""

from __future__ import annotations

import pytest

from tests.distributed import common
from tests.distributed.launch import run_layout
from tests.distributed.test_equivalence import assert_same_parameters, assert_same_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
DEEPSPEED = ["--engine=deepspeed"]

LAYOUTS = {
    "dp2_zero1": (2, {"zero": 1}),
    "dp2_zero2": (2, {"zero": 2}),
    "tp2_dp2_zero1": (4, {"tp": 2, "zero": 1}),  # clipping counts TP-replicated gradients once (the mpu)
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_deepspeed_layout_matches_single_process(name, reference, reference_after_k, tmp_path):
    nproc, layout = LAYOUTS[name]
    result = run_layout(tmp_path, nproc, layout, extra=DEEPSPEED)
    assert_same_training(result, reference)
    assert_same_parameters(result["state"], reference_after_k)


def test_deepspeed_expert_parallel_and_resume_in_another_layout(reference, reference_after_k, tmp_path):
    """EP=2 x DP=4 (expert-DP 2) with ZeRO-2 for K steps; its checkpoint (each rank's ZeRO fragments of the
    fp32 parameters and the Adam state, nothing gathered) resumes at DP=2 with ZeRO-1 for 2 more steps."""
    saved = run_layout(tmp_path / "ep2dp4", 4, {"ep": 2, "zero": 2}, extra=DEEPSPEED)
    assert_same_training(saved, reference)
    assert_same_parameters(saved["state"], reference_after_k)
    resumed = run_layout(tmp_path / "dp2", 2, {"zero": 1}, extra=[
        *DEEPSPEED, f"--resume={tmp_path / 'ep2dp4' / 'ckpt'}", f"--first-step={common.STEPS}", "--steps=2"])
    assert_same_training(resumed, reference, first_step=common.STEPS)
    assert_same_parameters(resumed["state"], reference["state"])
