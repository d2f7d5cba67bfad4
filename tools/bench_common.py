"""What the one-lever CUDA benchmarks (bench_moe_kernels, bench_cross_entropy) share: their timing, their
difference measure and the difference cells of their tables."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable

import torch

from dsmtp.train.metrics import MetricsLog


def parse_arguments(doc: str, argv: list[str]) -> argparse.Namespace:
    """--config, --iters, --results FILE (rows appended as measured), --table FILE (print and exit)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--table", type=Path, help="print the table of a results file and exit")
    return parser.parse_args(argv)


def print_results_table(path: Path, title: str, columns: list[str], table_line: Callable[[dict], str]) -> None:
    """A results file's table: its first row's device and config, then `title`, the header, a line per row."""
    rows = list(MetricsLog(path).records())
    print(f"{rows[0]['device']}, {rows[0]['config']}{title}\n{header(columns, list(rows[0]['relative_difference']))}")
    for row in rows:
        print(table_line(row))


def median_ms(run: Callable[[], object], iters: int) -> float:
    """Median time of `run` on the GPU's timeline over `iters` calls, each waited for."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_differences(outputs: list[torch.Tensor], reference: list[torch.Tensor], names: list[str]) -> dict:
    """Per name: the output's largest difference from the reference, relative to the reference's largest entry."""
    return {name: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            for name, a, b in zip(names, outputs, reference)}


def header(columns: list[str], names: list[str]) -> str:
    """A table's header: the path, `columns`, then one difference column per name."""
    cells = ["path", *columns, f"{' | '.join(names)} (max diff / max)"]
    return f"| {' | '.join(cells)} |\n|" + "---|" * (1 + len(columns) + len(names))


def difference_cells(row: dict) -> str:
    return " | ".join(f"{v:.1e}" for v in row["relative_difference"].values())


def report(row: dict, table_line: Callable[[dict], str], results: Path | None) -> None:
    """Print a measured row's table line and append the row to the results file, if any."""
    print(table_line(row))
    if results:
        MetricsLog(results).append(row)
