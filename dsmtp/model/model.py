"""DeepSeek-V3 with D sequential Multi-Token Prediction modules, and its training loss.

    loss = L_main + (mtp_weight / D) * sum_k L_k  (+ the sequence-wise balance loss, if enabled)

Labels follow the shifted convention: labels[:, i] is the token after input_ids[:, i]. Passing
S + D labels for S inputs gives every depth a target at every position; with fewer, the last
positions of the deeper depths simply have none. Each L_k is averaged over the tokens that have a
target at depth k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmtp.config import ModelConfig
from dsmtp.model.layer import TransformerLayer
from dsmtp.model.linear import ColumnParallelLinear, VocabParallelEmbedding
from dsmtp.model.mtp import MTPModule
from dsmtp.model.norm import RMSNorm
from dsmtp.model.rope import RotaryEmbedding
from dsmtp.parallel import vocab

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

    def trunk(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded tokens [B, S, H] -> final (post-norm) hidden state h_0 and the summed aux loss."""
        x, aux = self.run_layers(self.layers, x, cos, sin)
        return self.norm(x), aux

    @staticmethod
    def run_layers(layers, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a run of transformer layers (all of them, or a pipeline stage's); returns (x, summed aux loss)."""
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in layers:
            x, layer_aux = layer(x, cos, sin)
            aux = aux + layer_aux
        return x, aux

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from a hidden state (trunk or MTP depth): the shared output head."""
        return vocab.gather_vocab(self.head(h))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                mtp_weight: float = 0.3) -> torch.Tensor | ModelOutput:
        """Without labels: the main logits [B, S, vocab]. With labels [B, S..S+D]: a ModelOutput."""
        s = input_ids.shape[1]
        cos, sin = self.rope(torch.arange(s, device=input_ids.device))
        if labels is None:
            h, _ = self.trunk(self.embed(input_ids), cos, sin)
            return self.logits(h)

        tokens, labels = self.mtp_tokens(input_ids, labels)
        emb = self.embed(tokens.clamp(min=0))
        h, aux = self.trunk(emb[:, :s], cos, sin)
        return self.output(h, emb, tokens, labels, aux, cos, sin, mtp_weight)

    def mtp_tokens(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_0 .. t_{S+D-1} to embed, labels padded to S + D). Depth k reads embedding positions
        k .. k+S-1 (token t_{i+k} at position i); missing labels become IGNORE_INDEX."""
        s, depth = input_ids.shape[1], len(self.mtp)
        labels = F.pad(labels, (0, s + depth - labels.shape[1]), value=IGNORE_INDEX)
        return torch.cat([input_ids, labels[:, s - 1:s + depth - 1]], dim=1), labels

    def output(self, h: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
               aux: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mtp_weight: float) -> ModelOutput:
        """Main and MTP losses from the trunk's final (post-norm) hidden state h [B, S, H], the embedded
        `tokens` and the trunk's aux loss (a pipeline's last stage calls this directly)."""
        s, depth = h.shape[1], len(self.mtp)
        main_loss, main_acc, main_n = self._lm_loss(h, labels[:, :s])

        mtp_losses, mtp_accs, mtp_ns = [], [], []
        for k, module in enumerate(self.mtp, start=1):
            h, module_aux = module(h, emb[:, k:k + s], cos, sin)
            aux = aux + module_aux
            targets = labels[:, k:k + s].masked_fill(tokens[:, k:k + s] == IGNORE_INDEX, IGNORE_INDEX)
            loss_k, acc_k, n_k = self._lm_loss(h, targets)
            mtp_losses.append(loss_k)
            mtp_accs.append(acc_k)
            mtp_ns.append(n_k)

        loss = main_loss + aux
        mtp_losses_t = torch.stack(mtp_losses) if depth else main_loss.new_zeros(0)
        if depth:
            loss = loss + mtp_weight / depth * mtp_losses_t.sum()
        return ModelOutput(
            loss=loss,
            main_loss=main_loss.detach(),
            main_accuracy=main_acc,
            mtp_losses=mtp_losses_t.detach(),
            mtp_accuracies=torch.stack(mtp_accs) if depth else main_acc.new_zeros(0),
            aux_loss=aux.detach(),
            main_tokens=main_n,
            mtp_tokens=torch.stack(mtp_ns) if depth else main_n.new_zeros(0),
        )

    def _lm_loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and top-1 accuracy over the positions that have a target, and their count."""
        logits = self.head(h)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        n = valid.sum()
        denom = n.clamp(min=1)
        accuracy = (vocab.top1_correct(logits, safe_targets) & valid).sum() / denom
        loss = (vocab.cross_entropy(logits, safe_targets) * valid).sum() / denom
        return loss, accuracy, n
