"""DeepSeekMoE: shared experts plus fine-grained routed experts with a sigmoid, group-limited router
and auxiliary-loss-free load balancing."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dsmtp.config import ModelConfig
from dsmtp.model import kernels, recompute
from dsmtp.model.mlp import MLP
from dsmtp.parallel.sequence import gather_sequence


def descending_rank(x: torch.Tensor) -> torch.Tensor:
    """Each element's place along the last dimension, 0 for the largest, ties in index order.

    The router's top-k selections are over a few dozen candidates per token: as all-pairs comparisons
    torch.compile fuses them with the scoring, where torch.topk is a separate kernel per call that
    costs more than its work (three per MoE layer; notes/code-measurements.md).
    """
    index = torch.arange(x.shape[-1], device=x.device)
    other, this = x.unsqueeze(-2), x.unsqueeze(-1)  # [..., i, j] compares candidate j with candidate i
    ahead = (other > this) | ((other == this) & (index < index.unsqueeze(-1)))
    return ahead.sum(dim=-1)


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """x.topk(k).indices over the last dimension (largest first), from descending_rank."""
    places = torch.arange(k, device=x.device).unsqueeze(-1)
    return (descending_rank(x).unsqueeze(-2) == places).int().argmax(dim=-1)


class Router(nn.Module):
    """Scores every routed expert with a sigmoid and picks top-k inside the best groups.

    `expert_bias` steers which experts are picked (load balancing) but never enters the gate values.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.router_dtype = cfg.router_dtype
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.init_std)
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> expert_ids [T, k], gates [T, k] (float32), scores [T, E] (float32)."""
        if self.router_dtype == "fp32":
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight)
        scores = logits.float().sigmoid()
        biased = (scores + self.expert_bias).view(-1, self.n_group, self.n_experts // self.n_group)
        # Rank groups by the sum of their two best biased scores; drop all but topk_group of them.
        group_scores = torch.where(descending_rank(biased) < 2, biased, 0.0).sum(dim=-1)
        kept_groups = descending_rank(group_scores) < self.topk_group
        biased = biased.masked_fill(~kept_groups.unsqueeze(-1), float("-inf")).flatten(1)
        expert_ids = top_k_indices(biased, self.top_k)
        gates = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return expert_ids, gates * self.routed_scaling_factor, scores


class RoutedExperts(nn.Module):
    """The routed experts' SwiGLU weights stacked per expert, for grouped GEMMs.

    Holds all experts, or this rank's slice of them once expert parallelism shards it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        # w13[e, 0] is expert e's gate projection (DeepSeek's w1), w13[e, 1] its up projection (w3): one
        # tensor, so the grouped GEMM takes both as one [E, 2I, H] weight without concatenating them in
        # every forward, and their gradient arrives as one tensor (vLLM's w13 layout, gate and up as halves).
        self.w13 = nn.Parameter(torch.empty(e, 2, i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))  # down
        for w in (self.w13, self.w2):
            nn.init.normal_(w, std=cfg.init_std)
        self.fp8 = False  # set by DeepSeekV3.enable_fp8

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return kernels.grouped_swiglu(x, tokens_per_expert, self.w13, self.w2, use_fp8=self.fp8)


def count_tokens(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, as a comparison of every pair with every expert id summed over the
    pairs: it never waits for the device (torch.bincount does on CUDA) and, compiled, is one reduction
    kernel without atomics (scatter_add_ funnels the T*k additions into num_experts counters)."""
    flat = expert_ids.flatten()
    return (flat.unsqueeze(1) == torch.arange(num_experts, device=flat.device)).sum(dim=0)


def sort_pairs_by_expert(expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse): `order` lists the T*k (token, expert) pairs, numbered token-major, grouped by
    expert; `inverse` undoes it. Both stay on the device."""
    # A radix sort makes one pass per key byte: int16 ids (config.MAX_EXPERTS) take 2, int64 ones 8.
    order = expert_ids.flatten().to(torch.int16).argsort(stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, inverse


class _GatherPairs(torch.autograd.Function):
    """x [T, H] -> the token row of every pair in `order` [T*k, H].

    Backward: the pair gradients back in pair order (a gather by `inverse`) summed over each token's k
    pairs. Autograd's own backward of x[order // k] is an atomic scatter-add, slow in bf16 on GPUs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = order.numel() // x.shape[0]
        return kernels.gather_rows(x, order // ctx.k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(dim=1), None, None


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype when autocast is on: the experts compute in it anyway, so the k copies of
    each token row (and, under expert parallelism, the all-to-all) move half the bytes."""
    return x.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else x


def gather_pairs(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _GatherPairs.apply(x, order, inverse)


class _CombinePairs(torch.autograd.Function):
    """Expert outputs y [T*k, H] in `order` -> sum_j gates[t, j] * y[inverse[t*k + j]] per token [T, H].

    Both directions are gathers: forward reads each output row where its token needs it (compiled, one
    fused gather-multiply-sum kernel: y is read once and nothing [T*k, H] is written); backward sends
    each token's gradient to its k rows by `order`. Putting y back in pair order first (index_copy_)
    wrote and re-read a second [T*k, H] copy in each direction.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, order, inverse, gates)
        t, k = gates.shape
        # Elementwise, not bmm: a [1, k] x [k, H] product per token is k FLOPs per output, memory-bound.
        return (y.index_select(0, inverse).view(t, k, -1) * gates.to(y.dtype).unsqueeze(-1)).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, order, inverse, gates = ctx.saved_tensors
        t, k = gates.shape
        grad_y = grad_gates = None
        if ctx.needs_input_grad[0]:
            grad_y = kernels.gather_rows(grad, order // k, gates.flatten()[order], y.dtype)
        if ctx.needs_input_grad[3]:
            per_pair = y.index_select(0, inverse).view(t, k, -1)
            grad_gates = (per_pair * grad.unsqueeze(1)).sum(dim=-1).to(gates.dtype)
        return grad_y, None, None, grad_gates


def combine_pairs(y: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Expert outputs y [T*k, H] in `order` -> the gate-weighted sum over each token's k pairs [T, H]."""
    return _CombinePairs.apply(y, order, inverse, gates)


def dispatch_local(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, experts: RoutedExperts) -> torch.Tensor:
    """Send each token to its k experts on this rank, and sum the gated outputs back per token.

    Every step keeps static shapes on the device (no host synchronisation): sort the T*k
    (token, expert) pairs by expert, run the experts, put the rows back in pair order, and take the
    gate-weighted sum over each token's k outputs.
    """
    order, inverse = sort_pairs_by_expert(expert_ids)
    y = experts(gather_pairs(compute_dtype(x), order, inverse), count_tokens(expert_ids, experts.num_experts))
    return combine_pairs(y, order, inverse, gates).to(x.dtype)


def sequence_balance_loss(scores: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i, averaged over sequences.

    scores [B, S, E] sigmoid affinities, expert_ids [B, S, k] the selected experts.
    """
    b, s, e = scores.shape
    k = expert_ids.shape[-1]
    probs = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # P_i per sequence
    picked = torch.zeros(b, e, device=scores.device).scatter_add_(
        1, expert_ids.reshape(b, -1), torch.ones(b, s * k, device=scores.device))
    load = picked * e / (k * s)  # f_i per sequence
    return (load * probs).sum(dim=-1).mean()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.init_std) \
            if cfg.n_shared_experts > 0 else None
        # Tokens routed to each expert since the last bias update (this rank's share of the batch).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        # How tokens reach the experts; expert parallelism swaps in an all-to-all version.
        self.dispatch: Callable[..., torch.Tensor] = dispatch_local

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> (output [B, S, H], sequence-wise aux loss times alpha)."""
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        expert_ids, gates, scores = self.router(flat)
        if self.training and not recompute.recomputing():
            with torch.no_grad():
                self.tokens_per_expert += count_tokens(expert_ids, self.tokens_per_expert.numel())
        out = self.dispatch(flat, expert_ids, gates, self.experts).view(b, s, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.aux_loss_alpha > 0 and self.training:
            # Per-sequence statistics: over the whole sequence also when x is a sequence shard.
            whole_scores = gather_sequence(scores.view(b, s, -1), partial_grad=False)
            aux = self.aux_loss_alpha * sequence_balance_loss(whole_scores, gather_sequence(expert_ids.view(b, s, -1)))
        return out, aux


def moe_layers(model: nn.Module) -> Iterator[MoE]:
    """Every MoE layer of the model: the trunk's and those inside MTP modules."""
    return (m for m in model.modules() if isinstance(m, MoE))


@torch.no_grad()
def update_expert_bias(model: nn.Module, gamma: float | torch.Tensor) -> None:
    """Aux-loss-free balancing, called after each optimizer step with loads already summed over the
    whole data-parallel batch: bias += gamma * sign(mean_load - load), then the counts restart.
    `gamma` may be a device scalar (0 for a skipped step, decided without a host read)."""
    for moe in moe_layers(model):
        load = moe.tokens_per_expert
        moe.router.expert_bias += gamma * torch.sign(load.mean() - load)
        load.zero_()
