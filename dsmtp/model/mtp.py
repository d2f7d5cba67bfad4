"""Multi-Token Prediction: D predictors of the tokens after the next, in the two published designs.

Both sit on the trunk's final (post-norm) hidden state h_0; depth k = 1..D at position i predicts
token t_{i+k+1} through one transformer layer of the trunk's last-layer kind, its own final RMSNorm
and the trunk's shared output head.

- Sequential modules (DeepSeek-V3, section 2.2, `model.mtp_kind: sequential`): depth k combines the
  previous depth's output h_{k-1,i} with the embedding of the next true token t_{i+k}:

      h'_k = eh_proj(cat[enorm(Emb(t_{i+k})), hnorm(h_{k-1,i})])
      h_k  = norm_k(TransformerLayer_k(h'_k))

  The embedding comes first in the concatenation, as in the released weights (the paper writes the
  other order). The embedding and output head are the trunk's own, shared.
- Parallel heads (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token
  Prediction", `model.mtp_kind: parallel`): head k reads h_0 alone,

      h_k  = norm_k(TransformerLayer_k(h_{0,i}))

  The heads are independent given h_0, so their forward and backward passes can run one head at a
  time with the gradient accumulated at h_0 (their Figure 2; `one_at_a_time`).

The training objective is L_main + lambda * sum_k w_k L_k / sum_k w_k with per-depth weights w
(`depth_weights`); each L_k is averaged over the positions that have a target at depth k.

This module is the one place that knows the depth shift: which tokens a design embeds (`inputs`),
what feeds depth k (`source`, `token_offset`), what depth k is trained to predict (`targets`) and
how many drafts one decoding step can propose (`max_drafts`). The loss (dsmtp.model.model), the
pipeline's last stage (dsmtp.parallel.pipeline) and the decoder (dsmtp.serve.engine) ask it; a third
design is one more subclass of `MTP`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from dsmtp.config import ModelConfig
from dsmtp.model import recompute
from dsmtp.model.attention import LatentCache
from dsmtp.model.layer import TransformerLayer
from dsmtp.model.linear import replicated_linear
from dsmtp.model.norm import RMSNorm
from dsmtp.parallel.tensor import scatter_sequence

IGNORE_INDEX = -100

# (hidden state [B, S, H], targets [B, S]) -> (mean loss, accuracy, number of positions with a target)
LMLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def depth_weights(scheme: Union[str, list[float]], depth: int) -> list[float]:
    """Per-depth loss weights w_1..w_D (train.mtp_depth_weights), before normalisation by their sum:
    uniform (DeepSeek-V3), linear (D, D-1, .., 1), exponential (1/2^(k-1)) or an explicit list."""
    if not isinstance(scheme, str):
        return [float(w) for w in scheme]
    return {"uniform": [1.0] * depth,
            "linear": [float(depth - k) for k in range(depth)],
            "exponential": [0.5 ** k for k in range(depth)]}[scheme]


@dataclass
class MTPOutput:
    main: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the main head's loss, accuracy and target count
    objective: torch.Tensor  # what MTP adds to the training loss: lambda * weighted mean of L_k, plus its aux loss
    aux_loss: torch.Tensor  # the MTP layers' balance loss (detached; already inside `objective`)
    losses: torch.Tensor  # [D] L_k (detached)
    accuracies: torch.Tensor  # [D]
    counts: torch.Tensor  # [D] positions with a target at depth k


class SequentialModule(nn.Module):
    """One DeepSeek-V3 MTP module (depth k)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = replicated_linear(2 * cfg.hidden_size, cfg.hidden_size, cfg.init_std)
        self.layer = TransformerLayer(cfg, layer_id=cfg.num_layers - 1)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def norms(self) -> list[RMSNorm]:
        return [self.enorm, self.hnorm, self.norm]

    def forward(self, h_prev: torch.Tensor, token_embedding: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[LatentCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h_{k-1} [B, S, H] (post-norm), Emb(t_{i+k}) [B, S, H] -> (h_k, aux loss).
        `cache`: the module's own KV cache when decoding (see MLA.forward)."""
        h = self.eh_proj(torch.cat([self.enorm(token_embedding), self.hnorm(h_prev)], dim=-1))
        h, aux = recompute.run(self.layer, h, cos, sin, cache)
        return self.norm(h), aux


class ParallelHead(nn.Module):
    """One Gloeckle et al. head (depth k): a transformer layer and a final norm on h_0."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = TransformerLayer(cfg, layer_id=cfg.num_layers - 1)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def norms(self) -> list[RMSNorm]:
        return [self.norm]

    def forward(self, h0: torch.Tensor, token_embedding: None, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[LatentCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h_0 [B, S, H] (post-norm) -> (h_k, aux loss); heads embed no token."""
        h, aux = recompute.run(self.layer, h0, cos, sin, cache)
        return self.norm(h), aux


class MTP(nn.ModuleList):
    """The D depths of one design, as a list of modules (parameter names mtp.{k-1}.*).

    A design says what feeds depth k (`source`: the depth whose output it reads, 0 = the trunk;
    `token_offset`: which token's embedding it reads at position i, t_{i+offset}, or None).
    Everything else here follows from those two."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__(modules)
        self.depth_weights = [1.0] * len(modules)  # train.mtp_depth_weights (uniform unless set)

    @property
    def depth(self) -> int:
        return len(self)

    def source(self, k: int) -> int:
        raise NotImplementedError

    def token_offset(self, k: int) -> Optional[int]:
        raise NotImplementedError

    @property
    def max_drafts(self) -> Optional[int]:
        """Most draft tokens one decoding step can propose (None: any number)."""
        raise NotImplementedError

    @property
    def future_tokens(self) -> int:
        """Tokens past the S inputs whose embedding some depth reads."""
        offsets = [self.token_offset(k) for k in range(1, self.depth + 1)]
        return max([o for o in offsets if o is not None], default=0)

    def inputs(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens to embed: t_0 .. t_{S+F-1} with F = future_tokens, labels padded to S + D).
        Labels follow the shifted convention (labels[:, i] = t_{i+1}); missing ones are IGNORE_INDEX."""
        s = input_ids.shape[1]
        labels = F.pad(labels, (0, s + self.depth - labels.shape[1]), value=IGNORE_INDEX)
        return torch.cat([input_ids, labels[:, s - 1:s - 1 + self.future_tokens]], dim=1), labels

    def targets(self, k: int, labels: torch.Tensor, tokens: torch.Tensor, s: int) -> torch.Tensor:
        """Depth k's targets [B, S]: t_{i+k+1} at position i; none where its input token is missing."""
        targets = labels[:, k:k + s]
        offset = self.token_offset(k)
        if offset is None:
            return targets
        return targets.masked_fill(tokens[:, offset:offset + s] == IGNORE_INDEX, IGNORE_INDEX)

    def step(self, k: int, h_source: torch.Tensor, token_embedding: Optional[torch.Tensor], cos: torch.Tensor,
             sin: torch.Tensor, cache: Optional[LatentCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth k at some positions, from its source's hidden state and (if it reads one) the token
        embedding there: (h_k, aux loss). Training runs it over whole sequences, decoding over a few."""
        return self[k - 1](h_source, token_embedding, cos, sin, cache)

    def hidden_states(self, h0: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[h_1 .. h_D] and their summed aux loss, from h_0 [B, S, H] (maybe a sequence shard, see
        dsmtp.parallel.tensor) and the embedded tokens [B, S + future_tokens, H]."""
        s = emb.shape[1] - self.future_tokens
        hidden, aux = [h0], h0.new_zeros((), dtype=torch.float32)
        for k in range(1, self.depth + 1):
            offset = self.token_offset(k)
            token_embedding = None if offset is None else scatter_sequence(emb[:, offset:offset + s])
            h, layer_aux = self.step(k, hidden[self.source(k)], token_embedding, cos, sin)
            hidden.append(h)
            aux = aux + layer_aux
        return hidden[1:], aux

    def losses(self, h0: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, lm_loss: LMLoss, lm_loss_parameters: list[nn.Parameter],
               mtp_weight: float | torch.Tensor) -> MTPOutput:
        """The main head's loss, every depth's, and the objective lambda * sum_k w_k L_k / sum_k w_k + aux.
        `lm_loss_parameters`: the parameters `lm_loss` uses (the shared output head's)."""
        s = emb.shape[1] - self.future_tokens
        if not self.depth:  # plain next-token training
            nothing = h0.new_zeros(0, dtype=torch.float32)
            return MTPOutput(main=lm_loss(h0, labels[:, :s]), objective=h0.new_zeros((), dtype=torch.float32),
                             aux_loss=nothing.sum(), losses=nothing, accuracies=nothing, counts=nothing.long())
        hidden, aux = self.hidden_states(h0, emb, cos, sin)
        # The main head between the depths' hidden states and their heads: this order decides the order
        # in which h_0 and the shared head's weight sum their gradients (float sums depend on it).
        main = lm_loss(h0, labels[:, :s])
        per_depth = [lm_loss(h, self.targets(k, labels, tokens, s)) for k, h in enumerate(hidden, start=1)]
        losses, accuracies, counts = (torch.stack(t) for t in zip(*per_depth))
        weighted = torch.stack([w * loss for w, loss in zip(self.depth_weights, losses)]).sum()
        return MTPOutput(main=main, objective=mtp_weight / sum(self.depth_weights) * weighted + aux,
                         aux_loss=aux.detach(), losses=losses.detach(), accuracies=accuracies, counts=counts)


class SequentialMTP(MTP):
    """DeepSeek-V3's D sequential modules. Drafting past depth D reuses the last module one position
    further, on its own previous output (as vLLM and SGLang do)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__([SequentialModule(cfg) for _ in range(cfg.mtp_depth)])

    def source(self, k: int) -> int:
        return k - 1

    def token_offset(self, k: int) -> Optional[int]:
        return k

    @property
    def max_drafts(self) -> Optional[int]:
        return None


class ParallelHeads(MTP):
    """Gloeckle et al.'s D independent heads on h_0; one decoding step drafts at most D tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__([ParallelHead(cfg) for _ in range(cfg.mtp_depth)])
        # train.mtp_heads_one_at_a_time: each head's forward and backward before the next head's forward.
        self.one_at_a_time = False

    def source(self, k: int) -> int:
        return 0

    def token_offset(self, k: int) -> Optional[int]:
        return None

    @property
    def max_drafts(self) -> Optional[int]:
        return self.depth

    def losses(self, h0: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, lm_loss: LMLoss, lm_loss_parameters: list[nn.Parameter],
               mtp_weight: float | torch.Tensor) -> MTPOutput:
        if not (self.one_at_a_time and torch.is_grad_enabled() and h0.requires_grad):
            return super().losses(h0, emb, tokens, labels, cos, sin, lm_loss, lm_loss_parameters, mtp_weight)
        s = emb.shape[1]
        scale = mtp_weight / sum(self.depth_weights)

        def head(k: int, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h_k, aux = self.step(k, h, None, cos, sin)
            loss, accuracy, count = lm_loss(h_k, self.targets(k, labels, tokens, s))
            return scale * self.depth_weights[k - 1] * loss + aux, loss, accuracy, count, aux

        main = lm_loss(h0, labels[:, :s])
        params = [p for p in [*self.parameters(), *lm_loss_parameters] if p.requires_grad]
        objective, losses, accuracies, counts, aux = _HeadsOneAtATime.apply(h0, head, self.depth, *params)
        return MTPOutput(main=main, objective=objective, aux_loss=aux, losses=losses, accuracies=accuracies,
                         counts=counts)


class _HeadsOneAtATime(torch.autograd.Function):
    """Parallel heads' objective with each head's backward run right after its forward (Gloeckle et al.,
    Figure 2): only the gradients, with respect to h_0 and the parameters, outlive a head. Backward
    scales them by the objective's incoming gradient (the loss scale), so engines see an ordinary
    autograd node."""

    @staticmethod
    def forward(ctx, h0: torch.Tensor, head: Callable, depth: int, *params: nn.Parameter):
        h = h0.detach().requires_grad_()
        inputs = [h, *params]
        grads: list[Optional[torch.Tensor]] = [None] * len(inputs)
        objective = h0.new_zeros((), dtype=torch.float32)
        stats = []
        with torch.enable_grad():
            for k in range(1, depth + 1):
                head_objective, *head_stats = head(k, h)
                head_grads = torch.autograd.grad(head_objective, inputs, allow_unused=True)
                grads = [g if new is None else new if g is None else g + new for g, new in zip(grads, head_grads)]
                objective = objective + head_objective.detach()
                stats.append([t.detach() for t in head_stats])
        ctx.grads = grads
        losses, accuracies, counts, aux = (torch.stack(t) for t in zip(*stats))
        aux = aux.sum()
        ctx.mark_non_differentiable(losses, accuracies, counts, aux)
        return objective, losses, accuracies, counts, aux

    @staticmethod
    def backward(ctx, grad_objective: torch.Tensor, *unused):
        grads = [None if g is None else g * grad_objective for g in ctx.grads]
        ctx.grads = None
        return (grads[0], None, None, *grads[1:])


def build_mtp(cfg: ModelConfig) -> MTP:
    return {"sequential": SequentialMTP, "parallel": ParallelHeads}[cfg.mtp_kind](cfg)
