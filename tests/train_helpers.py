"""A tiny model and a tiny corpus prepared by the real `dsmtp prepare`, for training-loop tests."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from dsmtp.config import Config, config_from_dict
from dsmtp.data.prepare import prepare

TINY_MODEL = dict(vocab_size=384, hidden_size=32, num_layers=2, num_heads=2, first_k_dense_replace=1,
                  intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
                  mtp_depth=2, init_std=0.05)

TINY_TRAIN = dict(seq_len=16, micro_batch_size=2, grad_accum=2, steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                  log_interval=1, eval_interval=3, eval_batches=2, save_interval=3, keep_last=2,
                  mtp_weight_schedule=[[0, 0.3], [200, 0.1]], bias_update_schedule=[[0, 0.003], [300, 0.0]])


def tiny_data_config(data_dir: Path, include: tuple[str, ...] = ("email/*.py", "json/*.py")) -> dict:
    """A few real stdlib modules (a deterministic split leaves several files in val)."""
    return dict(source_dir=sysconfig.get_paths()["stdlib"], include=list(include), data_dir=str(data_dir),
                val_fraction=0.2, num_workers=1)


def prepare_tiny_corpus(data_dir: Path, **data) -> Path:
    cfg = config_from_dict({"model": TINY_MODEL, "train": {"seq_len": 16},
                            "data": {**tiny_data_config(data_dir), **data}})
    return prepare(cfg.data, cfg.model.vocab_size)


def tiny_config(out_dir: Path, data_dir: Path, model: dict | None = None, **train) -> Config:
    return config_from_dict({"model": {**TINY_MODEL, **(model or {})}, "data": tiny_data_config(data_dir),
                             "train": {**TINY_TRAIN, "out_dir": str(out_dir), **train}})
