"""The trace simulator: every policy over the same block trace, side by side.

`sweep` runs policies over cache sizes (hit rate, victim-buffer hits, recomputed tokens,
blocks loaded); `throughput` times policies on one trace with the predictions computed
beforehand (the offline labels need a Belady run of their own, which is preparation, not
simulation). Traces come from `mpcache.serving.traces`; everything is integer block ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from mpcache.serving.policies import LRU, LSMGNN, Belady, DiscardBits, PhaseBits, Policy
from mpcache.serving.predictors import Learned, Oracle
from mpcache.serving.traces import Trace


class HalfVictimLRU(LRU):
    """LRU with a victim tier of half the cache (LSM-GNN's default buffer size)."""

    @property
    def label(self) -> str:
        return "lru+victim"

    def run(self, trace: Trace, capacity: int):
        self.victim = capacity // 2
        return super().run(trace, capacity)


def standard_policies(train: Trace | None = None) -> list[Policy]:
    """LRU, LRU with a victim tier, LSM-GNN, both one-bit policies with perfect predictions
    (and with the learned predictor when a training trace is given), and Belady."""
    policies: list[Policy] = [LRU(), HalfVictimLRU(), LSMGNN()]
    policies += [DiscardBits(Oracle("discard")), PhaseBits(Oracle("phase"))]
    if train is not None:
        policies += [DiscardBits(Learned("discard", train), tag="learned")]
        policies += [PhaseBits(Learned("phase", train), tag="learned")]
    return policies + [Belady()]


def prepare(trace: Trace, policies: Iterable[Policy], capacity: int) -> None:
    """Compute what policies read from the trace before timing them (next uses, labels, fits)."""
    trace.next_use()
    for policy in policies:
        predictor = getattr(policy, "predictor", None)
        if predictor is not None:
            predictor(trace, capacity)


def sweep(trace: Trace, policies: Iterable[Policy], capacities: Iterable[int]) -> list[dict]:
    rows = []
    policies = list(policies)
    for capacity in capacities:
        prepare(trace, policies, capacity)
        for policy in policies:
            row = policy.simulate(trace, capacity).row()
            row["trace"] = trace.name
            rows.append(row)
    return rows
