"""Belady's MIN (offline optimum): on a miss, evict the block whose next use is farthest
in the future (never used again counts as infinitely far).

It needs the whole future trace, so it is a bound, not a policy a server can run: no
algorithm, prefetching ones included, loads fewer blocks into a cache of the same size
(Belady 1966; Mattson et al. 1970). It also labels the discard bits of "Paging with
Succinct Predictions": a request's bit is 1 when this run evicts the block before its next
request (or it has none), the predictions the one-bit policies follow when perfect.
"""

from __future__ import annotations

import heapq
from typing import ClassVar

import numpy as np

from mpcache.serving.policies.base import Policy, SimResult, chunks
from mpcache.serving.traces import Trace


class Belady(Policy):
    name: ClassVar[str] = "belady"

    def run(self, trace: Trace, capacity: int) -> SimResult:
        return belady(trace, capacity)[0]


def belady(trace: Trace, capacity: int, record: bool = False) -> tuple[SimResult, np.ndarray | None]:
    """Simulate MIN; with `record`, also the discard bit of every access (bool [A])."""
    nxt = trace.next_use()
    n = trace.num_accesses
    cache: dict[int, int] = {}  # block -> index of its next use
    last: dict[int, int] = {}  # block -> index of its last access (record only)
    heap: list[tuple[int, int]] = []  # (-next use, block), stale entries skipped
    evicted_at: list[int] = []
    hits = misses = 0
    t = 0
    for blocks, nexts in chunks(trace.blocks, nxt):
        for b, nu in zip(blocks, nexts):
            if b in cache:
                hits += 1
            else:
                misses += 1
                if len(cache) >= capacity:
                    while True:
                        key, v = heapq.heappop(heap)
                        if cache.get(v) == -key:
                            break
                    del cache[v]
                    if record:
                        evicted_at.append(last[v])
            cache[b] = nu
            heapq.heappush(heap, (-nu, b))
            if len(heap) > 4 * capacity + 1024:  # drop stale entries
                heap = [(-u, v) for v, u in cache.items()]
                heapq.heapify(heap)
            if record:
                last[b] = t
            t += 1
    result = SimResult("belady", capacity, n, trace.num_requests, hits, misses)
    if not record:
        return result, None
    bits = nxt >= n  # never requested again: safe to evict
    bits[np.asarray(evicted_at, dtype=np.int64)] = True
    return result, bits
