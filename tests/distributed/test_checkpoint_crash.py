"""kill -9 during a sharded checkpoint save, at five moments (tests/distributed/crash_worker.py): the
previous checkpoint stays `latest`, verifies and loads with the same tensors as the uninterrupted
single-process run's. After the first moment a restarted run cleans up, resumes from it and ends where one
process ends (once, to keep the test bounded: tests/test_checkpoint.py cleans up after the others in one
process).

`dsmtp train` under torchrun, 2 processes with TP=2 on the native engine (every rank writes its own
shard), saving every 2 steps; a rank SIGKILLs itself during the save of step 4."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from dsmtp import checkpoint
from dsmtp.config import config_to_dict
from dsmtp.train.trainer import Trainer
from tests._hf_helpers import read_checkpoint
from tests.distributed.launch import ROOT, relative_error, worker_env
from tests.train_helpers import prepare_tiny_corpus, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
TRAIN = dict(steps=6, micro_batch_size=4, save_interval=2, keep_last=10, eval_interval=100, log_interval=1)
LAYOUT = ["--set", "parallel.tp=2", "--set", "parallel.engine=native"]
CRASH_STEP = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_tiny_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="module")
def single_process(corpus, tmp_path_factory):
    """The uninterrupted run, in this process: its checkpoints at every save."""
    out = tmp_path_factory.mktemp("single")
    Trainer(tiny_config(out, corpus, **TRAIN)).run()
    return out


def train(cfg_path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """launch/torchrun.sh, or with `crash_at` the crash worker (which runs `dsmtp train`) under torchrun."""
    cmd = ["bash", "launch/torchrun.sh", "--nproc-per-node", "2"]
    env = worker_env()
    if crash_at is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "tests/distributed/crash_worker.py"]
        env.update(DSMTP_TEST_CRASH_AT=crash_at, DSMTP_TEST_CRASH_STEP=str(CRASH_STEP))
    return subprocess.run([*cmd, "--config", str(cfg_path), *LAYOUT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_same_tensors(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert set(got) == set(want)
    errors = {k: relative_error(got[k], v) for k, v in want.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < tol, f"{worst}: relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("moment", ["shard", "index", "manifest", "rename", "pointer"])
def test_kill_during_save_keeps_previous_checkpoint(moment, corpus, single_process, tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(tiny_config(out, corpus, **TRAIN)), sort_keys=False))
    crashed = train(cfg_path, crash_at=moment)
    assert crashed.returncode != 0, "the rank was meant to be killed"
    root = out / "checkpoints"
    previous = checkpoint.step_dir_name(CRASH_STEP - 2)
    assert checkpoint.latest_checkpoint(out) == root / previous
    assert (root / checkpoint.step_dir_name(CRASH_STEP)).is_dir() == (moment in ("rename", "pointer"))
    assert any(p.name.startswith(checkpoint.TEMPORARY) for p in root.iterdir()) == (moment != "rename")
    # `latest` verifies and loads (every block's sha256 checked) the uninterrupted run's tensors
    assert_same_tensors(read_checkpoint(out), read_checkpoint(single_process / "checkpoints" / previous))

    if moment == "shard":  # a restart cleans up, resumes from `latest` and ends as one process (once: bounded)
        resumed = train(cfg_path)
        assert resumed.returncode == 0, resumed.stderr[-5000:]
        assert f"resuming from {root / previous}" in resumed.stdout
        assert not any(p.name.startswith(checkpoint.TEMPORARY) for p in root.iterdir())
        assert checkpoint.latest_checkpoint(out).name == checkpoint.step_dir_name(TRAIN["steps"])
        assert_same_tensors(read_checkpoint(out), read_checkpoint(single_process))
