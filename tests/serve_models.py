"""Tiny models for the inference tests and benchmark: random ones, and one trained for a few seconds on
a repeated text so that its MTP modules draft well, saved in the checkpoint layout."""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece
import torch

from dsmtp.checkpoint import save_weights
from dsmtp.config import Config, ModelConfig, validate
from dsmtp.model import DeepSeekV3
from dsmtp.parallel.topology import ensure_initialized

WORDS = "the quick brown fox jumps over the lazy dog".split()


def tiny_config(vocab_size: int = 64, mtp_depth: int = 1, init_std: float = 0.2, num_layers: int = 2,
                hidden_size: int = 32, max_positions: int = 128, mtp_kind: str = "sequential") -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=2,
                       first_k_dense_replace=1, intermediate_size=2 * hidden_size,
                       moe_intermediate_size=hidden_size // 2,
                       n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                       q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                       max_position_embeddings=max_positions, mtp_depth=mtp_depth, mtp_kind=mtp_kind,
                       init_std=init_std)


def random_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> DeepSeekV3:
    ensure_initialized()
    torch.manual_seed(seed)
    return DeepSeekV3(cfg).to(dtype).eval()


def corpus_sentences(count: int) -> list[str]:
    """Rotations of one sentence: after its first word, every next token is determined."""
    return [" ".join(WORDS[i % 9:] + WORDS[:i % 9]) + "." for i in range(count)]


def train_tokenizer(vocab_size: int) -> bytes:
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_sentences(90)), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0, num_threads=1, minloglevel=2)
    return proto.getvalue()


def train_checkpoint(out: Path, steps: int = 300, mtp_depth: int = 2, num_layers: int = 2, hidden_size: int = 64,
                     seed: int = 0) -> Path:
    """Train a tiny model on the rotated sentences (documents separated by <eos>) and write a checkpoint
    step directory (dsmtp.checkpoint, weights only, with config.yaml and tokenizer.model)."""
    ensure_initialized()
    torch.manual_seed(seed)
    proto = train_tokenizer(vocab_size=64)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    stream = [t for s in corpus_sentences(400) for t in sp.encode(s) + [sp.eos_id()]]
    data = torch.tensor(stream)
    cfg = Config(model=tiny_config(vocab_size=sp.vocab_size(), mtp_depth=mtp_depth, init_std=0.02,
                                   num_layers=num_layers, hidden_size=hidden_size, max_positions=256))
    validate(cfg)
    model = DeepSeekV3(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    # Decayed to zero: at a constant 1e-2, where training happens to stop decided how well the MTP modules
    # draft (first-draft acceptance from 0.6 to 1.0 as the step count or rounding changed) and whether
    # greedy decoding completes the sentence; decayed over 300 steps, seeds 0-2 all complete it and
    # accept >= 0.93 of first drafts.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    seq_len, batch = 48, 16
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - mtp_depth - 1, (batch,))
        sample = torch.stack([data[s:s + seq_len + mtp_depth + 1] for s in starts])
        loss = model(sample[:, :seq_len], sample[:, 1:], mtp_weight=1.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    tokenizer = out.parent / f"{out.name}.tokenizer.model"
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.write_bytes(proto)
    return save_weights(out, cfg, model.state_dict(), tokenizer)
