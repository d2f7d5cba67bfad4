"""KV cache for Multi-head Latent Attention.

Per layer and token MLA needs only what `MLA.latent` returns: the normed KV latent (kv_lora_rank) and
the rotated RoPE key shared by all heads (qk_rope_head_dim); attention runs over them in the absorbed
form (`MLA.attend_absorbed`), so per-head keys and values are never stored. They are stored side by
side, [latent, rope key], as the keys every head attends over; the latent part is also the values.

One `StackCache` per stack of layers that attends over its own past: the trunk, and each MTP depth
(depth k's layer attends over depth k's own earlier positions). Every sequence of a batch has its own
length: new tokens are written at each sequence's own positions, a query sees the cached keys up
to its own position (so right-padding of ragged prompts and stale entries past a length are never
seen), and rolling back rejected draft tokens is lowering a length.

Two ways to hand out positions: `begin` (the next `width` after each sequence's length; attention
reads up to the furthest position, which the host reads once per forward pass) and `begin_at`
(positions given on the device; attention reads the whole capacity, masked per query: static shapes
for CUDA graphs, dsmtp.serve.static).
"""

from __future__ import annotations

from typing import Optional

import torch

from dsmtp.config import ModelConfig


class LayerCache:
    """One layer's view of its stack's cache: what `MLA.forward(..., cache=)` talks to."""

    def __init__(self, stack: "StackCache", index: int):
        self.stack, self.index = stack, index

    @property
    def from_start(self) -> bool:
        return self.stack.from_start

    def append(self, kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' latents [B, w, r] and rope keys [B, w, d] at the positions the stack
        handed out; return the cached keys [latent, rope key] up to the furthest position it reads
        [B, Skv, r + d], and the new tokens' positions [B, w]."""
        pos = self.stack.positions
        keys = self.stack.keys[self.index]
        keys.scatter_(1, pos[..., None].expand(-1, -1, keys.shape[-1]), torch.cat([kv, k_rope], dim=-1).to(keys.dtype))
        return keys[:, :self.stack.end], pos


class StackCache:
    def __init__(self, keys: torch.Tensor):
        """keys [layers, batch, capacity, kv_lora_rank + qk_rope_head_dim]: see `empty`."""
        self.keys = keys
        self.capacity = keys.shape[2]
        self.lengths = torch.zeros(keys.shape[1], dtype=torch.long, device=keys.device)  # tokens cached per sequence
        self.positions = torch.zeros(keys.shape[1], 0, dtype=torch.long, device=keys.device)
        self.end = 0  # one past the furthest position attention reads
        # Host-side: nothing was ever written (lengths all zero), and the pass that follows writes
        # positions 0..width-1 of every sequence (a prefill): plain causal attention over the new tokens.
        self.never_written = True
        self.from_start = False
        self.layers = [LayerCache(self, i) for i in range(keys.shape[0])]

    @classmethod
    def empty(cls, num_layers: int, batch: int, capacity: int, cfg: ModelConfig, dtype: torch.dtype,
              device: torch.device) -> "StackCache":
        return cls(torch.zeros(num_layers, batch, capacity, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype,
                               device=device))

    def rows(self, count: int) -> "StackCache":
        """A cache over the first `count` sequences' storage (a view: writes go to this cache)."""
        return StackCache(self.keys[:, :count])

    def begin(self, width: int, last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hand out the next `width` positions of every sequence (counted as cached from now on) for
        the forward pass that follows; returns them [B, width]. With `last` [B], a sequence with fewer
        positions to go repeats position last[b] instead of running past it (and past the capacity):
        the repeats recompute the same values."""
        self.from_start, self.never_written = self.never_written and last is None and width > 0, False
        self.positions = self.lengths[:, None] + torch.arange(width, device=self.lengths.device)
        if last is not None:
            self.positions = torch.minimum(self.positions, torch.maximum(last, self.lengths - 1)[:, None])
        # What every layer's attention reads, known on the host once per forward pass: a host read per
        # layer would stall the GPU queue between layers.
        self.end = int(self.positions.max()) + 1 if width else 0
        if self.end > self.capacity:
            raise RuntimeError(f"KV cache overflow: position {self.end - 1} >= capacity {self.capacity}")
        self.lengths = torch.maximum(self.lengths, self.positions[:, -1] + 1) if width else self.lengths
        return self.positions

    def begin_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Write the forward pass that follows at `positions` [B, w] (< capacity, on the device) and let
        attention read the whole capacity, masked per query: nothing is read back to the host."""
        self.positions = positions
        self.end = self.capacity
        self.from_start = self.never_written = False
        return positions

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep only the first `lengths[b]` tokens of sequence b (roll back rejected or padded ones);
        `lengths` never exceeds what is cached. Not checked here: reading the comparison back would
        stall the GPU several times per decoding step."""
        self.lengths = lengths.clone()

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the sequences not in `rows` (finished or cancelled), freeing their share of the work."""
        self.keys = self.keys[:, rows]
        self.lengths = self.lengths[rows]

    def merge(self, other: "StackCache", capacity: int) -> None:
        """Append another cache's sequences, both grown to `capacity` positions."""

        def grown(t: torch.Tensor) -> torch.Tensor:
            pad = t.new_zeros(t.shape[0], t.shape[1], capacity - t.shape[2], t.shape[3])
            return torch.cat([t, pad], dim=2)

        self.keys = torch.cat([grown(self.keys), grown(other.keys)], dim=1)
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.capacity = capacity
        self.from_start = self.never_written = False

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies: (kv_lora_rank + qk_rope_head_dim) x layers x dtype size."""
        return self.keys[:, 0, 0].nbytes


class ModelCache:
    """The trunk's cache and one per MTP depth."""

    def __init__(self, trunk: StackCache, mtp: list[StackCache]):
        self.trunk, self.mtp = trunk, mtp

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
              device: torch.device) -> "ModelCache":
        return cls(StackCache.empty(cfg.num_layers, batch, capacity, cfg, dtype, device),
                   [StackCache.empty(1, batch, capacity, cfg, dtype, device) for _ in range(cfg.mtp_depth)])

    def rows(self, count: int) -> "ModelCache":
        """Views over the first `count` sequences (see StackCache.rows)."""
        return ModelCache(self.trunk.rows(count), [stack.rows(count) for stack in self.mtp])

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
        return sum(stack.keys.nbytes for stack in self.stacks())
