"""Fixed-length training samples cut from a split's token stream, in a seeded, resumable order.

A sample is S + D + 1 tokens (S = seq_len, D = extra_tokens: train.sample_extra_tokens, by default
mtp_depth): input_ids = sample[:, :S], labels = sample[:, 1:], so every MTP depth has targets. Sample k
starts at token k * S, so windows overlap by D + 1 tokens and every token is a main-loss target exactly
once per epoch.

The order is one infinite sequence of sample indices: epoch e is a permutation of all samples seeded
by (seed, e). Global batch b is entries [b * G, (b + 1) * G) of that sequence, G = micro_batch_size *
dp_size, and rank r takes its r-th micro-batch-sized slice. So ranks are disjoint, their union is the
dp_size=1 stream with micro-batch G, and the whole loader state is one position in the sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from dsmtp.data.errors import DataError
from dsmtp.data.shards import TokenSplit


def _num_samples(split: TokenSplit, name: str, seq_len: int, sample_len: int) -> int:
    if split.num_tokens < sample_len:
        raise DataError(
            f"the {name} split has {split.num_tokens} tokens, fewer than one sample of {sample_len} "
            "(seq_len + mtp_depth + 1): lower train.seq_len or add data (data.include, data.val_fraction)"
        )
    return (split.num_tokens - sample_len) // seq_len + 1


def _check_shape(seq_len: int, extra_tokens: int, micro_batch_size: int) -> None:
    if seq_len < 1 or extra_tokens < 0 or micro_batch_size < 1:
        raise DataError(f"need seq_len >= 1, extra_tokens >= 0, micro_batch_size >= 1; got "
                        f"{seq_len}, {extra_tokens}, {micro_batch_size}")


class TrainBatches:
    """Infinite iterator of LongTensor [micro_batch_size, seq_len + extra_tokens + 1] (this rank's slice)."""

    def __init__(self, data_dir: Union[str, Path], seq_len: int, extra_tokens: int, micro_batch_size: int,
                 seed: int, dp_rank: int = 0, dp_size: int = 1):
        _check_shape(seq_len, extra_tokens, micro_batch_size)
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.split = TokenSplit(data_dir, "train")
        self.seq_len, self.sample_len = seq_len, seq_len + extra_tokens + 1
        self.micro_batch_size, self.seed, self.dp_rank, self.dp_size = micro_batch_size, seed, dp_rank, dp_size
        self.num_samples = _num_samples(self.split, "train", seq_len, self.sample_len)
        self.position = 0  # index in the infinite sample sequence of the next global batch
        self._orders: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> torch.Tensor:
        first = self.position + self.dp_rank * self.micro_batch_size
        samples = [self._read(self._sample_index(k)) for k in range(first, first + self.micro_batch_size)]
        self.position += self.micro_batch_size * self.dp_size
        return torch.from_numpy(np.stack(samples).astype(np.int64))

    def _sample_index(self, k: int) -> int:
        epoch, i = divmod(k, self.num_samples)
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # a batch spans <= 2 epochs
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return int(self._orders[epoch][i])

    def _read(self, sample: int) -> np.ndarray:
        return self.split.read(sample * self.seq_len, self.sample_len)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "sample_len": self.sample_len, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch served before `state` was taken. micro_batch_size and dp_size
        may differ from the saved run's; data, seed and sample shape may not."""
        for key in ("seed", "seq_len", "sample_len", "num_samples"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"loader state has {key}={state.get(key)} but this loader has {getattr(self, key)}: resume "
                    "with the same data dir, train.seed, train.seq_len, model.mtp_depth and "
                    "train.sample_extra_tokens as the saved run"
                )
        self.position = int(state["position"])


def val_batches(data_dir: Union[str, Path], seq_len: int, extra_tokens: int, micro_batch_size: int,
                num_batches: int) -> list[torch.Tensor]:
    """`num_batches` LongTensors [micro_batch_size, seq_len + extra_tokens + 1] of distinct val samples
    spread evenly over the whole val split: the same on every call and every rank."""
    _check_shape(seq_len, extra_tokens, micro_batch_size)
    split = TokenSplit(data_dir, "val")
    sample_len = seq_len + extra_tokens + 1
    available = _num_samples(split, "val", seq_len, sample_len)
    needed = num_batches * micro_batch_size
    if needed > available:
        raise DataError(
            f"{num_batches} val batches of {micro_batch_size} need {needed} samples, the val split has "
            f"{available}: lower train.eval_batches or raise data.val_fraction"
        )
    starts = np.arange(needed, dtype=np.int64) * available // needed * seq_len
    samples = np.stack([split.read(int(s), sample_len) for s in starts]).astype(np.int64)
    return list(torch.from_numpy(samples).view(num_batches, micro_batch_size, sample_len).unbind(0))
