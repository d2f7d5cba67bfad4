"""ModelConfig <-> HuggingFace DeepSeek-V3 config.json.

Export writes every field the released DeepSeek-V3 config has (so vLLM and SGLang read it as they read
the original, `rope_scaling` included) plus transformers 5's `rope_parameters`. Import reads what
transformers and the released checkpoints write and refuses, naming the field, anything our model
cannot represent exactly.
"""

from __future__ import annotations

from typing import Any, Optional

from dsmtp.config import ConfigError, ModelConfig, YarnConfig, validate_model
from dsmtp.convert.names import PARALLEL_HEADS_FILE

# Token ids of our sentencepiece tokenizer (fixed by the data pipeline).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# config.json's record of a parallel-head MTP export (Gloeckle et al.; not part of DeepSeek-V3's layout).
PARALLEL_HEADS_KEY = "dsmtp_parallel_mtp_heads"

TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp8": "bfloat16"}


class UnsupportedHFConfig(ConfigError):
    """The HF config uses a feature dsmtp's model does not have; the message names the field."""


def _rope_fields(m: ModelConfig) -> dict[str, Any]:
    if m.rope_scaling is None:
        return {"rope_theta": m.rope_theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}}
    y = m.rope_scaling
    yarn = {"type": "yarn", "rope_type": "yarn", "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim}
    params = {k: v for k, v in yarn.items() if k != "type"}
    return {"rope_theta": m.rope_theta, "rope_scaling": yarn, "rope_parameters": {**params, "rope_theta": m.rope_theta}}


def to_hf_config(m: ModelConfig, dtype: str = "bf16") -> dict[str, Any]:
    """config.json for an export in `dtype` (bf16 | fp32 | fp8)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "moe_intermediate_size": m.moe_intermediate_size,
        "num_hidden_layers": m.num_layers,
        # Parallel MTP heads are not DeepSeek-V3 layers: the trunk is a plain model, the heads are listed
        # under PARALLEL_HEADS_KEY and stored beside it (dsmtp.convert.names).
        "num_nextn_predict_layers": m.mtp_depth if m.mtp_kind == "sequential" else 0,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_heads,
        "n_shared_experts": m.n_shared_experts,
        "n_routed_experts": m.n_routed_experts,
        "ep_size": 1,
        "routed_scaling_factor": m.routed_scaling_factor,
        "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "v_head_dim": m.v_head_dim,
        "topk_method": "noaux_tc",
        "n_group": m.n_group,
        "topk_group": m.topk_group,
        "num_experts_per_tok": m.num_experts_per_tok,
        "moe_layer_freq": 1,
        "first_k_dense_replace": m.first_k_dense_replace,
        "norm_topk_prob": m.norm_topk_prob,
        "scoring_func": "sigmoid",
        "aux_loss_alpha": m.aux_loss_alpha,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.rms_norm_eps,
        "use_cache": True,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
        **_rope_fields(m),
        "rope_interleave": True,  # our rotary pairs are interleaved, as in the released weights
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        **({PARALLEL_HEADS_KEY: {"num_heads": m.mtp_depth, "file": PARALLEL_HEADS_FILE}}
           if m.mtp_kind == "parallel" and m.mtp_depth else {}),
    }


def generation_config(max_length: Optional[int] = None) -> dict[str, Any]:
    out = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False}
    if max_length is not None:
        out["max_length"] = max_length
    return out


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise UnsupportedHFConfig(f"config.json: {field}: {message}")


def _yarn(d: dict) -> Optional[YarnConfig]:
    scaling = d.get("rope_scaling") or d.get("rope_parameters") or {}
    field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    _require(kind == "yarn", f"{field}.rope_type", f"{kind!r} is not supported (dsmtp implements 'yarn' and 'default')")
    _require(scaling.get("attention_factor") is None, f"{field}.attention_factor",
             "an explicit attention factor is not supported (dsmtp derives it from mscale / mscale_all_dim)")
    _require(scaling.get("truncate", True), f"{field}.truncate", "only truncated correction ranges are supported")
    _require(scaling.get("factor") is not None, f"{field}.factor", "YaRN needs a factor")
    # Absent mscale / mscale_all_dim mean 0 to transformers (plain YaRN attention factor, no softmax scaling);
    # dsmtp's rope reads 0 the same way.
    return YarnConfig(
        factor=float(scaling["factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=float(scaling.get("mscale") or 0), mscale_all_dim=float(scaling.get("mscale_all_dim") or 0),
    )


def from_hf_config(d: dict[str, Any]) -> tuple[ModelConfig, Optional[dict]]:
    """(ModelConfig, quantization_config or None) from a config.json dict; raises UnsupportedHFConfig."""
    _require(d.get("model_type") == "deepseek_v3", "model_type",
             f"{d.get('model_type')!r}: only 'deepseek_v3' checkpoints can be imported")
    _require(d.get("scoring_func", "sigmoid") == "sigmoid", "scoring_func",
             f"{d.get('scoring_func')!r}: dsmtp's router scores with a sigmoid")
    _require(d.get("topk_method", "noaux_tc") == "noaux_tc", "topk_method",
             f"{d.get('topk_method')!r}: dsmtp routes with 'noaux_tc' (biased group-limited top-k)")
    _require(d.get("hidden_act", "silu") == "silu", "hidden_act", f"{d.get('hidden_act')!r}: dsmtp uses SwiGLU (silu)")
    _require(not d.get("attention_bias", False), "attention_bias", "dsmtp's attention projections have no bias")
    _require(not d.get("tie_word_embeddings", False), "tie_word_embeddings",
             "dsmtp keeps separate input embedding and output head")
    _require(d.get("rope_interleave", True), "rope_interleave",
             "false (rotate-half rope rows) would need a row permutation dsmtp does not apply")
    _require(d.get("moe_layer_freq", 1) == 1, "moe_layer_freq", f"{d.get('moe_layer_freq')}: only 1 is supported")
    heads = d["num_attention_heads"]
    _require(d.get("num_key_value_heads", heads) in (None, heads), "num_key_value_heads",
             f"{d.get('num_key_value_heads')} != num_attention_heads={heads}: MLA has no grouped KV heads")
    quant = d.get("quantization_config")
    if quant is not None:
        ok = (quant.get("quant_method") == "fp8" and quant.get("fmt", "e4m3") == "e4m3"
              and list(quant.get("weight_block_size") or []) == [128, 128])
        _require(ok, "quantization_config", f"{quant}: only block-wise fp8 (quant_method 'fp8', fmt 'e4m3', "
                 "weight_block_size [128, 128]) can be read; dequantize the checkpoint first")
    mtp_depth = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0
    mtp_kind = "sequential"
    parallel = d.get(PARALLEL_HEADS_KEY)
    if parallel is not None:
        _require(isinstance(parallel, dict) and isinstance(parallel.get("num_heads"), int) and parallel["num_heads"] > 0,
                 PARALLEL_HEADS_KEY, f"{parallel!r}: expected {{\"num_heads\": D >= 1, \"file\": ...}}")
        _require(mtp_depth == 0, "num_nextn_predict_layers",
                 f"{mtp_depth} with {PARALLEL_HEADS_KEY}: a model has sequential MTP layers or parallel heads, not both")
        mtp_kind, mtp_depth = "parallel", parallel["num_heads"]
    m = ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=heads,
        first_k_dense_replace=d.get("first_k_dense_replace") or 0,
        intermediate_size=d["intermediate_size"], moe_intermediate_size=d["moe_intermediate_size"],
        n_routed_experts=d["n_routed_experts"], n_shared_experts=d.get("n_shared_experts") or 0,
        num_experts_per_tok=d["num_experts_per_tok"], n_group=d.get("n_group") or 1,
        topk_group=d.get("topk_group") or 1, routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)), aux_loss_alpha=float(d.get("aux_loss_alpha", 0.0)),
        q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
        rope_theta=float(d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
        rope_scaling=_yarn(d), max_position_embeddings=d["max_position_embeddings"],
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), mtp_depth=int(mtp_depth), mtp_kind=mtp_kind,
        init_std=float(d.get("initializer_range", ModelConfig.init_std)),
    )
    validate_model(m)
    return m, quant
