"""One-bit phase predictions ("Paging with Succinct Predictions", Antoniadis et al., ICML 2023).

The input is cut into the phases of marking algorithms: a phase is the longest stretch
with k distinct blocks, and the next one starts at the (k+1)-th distinct block. With
every request comes one bit: 1 = "this block is requested again in the next phase".

Mark & predict (a marking algorithm, our reconstruction; the paper's exact algorithm and
its phase partition were not consulted): a requested block is marked; at a phase start
every block is unmarked; on a miss with a full cache, evict an unmarked block whose latest
bit says it is not needed in this phase (least recently requested first), else the least
recently requested unmarked block. Bounds we prove and test:

- Robust, whatever the bits: marked blocks are never evicted, so at most k misses per phase,
  and OPT misses at least once per phase after the first (each phase plus the next
  phase's first request touches k+1 distinct blocks): misses <= k * phases <= k * (OPT + 1).
- Consistent among marking algorithms: with perfect bits it misses exactly on the blocks
  new to each phase (sum of m_i, which every marking algorithm pays), and OPT >= (sum m_i) / 2
  (the classic marking bound), so misses <= 2 * OPT + k. The paper reports that its
  algorithm is 1-consistent with phase predictions; this marking version is not.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

from mpcache.serving.policies.base import Policy, SimResult, chunks, predicted_bits
from mpcache.serving.policies.discard import Predictor
from mpcache.serving.traces import Trace


class PhaseBits(Policy):
    name: ClassVar[str] = "phase"

    def __init__(self, predictor: Predictor, tag: str = "") -> None:
        self.predictor, self.tag = predictor, tag

    @property
    def label(self) -> str:
        return f"{self.name}{'[' + self.tag + ']' if self.tag else ''}"

    def run(self, trace: Trace, capacity: int) -> SimResult:
        bits = predicted_bits(self.predictor, trace, capacity)
        marked: dict[int, bool] = {}  # block -> latest bit, in order of latest request
        idle: OrderedDict[int, None] = OrderedDict()  # unmarked, predicted not needed this phase
        kept: OrderedDict[int, None] = OrderedDict()  # unmarked, predicted needed this phase
        hits = misses = phases = 0
        for blocks, flags in chunks(trace.blocks, bits):
            for b, bit in zip(blocks, flags):
                if b in marked:
                    hits += 1
                    del marked[b]
                elif b in idle or b in kept:
                    hits += 1
                    (idle if b in idle else kept).pop(b)
                else:
                    misses += 1
                    if len(marked) >= capacity:  # the (k+1)-th distinct block: a new phase
                        phases += 1
                        for q, q_bit in marked.items():
                            (kept if q_bit else idle)[q] = None
                        marked = {}
                    if len(marked) + len(idle) + len(kept) >= capacity:
                        (idle if idle else kept).popitem(last=False)
                marked[b] = bit
        return self.result(trace, capacity, hits, misses, extra={"phases": phases + (trace.num_accesses > 0)})
