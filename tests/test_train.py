"""The training loop: exact resume, averaged metrics, non-finite steps, end-of-run outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsmtp.config import ConfigError, config_from_dict
from dsmtp.model import ModelOutput, moe_layers
from dsmtp.train import report
from dsmtp.train.metrics import LossSums, expert_load_imbalance
from dsmtp.train.trainer import Trainer, TrainingStopped
from tests.train_helpers import prepare_tiny_corpus, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture
def make_trainer(tmp_path, data_dir):
    def make(run="run", **train):
        return Trainer(tiny_config(tmp_path / run, data_dir, **train))
    return make


def train_records(trainer):
    return [r for r in trainer.log.records() if r["kind"] == "train"]


def router_biases(model):
    return torch.cat([m.router.expert_bias for m in moe_layers(model)])


# (train settings, samples a step): fp32 moments, bf16 moments, and bf16 parameters over fp32 master weights
RESUME_CASES = {"fp32": (dict(optimizer_state_dtype="fp32"), 2 * 2),
                "bf16": (dict(optimizer_state_dtype="bf16"), 2 * 2),
                "bf16-params": (dict(optimizer_state_dtype="bf16", param_dtype="bf16", precision="bf16", grad_accum=1), 2)}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bitwise_identical(make_trainer, case):
    settings, samples_per_step = RESUME_CASES[case]
    state_dtype = settings["optimizer_state_dtype"]
    full = make_trainer("full", **settings)
    full.run()

    part = make_trainer("part", **settings)
    part.run(stop_after=3)
    assert part.step == 3
    resumed = make_trainer("part", **settings)  # a new process would do the same: auto-resume
    assert resumed.resumed_from is not None and resumed.step == 3
    assert resumed.data.train.state_dict()["position"] == 3 * samples_per_step  # the next unseen sample
    resumed.run()
    assert resumed.data.train.state_dict() == full.data.train.state_dict()

    keys = ("step", "tokens", "lr", "loss", "mtp_loss", "mtp_accuracy", "grad_norm", "aux_loss",
            "expert_imbalance_mean", "mtp_weight", "bias_rate")
    a = [{k: r[k] for k in keys} for r in train_records(full)]
    b = [{k: r[k] for k in keys} for r in train_records(resumed)]
    assert len(a) == 6 and a == b  # floats compared exactly: JSON round-trips them bit for bit
    assert torch.equal(router_biases(full.model), router_biases(resumed.model))
    assert router_biases(full.model).abs().sum() > 0  # the biases did move
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    evals = lambda t: [(r["step"], r["loss"]) for r in t.log.records() if r["kind"] == "eval"]  # noqa: E731
    assert evals(full) == evals(resumed)
    moments = [s[k] for s in resumed.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32 if state_dtype == "fp32" else torch.bfloat16}
    if case == "bf16-params":  # the master weights came back at fp32, equal to the uninterrupted run's
        assert {p.dtype for p in resumed.model.parameters()} == {torch.bfloat16}
        for p, q in zip(full.model.parameters(), resumed.model.parameters()):
            master, resumed_master = full.optimizer.state[p]["master"], resumed.optimizer.state[q]["master"]
            assert resumed_master.dtype == torch.float32 and torch.equal(master, resumed_master)
            assert torch.equal(q, resumed_master.to(torch.bfloat16))


def test_logged_averages_cover_every_micro_batch(make_trainer, monkeypatch):
    """grad_accum=2, log_interval=2: each record averages 4 micro-batches, weighted by tokens."""
    trainer = make_trainer(steps=4, log_interval=2, eval_interval=100, save_interval=100)
    seen: list[ModelOutput] = []
    forward_backward = trainer.forward_backward

    def recording(*args, **kwargs):
        out = forward_backward(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(trainer, "forward_backward", recording)
    trainer.run()
    records = train_records(trainer)
    assert [r["step"] for r in records] == [2, 4]
    for rec, outs in zip(records, (seen[:4], seen[4:])):
        n = [o.main_tokens.item() for o in outs]
        hand = sum(o.main_loss.item() * k for o, k in zip(outs, n)) / sum(n)
        assert rec["loss"] == pytest.approx(hand, rel=1e-12)
        assert rec["loss"] != pytest.approx(outs[-1].main_loss.item(), rel=1e-9)  # not the last micro-batch
        for d in range(2):
            nk = [o.mtp_tokens[d].item() for o in outs]
            assert rec["mtp_loss"][d] == pytest.approx(
                sum(o.mtp_losses[d].item() * k for o, k in zip(outs, nk)) / sum(nk), rel=1e-12)
            assert rec["mtp_accuracy"][d] == pytest.approx(
                sum(o.mtp_accuracies[d].item() * k for o, k in zip(outs, nk)) / sum(nk), rel=1e-12)
    assert records[1]["tokens"] == 4 * 2 * 2 * 16


def test_loss_sums_weight_by_tokens():
    """Micro-batches with unequal target counts: a token-weighted mean, not a mean of means."""
    def output(main, n, mtp, nk):
        t = torch.tensor
        return ModelOutput(loss=t(0.0), main_loss=t(main), main_accuracy=t(0.5), mtp_losses=t([mtp]),
                           mtp_accuracies=t([0.25]), aux_loss=t(0.0), main_tokens=t(n), mtp_tokens=t([nk]))

    sums = LossSums(1)
    sums.add(output(2.0, 30, 4.0, 10))
    sums.add(output(1.0, 10, 3.0, 30))
    avg = sums.averages()
    assert avg["loss"] == pytest.approx((2.0 * 30 + 1.0 * 10) / 40)
    assert avg["mtp_loss"] == [pytest.approx((4.0 * 10 + 3.0 * 30) / 40)]
    assert avg["accuracy"] == pytest.approx(0.5) and sums.tokens == 40


def poison(trainer, monkeypatch, bad_steps):
    """Make the loss of every micro-batch of the given 1-based steps NaN."""
    forward_backward = trainer.forward_backward

    def maybe_nan(batch, mtp_weight, loss_scale):
        if trainer.step + 1 in bad_steps:
            trainer.model.head.weight.data[0, 0] = float("nan")
            try:
                return forward_backward(batch, mtp_weight, loss_scale)
            finally:
                trainer.model.head.weight.data[0, 0] = 0.0
        return forward_backward(batch, mtp_weight, loss_scale)

    monkeypatch.setattr(trainer, "forward_backward", maybe_nan)


def test_non_finite_step_is_skipped(make_trainer, monkeypatch):
    trainer = make_trainer(steps=4, save_interval=100, eval_interval=100)
    trainer.run(stop_after=2)
    biases = router_biases(trainer.model).clone()
    poison(trainer, monkeypatch, {3})
    trainer.run()
    rec3, rec4 = train_records(trainer)[2:4]
    assert rec3["skipped_steps"] == 1 and rec4["skipped_steps"] == 0 and trainer.total_skips == 1
    # step 3 changed nothing: step 4 started from the step-2 weights and biases, its own counts only
    assert trainer.step == 4 and rec4["tokens"] == 4 * 64
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert not torch.equal(router_biases(trainer.model), biases)  # step 4 did update


def test_non_finite_weights_are_untouched_by_a_skipped_step(make_trainer, monkeypatch):
    trainer = make_trainer(steps=3, save_interval=100, eval_interval=100)
    trainer.run(stop_after=2)
    trainer.model.head.weight.data[0, 0] = 0.0
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    biases = router_biases(trainer.model).clone()
    poison(trainer, monkeypatch, {3})
    trainer.run()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, params[n]), n
    assert torch.equal(router_biases(trainer.model), biases)
    assert all(m.tokens_per_expert.sum() == 0 for m in moe_layers(trainer.model))


def test_consecutive_non_finite_steps_stop_the_run(make_trainer, monkeypatch):
    trainer = make_trainer(steps=10, save_interval=2, eval_interval=100, max_skipped_steps=3)
    poison(trainer, monkeypatch, {5, 6, 7, 8, 9, 10})
    with pytest.raises(TrainingStopped, match=r"3 consecutive steps had a non-finite.*step_00000004"):
        trainer.run()
    assert trainer.step == 7
    records = train_records(trainer)
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0, 1, 1, 1] and trainer.total_skips == 3
    assert records[-1]["loss"] is None and records[-1]["grad_norm"] is None  # no finite step to average
    # the skipped steps wrote no checkpoint: the last good one (step 4) is `latest` and loadable
    latest = (trainer.out_dir / "checkpoints/latest").read_text().strip()
    assert latest == "step_00000004"
    resumed = make_trainer(steps=10, max_skipped_steps=3)
    assert resumed.step == 4 and resumed.consecutive_skips == 0


def test_device_is_read_only_at_log_and_checkpoint_steps(make_trainer, monkeypatch):
    """log_interval=4, save_interval=6: the step statistics are read at steps 4, 6, 8 (and nowhere else);
    a run of non-finite steps that starts at step 5 is noticed there and stops the run at step 8."""
    from dsmtp.train.metrics import IntervalMeter

    trainer = make_trainer(steps=12, log_interval=4, save_interval=6, eval_interval=100, max_skipped_steps=3)
    reads = []
    steps = IntervalMeter.steps
    monkeypatch.setattr(IntervalMeter, "steps", lambda meter: reads.append(trainer.step) or steps(meter))
    poison(trainer, monkeypatch, set(range(5, 13)))
    with pytest.raises(TrainingStopped, match=r"stopped at step 8: 4 consecutive"):
        trainer.run()
    assert sorted(set(reads)) == [4, 6, 8]
    records = train_records(trainer)
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(4, 0), (8, 4)]
    assert records[0]["tokens_per_second"] > 0 and math.isfinite(records[0]["grad_norm"])
    # step 6 was inside the run of skipped steps: no checkpoint there
    assert (trainer.out_dir / "checkpoints/latest").exists() is False


def test_evaluation_is_off_the_interval_clock(make_trainer, monkeypatch):
    """A fake clock: each step takes 1 s, each evaluation 100 s. The evaluation at step 2 falls inside
    the interval logged at step 4, whose throughput must still be its tokens over 4 s."""
    import time

    trainer = make_trainer(steps=4, log_interval=4, eval_interval=2, save_interval=100)
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    train_step, log_eval = trainer.train_step, trainer.log_eval

    def tick(seconds, fn):
        def timed():
            clock[0] += seconds
            return fn()
        return timed

    monkeypatch.setattr(trainer, "train_step", tick(1.0, train_step))
    monkeypatch.setattr(trainer, "log_eval", tick(100.0, log_eval))
    trainer.run()
    (rec,) = train_records(trainer)
    assert rec["tokens_per_second"] == pytest.approx(4 * trainer.tokens_per_step / 4.0)


def test_cuda_graph_is_refused_where_it_cannot_run(make_trainer, tmp_path, data_dir):
    """train.cuda_graph needs CUDA and the single-process step: refused before any work, naming the fix
    (the replay itself is compared with eager training in tests/gpu/test_gpu_train.py)."""
    with pytest.raises(ConfigError, match="train.cuda_graph=true needs a CUDA device"):
        make_trainer(cuda_graph=True)
    with pytest.raises(ConfigError, match="set train.cuda_graph=false or parallel.tp, pp and ep to 1"):
        config_from_dict({"train": {"cuda_graph": True}, "parallel": {"tp": 2}})


def test_overlap_update_is_refused_without_cuda(make_trainer):
    """train.overlap_update needs CUDA streams: refused before any work, naming the fix (its arithmetic
    against the update in turn: tests/test_optim.py here, tests/gpu/test_gpu_train.py on a GPU)."""
    with pytest.raises(ConfigError, match="train.overlap_update=true overlaps CUDA streams: set it to false"):
        make_trainer(overlap_update=True, optimizer_state_dtype="bf16")


def test_end_of_run_outputs(make_trainer):
    trainer = make_trainer(steps=3, log_interval=2)
    trainer.run()
    text = trainer.finish()
    out = trainer.out_dir
    assert (out / "metrics.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["first_eval"]["step"] == 0 and summary["last_eval"]["step"] == 3
    assert "unigram entropy" in text and "MTP depth 2" in text and str(out / "metrics.jsonl") in text
    rec = train_records(trainer)[0]
    for key in ("step", "tokens", "lr", "loss", "mtp_loss", "mtp_accuracy", "aux_loss", "mtp_weight", "bias_rate",
                "expert_imbalance_mean", "expert_imbalance_max", "grad_norm", "tokens_per_second", "skipped_steps"):
        assert key in rec, key
    assert rec["expert_imbalance_max"] >= rec["expert_imbalance_mean"] >= 1.0


def test_unigram_entropy_by_hand():
    # frequencies 1/2, 1/4, 1/4: H = 1.5 ln 2
    assert report.unigram_entropy(torch.tensor([7, 7, 3, 9])) == pytest.approx(1.5 * math.log(2))


def test_expert_load_imbalance_hand_computed():
    """max/mean per MoE layer, over layers (mean, max); a layer that saw no tokens is left out."""
    from dsmtp.model import DeepSeekV3
    from tests.helpers import tiny_model_config

    model = DeepSeekV3(tiny_model_config(num_layers=4, first_k_dense_replace=1, n_routed_experts=4, n_group=2,
                                         topk_group=1, num_experts_per_tok=2, mtp_depth=1))
    layers = list(moe_layers(model))
    assert len(layers) == 4  # three trunk MoE layers and the MTP module's
    for layer, load in zip(layers, ([1, 1, 2, 0], [3, 3, 3, 3], [0, 0, 0, 0], [0, 0, 0, 8])):
        layer.tokens_per_expert.copy_(torch.tensor(load, dtype=torch.float))
    mean, worst = expert_load_imbalance(model)
    assert mean == pytest.approx((2.0 + 1.0 + 4.0) / 3) and worst == pytest.approx(4.0)


def test_engines_split_samples_as_the_single_process_trainer_does():
    """A sample longer than the depths need (train.sample_extra_tokens > model.mtp_depth, as a study's shallower
    arms have) gives the engines inputs of train.seq_len tokens, as it gives the trainer."""
    from types import SimpleNamespace

    from dsmtp.parallel.train_engine import TrainEngine

    cfg = config_from_dict({"model": {"mtp_depth": 1}, "train": {"seq_len": 16, "sample_extra_tokens": 3}})
    samples = torch.arange(2 * 20).view(2, 20)  # seq_len + 1 + 3 tokens each
    (micro,) = TrainEngine._micro_batches(SimpleNamespace(cfg=cfg), [samples])
    assert torch.equal(micro.input_ids, samples[:, :16]) and torch.equal(micro.labels, samples[:, 1:])


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_compile_mode_reaches_every_compiled_part(monkeypatch, mode):
    """train.compile_mode is the mode of every torch.compile call train.compile makes: each transformer
    layer (trunk and MTP), each norm outside them, the loss."""
    from dsmtp.config import load_config
    from dsmtp.model import DeepSeekV3
    from dsmtp.train.trainer import apply_train_settings

    cfg = load_config("configs/tiny.yaml", ["train.compile=true", f"train.compile_mode={mode}"])
    model = DeepSeekV3(cfg.model)
    modes = []

    def record(fn, *args, **kwargs):
        modes.append(kwargs.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    apply_train_settings(model, cfg.train)
    mtp_norms = sum(len(m.norms()) for m in model.mtp)
    assert len(modes) == cfg.model.num_layers + cfg.model.mtp_depth + 1 + mtp_norms + 1
    assert set(modes) == {mode}
