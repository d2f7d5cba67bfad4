"""`dsmtp serve`: an OpenAI-compatible completion server: POST /v1/completions (SSE streaming with
"stream": true) and GET /health, bound to 127.0.0.1 unless serve.host says otherwise.

    dsmtp serve --ckpt runs/tiny --speculative 2 --set serve.port=8000

HTTP threads only parse, validate and stream. One engine worker thread runs the model: between
decoding steps it lets waiting requests join the running batch (up to serve.max_batch_size
sequences), so sequences never mix (each batch row has its own cache and random stream). A
streaming client that goes away is noticed at its next token and its row leaves the batch.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch

from dsmtp.config import ServeConfig
from dsmtp.serve.engine import Batch, DecodeStats, Engine, Request, Result
from dsmtp.data.tokenizer import Tokenizer
from dsmtp.serve.loading import completion_text, encode_prompt, load
from dsmtp.serve.sampling import SamplingParams

FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "seed")
MAX_STOP_STRINGS = 4


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Completion:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    model: str


def _field(body: dict, name: str, kinds: tuple, default: Any, what: str) -> Any:
    if name not in body:
        return default
    value = body[name]
    # bool is an int in Python; a JSON true is not a number here.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise RequestError(400, f"'{name}' must be {what}, got {json.dumps(value)}", name)
    if float in kinds and not -1e308 <= value <= 1e308:  # NaN, infinities, integers beyond float range
        raise RequestError(400, f"'{name}' must be {what}, got {str(value)[:40]}", name)
    return value


def parse_completion(raw: bytes, tokenizer: Tokenizer, engine: Engine, limits: ServeConfig,
                     model_name: str) -> Completion:
    """Validate a /v1/completions body; raise RequestError naming the offending field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; supported: {list(FIELDS)}", unknown[0])
    if "prompt" not in body:
        raise RequestError(400, "'prompt' is required", "prompt")
    prompt = _field(body, "prompt", (str,), "", "a string")
    max_tokens = _field(body, "max_tokens", (int,), 16, "an integer")
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise RequestError(400, f"'max_tokens' must be in [1, {limits.max_new_tokens}], got {max_tokens}", "max_tokens")
    temperature = _field(body, "temperature", (int, float), 1.0, "a number >= 0")
    top_p = _field(body, "top_p", (int, float), 1.0, "a number in (0, 1]")
    top_k = _field(body, "top_k", (int,), 0, "an integer >= 0")
    if top_k >= 2 ** 31:
        raise RequestError(400, f"'top_k' must be below 2^31, got {top_k}", "top_k")
    seed = _field(body, "seed", (int, type(None)), None, "an integer in [0, 2^63)")
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise RequestError(400, f"'seed' must be in [0, 2^63), got {seed}", "seed")
    stream = _field(body, "stream", (bool,), False, "true or false")
    stop = _field(body, "stop", (str, list, type(None)), None, "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, f"'stop' must be up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    try:
        sampling = SamplingParams(float(temperature), top_k, float(top_p), seed)
    except ValueError as e:  # SamplingParams' messages start with "<field>="
        param = str(e).split("=")[0]
        raise RequestError(400, f"'{param}' is out of range: {e}", param) from None
    try:
        ids = encode_prompt(tokenizer, prompt)
    except ValueError as e:  # text the tokenizer cannot encode
        raise RequestError(400, str(e), "prompt") from None
    if len(ids) >= engine.context:
        raise RequestError(400, f"'prompt' is {len(ids)} tokens, the model's context is {engine.context}", "prompt")
    if len(ids) + max_tokens > engine.context:
        raise RequestError(400, f"prompt ({len(ids)} tokens) + 'max_tokens' ({max_tokens}) exceeds the model's "
                                f"context of {engine.context} tokens", "max_tokens")
    try:  # anything else the engine would refuse (e.g. token ids the model does not have)
        engine.check(Request(ids, max_tokens, sampling))
    except ValueError as e:
        raise RequestError(400, str(e), "prompt") from None
    model = _field(body, "model", (str,), model_name, "a string")
    return Completion(ids, max_tokens, sampling, stop, stream, model)


class Job:
    """One completion on its way through the engine: tokens in, text deltas and the end out."""

    def __init__(self, completion: Completion, tokenizer: Tokenizer):
        self.completion, self.tokenizer = completion, tokenizer
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.tokens: list[int] = []
        self.events: queue.Queue = queue.Queue()  # ("text", str) ... then ("done", Result) or ("error", str)
        self.cancelled = threading.Event()  # the client went away
        self.hit_stop_string = False
        self._sent = 0  # characters of text already streamed

    def text(self, final: bool) -> str:
        """The completion text so far, cut at the first stop string. Before the end, hold back what may
        still turn into a stop string or is an incomplete UTF-8 sequence."""
        text = completion_text(self.tokenizer, self.completion.prompt_ids, self.tokens)
        cuts = [i for i in (text.find(s) for s in self.completion.stop) if i >= 0]
        if cuts:
            self.hit_stop_string = True
            return text[:min(cuts)]
        if not final:
            text = text.rstrip("\ufffd")
            hold = max((len(s) for s in self.completion.stop), default=1) - 1
            text = text[:len(text) - hold] if hold else text
        return text

    def on_tokens(self, tokens: list[int]) -> bool:
        """Called by the engine worker; False ends this sequence."""
        if self.cancelled.is_set():
            return False
        self.tokens.extend(tokens)
        if self.completion.stream or self.completion.stop:
            text = self.text(final=False)
            if self.completion.stream and len(text) > self._sent:
                self.events.put(("text", text[self._sent:]))
                self._sent = len(text)
        return not self.hit_stop_string

    def rest_of_text(self) -> str:
        text = self.text(final=True)
        rest, self._sent = text[self._sent:], len(text)
        return rest

    def request(self) -> Request:
        c = self.completion
        return Request(c.prompt_ids, c.max_tokens, c.sampling, (self.tokenizer.eos_id,), self.on_tokens)

    def finish_reason(self, result: Result) -> str:
        return "stop" if result.finish_reason == "stop" or self.hit_stop_string else "length"


@dataclass
class Counters:
    completed: int = 0
    aborted: int = 0
    active: int = 0  # sequences in the batch being decoded
    lock: threading.Lock = field(default_factory=threading.Lock)


class EngineWorker(threading.Thread):
    """The one thread that runs the model, with continuous batching: between decoding steps, waiting
    requests are prefilled and join the running batch (up to max_batch_size sequences), and finished
    sequences leave it."""

    def __init__(self, engine: Engine, max_batch_size: int):
        super().__init__(daemon=True, name="engine-worker")
        self.engine, self.max_batch_size = engine, max_batch_size
        self.jobs: queue.Queue = queue.Queue()  # Job, or None to stop
        self.counters = Counters()
        self.stats = DecodeStats(engine.k)  # over everything served

    def stop(self) -> None:
        """Finish the requests at hand, then end the thread."""
        self.jobs.put(None)
        self.join()

    def run(self) -> None:
        batch: Optional[Batch] = None
        running: list[tuple[Job, Result]] = []
        stopping = False
        while not (stopping and not running):
            new = [] if stopping else self._take(block=not running, room=self.max_batch_size - len(running))
            stopping = stopping or None in new
            new = [job for job in new if job is not None and not job.cancelled.is_set()]
            at_risk = [job for job, _ in running] + new
            try:
                if new:
                    started, results = self.engine.start([job.request() for job in new])
                    running += zip(new, results)
                    if batch is None or not batch.size:
                        batch = started
                    else:
                        batch.merge(started)
                if batch is not None and batch.size:
                    self.engine.step(batch, self.stats)
            except Exception as e:  # keep serving; every client of the batch hears about it
                for job in at_risk:
                    job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                batch, running = None, []
            self.counters.active = batch.size if batch is not None else 0
            running = self._finish(running)

    def _take(self, block: bool, room: int) -> list[Optional[Job]]:
        """Up to `room` waiting jobs; waits for one when `block` (nothing is running)."""
        taken: list[Optional[Job]] = [self.jobs.get()] if block else []
        while len(taken) < room and None not in taken:
            try:
                taken.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return taken

    def _finish(self, running: list[tuple[Job, Result]]) -> list[tuple[Job, Result]]:
        """Tell the clients of finished sequences; return the others."""
        still = []
        for job, result in running:
            if not result.finish_reason:
                still.append((job, result))
                continue
            with self.counters.lock:
                self.counters.completed += 1
                self.counters.aborted += result.finish_reason == "aborted" and job.cancelled.is_set()
            job.events.put(("done", result))
        return still


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: many clients may connect at once

    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: ServeConfig, model_name: str,
                 host: str, port: int):
        self.engine, self.tokenizer, self.limits, self.model_name = engine, tokenizer, limits, model_name
        self.worker = EngineWorker(engine, limits.max_batch_size)
        self.worker.start()
        super().__init__((host, port), CompletionHandler)

    def server_close(self) -> None:
        super().server_close()
        self.worker.stop()


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # JSON has no NaN


class CompletionHandler(BaseHTTPRequestHandler):
    server: CompletionServer
    timeout = 60  # seconds a client may stall a read or a write before it counts as gone

    def log_message(self, format: str, *args: Any) -> None:  # one line per request on stderr, no reverse DNS
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: Optional[str] = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def do_GET(self) -> None:
        if self.path == "/health":
            worker = self.server.worker
            c, stats = worker.counters, worker.stats
            speculative = {"draft_tokens": stats.draft_tokens, "tokens_per_forward": _finite(stats.tokens_per_forward),
                           "acceptance": [_finite(a) for a in stats.acceptance]}
            self._json(200, {"status": "ok", "model": self.server.model_name, "queued": worker.jobs.qsize(),
                             "active": c.active, "completed": c.completed, "aborted": c.aborted,
                             "speculative": speculative})
        elif self.path == "/v1/completions":
            self._error(405, "use POST for /v1/completions")
        else:
            self._error(404, f"no route {self.path}: use POST /v1/completions or GET /health")

    def do_POST(self) -> None:
        if self.path != "/v1/completions":
            return self._error(404, f"no route {self.path}: use POST /v1/completions or GET /health")
        try:
            completion = parse_completion(self._body(), self.server.tokenizer, self.server.engine, self.server.limits,
                                          self.server.model_name)
        except RequestError as e:
            return self._error(e.status, e.message, e.param)
        except OSError:  # the client stalled or left while sending
            return
        job = Job(completion, self.server.tokenizer)
        self.server.worker.jobs.put(job)
        try:
            self._stream(job) if completion.stream else self._respond(job)
        except OSError:  # broken pipe, reset or stalled client
            job.cancelled.set()  # the worker drops its row at the next token

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        if not length.isdigit():
            raise RequestError(400, f"bad Content-Length {length!r}")
        limit = self.server.limits.max_body_bytes
        if int(length) > limit:
            if int(length) <= 4 * limit:  # read it away so the client can read our answer
                self.rfile.read(int(length))
            raise RequestError(413, f"request body is {length} bytes; the limit is {limit} (serve.max_body_bytes)")
        return self.rfile.read(int(length))

    def _payload(self, job: Job, text: str, finish_reason: Optional[str]) -> dict:
        return {"id": job.id, "object": "text_completion", "created": int(time.time()),
                "model": job.completion.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}

    def _usage(self, job: Job) -> dict:
        prompt = len(job.completion.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": len(job.tokens), "total_tokens": prompt + len(job.tokens)}

    def _respond(self, job: Job) -> None:
        while True:
            kind, value = job.events.get()
            if kind == "error":
                return self._error(500, value)
            if kind == "done":
                payload = self._payload(job, job.rest_of_text(), job.finish_reason(value))
                return self._json(200, payload | {"usage": self._usage(job)})

    def _stream(self, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        while True:
            kind, value = job.events.get()
            if kind == "text":
                self._event(self._payload(job, value, None))
            elif kind == "error":
                self._event({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                break
            else:
                final = self._payload(job, job.rest_of_text(), job.finish_reason(value))
                self._event(final | {"usage": self._usage(job)})
                break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsmtp serve", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint step dir, run out_dir, or HF export dir")
    parser.add_argument("--speculative", type=int, default=0, metavar="K", help="draft K tokens with the MTP modules")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. serve.port=8001 or serve.max_batch_size=16")
    args = parser.parse_args(argv)
    try:
        model, cfg, tokenizer = load(args.ckpt, args.device, overrides=args.set)
        engine = Engine(model, args.speculative)
    except (ValueError, OSError) as e:
        print(f"dsmtp serve: error: {e}", file=sys.stderr)
        return 2
    server = CompletionServer(engine, tokenizer, cfg.serve, str(args.ckpt), cfg.serve.host, cfg.serve.port)
    print(f"serving {args.ckpt} on http://{cfg.serve.host}:{server.server_address[1]} "
          f"(speculative K={args.speculative})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
