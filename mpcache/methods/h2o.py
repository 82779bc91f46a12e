"""H2O, Heavy-Hitter Oracle (Zhang et al., arXiv 2306.14048).

Every forward adds the attention each stored token receives (summed over the step's
queries and the query heads of its KV group) to a running score; after the prompt and
after every decode step each head keeps its `recent` newest tokens plus the heavy
hitters with the largest accumulated score (the real-drop variant of the official code,
with per-KV-head instead of per-query-head sets). Scores of evicted tokens are dropped.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from mpcache.methods.base import Budget, PolicyCache, StepKind


class H2O(PolicyCache):
    """recent_ratio: share of the budget reserved for the newest tokens (H2O uses equal
    heavy and recent parts, e.g. 10% + 10% of the prompt)."""

    name: ClassVar[str] = "h2o"
    default_decode_interval: ClassVar[int] = 1
    keeps_probs: ClassVar[bool] = True  # decode steps read the step's attention

    def __init__(self, n_layer: int, budget: Budget, *, recent_ratio: float = 0.5, **common) -> None:
        super().__init__(n_layer, budget, **common)
        if not 0.0 <= recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {recent_ratio}")
        self.recent_ratio = recent_ratio

    def record(self, layer: int, queries: Tensor, query_positions: Tensor, kind: StepKind) -> None:
        accumulated = self.slot_state(layer, "accumulated")
        accumulated += self.attention_received(layer, queries, query_positions).sum(2)

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        return self.slot_state(layer, "accumulated")

    def protection(self, layer: int, budget: Tensor) -> tuple[int | Tensor, int | Tensor]:
        heavy = (budget.double() * (1.0 - self.recent_ratio)).floor().long()
        return self.sink, budget - heavy
