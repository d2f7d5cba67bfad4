"""KV cache for Multi-head Latent Attention.

Per layer and token MLA needs only what `MLA.latent` returns: the normed KV latent (kv_lora_rank) and
the rotated RoPE key shared by all heads (qk_rope_head_dim); attention runs over them in the absorbed
form (`MLA.attend_absorbed`), so per-head keys and values are never stored.

One `StackCache` per stack of layers that attends over its own past: the trunk, and each MTP module
(depth k's layer attends over depth k's own earlier positions). Every sequence of a batch has its own
length: new tokens are written at each sequence's own next positions, a query sees the cached keys up
to its own position (so right-padding of ragged prompts and stale entries past a length are never
seen), and rolling back rejected draft tokens is lowering a length.
"""

from __future__ import annotations

import torch

from dsmtp.config import ModelConfig


class LayerCache:
    """One layer's view of its stack's cache: what `MLA.forward(..., cache=)` talks to."""

    def __init__(self, stack: "StackCache", index: int):
        self.stack, self.index = stack, index

    def append(self, kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new tokens' latents [B, w, r] and rope keys [B, w, d] at the positions the stack
        handed out; return everything cached up to the furthest of them and the new tokens' positions."""
        pos = self.stack.positions
        kv_all, rope_all = self.stack.kv[self.index], self.stack.k_rope[self.index]
        kv_all.scatter_(1, pos[..., None].expand(-1, -1, kv.shape[-1]), kv.to(kv_all.dtype))
        rope_all.scatter_(1, pos[..., None].expand(-1, -1, k_rope.shape[-1]), k_rope.to(rope_all.dtype))
        return kv_all[:, :self.stack.end], rope_all[:, :self.stack.end], pos


class StackCache:
    def __init__(self, num_layers: int, batch: int, capacity: int, cfg: ModelConfig, dtype: torch.dtype,
                 device: torch.device):
        self.capacity = capacity
        self.kv = torch.zeros(num_layers, batch, capacity, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(num_layers, batch, capacity, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # tokens cached per sequence
        self.positions = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.end = 0  # one past the furthest position handed out by `begin`
        self.layers = [LayerCache(self, i) for i in range(num_layers)]

    def begin(self, width: int) -> torch.Tensor:
        """Hand out the next `width` positions of every sequence (counted as cached from now on) for
        the forward pass that follows; returns them [B, width]."""
        self.positions = self.lengths[:, None] + torch.arange(width, device=self.lengths.device)
        # What every layer's attention reads, known on the host once per forward pass: a host read per
        # layer would stall the GPU queue between layers.
        self.end = int(self.positions.max()) + 1 if width else 0
        if self.end > self.capacity:
            raise RuntimeError(f"KV cache overflow: position {self.end - 1} >= capacity {self.capacity}")
        self.lengths = self.lengths + width
        return self.positions

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep only the first `lengths[b]` tokens of sequence b (roll back rejected or padded ones);
        `lengths` never exceeds what is cached. Not checked here: reading the comparison back would
        stall the GPU several times per decoding step."""
        self.lengths = lengths.clone()

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the sequences not in `rows` (finished or cancelled), freeing their share of the work."""
        self.kv, self.k_rope = self.kv[:, rows], self.k_rope[:, rows]
        self.lengths = self.lengths[rows]

    def merge(self, other: "StackCache", capacity: int) -> None:
        """Append another cache's sequences, both grown to `capacity` positions."""

        def grown(t: torch.Tensor) -> torch.Tensor:
            pad = t.new_zeros(t.shape[0], t.shape[1], capacity - t.shape[2], t.shape[3])
            return torch.cat([t, pad], dim=2)

        self.kv = torch.cat([grown(self.kv), grown(other.kv)], dim=1)
        self.k_rope = torch.cat([grown(self.k_rope), grown(other.k_rope)], dim=1)
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.capacity = capacity

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies: (kv_lora_rank + qk_rope_head_dim) x layers x dtype size."""
        return (self.kv[:, 0, 0].nbytes + self.k_rope[:, 0, 0].nbytes)


class ModelCache:
    """The trunk's cache and one per MTP module."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.trunk = StackCache(cfg.num_layers, batch, capacity, cfg, dtype, device)
        self.mtp = [StackCache(1, batch, capacity, cfg, dtype, device) for _ in range(cfg.mtp_depth)]

    def stacks(self) -> list[StackCache]:
        return [self.trunk, *self.mtp]

    def keep(self, rows: torch.Tensor) -> None:
        for stack in self.stacks():
            stack.keep(rows)

    def merge(self, other: "ModelCache", capacity: int) -> None:
        for mine, theirs in zip(self.stacks(), other.stacks()):
            mine.merge(theirs, capacity)

    @property
    def bytes_per_token(self) -> int:
        return sum(stack.bytes_per_token for stack in self.stacks())

    @property
    def nbytes(self) -> int:
        return sum(stack.kv.nbytes + stack.k_rope.nbytes for stack in self.stacks())
