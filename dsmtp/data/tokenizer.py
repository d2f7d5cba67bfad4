"""Tokenizers: dsmtp's own sentencepiece BPE (trained by `dsmtp prepare`), or one a user brings.

dsmtp's own model is lossless: decode(encode(x)) == x for every string: no normalization, no dummy
prefix, no whitespace folding, and byte fallback for characters outside the vocabulary, with fixed
special ids <pad>=0 <bos>=1 <eos>=2. Newlines stay inside the training sentences so that pieces like
"):\n" are learned (code is mostly line ends).

A brought tokenizer (`data.tokenizer: PATH`) is a sentencepiece model or a HuggingFace `tokenizer.json`
(run by the `tokenizers` library, as transformers' fast tokenizers are). Either needs an end-of-document
token, which separates documents in the shards: sentencepiece's eos piece; for tokenizer.json, the
`eos_token` of the `tokenizer_config.json` beside it (where transformers keeps it), else the first of
END_OF_TEXT that is one of its special tokens. Neither kind adds BOS/EOS on encode.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import sentencepiece as spm

from dsmtp.data.errors import DataError

MODEL_FILE = "tokenizer.model"  # a sentencepiece model, in a data dir and a checkpoint
HF_FILE = "tokenizer.json"  # a HuggingFace tokenizer, in place of MODEL_FILE
HF_CONFIG_FILE = "tokenizer_config.json"  # beside HF_FILE (its eos_token), copied with it
END_OF_TEXT = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<\uff5cend\u2581of\u2581sentence\uff5c>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# sentencepiece writes spaces as U+2581; a literal U+2581 in the text would come back as a space,
# so it is encoded as its UTF-8 bytes through the byte-fallback pieces instead.
SPACE_MARK = "\u2581"
SENTENCE_CHARS = 2048  # training sentences are chunks of whole lines up to this many characters
# sentencepiece's BPE trainer learns a different model for every thread count; one thread keeps the
# tokenizer a function of the corpus alone (identical on every machine and for any data.num_workers).
TRAINER_THREADS = 1


def tokenizer_file(path: Union[str, Path]) -> Path:
    """The tokenizer file `path` names: itself, or the MODEL_FILE or HF_FILE inside a directory."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, HF_FILE):
            if (path / name).is_file():
                return path / name
        return path / MODEL_FILE
    return path


def tokenizer_files(model_path: Path) -> list[Path]:
    """The files that travel with a tokenizer (into a data dir, a checkpoint): a tokenizer.json takes the
    tokenizer_config.json beside it, where there is one."""
    config = Path(model_path).with_name(HF_CONFIG_FILE)
    return [Path(model_path)] + ([config] if Path(model_path).suffix == ".json" and config.is_file() else [])


class Tokenizer:
    """What dsmtp needs of a tokenizer; `Tokenizer.load` opens either kind."""

    model_path: Path  # the file that identifies it: its sha256 is the tokenizer's identity
    sha256: str
    vocab_size: int  # every id is below it: the model's embedding needs this many rows
    eos_id: int  # ends each document in the shards, and starts a prompt

    @classmethod
    def load(cls, path: Union[str, Path], expected_vocab_size: Optional[int] = None) -> "Tokenizer":
        """`path`: a tokenizer.model or tokenizer.json, or a directory holding one (a data dir, a
        checkpoint). With `expected_vocab_size`, refuse a tokenizer whose vocabulary does not match the
        model's embedding."""
        model_path = tokenizer_file(path)
        if not model_path.is_file():
            raise DataError(f"no tokenizer at {model_path}: run `dsmtp prepare --config CONFIG` first")
        tok = HFTokenizer(model_path) if model_path.suffix == ".json" else SentencePieceTokenizer.open(model_path)
        if expected_vocab_size is not None and tok.vocab_size != expected_vocab_size:
            raise DataError(
                f"tokenizer {model_path} has vocab size {tok.vocab_size} but model.vocab_size is "
                f"{expected_vocab_size}: set model.vocab_size={tok.vocab_size}, or re-run `dsmtp prepare` "
                f"with this config (and a data.data_dir of its own)"
            )
        return tok

    @property
    def files(self) -> list[Path]:
        return tokenizer_files(self.model_path)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def token_bytes(self) -> list[bytes]:
        """Every token's bytes in decoded text, by id: `decode(ids)` is their concatenation read as UTF-8
        (a sentencepiece model with a dummy prefix, unlike dsmtp's, also drops a space at the very start).
        Special tokens (<pad>, <s>, </s>) have none."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: Path):
        self.model_path = Path(model_path)
        data = self.model_path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=data)
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"{self.model_path}: this sentencepiece model has no eos piece, and dsmtp ends every "
                            "document with one: use a model trained with an eos_id, or data.tokenizer=train")
        self._space_mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        self._byte_fallback = self._sp.unk_id() not in self._space_mark_ids

    @classmethod
    def open(cls, model_path: Path) -> "SentencePieceTokenizer":
        try:
            return cls(model_path)
        except RuntimeError as e:  # sentencepiece's parse error
            raise DataError(f"{model_path} is not a sentencepiece model ({e}): give a tokenizer.model or a "
                            "tokenizer.json (or data.tokenizer=train) and run `dsmtp prepare`") from None

    def encode(self, text: str) -> list[int]:
        if SPACE_MARK not in text or not self._byte_fallback:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARK)):
            if i:
                ids.extend(self._space_mark_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def token_bytes(self) -> list[bytes]:
        table = []
        for i in range(self.vocab_size):
            piece = self._sp.id_to_piece(i)
            if self._sp.is_control(i):
                table.append(b"")
            elif self._sp.is_byte(i):  # "<0xAB>"
                table.append(bytes([int(piece[3:5], 16)]))
            elif self._sp.is_unknown(i):
                table.append(self._sp.decode([i]).encode())
            else:
                table.append(piece.replace(SPACE_MARK, " ").encode())
        return table


class HFTokenizer(Tokenizer):
    """A HuggingFace tokenizer.json, run by the `tokenizers` library (what AutoTokenizer runs)."""

    def __init__(self, model_path: Path):
        from tokenizers import Tokenizer as Backend  # a dependency of transformers

        self.model_path = Path(model_path)
        data = self.model_path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            self._tok = Backend.from_str(data.decode("utf-8"))
            decoder = json.loads(data).get("decoder")
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise DataError(f"{self.model_path} is not a HuggingFace tokenizer.json ({str(e)[:200]}): give the "
                            "tokenizer.json that transformers' save_pretrained writes") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self._special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        self.eos_id = vocab[self._eos_token()]
        self._byte_level = '"ByteLevel"' in json.dumps(decoder)

    @property
    def config_path(self) -> Path:
        return self.model_path.with_name(HF_CONFIG_FILE)

    @property
    def eos_token(self) -> str:
        return self._tok.id_to_token(self.eos_id)

    def _eos_token(self) -> str:
        if self.config_path.is_file():
            try:
                eos = json.loads(self.config_path.read_text()).get("eos_token")
            except (ValueError, AttributeError) as e:
                raise DataError(f"{self.config_path} is not a JSON object ({e}): fix it or remove it") from None
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos is not None:
                if self._tok.token_to_id(eos) is None:
                    raise DataError(f"{self.config_path}: eos_token {eos!r} is not in the vocabulary of "
                                    f"{self.model_path}: fix eos_token")
                return eos
        for eos in END_OF_TEXT:
            if eos in self._special:
                return eos
        raise DataError(f"{self.model_path}: no end-of-document token (none of {list(END_OF_TEXT)} is among its "
                        f"special tokens, and no {HF_CONFIG_FILE} beside it names an eos_token); dsmtp ends every "
                        f"document with one: put a {HF_CONFIG_FILE} with {{\"eos_token\": \"...\"}} beside it")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def token_bytes(self) -> list[bytes]:
        to_byte = {c: b for b, c in _byte_level_alphabet().items()}
        table = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or piece in self._special:
                table.append(b"")
            elif self._byte_level and all(c in to_byte for c in piece):  # one printable character per byte
                table.append(bytes(to_byte[c] for c in piece))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
                table.append(bytes([int(piece[3:5], 16)]))
            else:  # added tokens, and sentencepiece-style pieces (Metaspace)
                table.append(piece.replace(SPACE_MARK, " ").encode())
        return table


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenizers write)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    unprintable = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + unprintable.index(b)) for b in range(256)}


def training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Cut documents into chunks of whole lines (newlines kept) of at most SENTENCE_CHARS characters."""
    for text in texts:
        text = text.replace(SPACE_MARK, " ")
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            while len(line) > SENTENCE_CHARS:  # a very long line (data tables): hard split
                yield line[:SENTENCE_CHARS]
                line = line[SENTENCE_CHARS:]
            if size + len(line) > SENTENCE_CHARS and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            yield "".join(chunk)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: Path) -> Tokenizer:
    """Train a BPE model on `texts` and write it to `out_path` (the caller's temporary build dir)."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            byte_fallback=True,
            character_coverage=0.9999,  # rare characters go to bytes instead of taking vocab slots
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,  # indentation runs become single pieces
            split_digits=True,
            max_sentence_length=4 * SENTENCE_CHARS,  # bytes; chunks are at most SENTENCE_CHARS characters
            input_sentence_size=0,  # the caller already sampled the input
            num_threads=TRAINER_THREADS,
            minloglevel=2,
            split_by_whitespace=False,  # pieces may span spaces ("    return"): fewer tokens on code
        )
    except RuntimeError as e:
        raise DataError(
            f"sentencepiece could not train a {vocab_size}-piece tokenizer on this corpus ({e}): change "
            "model.vocab_size as it says, or use a larger corpus (data.sources, or data.source_dir and data.include)"
        ) from None
    out_path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(out_path)
