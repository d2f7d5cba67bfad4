"""`dsmtp export-hf CKPT OUT`: write a HuggingFace DeepSeek-V3 checkpoint from a dsmtp checkpoint.

    dsmtp export-hf runs/tiny OUT [--dtype bf16|fp32] [--max-shard-size 5GB] [--fp8]

OUT gets config.json, generation_config.json, model-XXXXX-of-YYYYY.safetensors shards with
model.safetensors.index.json, and the tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model).
Tensors are streamed: each HF tensor (one expert at a time for stacked experts) is read from the source,
cast and written at its place in a shard laid out in advance, so peak memory is about one tensor.
Sequential MTP depth k becomes model.layers.{L+k-1}, with copies of the shared embedding and head, as
released. Parallel MTP heads go to mtp_heads.safetensors beside the trunk, which transformers, vLLM and
SGLang then load as a plain DeepSeek-V3 model (dsmtp.convert.names).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from dsmtp.checkpoint import TOKENIZER, open_checkpoint
from dsmtp.config import ModelConfig
from dsmtp.convert import fp8, names
from dsmtp.convert.checkpoint_io import TensorSource
from dsmtp.convert.hf_config import generation_config, to_hf_config
from dsmtp.convert.hf_tokenizer import save_brought_tokenizer, write_hf_tokenizer
from dsmtp.data.tokenizer import HF_FILE, Tokenizer, tokenizer_file
from dsmtp.safetensors_stream import SafetensorsWriter
from dsmtp.io import atomic_directory

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class PlannedTensor:
    hf_name: str
    source: str  # our tensor name
    index: tuple[int, ...]  # source[index]: leading indices into a stacked expert tensor, () for all of it
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str = "plain"  # plain | fp8 (quantized weight) | scale (its weight_scale_inv, right after it)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def parse_size(text: str) -> int:
    """'5GB', '500MB', '4096' -> bytes (decimal units, as transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    unit = m.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def check_source(source: TensorSource, cfg: ModelConfig, where: str) -> None:
    """Every tensor the config implies is there with its shape, and nothing else; else one clear error."""
    names.check_shapes(names.our_shapes(cfg), source.shapes(), f"{where} does not match its config")


def plan(cfg: ModelConfig, dtype: torch.dtype, quantize_fp8: bool = False) -> list[PlannedTensor]:
    """Every HF tensor in write order; the router bias stays float32, as released. With `quantize_fp8`, the
    projections the release stores in fp8 are followed by their block scales."""
    out = []
    for name, shape in names.our_shapes(cfg).items():
        for t in names.hf_targets(name, cfg):
            hf_shape = shape[len(t.index):]
            if quantize_fp8 and fp8.is_quantized(t.hf_name):
                out.append(PlannedTensor(t.hf_name, name, t.index, fp8.FP8, hf_shape, "fp8"))
                out.append(PlannedTensor(t.hf_name + fp8.SCALE_SUFFIX, name, t.index, torch.float32,
                                         fp8.scale_shape(hf_shape), "scale"))
                continue
            out.append(PlannedTensor(t.hf_name, name, t.index,
                                     torch.float32 if names.is_float32_in_hf(t.hf_name) else dtype, hf_shape))
    return out


def shard(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_hf_weights(source: TensorSource, cfg: ModelConfig, out: Path, dtype: torch.dtype, max_shard_bytes: int,
                     quantize_fp8: bool = False) -> None:
    planned = plan(cfg, dtype, quantize_fp8)
    heads = [t for t in planned if names.is_parallel_head(t.hf_name)]
    shards = shard([t for t in planned if not names.is_parallel_head(t.hf_name)], max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    write_files(source, out, list(zip(files, shards)) + ([(names.PARALLEL_HEADS_FILE, heads)] if heads else []))
    # The index lists the trunk's shards only: loaders of the DeepSeek-V3 layout would reject the heads' names.
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
             "weight_map": {t.hf_name: file for file, tensors in zip(files, shards) for t in tensors}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_files(source: TensorSource, out: Path, files: list[tuple[str, list[PlannedTensor]]]) -> None:
    """Write each file's planned tensors, in order, streaming one tensor at a time."""
    progress = tqdm(total=sum(len(tensors) for _, tensors in files), desc="export-hf", unit="tensor", file=sys.stderr)
    scale = None  # block scales of the fp8 weight just written; its scale tensor comes next (maybe in the next shard)
    for file, tensors in files:
        writer = SafetensorsWriter(out / file, {t.hf_name: (t.dtype, t.shape) for t in tensors}, {"format": "pt"})
        try:
            for t in tensors:
                if t.kind == "scale":
                    tensor = scale
                elif t.kind == "fp8":
                    tensor, scale = fp8.quantize(source.read(t.source, t.index))
                else:
                    tensor = source.read(t.source, t.index).to(t.dtype)
                writer.write(t.hf_name, tensor)
                progress.update()
        except BaseException:
            writer.abort()
            raise
        writer.close()
    progress.close()


def export(ckpt: Path, out: Path, dtype: str = "bf16", max_shard_bytes: int = 5 * 10**9,
           source: Optional[TensorSource] = None, quantize_fp8: bool = False) -> Path:
    """Export the checkpoint at `ckpt` (a step dir or a run dir; verified, read tensor by tensor in whatever
    sharded layout it was saved) to the HF directory `out`. With `quantize_fp8`, projections are stored in
    block-wise fp8 as released (the rest in `dtype`)."""
    cfg, ckpt_source, ckpt_dir = open_checkpoint(ckpt)
    source = source or ckpt_source
    check_source(source, cfg.model, str(ckpt_dir))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new output directory")
    with atomic_directory(out) as tmp:
        write_hf_weights(source, cfg.model, tmp, DTYPES[dtype], max_shard_bytes, quantize_fp8)
        config = to_hf_config(cfg.model, dtype)
        if quantize_fp8:
            config["quantization_config"] = dict(fp8.QUANTIZATION_CONFIG)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
        tokenizer = tokenizer_file(ckpt_dir)
        if tokenizer.name == HF_FILE:
            save_brought_tokenizer(Tokenizer.load(tokenizer), tmp, cfg.model.max_position_embeddings)
        elif tokenizer.is_file():
            write_hf_tokenizer(tokenizer, tmp, cfg.model.max_position_embeddings)
        else:
            print(f"note: {ckpt_dir} has no {TOKENIZER}; the export has no tokenizer files", file=sys.stderr)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsmtp export-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, help="checkpoint step directory, or a run's out_dir (uses latest)")
    parser.add_argument("out", type=Path, help="new HF model directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    parser.add_argument("--fp8", action="store_true",
                        help="store projections as e4m3 with 128x128 block weight_scale_inv, as released")
    args = parser.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.dtype, args.max_shard_size, quantize_fp8=args.fp8)
    except (ValueError, OSError) as e:  # a bad or damaged checkpoint, an unusable output directory
        print(f"dsmtp export-hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
