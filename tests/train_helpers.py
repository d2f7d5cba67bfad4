"""A tiny model config and a small deterministic token stream for training-loop tests."""

from __future__ import annotations

from pathlib import Path

import torch

from dsmtp.config import Config, config_from_dict
from dsmtp.train.trainer import Data

TINY_MODEL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, first_k_dense_replace=1,
                  intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
                  mtp_depth=2, init_std=0.05)


def tiny_config(out_dir: Path, **train) -> Config:
    t = dict(out_dir=str(out_dir), seq_len=16, micro_batch_size=2, grad_accum=2, steps=6, lr=3e-3, min_lr=3e-4,
             warmup_steps=2, log_interval=1, eval_interval=3, eval_batches=2, save_interval=3, keep_last=2,
             mtp_weight_schedule=[[0, 0.3], [200, 0.1]], bias_update_schedule=[[0, 0.01], [300, 0.0]])
    t.update(train)
    return config_from_dict({"model": dict(TINY_MODEL), "train": t})


class TokenStream:
    """Stand-in for dsmtp.data.loader.TrainBatches: windows of a fixed pseudo-random corpus in a
    seeded order, with a checkpointable position."""

    def __init__(self, corpus: torch.Tensor, window: int, batch: int, seed: int):
        self.corpus, self.window, self.batch = corpus, window, batch
        n = (len(corpus) - 1) // window
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.position = 0

    def __next__(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch):
            start = int(self.order[self.position % len(self.order)]) * self.window
            rows.append(self.corpus[start:start + self.window])
            self.position += 1
        return torch.stack(rows)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def tiny_data(cfg: Config, tokenizer_path: Path) -> Data:
    """Repetitive text-like tokens (so a model can learn), a fixed val set, a placeholder tokenizer file."""
    g = torch.Generator().manual_seed(7)
    phrases = torch.randint(3, cfg.model.vocab_size, (12, 9), generator=g)
    corpus = phrases[torch.randint(0, 12, (400,), generator=g)].flatten()
    window = cfg.train.seq_len + cfg.model.mtp_depth + 1
    if not tokenizer_path.exists():
        tokenizer_path.write_bytes(b"placeholder tokenizer model")
    val = [corpus[i * window:(i + cfg.train.micro_batch_size) * window].view(-1, window)
           for i in range(0, cfg.train.eval_batches * cfg.train.micro_batch_size, cfg.train.micro_batch_size)]
    return Data(TokenStream(corpus, window, cfg.train.micro_batch_size, cfg.train.seed), val, tokenizer_path)
