"""Small configs shared by tests."""

from dsmtp.config import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    """>= 3 layers with a dense first layer, 8 routed experts in 4 groups, MLA with q_lora_rank."""
    fields = dict(vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, first_k_dense_replace=1,
                  intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=24, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64,
                  mtp_depth=2, init_std=0.02)
    fields.update(overrides)
    return ModelConfig(**fields)
