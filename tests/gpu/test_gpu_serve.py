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


# -- The static engine: CUDA graphs against the same steps run eagerly, and against the CPU -------------

DESIGNS = [("sequential", 2, 3), ("parallel", 3, 3)]  # (kind, depth, K): K = 3 reuses a sequential module


@pytest.fixture(scope="module", params=DESIGNS, ids=[f"{kind}{depth}" for kind, depth, _ in DESIGNS])
def design(request):
    kind, depth, k = request.param
    cpu = random_model(tiny_config(mtp_depth=depth, mtp_kind=kind), dtype=torch.float32)
    return cpu, random_model(tiny_config(mtp_depth=depth, mtp_kind=kind), dtype=torch.float32).cuda(), k


@pytest.mark.parametrize("k_used", ["plain", "speculative"])
@pytest.mark.parametrize("prompts", [RAGGED_PROMPTS[:1], RAGGED_PROMPTS], ids=["batch1", "ragged3"])
def test_graphed_decoding_equals_eager(design, k_used, prompts):
    """fp32: the static engine replaying CUDA graphs gives token for token what the same engine gives
    run eagerly, and what the dynamic engine gives on the CPU (greedy); seeded sampling equals eager."""
    from dsmtp.serve.static import StaticEngine

    cpu, gpu, k = design
    k = 0 if k_used == "plain" else k
    greedy = [Request(p, 24) for p in prompts]
    sampled = [Request(p, 24, SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=i)) for i, p in enumerate(prompts)]
    graphed = StaticEngine(gpu, k, max_batch=4)
    eager = StaticEngine(gpu, k, max_batch=4, cuda_graphs=False)
    for requests in (greedy, sampled):
        tokens = [r.tokens for r in graphed.generate(requests)[0]]
        assert tokens == [r.tokens for r in eager.generate(requests)[0]]
    assert graphed.graphs  # the steps really were replays
    assert [r.tokens for r in graphed.generate(greedy)[0]] == [r.tokens for r in Engine(cpu, 0).generate(greedy)[0]]


def test_static_engine_refuses_requests_beyond_its_cache(design):
    from dsmtp.serve.static import StaticEngine

    _, gpu, k = design
    with pytest.raises(ValueError, match="decode cache of 64 positions"):
        StaticEngine(gpu, k, max_batch=2, max_length=64).generate([Request([1] * 40, 25)])
