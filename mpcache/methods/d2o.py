"""D2O, dynamic discriminative operations (Wan et al., arXiv 2406.13035, ICLR 2025).

Two levels, following the official code (methods-part2.md 2.2-2.3):

- Layers: on the prompt, each query head's accumulated attention per key (column sums) has a
  variance over the keys; min-max normalised across the layer's heads and averaged, it gives
  the layer's sigma. Dense layers (low sigma) need more cache, so at the first decode step the
  n_layer x budget slots per KV head go to the compressed layers in proportion to softmax(-sigma),
  each within [1, cached tokens] (`split_bounded`; the official clamp drops the clipped share,
  here it goes to the other layers so every method holds the same total). The first
  `first_dense` and last `last_dense` layers are never compressed (2 and 1 in the code).
- Tokens: H2O's accumulated attention, the first `sink` tokens and the newest share of the
  budget kept (`recent_ratio`, equal heavy and recent parts as hh_ratio = recent_ratio = 0.1).
  Eviction starts at the first decode step. Each evicted token is compared with the kept ones
  of its head by key cosine similarity: u = the best similarity, c = that kept slot. The
  threshold is an EMA, tau = mean(u) on the first eviction, then tau <- alpha tau + beta mean(u);
  a token with u >= tau is merged into c instead of dropped, keys and values alike:
      K_c <- mean({K_c} U {u_e K_e : e merged into c})
  (the code's similarity-scaled scatter mean). Our heads keep their own token sets, so the
  decision is per (head, token), where the code averages u over heads; tau, sigma and budgets
  are per batch row (the code runs batch 1).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.kernels import merge_kv, wanted
from mpcache.methods.base import Budget, StepKind, mask_to_index, split_bounded
from mpcache.methods.h2o import H2O

NEVER = 1 << 40  # the budget of a layer that is never compressed


def attention_variance(received: Tensor, valid: Tensor) -> Tensor:
    """D2O's layer statistic [B]: the variance over valid keys of every query head's accumulated
    attention received [B, Hkv, G, L], min-max normalised across the layer's heads, averaged."""
    x = received.double().flatten(1, 2)  # [B, Hq, L]
    keep = valid.repeat_interleave(received.shape[2], 1)
    n = keep.sum(-1).clamp(min=2)
    mean = (x * keep).sum(-1) / n
    var = ((x - mean[..., None]).pow(2) * keep).sum(-1) / (n - 1)
    low, high = var.amin(-1, keepdim=True), var.amax(-1, keepdim=True)
    return ((var - low) / (high - low).clamp(min=1e-30)).mean(-1)


def best_kept_match(keys: Tensor, kept: Tensor, evicted: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine similarity of every evicted slot's key to its head's most similar kept key, and that
    slot: (u, c) [B, H, L] (u = -inf where a slot is not evicted or its head keeps nothing)."""
    index, count = mask_to_index(evicted)  # only the evicted rows: [B, H, E] with E << L while decoding
    unit = F.normalize(keys.float(), dim=-1)
    rows = unit.gather(2, index[..., None].expand(-1, -1, -1, unit.shape[-1]))
    sim = (rows @ unit.transpose(-1, -2)).masked_fill(~kept[:, :, None, :], float("-inf"))  # [B, H, E, L]
    best, slot = sim.max(-1) if sim.shape[-1] else (sim.sum(-1), sim.sum(-1).long())
    best = best.masked_fill(torch.arange(index.shape[-1], device=keys.device) >= count[..., None], float("-inf"))
    u = torch.full(evicted.shape, float("-inf"), device=keys.device).scatter(2, index, best)
    c = torch.zeros(evicted.shape, dtype=torch.long, device=keys.device).scatter(2, index, slot)
    return u.masked_fill(~evicted, float("-inf")), c


class D2O(H2O):
    """sink: first tokens always kept (4); recent_ratio: newest share of each layer's budget (0.5);
    alpha / beta: EMA weights of the merge threshold (0.5 / 0.5); merge: recall similar evicted
    tokens (False gives H2O with D2O's layer budgets); first_dense / last_dense: leading / trailing
    layers never compressed (2 / 1)."""

    name: ClassVar[str] = "d2o"
    compress_prefill: ClassVar[bool] = False
    default_decode_interval: ClassVar[int] = 1

    def __init__(
        self,
        n_layer: int,
        budget: Budget,
        *,
        sink: int = 4,
        alpha: float = 0.5,
        beta: float = 0.5,
        merge: bool = True,
        first_dense: int = 2,
        last_dense: int = 1,
        **h2o,
    ) -> None:
        super().__init__(n_layer, budget, sink=sink, **h2o)
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= beta <= 1.0:
            raise ValueError(f"alpha and beta must be in [0, 1], got {alpha}, {beta}")
        for label, value in (("first_dense", first_dense), ("last_dense", last_dense)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{label} must be an int >= 0, got {value!r}")
        self.alpha, self.beta, self.merge = alpha, beta, merge
        self.compressed = range(first_dense, max(n_layer - last_dense, first_dense))
        self.sigma: list[Tensor | None] = [None] * n_layer  # [B] per layer, from the prompt
        self.budgets: Tensor | None = None  # [B, n_layer], set at the first eviction
        self.tau: list[Tensor | None] = [None] * n_layer  # [B] merge threshold per layer (nan: not yet set)

    def record(self, layer: int, queries: Tensor, query_positions: Tensor, kind: StepKind) -> None:
        entry = self.layers[layer]
        assert entry is not None
        received = self.attention_received(layer, queries, query_positions)
        self.slot_state(layer, "accumulated").add_(received.sum(2))
        if kind == "prefill":
            self.sigma[layer] = attention_variance(received, entry.valid)

    def layer_budget(self, layer: int) -> Tensor:
        assert self.budget_tokens is not None
        if self.budgets is None:
            entry = self.layers[layer]
            assert entry is not None
            self.budgets = self.allocate(entry.valid.sum(-1).amax(-1))
        return self.budgets[:, layer]

    def allocate(self, cached: Tensor) -> Tensor:
        """Tokens per KV head [B, n_layer] given the tokens cached per row [B] when eviction starts."""
        assert self.budget_tokens is not None
        budget, n_layer = self.budget_tokens, len(self.layers)
        out = torch.full((budget.shape[0], n_layer), NEVER, dtype=torch.long, device=budget.device)
        layers = list(self.compressed)
        if not layers:
            return out
        sigma = torch.stack([self.sigma[layer] for layer in layers], -1)  # type: ignore[misc]
        weights = torch.softmax(-sigma, -1)
        ones = torch.ones_like(weights, dtype=torch.long)
        share = ones + split_bounded(len(layers) * (budget - 1), weights, (cached[:, None] - ones).clamp(min=0))
        fits = (cached <= budget)[:, None]  # such rows keep the uniform budget
        out[:, layers] = torch.where(fits, budget[:, None], share)
        return out

    def evict(self, layer: int, index: Tensor, count: Tensor) -> None:
        entry = self.layers[layer]
        assert entry is not None
        if self.merge:
            use = torch.arange(index.shape[-1], device=index.device) < count[..., None]
            kept = torch.zeros_like(entry.valid).scatter_(2, index, use) & entry.valid
            evicted = entry.valid & ~kept
            u, c = best_kept_match(entry.keys, kept, evicted)
            tau = self.update_threshold(layer, u)
            merged = evicted & (u >= tau[:, None, None])
            slot = torch.arange(entry.capacity, device=index.device).expand_as(kept)
            target = torch.where(kept, slot, torch.where(merged, c, -1))
            weight = torch.where(merged, u, 1.0).to(entry.keys.dtype)
            ones = torch.ones_like(weight)
            entry.keys, entry.values = merge_kv(
                entry.keys, entry.values, target, weight, ones, use_kernels=wanted(entry.keys)
            )
        super().evict(layer, index, count)

    def update_threshold(self, layer: int, u: Tensor) -> Tensor:
        """The EMA threshold per row [B] after this eviction's similarities u [B, H, L] (-inf: none)."""
        finite = u > float("-inf")
        n = finite.sum((1, 2))
        mean_u = torch.where(finite, u, 0.0).sum((1, 2)) / n.clamp(min=1)
        old = self.tau[layer]
        if old is None:
            old = torch.full_like(mean_u, float("nan"))
        new = torch.where(old.isnan(), mean_u, self.alpha * old + self.beta * mean_u)
        self.tau[layer] = torch.where(n > 0, new, old)  # a row that evicted nothing keeps its threshold
        return self.tau[layer]
