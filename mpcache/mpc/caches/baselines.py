"""StreamingLLM and H2O on a private KV cache: the MPC baselines MPCache is measured against (issue #6).

Both mirror their plaintext references (mpcache/methods/streamingllm.py, mpcache/methods/h2o.py) step for step and
are written against mpcache.mpc.arith.numerics, so on float tensors they are the simulator and on MPCTensors they run in
2PC. Both act after attention, as the references do (kvpress timing): a step's attention reads the budget plus the
step's new tokens, then the cache is cut back to `budget` slots per KV head.

* `PrivateStreamingLLM`: the first `sink` tokens and the newest `budget - sink` ones. Which tokens stay depends on
  positions only, all public, so eviction is a local gather of the shares: no MPC cost beyond attention over the
  budget.
* `PrivateH2O`: the naive dynamic selection the MPCache paper argues is too expensive under MPC. Every forward adds
  the attention each slot receives (the private softmax's own probabilities, summed over the step's queries and the
  query heads of its KV group: exact, no approximation beyond the softmax's) to a secret running score; then the
  first `sink` and newest `recent` slots stay publicly and the `heavy` best-scoring of the others are kept by a FULL
  secret top-k every decode step (`pairwise_rank` + [rank < heavy]: 16 rounds, n(n-1)/2 comparisons for n = budget
  + 1 - sink - recent candidates) and one oblivious gather (`compaction_matrix`, 8 rounds and 2 heavy x n
  comparisons, then one bit x real product for keys, values and scores together). Public: the budget, the sizes
  (sink / recent / heavy) and the positions of the sink and recent slots; secret: which heavy hitters stay and their
  scores. Gathered slots' true positions are secret; they carry a public lower bound (the lowest position the j-th
  kept candidate can have: the j-th candidate's own bound), enough for causal visibility, which every cached token
  passes at decode (PrivateMPCache uses the same trick). Models with a sliding window would need the true positions:
  not supported.

Both need unpadded rows (every slot valid), so "the first / newest tokens" are the first / last slots.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mpcache.mpc.arith import numerics as N
from mpcache.mpc.arith.accounting import span
from mpcache.mpc.arith.numerics import Value
from mpcache.mpc.caches.mpcache import compaction_matrix, top_k_mask
from mpcache.mpc.nn.layers import PrivateKVCache, PrivateLayerKV


def _check_budget(budget: object) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a public int token count >= 1, got {budget!r}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_unpadded(valid: Tensor) -> None:
    if not bool(valid.all()):
        raise ValueError("the private baselines need unpadded rows (every token valid)")


def ends(length: int, keep: int, sink: int) -> Tensor:
    """Public slots [K] of the first min(sink, keep) and the newest remaining tokens of a cache of `length` slots,
    in slot order (StreamingLLM's keep-set; base.protect's clamping)."""
    keep = min(keep, length)
    sink = min(sink, keep)
    return torch.cat([torch.arange(sink), torch.arange(length - keep + sink, length)])


def _cut(cache: PrivateKVCache, out: PrivateKVCache, budget: int, sink: int) -> None:
    """Copy `cache`'s layers into `out`, each cut publicly to sink + newest tokens (a local gather)."""
    out.seen_tokens = cache.seen_tokens
    for layer, entry in enumerate(cache.layers):
        if entry is None:
            raise ValueError(f"layer {layer} of the adopted cache is empty")
        _check_unpadded(entry.valid)
        out.layers[layer] = entry
        if entry.capacity > budget:
            b, h, _ = entry.valid.shape
            out.keep(layer, ends(entry.capacity, budget, sink).expand(b, h, -1))


class PrivateStreamingLLM(PrivateKVCache):
    """StreamingLLM (plaintext: methods.streamingllm.StreamingLLM): attention sinks + a rolling recent window of a
    public `budget` per KV head. Eviction is public (positions only): a local gather, no communication."""

    def __init__(self, n_layer: int, budget: int, *, sink: int = 4) -> None:
        super().__init__(n_layer)
        _check_budget(budget)
        _check_count("sink", sink)
        self.budget, self.sink = budget, sink

    @classmethod
    def adopt(cls, cache: PrivateKVCache, budget: int, **knobs) -> PrivateStreamingLLM:
        """Take over a filled private cache of n shared tokens (a benchmark's cache, built without a private
        prefill), cut publicly to the first `sink` and the newest tokens: exactly what the plaintext policy keeps
        after the prompt."""
        out = cls(len(cache.layers), budget, **knobs)
        _cut(cache, out, budget, out.sink)
        return out

    def update(self, layer: int, keys: Value, values: Value, positions: Tensor, valid: Tensor) -> PrivateLayerKV:
        _check_unpadded(valid)
        return super().update(layer, keys, values, positions, valid)

    def after_attention(self, layer: int, queries: Value, query_positions: Tensor) -> None:
        entry = self.layers[layer]
        assert entry is not None
        if entry.capacity > self.budget:
            b, h, _ = entry.valid.shape
            self.keep(layer, ends(entry.capacity, self.budget, self.sink).expand(b, h, -1))


class PrivateH2O(PrivateKVCache):
    """H2O (plaintext: methods.h2o.H2O) with exact accumulated attention and a full secret top-k every step.

    budget: public int tokens per KV head; recent_ratio: share of it for the newest tokens (the plaintext default
    0.5: heavy = floor(budget (1 - recent_ratio)), recent = budget - heavy); sink: first tokens always kept (0).
    """

    wants_probs = True  # layers.Attention hands this cache its attention probabilities (observe_probs)

    def __init__(self, n_layer: int, budget: int, *, recent_ratio: float = 0.5, sink: int = 0) -> None:
        super().__init__(n_layer)
        _check_budget(budget)
        _check_count("sink", sink)
        if isinstance(recent_ratio, bool) or not isinstance(recent_ratio, int | float) or not 0 <= recent_ratio <= 1:
            raise ValueError(f"recent_ratio must be in [0, 1], got {recent_ratio!r}")
        self.budget, self.recent_ratio, self.sink = budget, float(recent_ratio), sink
        self.scores: list[Value | None] = [None] * n_layer  # secret accumulated attention [B, H, L]; None: zeros

    @classmethod
    def adopt(cls, cache: PrivateKVCache, budget: int, **knobs) -> PrivateH2O:
        """Take over a filled private cache of n shared tokens (a benchmark's cache, built without a private
        prefill), cut publicly to `budget` (the first `sink` and the newest tokens) with zero scores. The plaintext
        policy's one-time eviction after the prompt (a secret top-k over the prompt's scores) is not done: the
        benchmark measures decode steps, each of which pays the full secret top-k."""
        out = cls(len(cache.layers), budget, **knobs)
        _cut(cache, out, budget, out.sink)
        return out

    def plan(self) -> tuple[int, int, int]:
        """(sink, recent, heavy) slots kept when the cache exceeds the budget, clamped as base.protect does."""
        heavy = math.floor(self.budget * (1.0 - self.recent_ratio))
        sink = min(self.sink, self.budget)
        recent = min(self.budget - heavy, self.budget - sink)
        return sink, recent, self.budget - sink - recent

    def update(self, layer: int, keys: Value, values: Value, positions: Tensor, valid: Tensor) -> PrivateLayerKV:
        _check_unpadded(valid)
        return super().update(layer, keys, values, positions, valid)

    def observe_probs(self, layer: int, probs: Value) -> None:
        """Add the attention every slot received this step (probs [B, Hkv, G, T, L] summed over G and T) to its
        score; slots appended this step start from zero. Local on shares."""
        with span("selection"):
            received = probs.sum(3).sum(2)
            old = self.scores[layer]
            if old is not None:
                n = old.shape[-1]
                received = N.cat([old + received[..., :n], received[..., n:]], -1)
            self.scores[layer] = received

    def after_attention(self, layer: int, queries: Value, query_positions: Tensor) -> None:
        """Evict back to the budget: sinks and the newest slots publicly, the heavy hitters by secret top-k."""
        entry, scores = self.layers[layer], self.scores[layer]
        assert entry is not None
        n = entry.capacity
        if n <= self.budget:
            return
        if scores is None or scores.shape[-1] != n:
            raise RuntimeError(f"layer {layer}: no attention probabilities for its {n} slots (observe_probs)")
        sink, recent, heavy = self.plan()
        lo, hi = sink, n - recent  # heavy-hitter candidates: slots [lo, hi), heavy < hi - lo as n > budget
        with span("selection"):
            dk, dv = entry.keys.shape[-1], entry.values.shape[-1]
            kvs = N.cat([entry.keys, entry.values, scores.unsqueeze(-1)], -1)  # one gather for all three
            parts = [kvs[:, :, :lo]] if lo else []
            if heavy:
                # a slot's score sums the probabilities (each <= 1) it got from every query head of its group and
                # every query so far: at most G x (queries seen), plus slack for fixed-point error
                bound = queries.shape[1] // entry.keys.shape[1] * (int(query_positions.max()) + 1) + 1.0
                chosen = top_k_mask(scores[..., lo:hi], heavy, bound)
                parts.append(N.matmul(compaction_matrix(chosen, heavy), kvs[:, :, lo:hi]))
            if recent:
                parts.append(kvs[:, :, hi:])
            kvs = N.cat(parts, 2)
        positions = torch.cat(  # the kept candidates' positions are secret: lower bounds (module docstring)
            [entry.positions[..., :lo], entry.positions[..., lo : lo + heavy], entry.positions[..., hi:]], 2
        )
        self.layers[layer] = PrivateLayerKV(
            kvs[..., :dk], kvs[..., dk : dk + dv], positions, torch.ones_like(positions, dtype=torch.bool)
        )
        self.scores[layer] = kvs[..., dk + dv :].squeeze(-1)
