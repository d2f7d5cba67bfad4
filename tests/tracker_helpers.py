"""Read what the trackers wrote with their own readers, and what metrics.jsonl says they should hold."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np


def jsonl_scalars(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every number of every metrics.jsonl record as tag -> [(step, value)], by the naming the trackers
    promise: `{kind}/{field}`, a per-depth list as `{kind}/{field}_depth{k}`; null (NaN/inf) as NaN."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key in ("kind", "step"):
                continue
            named = [(f"_depth{k}", v) for k, v in enumerate(value, 1)] if isinstance(value, list) else [("", value)]
            for suffix, v in named:
                tags.setdefault(f"{record['kind']}/{key}{suffix}", []).append(
                    (record["step"], math.nan if v is None else v))
    return tags


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under log_dir, read by TensorBoard's own event reader (which drops
    the events a restarted writer's purge_step orphans, as the TensorBoard UI does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def same_float(got: float, want: float) -> bool:
    return (math.isnan(got) and math.isnan(want)) or got == want


def assert_tensorboard_matches_jsonl(out_dir: Path) -> None:
    """Every scalar of metrics.jsonl, and nothing else, at the same steps with the same values (TensorBoard
    stores scalars as float32: compared with the jsonl value rounded to float32)."""
    want, got = jsonl_scalars(out_dir), tensorboard_scalars(out_dir / "tensorboard")
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        for (step, value), (_, logged) in zip(points, got[tag]):
            assert same_float(logged, float(np.float32(value))), (tag, step, logged, value)


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline W&B run's .wandb transaction log, as W&B's own reader prints them
    (`wandb leet inspect --json`, one JSON object per record)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
