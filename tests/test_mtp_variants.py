"""The two MTP designs (DeepSeek-V3's sequential modules, Gloeckle et al.'s parallel heads) and the
per-depth loss weights: against hand-written float64 references and hand-computed values; the
one-head-at-a-time backward against the plain one; decoding with parallel heads against plain decoding
and the trunk's exact distribution; HF export and import; bad combinations refused."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsmtp.config import ConfigError, load_config
from dsmtp.convert.export_hf import export
from dsmtp.convert.import_hf import import_hf
from dsmtp.convert.names import PARALLEL_HEADS_FILE
from dsmtp.model import IGNORE_INDEX, DeepSeekV3
from dsmtp.model.mtp import depth_weights
from dsmtp.serve import speculative
from dsmtp.serve.engine import DecodeStats, Engine, Request
from dsmtp.serve.sampling import SamplingParams, draw
from tests import _hf_helpers
from tests.helpers import tiny_model_config
from tests.serve_models import random_model, tiny_config
from tests.test_serve import RAGGED_PROMPTS, _chi_square_p_value, _joint_distribution, greedy_tokens, naive_greedy

KINDS = ["sequential", "parallel"]


def float64_model(kind: str, depth: int = 3, seed: int = 0, **overrides) -> DeepSeekV3:
    torch.manual_seed(seed)
    return DeepSeekV3(tiny_model_config(mtp_kind=kind, mtp_depth=depth, **overrides)).double().train()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# -- Parallel heads against a hand-written float64 reference --------------------------------------


def test_parallel_heads_match_float64_reference():
    """Head k at position i: norm_k(layer_k(h_0))[i] through the shared head predicts t_{i+k+1}; the
    loss is L_main + lambda * sum_k w_k L_k / sum_k w_k. Logits, losses and every gradient equal a
    reference written out from the paper's description."""
    model, s, lam, weights = float64_model("parallel"), 10, 0.3, [3.0, 1.0, 0.5]
    cfg = model.cfg
    model.mtp.depth_weights = weights
    tokens = torch.randint(0, cfg.vocab_size, (2, s + cfg.mtp_depth + 1))
    out = model(tokens[:, :s], tokens[:, 1:], mtp_weight=lam)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    hidden, _ = model.hidden_states(tokens[:, :s], s)
    model.zero_grad()

    cos, sin = model.rope(torch.arange(s))
    h0, trunk_aux = model.trunk(model.embed(tokens[:, :s]), cos, sin)
    head_weight = model.head.weight
    main = F.cross_entropy((h0 @ head_weight.T).flatten(0, 1), tokens[:, 1:s + 1].flatten())
    reference_logits, head_losses = [], []
    for k, head in enumerate(model.mtp, start=1):
        h_k = rms_norm(head.layer(h0, cos, sin)[0], head.norm.weight, cfg.rms_norm_eps)
        reference_logits.append(h_k @ head_weight.T)
        head_losses.append(F.cross_entropy(reference_logits[-1].flatten(0, 1), tokens[:, k + 1:k + 1 + s].flatten()))
    total = main + lam * sum(w * l for w, l in zip(weights, head_losses)) / sum(weights)
    total.backward()

    assert trunk_aux == 0 and out.loss.item() == pytest.approx(total.item(), rel=1e-12)
    assert out.main_loss.item() == pytest.approx(main.item(), rel=1e-12)
    assert out.mtp_losses.tolist() == pytest.approx([l.item() for l in head_losses], rel=1e-12)
    assert out.mtp_tokens.tolist() == [2 * s] * 3
    for k in range(1, 4):
        torch.testing.assert_close(model.logits(hidden[k]), reference_logits[k - 1], rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-10, atol=1e-14, msg=name)
    assert not any(n.startswith("mtp.") and ("eh_proj" in n or "enorm" in n) for n in ours)


@pytest.mark.parametrize("kind", KINDS)
def test_depth_reads_the_tokens_its_design_says(kind):
    """Causality: sequential depth k at position i reads t_0 .. t_{i+k}; a parallel head reads t_0 .. t_i."""
    model = float64_model(kind, depth=2).eval()
    s = 12
    reach = {"sequential": lambda k: k, "parallel": lambda k: 0}[kind]
    tokens = torch.randint(0, model.cfg.vocab_size, (2, s + model.mtp.future_tokens))
    base = [model.logits(h) for h in model.hidden_states(tokens, s)[0]]
    for j in range(tokens.shape[1]):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % model.cfg.vocab_size
        new = [model.logits(h) for h in model.hidden_states(changed, s)[0]]
        for k in range(1, 3):
            first = max(j - reach(k), 0)
            torch.testing.assert_close(new[k][:, :first], base[k][:, :first], rtol=0, atol=1e-9)
            if first < s:
                assert (new[k][:, first] - base[k][:, first]).abs().max() > 1e-6, (j, k)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_labels_leave_each_depth_its_own_targets(kind):
    model = float64_model(kind, depth=2).eval()
    sample = torch.randint(0, model.cfg.vocab_size, (3, 9))
    out = model(sample[:, :8], sample[:, 1:])  # S labels only: depth k has S - k targets per row
    assert out.mtp_tokens.tolist() == [3 * 7, 3 * 6]
    labels = sample[:, 1:].clone()
    labels[0, 2:5] = IGNORE_INDEX  # three targets gone at every depth
    assert model(sample[:, :8], labels).mtp_tokens.tolist() == [3 * 7 - 3, 3 * 6 - 3]


# -- Per-depth weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme,expected", [("uniform", [1, 1, 1]), ("linear", [3, 2, 1]),
                                             ("exponential", [1, 0.5, 0.25]), ([0.2, 0.0, 1.0], [0.2, 0, 1])])
def test_depth_weight_schemes_hand_computed(kind, scheme, expected):
    assert depth_weights(scheme, 3) == expected
    model = float64_model(kind)
    model.mtp.depth_weights = depth_weights(scheme, 3)
    sample = torch.randint(0, model.cfg.vocab_size, (2, 16 + 3 + 1))
    out = model(sample[:, :16], sample[:, 1:], mtp_weight=0.4)
    by_hand = out.main_loss + 0.4 * sum(w * l for w, l in zip(expected, out.mtp_losses)) / sum(expected)
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-12)
    out.loss.backward()
    head_2 = [p.grad for n, p in model.named_parameters() if n.startswith("mtp.1.") and p.grad is not None]
    if expected[1] == 0 and kind == "parallel":  # an independent head with weight 0 learns nothing
        assert all(g.abs().sum() == 0 for g in head_2)
    else:  # a sequential depth also feeds the next one, so it learns at weight 0 too
        assert any(g.abs().sum() > 0 for g in head_2)


def test_uniform_weights_are_lambda_over_d():
    """With uniform weights the objective is DeepSeek-V3's lambda / D * sum_k L_k, in the same arithmetic."""
    model = float64_model("sequential", depth=2).float()
    sample = torch.randint(0, model.cfg.vocab_size, (2, 16 + 3))
    out = model(sample[:, :16], sample[:, 1:], mtp_weight=0.3)
    assert torch.equal(out.loss.detach(), out.main_loss + out.aux_loss + 0.3 / 2 * out.mtp_losses.sum())


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_sequential_gradients_are_bitwise_deepseek_v3_written_out(depth):
    """D = 0 and sequential runs are bitwise what they were before the MTP seam: the objective written out
    as dsmtp computed it then (the depths' hidden states, the main head, the depths' heads, then
    L_main + aux + lambda / D * sum_k L_k) gives exactly the model's gradients, float32."""
    model = float64_model("sequential", depth=depth).float()
    s = 16
    sample = torch.randint(0, model.cfg.vocab_size, (2, s + 1 + depth))
    model(sample[:, :s], sample[:, 1:], mtp_weight=0.3).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    tokens = torch.cat([sample[:, :s], sample[:, s:s + depth]], dim=1)
    cos, sin = model.rope(torch.arange(s))
    emb = model.embed(tokens)
    h, aux = model.trunk(emb[:, :s], cos, sin)
    hidden, h_k = [], h
    for k in range(1, depth + 1):
        h_k, module_aux = model.mtp[k - 1](h_k, emb[:, k:k + s], cos, sin)
        hidden.append(h_k)
        aux = aux + module_aux
    loss = model._lm_loss(h, sample[:, 1:s + 1])[0] + aux
    if depth:
        loss = loss + 0.3 / depth * torch.stack([model._lm_loss(h_k, sample[:, 1 + k:1 + k + s])[0]
                                                 for k, h_k in enumerate(hidden, start=1)]).sum()
    loss.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want), [n for n in want if not torch.equal(got[n], want[n])]


# -- One head at a time ----------------------------------------------------------------------------


def _accumulated_grads(model, batches, scale):
    model.zero_grad()
    outs = []
    for sample in batches:
        out = model(sample[:, :16], sample[:, 1:], mtp_weight=0.3)
        (out.loss * scale).backward()
        outs.append(out)
    return outs, {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_one_head_at_a_time_gives_the_plain_gradients():
    """Two accumulated micro-batches with a loss scale, aux loss on, D = 3, non-uniform weights: the
    losses, metrics, every gradient and the routers' token counts equal the plain backward's."""
    model = float64_model("parallel", aux_loss_alpha=0.01)
    model.mtp.depth_weights = depth_weights("linear", 3)
    batches = [torch.randint(0, model.cfg.vocab_size, (2, 16 + 4)) for _ in range(2)]
    plain_outs, plain = _accumulated_grads(model, batches, 0.5)
    model.mtp.one_at_a_time = True
    outs, grads = _accumulated_grads(model, batches, 0.5)
    for a, b in zip(outs, plain_outs):
        for field in ("main_loss", "mtp_losses", "mtp_accuracies", "mtp_tokens"):
            torch.testing.assert_close(getattr(a, field).detach(), getattr(b, field).detach(), rtol=1e-12, atol=0)
        for field in ("loss", "aux_loss"):  # the balance losses are float32, summed in another order
            torch.testing.assert_close(getattr(a, field).detach(), getattr(b, field).detach(), rtol=1e-8, atol=0)
        assert a.aux_loss > 0
    assert set(grads) == set(plain)
    for name, g in plain.items():
        if g is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-15, msg=name)
    with torch.no_grad():  # evaluation takes the plain path
        assert model(batches[0][:, :16], batches[0][:, 1:]).mtp_losses.shape == (3,)


def _live_saved_bytes(model, sample) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct tensors autograd keeps for backward once the forward has returned."""
    kept = weakref.WeakSet()

    class Saved:
        def __init__(self, t):
            self.t = t
            kept.add(self)

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.t):
        out = model(sample[:, :16], sample[:, 1:], mtp_weight=0.3)
    storages = {s.t.untyped_storage().data_ptr(): s.t.untyped_storage().nbytes() for s in kept}
    return sum(storages.values()), out.loss


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_one_head_at_a_time_keeps_no_head_activations(one_at_a_time):
    """What backward keeps grows by about a head's activations and logits per head in the plain
    backward, and by nothing with one head at a time (each head is done before the next starts)."""
    sample = torch.randint(0, 128, (4, 16 + 4))
    saved = {}
    for depth in (1, 3):
        model = float64_model("parallel", depth=depth)
        model.mtp.one_at_a_time = one_at_a_time
        saved[depth], loss = _live_saved_bytes(model, sample)
        loss.backward()  # the graph it kept still runs
    trunk_only = _live_saved_bytes(float64_model("parallel", depth=0), sample)[0]
    per_head = saved[1] - trunk_only if not one_at_a_time else None
    if one_at_a_time:
        assert saved[3] == saved[1]
    else:
        assert per_head > 0 and saved[3] - saved[1] == pytest.approx(2 * per_head, rel=0.05)


# -- Decoding with parallel heads --------------------------------------------------------------------


@pytest.fixture(scope="module")
def parallel_model():
    return random_model(tiny_config(mtp_depth=3, mtp_kind="parallel"))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_parallel_heads_greedy_speculative_equals_plain(parallel_model, k):
    for prompts in (RAGGED_PROMPTS[:1], RAGGED_PROMPTS):
        plain, _ = greedy_tokens(parallel_model, prompts, k=0)
        spec, stats = greedy_tokens(parallel_model, prompts, k=k)
        assert spec == plain == [naive_greedy(parallel_model, p, 16) for p in prompts]
        assert stats.drafted == [stats.steps] * k


@torch.no_grad()
def test_parallel_head_drafts_match_full_forward(parallel_model):
    """After two speculative steps, head k's draft distribution at the last committed position equals
    the heads run over the whole sequence as in training: all K drafts come from one trunk state."""
    engine = Engine(parallel_model, speculative_k=3)
    requests = [Request(p, 20, SamplingParams(temperature=1.0, seed=i)) for i, p in enumerate(RAGGED_PROMPTS)]
    (batch, _), stats = engine.start(requests), DecodeStats(3)
    for _ in range(2):
        engine.step(batch, stats)
    _, q = engine._draft(batch, 3, torch.rand(3, 3, dtype=torch.float64))
    for row in range(3):
        n = int(batch.n[row])
        hidden, _ = parallel_model.hidden_states(batch.seq[row, :n][None], n)
        for k in (1, 2, 3):
            expected = torch.softmax(parallel_model.logits(hidden[k][0, -1]), dim=-1)
            assert torch.allclose(q[row, k - 1], expected, atol=1e-10), (row, k)


def test_parallel_heads_continuous_batching(parallel_model):
    engine = Engine(parallel_model, 2)
    first = [Request(RAGGED_PROMPTS[0], 10), Request(RAGGED_PROMPTS[1], 4)]
    later = [Request(RAGGED_PROMPTS[2], 20), Request([5], 12, SamplingParams(temperature=1.0, seed=3))]
    alone = [engine.generate([r])[0][0].tokens for r in first + later]
    (batch, results), stats = engine.start(first), DecodeStats(2)
    for _ in range(3):
        engine.step(batch, stats)
    joining, joining_results = engine.start(later)
    batch.merge(joining)
    while batch.size:
        engine.step(batch, stats)
    assert [r.tokens for r in results + joining_results] == alone


def test_parallel_heads_sampling_matches_trunk_distribution(monkeypatch):
    """Vocabulary 16, three heads, K = 3: the first three sampled tokens of 16,000 seeded sequences follow
    the trunk's exact joint distribution (Pearson chi-square at 0.001); accepting every draft does not."""
    alpha, samples, vocab, prompt = 1e-3, 16_000, 16, [3, 7, 1]
    model = random_model(tiny_config(vocab_size=vocab, mtp_depth=3, mtp_kind="parallel", init_std=0.5), seed=3)
    exact = _joint_distribution(model, prompt, vocab)

    def sample_counts():
        requests = [Request(prompt, 3, SamplingParams(temperature=1.0, seed=i)) for i in range(samples)]
        results, stats = Engine(model, speculative_k=3).generate(requests)
        x = torch.tensor([r.tokens for r in results])
        return torch.bincount(x[:, 0] * vocab * vocab + x[:, 1] * vocab + x[:, 2], minlength=vocab ** 3), stats

    counts, stats = sample_counts()
    assert 0.02 < stats.acceptance[0] < 0.98 and stats.acceptance[1] > 0.001
    assert _chi_square_p_value(counts, exact) > alpha

    def accept_all(drafts, q, p, u):
        return torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.long), draw(p[:, -1], u[:, -1])

    monkeypatch.setattr(speculative, "accept", accept_all)
    assert _chi_square_p_value(sample_counts()[0], exact) < alpha


def test_parallel_heads_draft_at_most_d_tokens(parallel_model):
    with pytest.raises(ValueError, match="speculative_k=4.*at most 3"):
        Engine(parallel_model, speculative_k=4)


# -- HuggingFace export and import --------------------------------------------------------------------


def test_parallel_heads_export_as_a_plain_model_plus_heads_file(tmp_path):
    cfg = _hf_helpers.tiny_config(mtp_depth=2, mtp_kind="parallel")
    model = _hf_helpers.random_model(cfg)
    out = export(_hf_helpers.save_checkpoint(model, cfg, tmp_path / "ckpt"), tmp_path / "hf", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    heads = load_file(str(out / PARALLEL_HEADS_FILE))
    assert not any(n.startswith("mtp") for n in index) and all(n.startswith("mtp_heads.") for n in heads)
    assert len([n for n in heads if n.endswith(".norm.weight")]) == 2

    # transformers loads the trunk as a plain DeepSeek-V3 model: same logits as ours
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _hf_helpers.random_tokens(cfg)
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4

    back = import_hf(out, tmp_path / "back")
    state = _hf_helpers.read_checkpoint(back)
    original = model.state_dict()
    assert set(state) == {k for k in original if not k.endswith("_extra_state")}
    assert all(torch.equal(state[k], original[k]) for k in state)
    assert load_config(back / "config.yaml").model.mtp_kind == "parallel"

    (out / PARALLEL_HEADS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=PARALLEL_HEADS_FILE):
        import_hf(out, tmp_path / "again")


# -- Configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sets,field", [
    (["model.mtp_kind=medusa"], "model.mtp_kind"),
    (["train.mtp_depth_weights=quadratic"], "train.mtp_depth_weights"),
    (["model.mtp_depth=2", "train.mtp_depth_weights=[1, 2, 3]"], "train.mtp_depth_weights has 3 numbers"),
    (["model.mtp_depth=2", "train.mtp_depth_weights=[1, -1]"], "train.mtp_depth_weights"),
    (["model.mtp_depth=2", "train.mtp_depth_weights=[0, 0]"], "positive sum"),
    (["train.mtp_heads_one_at_a_time=true"], "model.mtp_kind=parallel"),
    (["model.mtp_kind=parallel", "model.mtp_depth=0", "train.mtp_heads_one_at_a_time=true"], "mtp_depth >= 1"),
])
def test_bad_combinations_are_refused(sets, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        load_config("configs/tiny.yaml", sets)


def test_trainer_applies_the_depth_settings(tmp_path):
    from dsmtp.train.trainer import apply_train_settings

    cfg = load_config("configs/tiny.yaml", ["model.mtp_kind=parallel", "model.mtp_depth=3",
                                            "train.mtp_depth_weights=exponential", "train.mtp_heads_one_at_a_time=true"])
    model = DeepSeekV3(cfg.model)
    apply_train_settings(model, cfg.train)
    assert model.mtp.depth_weights == [1, 0.5, 0.25] and model.mtp.one_at_a_time


def test_train_command_logs_every_parallel_head(tmp_path):
    """`dsmtp train` with three parallel heads trained one at a time: metrics.jsonl holds three depths'
    losses and accuracies in every train and eval record."""
    from dsmtp.cli import main as dsmtp
    from tests.test_train_cli import write_config
    from tests.train_helpers import prepare_tiny_corpus

    config = write_config(tmp_path, prepare_tiny_corpus(tmp_path / "data"), steps=2, log_interval=1, eval_interval=2,
                          save_interval=2)
    sets = ["model.mtp_kind=parallel", "model.mtp_depth=3", "train.mtp_heads_one_at_a_time=true",
            "train.mtp_depth_weights=linear"]
    assert dsmtp(["train", "--config", config, *[a for s in sets for a in ("--set", s)]]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["eval", "train", "train", "eval"]
    assert all(len(r["mtp_loss"]) == len(r["mtp_accuracy"]) == 3 and all(v > 0 for v in r["mtp_loss"])
               for r in records)


def test_flops_count_each_design_once():
    """A parallel head is a sequential module without enorm, hnorm and eh_proj: 6 x (2h^2 + 2h) fewer
    FLOPs per token and depth; both add one layer's attention per depth."""
    from dsmtp.train.flops import flops_per_token

    seq = load_config("configs/small.yaml", ["model.mtp_depth=3"]).model
    par = load_config("configs/small.yaml", ["model.mtp_depth=3", "model.mtp_kind=parallel"]).model
    h = seq.hidden_size
    assert flops_per_token(seq, 4096) - flops_per_token(par, 4096) == 3 * 6 * (2 * h * h + 2 * h)
