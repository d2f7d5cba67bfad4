"""train.trackers: TensorBoard and W&B get exactly the records of metrics.jsonl, read back with each
tool's own reader; bad names and missing packages are refused before any work."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from dsmtp.cli import main as dsmtp
from dsmtp.config import TRACKERS, ConfigError, config_to_dict
from dsmtp.train import trackers
from dsmtp.train.trainer import Trainer
from tests.tracker_helpers import assert_tensorboard_matches_jsonl, jsonl_scalars, same_float, wandb_records
from tests.train_helpers import prepare_tiny_corpus, tiny_config

RUN = dict(steps=6, log_interval=1, eval_interval=3, save_interval=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_corpus(tmp_path_factory.mktemp("corpus") / "data")


def test_every_tracker_name_has_a_writer():
    assert set(trackers.WRITERS) | {"jsonl"} == set(TRACKERS) and set(trackers.PACKAGES) == set(trackers.WRITERS)


def test_tensorboard_holds_every_scalar_of_metrics_jsonl_across_a_resume(tmp_path, data_dir, monkeypatch):
    """A run logs steps 1-5 but dies before its step-5 checkpoint; the resumed run starts again from the
    step-3 checkpoint. metrics.jsonl drops its records of steps 4-5 and so must TensorBoard (purge_step):
    afterwards both hold each step once, with the resumed run's values."""
    cfg = tiny_config(tmp_path / "run", data_dir, trackers=["jsonl", "tensorboard"], **RUN)
    handed = []
    append = trackers.TensorBoardWriter.append
    monkeypatch.setattr(trackers.TensorBoardWriter, "append",
                        lambda writer, record: handed.append(record) or append(writer, record))
    first = Trainer(cfg)
    save = first.save
    monkeypatch.setattr(first, "save", lambda: save() if first.step == 3 else None)
    first.run(stop_after=5)
    assert_tensorboard_matches_jsonl(first.out_dir)
    assert [s for s, _ in jsonl_scalars(first.out_dir)["train/loss"]] == [1, 2, 3, 4, 5]

    first_run = len(handed)
    resumed = Trainer(cfg)
    assert resumed.step == 3
    resumed.run()
    assert [s for s, _ in jsonl_scalars(resumed.out_dir)["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert_tensorboard_matches_jsonl(resumed.out_dir)
    assert len(list((resumed.out_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per run
    # The tracker was handed the very records metrics.jsonl holds, as Python numbers (nothing left on the
    # device for it to read).
    kept = [r for r in handed[:first_run] if r["step"] <= 3] + handed[first_run:]
    assert json.loads(json.dumps(kept)) == resumed.log.records()
    numbers = [v for r in handed for key, value in r.items() if key != "kind"
               for v in (value if isinstance(value, list) else [value])]
    assert numbers and all(type(v) in (int, float) for v in numbers)

    # The run's config is attached: as hparams (the HParams dashboard) and as YAML text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(resumed.out_dir / "tensorboard"))
    events.Reload()
    start = [plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info
             for c in events.PluginTagToContent("hparams").values()]
    (hp,) = [s.hparams for s in start if s.hparams]
    assert hp["model.mtp_depth"].number_value == 2 and hp["train.trackers"].string_value == '["jsonl", "tensorboard"]'
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    mtp_depth: 2\n" in text and "    num_layers: 2\n" in text


def test_wandb_offline_run_holds_every_scalar_of_metrics_jsonl(tmp_path, data_dir, monkeypatch):
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_ERROR_REPORTING="false",
                            WANDB_CONFIG_DIR=tmp_path / "config", WANDB_CACHE_DIR=tmp_path / "cache",
                            WANDB_DATA_DIR=tmp_path / "data",
                            WANDB_BASE_URL="http://127.0.0.1:9").items():  # were it to try a server: none there
        monkeypatch.setenv(name, str(value))
    cfg = tiny_config(tmp_path / "run", data_dir, trackers=["wandb"], **RUN)
    trainer = Trainer(cfg)
    trainer.run()

    (run_dir,) = (trainer.out_dir / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == "run" and run["project"] == "dsmtp"
    assert run["telemetry"]["feature"]["offline"] is True
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert config == config_to_dict(cfg)

    # W&B keeps one history row per step (a step's train and eval records together), doubles exactly.
    history = {r["history"]["step"]["num"]: {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
               for r in records if r["type"] == "history"}
    want: dict[int, dict] = {}
    for tag, points in jsonl_scalars(trainer.out_dir).items():
        for step, value in points:
            want.setdefault(step, {})[tag] = value
    assert sorted(history) == sorted(want) == [0, 1, 2, 3, 4, 5, 6]
    for step, row in want.items():
        assert sorted(history[step]) == sorted(row), step
        for tag, value in row.items():
            logged = history[step][tag]
            assert same_float(math.nan if logged == "NaN" else logged, value), (step, tag, logged, value)
    (exit_record,) = [r for r in records if r["type"] == "exit"]
    assert exit_record["exit"].get("exit_code", 0) == 0


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_missing_package_is_one_clear_message_before_any_work(tracker, tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` now raises ImportError
    cfg = tiny_config(tmp_path / "run", data_dir, trackers=["jsonl", tracker])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert dsmtp(["train", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"dsmtp train: train.trackers lists {tracker}")
    assert "pip install 'dsmtp[tracking]'" in captured.err and f"take {tracker} out of train.trackers" in captured.err
    assert not (tmp_path / "run").exists()  # no metrics, no checkpoint: nothing started


def test_unknown_or_repeated_tracker_names_are_refused(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"train.trackers\[1\]='mlflow' is not a tracker: choose from jsonl, "
                                          r"tensorboard, wandb"):
        tiny_config(tmp_path, data_dir, trackers=["jsonl", "mlflow"])
    with pytest.raises(ConfigError, match="train.trackers lists 'tensorboard' twice"):
        tiny_config(tmp_path, data_dir, trackers=["tensorboard", "tensorboard"])


def test_writing_a_record_counts_as_training_time(tmp_path, data_dir, monkeypatch):
    """A fake clock: each step takes 1 s, writing a record 10 s. The interval after a write starts where
    the previous one stopped, so a slow tracker shows in tokens/s: steps 3-4 took 2 s + 10 s."""
    import time

    trainer = Trainer(tiny_config(tmp_path / "run", data_dir, steps=4, log_interval=2, eval_interval=100,
                                  save_interval=100))
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    train_step, write = trainer.train_step, trainer.write

    def tick(seconds, fn):
        def timed(*args):
            clock[0] += seconds
            return fn(*args)
        return timed

    monkeypatch.setattr(trainer, "train_step", tick(1.0, train_step))
    monkeypatch.setattr(trainer, "write", tick(10.0, write))
    trainer.run()
    rates = [r["tokens_per_second"] for r in trainer.log.records() if r["kind"] == "train"]
    per_step = trainer.tokens_per_step
    assert rates == [pytest.approx(2 * per_step / 2.0), pytest.approx(2 * per_step / 12.0)]


def test_tracker_benchmark_rates_and_table_from_its_results_file(tmp_path, capsys):
    """tools/bench_trackers.py: rates from hand-made records (intervals after the warm-up only; overall =
    tokens over summed interval times) and the table printed back from the rows it appended."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_trackers

    records = [{"step": s, "tokens": 100 * s, "tokens_per_second": rate}
               for s, rate in [(1, 1.0), (2, 50.0), (3, 100.0), (4, 200.0)]]
    row = bench_trackers.rate_row("jsonl", records, warmup=2)  # intervals ending at steps 3 and 4
    assert row == {"trackers": "jsonl", "records": 2, "median": 150.0, "overall": 200 / (1.0 + 0.5)}
    with pytest.raises(SystemExit, match="no record after step 4"):
        bench_trackers.rate_row("jsonl", records, warmup=4)

    results = tmp_path / "trackers.jsonl"
    setting = {"machine": "m", "steps": 4, "warmup": 2, "overrides": ""}
    rows = [{**row, **setting}, {**row, "trackers": "jsonl,wandb", "overall": row["overall"] * 0.9, **setting}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench_trackers.main(["--table", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "machine: m; 4 steps, rates over the records after step 2; overrides: none"
    assert lines[2].split() == ["jsonl", "2", "150", "133", "+0.00%"]
    assert lines[3].split() == ["jsonl,wandb", "2", "150", "120", "-10.00%"]
