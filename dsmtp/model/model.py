"""DeepSeek-V3 with D Multi-Token Prediction depths (sequential modules or parallel heads), and its loss.

    loss = L_main + lambda * sum_k w_k L_k / sum_k w_k  (+ the sequence-wise balance loss, if enabled)

Labels follow the shifted convention: labels[:, i] is the token after input_ids[:, i]. Passing
S + D labels for S inputs gives every depth a target at every position; with fewer, the last
positions of the deeper depths simply have none. Each L_k is averaged over the tokens that have a
target at depth k. What feeds depth k and what it predicts is dsmtp.model.mtp's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from dsmtp.config import ModelConfig
from dsmtp.model import fp8, kernels, recompute
from dsmtp.model.attention import MLA, LatentCache
from dsmtp.model.layer import TransformerLayer
from dsmtp.model.linear import ColumnParallelLinear, LocalGemm, VocabParallelEmbedding
from dsmtp.model.moe import RoutedExperts
from dsmtp.model.mtp import IGNORE_INDEX, MTP, build_mtp
from dsmtp.model.norm import RMSNorm
from dsmtp.model.rope import RotaryEmbedding
from dsmtp.parallel import vocab
from dsmtp.parallel.sequence import gather_sequence, scatter_sequence

__all__ = ["IGNORE_INDEX", "DeepSeekV3", "ModelOutput"]


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
        self.mtp: MTP = build_mtp(cfg)
        self.rope = RotaryEmbedding(cfg)

    def compile_layers(self, mode: str = "default") -> None:
        """torch.compile each transformer layer (trunk and MTP) and the loss, in place (train.compile), in
        torch.compile's `mode` (train.compile_mode).

        Fuses what eager mode runs as separate memory-bound kernels: RMSNorm, RoPE, SwiGLU, the
        router's scoring, the casts, and the output head's cast + cross-entropy. Layer by layer, so
        that compile time is that of two layers (dense, MoE) and not of the whole model. The norms
        outside the layers (the trunk's final norm, each MTP depth's) are compiled too: eager, each is a
        dozen passes over the [tokens, hidden] activations in forward and backward.
        """
        for layer in [*self.layers, *(m.layer for m in self.mtp)]:
            layer.compile(mode=mode)
        for norm in [self.norm, *(n for m in self.mtp for n in m.norms())]:
            norm.compile(mode=mode)
        self._lm_loss = torch.compile(self._lm_loss, mode=mode)

    def enable_fp8(self, backend: str = "torch") -> list[str]:
        """Switch the dense and expert GEMMs to FP8 (train.precision=fp8, dsmtp.model.fp8's kernels, or
        te.Linear for the dense layers with backend "transformer_engine"); returns the switched modules' names.

        The router, embedding, output head and norms keep bf16/fp32; so do linear layers with a dimension
        that is not a multiple of 512 (in small.yaml MLA's wkv_a, 1024 -> 288, and wkv_b, 256 -> 2048).
        """
        if backend == "transformer_engine":
            fp8.require_transformer_engine()
        switched = []
        for name, module in self.named_modules():
            if isinstance(module, LocalGemm) and module is not self.head and fp8.eligible(module):
                module.fp8 = "te" if backend == "transformer_engine" else "torch"
                switched.append(name)
            elif isinstance(module, RoutedExperts):
                module.fp8 = True
                switched.append(name)
        return switched

    def set_attention_backend(self, backend: str) -> None:
        """Every MLA layer's attention kernel: "flash" or "sdpa" (kernels.resolve_attention_backend)."""
        for module in self.modules():
            if isinstance(module, MLA):
                module.attention_backend = backend

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

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from a hidden state (trunk or MTP depth): the shared output head."""
        return vocab.gather_vocab(self.head(gather_sequence(h)))

    def hidden_states(self, tokens: torch.Tensor, seq_len: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """tokens [B, S + F] = t_0 .. t_{S+F-1} (F = mtp.future_tokens) -> [h_0, h_1, .., h_D] (each
        [B, S, H]) and the aux loss. The tokens are embedded once for all depths."""
        cos, sin = self.rope(torch.arange(seq_len, device=tokens.device))
        emb = self.embed(tokens)
        h, aux = self.trunk(emb[:, :seq_len], cos, sin)
        mtp_hidden, mtp_aux = self.mtp.hidden_states(h, emb, cos, sin)
        return [h, *mtp_hidden], aux + mtp_aux

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                mtp_weight: float | torch.Tensor = 0.3) -> torch.Tensor | ModelOutput:
        """Without labels: the main logits [B, S, vocab]. With labels [B, S..S+D]: a ModelOutput."""
        s = input_ids.shape[1]
        cos, sin = self.rope(torch.arange(s, device=input_ids.device))
        # Under sequence parallelism (dsmtp.parallel.sequence) the trunk and MTP modules run on this
        # rank's sequence shard; the output head gathers it back. Identity otherwise.
        if labels is None:
            h, _ = self.trunk(scatter_sequence(self.embed(input_ids)), cos, sin)
            return self.logits(h)
        tokens, labels = self.mtp.inputs(input_ids, labels)
        emb = self.embed(tokens.clamp(min=0))
        h, aux = self.trunk(scatter_sequence(emb[:, :s]), cos, sin)
        return self.output(h, emb, tokens, labels, aux, cos, sin, mtp_weight)

    def output(self, h: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
               aux: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mtp_weight: float | torch.Tensor) -> ModelOutput:
        """Main and MTP losses from the trunk's final (post-norm) hidden state h [B, S, H], the tokens and
        labels from `mtp.inputs`, their embedding and the trunk's aux loss (a pipeline's last stage
        calls this directly)."""
        mtp = self.mtp.losses(h, emb, tokens, labels, cos, sin, self._lm_loss, list(self.head.parameters()), mtp_weight)
        main_loss, main_acc, main_n = mtp.main
        return ModelOutput(loss=main_loss + aux + mtp.objective, main_loss=main_loss.detach(),
                           main_accuracy=main_acc, mtp_losses=mtp.losses, mtp_accuracies=mtp.accuracies,
                           aux_loss=(aux + mtp.aux_loss).detach(), main_tokens=main_n, mtp_tokens=mtp.counts)

    def _lm_loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and top-1 accuracy over the positions that have a target, and their count."""
        h = gather_sequence(h)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        if self.head.unsplit and kernels.fuses_cross_entropy(h):
            per_token, correct = kernels.linear_cross_entropy(h, self.head.weight, safe_targets)
        else:
            logits = self.head(h)
            per_token, correct = vocab.cross_entropy(logits, safe_targets), vocab.top1_correct(logits, safe_targets)
        n = valid.sum()
        denom = n.clamp(min=1)
        accuracy = (correct & valid).sum() / denom
        loss = (per_token * valid).sum() / denom
        return loss, accuracy, n
