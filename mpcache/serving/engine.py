"""A continuous-batching engine over the block pool (greedy decoding, CPU or GPU torch).

Each iteration admits waiting requests in the scheduler's order while memory allows,
prefills each admitted request's uncached prompt tokens (a forward of its own, reading
any shared prefix through its block table), then runs one batched decode step for every
running request. A request is admitted only when the pool can hold its whole prompt and
`max_new_tokens` on top of what running requests may still claim (free blocks plus
cached blocks nobody holds, which the prefix cache evicts LRU on demand), so a decode
step never runs out of blocks and nothing is preempted.

With prefix caching on, a prompt's full blocks enter the radix tree right after its
prefill (so requests admitted later in the same batch share them) and the generated
tokens' blocks when the request finishes (a follow-up turn can reuse the answer). The
tree's eviction sees the prompts of the next `lookahead` waiting requests, and with a
victim tier the head of the queue has its demoted blocks restored before its admission
(preemptive prefetch, into blocks no running request may still claim).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from mpcache.model.transformer import Transformer
from mpcache.serving.paged import PagedKVCache, Sequence, forward
from mpcache.serving.pool import BlockPool, PoolExhausted
from mpcache.serving.radix import PrefixCache


@dataclass
class Request:
    """One generation request: `prompt` token ids and how many tokens to generate (greedy)."""

    prompt: list[int]
    max_new_tokens: int
    rid: int = 0
    output: list[int] = field(default_factory=list)
    seq: Sequence | None = None
    ttft: float | None = None  # seconds from the start of the run to the first token
    finish: float | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    computed_tokens: int = 0  # prompt tokens run through the model

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a request needs a non-empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


class Scheduler:
    """First come, first served: requests in arrival order, at most `max_batch` running
    (None: memory is the only limit). Subclasses reorder and react to admissions."""

    name = "fcfs"

    def __init__(self, max_batch: int | None = 64) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.max_batch = max_batch

    def order(self, requests: list[Request]) -> list[Request]:
        return list(requests)

    def admitted(self, request: Request, engine: Engine) -> None:
        """Called after `request`'s prefill."""

    def finished(self, request: Request, engine: Engine) -> None:
        """Called after `request` released its blocks."""


@dataclass
class RunStats:
    requests: int
    generated_tokens: int
    prompt_tokens: int
    computed_prompt_tokens: int
    wall_s: float
    ttft_mean_s: float
    ttft_p90_s: float
    peak_blocks: int
    peak_kv_mib: float
    decode_steps: int
    mean_decode_batch: float
    cow_copies: int
    evicted_blocks: int
    demoted_blocks: int = 0  # evicted into the victim tier (counted in evicted_blocks)
    restored_blocks: int = 0  # brought back from the tier instead of recomputed (prefetched included)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def row(self) -> dict:
        out = dict(self.__dict__)
        out["tokens_per_s"] = self.tokens_per_s
        return out


class Engine:
    """Runs batches of `Request`s on `model` with KV in `pool` (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        pool: BlockPool,
        prefix_caching: bool = True,
        prefill_chunk: int = 1024,
        eos_id: int | None = None,
        prefix: PrefixCache | None = None,
        lookahead: int = 32,
    ) -> None:
        """prefix: the radix tree to use (eviction rule, victim tier); default an LRU one
        when `prefix_caching`. lookahead: waiting requests whose prompts eviction sees."""
        if prefill_chunk < 1 or lookahead < 0:
            raise ValueError(f"need prefill_chunk >= 1 and lookahead >= 0, got {prefill_chunk}, {lookahead}")
        if prefix is not None and prefix.pool is not pool:
            raise ValueError("the prefix cache must be built on the engine's pool")
        self.model, self.pool = model.eval(), pool
        self.prefix = prefix if prefix is not None else PrefixCache(pool) if prefix_caching else None
        self.prefill_chunk, self.eos_id, self.lookahead = prefill_chunk, eos_id, lookahead
        self.evicted = 0
        self._waiting: deque[Request] = deque()

    # ----------------------------------------------------------------- memory
    def _blocks_needed(self, request: Request) -> int:
        return -(-(len(request.prompt) + request.max_new_tokens) // self.pool.block_size)

    def _owed(self, running: Iterable[Request]) -> int:
        """Blocks running requests may still claim."""
        return sum(max(self._blocks_needed(r) - len(r.seq.blocks), 0) for r in running if r.seq is not None)

    def _claimable(self, running: Iterable[Request]) -> int:
        """Blocks an admission may take: free + evictable, minus what running requests may still claim."""
        evictable = self.prefix.evictable() if self.prefix is not None else 0
        return self.pool.num_free + evictable - self._owed(running)

    def ensure_free(self, n: int) -> None:
        if self.pool.num_free < n and self.prefix is not None:
            self.evicted += self.prefix.evict(n - self.pool.num_free)
        if self.pool.num_free < n:
            raise PoolExhausted(f"need {n} free blocks, {self.pool.num_free} left after evicting cached ones")

    def _try_admit(self, request: Request, running: list[Request]) -> bool:
        """Share the request's cached prefix and check that the rest fits; undo if not."""
        blocks, matched = [], 0
        if self.prefix is not None:
            self.prefix.upcoming = [r.prompt for r in itertools.islice(self._waiting, self.lookahead)]
            blocks, matched = self.prefix.match(request.prompt)
        matched = min(matched, len(request.prompt) - 1)  # the last prompt token is always computed
        need = self._blocks_needed(request) - matched // self.pool.block_size + 1  # +1: copy of a shared block
        if need > self._claimable(running):
            for block in blocks:
                self.pool.decref(block)
            if not running and need > self.pool.num_blocks:
                raise PoolExhausted(f"request {request.rid} needs {need} blocks, the pool has {self.pool.num_blocks}")
            return False
        request.seq = Sequence(self.pool, blocks, matched)
        request.cached_tokens = matched
        return True

    # -------------------------------------------------------------- the loop
    @torch.no_grad()
    def run(self, requests: list[Request], scheduler: Scheduler | None = None) -> RunStats:
        scheduler = scheduler or Scheduler()
        device = next(self.model.parameters()).device
        self.pool.reset_peak()
        copies0, self.evicted = self.pool.copies, 0
        prefix = self.prefix
        demoted0, restored0 = (prefix.demotions, prefix.restores) if prefix is not None else (0, 0)
        waiting = self._waiting = deque(scheduler.order(requests))
        running: list[Request] = []
        steps = batch_sum = 0
        start = time.perf_counter()
        while waiting or running:
            while waiting and (scheduler.max_batch is None or len(running) < scheduler.max_batch):
                request = waiting[0]
                if not self._try_admit(request, running):
                    break
                waiting.popleft()
                self._prefill(request, device, start)
                scheduler.admitted(request, self)
                if request.done:
                    self._finish(request, scheduler, start)
                else:
                    running.append(request)
            if not running:
                if waiting:
                    raise PoolExhausted("no request fits the pool even with nothing running")
                break
            if waiting and prefix is not None and prefix.tier is not None:
                prefix.prefetch(waiting[0].prompt, self.pool.num_free - self._owed(running))
            self._decode(running, device)
            steps, batch_sum = steps + 1, batch_sum + len(running)
            for request in [r for r in running if r.done]:
                running.remove(request)
                self._finish(request, scheduler, start)
        wall = time.perf_counter() - start
        ttft = sorted(r.ttft for r in requests if r.ttft is not None)
        return RunStats(
            requests=len(requests),
            generated_tokens=sum(len(r.output) for r in requests),
            prompt_tokens=sum(len(r.prompt) for r in requests),
            computed_prompt_tokens=sum(r.computed_tokens for r in requests),
            wall_s=wall,
            ttft_mean_s=sum(ttft) / max(len(ttft), 1),
            ttft_p90_s=ttft[min(int(0.9 * len(ttft)), len(ttft) - 1)] if ttft else 0.0,
            peak_blocks=self.pool.peak_used,
            peak_kv_mib=self.pool.peak_bytes / 2**20,
            decode_steps=steps,
            mean_decode_batch=batch_sum / max(steps, 1),
            cow_copies=self.pool.copies - copies0,
            evicted_blocks=self.evicted,
            demoted_blocks=prefix.demotions - demoted0 if prefix is not None else 0,
            restored_blocks=prefix.restores - restored0 if prefix is not None else 0,
        )

    def _prefill(self, request: Request, device: torch.device, start: float) -> None:
        seq = request.seq
        assert seq is not None
        todo = request.prompt[seq.num_tokens :]
        request.computed_tokens = len(todo)
        self.ensure_free(seq.blocks_for(len(request.prompt)) - len(seq.blocks) + 1)
        cache = PagedKVCache(self.model.config.n_layer, self.pool, [seq])
        logits = None
        for i in range(0, len(todo), self.prefill_chunk):
            ids = torch.tensor([todo[i : i + self.prefill_chunk]], device=device)
            logits = forward(self.model, cache, ids)
        assert logits is not None
        self._emit(request, int(logits[0, -1].argmax()))
        request.ttft = time.perf_counter() - start
        if self.prefix is not None:
            self.prefix.insert(request.prompt, seq.blocks)

    def _decode(self, running: list[Request], device: torch.device) -> None:
        bs, refs = self.pool.block_size, self.pool.refcount
        seqs = [r.seq for r in running if r.seq is not None]
        self.ensure_free(sum(s.max_length % bs == 0 or refs[s.blocks[-1]] > 1 for s in seqs))  # new or copied
        cache = PagedKVCache(self.model.config.n_layer, self.pool, seqs)
        ids = torch.tensor([[r.output[-1]] for r in running], device=device)
        tokens = forward(self.model, cache, ids)[:, -1].argmax(-1).tolist()
        for request, token in zip(running, tokens):
            self._emit(request, token)

    def _emit(self, request: Request, token: int) -> None:
        request.output.append(token)
        if self.eos_id is not None and token == self.eos_id:
            request.max_new_tokens = len(request.output)

    def _finish(self, request: Request, scheduler: Scheduler, start: float) -> None:
        seq = request.seq
        assert seq is not None
        if self.prefix is not None:
            self.prefix.insert(request.prompt + request.output[:-1], seq.blocks)  # tokens whose KV is stored
        seq.release()
        request.seq = None
        request.finish = time.perf_counter() - start
        scheduler.finished(request, self)
