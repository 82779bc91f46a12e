"""LSM-GNN's hybrid eviction with a victim buffer and preemptive prefetch (Park et al.,
arXiv 2407.15264), recast for KV blocks.

LSM-GNN's GPU feature cache evicts with "both static and dynamic node information": a
static importance of each node and the reuse the sampler's look-ahead queue already knows;
victims with a known future reuse are demoted to a host-memory victim buffer instead of
being dropped, and the buffer is copied back before the mini-batch that needs them
(Preemptive Victim-buffer Prefetcher). Here: nodes -> KV blocks, mini-batches -> requests,
the look-ahead queue -> the scheduler's waiting queue (its prompts are known):

- priority = last access + `weight` * capacity * log2(requests the block served), the count
  taken in four levels (1, 2-3, 4-15, 16+; the static part: how many requests' prefixes the
  block serves, blended with recency; weight 0 is LRU); the lowest priority is evicted
  first (one LRU list per level, so an eviction compares four list heads),
- a block needed by the current request or the next `protect` - 1 gets a second chance (refreshed, as
  the clock sweep skips it) up to capacity / 4 times per eviction (the code skips lines
  needed within 16 steps during its first sweep),
- a victim that a request in the `lookahead` window (the current request and the queue
  behind it) needs, or that served >= 2 requests,
  goes to the victim buffer (`victim` blocks, LRU); other victims are dropped,
- before each request, the blocks of the next `lead` requests found in the victim buffer
  are prefetched into the cache (counted as loads, not hits).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import ClassVar

import numpy as np

from mpcache.serving.policies.base import Policy, SimResult
from mpcache.serving.traces import Trace

LEVEL_OF = [0, 0, 1, 1] + [2] * 12 + [3]  # importance level by requests served (capped at 16): 1, 2-3, 4-15, 16+


def importance(weight: float, capacity: int, level: int) -> float:
    """The static part of the priority, in units of recency: weight * capacity * log2(requests served)."""
    return weight * capacity * 2 * level


class LSMGNN(Policy):
    name: ClassVar[str] = "lsm-gnn"

    def __init__(
        self, victim: int | None = None, weight: float = 0.5, lookahead: int = 32, protect: int = 4, lead: int = 1
    ) -> None:
        if weight < 0 or lookahead < 0 or protect < 0 or lead < 0 or (victim is not None and victim < 0):
            raise ValueError("weight, lookahead, protect, lead and victim must be >= 0")
        self.victim, self.weight, self.lookahead, self.protect, self.lead = victim, weight, lookahead, protect, lead

    @property
    def label(self) -> str:
        return f"{self.name}" if self.victim != 0 else f"{self.name}-novictim"

    def run(self, trace: Trace, capacity: int) -> SimResult:
        room = capacity // 2 if self.victim is None else self.victim
        starts = trace.starts.tolist()
        n_req = trace.num_requests
        levels = len(set(LEVEL_OF))
        bonus = [importance(self.weight, capacity, level) for level in range(levels)]
        level_of = LEVEL_OF
        probes = max(capacity // 4, 1)
        blocks_all = trace.blocks
        served_np = np.minimum(served_before(trace.blocks) + 1, 16)  # requests served, counting this one
        # array.array: random lookups at eviction return Python ints fast (numpy scalars do not)
        next_all = array("q", trace.next_use().astype(np.int64).tobytes())
        served_all = array("q", served_np.astype(np.int64).tobytes())
        lists: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(levels)]  # block -> last access, LRU
        where: dict[int, int] = {}  # cached block -> its level
        victims: OrderedDict[int, None] = OrderedDict()
        hits = misses = victim_hits = prefetches = 0
        for r in range(n_req):
            lo, hi = starts[r], starts[r + 1]
            window_end = starts[min(r + self.lookahead, n_req)]  # accesses of the queue the policy sees
            protect_end = starts[min(r + self.protect, n_req)] if self.protect else -1
            end = starts[min(r + 1 + self.lead, n_req)] if room else hi
            # this request's accesses, then the prefetch of the next requests' blocks from the victim buffer
            for t, b, served in zip(range(lo, end), blocks_all[lo:end].tolist(), served_all[lo:end]):
                level = where.get(b)
                if t < hi:
                    if level is not None:
                        hits += 1
                        del lists[level][b]
                        level = where[b] = level_of[served]
                        lists[level][b] = t
                        continue
                    if b in victims:
                        del victims[b]
                        victim_hits += 1
                    else:
                        misses += 1
                elif level is None and b in victims:
                    del victims[b]
                    prefetches += 1
                    t, served = hi - 1, served - 1  # not read yet
                else:
                    continue
                if len(where) >= capacity:  # evict the lowest last access + bonus(level), sparing soon-needed ones
                    spared = 0
                    while True:
                        best, best_p, best_level = -1, 0.0, 0
                        for lv in range(levels):
                            cached = lists[lv]
                            if cached:
                                c, last = next(iter(cached.items()))
                                if best < 0 or last + bonus[lv] < best_p:
                                    best, best_p, best_level = c, last + bonus[lv], lv
                        last = lists[best_level][best]
                        if spared < probes and next_all[last] < protect_end:
                            lists[best_level].move_to_end(best)  # a second chance, as the clock sweep skips it
                            lists[best_level][best] = t
                            spared += 1
                            continue
                        break
                    del lists[best_level][best]
                    del where[best]
                    if room and (next_all[last] < window_end or served_all[last] >= 2):
                        victims[best] = None
                        if len(victims) > room:
                            victims.popitem(last=False)
                level = where[b] = level_of[max(served, 1)]
                lists[level][b] = t
        return self.result(trace, capacity, hits, misses, victim_hits=victim_hits, prefetches=prefetches)


def served_before(blocks: np.ndarray) -> np.ndarray:
    """How many earlier accesses each access's block had (int64 [A])."""
    n = len(blocks)
    order = np.argsort(blocks, kind="stable")
    first = np.r_[True, blocks[order[1:]] != blocks[order[:-1]]] if n else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) - group_start
    return out
