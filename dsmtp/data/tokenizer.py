"""The sentencepiece BPE tokenizer: lossless on any text, fixed special ids <pad>=0 <bos>=1 <eos>=2.

Lossless means decode(encode(x)) == x for every string: no normalization, no dummy prefix, no
whitespace folding, and byte fallback for characters outside the vocabulary. Newlines stay inside
the training sentences so that pieces like "):\n" are learned (code is mostly line ends).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import sentencepiece as spm

from dsmtp.data.errors import DataError

MODEL_FILE = "tokenizer.model"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# sentencepiece writes spaces as U+2581; a literal U+2581 in the text would come back as a space,
# so it is encoded as its UTF-8 bytes through the byte-fallback pieces instead.
SPACE_MARK = "\u2581"
SENTENCE_CHARS = 2048  # training sentences are chunks of whole lines up to this many characters
# sentencepiece's BPE trainer learns a different model for every thread count; one thread keeps the
# tokenizer a function of the corpus alone (identical on every machine and for any data.num_workers).
TRAINER_THREADS = 1


class Tokenizer:
    def __init__(self, model_path: Path):
        self.model_path = Path(model_path)
        data = self.model_path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=data)
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        if (self.pad_id, self.bos_id, self.eos_id) != (PAD_ID, BOS_ID, EOS_ID):
            raise DataError(
                f"{self.model_path}: special ids pad/bos/eos are {self.pad_id}/{self.bos_id}/{self.eos_id}, "
                f"dsmtp needs {PAD_ID}/{BOS_ID}/{EOS_ID}: rebuild it with `dsmtp prepare`"
            )
        self._space_mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]

    @classmethod
    def load(cls, path: Union[str, Path], expected_vocab_size: Optional[int] = None) -> "Tokenizer":
        """`path`: a tokenizer.model file or a data dir holding one. With `expected_vocab_size`, refuse
        a tokenizer whose vocabulary does not match the model's embedding."""
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise DataError(f"no tokenizer at {model_path}: run `dsmtp prepare --config CONFIG` first")
        try:
            tok = cls(model_path)
        except RuntimeError as e:  # sentencepiece's parse error
            raise DataError(f"{model_path} is not a sentencepiece model ({e}): rebuild it with `dsmtp prepare`") from None
        if expected_vocab_size is not None and tok.vocab_size != expected_vocab_size:
            raise DataError(
                f"tokenizer {model_path} has vocab size {tok.vocab_size} but model.vocab_size is "
                f"{expected_vocab_size}: set model.vocab_size={tok.vocab_size}, or re-run `dsmtp prepare` "
                f"with this config (and a data.data_dir of its own)"
            )
        return tok

    def encode(self, text: str) -> list[int]:
        if SPACE_MARK not in text:
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
        """Every token's bytes in decoded text, by id: `decode(ids)` is their concatenation read as UTF-8
        (a sentencepiece model with a dummy prefix, unlike dsmtp's, also drops a space at the very start).
        Control tokens (<pad>, <s>, </s>) have none; byte-fallback pieces are their byte."""
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
            split_by_whitespace=False,  # pieces may span spaces ("    return"): 9-17% fewer tokens on code
        )
    except RuntimeError as e:
        raise DataError(
            f"sentencepiece could not train a {vocab_size}-piece tokenizer on this corpus ({e}): change "
            "model.vocab_size as it says, or use a larger corpus (data.source_dir, data.include)"
        ) from None
    out_path.write_bytes(model.getvalue())
    return Tokenizer(out_path)
