"""The decoding engine: prefill, KV-cached decoding and MTP self-speculative decoding of a batch.

Notation, per sequence: t_0 .. t_n are its committed tokens (prompt and generated); t_n, the newest,
has not been through the trunk yet. The model's MTP design (dsmtp.model.mtp) says what feeds depth k:
the hidden state of depth `source(k)` at position j, and (if it has a `token_offset(k)` = o) the
embedding of t_{j+o}; depth k's output at position j proposes t_{j+k+1}. Between steps:
  - the trunk's cache holds positions 0 .. n-1, and hidden[0][j] is its output h_0 at position j;
  - depth k's cache holds a prefix of the positions whose inputs are committed (j + o <= n for a
    depth that reads tokens: as far as committed tokens reach); it catches up on the rest when it
    next drafts, so a depth the drafts do not reach costs nothing. hidden[k][j] is its output h_k.
Sequential modules (DeepSeek-V3): source k-1, offset k. Parallel heads (Gloeckle et al.): source 0,
no token, so every head's inputs are committed as soon as the trunk has run.
One step ("round") with K draft tokens:
  1. draft: depth k <= min(K, D) extends its cache to position n-1 (with the drafts so far as tokens)
     and its output there proposes t_{n+k}; past depth D a sequential design reuses its last module one
     position further, on its own previous output (as vLLM and SGLang do); then the MTP caches roll
     back to what the committed tokens determine;
  2. verify: one trunk forward over [t_n, d_1 .. d_K] gives the trunk's distributions p_1 .. p_{K+1};
  3. accept (dsmtp.serve.speculative): the a accepted drafts plus one token from the trunk; the
     trunk's cache is cut back to n+a+1 positions.
With K = 0 this is plain decoding: one trunk forward per token and no MTP work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dsmtp.model import DeepSeekV3
from dsmtp.serve import speculative
from dsmtp.serve.cache import ModelCache
from dsmtp.serve.logprobs import TokenLogprob, token_logprobs
from dsmtp.serve.sampling import BatchSampler, SamplingParams, draw


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()  # generation ends at these tokens (not returned)
    # Called with each step's new tokens and their logprobs (empty without `logprobs`); returning False
    # ends this sequence (client gone, stop string).
    on_tokens: Optional[Callable[[list[int], list[TokenLogprob]], bool]] = None
    logprobs: Optional[int] = None  # give each new token's log-probability and this many top alternatives


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (a stop token), "length" (max_new_tokens), "aborted" (on_tokens said so)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token when the request asked


@dataclass
class DecodeStats:
    """Counted per sequence and decoding step (the prefill's token is not a decoding step)."""

    draft_tokens: int  # K
    steps: int = 0  # trunk forwards per sequence
    step_tokens: int = 0  # tokens those forwards produced: accepted drafts + 1 each
    drafted: list[int] = field(default_factory=list)  # per draft position: steps that proposed one there
    accepted: list[int] = field(default_factory=list)  # ... and steps that accepted it (and all before it)

    def __post_init__(self):
        self.drafted = self.drafted or [0] * self.draft_tokens
        self.accepted = self.accepted or [0] * self.draft_tokens

    def record(self, num_accepted: list[int], k: int) -> None:
        """One decoding step of every sequence: how many of its k drafts each accepted."""
        self.steps += len(num_accepted)
        self.step_tokens += sum(num_accepted) + len(num_accepted)
        for i in range(k):
            self.drafted[i] += len(num_accepted)
            self.accepted[i] += sum(a > i for a in num_accepted)

    @property
    def acceptance(self) -> list[float]:
        """Per draft position i: the fraction of steps whose draft i was accepted."""
        return [a / d if d else float("nan") for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_forward(self) -> float:
        return self.step_tokens / self.steps if self.steps else float("nan")


def _gather(buffer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """buffer [B, C, H], positions [B, w] -> [B, w, H]."""
    return buffer.gather(1, positions[..., None].expand(-1, -1, buffer.shape[-1]))


def _pad_positions(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dimension 1 (positions) of [B, C, ...] to `length`."""
    pad = torch.zeros(t.shape[0], length - t.shape[1], *t.shape[2:], dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def _scatter(buffer: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    buffer.scatter_(1, positions[..., None].expand(-1, -1, buffer.shape[-1]), values.to(buffer.dtype))


class Batch:
    """The sequences being decoded together: tokens, caches, hidden states and random streams."""

    def __init__(self, engine: "Engine", requests: list[Request]):
        model, b = engine.model, len(requests)
        lengths = [len(r.prompt) for r in requests]
        # Positions written never pass the last prompt token + max_new_tokens + K (see Engine._step).
        capacity = max(p + r.max_new_tokens for p, r in zip(lengths, requests)) + engine.k
        self.requests = requests  # the ones still decoding (finished ones are dropped) ...
        self.results = [Result() for _ in requests]  # ... with their results, filled in as they go
        self.index = list(range(b))  # row -> position in requests / results
        self.seq = torch.zeros(b, capacity + 1, dtype=torch.long, device=engine.device)  # tokens by position
        for row, r in enumerate(requests):
            self.seq[row, :len(r.prompt)] = torch.tensor(r.prompt)
        self.n = torch.zeros(b, dtype=torch.long, device=engine.device)  # set by the prefill
        self.cache = ModelCache.empty(model.cfg, b, capacity, engine.dtype, engine.device)
        # Hidden states by position: the trunk's, and those of the MTP depths that draft (inputs of the
        # next depth and the drafts' logits); only the trunk's without speculation.
        depths = min(len(model.mtp), engine.k)
        self.hidden = [torch.zeros(b, capacity, model.cfg.hidden_size, dtype=engine.dtype, device=engine.device)
                       for _ in range(depths + 1)]
        self.sampler = BatchSampler([r.sampling for r in requests], engine.device)

    @property
    def size(self) -> int:
        return len(self.index)

    @property
    def capacity(self) -> int:
        return self.cache.trunk.capacity

    def keep(self, rows: torch.Tensor) -> None:
        self.seq, self.n = self.seq[rows], self.n[rows]
        self.hidden = [h[rows] for h in self.hidden]
        self.cache.keep(rows)
        self.sampler.keep(rows)
        # Forget finished requests, so a batch that keeps taking new ones does not grow.
        kept = [self.index[i] for i in rows.tolist()]
        self.requests, self.results = [self.requests[i] for i in kept], [self.results[i] for i in kept]
        self.index = list(range(len(kept)))

    def merge(self, other: "Batch") -> None:
        """Take in the sequences of another batch (prefilled by the same engine) to decode them together
        from the next step on: sequences are independent, so this is concatenation."""
        capacity = max(self.capacity, other.capacity)
        self.seq = torch.cat([_pad_positions(self.seq, capacity + 1), _pad_positions(other.seq, capacity + 1)])
        self.n = torch.cat([self.n, other.n])
        self.hidden = [torch.cat([_pad_positions(a, capacity), _pad_positions(b, capacity)])
                       for a, b in zip(self.hidden, other.hidden)]
        self.cache.merge(other.cache, capacity)
        self.sampler.merge(other.sampler)
        self.index += [len(self.requests) + i for i in other.index]
        self.requests = self.requests + other.requests
        self.results = self.results + other.results


class Engine:
    def __init__(self, model: DeepSeekV3, speculative_k: int = 0):
        if speculative_k < 0:
            raise ValueError(f"speculative_k={speculative_k} must be >= 0 (0 is plain decoding)")
        if speculative_k and not len(model.mtp):
            raise ValueError("speculative decoding drafts with the MTP modules, but this model has "
                             "model.mtp_depth=0: use speculative_k=0")
        limit = model.mtp.max_drafts
        if limit is not None and speculative_k > limit:
            raise ValueError(f"speculative_k={speculative_k}: this model's {model.cfg.mtp_kind} MTP drafts at most "
                             f"{limit} tokens per step (model.mtp_depth={model.cfg.mtp_depth}); use speculative_k <= {limit}")
        self.model = model.eval()
        self.k = speculative_k
        self.context = model.cfg.max_position_embeddings
        weight = model.embed.weight
        self.dtype, self.device = weight.dtype, weight.device

    def check_prompt(self, prompt: list[int]) -> None:
        """Raise ValueError naming the field when the model cannot read `prompt`."""
        vocab = self.model.cfg.vocab_size
        if not prompt:
            raise ValueError("prompt is empty: give at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt holds token ids outside [0, {vocab})")
        if len(prompt) > self.context:
            raise ValueError(f"prompt is {len(prompt)} tokens, the model's context is {self.context}: shorten it")

    def check(self, request: Request) -> None:
        """Raise ValueError naming the field when a request cannot run."""
        self.check_prompt(request.prompt)
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={request.max_new_tokens} must be >= 1")
        if len(request.prompt) + request.max_new_tokens > self.context:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceeds the model's context of {self.context} tokens: shorten one of them")

    def generate(self, requests: list[Request]) -> tuple[list[Result], DecodeStats]:
        """Decode `requests` to the end as one batch; results in request order."""
        stats = DecodeStats(self.k)
        if not requests:
            return [], stats
        batch, results = self.start(requests)
        while batch.size:
            self.step(batch, stats)
        return results, stats

    @torch.no_grad()
    def start(self, requests: list[Request]) -> tuple[Batch, list[Result]]:
        """Check and prefill `requests`: a batch whose first tokens are out, and the requests' results
        (filled in as they decode; finished requests leave the batch). `Batch.merge` the batch into a
        running one to serve it alongside (continuous batching)."""
        for request in requests:
            self.check(request)
        batch = Batch(self, requests)
        results = batch.results
        self._prefill(batch)
        return batch, results

    @torch.no_grad()
    def score(self, prompts: list[list[int]], top_n: int) -> list[list[TokenLogprob]]:
        """Per prompt, the log-probability of each token after the first given the tokens before it, with
        its `top_n` alternatives: trunk forwards without a cache, each over as many prompts as fit in the
        tokens of one full-context sequence."""
        for prompt in prompts:
            self.check_prompt(prompt)
        scored: list[list[TokenLogprob]] = []
        start = 0
        while start < len(prompts):
            end = start + 1
            while end < len(prompts) and (end + 1 - start) * max(map(len, prompts[start:end + 1])) <= self.context:
                end += 1
            scored += self._score(prompts[start:end], top_n)
            start = end
        return scored

    def _score(self, prompts: list[list[int]], top_n: int) -> list[list[TokenLogprob]]:
        width = max(map(len, prompts))  # right-padded: causal attention never sees the padding
        tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)
        cos, sin = self.model.rope(torch.arange(width, device=self.device))
        h, _ = self.model.trunk(self.model.embed(tokens), cos, sin)
        return [token_logprobs(self.model.logits(h[row, :len(p) - 1]), tokens[row, 1:len(p)], top_n)
                for row, p in enumerate(prompts)]

    @torch.no_grad()
    def step(self, batch: Batch, stats: DecodeStats) -> None:
        """One decoding step of every sequence in the batch; finished ones leave it."""
        self._step(batch, stats)

    # -- the forward passes, each appending to its stack's cache at every sequence's next positions

    def _trunk(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        stack = batch.cache.trunk
        cos, sin = self.model.rope(stack.begin(tokens.shape[1]))
        return self.model.trunk(self.model.embed(tokens), cos, sin, stack.layers)[0]

    def _mtp(self, batch: Batch, depth: int, positions: torch.Tensor, h_source: torch.Tensor,
             tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """Depth `depth` at `positions` [B, w] (handed out by its cache's `begin`), from its source's hidden
        states [B, w, H] and (for a design that reads them) the tokens there [B, w]."""
        cos, sin = self.model.rope(positions)
        embedding = None if tokens is None else self.model.embed(tokens)
        return self.model.mtp.step(depth, h_source, embedding, cos, sin, batch.cache.mtp[depth - 1].layers[0])[0]

    def _advance_mtp(self, batch: Batch, depth: int, upto: torch.Tensor) -> None:
        """Run MTP depth `depth` over its next positions up to `upto` [B] (inclusive) of each sequence."""
        stack = batch.cache.mtp[depth - 1]
        start = stack.lengths
        count = (upto - start + 1).clamp(min=0)
        width = int(count.max()) if batch.size else 0
        if width == 0:
            return
        # Rows of a batch go as far as the furthest (a row merged in later catches up over its whole
        # prompt): one with fewer positions to go repeats its last one.
        positions = stack.begin(width, last=upto)
        mtp = self.model.mtp
        offset = mtp.token_offset(depth)
        tokens = None if offset is None else batch.seq.gather(1, positions + offset)
        h = self._mtp(batch, depth, positions, _gather(batch.hidden[mtp.source(depth)], positions), tokens)
        _scatter(batch.hidden[depth], positions, h)
        stack.truncate(start + count)

    # -- decoding

    def _prefill(self, batch: Batch) -> None:
        lengths = torch.tensor([len(r.prompt) for r in batch.requests], device=batch.n.device)
        h = self._trunk(batch, batch.seq[:, :int(lengths.max())])  # ragged prompts are right-padded
        batch.cache.trunk.truncate(lengths)
        batch.hidden[0][:, :h.shape[1]] = h
        last = _gather(h, (lengths - 1)[:, None])
        logits = self.model.logits(last)
        p = batch.sampler.probabilities(logits)[:, 0]
        token = draw(p, batch.sampler.uniforms(1)[:, 0])
        batch.n = lengths.clone()
        batch.seq.scatter_(1, batch.n[:, None], token[:, None])
        self._emit(batch, [[t] for t in token.tolist()], logits)

    def _draft(self, batch: Batch, k: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Propose t_{n+1} .. t_{n+k} (written into batch.seq) with the MTP modules; returns the drafts
        [B, k] and the distributions they were drawn from [B, k, V]."""
        n, mtp = batch.n, self.model.mtp
        drafts, dists = [], []
        h = None
        for i in range(1, k + 1):
            if i <= mtp.depth:
                self._advance_mtp(batch, i, n - 1)
                h = _gather(batch.hidden[i], (n - 1)[:, None])
            else:  # sequential: reuse the last module one position further, on its own last output
                positions = batch.cache.mtp[mtp.depth - 1].begin(1)
                h = self._mtp(batch, mtp.depth, positions, h, batch.seq.gather(1, (n + i - 1)[:, None]))
            q = batch.sampler.probabilities(self.model.logits(h))[:, 0]
            token = draw(q, u[:, i - 1])
            batch.seq.scatter_(1, (n + i)[:, None], token[:, None])
            drafts.append(token)
            dists.append(q)
        for depth in range(1, mtp.depth + 1):  # keep what committed tokens determine
            offset = mtp.token_offset(depth)
            if offset is not None:
                stack = batch.cache.mtp[depth - 1]
                stack.truncate(torch.minimum(stack.lengths, (n - offset + 1).clamp(min=0)))
        return torch.stack(drafts, dim=1), torch.stack(dists, dim=1)

    def _step(self, batch: Batch, stats: DecodeStats) -> None:
        n = batch.n
        # RoPE covers positions < context; requests are checked so that only drafts beyond the last
        # token a request may produce would pass it, so fewer drafts near the end lose nothing.
        k = max(0, min(self.k, self.context - 1 - int(n.max())))
        u = batch.sampler.uniforms(2 * k + 1)
        if k:
            drafts, q = self._draft(batch, k, u[:, :k])
        else:
            drafts = n.new_zeros(batch.size, 0)
            q = torch.zeros(batch.size, 0, self.model.cfg.vocab_size, dtype=torch.float64, device=n.device)
        positions = n[:, None] + torch.arange(k + 1, device=n.device)
        h = self._trunk(batch, batch.seq.gather(1, positions))
        _scatter(batch.hidden[0], positions, h)
        logits = self.model.logits(h)
        p = batch.sampler.probabilities(logits)
        accepted, token = speculative.accept(drafts, q, p, u[:, k:])
        new_n = n + accepted + 1
        batch.seq.scatter_(1, new_n[:, None], token[:, None])
        batch.cache.trunk.truncate(new_n)
        batch.n = new_n
        # One copy to the host per step: per sequence, its accepted count and t_{n+1} .. t_{n+k+1}, of
        # which the first accepted + 1 are new.
        window = batch.seq.gather(1, positions + 1)
        host = torch.cat([accepted[:, None], window], dim=1).tolist()
        stats.record([row[0] for row in host], k)
        self._emit(batch, [row[1:row[0] + 2] for row in host], logits)

    def _emit(self, batch: Batch, new_tokens: list[list[int]], logits: torch.Tensor) -> None:
        """Hand each sequence its new tokens (logits [B, w, V]: the distributions they were drawn from,
        for the requests that ask for logprobs), cut at a stop token or max_new_tokens; drop finished rows."""
        keep = []
        for row, tokens in enumerate(new_tokens):
            request, result = batch.requests[batch.index[row]], batch.results[batch.index[row]]
            logprobs = [] if request.logprobs is None else token_logprobs(
                logits[row, :len(tokens)], torch.tensor(tokens, device=logits.device), request.logprobs)
            emitted = []
            for token in tokens:
                if token in request.stop_ids:
                    result.finish_reason = "stop"
                    break
                emitted.append(token)
                if len(result.tokens) + len(emitted) == request.max_new_tokens:
                    result.finish_reason = "length"
                    break
            logprobs = logprobs[:len(emitted)]
            result.tokens.extend(emitted)
            result.logprobs.extend(logprobs)
            if emitted and request.on_tokens is not None and request.on_tokens(emitted, logprobs) is False:
                result.finish_reason = result.finish_reason or "aborted"
            if not result.finish_reason:
                keep.append(row)
        if len(keep) < batch.size:
            batch.keep(torch.tensor(keep, dtype=torch.long, device=self.device))
