"""The interface of block eviction policies and what a simulation reports.

A policy manages a cache of `capacity` KV blocks (the pool's blocks that hold cached
prefixes) and is simulated over a `Trace` of block accesses: an access to a cached block
is a hit, otherwise the block is recomputed (a miss) and loaded, evicting a block the
policy picks when the cache is full. Policies with a second, slower tier (LSM-GNN's victim
buffer) also report accesses served from it and blocks prefetched from it; every block
brought into the cache counts as a load, so Belady's optimum (fewest loads) bounds all.

The loops are plain Python over integer ids (the trace is walked in chunks of
`CHUNK` accesses turned into lists), one dict or heap operation per access.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from mpcache.serving.traces import Trace

CHUNK = 1 << 20


@dataclass
class SimResult:
    policy: str
    capacity: int
    accesses: int
    requests: int
    hits: int
    misses: int
    victim_hits: int = 0
    prefetches: int = 0
    seconds: float = 0.0  # wall time
    cpu_seconds: float = 0.0  # this process's CPU time (what "one core" means on a shared machine)
    block_size: int = 16
    extra: dict = field(default_factory=dict)

    @property
    def loads(self) -> int:
        """Blocks brought into the cache: misses, victim-buffer hits and prefetches."""
        return self.misses + self.victim_hits + self.prefetches

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.accesses, 1)

    @property
    def served_rate(self) -> float:
        """Accesses that needed no recomputation (cache or victim buffer)."""
        return (self.hits + self.victim_hits) / max(self.accesses, 1)

    @property
    def recomputed_tokens(self) -> int:
        return self.misses * self.block_size

    @property
    def requests_per_minute(self) -> float:
        """Requests simulated per minute of CPU time (wall time if none was recorded)."""
        seconds = self.cpu_seconds or self.seconds
        return 60.0 * self.requests / seconds if seconds > 0 else float("inf")

    def row(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        for name in ("loads", "hit_rate", "served_rate", "recomputed_tokens", "requests_per_minute"):
            out[name] = getattr(self, name)
        return out


class Policy:
    """A block eviction policy; subclasses implement `run` (the simulation loop)."""

    name: ClassVar[str] = "base"

    def simulate(self, trace: Trace, capacity: int) -> SimResult:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1 block, got {capacity!r}")
        start, cpu = time.perf_counter(), time.process_time()
        result = self.run(trace, capacity)
        result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        result.block_size = trace.block_size
        return result

    def run(self, trace: Trace, capacity: int) -> SimResult:
        raise NotImplementedError

    def result(self, trace: Trace, capacity: int, hits: int, misses: int, **kw) -> SimResult:
        return SimResult(self.label, capacity, trace.num_accesses, trace.num_requests, hits, misses, **kw)

    @property
    def label(self) -> str:
        return self.name


def predicted_bits(predictor, trace: Trace, capacity: int) -> np.ndarray:
    """One predicted bit per access from `predictor(trace, capacity)`, checked."""
    bits = np.asarray(predictor(trace, capacity), dtype=bool)
    if bits.shape != trace.blocks.shape:
        raise ValueError(f"the predictor gave {bits.shape} bits for {trace.num_accesses} accesses")
    return bits


def chunks(*arrays: np.ndarray, size: int = CHUNK) -> Iterator[tuple[list, ...]]:
    """Aligned slices of `arrays` as Python lists, `size` elements at a time."""
    n = len(arrays[0])
    for start in range(0, n, size):
        yield tuple(a[start : start + size].tolist() for a in arrays)
