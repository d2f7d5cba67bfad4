"""DeepSeek-V3 with D sequential Multi-Token Prediction modules, and its training loss.

    loss = L_main + (mtp_weight / D) * sum_k L_k  (+ the sequence-wise balance loss, if enabled)

Labels follow the shifted convention: labels[:, i] is the token after input_ids[:, i]. Passing
S + D labels for S inputs gives every depth a target at every position; with fewer, the last
positions of the deeper depths simply have none. Each L_k is averaged over the tokens that have a
target at depth k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsmtp.config import ModelConfig
from dsmtp.model import recompute
from dsmtp.model.attention import LatentCache
from dsmtp.model.layer import TransformerLayer
from dsmtp.model.linear import ColumnParallelLinear, VocabParallelEmbedding
from dsmtp.model.mtp import MTPModule
from dsmtp.model.norm import RMSNorm
from dsmtp.model.rope import RotaryEmbedding
from dsmtp.parallel import vocab
from dsmtp.parallel.tensor import gather_sequence, scatter_sequence

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    loss: torch.Tensor  # what backward() runs on
    main_loss: torch.Tensor
    main_accuracy: torch.Tensor
    mtp_losses: torch.Tensor  # [D]
    mtp_accuracies: torch.Tensor  # [D]
    aux_loss: torch.Tensor
    main_tokens: torch.Tensor  # tokens with a target, per depth: used to weight averages
    mtp_tokens: torch.Tensor  # [D]


class DeepSeekV3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.init_std)
        self.layers = nn.ModuleList(TransformerLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, cfg.init_std)
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        self.rope = RotaryEmbedding(cfg)

    def compile_layers(self) -> None:
        """torch.compile each transformer layer (trunk and MTP) and the loss, in place (train.compile).

        Fuses what eager mode runs as separate memory-bound kernels: RMSNorm, RoPE, SwiGLU, the
        router's scoring, the casts, and the output head's cast + cross-entropy. Layer by layer, so
        that compile time is that of two layers (dense, MoE) and not of the whole model. The norms
        outside the layers (the trunk's final norm, each MTP module's three) are compiled too: eager,
        each is a dozen passes over the [tokens, hidden] activations in forward and backward.
        """
        for layer in [*self.layers, *(m.layer for m in self.mtp)]:
            layer.compile()
        for norm in [self.norm, *(n for m in self.mtp for n in (m.enorm, m.hnorm, m.norm))]:
            norm.compile()
        self._lm_loss = torch.compile(self._lm_loss)

    def set_activation_recompute(self, every: int) -> None:
        """Recompute every `every`-th transformer layer (trunk layers counted from the first, then the MTP
        modules' layers) in the backward pass instead of keeping its activations; 0: none, 1: all."""
        for i, layer in enumerate([*self.layers, *(m.layer for m in self.mtp)], start=1):
            layer.recompute = every > 0 and i % every == 0

    def trunk(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              caches: Optional[list[LatentCache]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded tokens [B, S, H] -> final (post-norm) hidden state h_0 and the summed aux loss.
        `caches`: one KV cache per layer when decoding (see MLA.forward)."""
        x, aux = self.run_layers(self.layers, x, cos, sin, caches)
        return self.norm(x), aux

    @staticmethod
    def run_layers(layers, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   caches: Optional[list[LatentCache]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a run of transformer layers (all of them, or a pipeline stage's); returns (x, summed aux loss)."""
        aux = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(layers):
            x, layer_aux = recompute.run(layer, x, cos, sin, None if caches is None else caches[i])
            aux = aux + layer_aux
        return x, aux

    def mtp_hidden_states(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[h_1 .. h_D] from the trunk's h_0 [B, S, H] and the embedded tokens t_0 .. t_{S+D-1}: depth k
        at position i combines h_{k-1, i} with the embedding of t_{i+k}. Also returns their aux loss."""
        s = emb.shape[1] - len(self.mtp)  # h may be a sequence shard (dsmtp.parallel.tensor)
        hidden, aux = [], h.new_zeros((), dtype=torch.float32)
        for k, module in enumerate(self.mtp, start=1):
            h, module_aux = module(h, scatter_sequence(emb[:, k:k + s]), cos, sin)
            hidden.append(h)
            aux = aux + module_aux
        return hidden, aux

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from a hidden state (trunk or MTP depth): the shared output head."""
        return vocab.gather_vocab(self.head(gather_sequence(h)))

    def hidden_states(self, tokens: torch.Tensor, seq_len: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """tokens [B, S + D] = t_0 .. t_{S+D-1} -> [h_0, h_1, .., h_D] (each [B, S, H]) and the aux loss.
        The tokens are embedded once for all depths."""
        cos, sin = self.rope(torch.arange(seq_len, device=tokens.device))
        emb = self.embed(tokens)
        h, aux = self.trunk(emb[:, :seq_len], cos, sin)
        mtp_hidden, mtp_aux = self.mtp_hidden_states(h, emb, cos, sin)
        return [h, *mtp_hidden], aux + mtp_aux

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                mtp_weight: float | torch.Tensor = 0.3) -> torch.Tensor | ModelOutput:
        """Without labels: the main logits [B, S, vocab]. With labels [B, S..S+D]: a ModelOutput."""
        s = input_ids.shape[1]
        cos, sin = self.rope(torch.arange(s, device=input_ids.device))
        # Under sequence parallelism (dsmtp.parallel.tensor) the trunk and MTP modules run on this
        # rank's sequence shard; the output head gathers it back. Identity otherwise.
        if labels is None:
            h, _ = self.trunk(scatter_sequence(self.embed(input_ids)), cos, sin)
            return self.logits(h)
        tokens, labels = self.mtp_tokens(input_ids, labels)
        emb = self.embed(tokens.clamp(min=0))
        h, aux = self.trunk(scatter_sequence(emb[:, :s]), cos, sin)
        return self.output(h, emb, tokens, labels, aux, cos, sin, mtp_weight)

    def mtp_tokens(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_0 .. t_{S+D-1} to embed, labels padded to S + D). Depth k reads embedding positions
        k .. k+S-1 (token t_{i+k} at position i); missing labels become IGNORE_INDEX."""
        s, depth = input_ids.shape[1], len(self.mtp)
        labels = F.pad(labels, (0, s + depth - labels.shape[1]), value=IGNORE_INDEX)
        return torch.cat([input_ids, labels[:, s - 1:s + depth - 1]], dim=1), labels

    def output(self, h: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
               aux: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mtp_weight: float | torch.Tensor) -> ModelOutput:
        """Main and MTP losses from the trunk's final (post-norm) hidden state h [B, S, H], the embedded
        `tokens` and the trunk's aux loss (a pipeline's last stage calls this directly)."""
        s, depth = emb.shape[1] - len(self.mtp), len(self.mtp)
        mtp_hidden, mtp_aux = self.mtp_hidden_states(h, emb, cos, sin)
        aux = aux + mtp_aux
        main_loss, main_acc, main_n = self._lm_loss(h, labels[:, :s])
        loss = main_loss + aux
        per_depth = []
        for k, h_k in enumerate(mtp_hidden, start=1):
            # Depth k at position i predicts t_{i+k+1}; no target where its input token t_{i+k} is missing.
            targets = labels[:, k:k + s].masked_fill(tokens[:, k:k + s] == IGNORE_INDEX, IGNORE_INDEX)
            per_depth.append(self._lm_loss(h_k, targets))
        if depth:
            mtp_losses, mtp_accs, mtp_ns = (torch.stack(t) for t in zip(*per_depth))
            loss = loss + mtp_weight / depth * mtp_losses.sum()
        else:
            mtp_losses, mtp_accs, mtp_ns = main_loss.new_zeros(0), main_acc.new_zeros(0), main_n.new_zeros(0)
        return ModelOutput(loss=loss, main_loss=main_loss.detach(), main_accuracy=main_acc,
                           mtp_losses=mtp_losses.detach(), mtp_accuracies=mtp_accs, aux_loss=aux.detach(),
                           main_tokens=main_n, mtp_tokens=mtp_ns)

    def _lm_loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and top-1 accuracy over the positions that have a target, and their count."""
        logits = self.head(gather_sequence(h))
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        n = valid.sum()
        denom = n.clamp(min=1)
        accuracy = (vocab.top1_correct(logits, safe_targets) & valid).sum() / denom
        loss = (vocab.cross_entropy(logits, safe_targets) * valid).sum() / denom
        return loss, accuracy, n
