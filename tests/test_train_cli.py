"""`dsmtp train` end to end on a tiny corpus: outputs, resume, refusals."""

from __future__ import annotations

import json

import yaml

from dsmtp.cli import main as dsmtp
from dsmtp.config import config_to_dict
from tests.train_helpers import prepare_tiny_corpus, tiny_config


def write_config(tmp_path, data_dir, **train):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(tiny_config(tmp_path / "run", data_dir, **train))))
    return str(path)


def test_train_command_end_to_end(tmp_path, capsys):
    data_dir = prepare_tiny_corpus(tmp_path / "data")
    config = write_config(tmp_path, data_dir, steps=4, log_interval=2, eval_interval=2, save_interval=2)
    assert dsmtp(["train", "--config", config]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    for path in (run / "metrics.jsonl", run / "metrics.png", run / "summary.json", run / "checkpoints/step_00000004"):
        assert path.exists() and str(path.parent if path.name.startswith("step_") else path) in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("eval", 0), ("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["unigram_entropy"] < 6.0  # log(384) = 5.95 bounds the entropy of 384 token ids
    assert "unigram of train, on val" in out and summary["unigram_baseline"]["val_cross_entropy_nats"] > 0

    # more steps: picks up the checkpoint by itself and continues
    assert dsmtp(["train", "--config", config, "--set", "train.steps=6"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step_00000004" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]

    # a different model in the same out_dir is refused before any work
    assert dsmtp(["train", "--config", config, "--set", "model.hidden_size=48", "--set", "train.steps=8"]) == 1
    err = capsys.readouterr().err
    assert "different model config" in err and "model.hidden_size" in err


def test_train_command_explains_missing_data(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "nowhere")
    assert dsmtp(["train", "--config", config]) == 1
    assert "dsmtp prepare" in capsys.readouterr().err
    assert dsmtp(["train", "--config", config, "--set", "train.precision=fp8"]) == 1
    assert "train.precision=fp8" in capsys.readouterr().err
