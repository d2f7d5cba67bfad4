"""Load a model and its tokenizer for inference: a dsmtp checkpoint or a HuggingFace DeepSeek-V3 export.

A dsmtp checkpoint is a step directory, or a run's out_dir / checkpoints dir whose `latest` file names
one; dsmtp.checkpoint verifies it and reads it tensor by tensor, whatever sharded layout it was saved in.
A HuggingFace directory (config.json) is imported with dsmtp.convert.import_hf into a temporary
checkpoint first.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dsmtp.checkpoint import CheckpointError, load_model, resolve
from dsmtp.config import Config
from dsmtp.convert.import_hf import import_hf
from dsmtp.data.tokenizer import Tokenizer, tokenizer_file
from dsmtp.model import DeepSeekV3, kernels


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
    tokenizer = tokenizer_file(resolve(path))  # tokenizer.model, or a brought tokenizer.json
    if not tokenizer.is_file():
        raise CheckpointError(f"{tokenizer} is missing: generation needs the tokenizer the model was trained with")
    model, cfg = load_model(path, overrides=overrides)
    return model, cfg, Tokenizer.load(tokenizer, expected_vocab_size=cfg.model.vocab_size)


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
    # A checkpoint trained with attention_backend=flash still serves on a CPU (SDPA there).
    model.set_attention_backend(kernels.resolve_attention_backend(
        cfg.model.attention_backend if device.type == "cuda" else "sdpa", device))
    return model, cfg, tokenizer
