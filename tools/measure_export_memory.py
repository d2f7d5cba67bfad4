#!/usr/bin/env python
"""Peak memory of `dsmtp export-hf` on a random-init checkpoint of a config; prints a table.

    python tools/measure_export_memory.py --config configs/small.yaml [--dtype bf16] [--max-shard-size 5GB]

The checkpoint (dsmtp.checkpoint, float32, one shard) is written to a temporary directory; the export
runs in a child process whose peak resident set size (ru_maxrss) is reported next to that of a child
that only imports the exporter, so the difference is what streaming the tensors costs.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_random_checkpoint(config: str, ckpt: Path) -> int:
    from dsmtp.checkpoint import MODEL, CheckpointWriter
    from dsmtp.config import load_config
    from dsmtp.convert.names import our_shapes

    cfg = load_config(config)
    shapes = our_shapes(cfg.model)
    writer = CheckpointWriter(ckpt, {MODEL + n: (torch.float32, s) for n, s in shapes.items()})
    for name, shape in shapes.items():  # one tensor at a time: the values do not matter here
        writer.write(MODEL + name, torch.randn(shape) * cfg.model.init_std)
    writer.finish(cfg)
    return sum(torch.Size(s).numel() for s in shapes.values())


def child_peak_rss(code: str) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of a child process running `code`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.time()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=3600)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("ru_maxrss of children did not grow; run the two measurements in separate processes")
    return peak / 2**20, time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "hf"
        params = write_random_checkpoint(args.config, ckpt)
        baseline, _ = child_peak_rss("import dsmtp.convert.export_hf")
        peak, seconds = child_peak_rss(
            "from dsmtp.convert.export_hf import main; "
            f"main([{str(ckpt)!r}, {str(out)!r}, '--dtype', {args.dtype!r}, '--max-shard-size', {args.max_shard_size!r}])")
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        source = sum(p.stat().st_size for p in (ckpt / "shards").iterdir())
    rows = [("config", args.config), ("parameters (ours)", f"{params / 1e9:.3f}B"),
            ("source checkpoint (fp32)", f"{source / 2**30:.2f} GiB"),
            (f"exported ({args.dtype})", f"{written / 2**30:.2f} GiB"), ("max shard size", args.max_shard_size),
            ("peak RSS, import only", f"{baseline:.2f} GiB"), ("peak RSS, export", f"{peak:.2f} GiB"),
            ("export time", f"{seconds:.0f} s")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
