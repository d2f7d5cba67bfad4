"""Load a model and its tokenizer for inference: a dsmtp checkpoint or a HuggingFace DeepSeek-V3 export.

dsmtp checkpoint (branch `train`'s layout): a step directory with model.safetensors, config.yaml and
tokenizer.model, or a run's out_dir / checkpoints dir whose `latest` file names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file

from dsmtp.config import Config, _merge, config_from_dict, config_to_dict, load_config, parse_overrides
from dsmtp.model import DeepSeekV3
from dsmtp.parallel.topology import ensure_initialized


class CheckpointError(ValueError):
    """The checkpoint path cannot be loaded; the message names the file and the fix."""


class TextTokenizer(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class _SentencePiece:
    """sentencepiece directly, for checkpoints read before dsmtp.data is available."""

    def __init__(self, path: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.eos_id = self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: Path) -> TextTokenizer:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint needs the tokenizer.model it was trained with")
    try:
        from dsmtp.data.tokenizer import Tokenizer
    except ImportError:  # branch `data` not merged yet
        return _SentencePiece(path)
    return Tokenizer.load(path)


def encode_prompt(tokenizer: TextTokenizer, text: str) -> list[int]:
    """The corpus separates documents with <eos>, so a prompt starts a document after one."""
    return [tokenizer.eos_id] + tokenizer.encode(text)


def completion_text(tokenizer: TextTokenizer, prompt: list[int], completion: list[int]) -> str:
    """The text of `completion` as it continues `prompt`. Decoding it alone would drop the space that
    sentencepiece marks on its first token; a few prompt tokens in front keep it."""
    context = prompt[-8:]
    return tokenizer.decode(context + completion)[len(tokenizer.decode(context)):]


def _resolve(path: Path) -> Path:
    """A step directory, or the newest one named by `latest` in path or path/checkpoints."""
    for root in (path, path / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            return root / latest.read_text().strip()
    return path


def _load_dsmtp(path: Path, overrides: list[str]) -> tuple[DeepSeekV3, Config, TextTokenizer]:
    ckpt = _resolve(path)
    weights, config = ckpt / "model.safetensors", ckpt / "config.yaml"
    for f in (weights, config):
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: --ckpt must be a checkpoint step directory "
                                  "(model.safetensors, config.yaml, tokenizer.model), a run's out_dir, or a HF export")
    cfg = load_config(config, overrides)
    ensure_initialized()
    model = DeepSeekV3(cfg.model)
    result = model.load_state_dict(load_file(str(weights)), strict=False)
    # megatron-core's linears add an empty `_extra_state` entry while loading: not a tensor of ours
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match {config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg, load_tokenizer(ckpt / "tokenizer.model")


def _load_hf(path: Path, overrides: list[str]) -> tuple[DeepSeekV3, Config, TextTokenizer]:
    try:
        from dsmtp.convert.import_hf import load_model as load_hf_model
    except ImportError as e:
        raise CheckpointError(f"{path} is a HuggingFace export; loading one needs dsmtp.convert.import_hf "
                              f"(branch `hf`), which is not available: {e}") from None
    model, cfg = load_hf_model(path)
    cfg = config_from_dict(_merge(config_to_dict(cfg), parse_overrides(overrides)))
    return model.eval(), cfg, load_tokenizer(path / "tokenizer.model")


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         overrides: list[str] | None = None) -> tuple[DeepSeekV3, Config, TextTokenizer]:
    """(model in eval mode on `device`, its Config with `overrides` applied, tokenizer)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--ckpt {path} does not exist")
    loader = _load_hf if (path / "config.json").is_file() else _load_dsmtp
    model, cfg, tokenizer = loader(path, overrides or [])
    model.to(device=device, dtype=dtype)
    return model, cfg, tokenizer
