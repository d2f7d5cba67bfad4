"""Speculative sampling: accept a prefix of draft tokens so the output is distributed as the target's.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et al.
2023: draft x_i ~ q_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
rejection the token is drawn from normalize(max(0, p_i - q_i)); when all K drafts are accepted a
bonus token is drawn from p_{K+1}. Every emitted token is then distributed exactly as p. With
one-hot (greedy) p and q this is: keep drafts while they equal the target's arg-max, then emit the
target's arg-max, i.e. exactly plain greedy decoding.
"""

from __future__ import annotations

import torch

from dsmtp.serve.sampling import draw


def accept(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
           u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [B, K] drawn from q [B, K, V]; p [B, K+1, V] the target's distributions at the K+1
    verified positions; u [B, K+1] uniforms in [0, 1).

    Returns (number of accepted drafts [B] in 0..K, the token that follows them [B])."""
    b, k, vocab = q.shape
    p_draft = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_draft = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    accepted = (u[:, :k] * q_draft < p_draft).long().cumprod(dim=-1).sum(dim=-1)  # leading accepts
    # Where the run of accepts stopped: residual of p and q there; past the last draft q is 0, so p itself.
    q_padded = torch.cat([q, q.new_zeros(b, 1, vocab)], dim=1)
    at = accepted.view(b, 1, 1).expand(b, 1, vocab)
    p_next, q_next = p.gather(1, at).squeeze(1), q_padded.gather(1, at).squeeze(1)
    residual = (p_next - q_next).clamp(min=0)
    # Rounding can empty the residual when p == q at a rejected draft (probability 0); fall back to p.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
    return accepted, draw(residual, u[:, k])
