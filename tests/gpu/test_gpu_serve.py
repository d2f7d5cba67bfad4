"""The inference engine on CUDA against the CPU reference: the same logits from the KV cache as from a
full forward, the same greedy tokens as on the CPU, and speculative greedy equal to plain greedy."""

from __future__ import annotations

import pytest
import torch

from dsmtp.serve.engine import Engine, Request
from dsmtp.serve.sampling import SamplingParams
from tests.serve_models import random_model, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RAGGED_PROMPTS = [[3, 4, 5, 6, 7], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def models():
    """(CPU float32 model, the same weights on CUDA in float32)."""
    cpu = random_model(tiny_config(mtp_depth=2), dtype=torch.float32)
    gpu = random_model(tiny_config(mtp_depth=2), dtype=torch.float32).cuda()  # same seed: same weights
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.parameters(), gpu.parameters()))
    return cpu, gpu


def generate(model, k: int, sampling: SamplingParams | None = None, max_new: int = 24):
    requests = [Request(p, max_new, sampling or SamplingParams()) for p in RAGGED_PROMPTS]
    results, stats = Engine(model, k).generate(requests)
    return [r.tokens for r in results], stats


@torch.no_grad()
def test_cuda_logits_match_cpu(models):
    cpu, gpu = models
    tokens = torch.tensor([RAGGED_PROMPTS[2] * 3])
    assert torch.allclose(gpu(tokens.cuda()).cpu(), cpu(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_cuda_greedy_equals_cpu_plain_greedy(models, k):
    cpu, gpu = models
    plain_cpu, _ = generate(cpu, 0)
    tokens, stats = generate(gpu, k)
    assert tokens == plain_cpu
    if k:
        assert stats.drafted == [stats.steps] * k


def test_cuda_seeded_sampling_is_reproducible_and_speculation_keeps_its_length(models):
    _, gpu = models
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    first, _ = generate(gpu, 3, sampling)
    second, _ = generate(gpu, 3, sampling)
    assert first == second
    assert [len(t) for t in first] == [24, 24, 24]
