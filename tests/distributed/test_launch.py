"""`dsmtp train` under the real launchers, on a tiny corpus prepared by `dsmtp prepare`:
launch/torchrun.sh, launch/slurm/train.sbatch with stand-in srun/scontrol (two "nodes" x two
processes), preemption requeue + resume, and a worker killed mid-run. Each run must end with the
parameters of the same training done by one process (the single-process Trainer)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from dsmtp import checkpoint
from dsmtp.config import config_to_dict
from dsmtp.train.trainer import Trainer
from tests._hf_helpers import read_checkpoint
from tests.distributed.launch import ROOT, kill_tree, relative_error, worker_env
from tests.tracker_helpers import assert_tensorboard_matches_jsonl
from tests.train_helpers import prepare_tiny_corpus, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
STEPS = 24
TRAIN = dict(steps=STEPS, micro_batch_size=4, save_interval=4, keep_last=10, eval_interval=12, log_interval=1)
FAKE_SLURM = Path(__file__).with_name("fake_slurm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare_tiny_corpus(tmp_path_factory.mktemp("corpus") / "data")


def write_config(path: Path, out_dir: Path, data_dir: Path) -> Path:
    cfg = tiny_config(out_dir, data_dir, **TRAIN)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def single_process(corpus, tmp_path_factory) -> Path:
    """The reference: the plain Trainer in this process. Returns its out_dir."""
    out = tmp_path_factory.mktemp("single")
    Trainer(tiny_config(out, corpus, **TRAIN)).run()
    return out


def final_model(out_dir: Path, step: int = STEPS) -> dict:
    ckpt = checkpoint.latest_checkpoint(out_dir)
    assert ckpt is not None and ckpt.name == checkpoint.step_dir_name(step)
    return read_checkpoint(ckpt)


def assert_same_model(out_dir: Path, reference_dir: Path, tol: float = 1e-5) -> None:
    got, want = final_model(out_dir), final_model(reference_dir)
    assert set(got) == set(want)
    errors = {k: relative_error(got[k], v) for k, v in want.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < tol, f"{worst}: relative error {errors[worst]:.2e}"


def train_losses(out_dir: Path) -> list[float]:
    import json
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_torchrun_script_trains_like_one_process(corpus, single_process, tmp_path):
    """launch/torchrun.sh, 2 CPU processes with expert parallelism (EP=2 x DP=2), TensorBoard on: the
    logging rank alone writes it, the records of metrics.jsonl."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out, corpus)
    proc = subprocess.run(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--config", str(cfg),
                           "--set", "parallel.ep=2", "--set", "train.trackers=[jsonl,tensorboard]"],
                          cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert train_losses(out) == pytest.approx(train_losses(single_process), rel=1e-5)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_tensorboard_matches_jsonl(out)
    assert_same_model(out, single_process)
    # The saved optimizer state is the single-process one (same parameters, same moments, same step).
    got = checkpoint.StoredTensors(checkpoint.latest_checkpoint(out))
    want = checkpoint.StoredTensors(checkpoint.latest_checkpoint(single_process))
    optim = sorted(n for n in want.tensors if n.startswith("optim/"))
    assert sorted(n for n in got.tensors if n.startswith("optim/")) == optim
    for name in (n for n in want.tensors if n.endswith("/exp_avg")):
        assert relative_error(got.read(name), want.read(name)) < 1e-4, name
    assert int(got.read("optim/step")) == int(want.read("optim/step")) == STEPS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_checkpoint(out_dir: Path, proc: subprocess.Popen, at_least: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ckpt = checkpoint.latest_checkpoint(out_dir) if (out_dir / "checkpoints" / "latest").exists() else None
        if ckpt is not None and int(ckpt.name[5:]) >= at_least:
            return
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def test_slurm_batch_script_requeues_and_resumes(corpus, single_process, tmp_path):
    """train.sbatch on two stand-in nodes x two processes (TP=2 x PP=2). A USR1 (Slurm's warning
    before preemption or the time limit) makes the script requeue the job; Slurm then kills it; the
    requeued job resumes from the latest checkpoint and finishes the same training as one process."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "unused", corpus)
    env = dict(worker_env(), PATH=f"{FAKE_SLURM}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="localhost,localhost", SLURM_SUBMIT_DIR=str(ROOT),
               DSMTP_NPROC_PER_NODE="2", DSMTP_OUT_DIR=str(out), FAKE_SLURM_LOG=str(tmp_path / "slurm.log"),
               DSMTP_RDZV_PORT=str(_free_port()))
    cmd = ["bash", "launch/slurm/train.sbatch", "--config", str(cfg), "--set", "parallel.tp=2",
           "--set", "parallel.pp=2"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(out, job, at_least=4)
        os.kill(job.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not (tmp_path / "slurm.log").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "slurm.log").read_text().strip() == "requeue 4242"
    finally:
        kill_tree(job.pid)  # what Slurm does to a requeued job: every process of it
        job.communicate(timeout=60)
    interrupted_at = int(checkpoint.latest_checkpoint(out).name[5:])

    restarted = subprocess.run(cmd, cwd=ROOT, env=dict(env, SLURM_RESTART_COUNT="1"), capture_output=True,
                               text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-5000:]
    assert f"resuming from {out / 'checkpoints' / checkpoint.step_dir_name(interrupted_at)}" in restarted.stdout
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert_same_model(out, single_process)


def _worker_pids(agent_pid: int) -> list[int]:
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return [int(c) for c in children]


def test_killed_worker_restarts_group_and_resumes(corpus, single_process, tmp_path):
    """launch/torchrun.sh --max-restarts 1 with DP=2 (ZeRO-2): SIGKILL one worker after a checkpoint;
    torchrun restarts the group, which resumes from the latest checkpoint and finishes."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", out, corpus)
    run = subprocess.Popen(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--max-restarts", "1",
                            "--config", str(cfg), "--set", "parallel.zero_stage=2"], cwd=ROOT, env=worker_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(out, run, at_least=4)
        workers = _worker_pids(run.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            kill_tree(run.pid)  # the agent and its workers
            run.communicate()
    assert run.returncode == 0, stderr[-5000:]
    assert stdout.count("resuming from") == 1  # rank 0 reports the restart's resume
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert_same_model(out, single_process)
