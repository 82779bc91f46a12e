"""CAKE, cascading and adaptive KV-cache eviction (Qin et al., arXiv 2503.12491, ICLR 2025).

Layers differ in how much cache they need, so CAKE gives each a share of the total by its
*preference*, measured on the prompt's last `window` queries' softmax attention A[h, i, j]
over the older (non-window) keys:

    spatial dispersion  H = -sum_{h, i, j} A log(A + 1e-10)       (entropy: attention spread wide)
    temporal shift      V = sum_{h, j} Var_i A[h, i, j]            (unbiased: attention moves between queries)
    preference          P = H^(1/tau1) * V^(1/tau2)

The n_layer x (budget - window) evictable slots per KV head are split across layers in
proportion to P (`split_bounded`: a layer never gets more than its older tokens; the excess
goes to the others, where the official `adjust_budgets` spreads it evenly). Layers are
prefilled one after another, so with `cascading` the split is redone over layers 0..m as soon
as layer m is done and all of them are evicted to their new shares: a share only shrinks, and
keeping the top-k of a top-k by the same scores is consistent, so the result equals a one-shot
split after the last layer while the cache never holds much more than the total.

Which tokens: per query head the eviction indicator I(j) = mean_i A[i, j] + gamma Var_i A[i, j]
over the window queries, average-pooled along j (kernel 5), averaged over the KV group; each KV
head keeps its top B_l older tokens plus the window. Indicator scores follow the kept slots, so
a later cascading stage re-ranks with them. While decoding, a layer holding more than its
budget scores its older tokens by the new query's pooled, group-averaged attention (the official
decode path has no variance term) and keeps the top ones plus the newest window.

The budget (per KV head) is the layer average including the window. Deviation: the official
code skips compression when the prompt is <= cache_size + window; here a prompt within the
budget is kept whole (every method's rule) and that row keeps the uniform budget while decoding.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import wanted
from mpcache.kernels.window import window_attention_stats
from mpcache.methods.base import Budget, PolicyCache, pool_scores, recency_rank, split_bounded


def window_stats(
    cache: PolicyCache, layer: int, queries: Tensor, query_positions: Tensor, w: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per slot and query head [B, Hkv, G, L] over the step's last `w` queries (padding queries count nothing):
    the sums of p, p^2 and -p log(p + 1e-10) of their softmax attention (`window_attention_stats`, one kernel pass
    where the switch wants kernels), so the [w, L] probabilities are never all in memory."""
    entry = cache.layers[layer]
    assert entry is not None and cache.step_valid is not None
    return window_attention_stats(
        queries[:, :, -w:], entry.keys, query_positions[:, -w:], entry.positions, entry.valid,
        cache.step_valid[:, -w:].float(), cache.sliding_window, use_kernels=wanted(queries),
    )  # fmt: skip


def window_statistics(total: Tensor, squares: Tensor, older: Tensor, n_queries: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance over the window queries [B, Hkv, G, L] from the sums of p and p^2 over them,
    zero outside the `older` [B, Hkv, L] keys; `n_queries` [B]: valid window queries per row."""
    n = n_queries.double()[:, None, None, None].clamp(min=1)
    mean = total.double() / n
    var = ((squares.double() - n * mean.pow(2)) / (n - 1).clamp(min=1)).clamp(min=0.0)
    keep = older[:, :, None, :]
    return mean.masked_fill(~keep, 0.0), var.masked_fill(~keep, 0.0)


def layer_preference(entropy_terms: Tensor, var: Tensor, older: Tensor, tau1: float, tau2: float) -> Tensor:
    """CAKE's P = H^(1/tau1) V^(1/tau2) per batch row [B]: H sums the entropy terms -p log(p + 1e-10) of the older
    keys [B, Hkv, G, L] over heads, V the variances."""
    entropy = entropy_terms.double().masked_fill(~older[:, :, None, :], 0.0).sum((1, 2, 3))
    shift = var.sum((1, 2, 3))
    return entropy.clamp(min=0.0).pow(1.0 / tau1) * shift.pow(1.0 / tau2)


def eviction_indicator(mean: Tensor, var: Tensor, gamma: float, kernel: int) -> Tensor:
    """Mean + gamma variance, pooled along the keys, averaged over the KV group: [B, Hkv, L]."""
    return pool_scores((mean + gamma * var).float(), kernel, "avg").mean(2)


class CAKE(PolicyCache):
    """window: observation window, always kept (32); gamma: weight of the variance (200);
    tau1 / tau2: preference temperatures (1.0, the code's default; the authors tune them per
    model and budget, e.g. Llama-3.1-8B at 1024: 1.6 / 0.4); kernel: pooling width (5);
    cascading: evict layer by layer during the prefill (True) or once after the last layer."""

    name: ClassVar[str] = "cake"
    default_decode_interval: ClassVar[int] = 1
    keeps_probs: ClassVar[bool] = True  # decode steps read the step's attention

    def __init__(
        self,
        n_layer: int,
        budget: Budget,
        *,
        window: int = 32,
        gamma: float = 200.0,
        tau1: float = 1.0,
        tau2: float = 1.0,
        kernel: int = 5,
        cascading: bool = True,
        **common,
    ) -> None:
        super().__init__(n_layer, budget, window=window, **common)
        if window < 1:
            raise ValueError(f"window must be >= 1 observation query, got {window}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not tau1 > 0 or not tau2 > 0:
            raise ValueError(f"tau1 and tau2 must be > 0, got {tau1}, {tau2}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd int, got {kernel}")
        self.gamma, self.tau1, self.tau2, self.kernel, self.cascading = gamma, tau1, tau2, kernel, cascading
        self.preference: list[Tensor | None] = [None] * n_layer  # [B] per prefilled layer
        self.budgets: Tensor | None = None  # [B, n_layer] tokens per KV head each layer keeps
        self.stages: list[Tensor] = []  # the split after every cascading stage (for inspection)

    def layer_budget(self, layer: int) -> Tensor:
        assert self.budgets is not None
        return self.budgets[:, layer]

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        """Decode-time indicator: the new query's attention, pooled and group-averaged."""
        entry = self.layers[layer]
        assert entry is not None
        received = self.attention_received(layer, queries, query_positions, last=1)  # [B, Hkv, G, L]
        received = received.masked_fill((recency_rank(entry.valid) < self.window)[:, :, None], 0.0)
        return pool_scores(received, self.kernel, "avg").mean(2)

    def compress(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        if self.forwards[layer] > 1:  # decoding: hold the layer's budget
            super().compress(layer, queries, query_positions)
            return
        entry = self.layers[layer]
        assert entry is not None and self.step_valid is not None and self.budget_tokens is not None
        w = min(self.window, queries.shape[2])
        total, squares, entropy = window_stats(self, layer, queries, query_positions, w)
        older = entry.valid & (recency_rank(entry.valid) >= w)
        mean, var = window_statistics(total, squares, older, self.step_valid[:, -w:].sum(-1))
        self.preference[layer] = layer_preference(entropy, var, older, self.tau1, self.tau2)
        self.state[layer]["indicator"] = eviction_indicator(mean, var, self.gamma, self.kernel)
        last = len(self.layers) - 1
        if self.cascading or layer == last:
            self.budgets = self.allocate(layer)
            self.stages.append(self.budgets.clone())
            for done in range(layer + 1):
                self.shrink(done)

    def allocate(self, upto: int) -> Tensor:
        """Tokens per KV head [B, n_layer] for layers 0..upto (later layers: the uniform budget)."""
        assert self.budget_tokens is not None and self.prompt_lengths is not None
        budget, n_layer = self.budget_tokens, len(self.layers)
        kept = torch.minimum(budget, torch.full_like(budget, self.window))  # the window, within the budget
        preference = torch.stack([p for p in self.preference[: upto + 1] if p is not None], -1)
        older = (self.prompt_lengths - kept).clamp(min=0)
        share = split_bounded(n_layer * (budget - kept), preference, older[:, None].expand_as(preference))
        out = budget[:, None].repeat(1, n_layer)
        fits = self.prompt_lengths <= budget  # kept whole, uniform budget while decoding
        out[:, : upto + 1] = torch.where(fits[:, None], budget[:, None], share + kept[:, None])
        return out

    def shrink(self, layer: int) -> None:
        """Evict `layer` to its current budget by its remembered indicator scores."""
        entry = self.layers[layer]
        assert entry is not None and self.budgets is not None
        budget = self.budgets[:, layer]
        if bool((entry.valid.sum(-1) <= budget[:, None]).all()):
            return
        self.evict(layer, *self.select(layer, self.state[layer]["indicator"], budget))
