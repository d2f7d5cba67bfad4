"""Inference: MLA latent KV cache, MTP self-speculative decoding, speculative sampling, CLI and HTTP server.

References are independent of the engine: full forwards of the model without a cache (float64 where
exact equality of greedy tokens is asserted), exact next-token probabilities, hand-computed values.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from dsmtp.checkpoint import CheckpointError
from dsmtp.convert.export_hf import export
from dsmtp.serve import speculative
from dsmtp.serve.cache import ModelCache
from dsmtp.serve.engine import DecodeStats, Engine, Request
from dsmtp.serve.generate import main as generate_main
from dsmtp.serve.loading import completion_text, encode_prompt, load
from dsmtp.serve.sampling import BatchSampler, SamplingParams, draw
from dsmtp.serve.server import CompletionServer
from tests.serve_models import random_model, tiny_config

RAGGED_PROMPTS = [[3, 4, 5, 6, 7], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module", params=[1, 2], ids=["D1", "D2"])
def random_mtp_model(request):
    return random_model(tiny_config(mtp_depth=request.param))


@pytest.fixture(scope="session")
def trained(trained_ckpt):
    """(float64 model, tokenizer) of the trained checkpoint."""
    model, _, tokenizer = load(trained_ckpt, dtype=torch.float64)
    return model, tokenizer


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with a full forward (no cache) per token."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def greedy_tokens(model, prompts, k: int, max_new: int = 16):
    results, stats = Engine(model, k).generate([Request(p, max_new) for p in prompts])
    return [r.tokens for r in results], stats


# -- KV cache ---------------------------------------------------------------------------------


def test_cache_bytes_per_token():
    cfg = tiny_config(mtp_depth=2)
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = ModelCache.empty(cfg, batch=3, capacity=10, dtype=dtype, device=torch.device("cpu"))
        per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * (cfg.num_layers + cfg.mtp_depth) * size
        assert cache.bytes_per_token == per_token
        assert cache.nbytes == 3 * 10 * per_token  # nothing else is stored per token


@torch.no_grad()
def test_absorbed_attention_equals_expanded():
    """MLA.attend_absorbed (over latents, per-sequence positions) equals MLA.attend (per-head K/V, causal)."""
    model = random_model(tiny_config(mtp_depth=0))
    mla, x = model.layers[0].attn, torch.randn(2, 9, 32, dtype=torch.float64)
    cos, sin = model.rope(torch.arange(9))
    q_nope, q_rope = mla.query(x, cos, sin)
    kv, k_rope = mla.latent(x, cos, sin)
    expanded = mla.attend(q_nope, q_rope, kv, k_rope)
    absorbed = mla.attend_absorbed(q_nope, q_rope, torch.cat([kv, k_rope], dim=-1), torch.arange(9).expand(2, 9))
    assert torch.allclose(absorbed, expanded, atol=1e-12)


def _cached_logits(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    stack = cache.trunk
    cos, sin = model.rope(stack.begin(tokens.shape[1]))
    return model.logits(model.trunk(model.embed(tokens), cos, sin, stack.layers)[0])


@torch.no_grad()
def test_incremental_decode_matches_full_forward():
    """fp32, ragged batch: right-padded prefill, one token at a time, a 3-token block, and a block that
    is partly rolled back and rewritten with other tokens; every new position's logits equal a full
    forward over the sequence so far (<= 1e-4)."""
    model = random_model(tiny_config(mtp_depth=1), dtype=torch.float32)
    torch.manual_seed(1)
    seqs = [torch.randint(0, 64, (n,)).tolist() for n in (7, 3, 12)]
    cache = ModelCache.empty(model.cfg, 3, 40, torch.float32, torch.device("cpu"))

    def check(logits, firsts, widths):
        for row, seq in enumerate(seqs):
            full = model(torch.tensor([seq]))[0]
            for j in range(widths[row]):
                assert torch.allclose(logits[row, j], full[firsts[row] + j], atol=1e-4, rtol=0), (row, j)

    lengths = [len(s) for s in seqs]
    padded = torch.tensor([s + [0] * (max(lengths) - len(s)) for s in seqs])
    check(_cached_logits(model, cache, padded), [0, 0, 0], lengths)
    cache.trunk.truncate(torch.tensor(lengths))
    for _ in range(3):  # one token at a time
        new = torch.randint(0, 64, (3, 1))
        firsts = [len(s) for s in seqs]
        for row in range(3):
            seqs[row].append(int(new[row, 0]))
        check(_cached_logits(model, cache, new), firsts, [1, 1, 1])
    for keep in ([3, 1, 0], [3, 3, 3]):  # a 3-token block; then roll back all but `keep` of it
        block = torch.randint(0, 64, (3, 3))
        firsts = [len(s) for s in seqs]
        for row in range(3):
            seqs[row].extend(block[row].tolist())
        check(_cached_logits(model, cache, block), firsts, [3, 3, 3])
        for row in range(3):
            del seqs[row][firsts[row] + keep[row]:]
        cache.trunk.truncate(torch.tensor([len(s) for s in seqs]))


def test_plain_greedy_matches_full_forward(random_mtp_model):
    tokens, stats = greedy_tokens(random_mtp_model, RAGGED_PROMPTS, k=0)
    assert tokens == [naive_greedy(random_mtp_model, p, 16) for p in RAGGED_PROMPTS]
    assert stats.tokens_per_forward == 1


# -- MTP drafting and speculative decoding ------------------------------------------------------


@torch.no_grad()
def test_mtp_drafts_match_full_forward():
    """After prefill and two speculative steps (so the MTP caches were rolled back and caught up), the
    draft distributions of depth 1 and 2 equal the MTP modules run over the whole sequence as in training."""
    model = random_model(tiny_config(mtp_depth=2))
    engine = Engine(model, speculative_k=2)
    requests = [Request(p, 20, SamplingParams(temperature=1.0, seed=i)) for i, p in enumerate(RAGGED_PROMPTS)]
    (batch, _), stats = engine.start(requests), DecodeStats(2)
    for _ in range(2):
        engine.step(batch, stats)
    assert batch.size == 3
    drafts, q = engine._draft(batch, 2, torch.rand(3, 2, dtype=torch.float64))
    for row in range(3):
        n = int(batch.n[row])
        tokens = torch.cat([batch.seq[row, :n + 1], drafts[row, :1]])[None]  # t_0 .. t_n, d_1
        hidden, _ = model.hidden_states(tokens, n)  # every depth at positions 0 .. n-1, as in training
        for depth in (1, 2):
            expected = torch.softmax(model.logits(hidden[depth][0, -1]), dim=-1)
            assert torch.allclose(q[row, depth - 1], expected, atol=1e-10), (row, depth)
    assert stats.steps == 6


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_speculative_greedy_equals_plain_random_model(random_mtp_model, k):
    for prompts in (RAGGED_PROMPTS[:1], RAGGED_PROMPTS):
        plain, _ = greedy_tokens(random_mtp_model, prompts, k=0)
        spec, stats = greedy_tokens(random_mtp_model, prompts, k=k)
        assert spec == plain
        assert stats.drafted == [stats.steps] * k


def test_speculative_greedy_equals_plain_trained_model(trained):
    model, tokenizer = trained
    prompts = [encode_prompt(tokenizer, text) for text in ("the quick", "over", "lazy dog. the", "jumps")]
    plain, first_acceptance = {}, []
    for k in range(5):
        for batch in (prompts[:1], prompts):
            results, stats = Engine(model, k).generate([Request(p, 24, stop_ids=(tokenizer.eos_id,)) for p in batch])
            tokens = [(r.tokens, r.finish_reason) for r in results]
            assert plain.setdefault(len(batch), tokens) == tokens, (k, len(batch))
            if k:
                # The MTP modules learned the text: drafts are mostly accepted, so the test really
                # exercises multi-token acceptance, rollback and cache catch-up. One run verifies a
                # handful of drafts, too few for a bound of its own: the first-draft rate is pooled.
                assert stats.tokens_per_forward >= 1.5, (k, len(batch))
                first_acceptance.append(stats.acceptance[0])
    assert sum(first_acceptance) / len(first_acceptance) >= 0.75, first_acceptance
    assert plain[1][0][1] == "stop"  # the sentence ended with <eos>
    assert completion_text(tokenizer, prompts[0], plain[1][0][0]) == " brown fox jumps over the lazy dog."


@pytest.mark.parametrize("k", [0, 3])
def test_requests_joining_a_running_batch(random_mtp_model, k):
    """Continuous batching: sequences merged into a running batch (with a larger cache) decode exactly
    as they would alone."""
    engine = Engine(random_mtp_model, k)
    first = [Request(RAGGED_PROMPTS[0], 10), Request(RAGGED_PROMPTS[1], 4)]
    later = [Request(RAGGED_PROMPTS[2], 20), Request([5], 12, SamplingParams(temperature=1.0, seed=3))]
    alone = [engine.generate([r])[0][0].tokens for r in first + later]
    (batch, results), stats = engine.start(first), DecodeStats(k)
    for _ in range(3):
        engine.step(batch, stats)
    assert batch.size == 1 and len(batch.results) == 1  # the 4-token request is done and forgotten
    joining, joining_results = engine.start(later)
    batch.merge(joining)
    results = results + joining_results
    while batch.size:
        engine.step(batch, stats)
    assert [r.tokens for r in results] == alone


@pytest.mark.parametrize("k", [1, 3])
def test_a_long_prompt_joining_a_batch_near_its_end(random_mtp_model, k):
    """A row deep into its decoding and a joining row that must catch its MTP caches up over a long
    prompt: the MTP forward covers the joiner's whole prompt, and the other row must not run past its
    cache while it goes along; both decode as they would alone."""
    engine = Engine(random_mtp_model, k)
    running = Request(list(range(3, 23)), 12)
    joining = Request(list(range(30, 46)), 2)
    alone = [engine.generate([r])[0][0].tokens for r in (running, joining)]
    (batch, results), stats = engine.start([running]), DecodeStats(k)
    for _ in range(2):
        engine.step(batch, stats)
    later, later_results = engine.start([joining])
    assert int(batch.n[0]) + len(joining.prompt) > max(batch.capacity, later.capacity)  # the case at hand
    batch.merge(later)
    while batch.size:
        engine.step(batch, stats)
    assert [r.tokens for r in results + later_results] == alone


def test_acceptance_rule_hand_computed():
    # p = q: always accepted; bonus token from p at the last position.
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    q = torch.tensor([[[0.0, 1.0, 0.0]]], dtype=torch.float64)
    accepted, token = speculative.accept(torch.tensor([[1]]), q, p, torch.tensor([[0.99, 0.5]]))
    assert (accepted.tolist(), token.tolist()) == ([1], [2])
    # p(d)/q(d) = 0.25: accepted iff u < 0.25; on rejection the residual max(0, p - q) = [0.6, 0, 0] -> token 0.
    p = torch.tensor([[[0.6, 0.1, 0.3], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    q = torch.tensor([[[0.0, 0.4, 0.6]]], dtype=torch.float64)
    for u, expected in ((0.2, ([1], [0])), (0.3, ([0], [0]))):
        accepted, token = speculative.accept(torch.tensor([[1]]), q, p, torch.tensor([[u, 0.5]], dtype=torch.float64))
        assert (accepted.tolist(), token.tolist()) == expected


def test_sampling_filters_hand_computed():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64))
    cases = [(SamplingParams(temperature=1.0), [0.1, 0.4, 0.2, 0.3]),
             (SamplingParams(temperature=1.0, top_k=2), [0, 0.4 / 0.7, 0, 0.3 / 0.7]),
             (SamplingParams(temperature=1.0, top_p=0.75), [0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9]),
             (SamplingParams(temperature=0.5), [0.01 / 0.3, 0.16 / 0.3, 0.04 / 0.3, 0.09 / 0.3]),
             (SamplingParams(temperature=0.0), [0, 1, 0, 0])]
    for params, expected in cases:
        probs = BatchSampler([params], torch.device("cpu")).probabilities(logits)
        assert torch.allclose(probs, torch.tensor([expected], dtype=torch.float64)), params
    # The same settings side by side in one batch: each row still gets only its own filters.
    batch = BatchSampler([params for params, _ in cases], torch.device("cpu"))
    probs = batch.probabilities(logits.expand(len(cases), 4))
    assert torch.allclose(probs, torch.tensor([expected for _, expected in cases], dtype=torch.float64))
    probs = torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64).expand(5, 3)
    assert draw(probs, torch.tensor([0.0, 0.3, 0.49, 0.5, 0.999], dtype=torch.float64)).tolist() == [0, 0, 0, 2, 2]


@torch.no_grad()
def _joint_distribution(model, prompt: list[int], vocab: int) -> torch.Tensor:
    """Exact P(x1, x2, x3 | prompt) of the trunk at temperature 1, [V, V, V], from full forwards."""
    pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # all (x1, x2)
    seqs = torch.cat([torch.tensor(prompt).expand(len(pairs), -1), pairs], dim=1)
    probs = torch.softmax(model(seqs), dim=-1)  # [V*V, P+2, V]
    p1 = probs[0, len(prompt) - 1]
    p2 = probs[:, len(prompt)].view(vocab, vocab, vocab)[:, 0]  # p(x2 | x1)
    p3 = probs[:, len(prompt) + 1].view(vocab, vocab, vocab)  # p(x3 | x1, x2)
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test; cells expected below 5 are pooled into one."""
    expected = probs.flatten() * counts.sum()
    counts = counts.flatten().double()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def test_speculative_sampling_matches_trunk_distribution(monkeypatch):
    """Vocabulary 16, MTP depth 2, K = 3 (two depths and one reuse of the last): the first three sampled
    tokens of 24,000 seeded sequences follow the trunk's exact joint distribution (Pearson chi-square,
    significance level 0.001). Power check: accepting every draft (outputting the MTP's distribution)
    is rejected by the same test."""
    alpha, samples, vocab, prompt = 1e-3, 24_000, 16, [3, 7, 1]
    model = random_model(tiny_config(vocab_size=vocab, mtp_depth=2, init_std=0.5), seed=3)
    exact = _joint_distribution(model, prompt, vocab)

    def sample_counts() -> torch.Tensor:
        requests = [Request(prompt, 3, SamplingParams(temperature=1.0, seed=i)) for i in range(samples)]
        results, stats = Engine(model, speculative_k=3).generate(requests)
        x = torch.tensor([r.tokens for r in results])
        return torch.bincount(x[:, 0] * vocab * vocab + x[:, 1] * vocab + x[:, 2], minlength=vocab ** 3), stats

    counts, stats = sample_counts()
    assert 0.05 < stats.acceptance[0] < 0.95 and stats.acceptance[1] > 0.01  # both branches are exercised
    assert _chi_square_p_value(counts, exact) > alpha

    def accept_all(drafts, q, p, u):
        accepted = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.long)
        return accepted, draw(p[:, -1], u[:, -1])

    monkeypatch.setattr(speculative, "accept", accept_all)
    assert _chi_square_p_value(sample_counts()[0], exact) < alpha


def test_seeded_sampling_does_not_depend_on_the_batch(random_mtp_model):
    request = Request(RAGGED_PROMPTS[0], 12, SamplingParams(temperature=1.0, top_p=0.9, seed=5))
    others = [Request(p, 20, SamplingParams(temperature=0.7, seed=i)) for i, p in enumerate(RAGGED_PROMPTS[1:])]
    alone = Engine(random_mtp_model, 2).generate([request])[0][0].tokens
    assert Engine(random_mtp_model, 2).generate([others[0], request, others[1]])[0][1].tokens == alone


def test_engine_rejects_bad_requests():
    engine = Engine(random_model(tiny_config(mtp_depth=1)), speculative_k=2)
    for request, field in ((Request([], 4), "prompt"), (Request([1, 64], 4), "prompt"),
                           (Request([1], 0), "max_new_tokens"),
                           (Request([1] * 120, 9), "context")):
        with pytest.raises(ValueError, match=field):
            engine.generate([request])
    with pytest.raises(ValueError, match="mtp_depth=0"):
        Engine(random_model(tiny_config(mtp_depth=0)), speculative_k=1)


def test_context_end_and_stop_tokens(random_mtp_model):
    """A request that fills the context exactly decodes with fewer drafts near the end; stop tokens end
    a sequence early without being returned."""
    prompt = [i % 60 + 1 for i in range(99)]
    tokens, _ = greedy_tokens(random_mtp_model, [prompt], k=0, max_new=29)
    spec, _ = greedy_tokens(random_mtp_model, [prompt], k=4, max_new=29)
    assert spec == tokens and len(tokens[0]) == 29
    stop = tokens[0][5]
    results, _ = Engine(random_mtp_model, 3).generate([Request(prompt, 29, stop_ids=(stop,))])
    assert results[0].tokens == tokens[0][:tokens[0].index(stop)] and results[0].finish_reason == "stop"


# -- CLI ----------------------------------------------------------------------------------------


def test_generate_cli(trained_ckpt, capsys):
    assert generate_main(["--ckpt", str(trained_ckpt), "--prompt", "the quick", "--speculative", "2",
                          "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "the quick brown fox jumps over the lazy dog." in out
    assert "tokens/s" in out and "acceptance per draft position  1: " in out and "mean tokens per trunk forward" in out
    assert generate_main(["--ckpt", str(trained_ckpt / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A run's out_dir: checkpoints/latest names the newest step directory.
    out_dir = trained_ckpt.parent / "run"
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out_dir / "checkpoints" / "latest").write_text(f"../../{trained_ckpt.name}\n")
    model, cfg, _ = load(out_dir)
    assert cfg.model.mtp_depth == 2 and torch.equal(model.head.weight, load(trained_ckpt)[0].head.weight)
    with pytest.raises(CheckpointError, match="not a dsmtp checkpoint"):
        load(trained_ckpt.parent)


def test_generate_from_hf_export(trained_ckpt, trained, tmp_path):
    """An HF export (float32) loads through dsmtp.convert.import_hf and decodes the same tokens."""
    hf_dir = export(trained_ckpt, tmp_path / "hf", dtype="fp32")
    model, _, tokenizer = load(hf_dir, dtype=torch.float64)
    prompt = encode_prompt(tokenizer, "over")
    assert tokenizer.encode("over") == trained[1].encode("over")
    ours = Engine(trained[0], 2).generate([Request(prompt, 12)])[0][0].tokens
    assert Engine(model, 2).generate([Request(prompt, 12)])[0][0].tokens == ours


# -- HTTP server --------------------------------------------------------------------------------


def _start_server(model, tokenizer, cfg, max_new_tokens: int) -> CompletionServer:
    cfg.serve.max_new_tokens, cfg.serve.max_body_bytes, cfg.serve.max_batch_size = max_new_tokens, 4096, 4
    srv = CompletionServer(Engine(model, speculative_k=2), tokenizer, cfg.serve, "tiny", "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server(trained_ckpt):
    model, cfg, tokenizer = load(trained_ckpt)
    srv = _start_server(model, tokenizer, cfg, max_new_tokens=200)
    yield srv, model, tokenizer
    srv.shutdown()
    srv.server_close()


def _post(port: int, body: bytes, timeout: float = 60) -> tuple[int, bytes, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def _sse_text(raw: bytes) -> tuple[str, str]:
    events = [line[len(b"data: "):] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def _expected(model, tokenizer, prompt: str, max_tokens: int, stop: str | None = None) -> str:
    ids = encode_prompt(tokenizer, prompt)
    results, _ = Engine(model).generate([Request(ids, max_tokens, stop_ids=(tokenizer.eos_id,))])
    text = completion_text(tokenizer, ids, results[0].tokens)
    return text[:text.find(stop)] if stop and stop in text else text


def test_server_concurrent_clients(server):
    srv, model, tokenizer = server
    port = srv.server_address[1]
    valid = [({"prompt": "the quick", "max_tokens": 30, "temperature": 0}, None),
             ({"prompt": "over", "max_tokens": 12, "temperature": 0, "model": "tiny"}, None),
             ({"prompt": "quick", "max_tokens": 25, "temperature": 0, "stop": "over"}, "over"),
             ({"prompt": "jumps", "max_tokens": 5, "temperature": 0, "top_k": 3}, None),
             ({"prompt": "dog.", "max_tokens": 40, "temperature": 0, "seed": 1}, None)]
    valid = valid + [({**body, "stream": True}, stop) for body, stop in valid[:3]] + valid[:2]
    bad = [(b'{"max_tokens": 4}', "prompt"), (b'{"prompt": "a", "max_tokens": 0}', "max_tokens"),
           (b'{"prompt": "a", "max_tokens": 201}', "max_tokens"), (b'{"prompt": "a", "n": 0}', "n"),
           (b'{"prompt": "a", "max_tokens": ', None), (json.dumps({"prompt": "x" * 5000}).encode(), None),
           (json.dumps({"prompt": "the " * 300, "max_tokens": 4}).encode(), "prompt"),
           (b'{"prompt": "a", "temperature": -1}', "temperature"),
           (b'{"prompt": "a", "max_tokens": true}', "max_tokens")]
    answers: dict[int, tuple] = {}

    def client(i: int) -> None:
        body = json.dumps(valid[i][0]).encode() if i < len(valid) else bad[i - len(valid)][0]
        try:
            answers[i] = _post(port, body)
        except Exception as e:  # reported by the assertion below
            answers[i] = (None, repr(e).encode(), "")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(valid) + len(bad))]
    assert len(threads) >= 16
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (body, stop) in enumerate(valid):
        status, raw, ctype = answers[i]
        assert status == 200, (body, raw)
        expected = _expected(model, tokenizer, body["prompt"], body["max_tokens"], stop)
        if body.get("stream"):
            assert ctype == "text/event-stream"
            text, finish = _sse_text(raw)
        else:
            payload = json.loads(raw)
            text, finish = payload["choices"][0]["text"], payload["choices"][0]["finish_reason"]
            assert payload["usage"]["completion_tokens"] <= body["max_tokens"]
        assert text == expected, body
        assert finish in ("stop", "length")
    for j, (body, param) in enumerate(bad):
        status, raw, ctype = answers[len(valid) + j]
        assert 400 <= status < 500 and ctype == "application/json", (body, status)
        error = json.loads(raw)["error"]
        assert error["message"] and (param is None or error["param"] == param), (body, error)
    assert answers[len(valid) + 5][0] == 413  # oversized body
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["completed"] >= len(valid)


def test_server_routes_and_headers(server):
    port = server[0].server_address[1]
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/completions", 405), ("POST", "/v1/chat", 404)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        response = conn.getresponse()
        assert response.status == status and "error" in json.loads(response.read())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.endheaders()  # no Content-Length
    response = conn.getresponse()
    assert response.status == 411 and json.loads(response.read())["error"]["type"] == "invalid_request_error"


def test_server_client_disconnect_frees_slot(trained_ckpt):
    """A random model (it rarely ends a sentence) streams 240 tokens; the client hangs up after the
    first event: its sequence is dropped from the batch and the server goes on serving."""
    _, cfg, tokenizer = load(trained_ckpt)
    # a seed whose greedy continuation runs to max_tokens without an end of sentence (asserted first)
    model = random_model(tiny_config(vocab_size=cfg.model.vocab_size, mtp_depth=2, max_positions=256),
                         seed=2, dtype=torch.float32)
    ids = encode_prompt(tokenizer, "the")
    assert Engine(model).generate([Request(ids, 240, stop_ids=(tokenizer.eos_id,))])[0][0].finish_reason == "length"
    srv = _start_server(model, tokenizer, cfg, max_new_tokens=240)
    try:
        port = srv.server_address[1]
        body = json.dumps({"prompt": "the", "max_tokens": 240, "temperature": 0, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b"data: " not in received:  # streaming has begun
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
        sock.close()
        deadline = time.monotonic() + 60
        while srv.worker.counters.completed == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.worker.counters.aborted == 1
        status, raw, _ = _post(port, json.dumps({"prompt": "the", "max_tokens": 8, "temperature": 0}).encode())
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == _expected(model, tokenizer, "the", 8)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            health = json.loads(r.read())
        assert {k: health[k] for k in ("status", "queued", "active", "completed", "aborted")} == \
            {"status": "ok", "queued": 0, "active": 0, "completed": 2, "aborted": 1}
        assert health["speculative"]["draft_tokens"] == 2 and len(health["speculative"]["acceptance"]) == 2
    finally:
        srv.shutdown()
        srv.server_close()
