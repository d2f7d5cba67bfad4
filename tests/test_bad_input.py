"""Bad input as a careless or unlucky user gives it: every case ends in one clear line that names what is
wrong and the fix, a non-zero exit and no traceback, before work starts; nothing half-written is left.

The cases: a model larger than the machine (model.mtp_depth=100000), token shards with garbage of the right
size, a torn last line in metrics.jsonl, malformed HF config.json files, a --prompt that is not UTF-8, and a
data dir in the old layout (with the document index nothing read).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dsmtp.cli import main as dsmtp
from dsmtp.config import config_to_dict
from dsmtp.convert.hf_config import to_hf_config
from dsmtp.data import shards
from dsmtp.data.errors import DataError
from dsmtp.data.loader import TrainBatches
from dsmtp.data.prepare import prepare
from dsmtp.data.shards import TokenSplit, load_manifest
from dsmtp.train import trainer as trainer_mod
from tests.serve_models import tiny_config as serve_tiny_config
from tests.serve_models import train_checkpoint
from tests.train_helpers import TINY_MODEL, prepare_tiny_corpus, tiny_config

REPO = Path(__file__).resolve().parents[1]


def one_clear_line(code: int, err: str, *needles: str) -> str:
    """The refusal: a non-zero exit and exactly one line on stderr holding every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_tiny_corpus(tmp_path_factory.mktemp("data") / "d")


def write_config(tmp_path: Path, data_dir: Path, **train) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(tiny_config(tmp_path / "run", data_dir, **train))))
    return str(path)


def copy_data_dir(data_dir: Path, to: Path) -> Path:
    shutil.copytree(data_dir, to)
    return to


# ----------------------------------------------------------------------------------------------
# 1. A model the machine cannot hold is refused before it is built


def test_train_refuses_a_model_larger_than_memory_before_building_it(tmp_path, data_dir, capsys, monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer_mod, "DeepSeekV3", build)
    config = write_config(tmp_path, data_dir)
    code = dsmtp(["train", "--config", config, "--set", "model.mtp_depth=100000"])
    one_clear_line(code, capsys.readouterr().err, "model.mtp_depth=100000", "GiB", "train.skip_memory_check")
    assert not (tmp_path / "run").exists()

    # the expert's override: the check is skipped and the build is attempted
    with pytest.raises(AssertionError, match="the model was built"):
        dsmtp(["train", "--config", config, "--set", "model.mtp_depth=100000", "--set", "train.skip_memory_check=true"])


# ----------------------------------------------------------------------------------------------
# 2. Token shards: garbage of the right size, ids outside the vocabulary, checksums


def train_shard(data_dir: Path, index: int = 0) -> Path:
    return data_dir / load_manifest(data_dir)["splits"]["train"]["shards"][index]["tokens"]


def test_garbage_shard_is_refused_before_training_with_the_shard_named(tmp_path, data_dir, capsys):
    bad = copy_data_dir(data_dir, tmp_path / "bad")
    shard = train_shard(bad)
    shard.write_bytes(np.random.default_rng(0).integers(0, 2**16, shard.stat().st_size // 2, dtype=np.uint16).tobytes())
    code = dsmtp(["train", "--config", write_config(tmp_path, bad)])
    one_clear_line(code, capsys.readouterr().err, str(shard), "dsmtp prepare")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the step-0 eval


def test_in_vocabulary_corruption_fails_the_checksum_and_prepare_repairs_it(tmp_path, data_dir):
    bad = copy_data_dir(data_dir, tmp_path / "bad")
    shard = train_shard(bad)
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[len(tokens) // 2] = (tokens[len(tokens) // 2] + 1) % TINY_MODEL["vocab_size"]  # still a valid id
    tokens.tofile(shard)
    with pytest.raises(DataError, match="checksum") as err:
        TokenSplit(bad, "train")
    assert str(shard) in str(err.value) and "dsmtp prepare" in str(err.value)

    # the fix the message names works: prepare notices the damage and rebuilds
    cfg = tiny_config(tmp_path / "run", bad)
    prepare(cfg.data, cfg.model.vocab_size)
    split = TokenSplit(bad, "train")
    assert np.array_equal(split.read(0, split.num_tokens), TokenSplit(data_dir, "train").read(0, split.num_tokens))


def test_out_of_vocabulary_id_met_while_reading_names_shard_and_offset(tmp_path, data_dir):
    bad = copy_data_dir(data_dir, tmp_path / "bad")
    split = TokenSplit(bad, "train")  # opened (and its sample verified) before the damage
    shard = train_shard(bad)
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[37] = 60000
    tokens.tofile(shard)
    with pytest.raises(DataError) as err:
        split.read(0, 64)
    message = str(err.value)
    assert str(shard) in message and "offset 37" in message and "60000" in message and "dsmtp prepare" in message


# ----------------------------------------------------------------------------------------------
# 3. A torn last line in metrics.jsonl is dropped with a warning on resume


def test_resume_drops_a_torn_last_metrics_line_with_a_warning(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, data_dir, steps=2, log_interval=1, eval_interval=2, save_interval=2)
    assert dsmtp(["train", "--config", config]) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"kind": "train", "step": 3, "loss": 4.1')  # power lost mid-write
    capsys.readouterr()
    assert dsmtp(["train", "--config", config, "--set", "train.steps=3"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(metrics) in err and "torn" in err
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2),
                                                         ("train", 3), ("eval", 3)]


def test_a_damaged_metrics_line_before_the_end_is_named(tmp_path, data_dir, capsys):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text('{"kind": "eval", "step": 0}\ngarbage\n{"kind": "train", "step": 1}\n')
    code = dsmtp(["train", "--config", write_config(tmp_path, data_dir)])
    one_clear_line(code, capsys.readouterr().err, f"{metrics}:2", "delete or repair")


# ----------------------------------------------------------------------------------------------
# 4. import-hf on malformed config.json files; generate with a prompt that is not UTF-8


def _hf_config() -> dict:
    return to_hf_config(serve_tiny_config(mtp_depth=1))


def _without(key: str) -> dict:
    d = _hf_config()
    del d[key]
    return d


MALFORMED_CONFIG_JSON = [
    ("not JSON", "{\"hidden_size\": 32,", "not valid JSON"),
    ("empty", "", "not valid JSON"),
    ("a list", "[1, 2]", "JSON object"),
    ("null", "null", "JSON object"),
    ("a string where a number belongs", {**_hf_config(), "hidden_size": "32"}, "hidden_size"),
    ("a null size", {**_hf_config(), "hidden_size": None}, "hidden_size"),
    ("missing hidden_size", _without("hidden_size"), "hidden_size"),
    ("a float layer count", {**_hf_config(), "num_hidden_layers": 2.5}, "num_hidden_layers"),
    ("a boolean layer count", {**_hf_config(), "num_hidden_layers": True}, "num_hidden_layers"),
    ("no heads", {**_hf_config(), "num_attention_heads": 0, "num_key_value_heads": 0}, "model.num_heads=0"),
    ("rope_scaling a string", {**_hf_config(), "rope_scaling": "yarn"}, "rope_scaling"),
    ("yarn without its original length", {**_hf_config(), "rope_scaling": {"type": "yarn", "factor": 4.0}},
     "rope_scaling.original_max_position_embeddings"),
    ("quantization_config a string", {**_hf_config(), "quantization_config": "fp8"}, "quantization_config"),
]


@pytest.mark.parametrize("content, field", [c[1:] for c in MALFORMED_CONFIG_JSON],
                         ids=[c[0] for c in MALFORMED_CONFIG_JSON])
def test_import_hf_names_the_bad_config_json_field(tmp_path, capsys, content, field):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    code = dsmtp(["import-hf", str(hf_dir), str(tmp_path / "out")])
    one_clear_line(code, capsys.readouterr().err, "config.json", field)
    assert not (tmp_path / "out").exists()


def test_generate_refuses_a_prompt_that_is_not_utf8(tmp_path):
    ckpt = train_checkpoint(tmp_path / "ckpt", steps=2)
    proc = subprocess.run([sys.executable, "-m", "dsmtp.cli", "generate", "--ckpt", str(ckpt),
                           "--prompt", b"def f(\xff\xfe):", "--max-new-tokens", "2"],
                          capture_output=True, text=True, errors="replace", timeout=300, cwd=REPO)
    one_clear_line(proc.returncode, proc.stderr, "--prompt", "UTF-8")


# ----------------------------------------------------------------------------------------------
# 5. The document index (data.docs.npy) is gone; data dirs that still have it keep loading


def test_prepare_writes_no_document_index_and_old_data_dirs_still_load(tmp_path, data_dir):
    assert not list(data_dir.rglob("*.docs.npy"))
    assert all("docs" not in s for split in shards.SPLITS for s in load_manifest(data_dir)["splits"][split]["shards"])

    # a data dir as the previous layout wrote it: schema 1, a docs.npy per shard, no checksums
    old = copy_data_dir(data_dir, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 1
    for split in shards.SPLITS:
        for s in manifest["splits"][split]["shards"]:
            s.pop("checksums")
            s["docs"] = s["tokens"].replace(".tokens", ".docs.npy")
            np.save(old / s["docs"], np.array([0, s["num_tokens"]], dtype=np.int64))
    (old / "manifest.json").write_text(json.dumps(manifest))
    for split in shards.SPLITS:
        a, b = TokenSplit(old, split), TokenSplit(data_dir, split)
        assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))
    assert next(TrainBatches(old, 16, 2, 2, seed=0)).shape == (2, 19)


# ----------------------------------------------------------------------------------------------
# Every command: bad input ends in one line through the CLI's one handler


def test_every_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {hidden_size: [\n")
    tiny = str(REPO / "configs/tiny.yaml")
    cases = [
        (["summary", "--config", tiny, "--set", "model.mtp_depth=-1"], "model.mtp_depth=-1"),
        (["summary", "--config", tiny, "--set", "model.hidden_size=[1"], "--set model.hidden_size"),
        (["summary", "--config", str(bad_yaml)], str(bad_yaml)),
        (["summary", "--config", tiny, "--set", "train.seed=-1"], "train.seed=-1"),
        (["export-hf", str(tmp_path / "nowhere"), str(tmp_path / "hf")], "nowhere"),
        (["import-hf", str(tmp_path / "nowhere"), str(tmp_path / "ckpt")], "nowhere"),
        (["prepare", "--config", str(bad_yaml)], str(bad_yaml)),
        (["generate", "--ckpt", str(tmp_path), "--prompt", "x", "--device", "cuda:99"], "--device cuda:99"),
        (["serve", "--ckpt", str(tmp_path), "--device", "gpu"], "--device gpu"),
    ]
    for argv, needle in cases:
        one_clear_line(dsmtp(argv), capsys.readouterr().err, needle)
