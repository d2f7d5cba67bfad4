"""The static-shape decoding engine (dsmtp.serve.static) run eagerly on the CPU, against full forwards
(greedy, float64) and the dynamic engine (seeded sampling draws the same tokens); its slots, cache
bound and batch independence. tests/gpu/test_gpu_serve.py compares its CUDA graphs with this eager run."""

from __future__ import annotations

import pytest
import torch

from dsmtp.model import kernels
from dsmtp.serve.engine import DecodeStats, Engine, Request
from dsmtp.serve.sampling import SamplingParams
from dsmtp.serve.static import StaticEngine
from tests.serve_models import random_model, tiny_config
from tests.test_serve import RAGGED_PROMPTS, naive_greedy

DESIGNS = {"sequential D1": ("sequential", 1, [0, 1, 3]), "sequential D2": ("sequential", 2, [2, 3]),
           "parallel D3": ("parallel", 3, [1, 3])}


@pytest.fixture(scope="module", params=list(DESIGNS))
def design(request):
    kind, depth, ks = DESIGNS[request.param]
    return random_model(tiny_config(mtp_depth=depth, mtp_kind=kind)), ks


def test_greedy_equals_full_forwards(design):
    """Plain and speculative greedy decoding of a ragged batch in 2 slots (so later prompts wait for a
    free slot) give the tokens of a full forward per token."""
    model, ks = design
    expected = [naive_greedy(model, p, 16) for p in RAGGED_PROMPTS]
    for k in ks:
        results, stats = StaticEngine(model, k, max_batch=2).generate([Request(p, 16) for p in RAGGED_PROMPTS])
        assert [r.tokens for r in results] == expected, k
        assert stats.drafted == [stats.steps] * k


def test_sampling_draws_what_the_dynamic_engine_draws(design):
    """Seeded sampling (temperature, top-k, top-p mixed in one batch): the static engine's step computes
    each sequence's distributions and acceptance from the same uniforms as the dynamic engine."""
    model, ks = design
    params = [SamplingParams(1.0, seed=1), SamplingParams(0.7, top_k=8, seed=2), SamplingParams(1.2, top_p=0.8, seed=3)]
    requests = [Request(p, 14, s) for p, s in zip(RAGGED_PROMPTS, params)]
    for k in ks:
        dynamic, dynamic_stats = Engine(model, k).generate(requests)
        static, static_stats = StaticEngine(model, k, max_batch=4).generate(requests)
        assert [r.tokens for r in static] == [r.tokens for r in dynamic], k
        assert static_stats.accepted == dynamic_stats.accepted


def test_joining_a_running_batch_and_batch_independence(design):
    """A request decodes the same alone, joining a running batch in a free slot, or beside others."""
    model, ks = design
    k = ks[-1]
    engine = StaticEngine(model, k, max_batch=4)
    first = [Request(RAGGED_PROMPTS[0], 10), Request(RAGGED_PROMPTS[1], 4)]
    later = [Request(RAGGED_PROMPTS[2], 20), Request([5], 12, SamplingParams(temperature=1.0, seed=3))]
    alone = [StaticEngine(model, k, max_batch=1).generate([r])[0][0].tokens for r in first + later]
    (batch, results), stats = engine.start(first), DecodeStats(k)
    for _ in range(3):
        engine.step(batch, stats)
    joining, joining_results = engine.start(later)
    engine.step(batch, stats)  # the joining requests wait: stepping another batch leaves them as they are
    batch.merge(joining)
    while batch.size:
        engine.step(batch, stats)
    assert [r.tokens for r in results + joining_results] == alone
    assert sorted(engine.free) == [0, 1, 2, 3]  # every slot back


def test_requests_beyond_the_cache_are_refused_before_work():
    model = random_model(tiny_config(mtp_depth=1))
    engine = StaticEngine(model, 2, max_batch=2, max_length=32)
    with pytest.raises(ValueError, match="decode cache of 32 positions.*max_length"):
        engine.generate([Request([1] * 20, 13)])
    assert engine.free == [0, 1]
    results, _ = engine.generate([Request([1] * 20, 12)])  # exactly fills it
    assert len(results[0].tokens) == 12


def test_shared_key_attention_equals_expanded_heads(monkeypatch):
    """MLA's absorbed attention over one set of keys equals SDPA with the keys copied to every head
    (float64), in one piece and in chunks of query rows."""
    torch.manual_seed(0)
    b, sq, h, r, d = 2, 7, 3, 8, 4
    q, keys = torch.randn(b, sq, h, r + d, dtype=torch.float64), torch.randn(b, 11, r + d, dtype=torch.float64)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 2, 4, 6, 8, 10, 10]])
    visible = torch.arange(11) <= positions[..., None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys[:, None].expand(-1, h, -1, -1), keys[:, None, :, :r].expand(-1, h, -1, -1),
        attn_mask=visible[:, None], scale=0.3).transpose(1, 2)
    assert torch.allclose(kernels.shared_key_attention(q, keys, r, 0.3, positions), expected, atol=1e-12)
    monkeypatch.setattr(kernels, "SHARED_KEY_SCORES", 2 * h * 11 * b)  # two query rows a chunk
    assert torch.allclose(kernels.shared_key_attention(q, keys, r, 0.3, positions), expected, atol=1e-12)
