"""Shared by the HF parity and conversion tests: tiny configs, random models, checkpoints on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from dsmtp.checkpoint import open_checkpoint, save_weights
from dsmtp.config import Config, load_config
from dsmtp.model import DeepSeekV3, moe_layers
from dsmtp.parallel.topology import ensure_initialized

YARN = "{factor: 4.0, original_max_position_embeddings: 32, beta_fast: 32, beta_slow: 1, mscale: 0.9, mscale_all_dim: 1.1}"


def tiny_config(q_lora_rank: Optional[int] = 32, yarn: bool = True, mtp_depth: int = 1,
                mtp_kind: str = "sequential") -> Config:
    """3 layers (first dense), 8 routed experts in 4 groups (top-2 groups, top-3 experts): seconds on CPU.
    The YaRN mscale differs from mscale_all_dim so both the cos/sin factor and the softmax scale are exercised."""
    sets = ["model.vocab_size=384", "model.hidden_size=64", "model.num_heads=4", "model.num_layers=3",
            "model.first_k_dense_replace=1", "model.intermediate_size=128", "model.moe_intermediate_size=32",
            "model.n_routed_experts=8", "model.n_group=4", "model.topk_group=2", "model.num_experts_per_tok=3",
            f"model.q_lora_rank={'null' if q_lora_rank is None else q_lora_rank}", "model.kv_lora_rank=32",
            "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
            "model.max_position_embeddings=128", f"model.mtp_depth={mtp_depth}", f"model.mtp_kind={mtp_kind}", "model.init_std=0.05",
            f"model.rope_scaling={YARN if yarn else 'null'}", "train.seq_len=64"]
    return load_config("configs/tiny.yaml", sets)


def random_model(cfg: Config, seed: int = 0) -> DeepSeekV3:
    """A model whose norms and router biases are not at their initial values, so a mapping that drops or
    swaps them shows up in the logits."""
    ensure_initialized()
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg.model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
        for moe in moe_layers(model):
            moe.router.expert_bias.normal_(0.0, 0.05)
    return model


def save_checkpoint(model: DeepSeekV3, cfg: Config, ckpt: Path, tokenizer: Optional[Path] = None) -> Path:
    """A weights checkpoint of one process (dsmtp.checkpoint: one shard of full tensors)."""
    return save_weights(ckpt, cfg, model.state_dict(), tokenizer)


def random_tokens(cfg: Config, batch: int = 3, seq: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a dsmtp checkpoint, by our names (verified as read)."""
    _, tensors, _ = open_checkpoint(path)
    return {name: tensors.read(name) for name in tensors.shapes()}
