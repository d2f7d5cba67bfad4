"""Checkpoints: layout, atomic writes, verification, refusals, resharding, entry points, load_model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from dsmtp import checkpoint
from dsmtp.checkpoint import CheckpointError, load_model
from dsmtp.config import config_to_dict
from dsmtp.convert.export_hf import export
from dsmtp.model import moe_layers
from dsmtp.train.trainer import Trainer
from tests.train_helpers import prepare_tiny_corpus, tiny_config

ROOT = Path(__file__).resolve().parents[1]


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


def crash_in_step_6_save(make_trainer, monkeypatch, write_file_that_crashes) -> None:
    """Resume the trained run (step 4) and train on to step 6, whose save crashes inside `write_file`."""
    trainer = make_trainer(steps=6, save_interval=2, eval_interval=100)
    assert trainer.step == 4
    monkeypatch.setattr(checkpoint, "write_file", write_file_that_crashes)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.undo()


def test_crash_between_files_keeps_previous_checkpoint(tmp_path, make_trainer, trained, monkeypatch):
    write_file = checkpoint.write_file

    def crash_on_trainer_state(path, write):
        if path.name == "trainer_state.pt":
            raise KeyboardInterrupt("simulated crash while writing a checkpoint")
        write_file(path, write)

    crash_in_step_6_save(make_trainer, monkeypatch, crash_on_trainer_state)
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


def test_keep_last_is_reapplied_after_a_resume(tmp_path, make_trainer):
    """Three step directories kept at keep_last=3, and an orphan newer than `latest` (a save interrupted before
    `latest` moved): resuming at keep_last=2 keeps the two newest up to `latest`."""
    make_trainer(steps=4, save_interval=1, keep_last=3, eval_interval=100).run()
    root = tmp_path / "run/checkpoints"
    shutil.copytree(root / "step_00000004", root / "step_00000009")
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_00000002", "step_00000003", "step_00000004", "step_00000009"]
    resumed = make_trainer(steps=4, keep_last=2)
    assert resumed.step == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_crash_while_moving_latest_leaves_it_and_the_temporary_is_cleaned(tmp_path, make_trainer, trained,
                                                                        monkeypatch):
    write_file = checkpoint.write_file

    def crash_after_new_pointer(path, write):
        write_file(path, write)
        if path.name == ".tmp-latest":
            raise KeyboardInterrupt("simulated crash before the new pointer replaces `latest`")

    crash_in_step_6_save(make_trainer, monkeypatch, crash_after_new_pointer)
    root = tmp_path / "run/checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert (root / ".tmp-latest").read_text().strip() == "step_00000006" and (root / "step_00000006").is_dir()
    resumed = make_trainer(steps=6, save_interval=2, eval_interval=100)
    assert resumed.step == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_any_chunking_saves_and_loads_any_other(tmp_path, monkeypatch):
    """One process holding several chunks of each tensor (as ranks of a layout would) saves; the tensors load
    back into a different chunking and read as regions; a tensor not fully covered is refused. Blocks of
    rows are small here, so a region is read (and checked) from the blocks that cover it only."""
    monkeypatch.setattr(checkpoint, "BLOCK_BYTES", 64)
    g = torch.Generator().manual_seed(0)
    full = {"model/a": torch.randn(6, 5, generator=g), "model/b": torch.randn(7, generator=g),
            "optim/step": torch.tensor(3.0)}

    def split(rows_per_chunk: int) -> checkpoint.State:
        state = {}
        for name, t in full.items():
            if t.dim() == 0:
                state[name] = [checkpoint.whole(t.clone())]
                continue
            state[name] = [checkpoint.Chunk(t[i:i + rows_per_chunk].clone(), (i,) + (0,) * (t.dim() - 1),
                                            tuple(t.shape)) for i in range(0, t.shape[0], rows_per_chunk)]
        return state

    cfg = tiny_config(tmp_path, tmp_path)
    ckpt = checkpoint.save_sharded(tmp_path / "ckpt", split(4), cfg)
    checkpoint.verify(ckpt)
    stored = checkpoint.StoredTensors(ckpt)
    assert [c["offsets"] for c in stored.tensors["model/a"]["chunks"]] == [[0, 0], [4, 0]]
    assert len(stored.tensors["model/a"]["chunks"][0]["sha256"]) == 2  # 4 rows of 20 bytes: blocks of 3 rows
    for name, t in full.items():
        assert torch.equal(stored.read(name), t)
    assert torch.equal(stored.read("model/a", (3, 1), (2, 3)), full["model/a"][3:5, 1:4])

    target = split(3)  # zeros in another chunking, filled in place
    for chunks in target.values():
        for c in chunks:
            c.tensor.zero_()
    checkpoint.load_sharded(ckpt, lambda with_optimizer: target if with_optimizer else {})
    for name, chunks in target.items():
        assert torch.equal(torch.cat([c.tensor.reshape(-1, *full[name].shape[1:]) for c in chunks]),
                           full[name].reshape(-1, *full[name].shape[1:])), name

    # a flipped byte in row 3, the second block of model/a's first chunk: rows 0-2 still read, row 3 does not
    chunk = stored.tensors["model/a"]["chunks"][0]
    shard = ckpt / "shards" / chunk["file"]
    data = bytearray(shard.read_bytes())
    data[chunk["end"] - 1] ^= 1
    shard.write_bytes(data)
    fresh = checkpoint.StoredTensors(ckpt)
    assert torch.equal(fresh.read("model/a", (0, 0), (3, 5)), full["model/a"][:3])
    with pytest.raises(CheckpointError, match=r"sha256 .*block 1 of the chunk of model/a at \[0, 0\]"):
        fresh.read("model/a", (3, 0), (1, 5))

    gap = split(4)
    gap["model/b"] = gap["model/b"][:1]
    with pytest.raises(CheckpointError, match="hold 4 of the 7 values of model/b"):
        checkpoint.save_sharded(tmp_path / "gap", gap, cfg)
    assert not (tmp_path / "gap").exists()


def test_flat_range_boxes_tile_the_range():
    """A ZeRO fragment (a flat range of a parameter) as boxes: each contiguous, together exactly the range."""
    g = torch.Generator().manual_seed(0)
    for shape in [(), (7,), (3, 4), (2, 3, 4), (2, 1, 3, 2)]:
        n = math.prod(shape)
        values = torch.arange(n).view(shape)
        for _ in range(30):
            begin, end = sorted(torch.randint(0, n + 1, (2,), generator=g).tolist())
            seen = []
            for at, offsets, sizes in checkpoint.flat_range_boxes(shape, begin, end):
                box = values[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1).tolist()
                assert box == list(range(at, at + len(box)))
                seen += box
            assert seen == list(range(begin, end)), (shape, begin, end)


def write_legacy_checkpoint(trainer: Trainer, ckpt: Path) -> None:
    """The consolidated layout of dsmtp before sharded checkpoints, as its save_checkpoint wrote it."""
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config_to_dict(trainer.cfg), sort_keys=False))
    shutil.copyfile(trainer.data.tokenizer_path, ckpt / "tokenizer.model")
    torch.save(trainer.optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save(trainer.trainer_state(), ckpt / "trainer_state.pt")
    files = {p.name: checkpoint.sha256_file(p) for p in sorted(ckpt.iterdir())}
    (ckpt / "manifest.json").write_text(json.dumps({
        "files": files, "step": trainer.step, "tokens": trainer.tokens,
        "tokenizer_sha256": files["tokenizer.model"], "config_sha256": files["config.yaml"]}))
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")


def test_consolidated_checkpoint_is_refused_then_upgraded(tmp_path, data_dir, trained):
    legacy_run = tmp_path / "legacy"
    write_legacy_checkpoint(trained, legacy_run / "checkpoints/step_00000004")
    make = lambda: Trainer(tiny_config(legacy_run, data_dir, steps=4, save_interval=2, eval_interval=100))  # noqa: E731
    for refused in (make, lambda: load_model(legacy_run)):
        with pytest.raises(CheckpointError, match=r"consolidated checkpoint .*python tools/upgrade_checkpoint\.py"):
            refused()

    upgrade = subprocess.run([sys.executable, "tools/upgrade_checkpoint.py", str(legacy_run)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert upgrade.returncode == 0, upgrade.stderr
    assert (legacy_run / "checkpoints/step_00000004.consolidated/model.safetensors").is_file()  # kept
    resumed = make()
    assert resumed.step == 4 and resumed.tokens == trained.tokens
    for (name, p), q in zip(trained.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(trained.optimizer.state[p][key], resumed.optimizer.state[q][key]), (name, key)
    # its export is the export of the sharded checkpoint the same run wrote, byte for byte
    a = export(legacy_run, tmp_path / "hf_upgraded", dtype="fp32")
    b = export(tmp_path / "run", tmp_path / "hf_sharded", dtype="fp32")
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.glob("*.safetensors"):
        assert f.read_bytes() == (b / f.name).read_bytes()


def test_entry_points_refuse_a_flipped_byte_with_a_clear_error(tmp_path, trained, capsys):
    """generate, serve, export-hf and `dsmtp train` (resume) exit with an error naming the damaged file."""
    from dsmtp.cli import main as cli

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(trained.cfg), sort_keys=False))
    damage_checkpoint(tmp_path / "run/checkpoints/step_00000004", "flip")
    shard = tmp_path / "run/checkpoints/step_00000004/shards/rank00000.safetensors"
    for argv, code in [(["generate", "--ckpt", str(tmp_path / "run"), "--prompt", "def", "--max-new-tokens", "2"], 2),
                       (["serve", "--ckpt", str(tmp_path / "run"), "--set", "serve.port=18765"], 2),
                       (["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")], 2),
                       (["train", "--config", str(cfg_path)], 1)]:
        assert cli(argv) == code, argv[0]
        err = capsys.readouterr().err
        assert f"{shard} does not match the sha256" in err and "Traceback" not in err, (argv[0], err)
    assert not (tmp_path / "hf").exists()


def test_damaged_safetensors_header_gives_a_clear_error(tmp_path, trained, capsys):
    """An HF directory whose shard header is damaged: import-hf and generate say which file, no traceback."""
    from dsmtp.cli import main as cli

    hf = export(tmp_path / "run", tmp_path / "hf", dtype="fp32")
    shard = sorted(hf.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"{not json!!!"
    shard.write_bytes(data)
    for argv in (["import-hf", str(hf), str(tmp_path / "back")],
                 ["generate", "--ckpt", str(hf), "--prompt", "def", "--max-new-tokens", "2"]):
        assert cli(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert f"{shard} is not a readable safetensors file" in err and "Traceback" not in err, err
