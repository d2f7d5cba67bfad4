"""Parameter names and shapes: ours <-> HuggingFace DeepSeek-V3 checkpoint names, from the config alone.

The mapping is pure (no file access, no model built) so that converters can stream one tensor at a
time and tests can list the 671B layout without allocating it.

    ours                                  HF checkpoint (per-expert names, as released)
    embed.weight                          model.embed_tokens.weight  (+ model.layers.{L+k}.embed_tokens.weight copies)
    head.weight                           lm_head.weight             (+ model.layers.{L+k}.shared_head.head.weight copies)
    norm.weight                           model.norm.weight
    layers.{i}.<layer>                    model.layers.{i}.<layer'>
    mtp.{k}.{enorm,hnorm,eh_proj}.weight  model.layers.{L+k}.{enorm,hnorm,eh_proj}.weight
    mtp.{k}.norm.weight                   model.layers.{L+k}.shared_head.norm.weight
    mtp.{k}.layer.<layer>                 model.layers.{L+k}.<layer'>
    ...ffn.experts.w13[e, 0]/[e, 1]       ...mlp.experts.{e}.gate_proj/up_proj.weight (w13 [E, 2, I, H])
    ...ffn.experts.w2[e]                  ...mlp.experts.{e}.down_proj.weight (w2 [E, H, I])

L is num_layers and k the 0-based MTP index (depth k+1). RoPE rows need no permutation: both sides use
DeepSeek's interleaved layout.

Parallel heads (model.mtp_kind: parallel) have no place in the DeepSeek-V3 layout: the trunk is
exported as a plain model (num_nextn_predict_layers 0) and the heads go to a file of their own,
PARALLEL_HEADS_FILE, beside the trunk's shards:

    mtp.{k}.layer.<layer>                 mtp_heads.{k}.<layer'>
    mtp.{k}.norm.weight                   mtp_heads.{k}.norm.weight
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from dsmtp.config import ModelConfig

# Inside one transformer layer: our suffix -> HF suffix (stacked experts are handled separately).
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
# Stacked routed experts: HF projection -> (our tensor, its index after the expert's).
_EXPERTS = {"gate_proj": ("ffn.experts.w13", (0,)), "up_proj": ("ffn.experts.w13", (1,)),
            "down_proj": ("ffn.experts.w2", ())}
_STACKED = {ours for ours, _ in _EXPERTS.values()}
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "norm.weight": "shared_head.norm.weight"}
PARALLEL_HEADS_FILE = "mtp_heads.safetensors"
PARALLEL_HEADS_PREFIX = "mtp_heads."

_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight", "norm.weight": "model.norm.weight"}
# Per-MTP-layer copies of the shared embedding and head, as the released checkpoint stores them.
_SHARED_COPIES = {"embed.weight": "embed_tokens.weight", "head.weight": "shared_head.head.weight"}

_LAYER_INV = {v: k for k, v in _LAYER.items()}
_MTP_OWN_INV = {v: k for k, v in _MTP_OWN.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}
_SHARED_COPIES_INV = {v: k for k, v in _SHARED_COPIES.items()}


class HFTarget(NamedTuple):
    """One HF tensor made from one of ours: ours[index], `index` the leading indices into a stacked expert
    tensor (the expert, then gate or up for w13), () for a whole tensor."""
    hf_name: str
    index: tuple[int, ...] = ()


class OurSource(NamedTuple):
    """Where an HF tensor lives in our model: name[index]. `shared_copy`: an MTP layer's copy of the shared
    embedding or head (our model holds it once)."""
    name: str
    index: tuple[int, ...] = ()
    shared_copy: bool = False


class UnknownTensorError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _layer_targets(suffix: str, prefix: str, cfg: ModelConfig) -> list[HFTarget]:
    if suffix in _STACKED:
        return [HFTarget(f"{prefix}.mlp.experts.{e}.{projection}.weight", (e, *index))
                for e in range(cfg.n_routed_experts) for projection, (ours, index) in _EXPERTS.items() if ours == suffix]
    if suffix in _LAYER:
        return [HFTarget(f"{prefix}.{_LAYER[suffix]}")]
    raise UnknownTensorError(f"no HF name for layer tensor {suffix!r}")


def hf_targets(name: str, cfg: ModelConfig) -> list[HFTarget]:
    """The HF tensors that one of our tensors becomes (several for stacked experts and shared copies)."""
    sequential = cfg.mtp_kind == "sequential"
    if name in _TOP:
        copies = [HFTarget(f"model.layers.{cfg.num_layers + k}.{_SHARED_COPIES[name]}")
                  for k in range(cfg.mtp_depth)] if name in _SHARED_COPIES and sequential else []
        return [HFTarget(_TOP[name])] + copies
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and int(m.group(1)) < cfg.num_layers:
        return _layer_targets(m.group(2), f"model.layers.{m.group(1)}", cfg)
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if m and int(m.group(1)) < cfg.mtp_depth and not sequential:
        prefix, suffix = f"{PARALLEL_HEADS_PREFIX}{m.group(1)}", m.group(2)
        if suffix == "norm.weight":
            return [HFTarget(f"{prefix}.norm.weight")]
        if suffix.startswith("layer."):
            return _layer_targets(suffix[len("layer."):], prefix, cfg)
    if m and int(m.group(1)) < cfg.mtp_depth and sequential:
        prefix = f"model.layers.{cfg.num_layers + int(m.group(1))}"
        suffix = m.group(2)
        if suffix in _MTP_OWN:
            return [HFTarget(f"{prefix}.{_MTP_OWN[suffix]}")]
        if suffix.startswith("layer."):
            return _layer_targets(suffix[len("layer."):], prefix, cfg)
    raise UnknownTensorError(f"{name!r} is not a parameter of this model (num_layers={cfg.num_layers}, "
                             f"mtp_depth={cfg.mtp_depth})")


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One of our tensors -> [(hf_name, tensor)]; stacked experts are split per expert (views, no copy)."""
    return [(t.hf_name, tensor[t.index]) for t in hf_targets(name, cfg)]


def from_hf(hf_name: str, cfg: ModelConfig) -> OurSource:
    """An HF checkpoint name -> where it lives in our model."""
    if hf_name in _TOP_INV:
        return OurSource(_TOP_INV[hf_name])
    m = re.fullmatch(r"mtp_heads\.(\d+)\.(.+)", hf_name)
    if m and cfg.mtp_kind == "parallel" and int(m.group(1)) < cfg.mtp_depth:
        head, suffix = m.group(1), m.group(2)
        if suffix == "norm.weight":
            return OurSource(f"mtp.{head}.norm.weight")
        return _from_hf_layer(suffix, f"mtp.{head}.layer.", cfg, hf_name)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m:
        index, suffix = int(m.group(1)), m.group(2)
        mtp = index - cfg.num_layers
        if mtp >= (cfg.mtp_depth if cfg.mtp_kind == "sequential" else 0):
            raise UnknownTensorError(
                f"{hf_name!r}: layer {index} is beyond num_hidden_layers={cfg.num_layers} + "
                f"num_nextn_predict_layers={cfg.mtp_depth}")
        prefix = f"layers.{index}." if mtp < 0 else f"mtp.{mtp}.layer."
        if mtp >= 0 and suffix in _MTP_OWN_INV:
            return OurSource(f"mtp.{mtp}.{_MTP_OWN_INV[suffix]}")
        if mtp >= 0 and suffix in _SHARED_COPIES_INV:
            return OurSource(_SHARED_COPIES_INV[suffix], shared_copy=True)
        return _from_hf_layer(suffix, prefix, cfg, hf_name)
    raise UnknownTensorError(f"{hf_name!r} is not a DeepSeek-V3 tensor this converter knows (for this config)")


def _from_hf_layer(suffix: str, prefix: str, cfg: ModelConfig, hf_name: str) -> OurSource:
    """A transformer layer's HF tensor (`suffix` after the layer's prefix) -> ours under `prefix`."""
    if suffix in _LAYER_INV:
        return OurSource(prefix + _LAYER_INV[suffix])
    e = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", suffix)
    if e and int(e.group(1)) < cfg.n_routed_experts:
        ours, index = _EXPERTS[e.group(2)]
        return OurSource(prefix + ours, (int(e.group(1)), *index))
    raise UnknownTensorError(f"{hf_name!r} is not a DeepSeek-V3 tensor this converter knows (for this config)")


# ----------------------------------------------------------------------------------------------
# Shapes from the config alone


def _layer_shapes(cfg: ModelConfig, layer_id: int) -> dict[str, tuple[int, ...]]:
    h, heads = cfg.hidden_size, cfg.num_heads
    s: dict[str, tuple[int, ...]] = {"attn_norm.weight": (h,)}
    if cfg.q_lora_rank is None:
        s["attn.wq.weight"] = (heads * cfg.qk_head_dim, h)
    else:
        s["attn.wq_a.weight"] = (cfg.q_lora_rank, h)
        s["attn.q_norm.weight"] = (cfg.q_lora_rank,)
        s["attn.wq_b.weight"] = (heads * cfg.qk_head_dim, cfg.q_lora_rank)
    s["attn.wkv_a.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
    s["attn.kv_norm.weight"] = (cfg.kv_lora_rank,)
    s["attn.wkv_b.weight"] = (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    s["attn.wo.weight"] = (h, heads * cfg.v_head_dim)
    s["ffn_norm.weight"] = (h,)
    if layer_id < cfg.first_k_dense_replace:
        i = cfg.intermediate_size
        s.update({"ffn.w1.weight": (i, h), "ffn.w3.weight": (i, h), "ffn.w2.weight": (h, i)})
        return s
    e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
    s.update({"ffn.router.weight": (e, h), "ffn.router.expert_bias": (e,),
              "ffn.experts.w13": (e, 2, i, h), "ffn.experts.w2": (e, h, i)})
    if cfg.n_shared_experts > 0:
        si = i * cfg.n_shared_experts
        s.update({"ffn.shared_experts.w1.weight": (si, h), "ffn.shared_experts.w3.weight": (si, h),
                  "ffn.shared_experts.w2.weight": (h, si)})
    return s


def our_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of our state dict (parameters and the router bias buffer) with its shape, in model order."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in _layer_shapes(cfg, i).items()})
    shapes["norm.weight"] = (h,)
    shapes["head.weight"] = (cfg.vocab_size, h)
    for k in range(cfg.mtp_depth):
        if cfg.mtp_kind == "sequential":
            shapes.update({f"mtp.{k}.enorm.weight": (h,), f"mtp.{k}.hnorm.weight": (h,),
                           f"mtp.{k}.eh_proj.weight": (h, 2 * h)})
        # An MTP layer is of the same kind as the trunk's last layer.
        shapes.update({f"mtp.{k}.layer.{n}": v for n, v in _layer_shapes(cfg, cfg.num_layers - 1).items()})
        shapes[f"mtp.{k}.norm.weight"] = (h,)
    return shapes


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint with its shape, in the order the exporter writes them."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in our_shapes(cfg).items():
        for t in hf_targets(name, cfg):
            out[t.hf_name] = shape[len(t.index):]
    return out


def is_parallel_head(hf_name: str) -> bool:
    """Whether an HF-side tensor belongs in PARALLEL_HEADS_FILE rather than the trunk's shards."""
    return hf_name.startswith(PARALLEL_HEADS_PREFIX)


def is_float32_in_hf(hf_name: str) -> bool:
    """The router's bias, stored in float32 in the released checkpoint whatever the weights' dtype (the
    router weight is stored in the checkpoint dtype, as released, and upcast by transformers on load)."""
    return hf_name.endswith("mlp.gate.e_score_correction_bias")


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Every expected tensor is found with its shape, and nothing else; else one error listing what is off."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n} {found[n]} (expected {expected[n]})" for n in expected if n in found and found[n] != expected[n]]
    problems = []
    for label, items in (("missing tensors", missing), ("tensors the config does not have", unexpected),
                         ("wrong shapes", wrong)):
        if items:
            problems.append(f"{label}: {', '.join(items[:8])}{f' ... ({len(items)} in all)' if len(items) > 8 else ''}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
