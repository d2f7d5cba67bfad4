"""Decoding with static shapes over a preallocated cache: each decoding step is one CUDA graph on CUDA.

The dynamic engine (dsmtp.serve.engine.Engine) sizes everything to the batch in hand and reads the
device a few times per step to do so; on a GPU its time goes to launching about a thousand small
kernels per token from Python. This engine keeps every tensor at a fixed shape, so one step (MTP
drafts, the trunk's verify pass, acceptance, sampling) can be captured once per batch-size bucket
and replayed, as gpt-fast, vLLM and SGLang do:

  - the cache and the token, position and hidden-state buffers hold `max_batch` rows ("slots") of
    `capacity` positions; a request takes a free slot for its lifetime;
  - a step runs the rows [0, b) of the smallest bucket b covering the busy slots; rows not decoding
    (free, or another batch's) compute but change nothing that matters: their length stays, and
    what they write lies at or past their own frontier, which a later step rewrites before reading;
  - attention reads the whole capacity, masked per query (StackCache.begin_at), and the MoE layers
    route without host synchronisation (dsmtp.model.moe);
  - MTP depth k recomputes a window of the last K + 1 positions each step instead of catching up
    on a varying number: at most K + 1 tokens are committed per step, so the window covers every
    position whose inputs changed, and recomputing committed ones rewrites the same values;
  - the one host read per step is the accepted count and the new tokens (which decide stops).

Prefill stays dynamic (one forward per new batch of requests, then copied into the slots). Without
CUDA, or with `cuda_graphs=False`, the same step runs eagerly: the CPU tests compare it with the
dynamic engine, and the GPU tests compare graphed with eager.
"""

from __future__ import annotations

from typing import Optional

import torch

from dsmtp.model import DeepSeekV3, kernels
from dsmtp.serve import speculative
from dsmtp.serve.cache import ModelCache
from dsmtp.serve.engine import DecodeStats, Engine, Request, Result
from dsmtp.serve.sampling import BatchSampler, distributions, draw


class SlotBatch:
    """Sequences decoding in the static engine: the i-th request lives in cache row `slots[i]`. Same
    interface as the dynamic engine's Batch (size, requests/results/index, keep, merge)."""

    def __init__(self, engine: "StaticEngine", requests: list[Request], slots: list[int]):
        self.engine, self.requests, self.slots = engine, requests, slots
        self.results = [Result() for _ in requests]
        self.index = list(range(len(requests)))

    @property
    def size(self) -> int:
        return len(self.index)

    def keep(self, rows: torch.Tensor) -> None:
        kept = rows.tolist()
        for row, slot in enumerate(self.slots):
            if row not in kept:
                self.engine.release(slot)
        order = [self.index[i] for i in kept]
        self.slots = [self.slots[i] for i in kept]
        self.requests, self.results = [self.requests[i] for i in order], [self.results[i] for i in order]
        self.index = list(range(len(kept)))

    def merge(self, other: "SlotBatch") -> None:
        self.index += [len(self.requests) + i for i in other.index]
        self.requests = self.requests + other.requests
        self.results = self.results + other.results
        self.slots = self.slots + other.slots


class StaticEngine(Engine):
    def __init__(self, model: DeepSeekV3, speculative_k: int = 0, max_batch: int = 8,
                 max_length: Optional[int] = None, cuda_graphs: Optional[bool] = None):
        """`max_batch` slots of `max_length` positions (default: the model's context); CUDA graphs on CUDA
        unless `cuda_graphs` is False. A model whose layers are compiled (DeepSeekV3.compile_layers)
        fuses its elementwise work into fewer kernels per graph."""
        super().__init__(model, speculative_k)
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        cfg, device, k = model.cfg, self.device, self.k
        self.capacity = min(max_length or self.context, self.context)
        self.max_batch = max_batch
        self.use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.use_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.buckets = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.free = list(range(max_batch))
        # Depths that draft: with K = 0 none; past D a sequential design reuses its last module.
        self.depths = min(model.mtp.depth, k)
        capacity = self.capacity
        self.cache = ModelCache.empty(cfg, max_batch, capacity, self.dtype, device)
        self.seq = torch.zeros(max_batch, capacity + 1, dtype=torch.long, device=device)  # tokens by position
        self.n = torch.zeros(max_batch, dtype=torch.long, device=device)  # position of each row's newest token
        self.decoding = torch.zeros(max_batch, dtype=torch.bool, device=device)  # rows this step advances
        self.hidden = [torch.zeros(max_batch, capacity, cfg.hidden_size, dtype=self.dtype, device=device)
                       for _ in range(self.depths + 1)]
        self.temperature = torch.zeros(max_batch, dtype=torch.float64, device=device)
        self.top_k = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.top_p = torch.ones(max_batch, dtype=torch.float64, device=device)
        self.uniforms = torch.zeros(max_batch, 2 * k + 1, dtype=torch.float64, device=device)
        self.out = torch.zeros(max_batch, k + 2, dtype=torch.long, device=device)  # accepted, then new tokens
        self.logits = torch.zeros(max_batch, k + 1, cfg.vocab_size, dtype=self.dtype, device=device)  # for logprobs
        self.generators: dict[int, torch.Generator] = {}  # per busy slot: its request's random stream
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.views = {b: self.cache.rows(b) for b in self.buckets}  # fixed per bucket: what graphs capture
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # -- slots and requests

    def check(self, request: Request) -> None:
        super().check(request)
        if len(request.prompt) + request.max_new_tokens > self.capacity:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceeds the decode cache of {self.capacity} positions: shorten one of them or "
                             "raise the engine's max_length")

    def release(self, slot: int) -> None:
        self.generators.pop(slot, None)
        self.free.append(slot)
        self.free.sort()

    def generate(self, requests: list[Request]) -> tuple[list[Result], DecodeStats]:
        """Decode `requests` to the end; more than `max_batch` take slots as earlier ones finish."""
        stats = DecodeStats(self.k)
        waiting, results = list(requests), []
        batch: Optional[SlotBatch] = None
        while waiting or (batch is not None and batch.size):
            if waiting and self.free:
                joining, joining_results = self.start(waiting[:len(self.free)])
                waiting, results = waiting[len(joining.requests):], results + joining_results
                batch = joining if batch is None else (batch.merge(joining) or batch)
            self.step(batch, stats)
        return results, stats

    @torch.no_grad()
    def start(self, requests: list[Request]) -> tuple[SlotBatch, list[Result]]:
        """Check `requests`, give each a free slot and prefill them: the dynamic engine's forward over
        the prompts (and, to draft, each MTP depth's), copied into the slots."""
        for request in requests:
            self.check(request)
        if len(requests) > len(self.free):
            raise ValueError(f"{len(requests)} requests but {len(self.free)} free slots of {self.max_batch}: "
                             "wait for some to finish or raise max_batch")
        slots, self.free = self.free[:len(requests)], self.free[len(requests):]
        batch = SlotBatch(self, requests, slots)
        try:
            self._prefill(batch)
        except BaseException:
            batch.keep(torch.zeros(0, dtype=torch.long))
            raise
        return batch, batch.results

    def _prefill(self, batch: SlotBatch) -> None:
        model, mtp = self.model, self.model.mtp
        lengths = [len(r.prompt) for r in batch.requests]
        width = max(lengths)
        slots = torch.tensor(batch.slots, device=self.device)
        prompts = torch.zeros(len(lengths), width + self.k + 1, dtype=torch.long, device=self.device)
        for row, r in enumerate(batch.requests):
            prompts[row, :len(r.prompt)] = torch.tensor(r.prompt)
        cache = ModelCache.empty(model.cfg, len(lengths), width, self.dtype, self.device)
        positions = torch.arange(width, device=self.device).expand(len(lengths), -1)
        cos, sin = model.rope(cache.trunk.begin_at(positions))
        h = model.trunk(model.embed(prompts[:, :width]), cos, sin, cache.trunk.layers)[0]
        n = torch.tensor(lengths, device=self.device)
        sampler = BatchSampler([r.sampling for r in batch.requests], self.device)
        last = h.gather(1, (n - 1).view(-1, 1, 1).expand(-1, 1, h.shape[-1]))
        logits = model.logits(last)
        token = draw(sampler.probabilities(logits)[:, 0], sampler.uniforms(1)[:, 0])
        prompts.scatter_(1, n[:, None], token[:, None])
        hidden = [h]
        for depth in range(1, self.depths + 1):  # every depth over the prompt, as far as it reaches
            offset = mtp.token_offset(depth)
            tokens = None if offset is None else model.embed(prompts[:, offset:offset + width])
            stack = cache.mtp[depth - 1]
            cos, sin = model.rope(stack.begin_at(positions))
            hidden.append(mtp.step(depth, hidden[mtp.source(depth)], tokens, cos, sin, stack.layers[0])[0])
        for mine, theirs in zip(self.cache.stacks(), cache.stacks()):
            mine.keys[:, slots, :width] = theirs.keys
        for mine, theirs in zip(self.hidden, hidden):
            mine[slots, :width] = theirs
        self.seq[slots] = 0
        self.seq[slots, :width + 1] = prompts[:, :width + 1]
        self.n[slots] = n
        self.generators.update(zip(batch.slots, sampler.generators))
        self.temperature[slots] = sampler.temperature
        self.top_k[slots] = sampler.top_k
        self.top_p[slots] = sampler.top_p
        self._emit(batch, [[t] for t in token.tolist()], logits)

    # -- one decoding step

    @torch.no_grad()
    def step(self, batch: SlotBatch, stats: DecodeStats) -> None:
        """One decoding step of every sequence in the batch; finished ones leave it (and free their slot)."""
        if not batch.size:
            return
        bucket = next(b for b in self.buckets if b > max(batch.slots))
        decoding = torch.zeros(self.max_batch, dtype=torch.bool)
        decoding[batch.slots] = True
        uniforms = torch.zeros(self.max_batch, 2 * self.k + 1, dtype=torch.float64)
        for slot in batch.slots:  # a fixed count per step from each request's own stream, as the dynamic engine
            uniforms[slot] = torch.rand(2 * self.k + 1, generator=self.generators[slot], dtype=torch.float64)
        self.decoding.copy_(decoding, non_blocking=True)
        self.uniforms.copy_(uniforms, non_blocking=True)
        sampled = any(r.sampling.temperature > 0 for r in batch.requests)
        if self.use_graphs:
            self._graph(bucket, sampled).replay()
        else:
            with kernels.static_shapes():
                self._step(bucket, sampled)
        out = self.out[batch.slots].tolist()  # the step's one read: accepted count and the new tokens
        stats.record([row[0] for row in out], self.k)
        self._emit(batch, [row[1:row[0] + 2] for row in out], self.logits[batch.slots])

    def _graph(self, bucket: int, sampled: bool) -> torch.cuda.CUDAGraph:
        key = (bucket, sampled)
        if key not in self.graphs:
            # Warm-up runs (lazy initialisation, autotuning) advance no row, then the capture; a capture
            # records the kernels without running them.
            decoding = self.decoding.clone()
            self.decoding.zero_()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), kernels.static_shapes():
                for _ in range(2):
                    self._step(bucket, sampled)
            torch.cuda.current_stream().wait_stream(stream)
            self.decoding.copy_(decoding)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), kernels.static_shapes():
                self._step(bucket, sampled)
            self.graphs[key] = graph
        return self.graphs[key]

    def _distributions(self, logits: torch.Tensor, b: int, sampled: bool) -> torch.Tensor:
        return distributions(logits, self.temperature[:b], self.top_k[:b], self.top_p[:b],
                             filters=(sampled, sampled, sampled))

    def _step(self, b: int, sampled: bool) -> None:
        """One step of rows [0, b), all on the device and of fixed shape (what a CUDA graph captures)."""
        model, k, last = self.model, self.k, self.capacity - 1
        n, seq, u = self.n[:b], self.seq[:b], self.uniforms[:b]
        cache = self.views[b]
        if k:
            drafts, q = self._draft(b, cache, sampled)
        positions = (n[:, None] + torch.arange(k + 1, device=n.device)).clamp(max=last)
        cos, sin = model.rope(cache.trunk.begin_at(positions))
        h = model.trunk(model.embed(seq.gather(1, positions)), cos, sin, cache.trunk.layers)[0]
        self.hidden[0][:b].scatter_(1, positions[..., None].expand_as(h), h)
        logits = model.logits(h)
        self.logits[:b] = logits
        p = self._distributions(logits, b, sampled)
        if k:
            accepted, token = speculative.accept(drafts, q, p, u[:, k:])
        else:
            accepted, token = torch.zeros_like(n), draw(p[:, 0], u[:, 0])
        decoding = self.decoding[:b]
        new_n = torch.where(decoding, (n + accepted + 1).clamp(max=last), n)
        token = torch.where(decoding, token, seq.gather(1, new_n[:, None])[:, 0])
        seq.scatter_(1, new_n[:, None], token[:, None])
        self.out[:b, 0] = accepted
        self.out[:b, 1:] = seq.gather(1, positions + 1)
        n.copy_(new_n)

    def _draft(self, b: int, cache: ModelCache, sampled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K drafts [b, K] and their distributions [b, K, V]; draft i is written at position n + i."""
        model, mtp, k, last = self.model, self.model.mtp, self.k, self.capacity - 1
        n, seq, u = self.n[:b], self.seq[:b], self.uniforms[:b, :k]
        window = (n[:, None] - k - 1 + torch.arange(k + 1, device=n.device)).clamp(min=0)  # n-1-K .. n-1
        drafts, dists = [], []
        h = None
        for i in range(1, k + 1):
            if i <= self.depths:
                source = self.hidden[mtp.source(i)][:b]
                h_source = source.gather(1, window[..., None].expand(-1, -1, source.shape[-1]))
                offset = mtp.token_offset(i)
                tokens = None if offset is None else model.embed(seq.gather(1, (window + offset).clamp(max=last)))
                stack = cache.mtp[i - 1]
                cos, sin = model.rope(stack.begin_at(window))
                h_window = mtp.step(i, h_source, tokens, cos, sin, stack.layers[0])[0]
                self.hidden[i][:b].scatter_(1, window[..., None].expand_as(h_window), h_window)
                h = h_window[:, -1:]
            else:  # sequential: the last module D once more, one position further, on its own output;
                # at position j it reads t_{j+D} and proposes t_{j+D+1} = t_{n+i}
                position = (n + i - 1 - mtp.depth).clamp(max=last)[:, None]
                stack = cache.mtp[mtp.depth - 1]
                cos, sin = model.rope(stack.begin_at(position))
                token_embedding = model.embed(seq.gather(1, (n + i - 1).clamp(max=last)[:, None]))
                h = mtp.step(mtp.depth, h, token_embedding, cos, sin, stack.layers[0])[0]
            q = self._distributions(model.logits(h), b, sampled)[:, 0]
            token = draw(q, u[:, i - 1])
            seq.scatter_(1, (n + i).clamp(max=last + 1)[:, None], token[:, None])
            drafts.append(token)
            dists.append(q)
        return torch.stack(drafts, dim=1), torch.stack(dists, dim=1)


def engine_kind(device: torch.device, requested: Optional[str] = None) -> str:
    """`requested`, else the static engine on CUDA and the dynamic (reference) engine elsewhere."""
    return requested or ("static" if device.type == "cuda" else "dynamic")


def make_engine(model: DeepSeekV3, speculative_k: int, kind: Optional[str] = None, max_batch: int = 8,
                max_length: Optional[int] = None) -> Engine:
    """The engine `engine_kind` picks for the model's device; the static one sized for `max_batch` requests of
    up to `max_length` positions (default: the model's context)."""
    if engine_kind(model.embed.weight.device, kind) == "static":
        return StaticEngine(model, speculative_k, max_batch=max_batch, max_length=max_length)
    return Engine(model, speculative_k)


def compile_for_decoding(model: DeepSeekV3) -> None:
    """torch.compile the model's layers for decoding. Each batch bucket, draft count and prefill width is a
    shape of its own: past dynamo's default of 8 compiled variants a layer would fall back to eager kernels."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model.compile_layers()


def add_engine_arguments(parser) -> None:
    """--engine and --compile, as generate, serve and tools/bench_decode.py take them."""
    parser.add_argument("--engine", choices=["static", "dynamic"], default=None,
                        help="static: CUDA-graphed steps over a preallocated cache (default on CUDA); dynamic: the "
                             "reference engine (default elsewhere)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the layers first: fewer, fused kernels per step (minutes of compiling)")
