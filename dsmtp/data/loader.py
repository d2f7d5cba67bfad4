"""Fixed-length training samples cut from a split's token stream, in a seeded, resumable order.

A sample is S + D + 1 tokens (S = seq_len, D = extra_tokens: train.sample_extra_tokens, by default
mtp_depth): input_ids = sample[:, :S], labels = sample[:, 1:], so every MTP depth has targets. Sample k
starts at token k * S, so windows overlap by D + 1 tokens and every token is a main-loss target exactly
once per epoch.

The order is one infinite sequence of samples. Global batch b is entries [b * G, (b + 1) * G) of that
sequence, G = micro_batch_size * dp_size, and rank r takes its r-th micro-batch-sized slice. So ranks
are disjoint, and their union is the dp_size=1 stream with micro-batch G.

Sources (data.sources) mix: each source has its own samples, cut from its own stream as above, served
in its own order: its epoch e is a permutation seeded by (seed, e, source index), by (seed, e) for the
first source, so a one-source data dir orders samples as before mixtures existed. Which source serves
entry k of the sequence is drawn with probabilities proportional to the weights, from a generator
seeded by (seed, MIX_STREAM, k // MIX_BLOCK); each source counts the samples it has served. The loader
state is the position in the sequence and those counts, so a resumed run draws the same next samples.
A source drawn more often than it has samples repeats (epochs), as one with a small weight does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from dsmtp.data.errors import DataError
from dsmtp.data.shards import TokenSplit, TokenStream

MIX_BLOCK = 1 << 16  # source draws are made this many at a time
MIX_STREAM = 0x6D6978  # in the draws' seeds, apart from the orders' seeds


def _num_samples(stream: TokenStream, name: str, seq_len: int, sample_len: int) -> int:
    if stream.num_tokens < sample_len:
        raise DataError(
            f"the {name} has {stream.num_tokens} tokens, fewer than one sample of {sample_len} "
            "(seq_len + mtp_depth + 1): lower train.seq_len or add data (data.sources, data.val_fraction)"
        )
    return (stream.num_tokens - sample_len) // seq_len + 1


def _check_shape(seq_len: int, extra_tokens: int, micro_batch_size: int) -> None:
    if seq_len < 1 or extra_tokens < 0 or micro_batch_size < 1:
        raise DataError(f"need seq_len >= 1, extra_tokens >= 0, micro_batch_size >= 1; got "
                        f"{seq_len}, {extra_tokens}, {micro_batch_size}")


class TrainBatches:
    """Infinite iterator of LongTensor [micro_batch_size, seq_len + extra_tokens + 1] (this rank's slice)."""

    def __init__(self, data_dir: Union[str, Path], seq_len: int, extra_tokens: int, micro_batch_size: int,
                 seed: int, dp_rank: int = 0, dp_size: int = 1, weights: Optional[dict[str, float]] = None):
        """weights: each source's weight by name (data.sources); None: those the data dir was prepared with."""
        _check_shape(seq_len, extra_tokens, micro_batch_size)
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.split = TokenSplit(data_dir, "train")
        self.seq_len, self.sample_len = seq_len, seq_len + extra_tokens + 1
        self.micro_batch_size, self.seed, self.dp_rank, self.dp_size = micro_batch_size, seed, dp_rank, dp_size
        self.sources = self.split.sources
        self.weights = self._weights(Path(data_dir), weights)
        self.streams = [self.split.source(name) for name in self.sources]
        many = len(self.sources) > 1
        self.source_samples = [
            _num_samples(stream, f"train split of source {name}" if many else "train split", seq_len, self.sample_len)
            if weight > 0 else 0 for name, stream, weight in zip(self.sources, self.streams, self.weights)]
        self.num_samples = sum(self.source_samples)
        self.position = 0  # index in the infinite sample sequence of the next global batch
        self.drawn = [0] * len(self.sources)  # samples each source has served
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._draws: dict[int, np.ndarray] = {}

    def _weights(self, data_dir: Path, weights: Optional[dict[str, float]]) -> np.ndarray:
        if weights is None:
            weights = {s["name"]: s["weight"] for s in self.split.manifest.get("sources", [{"name": None, "weight": 1}])}
        names = list(weights)
        if self.sources == [None] and len(names) == 1:  # prepared before data.sources: its one source
            names = [None]
        if names != self.sources:
            raise DataError(f"data.data_dir={data_dir} was prepared from the sources {self.sources}, but data.sources "
                            f"names {list(weights)}: run `dsmtp prepare --config CONFIG` with this config")
        values = np.array(list(weights.values()), dtype=np.float64)
        return values / values.sum()

    @property
    def epoch(self) -> int:
        """The fewest full passes any drawn source has made over its samples."""
        return min(d // n for d, n in zip(self.drawn, self.source_samples) if n)

    def source_tokens(self) -> dict[str, int]:
        """Main-loss tokens each source has served over all ranks (seq_len per sample)."""
        return {str(name): d * self.seq_len for name, d in zip(self.sources, self.drawn)}

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> torch.Tensor:
        mine = range(self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size)
        samples = []
        for j in range(self.micro_batch_size * self.dp_size):  # every rank counts the whole global batch
            source = self._source_of(self.position + j)
            if j in mine:
                samples.append(self._read(source, self._sample_index(source, self.drawn[source])))
            self.drawn[source] += 1
        self.position += self.micro_batch_size * self.dp_size
        return torch.from_numpy(np.stack(samples).astype(np.int64))

    def _source_of(self, k: int) -> int:
        if len(self.sources) == 1:
            return 0
        block, i = divmod(k, MIX_BLOCK)
        if block not in self._draws:
            self._draws = {b: d for b, d in self._draws.items() if b >= block - 1}
            rng = np.random.default_rng([self.seed, MIX_STREAM, block])
            self._draws[block] = rng.choice(len(self.sources), size=MIX_BLOCK, p=self.weights)
        return int(self._draws[block][i])

    def _sample_index(self, source: int, j: int) -> int:
        """The j-th sample `source` serves."""
        epoch, i = divmod(j, self.source_samples[source])
        if (source, epoch) not in self._orders:
            # a global batch spans <= 2 epochs of a source
            self._orders = {k: o for k, o in self._orders.items() if k[0] != source or k[1] >= epoch - 1}
            seed = [self.seed, epoch] + ([source] if source else [])
            self._orders[source, epoch] = np.random.default_rng(seed).permutation(self.source_samples[source])
        return int(self._orders[source, epoch][i])

    def _read(self, source: int, sample: int) -> np.ndarray:
        return self.streams[source].read(sample * self.seq_len, self.sample_len)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "sample_len": self.sample_len, "num_samples": self.num_samples, "sources": self.sources,
                "source_samples": self.source_samples, "drawn": list(self.drawn), "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch served before `state` was taken. micro_batch_size, dp_size and the
        weights may differ from the saved run's; data, seed and sample shape may not."""
        for key in ("seed", "seq_len", "sample_len", "num_samples"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"loader state has {key}={state.get(key)} but this loader has {getattr(self, key)}: resume "
                    "with the same data dir, train.seed, train.seq_len, model.mtp_depth and "
                    "train.sample_extra_tokens as the saved run"
                )
        position = int(state["position"])
        drawn = state.get("drawn", [position])  # a state from before mixtures: one source
        named = [a == b or None in (a, b) for a, b in zip(state.get("sources", self.sources), self.sources)]
        if len(drawn) != len(self.sources) or not all(named) or \
                state.get("source_samples", self.source_samples) != self.source_samples:
            raise DataError(f"loader state has the sources {state.get('sources', [None])} but this data dir has "
                            f"{self.sources}: resume with the data dir and data.sources of the saved run")
        self.position, self.drawn = position, [int(d) for d in drawn]


def val_batches(data_dir: Union[str, Path], seq_len: int, extra_tokens: int, micro_batch_size: int,
                num_batches: int) -> list[torch.Tensor]:
    """`num_batches` LongTensors [micro_batch_size, seq_len + extra_tokens + 1] of distinct val samples
    spread evenly over the whole val split: the same on every call and every rank."""
    _check_shape(seq_len, extra_tokens, micro_batch_size)
    split = TokenSplit(data_dir, "val")
    sample_len = seq_len + extra_tokens + 1
    available = _num_samples(split, "val split", seq_len, sample_len)
    needed = num_batches * micro_batch_size
    if needed > available:
        raise DataError(
            f"{num_batches} val batches of {micro_batch_size} need {needed} samples, the val split has "
            f"{available}: lower train.eval_batches or raise data.val_fraction"
        )
    starts = np.arange(needed, dtype=np.int64) * available // needed * seq_len
    samples = np.stack([split.read(int(s), sample_len) for s in starts]).astype(np.int64)
    return list(torch.from_numpy(samples).view(num_batches, micro_batch_size, sample_len).unbind(0))
