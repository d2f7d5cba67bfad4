"""The OpenAI API's layouts for /v1/completions and /v1/chat/completions: request validation (every field
checked before any work, the offending one named), the chat template, and the choices, chunks and
logprobs that answers are made of. The HTTP side is dsmtp.serve.server.

Chat template, for base models: each message becomes "<Role>: <content>" and a blank line (roles
System, User, Assistant), then "Assistant:" for the model to continue; its answer ends where it starts
a new line with "User:" (or at <eos>, a stop string or max_tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from dsmtp.config import ServeConfig
from dsmtp.data.tokenizer import Tokenizer
from dsmtp.serve.engine import Engine
from dsmtp.serve.loading import encode_prompt
from dsmtp.serve.logprobs import TokenLogprob
from dsmtp.serve.sampling import SamplingParams

MAX_LOGPROBS = 20  # top alternatives per token: completions' `logprobs`, chat's `top_logprobs`
MAX_STOP_STRINGS = 4
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"
COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stream", "stream_options",
                 "seed", "user", "frequency_penalty", "presence_penalty", "logit_bias")
COMPLETION_FIELDS = COMMON_FIELDS + ("prompt", "logprobs", "echo", "best_of", "suffix")
CHAT_FIELDS = COMMON_FIELDS + ("messages", "max_completion_tokens", "logprobs", "top_logprobs")
# Fields stock clients send at their no-op values (LangChain sends all of these): accepted only there.
NO_OP_VALUES = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "suffix": ""}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class CompletionRequest:
    chat: bool
    model: str
    prompts: list[list[int]]  # the token ids each prompt runs as
    n: int  # choices per prompt; choice i is sample i % n of prompt i // n
    max_tokens: int  # 0: only score the prompts (echo)
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool  # streaming: a last chunk with the usage
    logprobs: Optional[int]  # alternatives reported per token; None: no logprobs
    echo: bool


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(body: dict, name: str, kinds: tuple, default: Any, what: str) -> Any:
    """body[name], or `default` when absent or null; RequestError naming the field when of another kind."""
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is not a number here.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise RequestError(400, f"'{name}' must be {what}, got {_show(value)}", name)
    if float in kinds and not -1e308 <= value <= 1e308:  # NaN, infinities, integers beyond float range
        raise RequestError(400, f"'{name}' must be {what}, got {str(value)[:40]}", name)
    return value


def _in_range(value: int, low: int, high: int, name: str, why: str = "") -> int:
    if not low <= value <= high:
        raise RequestError(400, f"'{name}' must be in [{low}, {high}]{why}, got {value}", name)
    return value


def _text(value: str, param: str) -> str:
    """A string the tokenizer can read: JSON can carry lone UTF-16 surrogates, which are not text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(400, f"'{param}' is not valid Unicode: {e.reason} at character {e.start} "
                                f"({ascii(value[e.start])})", param) from None
    return value


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    return body


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompts(value: Any, tokenizer: Tokenizer) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of lists of token ids. Text
    starts a document after <eos>, as in training; token ids run as given."""
    if isinstance(value, str) or (_is_token_list(value) and value):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) or _is_token_list(p) for p in value):
        raise RequestError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                f"lists of token ids, got {_show(value)}", "prompt")
    return [encode_prompt(tokenizer, _text(p, "prompt")) if isinstance(p, str) else p for p in value]


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """(role, content) pairs -> the text the model continues (the template in the module docstring)."""
    return "".join(f"{CHAT_ROLES[role]}: {content}\n\n" for role, content in messages) + "Assistant:"


def _messages(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            raise RequestError(400, f"'{where}' must be an object with 'role' and 'content' only, got {_show(m)}",
                               where)
        if m.get("role") not in CHAT_ROLES:
            raise RequestError(400, f"'{where}.role' must be one of {list(CHAT_ROLES)}, got {_show(m.get('role'))}",
                               f"{where}.role")
        if not isinstance(m.get("content"), str):
            raise RequestError(400, f"'{where}.content' must be a string, got {_show(m.get('content'))}",
                               f"{where}.content")
        messages.append((m["role"], _text(m["content"], f"{where}.content")))
    return messages


def _stop(body: dict) -> list[str]:
    stop = _get(body, "stop", (str, list), [], "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, f"'stop' must be up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    return [_text(s, "stop") for s in stop]


def _include_usage(body: dict, stream: bool) -> bool:
    options = _get(body, "stream_options", (dict,), {}, "an object")
    if options and not stream:
        raise RequestError(400, "'stream_options' needs 'stream': true", "stream_options")
    if set(options) - {"include_usage"}:
        raise RequestError(400, f"'stream_options' knows only 'include_usage', got {sorted(options)}", "stream_options")
    return _get(options, "include_usage", (bool,), False, "true or false")


def parse_request(raw: bytes, chat: bool, tokenizer: Tokenizer, engine: Engine, limits: ServeConfig,
                  model_name: str) -> CompletionRequest:
    """Validate a /v1/completions (or, with `chat`, /v1/chat/completions) body; raise RequestError naming
    the offending field."""
    body = _json_object(raw)
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; supported: {list(fields)}", unknown[0])
    model = _get(body, "model", (str,), model_name, "a string")
    if model != model_name:
        raise RequestError(404, f"model {model!r} is not served here; this server serves {model_name!r}", "model")
    for name, no_op in NO_OP_VALUES.items():
        if name in fields and body.get(name) not in (None, no_op):
            raise RequestError(400, f"'{name}' is not supported: leave it out or give {_show(no_op)}", name)
    _get(body, "user", (str,), "", "a string")  # an end-user id for abuse tracking: nothing to do here

    if chat:
        prompts = [encode_prompt(tokenizer, chat_prompt(_messages(body.get("messages"))))]
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise RequestError(400, "give 'max_completion_tokens' or 'max_tokens', not both", "max_tokens")
        name = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        # By default up to the limit or the end of the context (too long a prompt is refused below).
        default = max(1, min(limits.max_new_tokens, engine.context - len(prompts[0])))
        max_tokens = _get(body, name, (int,), default, "an integer")
        max_tokens = _in_range(max_tokens, 1, limits.max_new_tokens, name, " (serve.max_new_tokens)")
        top = _get(body, "top_logprobs", (int,), None, "an integer")
        if _get(body, "logprobs", (bool,), False, "true or false"):
            logprobs = _in_range(top or 0, 0, MAX_LOGPROBS, "top_logprobs")
        elif top is not None:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        else:
            logprobs = None
        echo, stop = False, _stop(body) + [CHAT_STOP]
    else:
        if body.get("prompt") is None:
            raise RequestError(400, "'prompt' is required", "prompt")
        prompts = _prompts(body["prompt"], tokenizer)
        echo = _get(body, "echo", (bool,), False, "true or false")
        max_tokens = _get(body, "max_tokens", (int,), 16, "an integer")
        why = " (serve.max_new_tokens; 0 only scores the prompt, with 'echo')"
        max_tokens = _in_range(max_tokens, 0 if echo else 1, limits.max_new_tokens, "max_tokens", why)
        logprobs = _get(body, "logprobs", (int,), None, "an integer")
        if logprobs is not None:
            _in_range(logprobs, 0, MAX_LOGPROBS, "logprobs")
        stop = _stop(body)
    n = _in_range(_get(body, "n", (int,), 1, "an integer"), 1, limits.max_choices // len(prompts), "n",
                  f" ({len(prompts)} prompt(s) x n choices <= serve.max_choices={limits.max_choices})")
    if not chat and _get(body, "best_of", (int,), n, "an integer") != n:
        raise RequestError(400, "'best_of' is not supported: leave it out or make it equal to 'n'", "best_of")

    temperature = _get(body, "temperature", (int, float), 1.0, "a number >= 0")
    top_p = _get(body, "top_p", (int, float), 1.0, "a number in (0, 1]")
    top_k = _get(body, "top_k", (int,), 0, "an integer >= 0")
    if top_k >= 2 ** 31:
        raise RequestError(400, f"'top_k' must be below 2^31, got {top_k}", "top_k")
    seed = _get(body, "seed", (int,), None, "an integer in [0, 2^63)")
    if seed is not None:
        _in_range(seed, 0, 2 ** 63 - 1, "seed")
    try:
        sampling = SamplingParams(float(temperature), top_k, float(top_p), seed)
    except ValueError as e:  # SamplingParams' messages start with "<field>="
        param = str(e).split("=")[0]
        raise RequestError(400, f"'{param}' is out of range: {e}", param) from None
    stream = _get(body, "stream", (bool,), False, "true or false")
    include_usage = _include_usage(body, stream)

    for i, ids in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt {i}"
        try:  # token ids the model does not have, an empty list, more tokens than the context
            engine.check_prompt(ids)
        except ValueError as e:
            raise RequestError(400, f"{where}: {e}", "messages" if chat else "prompt") from None
        if len(ids) + max_tokens > engine.context:
            raise RequestError(400, f"{where} ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                    f"context of {engine.context} tokens", "max_tokens")
    return CompletionRequest(chat, model, prompts, n, max_tokens, sampling, stop, stream, include_usage, logprobs,
                             echo)


class TokenTable:
    """Per token id: its bytes in decoded text, its length in characters, and the string that names it
    in logprobs (its text; a control token's piece, e.g. "</s>"; "bytes:\\xNN" for part of a character)."""

    def __init__(self, tokenizer: Tokenizer):
        self.bytes = tokenizer.token_bytes()
        self.chars = [sum(b & 0xC0 != 0x80 for b in token) for token in self.bytes]  # UTF-8 lead bytes
        self.names = [self._name(tokenizer, i, token) for i, token in enumerate(self.bytes)]

    @staticmethod
    def _name(tokenizer: Tokenizer, token_id: int, data: bytes) -> str:
        if not data:
            return tokenizer.id_to_piece(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` as the model reads it (for dsmtp's lossless tokenizer, a text prompt's ids
        give back the prompt)."""
        return b"".join(self.bytes[i] for i in ids).decode("utf-8", errors="replace")


@dataclass
class Piece:
    """Consecutive tokens of one choice and their text: what a response or a stream chunk reports."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Optional[TokenLogprob]] = field(default_factory=list)  # None: a prompt's first token; empty
    offsets: list[int] = field(default_factory=list)  # each token's first character in the choice's text

    def __add__(self, other: "Piece") -> "Piece":
        return Piece(self.text + other.text, self.tokens + other.tokens, self.logprobs + other.logprobs,
                     self.offsets + other.offsets)


def prompt_piece(ids: list[int], logprobs: Optional[list[TokenLogprob]], table: TokenTable) -> Piece:
    """An echoed prompt; `logprobs` (from Engine.score) for its tokens after the first, when asked for."""
    offsets, chars = [], 0
    for token in ids:
        offsets.append(chars)
        chars += table.chars[token]
    return Piece(table.decode(ids), list(ids), [] if logprobs is None else [None, *logprobs], offsets)


def _completion_logprobs(piece: Piece, table: TokenTable) -> dict:
    """The legacy layout: parallel lists; each top_logprobs entry maps names to log-probabilities, the
    chosen token included (so up to logprobs + 1 entries, as OpenAI's)."""
    def top(token: int, lp: Optional[TokenLogprob]) -> Optional[dict]:
        return None if lp is None else {**{table.names[i]: v for i, v in lp.top}, table.names[token]: lp.logprob}

    return {"tokens": [table.names[t] for t in piece.tokens],
            "token_logprobs": [None if lp is None else lp.logprob for lp in piece.logprobs],
            "top_logprobs": [top(t, lp) for t, lp in zip(piece.tokens, piece.logprobs)],
            "text_offset": piece.offsets}


def _chat_logprobs(piece: Piece, table: TokenTable) -> dict:
    def entry(token: int, logprob: float) -> dict:
        return {"token": table.names[token], "logprob": logprob, "bytes": list(table.bytes[token])}

    return {"content": [entry(t, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for t, lp in zip(piece.tokens, piece.logprobs)]}


def choice(request: CompletionRequest, index: int, piece: Piece, finish_reason: Optional[str], table: TokenTable,
           chunk: Optional[str] = None) -> dict:
    """One entry of `choices`: of a whole answer, or (chunk "first" or "next") of a stream's chunk."""
    logprobs = None
    if request.logprobs is not None:
        logprobs = (_chat_logprobs if request.chat else _completion_logprobs)(piece, table)
    if not request.chat:
        return {"index": index, "text": piece.text, "logprobs": logprobs, "finish_reason": finish_reason}
    if chunk is None:
        message = {"role": "assistant", "content": piece.text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    delta = ({"role": "assistant", "content": piece.text} if chunk == "first"
             else {"content": piece.text} if piece.text else {})
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def answer(request: CompletionRequest, request_id: str, created: int, choices: list[dict],
           usage: Optional[dict] = None, chunk: bool = False) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if request.chat else "text_completion"
    payload = {"id": request_id, "object": kind, "created": created, "model": request.model, "choices": choices}
    return payload if usage is None else payload | {"usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
