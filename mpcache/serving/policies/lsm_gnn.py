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

from collections import OrderedDict
from typing import ClassVar

from mpcache.serving.policies.base import Policy, SimResult
from mpcache.serving.traces import Trace


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
        far = 1 << 62
        levels = 4  # requests served (the static importance): 1, 2-3, 4-15, 16+ (log4 scale)
        bonus = [self.weight * capacity * 2 * level for level in range(levels)]  # weight * capacity * log2(served)
        level_of = [0, 0, 1, 1] + [2] * 12 + [3]  # by requests served, capped at 16
        top = len(level_of) - 1
        probes = max(capacity // 4, 1)
        lists: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(levels)]  # block -> last access, LRU order
        where: dict[int, int] = {}  # cached block -> its level
        served: dict[int, int] = {}  # block -> requests it served (capped)
        next_of: dict[int, int] = {}  # block -> its next access (used only when inside the window)
        victims: OrderedDict[int, None] = OrderedDict()
        hits = misses = victim_hits = prefetches = 0
        blocks_all, next_all = trace.blocks, trace.next_use()
        for r in range(n_req):
            lo, hi = starts[r], starts[r + 1]
            window_end = starts[min(r + self.lookahead, n_req)]  # accesses of the queue the policy sees
            protect_end = starts[min(r + self.protect, n_req)] if self.protect else -1
            end = starts[min(r + 1 + self.lead, n_req)] if room else hi
            # this request's accesses, then the prefetch of the next requests' blocks from the victim buffer
            for t, b, nu in zip(range(lo, end), blocks_all[lo:end].tolist(), next_all[lo:end].tolist()):
                if t < hi:
                    count = served.get(b, 0) + 1
                    count = count if count < top else top
                    served[b] = count
                    next_of[b] = nu
                    level = where.get(b)
                    if level is not None:
                        hits += 1
                        new = level_of[count]
                        del lists[level][b]
                        lists[new][b] = t
                        where[b] = new
                        continue
                    if b in victims:
                        del victims[b]
                        victim_hits += 1
                    else:
                        misses += 1
                elif b in victims and b not in where:
                    del victims[b]
                    prefetches += 1
                    t = hi - 1
                else:
                    continue
                if len(where) >= capacity:  # evict the lowest last access + bonus(level), sparing soon-needed ones
                    spared = 0
                    while True:
                        best, best_p, best_level = -1, 0.0, 0
                        for level in range(levels):
                            cached = lists[level]
                            if cached:
                                c, last = next(iter(cached.items()))
                                if best < 0 or last + bonus[level] < best_p:
                                    best, best_p, best_level = c, last + bonus[level], level
                        if spared < probes and next_of.get(best, far) < protect_end:
                            lists[best_level].move_to_end(best)  # a second chance, as the clock sweep skips it
                            lists[best_level][best] = t
                            spared += 1
                            continue
                        break
                    del lists[best_level][best]
                    del where[best]
                    if room and (next_of.get(best, far) < window_end or served.get(best, 0) >= 2):
                        victims[best] = None
                        if len(victims) > room:
                            victims.popitem(last=False)
                level = level_of[served.get(b, 0)]
                lists[level][b] = t
                where[b] = level
        return self.result(trace, capacity, hits, misses, victim_hits=victim_hits, prefetches=prefetches)
