"""The OpenAI-compatible API of `dsmtp serve`, through the official `openai` client: models, prompt forms,
n, logprobs, echo, scoring, streaming, chat, errors; and a bounded load test (tools/load_test_serve.py).

References are independent of the server: the engine run alone on the same token ids and seeds, the
model's own log-softmax over a full forward (fp32, as the server runs it), the chat template applied by
hand.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from functools import partial
from pathlib import Path

import openai
import pytest
import torch

from dsmtp.data.tokenizer import Tokenizer, train_tokenizer
from dsmtp.serve.engine import Engine, Request
from dsmtp.serve.loading import encode_prompt, load
from dsmtp.serve.openai_api import CHAT_STOP, TokenTable, chat_prompt
from dsmtp.serve.sampling import SamplingParams
from dsmtp.serve.server import CompletionServer, main as serve_main
from dsmtp.serve.static import StaticEngine
from tests.serve_models import random_model, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import load_test_serve  # noqa: E402

TOLERANCE = 1e-4  # logprobs against the direct log-softmax, fp32
K = 2  # the server's draft tokens


@pytest.fixture(scope="module")
def served(trained_ckpt):
    """(openai client, server, float32 reference model, tokenizer, token table)."""
    model, cfg, tokenizer = load(trained_ckpt)
    cfg.serve.max_new_tokens, cfg.serve.max_body_bytes, cfg.serve.max_batch_size = 64, 8192, 4
    srv = CompletionServer(Engine(model, speculative_k=K), tokenizer, cfg.serve, "tiny", "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="none", max_retries=0,
                           timeout=120)
    reference = load(trained_ckpt)[0]  # a model of its own: the server's runs on the engine thread
    yield client, srv, reference, tokenizer, TokenTable(tokenizer)
    srv.shutdown()
    srv.server_close()


def generate(model, ids: list[int], max_tokens: int, sampling: SamplingParams = SamplingParams(),
             eos: int = 2) -> list[int]:
    """The engine alone, one sequence, as the server runs it (K drafts, stops at <eos>)."""
    return Engine(model, K).generate([Request(ids, max_tokens, sampling, (eos,))])[0][0].tokens


@torch.no_grad()
def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is the log-distribution of the token after ids[:i + 1] (float32 or wider)."""
    logits = model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def assert_logprobs(logprobs, ids: list[int], first: int, reference: torch.Tensor, table: TokenTable, top_n: int):
    """Completion-layout logprobs of ids[first:] (ids[0] alone when first == 0 is the echoed prompt's
    first token: no logprob) against the reference log-softmax rows."""
    assert logprobs.tokens == [table.names[t] for t in ids[first:]]
    for i, token in enumerate(ids[first:], start=first):
        entry, top = logprobs.token_logprobs[i - first], logprobs.top_logprobs[i - first]
        if i == 0:
            assert entry is None and top is None
            continue
        row = reference[i - 1]
        assert abs(entry - float(row[token])) <= TOLERANCE, (i, entry, float(row[token]))
        expected = {table.names[int(j)]: float(row[j]) for j in row.topk(top_n).indices}
        expected[table.names[token]] = float(row[token])
        assert top.keys() == expected.keys(), (i, top, expected)
        assert all(abs(top[name] - expected[name]) <= TOLERANCE for name in top)


# -- the engine's logprobs ------------------------------------------------------------------------


@pytest.mark.parametrize("engine_class", [Engine, partial(StaticEngine, max_batch=4)], ids=["dynamic", "static"])
def test_engine_logprobs_equal_full_forward(engine_class):
    """float64, a random model (so drafts are accepted and rejected): every token that plain and
    speculative decoding emit carries the log-probability and top 4 of a full forward at its position
    (both engines); Engine.score gives those of every prompt token after the first, for a ragged batch."""
    model = random_model(tiny_config(mtp_depth=2))
    prompts = [[3, 4, 5, 6, 7], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]

    def check(ids: list[int], first: int, logprobs) -> None:
        rows = log_softmax(model, ids)
        assert len(logprobs) == len(ids) - first
        for i, lp in enumerate(logprobs, start=first):
            row = rows[i - 1]
            assert abs(lp.logprob - float(row[ids[i]])) <= 1e-6  # cached and full forwards round apart
            assert [t for t, _ in lp.top] == row.topk(len(lp.top)).indices.tolist()
            assert all(abs(v - float(row[t])) <= 1e-6 for t, v in lp.top)

    for k in (0, 3):
        requests = [Request(p, 12, SamplingParams(temperature=1.0, seed=i), logprobs=4) for i, p in enumerate(prompts)]
        results, stats = engine_class(model, k).generate(requests)
        if k:
            assert 0.05 < stats.acceptance[0] < 0.95
        for p, r in zip(prompts, results):
            check(p + r.tokens, len(p), r.logprobs)
            assert all(len(lp.top) == 4 for lp in r.logprobs)
    for p, scored in zip(prompts, Engine(model).score(prompts, top_n=2)):
        check(p, 1, scored)
    assert Engine(model).generate([Request(prompts[0], 3)])[0][0].logprobs == []  # only when asked for


# -- models, prompt forms, n ---------------------------------------------------------------------


def test_models(served):
    client = served[0]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.owned_by == "dsmtp"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_prompt_forms(served):
    """A string, a list of strings, token ids and a list of token-id lists: each prompt answered as the
    engine answers it alone; usage counts every prompt's tokens and every completion's."""
    client, _, reference, tokenizer, table = served
    texts = ["the quick", "over", "lazy dog. the"]
    text_ids = [encode_prompt(tokenizer, t) for t in texts]
    token_prompts = [[2, 9, 17], [5, 40, 41, 12]]
    for prompt, ids in (("the quick", text_ids[:1]), (texts, text_ids), (token_prompts[0], token_prompts[:1]),
                        (token_prompts, token_prompts)):
        answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
        expected = [generate(reference, p, 20) for p in ids]
        assert [c.index for c in answer.choices] == list(range(len(ids)))
        assert [c.text for c in answer.choices] == [table.decode(e) for e in expected]
        assert [c.finish_reason for c in answer.choices] == ["stop" if len(e) < 20 else "length" for e in expected]
        assert answer.usage.prompt_tokens == sum(map(len, ids))
        assert answer.usage.completion_tokens == sum(map(len, expected))
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # after "the" the corpus goes on with "quick" or "lazy"; after "the quick" with one sentence only
    assert client.completions.create(model="tiny", prompt="the quick", max_tokens=20, temperature=0).choices[0].text \
        == " brown fox jumps over the lazy dog."


def test_n_samples_have_their_own_streams(served):
    """n = 3 seeded samples of two prompts: choice i is sample i % 3 of prompt i // 3, each equal to the
    engine alone with that sample's seed; the samples differ; a prompt sent alone gets the same samples."""
    client, _, reference, tokenizer, table = served
    sampling = SamplingParams(temperature=3.0, seed=11)
    answer = client.completions.create(model="tiny", prompt=["the", "over"], n=3, max_tokens=12, temperature=3.0,
                                       seed=11)
    texts = [c.text for c in answer.choices]
    for i, text in enumerate(texts):
        ids = encode_prompt(tokenizer, ["the", "over"][i // 3])
        assert text == table.decode(generate(reference, ids, 12, sampling.for_sample(i % 3))), i
    assert len(set(texts[:3])) == 3 and len(set(texts[3:])) == 3
    alone = client.completions.create(model="tiny", prompt="over", n=3, max_tokens=12, temperature=3.0, seed=11)
    assert [c.text for c in alone.choices] == texts[3:]


# -- logprobs, echo, scoring ---------------------------------------------------------------------


def test_logprobs_of_generated_tokens(served):
    """Sampled at temperature 2 with logprobs=3: each token's logprob and top 3 (plus itself) are the
    model's own log-softmax (raw, before temperature) at its position; text_offset points at each token
    in the text; echo puts the prompt's tokens in front."""
    client, _, reference, tokenizer, table = served
    ids = encode_prompt(tokenizer, "lazy dog. the")
    for echo in (False, True):
        answer = client.completions.create(model="tiny", prompt="lazy dog. the", max_tokens=10, temperature=2.0,
                                           seed=5, logprobs=3, echo=echo)
        tokens = generate(reference, ids, 10, SamplingParams(temperature=2.0, seed=5))
        (c,) = answer.choices
        full = ids + tokens
        logprobs = c.logprobs
        if echo:
            assert c.text == table.decode(full)
            assert logprobs.token_logprobs[0] is None
            prompt_rows = log_softmax(reference, full)
            assert_logprobs(logprobs, full, 0, prompt_rows, table, 3)
        else:
            assert c.text == table.decode(tokens)
            assert_logprobs(logprobs, full, len(ids), log_softmax(reference, full), table, 3)
        starts = logprobs.text_offset + [len(c.text)]
        shown = full if echo else tokens
        assert [c.text[a:b] for a, b in zip(starts, starts[1:])] == [table.decode([t]) for t in shown]
        assert answer.usage.completion_tokens == len(tokens)


def test_scoring_equals_log_softmax(served):
    """echo + logprobs + max_tokens 0 (how evaluation harnesses score): every prompt token's logprob and
    top 5 equal the model's log-softmax over that prompt alone (fp32, <= 1e-4), for one prompt and for a
    batch of text and token-id prompts of different lengths (one near the context: scored in forwards
    of their own); the first token has none; no tokens are generated."""
    client, srv, reference, tokenizer, table = served
    context = srv.engine.context
    long_ids = [(7 * i) % 60 + 3 for i in range(context)]
    cases = [("the quick brown fox", [encode_prompt(tokenizer, "the quick brown fox")]),
             (["fox the over quick lazy", "dog.", "jumps jumps jumps over"],
              [encode_prompt(tokenizer, t) for t in ("fox the over quick lazy", "dog.", "jumps jumps jumps over")]),
             ([[2, 30, 31, 32], long_ids, [17]], [[2, 30, 31, 32], long_ids, [17]])]
    for prompt, ids in cases:
        answer = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=5, max_tokens=0)
        assert len(answer.choices) == len(ids)
        for c, p in zip(answer.choices, ids):
            assert c.text == table.decode(p) and c.finish_reason == "length"
            assert_logprobs(c.logprobs, p, 0, log_softmax(reference, p), table, 5)
            assert c.logprobs.text_offset[0] == 0
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (sum(map(len, ids)), 0)
    # The echo of text is the text (the fixture's tokenizer adds sentencepiece's leading space).
    answer = client.completions.create(model="tiny", prompt="the quick brown fox", echo=True, max_tokens=0)
    assert answer.choices[0].text.lstrip() == "the quick brown fox" and answer.choices[0].logprobs is None


# -- streaming --------------------------------------------------------------------------------------


def collect(stream) -> tuple[dict[int, dict], object]:
    """Chunks -> per choice index {text, finish_reason, tokens, token_logprobs, text_offset}, and the usage."""
    choices, usage = {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            entry = choices.setdefault(c.index, {"text": "", "finish_reason": None, "tokens": [],
                                                 "token_logprobs": [], "text_offset": []})
            entry["text"] += (c.delta.content or "") if hasattr(c, "delta") else c.text
            assert entry["finish_reason"] is None  # nothing after a choice's last chunk
            entry["finish_reason"] = c.finish_reason
            if getattr(c, "logprobs", None) is not None:
                if hasattr(c, "delta"):
                    entry["tokens"] += [e.token for e in c.logprobs.content]
                    entry["token_logprobs"] += [e.logprob for e in c.logprobs.content]
                else:
                    for key in ("tokens", "token_logprobs", "text_offset"):
                        entry[key] += getattr(c.logprobs, key)
    return choices, usage


def test_streaming_equals_whole_answers(served):
    """Streamed completions (n = 2, echo, logprobs, a stop string, scoring only) put together equal the
    same requests answered whole; the usage chunk comes last, with no choices."""
    client = served[0]
    requests = [dict(prompt=["the", "over the"], n=2, max_tokens=16, temperature=1.5, seed=3, logprobs=2, echo=True),
                dict(prompt="quick", max_tokens=25, temperature=0, stop=["over", "."]),
                dict(prompt=["dog.", [2, 5, 6]], echo=True, logprobs=1, max_tokens=0)]
    for request in requests:
        whole = client.completions.create(model="tiny", **request)
        chunks = list(client.completions.create(model="tiny", stream=True, stream_options={"include_usage": True},
                                                **request))
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        streamed, _ = collect(chunks)
        assert sorted(streamed) == [c.index for c in whole.choices]
        for c in whole.choices:
            s = streamed[c.index]
            assert (s["text"], s["finish_reason"]) == (c.text, c.finish_reason), request
            if c.logprobs is not None:
                assert s["tokens"] == c.logprobs.tokens and s["text_offset"] == c.logprobs.text_offset
                pairs = zip(s["token_logprobs"], c.logprobs.token_logprobs)
                assert all(a == b or abs(a - b) <= TOLERANCE for a, b in pairs)
    # Without stream_options no usage chunk.
    chunks = list(client.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=0, stream=True))
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)


# -- chat ----------------------------------------------------------------------------------------


def test_chat(served):
    """The documented template by hand, completed by the engine alone up to <eos> or "\\nUser:", is the
    answer, whole and streamed; logprobs in the chat layout; n seeded samples."""
    client, _, reference, tokenizer, table = served
    messages = [{"role": "system", "content": "Finish the sentence."}, {"role": "user", "content": "the quick"},
                {"role": "assistant", "content": "brown fox"}, {"role": "user", "content": "jumps over"}]
    text = "System: Finish the sentence.\n\nUser: the quick\n\nAssistant: brown fox\n\nUser: jumps over\n\nAssistant:"
    assert chat_prompt([(m["role"], m["content"]) for m in messages]) == text
    ids = encode_prompt(tokenizer, text)
    tokens = generate(reference, ids, 40)
    expected = table.decode(tokens).split(CHAT_STOP)[0]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                            logprobs=True, top_logprobs=2)
    (c,) = answer.choices
    assert c.message.role == "assistant" and c.message.content == expected
    assert answer.usage.prompt_tokens == len(ids) and answer.object == "chat.completion"
    rows = log_softmax(reference, ids + tokens)
    kept = answer.usage.completion_tokens
    assert "".join(e.token for e in c.logprobs.content).startswith(expected) and len(c.logprobs.content) == kept
    for i, (entry, token) in enumerate(zip(c.logprobs.content, tokens)):
        row = rows[len(ids) - 1 + i]
        assert entry.token == table.names[token] and bytes(entry.bytes) == table.bytes[token]
        assert abs(entry.logprob - float(row[token])) <= TOLERANCE
        assert [e.token for e in entry.top_logprobs] == [table.names[int(j)] for j in row.topk(2).indices]

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                            stream=True, logprobs=True, top_logprobs=2)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    streamed, _ = collect(chunks)
    assert streamed[0]["text"] == expected and streamed[0]["finish_reason"] == c.finish_reason
    assert streamed[0]["tokens"] == [e.token for e in c.logprobs.content]

    sampled = client.chat.completions.create(model="tiny", messages=messages[:2], max_tokens=12, temperature=3.0,
                                             seed=4, n=2)
    ids = encode_prompt(tokenizer, chat_prompt([(m["role"], m["content"]) for m in messages[:2]]))
    for i, c in enumerate(sampled.choices):
        tokens = generate(reference, ids, 12, SamplingParams(temperature=3.0, seed=4).for_sample(i))
        assert c.message.content == table.decode(tokens).split(CHAT_STOP)[0]


# -- errors ----------------------------------------------------------------------------------------


def test_errors_name_the_field(served):
    client = served[0]
    cases = [(dict(prompt="a", extra_body={"beam_width": 4}), openai.BadRequestError, "beam_width"),
             (dict(prompt="a", n=65), openai.BadRequestError, "n"),  # serve.max_choices = 64 prompts x n
             (dict(prompt=["a"] * 4, n=17), openai.BadRequestError, "n"),
             (dict(prompt="a", logprobs=21), openai.BadRequestError, "logprobs"),
             (dict(prompt="a", max_tokens=0), openai.BadRequestError, "max_tokens"),  # 0 only with echo
             (dict(prompt="a", max_tokens=65), openai.BadRequestError, "max_tokens"),
             (dict(prompt=[], max_tokens=2), openai.BadRequestError, "prompt"),
             (dict(prompt=[[1, 2], []], max_tokens=2), openai.BadRequestError, "prompt"),
             (dict(prompt=[1, 10_000], max_tokens=2), openai.BadRequestError, "prompt"),
             (dict(prompt="a", frequency_penalty=0.5), openai.BadRequestError, "frequency_penalty"),
             (dict(prompt="a", best_of=2), openai.BadRequestError, "best_of"),
             (dict(prompt="a", stream_options={"include_usage": True}), openai.BadRequestError, "stream_options"),
             (dict(prompt="a", model="gpt-3.5-turbo-instruct"), openai.NotFoundError, "model")]
    for kwargs, error, param in cases:
        kwargs = {"model": "tiny"} | kwargs
        with pytest.raises(error) as e:
            client.completions.create(**kwargs)
        assert e.value.param == param, (kwargs, e.value.body)
    chat_cases = [(dict(messages=[]), "messages"),
                  (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
                  (dict(messages=[{"role": "user", "content": None}]), "messages[0].content"),
                  (dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2), "top_logprobs"),
                  (dict(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21), "top_logprobs")]
    for kwargs, param in chat_cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", **kwargs)
        assert e.value.param == param, (kwargs, e.value.body)
    # The body limit; methods a route does not answer (the client's raw calls). A lone surrogate the
    # client cannot even encode: test_bad_requests_get_json_errors sends one.
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="x" * 9000)
    assert e.value.status_code == 413 and "serve.max_body_bytes" in e.value.message
    for call, allowed in ((lambda: client.put("/completions", cast_to=object, body={"prompt": "a"}), "POST"),
                          (lambda: client.delete("/models", cast_to=object), "GET")):
        with pytest.raises(openai.APIStatusError) as e:
            call()
        assert e.value.status_code == 405 and e.value.response.headers["Allow"] == allowed
    # What stock clients send at no-op values is accepted (LangChain's defaults).
    answer = client.completions.create(model="tiny", prompt="the quick", max_tokens=3, temperature=0, frequency_penalty=0,
                                       presence_penalty=0, logit_bias={}, n=1, best_of=1, seed=None, logprobs=None)
    assert answer.choices[0].text == " brown fox jumps"


def raw(port: int, request: bytes) -> tuple[int, dict, dict]:
    """Send raw bytes; (status, headers, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/json", data
    return int(lines[0].split()[1]), headers, json.loads(body)


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_bad_requests_get_json_errors(served):
    """The defects found by trying bad requests: a lone surrogate in a prompt or a message (the tokenizer
    raised inside the handler: no answer at all) and PUT/DELETE (Python's 501 HTML page) now get the API's
    JSON errors; so do any other method, a malformed request line and JSON nested too deep."""
    port = served[1].server_address[1]
    cases = [(post("/v1/completions", b'{"prompt": "\\ud800x", "max_tokens": 2}'), 400, "prompt"),
             (post("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'), 400, "prompt"),
             (post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udc00"}]}'), 400,
              "messages[0].content"),
             (post("/v1/completions", b"[" * 5000), 400, None),
             (b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405, None),
             (b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405, None),
             (b"PATCH /health HTTP/1.1\r\nHost: x\r\n\r\n", 405, None),
             (b"BREW /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405, None),
             (b"GET /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405, None),
             (b"PUT /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404, None),
             (b"GET /v1 models HTTP/1.1\r\n\r\n", 400, None)]
    for request, status, param in cases:
        got, headers, body = raw(port, request)
        assert got == status and body["error"]["message"] and body["error"]["param"] == param, (request, body)
        if status == 405:
            assert headers["Allow"] in ("GET", "POST", "GET, POST")
    # The server still answers.
    status, _, body = raw(port, post("/v1/completions", b'{"prompt": "the quick", "max_tokens": 3, "temperature": 0}'))
    assert status == 200 and body["choices"][0]["text"] == " brown fox jumps"


# -- tokens as text --------------------------------------------------------------------------------


def test_token_table_with_the_project_tokenizer(tmp_path):
    """dsmtp's own (lossless, byte-fallback) tokenizer: the table's bytes put back every text, names are
    each token's text ("bytes:\\xNN" for part of a character, the piece for control tokens), and the
    character counts add up to the text's length."""
    texts = ["def main(x):\n    return  x + 1\n", " leading space and trailing  ", "ünïcödé ✓ \u2581 mark\t\n"]
    tokenizer = train_tokenizer(texts * 20, vocab_size=300, out_path=tmp_path / "tokenizer.model")
    tokenizer = Tokenizer.load(tmp_path / "tokenizer.model")
    table = TokenTable(tokenizer)
    for text in texts + ["中文 and 🙂 never seen"]:
        ids = tokenizer.encode(text)
        assert table.decode(ids) == text == tokenizer.decode(ids)
        assert sum(table.chars[i] for i in ids) == len(text)
    assert table.names[2] == "</s>" and table.names[tokenizer.encode("é")[0]] in ("é", "bytes:\\xc3")
    assert any(name.startswith("bytes:\\x") for name in table.names)


# -- command line and load -----------------------------------------------------------------------


def test_serve_flags_are_validated_before_serving(trained_ckpt, capsys):
    """--host/--port/--served-model-name go through the config's validation (as --set serve.* does),
    before anything is served."""
    for args, message in ((["--port", "70000"], "serve.port=70000"),
                          (["--set", "serve.port=-1"], "serve.port=-1"),
                          (["--served-model-name", " tiny"], "serve.served_model_name=' tiny'"),
                          (["--set", "serve.port=8000", "--port", "99999"], "serve.port=99999")):
        assert serve_main(["--ckpt", str(trained_ckpt), *args]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_load(trained_ckpt, tmp_path):
    """tools/load_test_serve.py, shorter: `dsmtp serve --host 127.0.0.1 --port 0 --served-model-name ...`
    in a process of its own, 16 clients for 20 s, streaming and not, every third request malformed: no
    5xx, every valid request answered, deterministic ones as when sent alone, malformed ones refused
    with JSON errors of the expected status, no traceback in the server's log."""
    log = tmp_path / "serve.log"
    proc, port = load_test_serve.start_server(str(trained_ckpt), "load-test", K, "cpu", log)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["load-test"]
        result = load_test_serve.run_load(port, "load-test", clients=16, duration=20)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(load_test_serve.table(result, ["test_load"]))
    assert result.failures() == []
    valid, malformed = load_test_serve.kinds("load-test")
    sent = {r.kind.name for r in result.records}
    assert sent == {k.name for k in valid + malformed}  # every kind was tried under load
    assert all(r.status is not None and r.status < 500 for r in result.records)
    assert "Traceback" not in log.read_text()


def test_a_static_engine_serves_the_same_answers(served, trained_ckpt):
    """The server on the static engine (the default on CUDA, eager here) answers as on the dynamic one:
    greedy text with logprobs, and n seeded samples."""
    client, _, _, _, _ = served
    model, cfg, tokenizer = load(trained_ckpt)
    cfg.serve.max_new_tokens, cfg.serve.max_batch_size = 64, 4
    srv = CompletionServer(StaticEngine(model, K, max_batch=4), tokenizer, cfg.serve, "tiny", "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        static = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="none",
                               max_retries=0, timeout=120)
        for request in ({"prompt": "the quick", "max_tokens": 12, "logprobs": 2, "temperature": 0.0},
                        {"prompt": ["over", "lazy dog"], "max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 5}):
            want, got = (c.completions.create(model="tiny", **request) for c in (client, static))
            assert [c.text for c in got.choices] == [c.text for c in want.choices]
            if request.get("logprobs"):
                assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
                assert got.choices[0].logprobs.token_logprobs == pytest.approx(
                    want.choices[0].logprobs.token_logprobs, abs=TOLERANCE)
    finally:
        srv.shutdown()
        srv.server_close()
