"""LazyEviction (Zhang et al., arXiv 2506.15969, ACL 2026): lagged eviction by recurrence intervals.

In long reasoning many tokens regain high attention after many decoding steps (token
importance recurrence), so greedy per-step eviction drops tokens that will be needed again.
LazyEviction tracks, per stored token of every KV head,

    t_last: the last step at which it was important (attention >= `alpha` from the step's query,
            for any query head of the group); a token starts as important at its own arrival;
    MRI:    its maximum recurrence interval, the longest gap seen between two important steps,

and evicts lazily: only every `window` steps, down to the budget, never touching the `window`
newest tokens (every token is observed for a whole window first). Candidates are ranked by
idle time relative to their recurrence pattern, priority = -(t - t_last) / max(MRI, 1): a
token idle for longer than its MRI (priority < -1) is unlikely to recur and goes first; ties
go to the newer token, so with alpha = 0 (everything important at every step) it is recency.

A step is a query position, so the prompt is observed query by query like a decode trace and
is evicted to the budget after its forward (step 0). The sources leave open the exact
priority, alpha, window and whether selection is per head (no official code was consulted,
methods-part2.md 4.2): the priority above is our reading of "MRI-centric", the defaults
alpha = 1e-4 and window = 175 come from a third-party reproduction, and sets are per KV head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import visibility
from mpcache.methods.base import Budget, PolicyCache, StepKind


def update_recurrence(
    important: Tensor, times: Tensor, last: Tensor, mri: Tensor
) -> tuple[Tensor, Tensor]:
    """Advance (t_last, MRI) [B, H, L] over a block of steps: important [B, H, T, L] (bool, in
    step order) at `times` [B, T] (non-decreasing; padding steps have no important token)."""
    t = times.to(last.dtype)[:, None, :, None]
    hit = torch.where(important, t, float("-inf"))
    running = torch.maximum(hit.cummax(2).values, last[:, :, None])  # t_last after each step
    before = torch.cat([last[:, :, None], running[:, :, :-1]], 2)  # t_last before each step
    gap = torch.where(important, t - before, 0.0)
    return running[:, :, -1], torch.maximum(mri, gap.amax(2))


def recurrence_priority(last: Tensor, mri: Tensor, now: Tensor) -> Tensor:
    """-(idle time) / max(MRI, 1): below -1 once a token has been idle longer than it ever was."""
    return -(now.to(last.dtype)[:, None, None] - last) / mri.clamp(min=1.0)


def rank_with_recency(priority: Tensor, positions: Tensor) -> Tensor:
    """Rank [B, H, L] (higher = kept first) by priority, ties broken toward later positions."""
    by_position = torch.argsort(positions, dim=-1, stable=True)
    order = torch.argsort(priority.gather(-1, by_position), dim=-1, stable=True)
    ranked = by_position.gather(-1, order)  # worst first
    rank = torch.arange(ranked.shape[-1], device=ranked.device).expand_as(ranked)
    return torch.empty_like(ranked).scatter_(-1, ranked, rank).float()


class LazyEviction(PolicyCache):
    """window: observation window W, the eviction period and the newest tokens never evicted
    (175); alpha: attention probability that makes a token important at a step (1e-4);
    decode_interval defaults to the window."""

    name: ClassVar[str] = "lazyeviction"
    keeps_probs: ClassVar[bool] = True  # decode steps read the step's attention

    def __init__(
        self, n_layer: int, budget: Budget, *, window: int = 175, alpha: float = 1e-4, **common
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (steps between evictions), got {window!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be an attention probability in [0, 1], got {alpha}")
        if common.get("decode_interval") is None:
            common["decode_interval"] = window
        super().__init__(n_layer, budget, window=window, **common)
        self.alpha = alpha
        self.now: Tensor | None = None  # [B] the latest step (query position) seen

    def record(self, layer: int, queries: Tensor, query_positions: Tensor, kind: StepKind) -> None:
        entry = self.layers[layer]
        assert entry is not None and self.step_valid is not None
        last, mri, seen = (self.slot_state(layer, name) for name in ("last", "mri", "seen"))
        fresh = entry.valid & (seen == 0)
        last.copy_(torch.where(fresh, entry.positions.to(last.dtype), last))  # important on arrival
        seen.copy_(entry.valid.to(seen.dtype))
        for start in range(0, queries.shape[2], 256):  # a block of queries at a time: [T, L] per head stays small
            part = slice(start, start + 256)
            q, qpos, qvalid = queries[:, :, part], query_positions[:, part], self.step_valid[:, part]
            p = self.step_attention(layer, q, qpos)  # a decode step: the attention kernel's probabilities
            seen_by = visibility(qpos, entry.positions, entry.valid, self.sliding_window)[:, :, 0]
            important = (p.amax(2) >= self.alpha) & seen_by & qvalid[:, None, :, None]
            new_last, new_mri = update_recurrence(important, qpos, last, mri)
            last.copy_(new_last)
            mri.copy_(new_mri)
        now = torch.where(self.step_valid, query_positions, -1).amax(-1)
        self.now = now if self.now is None else torch.maximum(self.now, now)

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        entry = self.layers[layer]
        assert entry is not None and self.now is not None
        priority = recurrence_priority(self.slot_state(layer, "last"), self.slot_state(layer, "mri"), self.now)
        return rank_with_recency(priority, entry.positions)
