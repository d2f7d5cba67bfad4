"""Property-based fuzzing (hypothesis) of what users hand dsmtp: config values (sections, --set overrides,
YAML files), HF config.json files, and /v1/completions request bodies. The property: a clear error (the
project's error type, one line, naming a field) or success; never any other exception, which the user
would meet as a traceback.

Examples are derandomized so that CI runs the same ones every time, in well under a minute together;
`DSMTP_FUZZ=explore python -m pytest tests/test_fuzz.py` draws fresh and many more.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dsmtp.config import Config, ConfigError, ServeConfig, config_from_dict, load_config
from dsmtp.convert.hf_config import from_hf_config, read_hf_config, to_hf_config
from dsmtp.data.tokenizer import Tokenizer
from dsmtp.model.params import summary, training_memory
from dsmtp.serve.engine import Engine
from dsmtp.serve.openai_api import COMPLETION_FIELDS, CompletionRequest, RequestError, parse_request
from tests.serve_models import random_model, tiny_config, train_tokenizer

settings.register_profile("ci", max_examples=150, deadline=timedelta(seconds=2), derandomize=True, database=None)
settings.register_profile("explore", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("DSMTP_FUZZ", "ci"))

# JSON-like values, with the numbers that break naive code: huge, negative, fractional, non-finite.
NUMBERS = st.integers(-3, 70) | st.integers() | st.floats() | st.sampled_from([2**31, 2**63, 10**400, 1e308])
# Text, sometimes holding a lone surrogate (how Python carries bytes that are not UTF-8)
TEXT = st.text(max_size=12) | st.tuples(st.text(max_size=5), st.characters(categories=["Cs"]),
                                        st.text(max_size=5)).map("".join)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=6)

SECTIONS = [section.name for section in dataclasses.fields(Config)]
CONFIG_FIELDS = [(section, f.name) for section in SECTIONS for f in dataclasses.fields(getattr(Config(), section))]


def assert_clear(error: Exception, names: list[str]) -> None:
    """One line that names one of the fields the example touched (or the section / file they sit in)."""
    message = str(error)
    assert message and "\n" not in message, message
    assert any(name in message for name in names), (names, message)


# ----------------------------------------------------------------------------------------------
# Config values


@given(st.lists(st.tuples(st.sampled_from(CONFIG_FIELDS), VALUES), min_size=1, max_size=4))
@example([(("model", "routed_scaling_factor"), 10**400)])  # found by the fuzzer: OverflowError
@example([(("model", "num_heads"), 2**31 - 1), (("parallel", "tp"), 7)])  # a divisor hint over 2^31 candidates
def test_config_values_give_a_clear_error_or_a_config(pairs):
    data: dict = {}
    for (section, name), value in pairs:
        data.setdefault(section, {})[name] = value
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        assert_clear(e, [name for (_, name), _ in pairs] + [section for (section, _), _ in pairs])
        return
    # whatever validates, the size estimates handle (no overflow, no division by zero)
    assert training_memory(cfg).total > 0 and "total trained" in summary(cfg.model)


@given(st.sampled_from(CONFIG_FIELDS), st.text(max_size=20), st.text(max_size=30))
@example(("model", "vocab_size"), "", "\n\t")  # found by the fuzzer: a message over two lines
def test_set_overrides_give_a_clear_error_or_a_config(field, suffix, raw):
    section, name = field
    for item in (f"{section}.{name}={raw}", f"{section}.{name}{suffix}", raw):
        try:
            load_config(None, [item])
        except ConfigError as e:
            assert_clear(e, ["--set", name, section])


@given(st.binary(max_size=60) | st.text(max_size=80).map(str.encode)
       | st.dictionaries(st.sampled_from(SECTIONS), VALUES, max_size=3).map(lambda d: json.dumps(d).encode()))
@example(b"\x80")  # found by the fuzzer: UnicodeDecodeError
@example(b'{"model": {"\\n": null}}')  # found by the fuzzer: a message over two lines
@example(b"{1: 2, a: 3}")  # keys that do not sort together
def test_config_files_give_a_clear_error_or_a_config(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(content)
        try:
            load_config(path)
        except ConfigError as e:
            assert "\n" not in str(e)


# ----------------------------------------------------------------------------------------------
# HF config.json

HF_BASE = to_hf_config(tiny_config(mtp_depth=1))
REMOVE = object()


@given(st.dictionaries(st.sampled_from(sorted(HF_BASE) + ["num_mtp_layers", "quantization_config"]),
                       VALUES | st.just(REMOVE) | st.sampled_from([{"type": "yarn", "factor": 4.0},
                                                                  {"quant_method": "fp8"}]), min_size=1, max_size=4))
def test_hf_config_fields_give_a_clear_error_or_a_model(changes):
    d = {k: v for k, v in {**HF_BASE, **changes}.items() if v is not REMOVE}
    try:
        from_hf_config(d)
    except ConfigError as e:
        # a field named by its HF name or, for ranges checked by dsmtp's validator, its model.* name
        assert_clear(e, list(changes) + ["model.", "rope_", "num_key_value_heads"])


@given(st.binary(max_size=60) | st.builds(lambda v: json.dumps(v).encode(), VALUES))
def test_config_json_files_give_a_clear_error_or_a_dict(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_bytes(content)
        try:
            read_hf_config(path)
        except ConfigError as e:
            assert_clear(e, [str(path)])


# ----------------------------------------------------------------------------------------------
# Server request bodies, through the server's request validation


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    model_file = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    model_file.write_bytes(train_tokenizer(vocab_size=64))
    engine = Engine(random_model(tiny_config(mtp_depth=1)), speculative_k=1)
    return Tokenizer.load(model_file), engine, ServeConfig(max_new_tokens=32)


BODIES = (st.binary(max_size=80)
          | st.builds(lambda d: json.dumps(d).encode(),
                      st.dictionaries(st.sampled_from(list(COMPLETION_FIELDS)),
                                      VALUES | TEXT | st.integers(0, 40), max_size=5))
          | st.builds(lambda prompt, body: json.dumps({"prompt": prompt, **body}).encode(),
                      TEXT, st.fixed_dictionaries({}, optional={"max_tokens": st.integers(-1, 40),
                                                                "temperature": NUMBERS, "top_p": NUMBERS,
                                                                "top_k": NUMBERS, "seed": NUMBERS,
                                                                "stop": VALUES, "stream": VALUES})))


@given(body=BODIES)
@example(b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}")  # found by the fuzzer: OverflowError
@example(b'{"prompt": "\\ud800x", "max_tokens": 2}')  # a lone surrogate the tokenizer cannot encode
def test_request_bodies_give_a_400_or_a_completion(serving, body):
    tokenizer, engine, limits = serving
    try:
        completion = parse_request(body, False, tokenizer, engine, limits, "tiny")
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message and "\n" not in e.message
        return
    assert isinstance(completion, CompletionRequest)
    assert 0 <= completion.max_tokens <= limits.max_new_tokens
    assert all(len(prompt) + completion.max_tokens <= engine.context for prompt in completion.prompts)
