"""LRU: evict the least recently used block (vLLM's and SGLang's prefix-cache default).

With `victim` > 0, evicted blocks go to a second LRU tier of that many blocks (a plain
two-tier cache, the baseline for LSM-GNN's victim buffer); an access found there is a
victim hit (moved back, not recomputed).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

from mpcache.serving.policies.base import Policy, SimResult, chunks
from mpcache.serving.traces import Trace


class LRU(Policy):
    name: ClassVar[str] = "lru"

    def __init__(self, victim: int = 0) -> None:
        if victim < 0:
            raise ValueError(f"victim must be >= 0 blocks, got {victim}")
        self.victim = victim

    @property
    def label(self) -> str:
        return f"lru+victim{self.victim}" if self.victim else "lru"

    def run(self, trace: Trace, capacity: int) -> SimResult:
        cache: OrderedDict[int, None] = OrderedDict()
        victim: OrderedDict[int, None] = OrderedDict()
        hits = misses = victim_hits = 0
        room = self.victim
        for (blocks,) in chunks(trace.blocks):
            for b in blocks:
                if b in cache:
                    cache.move_to_end(b)
                    hits += 1
                    continue
                if room and b in victim:
                    del victim[b]
                    victim_hits += 1
                else:
                    misses += 1
                cache[b] = None
                if len(cache) > capacity:
                    old, _ = cache.popitem(last=False)
                    if room:
                        victim[old] = None
                        if len(victim) > room:
                            victim.popitem(last=False)
        return self.result(trace, capacity, hits, misses, victim_hits=victim_hits)
