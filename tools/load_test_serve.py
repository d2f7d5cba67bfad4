"""Load test of `dsmtp serve` on 127.0.0.1: concurrent clients for a fixed time, streaming and not, with
malformed requests mixed in. Prints a table naming the machine; exits 1 when any check fails.

    python tools/load_test_serve.py --ckpt runs/tiny [--clients 16] [--duration 30] [--speculative 2]

It starts `dsmtp serve --host 127.0.0.1 --port 0` on the checkpoint, sends every valid request alone
first (the reference answers), then runs the clients: each sends requests back to back, every third
one malformed (each client's first, so that every kind is tried). Checks: no 5xx; every valid request
answered (200 and a complete answer: all choices, [DONE] at the end of a stream); every deterministic
one (temperature 0, or seeded) answered as it was alone (logprob values to 1e-4: batched float sums
round differently); every malformed one refused with a JSON error of the expected status; no
traceback in the server's log.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from dsmtp.machine import describe as machine  # noqa: E402

HOST = "127.0.0.1"
TIMEOUT = 300  # seconds one request may take under load before it counts as unanswered
LOGPROB_TOLERANCE = 1e-4
MESSAGES = [{"role": "system", "content": "Finish the sentence."}, {"role": "user", "content": "the quick"}]


@dataclass(frozen=True)
class Kind:
    name: str
    method: str
    path: str
    body: Any  # a JSON-able object, or the raw bytes to send
    status: int = 200
    deterministic: bool = True  # valid requests: the answer must equal the one sent alone
    headers: Optional[dict] = None

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))


def kinds(model: str) -> tuple[list[Kind], list[Kind]]:
    """(valid, malformed) requests; valid ones name `model`."""
    c, chat = "/v1/completions", "/v1/chat/completions"

    def completion(**fields: Any) -> dict:
        return {"model": model, "max_tokens": 16, "temperature": 0} | fields

    valid = [
        Kind("completion", "POST", c, completion(prompt="the quick", max_tokens=24)),
        Kind("completion, stream", "POST", c, completion(prompt="the quick", max_tokens=24, stream=True)),
        Kind("stop strings", "POST", c, completion(prompt="quick", max_tokens=25, stop=["over", "."])),
        Kind("2 prompts x n=2, seeded", "POST", c,
             completion(prompt=["the", "over the"], n=2, temperature=0.8, seed=7)),
        Kind("token ids, logprobs, stream", "POST", c,
             completion(prompt=[[2, 10, 11], [2, 12]], max_tokens=12, logprobs=3, stream=True,
                        stream_options={"include_usage": True})),
        Kind("scoring (echo, max_tokens 0)", "POST", c,
             completion(prompt=["the quick brown fox", "fox the over", "dog."], echo=True, logprobs=2, max_tokens=0)),
        Kind("echo + logprobs, n=2, stream", "POST", c,
             completion(prompt="lazy", n=2, echo=True, logprobs=1, temperature=1.0, seed=3, stream=True)),
        Kind("sampled, no seed", "POST", c, completion(prompt="jumps", temperature=1.0), deterministic=False),
        Kind("chat", "POST", chat, {"model": model, "messages": MESSAGES, "max_tokens": 20, "temperature": 0}),
        Kind("chat, stream, seeded", "POST", chat,
             {"model": model, "messages": MESSAGES, "max_tokens": 20, "temperature": 0.7, "seed": 1,
              "stream": True, "logprobs": True, "top_logprobs": 2}),
    ]
    malformed = [
        Kind("bad JSON", "POST", c, b'{"prompt": "a", "max_tokens": ', 400),
        Kind("unknown field", "POST", c, {"prompt": "a", "beam_width": 4}, 400),
        Kind("lone surrogate", "POST", c, b'{"prompt": "\\ud800x", "max_tokens": 2}', 400),
        Kind("lone surrogate, chat", "POST", chat,
             b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', 400),
        Kind("PUT", "PUT", c, {"prompt": "a"}, 405),
        Kind("DELETE", "DELETE", "/v1/models", None, 405),
        Kind("body too large", "POST", c, {"prompt": "x" * 2_000_000}, 413),
        Kind("wrong type", "POST", c, {"prompt": "a", "max_tokens": "ten"}, 400),
        Kind("n too large", "POST", c, {"prompt": "a", "n": 10_000}, 400),
        Kind("logprobs 21", "POST", c, {"prompt": "a", "logprobs": 21}, 400),
        Kind("prompt too long", "POST", c, {"prompt": [5] * 100_000}, 400),
        Kind("unknown route", "POST", "/v1/embeddings", {"input": "a"}, 404),
        Kind("unknown model", "POST", c, {"prompt": "a", "model": model + "-other"}, 404),
        Kind("no Content-Length", "POST", c, None, 411, headers={}),
    ]
    return valid, malformed


def send(port: int, kind: Kind) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        if kind.headers is not None:  # by hand: http.client would add a Content-Length
            conn.putrequest(kind.method, kind.path)
            conn.endheaders()
        else:
            body = kind.body if isinstance(kind.body, (bytes, type(None))) else json.dumps(kind.body).encode()
            conn.request(kind.method, kind.path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _merge_logprobs(into: Optional[dict], new: Optional[dict]) -> Optional[dict]:
    if new is None:
        return into
    if into is None:
        return {k: list(v) for k, v in new.items()}
    for k, v in new.items():
        into[k] += v
    return into


def canonical(kind: Kind, raw: bytes) -> dict:
    """A 200 answer as {choices: [{index, text, finish_reason, logprobs}], usage}, streamed or not;
    raises ValueError when it is incomplete."""
    if not kind.stream:
        payload = json.loads(raw)
        choices = [{"index": c["index"], "text": c["message"]["content"] if "message" in c else c["text"],
                    "finish_reason": c["finish_reason"], "logprobs": c["logprobs"]} for c in payload["choices"]]
        return {"choices": choices, "usage": payload["usage"]}
    events = [e[len(b"data: "):] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        raise ValueError("the stream did not end with [DONE]")
    choices: dict[int, dict] = {}
    usage = None
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            raise ValueError(f"error event: {chunk['error']}")
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            entry = choices.setdefault(c["index"], {"index": c["index"], "text": "", "finish_reason": None,
                                                    "logprobs": None})
            entry["text"] += c["delta"].get("content", "") if "delta" in c else c["text"]
            entry["finish_reason"] = c["finish_reason"] or entry["finish_reason"]
            entry["logprobs"] = _merge_logprobs(entry["logprobs"], c["logprobs"])
    if any(c["finish_reason"] is None for c in choices.values()):
        raise ValueError("a choice has no finish_reason")
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two answers differ: exactly, but floats (logprobs) to LOGPROB_TOLERANCE."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} entries != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= LOGPROB_TOLERANCE else [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


@dataclass
class Record:
    kind: Kind
    status: Optional[int]  # None: no answer (connection error or timeout)
    seconds: float
    problem: str = ""  # empty: as expected
    completion_tokens: int = 0


def check(kind: Kind, status: Optional[int], raw: bytes, reference: Optional[dict]) -> tuple[str, int]:
    """(problem or "", completion tokens) of one answer."""
    if status != kind.status:
        return f"status {status}, expected {kind.status}: {raw[:200]!r}", 0
    if kind.status != 200:
        error = json.loads(raw).get("error", {})
        return ("" if error.get("message") else f"no JSON error message: {raw[:200]!r}"), 0
    try:
        answer = canonical(kind, raw)
    except (ValueError, KeyError, TypeError) as e:
        return f"incomplete answer ({e}): {raw[:200]!r}", 0
    prompt = kind.body.get("prompt")
    n = kind.body.get("n", 1) * (len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else 1)
    if len(answer["choices"]) != n:
        return f"{len(answer['choices'])} choices, expected {n}", 0
    tokens = (answer["usage"] or {}).get("completion_tokens", 0)
    if reference is not None and kind.deterministic:
        diff = differences(answer, reference)
        if diff:
            return "differs from the answer alone: " + "; ".join(diff[:3]), tokens
    return "", tokens


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    reference_problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    clients: int = 0

    def failures(self) -> list[str]:
        bad = [f"{r.kind.name}: {r.problem}" for r in self.records if r.problem]
        return self.reference_problems + bad


def run_load(port: int, model: str, clients: int, duration: float) -> LoadResult:
    valid, malformed = kinds(model)
    result = LoadResult(clients=clients)
    references: dict[str, dict] = {}
    for kind in valid:  # alone, one at a time
        status, raw = send(port, kind)
        if status != 200:
            result.reference_problems.append(f"{kind.name} alone: status {status}: {raw[:200]!r}")
            continue
        try:
            references[kind.name] = canonical(kind, raw)
        except (ValueError, KeyError, TypeError) as e:
            result.reference_problems.append(f"{kind.name} alone: incomplete answer ({e})")
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def client(c: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            kind = malformed[(c + i // 3) % len(malformed)] if i % 3 == 0 else valid[(c + i) % len(valid)]
            i += 1
            start = time.perf_counter()
            try:
                status, raw = send(port, kind)
            except (OSError, http.client.HTTPException) as e:
                status, raw = None, repr(e).encode()
            problem, tokens = check(kind, status, raw, references.get(kind.name))
            with lock:
                result.records.append(Record(kind, status, time.perf_counter() - start, problem, tokens))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    return result


def start_server(ckpt: str, model: str, speculative: int, device: str, log: Path) -> tuple[subprocess.Popen, int]:
    """`dsmtp serve` on 127.0.0.1 and a free port: the process and the port, once it listens."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "dsmtp.cli", "serve", "--ckpt", ckpt, "--host", HOST, "--port", "0",
               "--served-model-name", model, "--speculative", str(speculative), "--device", device]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"dsmtp serve did not start: {line!r}; its log: {log.read_text()[-2000:]}")
    return proc, int(match.group(1))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def table(result: LoadResult, header: list[str]) -> str:
    columns = f"{'request':<32} {'sent':>5} {'as expected':>11} {'statuses':<16} {'p50 ms':>8} {'p95 ms':>8}"
    lines = [f"# {h}" for h in header] + [columns, "-" * len(columns)]
    by_kind: dict[str, list[Record]] = {}
    for r in result.records:
        by_kind.setdefault(r.kind.name, []).append(r)
    for name, records in by_kind.items():
        statuses: dict[str, int] = {}
        for r in records:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        ms = [1000 * r.seconds for r in records]
        lines.append(f"{name:<32} {len(records):>5} {sum(not r.problem for r in records):>11} "
                     f"{' '.join(f'{s}x{n}' for s, n in statuses.items()):<16} "
                     f"{percentile(ms, 0.5):>8.0f} {percentile(ms, 0.95):>8.0f}")
    records = result.records
    valid = [r for r in records if r.kind.status == 200]
    lines.append("-" * len(columns))
    lines.append(f"{len(records)} requests in {result.seconds:.1f} s from {result.clients} clients "
                 f"({len(records) / result.seconds:.1f}/s); {len(valid)} valid, "
                 f"{sum(r.completion_tokens for r in valid) / result.seconds:.1f} completion tokens/s; "
                 f"5xx: {sum(r.status is not None and r.status >= 500 for r in records)}; "
                 f"unanswered: {sum(r.status is None for r in records)}; "
                 f"not as expected: {sum(bool(r.problem) for r in records)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint step dir, run out_dir, or HF export dir")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--speculative", type=int, default=0, metavar="K")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = "load-test"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        proc, port = start_server(args.ckpt, model, args.speculative, args.device, log)
        try:
            result = run_load(port, model, args.clients, args.duration)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        tracebacks = log.read_text().count("Traceback")
    server = f"dsmtp serve --ckpt {args.ckpt} --speculative {args.speculative} --device {args.device} on {HOST}"
    header = [f"machine: {machine(torch.device(args.device))}",
              f"server: {server}; {args.clients} clients for {args.duration:.0f} s, every third request malformed",
              f"server log tracebacks: {tracebacks}"]
    print(table(result, header))
    failures = result.failures() + ([f"{tracebacks} traceback(s) in the server log"] if tracebacks else [])
    for failure in failures[:20]:
        print(f"FAIL {failure}")
    print("PASS" if not failures else f"FAIL: {len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
