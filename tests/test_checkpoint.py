"""Checkpoints: layout, atomic writes, verification, refusals, load_model."""

from __future__ import annotations

import json

import pytest
import torch

from dsmtp import checkpoint
from dsmtp.checkpoint import CheckpointError, load_model
from dsmtp.model import moe_layers
from dsmtp.train.trainer import Trainer
from tests.train_helpers import prepare_tiny_corpus, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture
def make_trainer(tmp_path, data_dir):
    def make(model=None, data=data_dir, resume="auto", **train):
        return Trainer(tiny_config(tmp_path / "run", data, model=model, **train), resume=resume)
    return make


@pytest.fixture
def trained(make_trainer):
    """A run of 4 steps with checkpoints at steps 2 and 4."""
    trainer = make_trainer(steps=4, save_interval=2, eval_interval=100)
    trainer.run()
    return trainer


def test_layout_and_load_model(tmp_path, trained):
    root = tmp_path / "run/checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000004"
    ckpt = root / "step_00000004"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.yaml", "index.json", "manifest.json", "shards", "tokenizer.model", "trainer_state.pt"]
    assert [p.name for p in (ckpt / "shards").iterdir()] == ["rank00000.safetensors"]  # one process, one shard
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["tokens"] == 4 * 64
    assert manifest["tokenizer_sha256"] == checkpoint.sha256_file(trained.data.tokenizer_path)
    stored = checkpoint.StoredTensors(ckpt)
    tensors = {n[len("model/"):]: stored.read(n) for n in stored.tensors if n.startswith("model/")}
    assert "layers.1.ffn.router.expert_bias" in tensors and "mtp.1.layer.ffn.router.expert_bias" in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert not any(k.endswith("_extra_state") for k in tensors)
    # the optimizer state by parameter name, and Adam's step once
    assert int(stored.read("optim/step")) == 4
    for name, p in trained.model.named_parameters():
        assert torch.equal(stored.read(f"optim/{name}/exp_avg"), trained.optimizer.state[p]["exp_avg"]), name

    for where in (tmp_path / "run", ckpt):  # a run directory resolves `latest`
        model, cfg = load_model(where)
        assert cfg.model == trained.cfg.model and not model.training
        for (name, p), q in zip(trained.model.state_dict().items(), model.state_dict().values()):
            assert torch.equal(p, q), name
    assert any(m.router.expert_bias.abs().sum() > 0 for m in moe_layers(model))


def test_keep_last(tmp_path, make_trainer):
    trainer = make_trainer(steps=6, save_interval=1, keep_last=2, eval_interval=100)
    trainer.run()
    steps = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert steps == ["latest", "step_00000005", "step_00000006"]


def test_refuses_other_model_config(make_trainer, trained):
    with pytest.raises(CheckpointError, match=r"different model config.*model.hidden_size: checkpoint 32 vs run 48"):
        make_trainer(model={"hidden_size": 48})


def test_refuses_other_tokenizer(tmp_path, make_trainer, trained):
    other = prepare_tiny_corpus(tmp_path / "other", include=["logging/*.py", "json/*.py"])
    with pytest.raises(CheckpointError, match="different tokenizer"):
        make_trainer(data=other)


def damage_checkpoint(ckpt, damage: str) -> str:
    """Damage a checkpoint's shard file; returns the error a reader of the damaged part must give."""
    target = ckpt / "shards/rank00000.safetensors"
    data = bytearray(target.read_bytes())
    chunks = json.loads((ckpt / "index.json").read_text())["tensors"]
    at = {"flip": chunks["model/embed.weight"]["chunks"][0]["begin"] + 5,  # inside a model tensor
          "flip_optimizer": chunks["optim/embed.weight/exp_avg_sq"]["chunks"][0]["begin"] + 5,
          "header": 20}.get(damage)  # inside the safetensors header's JSON
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        target.unlink()
    else:
        data[at] ^= 1
        target.write_bytes(data)
    return "is missing" if damage == "delete" else "does not match the sha256"


@pytest.mark.parametrize("damage", ["truncate", "flip", "flip_optimizer", "header", "delete"])
def test_refuses_corrupted_checkpoint(tmp_path, make_trainer, trained, damage):
    expected = damage_checkpoint(tmp_path / "run/checkpoints/step_00000004", damage)
    with pytest.raises(CheckpointError, match=expected):
        make_trainer()
    if damage != "flip_optimizer":  # inference reads the model's tensors only
        with pytest.raises(CheckpointError, match=expected):
            load_model(tmp_path / "run")


def test_crash_between_files_keeps_previous_checkpoint(tmp_path, make_trainer, trained, monkeypatch):
    write_file = checkpoint.write_file

    def crash_on_trainer_state(path, write):
        if path.name == "trainer_state.pt":
            raise KeyboardInterrupt("simulated crash while writing a checkpoint")
        write_file(path, write)

    trainer = make_trainer(steps=6, save_interval=2, eval_interval=100)
    assert trainer.step == 4
    monkeypatch.setattr(checkpoint, "write_file", crash_on_trainer_state)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.undo()
    root = tmp_path / "run/checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert not (root / "step_00000006").exists()
    assert any(p.name.startswith(".tmp-step_00000006") for p in root.iterdir())  # the half-written one
    model, _ = load_model(tmp_path / "run")
    for p, q in zip(trained.model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    resumed = make_trainer(steps=6, save_interval=2, eval_interval=100)
    assert resumed.step == 4
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # cleaned up on start


def test_resume_flag_requires_a_checkpoint(make_trainer):
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        make_trainer(resume="require")


def test_dangling_latest_pointer_is_refused(tmp_path, make_trainer, trained):
    (tmp_path / "run/checkpoints/latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        make_trainer()
