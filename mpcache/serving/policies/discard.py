"""One-bit discard predictions ("Paging with Succinct Predictions", Antoniadis et al., ICML 2023).

With every request comes one bit: 1 = "safe to evict", meaning a fixed lazy optimal
algorithm (here the recorded Belady run) evicts the block before its next request. The
paper's setup and its consistency claim are followed; its exact robust algorithm was not
consulted (only the abstract and secondary summaries were available), so the robust
version here is our construction, with the bound we prove and test:

- Follow the bits (F): on a miss with a full cache, evict a cached block whose latest bit
  is 1 (least recently requested first); if none, the least recently requested block.
  With perfect bits F faults exactly when OPT does (1-consistent): every block whose bit
  is 0 is one OPT keeps until its next request; at any OPT fault at most k-1 of them exist
  (OPT evicts something, never a bit-0 block), so F always finds a bit-1 block to evict
  and never evicts a bit-0 one; it therefore hits whenever OPT hits, and OPT is optimal.
  Alone it is not robust: wrong 0 bits can pin dead blocks (unbounded cost vs LRU).
- Robust (default): run F and LRU side by side (simulated, no data moves) and follow the
  one with fewer faults so far, switching when the followed one is k+1 faults behind; the
  real cache evicts lazily a block the followed algorithm does not hold. Then
  faults <= 3 * min(F, LRU) + 3k + 1 for any bits (over each interval between switches the
  real cache faults at most k more than the followed algorithm, and each switch means the
  followed one lost k+1 faults to the other). With perfect bits F never falls behind LRU
  (Belady is optimal on every prefix), so there is no switch and faults = OPT exactly.
  The paper reports (1, k-1, 1)-competitiveness for its algorithm (ALG <= OPT + (k-1) eta_0
  + eta_1 with eta_0 / eta_1 the wrong 0 / 1 bits; from a secondary summary, unverified).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from mpcache.serving.policies.base import Policy, SimResult, chunks, predicted_bits
from mpcache.serving.traces import Trace

Predictor = Callable[[Trace, int], np.ndarray]  # (trace, capacity) -> one bool per access


def robust_bound(other_faults: int, capacity: int) -> int:
    """The guarantee of the robust version against a run of F or LRU with `other_faults` faults."""
    return 3 * other_faults + 3 * capacity + 1


class DiscardBits(Policy):
    name: ClassVar[str] = "discard"

    def __init__(self, predictor: Predictor, robust: bool = True, tag: str = "") -> None:
        self.predictor, self.robust, self.tag = predictor, robust, tag

    @property
    def label(self) -> str:
        return f"{self.name}{'' if self.robust else '-follow'}{'[' + self.tag + ']' if self.tag else ''}"

    def run(self, trace: Trace, capacity: int) -> SimResult:
        bits = predicted_bits(self.predictor, trace, capacity)
        ones: OrderedDict[int, None] = OrderedDict()  # F's cached blocks whose latest bit is 1
        zeros: OrderedDict[int, None] = OrderedDict()  # ... and 0
        lru: OrderedDict[int, None] = OrderedDict()  # the LRU run
        held: set[int] = set()  # the real cache (robust version)
        spare: set[int] = set()  # held minus the followed run's cache
        f_faults = l_faults = hits = misses = switches = 0
        follow_f, gap = True, capacity + 1
        robust = self.robust
        for blocks, flags in chunks(trace.blocks, bits):
            for b, bit in zip(blocks, flags):
                evicted_f = evicted_l = None
                if b in ones:
                    del ones[b]
                elif b in zeros:
                    del zeros[b]
                else:
                    f_faults += 1
                    if len(ones) + len(zeros) >= capacity:
                        evicted_f = (ones if ones else zeros).popitem(last=False)[0]
                (ones if bit else zeros)[b] = None
                if not robust:
                    continue
                if b in lru:
                    lru.move_to_end(b)
                else:
                    l_faults += 1
                    lru[b] = None
                    if len(lru) > capacity:
                        evicted_l = lru.popitem(last=False)[0]
                spare.discard(b)  # the followed run holds b now
                gone = evicted_f if follow_f else evicted_l
                if gone is not None and gone in held:
                    spare.add(gone)
                if b in held:
                    hits += 1
                else:
                    misses += 1
                    if len(held) >= capacity:
                        held.remove(spare.pop())  # never empty: the followed run holds b, we do not
                    held.add(b)
                if (f_faults - l_faults if follow_f else l_faults - f_faults) >= gap:
                    follow_f = not follow_f
                    switches += 1
                    spare = (
                        {q for q in held if q not in lru}
                        if not follow_f
                        else {q for q in held if q not in ones and q not in zeros}
                    )
        if not robust:
            hits, misses = trace.num_accesses - f_faults, f_faults
        extra = {"follow_faults": f_faults, "lru_faults": l_faults if robust else None, "switches": switches}
        return self.result(trace, capacity, hits, misses, extra=extra)
