"""ModelConfig <-> HuggingFace DeepSeek-V3 config.json.

Export writes every field the released DeepSeek-V3 config has (so vLLM and SGLang read it as they read
the original, `rope_scaling` included) plus transformers 5's `rope_parameters`. Import reads what
transformers and the released checkpoints write and refuses, naming the field, anything our model
cannot represent exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
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


_REQUIRED = object()
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object"}


def _get(d: dict, key: str, kind: type, default: Any = _REQUIRED, section: str = "") -> Any:
    """d[key] as `kind`; `default` when it is absent or null (required when no default is given). JSON
    numbers have their own type, so a string or a fractional count is refused, not parsed."""
    field, value = f"{section}{key}", d.get(key)
    if value is None:
        _require(default is not _REQUIRED, field, "null, a DeepSeek-V3 config.json gives it a value" if key in d
                 else "missing, a DeepSeek-V3 config.json has it")
        return default
    if kind is int:
        whole_float = isinstance(value, float) and value.is_integer()
        ok = (isinstance(value, int) and not isinstance(value, bool)) or whole_float
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e308
    else:
        ok = isinstance(value, kind)
    _require(ok, field, f"expected {_KINDS[kind]}, got {json.dumps(value)[:80]}")
    return kind(value) if kind in (int, float) else value


def read_hf_config(path: Path) -> dict[str, Any]:
    """The JSON object in a config.json, or a ConfigError naming the file."""
    try:
        d = json.loads(Path(path).read_bytes())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): export the model's config again") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object of model settings, got {json.dumps(d)[:80]}")
    return d


def _yarn(d: dict) -> Optional[YarnConfig]:
    field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    scaling = _get(d, field, dict, {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    _require(kind == "yarn", f"{field}.rope_type", f"{kind!r} is not supported (dsmtp implements 'yarn' and 'default')")
    _require(scaling.get("attention_factor") is None, f"{field}.attention_factor",
             "an explicit attention factor is not supported (dsmtp derives it from mscale / mscale_all_dim)")
    _require(scaling.get("truncate", True), f"{field}.truncate", "only truncated correction ranges are supported")
    section = f"{field}."
    # Absent mscale / mscale_all_dim mean 0 to transformers (plain YaRN attention factor, no softmax scaling);
    # dsmtp's rope reads 0 the same way.
    return YarnConfig(
        factor=_get(scaling, "factor", float, section=section),
        original_max_position_embeddings=_get(scaling, "original_max_position_embeddings", int, section=section),
        beta_fast=_get(scaling, "beta_fast", float, 0.0, section) or 32.0,
        beta_slow=_get(scaling, "beta_slow", float, 0.0, section) or 1.0,
        mscale=_get(scaling, "mscale", float, 0.0, section),
        mscale_all_dim=_get(scaling, "mscale_all_dim", float, 0.0, section),
    )


def from_hf_config(d: dict[str, Any]) -> tuple[ModelConfig, Optional[dict]]:
    """(ModelConfig, quantization_config or None) from a config.json dict; raises UnsupportedHFConfig (a
    ConfigError) naming the field for anything dsmtp cannot read or represent."""
    _require(isinstance(d, dict), "(top level)", f"expected a JSON object, got {json.dumps(d)[:80]}")
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
    heads = _get(d, "num_attention_heads", int)
    _require(d.get("num_key_value_heads", heads) in (None, heads), "num_key_value_heads",
             f"{d.get('num_key_value_heads')} != num_attention_heads={heads}: MLA has no grouped KV heads")
    quant = _get(d, "quantization_config", dict, None)
    if quant is not None:
        ok = (quant.get("quant_method") == "fp8" and quant.get("fmt", "e4m3") == "e4m3"
              and quant.get("weight_block_size") == [128, 128])
        _require(ok, "quantization_config", f"{quant}: only block-wise fp8 (quant_method 'fp8', fmt 'e4m3', "
                 "weight_block_size [128, 128]) can be read; dequantize the checkpoint first")
    rope_parameters = _get(d, "rope_parameters", dict, {})
    mtp_depth = _get(d, "num_nextn_predict_layers" if "num_nextn_predict_layers" in d else "num_mtp_layers", int, 0)
    mtp_kind = "sequential"
    parallel = _get(d, PARALLEL_HEADS_KEY, dict, None)
    if parallel is not None:
        heads_count = _get(parallel, "num_heads", int, section=f"{PARALLEL_HEADS_KEY}.")
        _require(heads_count >= 1, f"{PARALLEL_HEADS_KEY}.num_heads", f"{heads_count}: must be >= 1")
        _require(mtp_depth == 0, "num_nextn_predict_layers",
                 f"{mtp_depth} with {PARALLEL_HEADS_KEY}: a model has sequential MTP layers or parallel heads, not both")
        mtp_kind, mtp_depth = "parallel", heads_count
    m = ModelConfig(
        vocab_size=_get(d, "vocab_size", int), hidden_size=_get(d, "hidden_size", int),
        num_layers=_get(d, "num_hidden_layers", int), num_heads=heads,
        first_k_dense_replace=_get(d, "first_k_dense_replace", int, 0),
        intermediate_size=_get(d, "intermediate_size", int),
        moe_intermediate_size=_get(d, "moe_intermediate_size", int),
        n_routed_experts=_get(d, "n_routed_experts", int), n_shared_experts=_get(d, "n_shared_experts", int, 0),
        num_experts_per_tok=_get(d, "num_experts_per_tok", int), n_group=_get(d, "n_group", int, 0) or 1,
        topk_group=_get(d, "topk_group", int, 0) or 1,
        routed_scaling_factor=_get(d, "routed_scaling_factor", float, 1.0),
        norm_topk_prob=_get(d, "norm_topk_prob", bool, True), aux_loss_alpha=_get(d, "aux_loss_alpha", float, 0.0),
        q_lora_rank=_get(d, "q_lora_rank", int, None), kv_lora_rank=_get(d, "kv_lora_rank", int),
        qk_nope_head_dim=_get(d, "qk_nope_head_dim", int), qk_rope_head_dim=_get(d, "qk_rope_head_dim", int),
        v_head_dim=_get(d, "v_head_dim", int),
        rope_theta=_get(d, "rope_theta", float, 0.0)
        or _get(rope_parameters, "rope_theta", float, 0.0, "rope_parameters.") or 10000.0,
        rope_scaling=_yarn(d), max_position_embeddings=_get(d, "max_position_embeddings", int),
        rms_norm_eps=_get(d, "rms_norm_eps", float, 1e-6),
        mtp_depth=mtp_depth, mtp_kind=mtp_kind,
        init_std=_get(d, "initializer_range", float, ModelConfig.init_std),
    )
    try:
        validate_model(m)
    except ConfigError as e:
        raise UnsupportedHFConfig(f"config.json: {e}") from None
    return m, quant
