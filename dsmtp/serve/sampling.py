"""Next-token distributions (greedy, temperature, top-k, top-p), seeded per sequence, and drawing from them.

Greedy decoding is the one-hot distribution on the arg-max, so speculative sampling and plain decoding
run one code path for greedy and sampled sequences alike, and greedy stays exact.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: Optional[int] = None  # None: a fresh random seed

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


class BatchSampler:
    """Per-sequence sampling settings and random streams for a batch.

    Each sequence draws a fixed number of uniforms per decoding step from its own generator, so a
    seeded request gives the same tokens whichever batch it runs in.
    """

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.device = device
        self._set_params(list(params))
        self.generators = []
        for p in params:
            g = torch.Generator()
            g.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            self.generators.append(g)

    def _set_params(self, params: list[SamplingParams]) -> None:
        """The per-sequence settings as device tensors, and which filters the batch needs at all."""
        self.params = params
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float64, device=self.device)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=self.device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=self.device)
        self.all_greedy = all(p.temperature == 0 for p in params)
        self.any_top_k = any(p.top_k > 0 for p in params)
        self.any_top_p = any(p.top_p < 1 for p in params)

    def uniforms(self, count: int) -> torch.Tensor:
        """[B, count] uniforms in [0, 1), one stream per sequence."""
        u = torch.stack([torch.rand(count, generator=g, dtype=torch.float64) for g in self.generators])
        return u.to(self.device)

    def keep(self, rows: torch.Tensor) -> None:
        kept = rows.tolist()
        self._set_params([self.params[i] for i in kept])
        self.generators = [self.generators[i] for i in kept]

    def merge(self, other: "BatchSampler") -> None:
        self._set_params(self.params + other.params)
        self.generators = self.generators + other.generators

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, ..., V] -> each sequence's next-token distribution (float64): see `distributions`.
        The filters sort the whole vocabulary: those no sequence of the batch asks for are skipped."""
        return distributions(logits, self.temperature, self.top_k, self.top_p,
                             filters=(not self.all_greedy, self.any_top_k, self.any_top_p))


def distributions(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  filters: tuple[bool, bool, bool] = (True, True, True)) -> torch.Tensor:
    """logits [B, ..., V] -> each sequence's next-token distribution (float64), after temperature,
    top-k and top-p ([B] settings each); one-hot on the arg-max for greedy sequences (temperature 0).

    `filters` (any sampled sequence, any top-k, any top-p) may skip what no sequence needs: the
    result is the same either way, so a sequence's distribution never depends on its batch."""
    any_sampled, any_top_k, any_top_p = filters
    logits = logits.double()
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if not any_sampled:
        return one_hot
    shape = (-1,) + (1,) * (logits.dim() - 1)
    vocab = logits.shape[-1]
    greedy = (temperature == 0).view(shape)
    scaled = logits / torch.where(greedy, 1.0, temperature.view(shape))
    if any_top_k:  # keep the logits at least as large as the k-th largest
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).view(shape)
        sorted_logits = scaled.sort(dim=-1, descending=True).values
        kth = sorted_logits.gather(-1, (k - 1).expand(*scaled.shape[:-1], 1))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if any_top_p:  # keep the most likely tokens until their mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut = top_p.view(shape)
        sorted_probs = sorted_probs.masked_fill((mass_before >= cut) & (cut < 1), 0.0)
        filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        # Renormalised only where cut: a sequence without top-p keeps the softmax as it is.
        probs = torch.where(cut < 1, filtered / filtered.sum(dim=-1, keepdim=True), probs)
    return torch.where(greedy, one_hot, probs)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [B, V], u [B] uniforms in [0, 1) -> token ids [B].

    A zero-probability token is never drawn; a one-hot distribution always gives its token."""
    cdf = probs.cumsum(dim=-1)
    ids = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return ids.clamp(max=probs.shape[-1] - 1)
