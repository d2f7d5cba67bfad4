"""Our sentencepiece model as HF tokenizer files that `AutoTokenizer.from_pretrained` loads (a brought
HF tokenizer.json is saved as it is, `save_brought_tokenizer`).

transformers' `SpmConverter.build_tokenizer_from_spm_proto` rebuilds a `tokenizers` BPE from the
sentencepiece model's own settings (byte fallback, normalizer spec, dummy prefix, merges ranked by piece
score), so the fast tokenizer encodes text to the ids sentencepiece gives. No BOS/EOS is added on
encode, as our `Tokenizer.encode` adds none. tokenizer.model is copied too, for slow tokenizers and for
import back into dsmtp.

The model file is a protobuf; the few fields needed are read by `_parse` below so that the `protobuf`
package is not a dependency.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter

BPE_MODEL_TYPE = 2


def _fields(buf: bytes):
    """Yield (field number, value) of a protobuf message: ints for varints, bytes for length-delimited,
    raw 4/8 bytes for fixed-width fields."""
    i = 0

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            byte = buf[i]
            i += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            size = varint()
            yield number, buf[i:i + size]
            i += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, buf[i:i + width]
            i += width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _parse(data: bytes) -> SimpleNamespace:
    """The parts of sentencepiece's ModelProto that the converter reads (field numbers from
    sentencepiece_model.proto), with the proto's defaults."""
    pieces = []
    trainer = SimpleNamespace(model_type=1, byte_fallback=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                              unk_piece="<unk>")
    normalizer = SimpleNamespace(precompiled_charsmap=b"", add_dummy_prefix=True, remove_extra_whitespaces=True,
                                 escape_whitespaces=True)
    signed = {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    for number, value in _fields(data):
        if number == 1:
            piece = SimpleNamespace(piece="", score=0.0, type=1)
            for n, v in _fields(value):
                if n == 1:
                    piece.piece = v.decode()
                elif n == 2:
                    piece.score = struct.unpack("<f", v)[0]
                elif n == 3:
                    piece.type = v
            pieces.append(piece)
        elif number == 2:
            for n, v in _fields(value):
                if n == 3:
                    trainer.model_type = v
                elif n == 35:
                    trainer.byte_fallback = bool(v)
                elif n in signed:
                    setattr(trainer, signed[n], v - (1 << 64) if v >= 1 << 63 else v)
                elif n == 45:
                    trainer.unk_piece = v.decode()
        elif number == 3:
            for n, v in _fields(value):
                if n == 2:
                    normalizer.precompiled_charsmap = v
                elif n == 3:
                    normalizer.add_dummy_prefix = bool(v)
                elif n == 4:
                    normalizer.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    normalizer.escape_whitespaces = bool(v)
    return SimpleNamespace(pieces=pieces, trainer_spec=trainer, normalizer_spec=normalizer)


def write_hf_tokenizer(sp_model: Path, out_dir: Path, model_max_length: int) -> None:
    proto = _parse(Path(sp_model).read_bytes())
    if proto.trainer_spec.model_type != BPE_MODEL_TYPE:
        raise ValueError(f"{sp_model}: expected a sentencepiece BPE model (dsmtp's tokenizer)")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    spec = proto.trainer_spec

    def piece(index: int):
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=piece(spec.bos_id), eos_token=piece(spec.eos_id),
        pad_token=piece(spec.pad_id), unk_token=piece(spec.unk_id), model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        # sentencepiece encodes the text "<s>" as characters, never as the control token
        split_special_tokens=True,
    )
    tokenizer.save_pretrained(str(out_dir))
    shutil.copyfile(sp_model, Path(out_dir) / "tokenizer.model")


def save_brought_tokenizer(tokenizer, out_dir: Path, model_max_length: int) -> None:
    """A HuggingFace tokenizer.json the run was trained with (dsmtp.data.tokenizer.HFTokenizer), saved as
    transformers saves it, with the end-of-document token dsmtp used as its eos_token."""
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.model_path), eos_token=tokenizer.eos_token,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out_dir))
