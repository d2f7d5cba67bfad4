"""Per-step time of each parallel layout vs one process, on this machine's CPU (gloo), for the record.

    PYTHONPATH=. python tests/distributed/overhead.py [--steps 8]

Runs the distributed equivalence worker (tests/distributed/worker.py: the tiny MoE + MTP model, 2
micro-batches of 4 samples a step) for each layout and prints the median step time after the first
two steps, next to the single-process loop on the same batches. On CPU the extra processes share the
same cores, so this measures communication and scheduling overhead, not a speed-up. It lives beside the
harness it drives (a benchmark, not a test: pytest does not collect it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.distributed import common  # noqa: E402
from tests.distributed.launch import run_layout  # noqa: E402

LAYOUTS = [("TP=2", 2, {"tp": 2}), ("EP=2 (DP=2)", 2, {"ep": 2}), ("PP=2", 2, {"pp": 2}),
           ("DP=2 ZeRO-1", 2, {"zero": 1}), ("DP=2 ZeRO-2", 2, {"zero": 2}),
           ("PP=2 x EP=2", 4, {"pp": 2, "ep": 2}), ("TP=2 x PP=2", 4, {"tp": 2, "pp": 2})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    ref = common.reference_run(common.tiny_config(), steps=args.steps)
    base = statistics.median(ref["step_seconds"][2:])
    rows = [("1 process", 1, base)]
    for name, nproc, layout in LAYOUTS:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_layout(Path(tmp), nproc, layout, extra=[f"--steps={args.steps}"], timeout=600)
        rows.append((name, nproc, statistics.median(result["step_seconds"][2:])))
    print(f"{'layout':<14} {'procs':>5} {'step ms':>9} {'vs 1 process':>13}")
    for name, nproc, seconds in rows:
        print(f"{name:<14} {nproc:>5} {seconds * 1e3:>9.1f} {seconds / base:>12.2f}x")


if __name__ == "__main__":
    main()
