"""SnapKV (Li et al., arXiv 2404.14469): the prompt's last queries vote for what to keep.

Once, after the prompt: the last `window` prompt queries' softmax attention over the
older tokens is summed per query head, averaged over the KV group (kvpress; the official
code selects per query head on a GQA-expanded cache), smoothed with a 1-D pooling of
width `kernel` and ranked; every head keeps its top budget - window tokens plus the
window itself. Decode tokens are appended without further eviction.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from mpcache.methods.base import Budget, PolicyCache, pool_scores, recency_rank


class SnapKV(PolicyCache):
    """window: observation window (also always kept), 32 in the official code; kernel and
    pooling: 5 / "avg" (official `init_snapkv`; LongBench configs use 7 / "max")."""

    name: ClassVar[str] = "snapkv"

    def __init__(
        self, n_layer: int, budget: Budget, *, window: int = 32, kernel: int = 5, pooling: str = "avg", **common
    ) -> None:
        super().__init__(n_layer, budget, window=window, **common)
        if window < 1:
            raise ValueError(f"window must be >= 1 observation query, got {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd int, got {kernel}")
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        self.kernel, self.pooling = kernel, pooling

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        entry = self.layers[layer]
        assert entry is not None
        w = min(self.window, queries.shape[2])
        vote = self.attention_received(layer, queries, query_positions, last=w).mean(2)  # [B, Hkv, L]
        vote = vote.masked_fill(recency_rank(entry.valid) < w, 0.0)  # the window is kept anyway, not voted on
        return pool_scores(vote, self.kernel, self.pooling)
