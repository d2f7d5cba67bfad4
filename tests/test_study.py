"""The MTP study (dsmtp.study): config, shared data order and initialisation, metrics against independent
computations, the HumanEval sandbox, the report's wording, and a CPU mini-study end to end.

Nothing here asserts anything about quality: tiny runs measure the pipeline, not MTP."""

from __future__ import annotations

import copy
import gzip
import json
import math
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dsmtp.config import (ConfigError, arm_config, config_to_dict, load_study_config, study_from_dict,
                          tokens_per_run)
from dsmtp.data.loader import TrainBatches
from dsmtp.data.prepare import prepare
from dsmtp.data.tokenizer import Tokenizer
from dsmtp.model import DeepSeekV3
from dsmtp.model.params import count_parameters
from dsmtp.parallel.topology import ensure_initialized
from dsmtp.study import evaluate, humaneval, report, runner
from dsmtp.train.trainer import autocast_for, open_data
from tests.train_helpers import TINY_MODEL, tiny_data_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_study(tmp_path: Path, arms: list[dict], **extra) -> dict:
    """A study dict over the tiny stdlib corpus (email/, json/) with a tiny model and a few steps."""
    model = {k: v for k, v in TINY_MODEL.items() if k != "mtp_depth"}
    return {"name": "mini", "out_dir": str(tmp_path / "runs"), "seeds": [0], "arms": arms,
            "base": {"model": model, "data": {**tiny_data_config(tmp_path / "data"), "dedup": True},
                     "train": dict(seq_len=16, micro_batch_size=2, steps=4, lr=3e-3, warmup_steps=1, log_interval=1,
                                   eval_interval=2, eval_batches=2, save_interval=2, keep_last=1)},
            "eval": dict(position_buckets=[0, 4, 8], val_max_tokens=256, micro_batch_size=4, humaneval_problems=2,
                         humaneval_max_new_tokens=4, humaneval_batch_size=2, exec_workers=2, decode_prompts=1,
                         decode_new_tokens=4, decode_repeats=1), **extra}


ARMS = [{"name": "ntp", "mtp_depth": 0}, {"name": "seq2", "mtp_kind": "sequential", "mtp_depth": 2},
        {"name": "par3", "mtp_kind": "parallel", "mtp_depth": 3}]


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("name", ["h200", "cpu_mini"])
def test_shipped_study_configs_give_arms_that_differ_only_in_the_objective(name):
    study = load_study_config(ROOT / "configs" / "study" / f"{name}.yaml")
    configs = [arm_config(study, arm, seed) for arm in study.arms for seed in study.arm_seeds(arm)]
    first = config_to_dict(configs[0])
    for cfg in configs[1:]:
        d = config_to_dict(cfg)
        differing = {f"{section}.{key}" for section in d for key in d[section] if d[section][key] != first[section][key]}
        assert differing <= {"model.mtp_kind", "model.mtp_depth", "train.mtp_weight_schedule", "train.seed",
                             "train.out_dir", "train.mtp_depth_weights", "train.mtp_heads_one_at_a_time"}
        assert tokens_per_run(cfg.train) == tokens_per_run(configs[0].train)
        assert cfg.train.sample_extra_tokens == max(a.mtp_depth for a in study.arms)
    names = {a.name for a in study.arms}
    assert {"ntp", "seq1", "seq2", "par1", "par3"} <= names
    assert len(study.arm_seeds(study.arm("ntp"))) >= 2 and len(study.arm_seeds(study.arm("seq1"))) >= 2


def test_h200_config_is_the_measured_variant_and_fits_one_pass():
    study = load_study_config(ROOT / "configs" / "study" / "h200.yaml")
    seq1 = arm_config(study, study.arm("seq1"), 0)
    counts = count_parameters(seq1.model)  # the 95M-total / 57M-activated variant with D = 1
    assert round(counts.total / 1e6, 1) == 95.5 and round(counts.activated / 1e6, 1) == 57.7
    assert tokens_per_run(seq1.train) == 2400 * 16 * 2048
    lam = seq1.train.mtp_weight_schedule
    assert lam[0] == [0, 0.3] and lam[1][1] == 0.1 and lam[1][0] == round(0.676 * 2400 * 16 * 2048)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["base"]["model"].update(mtp_depth=1), "base.model.mtp_depth is set by the study"),
    (lambda s: s["base"]["train"].update(seed=3), "base.train.seed is set by the study"),
    (lambda s: s["arms"].pop(0), "exactly one arm with mtp_depth 0"),
    (lambda s: s["arms"].append({"name": "seq2", "mtp_depth": 1}), "arms[3].name=seq2 is used twice"),
    (lambda s: s["arms"].append({"name": "bad/name", "mtp_depth": 1}), "arms[3].name=bad/name"),
    (lambda s: s.update(seeds=[1, 1]), "seeds=[1, 1] must list distinct seeds"),
    (lambda s: s["eval"].update(position_buckets=[0, 32]), "eval.position_buckets=[0, 32]"),
    (lambda s: s["eval"].update(humaneval_problems=165), "eval.humaneval_problems=165"),
    (lambda s: s["eval"].update(decode_new_tokens=16), "eval.decode_new_tokens=16"),
    (lambda s: s.update(mtp_weight_by_fraction=[[0.5, 0.3]]), "mtp_weight_by_fraction=[[0.5, 0.3]]"),
    (lambda s: s["arms"][1].update(mtp_depth_weights=[1.0]), "arm seq2 (seed 0): train.mtp_depth_weights has 1"),
    (lambda s: s["arms"][2].update(mtp_kind="diagonal"), "arm par3 (seed 0): model.mtp_kind='diagonal'"),
    (lambda s: s.pop("base"), "the study config has no base"),
    (lambda s: s["arms"][0].update(depth=1), "unknown config key arms[0].depth"),
])
def test_bad_study_configs_are_refused_naming_the_field(tmp_path, change, message):
    data = tiny_study(tmp_path, copy.deepcopy(ARMS))
    change(data)
    with pytest.raises(ConfigError, match=re.escape(message)):
        study_from_dict(data)


def test_sample_extra_tokens_below_the_depth_is_refused(tmp_path):
    from dsmtp.config import config_from_dict

    with pytest.raises(ConfigError, match="train.sample_extra_tokens=1 is below model.mtp_depth=2"):
        config_from_dict({"model": TINY_MODEL, "train": {"seq_len": 16, "sample_extra_tokens": 1}})


# ---------------------------------------------------------------------------------------------
# Same data order and same initialisation of the shared parameters, whatever the objective


def test_arms_draw_the_same_batches_and_start_from_the_same_shared_parameters(tmp_path):
    study = study_from_dict(tiny_study(tmp_path, copy.deepcopy(ARMS)))
    prepare(study.base.data, study.base.model.vocab_size)
    ensure_initialized()
    batches, states = {}, {}
    for arm in study.arms:
        cfg = arm_config(study, arm, 0)
        data = open_data(cfg)
        batches[arm.name] = [next(data.train) for _ in range(5)]
        torch.manual_seed(cfg.train.seed)  # as Trainer.build_model does
        states[arm.name] = DeepSeekV3(cfg.model).state_dict()
    ntp = states["ntp"]
    for name in ("seq2", "par3"):
        assert all(torch.equal(a, b) for a, b in zip(batches["ntp"], batches[name]))
        shared = [k for k, v in ntp.items() if isinstance(v, torch.Tensor)]
        assert shared and all(torch.equal(ntp[k], states[name][k]) for k in shared)
        assert any(k.startswith("mtp.") for k in states[name]) and not any(k.startswith("mtp.") for k in ntp)
    assert batches["ntp"][0].shape == (2, 16 + 1 + 3)  # the deepest arm's window, for every arm
    # Without a common sample length the windows differ with the depth (and so may the sample count that
    # seeds the shuffle): what sample_extra_tokens is for.
    plain = TrainBatches(study.base.data.data_dir, 16, 0, 2, 0)
    assert next(plain).shape == (2, 17)


# ---------------------------------------------------------------------------------------------
# Metrics against independent computations


def seq2_untrained(tmp_path):
    """(study, the seq2 arm's config, its model at initialisation, the tokenizer) over a prepared mini corpus."""
    study = study_from_dict(tiny_study(tmp_path, copy.deepcopy(ARMS)))
    prepare(study.base.data, study.base.model.vocab_size)
    ensure_initialized()
    cfg = arm_config(study, study.arm("seq2"), 0)
    torch.manual_seed(0)
    return study, cfg, DeepSeekV3(cfg.model).eval(), Tokenizer.load(cfg.data.data_dir)


def test_validation_metrics_match_the_model_loss_and_the_decoded_bytes(tmp_path):
    study, cfg, model, tokenizer = seq2_untrained(tmp_path)
    seq_len, extra = cfg.train.seq_len, cfg.train.sample_extra_tokens
    fp32 = autocast_for("fp32", torch.device("cpu"))
    got = evaluate.validation(model, cfg.data.data_dir, seq_len, extra, study.eval, fp32,
                              evaluate.token_byte_lengths(tokenizer))
    # Reference: the model's own loss (its forward with labels) window by window, and the bytes of the
    # targets decoded as text.
    from dsmtp.data.shards import TokenSplit

    split = TokenSplit(cfg.data.data_dir, "val")
    windows = study.eval.val_max_tokens // seq_len
    sums = torch.zeros(3, 3, dtype=torch.float64)  # depth 0..2: loss * n, accuracy * n, n
    text_bytes = 0
    with torch.no_grad():
        for k in range(windows):
            w = torch.from_numpy(split.read(k * seq_len, seq_len + extra + 1).astype(np.int64))[None]
            out = model(w[:, :seq_len], w[:, 1:])
            for d, (loss, acc, n) in enumerate([(out.main_loss, out.main_accuracy, out.main_tokens)]
                                               + list(zip(out.mtp_losses, out.mtp_accuracies, out.mtp_tokens))):
                sums[d] += torch.stack([loss.double() * n, acc.double() * n, n.double()])
            text_bytes += len(tokenizer.decode(w[0, 1:seq_len + 1].tolist()).encode())
    assert got["windows"] == windows and got["tokens"] == windows * seq_len
    assert got["loss"] == pytest.approx((sums[0, 0] / sums[0, 2]).item(), rel=1e-5)
    assert got["accuracy"] == pytest.approx((sums[0, 1] / sums[0, 2]).item(), abs=1e-9)
    for d in (1, 2):
        assert got["depths"][d - 1]["loss"] == pytest.approx((sums[d, 0] / sums[d, 2]).item(), rel=1e-5)
        assert got["depths"][d - 1]["accuracy"] == pytest.approx((sums[d, 1] / sums[d, 2]).item(), abs=1e-9)
        assert got["depths"][d - 1]["tokens"] == windows * seq_len  # the windows hold every depth's targets
    assert got["bytes"] == text_bytes
    assert got["bits_per_byte"] == pytest.approx(got["loss"] * got["tokens"] / math.log(2) / text_bytes, rel=1e-9)
    buckets = got["by_position"]
    assert [(b["from"], b["to"]) for b in buckets] == [(0, 4), (4, 8), (8, 16)]
    assert sum(b["tokens"] for b in buckets) == got["tokens"]
    assert sum(b["loss"] * b["tokens"] for b in buckets) / got["tokens"] == pytest.approx(got["loss"], rel=1e-9)


def test_training_costs_read_the_run_metrics():
    records = [{"kind": "eval", "step": 0, "tokens": 0, "loss": 9.0, "accuracy": 0.0, "mtp_loss": [9.5]},
               {"kind": "train", "step": 10, "tokens_per_second": 10.0, "peak_memory_gib": 3.0},  # compiling
               {"kind": "train", "step": 20, "tokens_per_second": 100.0, "peak_memory_gib": 2.0},
               {"kind": "train", "step": 30, "tokens_per_second": 300.0, "peak_memory_gib": 2.5},
               {"kind": "train", "step": 40, "tokens_per_second": 200.0, "peak_memory_gib": 2.0},
               {"kind": "eval", "step": 40, "tokens": 400, "loss": 5.0, "accuracy": 0.3, "mtp_loss": [5.5]}]
    costs = evaluate.training_costs(records, tokens_per_step=50)
    assert costs["tokens_per_second"] == 200.0 and costs["step_seconds"] == 0.25 and costs["peak_memory_gib"] == 3.0
    assert [p["loss"] for p in costs["curve"]] == [9.0, 5.0]


def test_completions_and_decoding_on_the_static_engine_equal_the_dynamic_engine(tmp_path, monkeypatch):
    """On CUDA the study decodes with the static engine (slots reused past max_batch, stop sequences through
    on_tokens); run eagerly on CPU it must give the dynamic engine's greedy tokens and acceptance."""
    from dsmtp.serve.static import StaticEngine

    study, cfg, model, tokenizer = seq2_untrained(tmp_path)
    problems = humaneval.load_problems(3)
    e = study.eval
    e.humaneval_batch_size = 2  # three requests through two slots
    prompts = [evaluate.prompt_tokens(tokenizer, p.prompt, 12)[0] for p in problems[:2]]
    dynamic = (evaluate.humaneval_completions(model, tokenizer, problems, e, 16), evaluate.decoding(model, prompts, e))
    monkeypatch.setattr(evaluate, "make_engine", lambda m, k, max_batch, max_length: StaticEngine(
        m, k, max_batch=max_batch, max_length=max_length, cuda_graphs=False))
    static = (evaluate.humaneval_completions(model, tokenizer, problems, e, 16), evaluate.decoding(model, prompts, e))
    assert static[0] == dynamic[0] and dynamic[0][1] == 3  # every prompt was cut to fit the 16-token context
    assert static[1]["engine"] == "StaticEngine" and dynamic[1]["engine"] == "Engine"
    for a, b in zip(static[1]["speculative"], dynamic[1]["speculative"]):
        assert a["acceptance"] == b["acceptance"] and a["tokens_per_forward"] == b["tokens_per_forward"]


# ---------------------------------------------------------------------------------------------
# HumanEval: the package's problems and the sandbox


def test_humaneval_problems_come_from_the_installed_package():
    problems = humaneval.load_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    with gzip.open(humaneval.data_file(), "rt") as f:
        assert json.loads(f.readline())["entry_point"] == problems[0].entry_point
    assert humaneval.truncate_at_stop("    return x\n\ndef g():\n    pass") == "    return x\n"
    assert humaneval.truncate_at_stop("    return x\n#comment") == "    return x"
    assert humaneval.truncate_at_stop("    if x:\n        y") == "    if x:\n        y"  # indented: not a stop


def test_sandbox_passes_canonical_solutions_and_stops_bad_programs(tmp_path):
    problems = humaneval.load_problems(6)
    wrong = problems[2].program("    return -1\n")
    programs = [p.program(p.canonical_solution) for p in problems] + [
        wrong,
        "while True:\n    pass\n",
        "x = bytearray(8 << 30)\n",
        f"open({str(tmp_path / 'big')!r}, 'wb').write(b'x' * (64 << 20))\n",
        f"import os\nos.remove({str(tmp_path / 'keep')!r})\n",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
    ]
    (tmp_path / "keep").write_text("still here")
    outcomes = humaneval.run_programs(programs, timeout_s=3.0, workers=2)
    assert all(o.passed for o in outcomes[:6]), [o.result for o in outcomes[:6]]
    assert outcomes[6].result.startswith("failed: AssertionError")
    assert outcomes[7].result == "timed out"
    assert not any(o.passed for o in outcomes[8:])
    assert (tmp_path / "keep").read_text() == "still here"
    assert not (tmp_path / "big").exists() or (tmp_path / "big").stat().st_size <= humaneval.FILE_BYTES


def test_sandbox_network_namespace_blocks_raw_sockets():
    """Past the disabled socket module: a raw _socket cannot reach a server this process listens on."""
    if humaneval.network_isolation() != "network namespace + socket disabled":
        pytest.skip("this kernel gives no network namespace to this user: the socket module is disabled only")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
        outcome = humaneval.run_program(program, timeout_s=5.0)
    assert not outcome.passed and "timed out" not in outcome.result


# ---------------------------------------------------------------------------------------------
# The report's wording follows the numbers


def _fake(arm: str, seed: int, depth: int, loss: float, passed: int = 0, problems: int = 164) -> dict:
    return {"arm": arm, "seed": seed, "objective": {"mtp_depth": depth},
            "val": {"loss": loss}, "humaneval": {"pass": {"pass_at_1": passed / problems, "problems": problems}}}


def test_differences_are_claimed_only_beyond_the_seed_spread():
    loss, pass1 = report.QUALITY[0], report.QUALITY[4]
    ntp = [_fake("ntp", 0, 0, 2.50), _fake("ntp", 1, 0, 2.52)]  # spread 0.02
    assert "within the spread (0.0200), no difference claimed" in report.compare([_fake("m", 0, 1, 2.49),
                                                                                   _fake("m", 1, 1, 2.50)], ntp, loss)
    assert report.compare([_fake("m", 0, 1, 2.45), _fake("m", 1, 1, 2.46)], ntp, loss).endswith(
        "-0.0550, beyond the spread (0.0200): better")
    assert report.compare([_fake("m", 0, 1, 2.60), _fake("m", 1, 1, 2.70)], ntp, loss).endswith(
        "beyond the spread (0.1000): worse")  # the MTP arm's own range is the larger noise
    assert "one seed each, no spread measured, no claim" in report.compare([_fake("m", 0, 1, 2.0)], [ntp[0]], loss)
    # one seed against two: the two seeds' range is the noise
    assert "beyond the spread (0.0200): better" in report.compare([_fake("m", 0, 1, 2.40)], ntp, loss)
    # pass@1 moves in steps of one problem: a one-problem difference never counts, even with equal seeds
    zero = [_fake("ntp", s, 0, 2.5, passed=0) for s in (0, 1)]
    assert "within the spread (0.012), no difference claimed" in report.compare(
        [_fake("m", s, 1, 2.5, passed=1) for s in (0, 1)], zero, pass1)
    assert "better" in report.compare([_fake("m", s, 1, 2.5, passed=3) for s in (0, 1)], zero, pass1)


def test_paired_differences_subtract_the_baseline_run_of_the_same_seed():
    arms = {"ntp": [_fake("ntp", 0, 0, 2.50), _fake("ntp", 1, 0, 2.40)],
            "a": [_fake("a", 0, 1, 2.45), _fake("a", 1, 1, 2.38)],  # lower than its own seed's baseline twice
            "b": [_fake("b", 0, 1, 2.45), _fake("b", 1, 1, 2.46)],  # lower once, higher once
            "c": [_fake("c", 1, 1, 2.30)]}
    rows = [line for line in report.paired_by_seed(arms, "ntp", report.QUALITY[0]) if line.startswith("| ")]
    assert rows == ["| arm | seed 0 | seed 1 | sign |",
                    "| a | -0.0500 | -0.0200 | lower in every seed |",
                    "| b | -0.0500 | +0.0600 | mixed |",
                    "| c | - | -0.1000 | one seed |"]


# ---------------------------------------------------------------------------------------------
# The pipeline end to end: two arms, a few steps, a resumed arm, the report


def test_cpu_mini_study_end_to_end(tmp_path, capsys):
    study_dict = tiny_study(tmp_path, [ARMS[0], ARMS[1]])
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study_dict))
    runs = tmp_path / "runs"

    # The baseline stops at its first checkpoint (a --train-until already past), then resumes.
    assert runner.main(["--config", str(config), "--arms", "ntp", "--train-until", "0"]) == runner.RESUME_EXIT
    assert not (runs / "ntp-s0" / "results.json").exists() and (runs / "ntp-s0" / "checkpoints").is_dir()
    assert runner.main(["--config", str(config)]) == 0
    results = {name: json.loads((runs / f"{name}-s0" / "results.json").read_text()) for name in ("ntp", "seq2")}

    # Same data, order and shared initialisation; the hash chain is the batches a fresh loader serves.
    ntp, seq2 = results["ntp"], results["seq2"]
    for key in ("shared_init_sha256", "data_order_sha256", "data_order_batches", "step0_val_loss"):
        assert ntp["checks"][key] == seq2["checks"][key], key
    loader = TrainBatches(ntp["corpus"]["data_dir"], 16, 2, 2, 0)
    chain = runner.OrderHashing(loader)
    for _ in range(4):
        next(chain)
    assert ntp["checks"]["data_order_sha256"] == chain.digest and ntp["checks"]["data_order_batches"] == 4
    assert json.loads((runs / "ntp-s0" / runner.WALL_FILE).read_text())["starts"] == 2
    # Arms that finish before the baseline has run end the run normally, their tables waiting for it.
    only_mtp = tmp_path / "only_mtp" / "seq2-s0"
    only_mtp.mkdir(parents=True)
    (only_mtp / "results.json").write_text((runs / "seq2-s0" / "results.json").read_text())
    assert "none of them the next-token baseline" in runner.closing_summary(only_mtp.parent)
    assert "### Quality at equal tokens" in runner.closing_summary(runs)

    # Schema: every section, shaped by the arm's objective.
    for r in results.values():
        depth = r["objective"]["mtp_depth"]
        assert r["training"]["steps"] == 4 and r["training"]["tokens"] == 4 * 2 * 16
        assert [p["step"] for p in r["training"]["curve"]] == [0, 2, 4]
        assert len(r["val"]["depths"]) == depth and len(r["val"]["by_position"]) == 3
        assert r["humaneval"]["loss"]["problems"] == 2 and r["humaneval"]["loss"]["tokens"] > 0
        he = r["humaneval"]["pass"]
        assert he["problems"] == 2 and 0 <= he["pass_at_1"] <= 1 and he["canonical_passed"] == 2
        assert [s["k"] for s in r["decoding"]["speculative"]] == list(range(1, depth + 1))
        for spec in r["decoding"]["speculative"]:
            assert len(spec["acceptance"]) == spec["k"] and spec["same_as_plain"]  # greedy drafts change nothing
        assert r["config"]["train"]["sample_extra_tokens"] == 2 and r["corpus"]["dedup"]

    # A finished arm is skipped, its results kept.
    before = (runs / "seq2-s0" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert runner.main(["--config", str(config), "--arms", "seq2"]) == 0
    assert "seq2 seed 0: done" in capsys.readouterr().out
    assert (runs / "seq2-s0" / "results.json").stat().st_mtime_ns == before

    # The report: tables from the files, wording from the numbers, plots, the doc's generated part only.
    doc = tmp_path / "study.md"
    other = f"{report.REPORT_BEGIN.format(study='other')}\nkept\n{report.REPORT_END.format(study='other')}\n"
    doc.write_text(f"# Study\nprose before\n{report.REPORT_BEGIN.format(study='mini')}\nold tables\n"
                   f"{report.REPORT_END.format(study='mini')}\nprose after\n{other}")
    assert runner.main(["--report", str(runs), "--doc", str(doc), "--plots", str(tmp_path / "plots")]) == 0
    text = doc.read_text()
    assert text.startswith("# Study\nprose before\n") and text.endswith(f"prose after\n{other}")
    assert "old tables" not in text
    assert "| seq2 | sequential D=2 | 1 |" in text and "one seed each, no spread measured, no claim" in text
    assert "- Seed 0: initialisation of the shared parameters identical across 2 arms." in text
    assert "- Seed 0: training data order identical across 2 arms." in text
    for png in ("val_loss.png", "loss_by_position.png", "acceptance.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{png})" in text
