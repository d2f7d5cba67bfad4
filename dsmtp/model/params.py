"""Parameter counts from a config alone (no model is built), and `dsmtp summary`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dsmtp.config import ModelConfig, load_config


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
    print(summary(load_config(args.config, args.set).model))
    return 0
