"""`dsmtp import-hf HF_DIR OUT`: a HuggingFace DeepSeek-V3 checkpoint as a dsmtp checkpoint.

    dsmtp import-hf path/to/hf_model OUT [--config base.yaml] [--set parallel.tp=2 --set train.lr=1e-4]

OUT gets a dsmtp checkpoint of the weights (dsmtp.checkpoint: our names, float32, one chunk per expert projection;
config.yaml; tokenizer.model when HF_DIR has one; index.json and manifest.json). The model section of the
config comes from config.json; `--config` and `--set` choose everything else (parallel layout, training,
data). MTP layers (model.layers.{L..L+D-1}) come in when config.json declares them, parallel MTP heads
(mtp_heads.safetensors) when its dsmtp_parallel_mtp_heads entry does; block-fp8 checkpoints
(the released layout) are dequantized. Unsupported
config fields and missing or unknown tensors fail before anything is written, naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from dsmtp.checkpoint import MODEL, TOKENIZER, CheckpointWriter
from dsmtp.config import (Config, ConfigError, ModelConfig, TrainConfig, _merge, config_from_dict,
                          parse_overrides)
from dsmtp.convert import fp8, names
from dsmtp.convert.checkpoint_io import SafetensorsSource
from dsmtp.convert.hf_config import UnsupportedHFConfig, from_hf_config, read_hf_config
from dsmtp.io import atomic_directory

# Model fields a user may change on import: they do not change what the weights compute.
TRAINING_ONLY_MODEL_FIELDS = {"aux_loss_alpha", "init_std", "attention_backend", "router_dtype"}


def hf_weight_files(hf_dir: Path, m: ModelConfig) -> list[Path]:
    """The safetensors files of an HF export: the trunk's shards, and the parallel MTP heads' file."""
    trunk = hf_trunk_files(hf_dir)
    if m.mtp_kind != "parallel" or not m.mtp_depth:
        return trunk
    heads = hf_dir / names.PARALLEL_HEADS_FILE
    if not heads.is_file():
        raise FileNotFoundError(f"{hf_dir}/config.json declares {m.mtp_depth} parallel MTP heads but "
                                f"{names.PARALLEL_HEADS_FILE} is missing: copy it from the export")
    return trunk + [heads]


def hf_trunk_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
            if not all(isinstance(f, str) for f in files):
                raise TypeError("file names must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a 'weight_map' of tensor name -> file): "
                             f"{type(e).__name__}: {e}") from None
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {hf_dir}: {missing}")
        return [hf_dir / f for f in files]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors.index.json or model.safetensors (only safetensors "
                            "checkpoints can be imported)")


def import_config(hf_dir: Path, base_config: Optional[Path], overrides: list[str]) -> Config:
    config_json = hf_dir / "config.json"
    if not config_json.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json")
    try:
        model, _ = from_hf_config(read_hf_config(config_json))
    except UnsupportedHFConfig as e:  # its message names the field after "config.json: "
        raise UnsupportedHFConfig(f"{hf_dir}/{e}") from None
    base = yaml.safe_load(base_config.read_text()) if base_config else {}
    data = _merge(_merge(base or {}, {"model": dataclasses.asdict(model)}), parse_overrides(overrides))
    # Unless chosen, train on sequences the model's positions cover.
    data.setdefault("train", {}).setdefault("seq_len", min(TrainConfig.seq_len, model.max_position_embeddings))
    cfg = config_from_dict(data)
    changed = [f.name for f in dataclasses.fields(ModelConfig)
               if getattr(cfg.model, f.name) != getattr(model, f.name) and f.name not in TRAINING_ONLY_MODEL_FIELDS]
    if changed:
        raise ConfigError(f"--set model.{changed[0]}: the architecture comes from {config_json} and cannot be "
                          f"changed on import (only {sorted(TRAINING_ONLY_MODEL_FIELDS)} can)")
    return cfg


def expected_hf_shapes(m: ModelConfig, quantized: bool) -> dict[str, tuple[int, ...]]:
    """The HF tensors of this config; a block-fp8 checkpoint adds the scales of its fp8 projections."""
    shapes = names.hf_shapes(m)
    if not quantized:
        return shapes
    out = {}
    for name, shape in shapes.items():
        out[name] = shape
        if fp8.is_quantized(name):
            out[name + fp8.SCALE_SUFFIX] = fp8.scale_shape(shape)
    return out


def check_hf_tensors(found: dict[str, tuple[int, ...]], m: ModelConfig, hf_dir: Path, quantized: bool) -> None:
    names.check_shapes(expected_hf_shapes(m, quantized), found, f"{hf_dir} does not match its config.json")


def write_our_weights(source: SafetensorsSource, cfg: Config, out: Path, quantized: bool,
                      tokenizer: Optional[Path]) -> None:
    """Stream every HF tensor into a checkpoint in our (float32, stacked-expert) layout; MTP copies of the
    shared embedding and head must equal the originals, since our model holds them once. fp8 projections are
    dequantized."""
    m = cfg.model
    shapes = names.our_shapes(m)
    pieces = {MODEL + n: len(t.index) for n in shapes for t in names.hf_targets(n, m)[:1] if t.index}
    writer = CheckpointWriter(out, {MODEL + n: (torch.float32, s) for n, s in shapes.items()}, pieces)
    try:
        for hf_name in tqdm(names.hf_shapes(m), desc="import-hf", unit="tensor", file=sys.stderr):
            where = names.from_hf(hf_name, m)
            tensor = source.read(hf_name)
            if quantized and fp8.is_quantized(hf_name):
                tensor = fp8.dequantize(tensor, source.read(hf_name + fp8.SCALE_SUFFIX))
            if where.shared_copy:
                main = names.hf_targets(where.name, m)[0].hf_name
                if not torch.equal(tensor, source.read(main)):
                    raise ValueError(f"{hf_name} differs from {main}: dsmtp shares one embedding and output head "
                                     "between the trunk and its MTP modules, so it cannot import distinct copies")
                continue
            writer.write(MODEL + where.name, tensor.to(torch.float32), where.index)
    except BaseException:
        writer.abort()
        raise
    writer.finish(cfg, tokenizer)


def import_hf(hf_dir: Path, out: Path, base_config: Optional[Path] = None, overrides: Optional[list[str]] = None) -> Path:
    hf_dir, out = Path(hf_dir), Path(out)
    cfg = import_config(hf_dir, base_config, overrides or [])
    quantized = "quantization_config" in read_hf_config(hf_dir / "config.json")
    source = SafetensorsSource(hf_weight_files(hf_dir, cfg.model))
    check_hf_tensors(source.shapes(), cfg.model, hf_dir, quantized)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new output directory")
    tokenizer = hf_dir / TOKENIZER
    if not tokenizer.is_file():
        tokenizer = None
        print(f"note: {hf_dir} has no {TOKENIZER} (sentencepiece model); the checkpoint gets none and data "
              "preparation will train its own", file=sys.stderr)
    with atomic_directory(out) as tmp:
        write_our_weights(source, cfg, tmp, quantized, tokenizer)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsmtp import-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", type=Path, help="HF DeepSeek-V3 model directory (config.json + safetensors)")
    parser.add_argument("out", type=Path, help="new dsmtp checkpoint directory")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML with the non-model sections (parallel, train, data); model comes from config.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. parallel.tp=2 (repeatable)")
    args = parser.parse_args(argv)
    try:
        out = import_hf(args.hf_dir, args.out, args.config, args.set)
    except (ValueError, OSError) as e:  # a bad or damaged HF directory, config or output directory
        print(f"dsmtp import-hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
