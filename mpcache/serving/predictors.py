"""One-bit predictions for the policies of "Paging with Succinct Predictions".

- `discard_labels`: the bit of every access is 1 when Belady's run on the same trace and
  capacity evicts the block before its next access (or it has none): "safe to evict".
- `phase_labels`: the trace cut into marking phases (k distinct blocks each); the bit is 1
  when the block is requested again in the next phase.
- `Oracle`: those labels with each bit flipped with probability `error` (random errors),
  or every bit inverted (`adversarial`): the error axis of the consistency/robustness plot.
- `Learned`: a small logistic-regression predictor over features a server has at request
  time (block kind, how often and how long ago the block was seen, its place in the
  request), trained on a separate trace against the oracle labels.

Predictors are callables (trace, capacity) -> bool per access, since the labels depend on
the cache size. Labels are memoised per (trace, capacity).
"""

from __future__ import annotations

import numpy as np

from mpcache.serving.policies.belady import belady
from mpcache.serving.policies.lsm_gnn import served_before
from mpcache.serving.traces import KIND_NAMES, Trace, previous_use

_MEMO: dict[tuple[int, int, str], tuple[np.ndarray, np.ndarray]] = {}


def _memo(kind: str, trace: Trace, capacity: int, make) -> np.ndarray:
    key = (id(trace.blocks), capacity, kind)
    hit = _MEMO.get(key)
    if hit is None or hit[0] is not trace.blocks:  # the memo holds the array, so an id is never reused under it
        if len(_MEMO) > 64:
            _MEMO.clear()
        hit = _MEMO[key] = (trace.blocks, make())
    return hit[1]


def discard_labels(trace: Trace, capacity: int) -> np.ndarray:
    return _memo("discard", trace, capacity, lambda: belady(trace, capacity, record=True)[1])


def marking_phases(trace: Trace, capacity: int) -> np.ndarray:
    """Phase index of every access (a new phase at the (k+1)-th distinct block)."""
    out = np.empty(trace.num_accesses, dtype=np.int64)
    seen: set[int] = set()
    phase = 0
    for t, b in enumerate(trace.blocks.tolist()):
        if b not in seen:
            if len(seen) >= capacity:
                phase += 1
                seen = set()
            seen.add(b)
        out[t] = phase
    return out


def phase_labels(trace: Trace, capacity: int) -> np.ndarray:
    def make() -> np.ndarray:
        phase = marking_phases(trace, capacity)
        nxt = trace.next_use()
        n = trace.num_accesses
        bits = np.zeros(n, dtype=bool)
        later = np.append(phase, np.iinfo(np.int64).max)[nxt]  # phase of the next access (inf: none)
        for t in range(n - 1, -1, -1):  # the next access in a later phase decides; within a phase, follow it
            bits[t] = bits[nxt[t]] if later[t] == phase[t] else later[t] == phase[t] + 1
        return bits

    return _memo("phase", trace, capacity, make)


def new_per_phase(trace: Trace, capacity: int) -> int:
    """Sum over phases of the blocks not requested in the previous phase: what every marking
    algorithm misses at least, and what mark & predict misses with perfect phase bits."""
    phase = marking_phases(trace, capacity)
    previous: set[int] = set()
    current: set[int] = set()
    total, now = 0, 0
    for b, p in zip(trace.blocks.tolist(), phase.tolist()):
        if p != now:
            previous, current, now = current, set(), p
        if b not in current:
            current.add(b)
            total += b not in previous
    return total


LABELS = {"discard": discard_labels, "phase": phase_labels}


class Oracle:
    """Perfect labels of `kind`, each flipped with probability `error`; `adversarial` inverts all."""

    def __init__(self, kind: str, error: float = 0.0, adversarial: bool = False, seed: int = 0) -> None:
        if kind not in LABELS:
            raise ValueError(f"kind must be one of {sorted(LABELS)}, got {kind!r}")
        if not 0.0 <= error <= 1.0:
            raise ValueError(f"error must be a probability, got {error}")
        self.kind, self.error, self.adversarial, self.seed = kind, error, adversarial, seed

    def __call__(self, trace: Trace, capacity: int) -> np.ndarray:
        bits = LABELS[self.kind](trace, capacity)
        if self.adversarial:
            return ~bits
        if self.error == 0:
            return bits
        flip = np.random.default_rng(self.seed).random(len(bits)) < self.error
        return bits ^ flip


def features(trace: Trace) -> np.ndarray:
    """What a server knows when a block is requested, one row per access (float32 [A, F])."""
    n = trace.num_accesses
    prev = previous_use(trace.blocks)
    seen = served_before(trace.blocks)  # earlier accesses of the block
    gap = np.where(prev >= 0, np.arange(n) - prev, 0)
    req = trace.requests_of()
    length = np.diff(trace.starts)[req]
    place = (np.arange(n) - trace.starts[req]) / np.maximum(length, 1)
    kinds = np.eye(len(KIND_NAMES), dtype=np.float64)[trace.kinds]
    cols = [kinds, np.log1p(seen)[:, None], np.log1p(gap)[:, None], (prev < 0)[:, None], place[:, None],
            np.log1p(length)[:, None]]  # fmt: skip
    return np.concatenate(cols, 1).astype(np.float32)


class Learned:
    """Logistic regression from `features` to the `kind` labels, fitted per capacity on `train`
    (Newton's method with a small ridge: a dozen features, a few iterations)."""

    def __init__(self, kind: str, train: Trace, steps: int = 8, ridge: float = 1e-3) -> None:
        if kind not in LABELS:
            raise ValueError(f"kind must be one of {sorted(LABELS)}, got {kind!r}")
        self.kind, self.train, self.steps, self.ridge = kind, train, steps, ridge
        self._weights: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._x_train = features(train)

    def fit(self, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if capacity not in self._weights:
            x, y = self._x_train, LABELS[self.kind](self.train, capacity).astype(np.float64)
            mean, std = x.mean(0), x.std(0) + 1e-6
            z = np.c_[(x - mean) / std, np.ones(len(x))]
            w = np.zeros(z.shape[1])
            for _ in range(self.steps):
                p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
                hessian = (z * (p * (1 - p))[:, None]).T @ z / len(y) + self.ridge * np.eye(len(w))
                w -= np.linalg.solve(hessian, z.T @ (p - y) / len(y) + self.ridge * w)
            self._weights[capacity] = (w, mean, std)
        return self._weights[capacity]

    def __call__(self, trace: Trace, capacity: int) -> np.ndarray:
        w, mean, std = self.fit(capacity)
        z = np.c_[(features(trace) - mean) / std, np.ones(trace.num_accesses)]
        return z @ w > 0
