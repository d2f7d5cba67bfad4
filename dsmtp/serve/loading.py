"""Load a model and its tokenizer for inference: a dsmtp checkpoint or a HuggingFace DeepSeek-V3 export.

A dsmtp checkpoint is a step directory (model.safetensors, config.yaml, tokenizer.model), or a run's
out_dir / checkpoints dir whose `latest` file names one (dsmtp.convert.checkpoint_io knows the layout).
A HuggingFace directory (config.json) is imported with dsmtp.convert.import_hf into a temporary
checkpoint first.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsmtp.config import Config, load_config
from dsmtp.convert.checkpoint_io import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, resolve_checkpoint_dir
from dsmtp.convert.import_hf import import_hf
from dsmtp.data.tokenizer import Tokenizer, tokenizer_file
from dsmtp.model import DeepSeekV3
from dsmtp.parallel.topology import ensure_initialized


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded; the message names the file and the fix."""


def utf8_text(text: str, what: str) -> str:
    """`text`, or a ValueError naming `what` when it holds a lone surrogate, which the tokenizer cannot
    encode: Python's stand-in for command-line bytes that are not UTF-8, or an unpaired JSON \\ud800 escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text: character {e.start} is the lone surrogate "
                         f"{text[e.start]!r} (bytes that are not UTF-8, or an unpaired \\ud800-\\udfff escape); "
                         "pass UTF-8 text") from None
    return text


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The corpus separates documents with <eos>, so a prompt starts a document after one."""
    return [tokenizer.eos_id] + tokenizer.encode(utf8_text(text, "prompt"))


def completion_text(tokenizer: Tokenizer, prompt: list[int], completion: list[int]) -> str:
    """The text of `completion` as it continues `prompt`. Decoding it alone would drop the space that
    sentencepiece marks on its first token; a few prompt tokens in front keep it."""
    context = prompt[-8:]
    return tokenizer.decode(context + completion)[len(tokenizer.decode(context)):]


def _load_dsmtp(path: Path, overrides: list[str]) -> tuple[DeepSeekV3, Config, Tokenizer]:
    ckpt = resolve_checkpoint_dir(path)
    cfg = load_config(ckpt / CONFIG_FILE, overrides)
    ensure_initialized()
    model = DeepSeekV3(cfg.model)
    result = model.load_state_dict(load_file(str(ckpt / MODEL_FILE)), strict=False)
    # megatron-core's linears add an empty `_extra_state` entry while loading: not a tensor of ours
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / MODEL_FILE} does not fit its config.yaml: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if not tokenizer_file(ckpt).is_file():
        raise CheckpointError(f"{ckpt / TOKENIZER_FILE} is missing: generation needs the tokenizer the model was "
                              "trained with")
    return model.eval(), cfg, Tokenizer.load(ckpt, expected_vocab_size=cfg.model.vocab_size)


def inference_device(name: str | torch.device) -> torch.device:
    """`--device` as a torch.device this machine has, or a ValueError saying what it has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device name: use cpu or cuda[:N]") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s): "
                         "use --device cpu or an index below that")
    return device


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         overrides: list[str] | None = None) -> tuple[DeepSeekV3, Config, Tokenizer]:
    """(model in eval mode on `device`, its Config with `overrides` applied, tokenizer).

    Raises CheckpointError (or the converters' and tokenizer's own ValueError / OSError) naming the
    file at fault."""
    path, device = Path(path), inference_device(device)
    if not path.exists():
        raise CheckpointError(f"--ckpt {path} does not exist")
    if (path / "config.json").is_file():
        with tempfile.TemporaryDirectory(prefix="dsmtp-hf-") as tmp:
            model, cfg, tokenizer = _load_dsmtp(import_hf(path, Path(tmp) / "ckpt", overrides=overrides), [])
    else:
        model, cfg, tokenizer = _load_dsmtp(path, overrides or [])
    model.to(device=device, dtype=dtype)
    return model, cfg, tokenizer
