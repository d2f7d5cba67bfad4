"""`dsmtp serve`: an OpenAI-compatible server: POST /v1/completions and /v1/chat/completions (SSE
streaming with "stream": true), GET /v1/models and /health, bound to 127.0.0.1 unless told otherwise.

    dsmtp serve --ckpt runs/tiny --speculative 2 --port 8000 --served-model-name tiny

HTTP threads (the standard library's ThreadingHTTPServer, one per connection) only parse, validate and
stream; dsmtp.serve.openai_api knows the request and response layouts. One engine worker thread runs
the model: between decoding steps it scores prompts (echo with logprobs) and lets waiting choices join
the running batch (up to serve.max_batch_size sequences), so sequences never mix (each batch row has its
own cache and random stream). A streaming client that goes away is noticed at its next token and its
rows leave the batch.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch

from dsmtp.config import ServeConfig
from dsmtp.data.tokenizer import Tokenizer
from dsmtp.serve.engine import Batch, DecodeStats, Engine, Request, Result
from dsmtp.serve.loading import load
from dsmtp.serve.logprobs import TokenLogprob
from dsmtp.serve.openai_api import (CompletionRequest, Piece, RequestError, TokenTable, answer, choice,
                                    parse_request, prompt_piece, usage)
from dsmtp.serve.static import add_engine_arguments, compile_for_decoding, make_engine

# path -> the method it answers; GET /v1/models/<name> too
ROUTES = {"/v1/completions": "POST", "/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET"}


class Job:
    """One choice on its way through the engine: tokens in; ("piece", index, Piece) events while
    streaming, then ("done", index, (last Piece, finish reason)) or ("error", index, message) out, on
    its request's queue. Only the engine worker touches it once queued."""

    def __init__(self, request: CompletionRequest, index: int, table: TokenTable, eos_id: int,
                 events: queue.Queue, cancelled: threading.Event, text_start: int):
        self.request, self.index, self.table, self.eos_id = request, index, table, eos_id
        self.events, self.cancelled = events, cancelled  # shared by the request's choices
        self.text_start = text_start  # characters before the completion in the choice's text (the echo)
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.offsets: list[int] = []  # each token's first character in the completion
        self.chars = 0
        self.stop_at: Optional[int] = None  # where the first stop string begins
        self._sent_chars = self._sent_tokens = 0

    def engine_request(self) -> Request:
        r = self.request
        sampling = r.sampling.for_sample(self.index % r.n)  # each of the n samples has its own random stream
        return Request(r.prompts[self.index // r.n], r.max_tokens, sampling, (self.eos_id,), self.on_tokens,
                       r.logprobs)

    def _text(self, final: bool) -> str:
        """The completion so far, cut at the first stop string. Before the end, hold back what may still
        turn into a stop string or is an incomplete UTF-8 sequence."""
        text = self.table.decode(self.tokens)
        cuts = [i for i in (text.find(s) for s in self.request.stop) if i >= 0]
        if cuts:
            self.stop_at = min(cuts)
            return text[:self.stop_at]
        if not final:
            text = text.rstrip("\ufffd")
            hold = max((len(s) for s in self.request.stop), default=1) - 1
            text = text[:len(text) - hold] if hold else text
        return text

    def _piece(self, text: str, final: bool) -> Piece:
        """The text not yet sent, with the tokens that begin in it (at the end: all tokens before a stop string)."""
        end = len(self.tokens) if final and self.stop_at is None else bisect.bisect_left(self.offsets, len(text))
        start, self._sent_tokens = self._sent_tokens, max(self._sent_tokens, end)
        piece = Piece(text[self._sent_chars:], self.tokens[start:end], self.logprobs[start:end],
                      [self.text_start + o for o in self.offsets[start:end]])
        self._sent_chars = max(self._sent_chars, len(text))
        return piece

    def on_tokens(self, tokens: list[int], logprobs: list[TokenLogprob]) -> bool:
        """Called by the engine worker; False ends this sequence."""
        if self.cancelled.is_set():
            return False
        for token in tokens:
            self.offsets.append(self.chars)
            self.chars += self.table.chars[token]
        self.tokens += tokens
        self.logprobs += logprobs
        if self.request.stream or self.request.stop:
            text = self._text(final=False)
            if self.request.stream and len(text) > self._sent_chars:
                self.events.put(("piece", self.index, self._piece(text, final=False)))
        return self.stop_at is None

    def finish(self, result: Result) -> None:
        reason = "stop" if result.finish_reason == "stop" or self.stop_at is not None else "length"
        self.events.put(("done", self.index, (self._piece(self._text(final=True), final=True), reason)))


@dataclass
class ScoreJob:
    """Echo with logprobs: the prompts' token log-probabilities, as one ("scored", None, lists) event."""

    prompts: list[list[int]]
    top_n: int
    events: queue.Queue
    cancelled: threading.Event


@dataclass
class Counters:
    completed: int = 0  # choices
    aborted: int = 0
    active: int = 0  # sequences in the batch being decoded
    lock: threading.Lock = field(default_factory=threading.Lock)


class EngineWorker(threading.Thread):
    """The one thread that runs the model, with continuous batching: between decoding steps, waiting
    prompts are scored, waiting choices are prefilled and join the running batch (up to max_batch_size
    sequences), and finished sequences leave it."""

    def __init__(self, engine: Engine, max_batch_size: int):
        super().__init__(daemon=True, name="engine-worker")
        self.engine, self.max_batch_size = engine, max_batch_size
        self.jobs: queue.Queue = queue.Queue()  # Job or ScoreJob, or None to stop
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
            taken = [] if stopping else self._take(block=not running, room=self.max_batch_size - len(running))
            stopping = stopping or None in taken
            taken = [job for job in taken if job is not None and not job.cancelled.is_set()]
            for job in taken:
                if isinstance(job, ScoreJob):
                    self._score(job)
            new = [job for job in taken if isinstance(job, Job)]
            at_risk = [job for job, _ in running] + new
            try:
                if new:
                    started, results = self.engine.start([job.engine_request() for job in new])
                    running += zip(new, results)
                    if batch is None or not batch.size:
                        batch = started
                    else:
                        batch.merge(started)
                if batch is not None and batch.size:
                    self.engine.step(batch, self.stats)
            except Exception as e:  # keep serving; every client of the batch hears about it
                for job in at_risk:
                    job.events.put(("error", job.index, f"generation failed: {type(e).__name__}: {e}"))
                if batch is not None:
                    batch.keep(torch.zeros(0, dtype=torch.long))  # drop every row (and a static engine's slots)
                batch, running = None, []
            self.counters.active = batch.size if batch is not None else 0
            running = self._finish(running)

    def _take(self, block: bool, room: int) -> list[Any]:
        """Waiting jobs, up to `room` of them choices (scoring takes no batch row); waits for one when
        `block` (nothing is running)."""
        taken: list[Any] = [self.jobs.get()] if block else []
        while sum(isinstance(job, Job) for job in taken) < room and None not in taken:
            try:
                taken.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return taken

    def _score(self, job: ScoreJob) -> None:
        try:
            job.events.put(("scored", None, self.engine.score(job.prompts, job.top_n)))
        except Exception as e:
            job.events.put(("error", None, f"scoring failed: {type(e).__name__}: {e}"))

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
            job.finish(result)
        return still


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: many clients may connect at once

    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: ServeConfig, model_name: str,
                 host: str, port: int):
        self.engine, self.tokenizer, self.limits, self.model_name = engine, tokenizer, limits, model_name
        self.table = TokenTable(tokenizer)
        self.created = int(time.time())
        self.worker = EngineWorker(engine, limits.max_batch_size)
        self.worker.start()
        super().__init__((host, port), CompletionHandler)

    def server_close(self) -> None:
        super().server_close()
        self.worker.stop()


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # JSON has no NaN


class ServerError(Exception):
    """The engine failed on a request (the worker keeps serving the others)."""


class CompletionHandler(BaseHTTPRequestHandler):
    server: CompletionServer
    timeout = 60  # seconds a client may stall a read or a write before it counts as gone
    _body_read = False

    def log_message(self, format: str, *args: Any) -> None:  # one line per request on stderr, no reverse DNS
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None) -> None:
        self._discard_body()
        kind = "invalid_request_error" if status < 500 else "server_error"
        code = "model_not_found" if status == 404 and param == "model" else None
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": code}}, headers)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own errors (a malformed request line or headers, a method no do_* serves) as the
        API's JSON errors."""
        self.close_connection = True
        if code == HTTPStatus.NOT_IMPLEMENTED:
            self._error(405, f"method {self.command} is not allowed: the API answers GET and POST",
                        headers={"Allow": "GET, POST"})
        else:
            self._error(code, message or HTTPStatus(code).phrase)

    def _discard_body(self) -> None:
        """Read away a body not read yet (when small enough), so that the client can read our answer."""
        headers = getattr(self, "headers", None)
        length = headers.get("Content-Length", "") if headers is not None else ""
        if not self._body_read and length.isdigit() and int(length) <= 4 * self.server.limits.max_body_bytes:
            self._body_read = True
            self.rfile.read(int(length))

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        if not length.isdigit():
            raise RequestError(400, f"bad Content-Length {length!r}")
        limit = self.server.limits.max_body_bytes
        if int(length) > limit:
            raise RequestError(413, f"request body is {length} bytes; the limit is {limit} (serve.max_body_bytes)")
        self._body_read = True
        return self.rfile.read(int(length))

    def _route(self) -> None:
        path = self.path.split("?", 1)[0]
        allowed = ROUTES.get(path, "GET" if path.startswith("/v1/models/") else None)
        if allowed is None:
            routes = ", ".join(f"{method} {route}" for route, method in ROUTES.items())
            return self._error(404, f"no route {path}: the routes are {routes}")
        if self.command != allowed:
            return self._error(405, f"use {allowed} for {path}", headers={"Allow": allowed})
        if path == "/health":
            self._health()
        elif path.startswith("/v1/models"):
            self._models(path)
        else:
            self._complete(chat=path == "/v1/chat/completions")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _route

    def _health(self) -> None:
        worker = self.server.worker
        c, stats = worker.counters, worker.stats
        speculative = {"draft_tokens": stats.draft_tokens, "tokens_per_forward": _finite(stats.tokens_per_forward),
                       "acceptance": [_finite(a) for a in stats.acceptance]}
        self._json(200, {"status": "ok", "model": self.server.model_name, "queued": worker.jobs.qsize(),
                         "active": c.active, "completed": c.completed, "aborted": c.aborted,
                         "speculative": speculative})

    def _models(self, path: str) -> None:
        name = self.server.model_name
        model = {"id": name, "object": "model", "created": self.server.created, "owned_by": "dsmtp",
                 "max_model_len": self.server.engine.context}
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [model]})
        if path != f"/v1/models/{name}":
            return self._error(404, f"model {path[len('/v1/models/'):]!r} is not served here; this server serves "
                                    f"{name!r}", "model")
        self._json(200, model)

    def _complete(self, chat: bool) -> None:
        server = self.server
        try:
            request = parse_request(self._body(), chat, server.tokenizer, server.engine, server.limits,
                                    server.model_name)
        except RequestError as e:
            return self._error(e.status, e.message, e.param)
        except OSError:  # the client stalled or left while sending
            return
        events, cancelled = queue.Queue(), threading.Event()
        try:
            echoes = self._echoes(request, events, cancelled)
            text_start = [len(echo.text) if echo else 0 for echo in echoes]
            generated = len(request.prompts) * request.n if request.max_tokens else 0  # 0: scoring only
            jobs = [Job(request, i, server.table, server.tokenizer.eos_id, events, cancelled,
                        text_start[i // request.n]) for i in range(generated)]
            for job in jobs:
                server.worker.jobs.put(job)
            (self._stream if request.stream else self._respond)(request, echoes, jobs, events)
        except ServerError as e:
            cancelled.set()
            self._error(500, str(e))
        except OSError:  # broken pipe, reset or stalled client
            cancelled.set()  # the worker drops the request's rows at their next token

    def _echoes(self, request: CompletionRequest, events: queue.Queue,
                cancelled: threading.Event) -> list[Optional[Piece]]:
        """Per prompt, its echo (scored first when logprobs are asked for), or None without echo."""
        if not request.echo:
            return [None] * len(request.prompts)
        scored: list[Optional[list[TokenLogprob]]] = [None] * len(request.prompts)
        if request.logprobs is not None:
            self.server.worker.jobs.put(ScoreJob(request.prompts, request.logprobs, events, cancelled))
            kind, _, value = events.get()
            if kind == "error":
                raise ServerError(value)
            scored = value
        return [prompt_piece(ids, lp, self.server.table) for ids, lp in zip(request.prompts, scored)]

    def _outcomes(self, jobs: list[Job], events: queue.Queue):
        """Yield (index, piece, finish reason or None) as the choices' events arrive, until all are done."""
        done = 0
        while done < len(jobs):
            kind, index, value = events.get()
            if kind == "error":
                raise ServerError(value)
            if kind == "piece":
                yield index, value, None
            else:
                done += 1
                yield index, *value

    def _respond(self, request: CompletionRequest, echoes: list[Optional[Piece]], jobs: list[Job],
                 events: queue.Queue) -> None:
        count = len(request.prompts) * request.n
        pieces = [echoes[i // request.n] or Piece() for i in range(count)]
        reasons = ["length"] * count  # max_tokens 0: the prompt alone
        completion_tokens = 0
        for index, piece, reason in self._outcomes(jobs, events):
            pieces[index] = pieces[index] + piece
            reasons[index] = reason or reasons[index]
            completion_tokens += len(piece.tokens)
        choices = [choice(request, i, pieces[i], reasons[i], self.server.table) for i in range(count)]
        prompt_tokens = sum(map(len, request.prompts))
        self._json(200, answer(request, f"cmpl-{uuid.uuid4().hex}", int(time.time()), choices,
                               usage(prompt_tokens, completion_tokens)))

    def _stream(self, request: CompletionRequest, echoes: list[Optional[Piece]], jobs: list[Job],
                events: queue.Queue) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        request_id, created, started = f"cmpl-{uuid.uuid4().hex}", int(time.time()), set()

        def send(index: int, piece: Piece, reason: Optional[str]) -> None:
            kind = "next" if index in started else "first"
            started.add(index)
            chunk = choice(request, index, piece, reason, self.server.table, kind)
            self._event(answer(request, request_id, created, [chunk], chunk=True))

        count = len(request.prompts) * request.n
        for index in range(count):
            if echoes[index // request.n] is not None:
                send(index, echoes[index // request.n], None if jobs else "length")
        completion_tokens = 0
        try:
            for index, piece, reason in self._outcomes(jobs, events):
                send(index, piece, reason)
                completion_tokens += len(piece.tokens)
        except ServerError as e:
            self._event({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        else:
            if request.include_usage:
                prompt_tokens = sum(map(len, request.prompts))
                self._event(answer(request, request_id, created, [], usage(prompt_tokens, completion_tokens),
                                   chunk=True))
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
    parser.add_argument("--host", help="address to bind (serve.host; default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, help="port (serve.port; default 8000, 0: any free port)")
    parser.add_argument("--served-model-name", help="the model's name in the API (serve.served_model_name; "
                                                    "default: the --ckpt path)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. serve.port=8001 or serve.max_batch_size=16")
    add_engine_arguments(parser)  # the static engine has serve.max_batch_size slots
    args = parser.parse_args(argv)
    # The flags are --set overrides (applied last, so they win), validated with the rest of the config.
    flags = {"host": args.host, "port": args.port, "served_model_name": args.served_model_name}
    overrides = args.set + [f"serve.{name}={json.dumps(value)}" for name, value in flags.items() if value is not None]
    try:
        model, cfg, tokenizer = load(args.ckpt, args.device, overrides=overrides)
        if args.compile:
            compile_for_decoding(model)
        engine = make_engine(model, args.speculative, args.engine, max_batch=cfg.serve.max_batch_size)
    except (ValueError, OSError) as e:
        print(f"dsmtp serve: error: {e}", file=sys.stderr)
        return 2
    name = cfg.serve.served_model_name or str(args.ckpt)
    server = CompletionServer(engine, tokenizer, cfg.serve, name, cfg.serve.host, cfg.serve.port)
    print(f"serving {args.ckpt} as {name!r} on http://{cfg.serve.host}:{server.server_address[1]} "
          f"({type(engine).__name__}, speculative K={args.speculative})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
