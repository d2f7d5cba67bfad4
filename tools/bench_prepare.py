"""`dsmtp prepare` throughput on a JSONL corpus the benchmark writes itself, as one table row.

    python tools/bench_prepare.py [--gb 1.0] [--workers 2] [--vocab 4096] [--tokenizer PATH] [--results FILE]
    python tools/bench_prepare.py --table FILE [FILE ...]      # the rows --results files hold

Writes --gb gigabytes of JSON Lines (one {"text": ...} object per line) into a temporary directory: the
documents are this Python's standard-library modules, each copy opened by a line naming its copy number
(so every document is distinct and the split sees them all). Then runs `dsmtp prepare` on it as a child
process (a jsonl source, its own data dir in the same temporary directory), sampling the RSS of the
prepare process and its workers every 0.2 s, and deletes the directory.

Columns: input GB, seconds (total, and the phases the manifest records: reading the corpus for the
tokenizer sample and training the tokenizer, tokenizing), GB/s and tokens/s over the whole run and over
the tokenize phase, the CPU seconds (user + system) of prepare and its workers and the GB and tokens per
CPU second, peak RSS of all the processes together and of the largest one (file pages mapped by
np.memmap count), and the machine's load average while it ran (the CPU is shared: a load above the core
count means the run got less, which the per-CPU-second columns do not depend on).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsmtp.machine import describe  # noqa: E402


def write_corpus(path: Path, target_bytes: int) -> tuple[int, int]:
    """(bytes, documents) of a JSONL file of standard-library modules, copied until `target_bytes`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))]
    written = documents = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            for text in modules:
                line = json.dumps({"text": f"# copy {documents}\n{text}", "id": documents}) + "\n"
                f.write(line)
                written += len(line.encode())
                documents += 1
                if written >= target_bytes:
                    break
    return written, documents


def peak_rss(pid: int, stop: threading.Event, out: dict) -> None:
    """Sample the summed RSS of `pid` and its descendants until `stop`."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        try:
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        out["peak"] = max(out.get("peak", 0), total)
        stop.wait(0.2)


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="dsmtp-bench-prepare-", dir=args.tmp))
    try:
        corpus = tmp / "corpus.jsonl"
        t = time.perf_counter()
        size, documents = write_corpus(corpus, int(args.gb * 1e9))
        print(f"wrote {size / 1e9:.2f} GB, {documents:,} documents in {time.perf_counter() - t:.0f} s", flush=True)
        command = [sys.executable, "-m", "dsmtp.cli", "prepare", "--config", str(REPO / "configs/tiny.yaml"),
                   "--set", f"data.data_dir={tmp / 'data'}", "--set", f"data.num_workers={args.workers}",
                   "--set", f"data.sources=[{{kind: jsonl, path: '{corpus}', name: bench}}]",
                   "--set", f"model.vocab_size={args.vocab}", "--set", f"data.tokenizer={args.tokenizer}"]
        load_before = os.getloadavg()[0]
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        stop, rss = threading.Event(), {}
        sampler = threading.Thread(target=peak_rss, args=(proc.pid, stop, rss))
        sampler.start()
        code = proc.wait()
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers too: prepare waits for them
        cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
        if code:
            raise SystemExit(f"dsmtp prepare failed with status {code}")
        manifest = json.loads((tmp / "data" / "manifest.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))
    phases = manifest["seconds"]
    return {
        "machine": describe(), "date": time.strftime("%Y-%m-%d"), "workers": args.workers, "vocab": args.vocab,
        "tokenizer": args.tokenizer, "input_bytes": size, "documents": documents, "tokens": tokens,
        "seconds": round(seconds, 1), "seconds_tokenizer": phases["tokenizer"], "seconds_tokenize": phases["tokenize"],
        "cpu_seconds": round(cpu, 1),
        "peak_rss_bytes": rss.get("peak", 0),
        "largest_process_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def table(rows: list[dict]) -> str:
    lines = ["| machine | date | workers | tokenizer | input GB | documents | tokens | s total | s tokenizer | "
             "s tokenize | GB/s total | GB/s tokenize | tokens/s total | tokens/s tokenize | CPU s | GB per CPU s | "
             "tokens per CPU s | peak RSS GiB (all) | largest process GiB | load avg (start, end) |", "|" + "---|" * 20]
    for r in rows:
        tokenizer = f"trained, vocab {r['vocab']}" if r["tokenizer"] == "train" else Path(r["tokenizer"]).name
        cpu = r.get("cpu_seconds")  # rows from before the column have none
        per_cpu = (f"{cpu:.0f} | {r['input_bytes'] / 1e9 / cpu:.4f} | {r['tokens'] / cpu:,.0f}" if cpu
                   else "not recorded | - | -")
        lines.append(
            f"| {r['machine']} | {r['date']} | {r['workers']} | {tokenizer} | {r['input_bytes'] / 1e9:.2f} | "
            f"{r['documents']:,} | {r['tokens']:,} | {r['seconds']:.0f} | {r['seconds_tokenizer']:.0f} | "
            f"{r['seconds_tokenize']:.0f} | {r['input_bytes'] / 1e9 / r['seconds']:.4f} | "
            f"{r['input_bytes'] / 1e9 / r['seconds_tokenize']:.4f} | {r['tokens'] / r['seconds']:,.0f} | "
            f"{r['tokens'] / r['seconds_tokenize']:,.0f} | {per_cpu} | {r['peak_rss_bytes'] / 2**30:.2f} | "
            f"{r['largest_process_rss_bytes'] / 2**30:.2f} | {r['load_average'][0]}, {r['load_average'][1]} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--table"]:
        rows = [json.loads(line) for path in argv[1:] for line in Path(path).read_text().splitlines() if line.strip()]
        print(table(rows))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the JSONL corpus to write (GB, 10^9 bytes)")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--vocab", type=int, default=4096, help="model.vocab_size of the trained tokenizer")
    parser.add_argument("--tokenizer", default="train", help="data.tokenizer: train, or a tokenizer file to bring")
    parser.add_argument("--tmp", default=None, help="where to make the temporary directory (default: the system's)")
    parser.add_argument("--results", help="append the row as one JSON line to this file")
    args = parser.parse_args(argv)
    row = run(args)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(table([row]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
