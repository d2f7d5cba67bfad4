"""Log-probabilities of tokens and the most likely alternatives at their positions (the OpenAI API's
`logprobs`), from the trunk's raw distribution: before temperature, top-k or top-p, as vLLM reports them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float  # of the token itself
    top: list[tuple[int, float]]  # (token id, log-probability) of the most likely tokens there, most likely first


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[TokenLogprob]:
    """logits [T, V] at the positions that predicted `tokens` [T] -> each token's TokenLogprob with its
    `top_n` alternatives (one copy to the host)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    top = logp.topk(top_n, dim=-1)
    chosen, ids, values = chosen.tolist(), top.indices.tolist(), top.values.tolist()
    return [TokenLogprob(c, list(zip(i, v))) for c, i, v in zip(chosen, ids, values)]
