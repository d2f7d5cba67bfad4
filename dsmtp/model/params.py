"""Parameter counts and training memory from a config alone (no model is built), and `dsmtp summary`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dsmtp.config import OPTIMIZER_STATE_BYTES, PARAM_BYTES, Config, ModelConfig, load_config

GiB = 2**30


@dataclass
class ParameterCounts:
    embedding: int
    output_head: int
    trunk_total: int  # embedding + layers + final norm + output head
    trunk_activated: int  # what one token touches in the trunk: routed experts count top-k only
    mtp_module: int  # one MTP depth (a sequential module or a parallel head), without the shared embedding and head
    mtp_module_activated: int
    mtp_depth: int
    mtp_kind: str

    @property
    def mtp_total(self) -> int:
        return self.mtp_depth * self.mtp_module

    @property
    def exported_mtp_total(self) -> int:
        """As stored in a HuggingFace export: each sequential depth keeps copies of the embedding and head
        (as released); parallel heads are stored once, beside the trunk (dsmtp.convert.export_hf)."""
        copies = self.embedding + self.output_head if self.mtp_kind == "sequential" else 0
        return self.mtp_depth * (self.mtp_module + copies)

    @property
    def total(self) -> int:
        return self.trunk_total + self.mtp_total

    @property
    def activated(self) -> int:
        return self.trunk_activated + self.mtp_depth * self.mtp_module_activated


def _attention(m: ModelConfig) -> int:
    heads, h = m.num_heads, m.hidden_size
    if m.q_lora_rank is None:
        q = h * heads * m.qk_head_dim
    else:
        q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * m.qk_head_dim
    kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank \
        + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + heads * m.v_head_dim * h


def _layer(m: ModelConfig, layer_id: int) -> tuple[int, int]:
    """(total, activated) parameters of one transformer layer."""
    h = m.hidden_size
    common = _attention(m) + 2 * h  # attention and the two norms
    if layer_id < m.first_k_dense_replace:
        dense = 3 * h * m.intermediate_size
        return common + dense, common + dense
    expert = 3 * h * m.moe_intermediate_size
    shared = m.n_shared_experts * expert + m.n_routed_experts * h  # shared experts and router
    return (common + shared + m.n_routed_experts * expert,
            common + shared + m.num_experts_per_tok * expert)


def count_parameters(m: ModelConfig) -> ParameterCounts:
    h = m.hidden_size
    embedding = output_head = m.vocab_size * h
    layers = [_layer(m, i) for i in range(m.num_layers)]
    last_total, last_active = _layer(m, m.num_layers - 1)
    # Each depth has a layer of the trunk's last kind and a final norm; a sequential module also has
    # enorm, hnorm and eh_proj.
    mtp_extra = h + (2 * h + 2 * h * h if m.mtp_kind == "sequential" else 0)
    return ParameterCounts(
        embedding=embedding,
        output_head=output_head,
        trunk_total=embedding + sum(t for t, _ in layers) + h + output_head,
        trunk_activated=embedding + sum(a for _, a in layers) + h + output_head,
        mtp_module=mtp_extra + last_total,
        mtp_module_activated=mtp_extra + last_active,
        mtp_depth=m.mtp_depth,
        mtp_kind=m.mtp_kind,
    )


def routed_expert_parameters(m: ModelConfig) -> int:
    """Parameters of the routed experts (trunk and MTP modules): what expert parallelism shards."""
    moe_layers = m.num_moe_layers + (m.mtp_depth if m.num_layers - 1 >= m.first_k_dense_replace else 0)
    return moe_layers * m.n_routed_experts * 3 * m.hidden_size * m.moe_intermediate_size


def activations_per_token(m: ModelConfig, seq_len: int, attention_scores: bool,
                          recompute_every: int = 0) -> dict[str, int]:
    """Activation values autograd keeps for the backward pass, per token of a micro-batch, by part: the
    trunk's transformer "layers", the "output" (embedding, final norm, main logits) and the "mtp" modules.

    Counted from what each part saves (autograd's saved tensors of a CPU step, tests/test_memory.py):
    a layer keeps its norms' and projections' inputs (about 6 hidden vectors), MLA its query, key and
    value heads twice (before and after the concatenations and RoPE) and its latents three times, a
    SwiGLU 4 intermediate vectors per expert a token visits, and each loss its logits. `attention_scores`:
    the attention probabilities are kept too (the math path of SDPA on CPU; the fused CUDA kernels keep
    one log-sum-exp per row instead). A recomputed layer keeps only its input.
    """
    h, k = m.hidden_size, m.num_experts_per_tok
    attention = (m.num_heads * (2 * m.qk_head_dim + 2 * m.v_head_dim + (seq_len if attention_scores else 0))
                 + 3 * m.kv_lora_rank + 3 * (m.q_lora_rank or 0) + 2 * m.qk_rope_head_dim)
    dense = 6 * h + attention + 4 * m.intermediate_size
    moe = 6 * h + attention + 4 * m.moe_intermediate_size * (k + m.n_shared_experts) + k * (2 * h + 4) \
        + m.n_routed_experts

    def layer(i: int, position: int) -> int:
        if recompute_every and position % recompute_every == 0:
            return h
        return dense if i < m.first_k_dense_replace else moe

    mtp_layers = sum(layer(m.num_layers - 1, m.num_layers + d) for d in range(1, m.mtp_depth + 1))
    return {"layers": sum(layer(i, i + 1) for i in range(m.num_layers)),
            "output": 3 * h + m.vocab_size,  # embedding, final norm, logits
            "mtp": mtp_layers + m.mtp_depth * (7 * h + m.vocab_size)}  # + norms, eh_proj, logits per module


@dataclass
class TrainingMemory:
    """Bytes one training process holds, estimated from the config. A lower bound: temporary buffers in
    forward and backward, communication buffers and the allocator's slack come on top."""

    parameters: int
    gradients: int
    optimizer: int
    activations_by_part: dict[str, int]  # as activations_per_token

    @property
    def activations(self) -> int:
        return sum(self.activations_by_part.values())

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"{self.total / GiB:,.1f} GiB (weights {self.parameters / GiB:,.1f}, gradients "
                f"{self.gradients / GiB:,.1f}, AdamW moments {self.optimizer / GiB:,.1f}, activations "
                f"{self.activations / GiB:,.1f})")


def training_memory(cfg: Config, world_size: int = 1, device_type: str = "cpu") -> TrainingMemory:
    """What each of `world_size` processes holds to train `cfg` on `device_type`.

    Weights and gradients are fp32 (4 bytes each; 2 under train.param_dtype=bf16, whose optimizer adds 4 for
    the master weights) and AdamW keeps two moments (8 bytes in fp32, 4 under
    train.optimizer_state_dtype=bf16). A process
    holds 1 / (tp * pp) of the dense parameters and 1 / (tp * pp * ep) of the routed experts; ZeRO stage
    1 shards the moments over the data-parallel ranks, stage 2 the gradients too, stage 3 the weights too.
    Activations: one micro-batch of this rank's samples (train.micro_batch_size / dp), in bf16 when the
    precision is (fp32 on CPU under `auto`), spread evenly over tp and pp; half of that under
    train.compile, whose fused kernels keep fewer intermediates (notes/memory.md has the measurements).
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, ep = (p.tp, p.pp, p.ep) if world_size > 1 else (1, 1, 1)  # one process holds everything
    model_parallel = tp * pp
    dp = max(world_size // model_parallel, 1)
    experts = routed_expert_parameters(m)
    dense = count_parameters(m).total - experts

    def per_rank(bytes_per_parameter: int, zero_stage_that_shards: int) -> int:
        zero = world_size > 1 and p.zero_stage >= zero_stage_that_shards
        dense_shards = model_parallel * (dp if zero else 1)
        expert_shards = model_parallel * ep * (dp // ep if zero else 1)
        return bytes_per_parameter * (-(-dense // dense_shards) + -(-experts // expert_shards))

    precision = t.precision if t.precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    activation_bytes = 4 if precision == "fp32" else 2
    tokens = max(t.micro_batch_size // dp, 1) * t.seq_len
    per_token = activations_per_token(m, t.seq_len, attention_scores=device_type != "cuda",
                                      recompute_every=t.activation_recompute_every)
    fused = 2 if t.compile else 1
    activations = {part: activation_bytes * tokens * n // (model_parallel * fused) for part, n in per_token.items()}
    param_bytes = PARAM_BYTES[t.param_dtype]
    master_bytes = 4 if t.param_dtype != "fp32" else 0
    return TrainingMemory(parameters=per_rank(param_bytes, 3), gradients=per_rank(param_bytes, 2),
                          optimizer=per_rank(2 * OPTIMIZER_STATE_BYTES[t.optimizer_state_dtype] + master_bytes, 1),
                          activations_by_part=activations)


def summary(m: ModelConfig) -> str:
    c = count_parameters(m)
    rows = [
        ("trunk (embedding + layers + head)", c.trunk_total, c.trunk_activated),
        (f"MTP {c.mtp_kind} (D={c.mtp_depth}, shared embedding/head)", c.mtp_total, c.mtp_depth * c.mtp_module_activated),
        (f"MTP as exported (D={c.mtp_depth}{', with embedding/head copies' if c.mtp_kind == 'sequential' else ''})",
         c.exported_mtp_total, None),
        ("total trained", c.total, c.activated),
        ("total as exported", c.trunk_total + c.exported_mtp_total, None),
    ]

    def fmt(n):
        return "" if n is None else (f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M")

    width = max(len(r[0]) for r in rows)
    lines = [f"{'parameters':<{width}}  {'total':>10}  {'activated':>10}"]
    lines += [f"{name:<{width}}  {fmt(total):>10}  {fmt(active):>10}" for name, total, active in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsmtp summary", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(summary(cfg.model))
    print(f"training memory, one process on CPU (train.micro_batch_size={cfg.train.micro_batch_size}, "
          f"train.seq_len={cfg.train.seq_len}): {training_memory(cfg).describe()}")
    return 0
