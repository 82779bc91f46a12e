"""KVMerger (Wang et al., arXiv 2407.08454): merge runs of similar adjacent keys instead of dropping them.

Keys of neighbouring tokens are highly similar (cosine), values are not; so once, after the
prompt, every KV head groups its tokens into *merging sets*, contiguous runs whose adjacent
keys have cosine similarity > `threshold`, and replaces each set by one KV pair, a
Gaussian-kernel weighted average around its *pivot* p (the member with the largest attention
accumulated over the prompt, H2O's score):

    g_i = exp(-||k_p - k_i||^2 / (2 sigma^2)),   w_i = g_i / sum_j g_j,
    k = sum_i w_i k_i,   v = sum_i w_i v_i        (stored at the pivot's slot and position)

The newest `recent_ratio` and the most attended `heavy_ratio` of the budget are never merged.

No official code exists and the paper does not say how a fixed threshold meets a 50% / 35%
budget (see methods-part1.md 4.2), so here the budget is exact: Algorithm 1 (a temporally
constrained agglomerative clustering) merges the most similar adjacent pairs first, which in
one dimension is the same as cutting the weakest links, and it stops when the head is down to
its budget or no link above the threshold is left. If sets still outnumber the budget, the
sets with the least accumulated attention (of their pivot) are evicted, as H2O would. sigma is
the paper's empirical constant 5 (its Eq. 4 is circular); values get no |S| multiplier (the
secondary sources disagree); all layers merge (a note suggests skipping the first two and the
last). Decode tokens are appended untouched unless `decode_interval` asks for more merging.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.kernels import merge_kv, wanted
from mpcache.methods.base import Budget, mask_to_index, protect, top_mask, topk_slots
from mpcache.methods.h2o import H2O


def merging_sets(keys: Tensor, valid: Tensor, fixed: Tensor, n_merge: Tensor, threshold: float) -> Tensor:
    """Merging sets of the valid slots (in slot = position order) as set ids [B, H, L] (-1: invalid).

    The `n_merge` [B, H] most similar adjacent pairs with cosine > `threshold` are joined (fewer
    if not enough qualify); a `fixed` slot [B, H, L] is never joined to anything."""
    index, count = mask_to_index(valid)  # valid slots first, in order
    n = index.shape[-1]
    k = keys.gather(2, index[..., None].expand(-1, -1, -1, keys.shape[-1]))
    free = fixed.gather(2, index).logical_not() & (torch.arange(n, device=keys.device) < count[..., None])
    sim = F.cosine_similarity(k[:, :, :-1], k[:, :, 1:], dim=-1)  # link i joins compact slots i and i + 1
    eligible = free[:, :, :-1] & free[:, :, 1:] & (sim > threshold)
    joined = top_mask(sim.masked_fill(~eligible, float("-inf")), n_merge.clamp(min=0))
    cut = torch.cat([torch.ones_like(joined[:, :, :1]), ~joined], -1)  # a new set starts at slot 0 and every cut
    ids = cut.long().cumsum(-1) - 1
    ids = ids.masked_fill(torch.arange(n, device=keys.device) >= count[..., None], -1)
    out = torch.full_like(valid, -1, dtype=torch.long)
    return out.scatter_(2, index, ids) if n else out


def set_pivots(set_ids: Tensor, scores: Tensor) -> Tensor:
    """Slot of every set's pivot, the member with the largest score (first on ties), per slot [B, H, L]."""
    length = set_ids.shape[-1]
    spare = torch.where(set_ids < 0, length, set_ids)  # invalid slots -> a spare set
    best = scores.new_full((*set_ids.shape[:2], length + 1), float("-inf")).scatter_reduce(2, spare, scores, "amax")
    slot = torch.arange(length, device=scores.device).expand_as(set_ids)
    is_best = scores >= best.gather(2, spare)
    first = torch.full_like(best, length, dtype=torch.long).scatter_reduce(
        2, spare, torch.where(is_best, slot, length), "amin"
    )
    return torch.where(set_ids < 0, -1, first.gather(2, spare))


def gaussian_weights(keys: Tensor, pivot: Tensor, sigma: float) -> Tensor:
    """g_i = exp(-||k_pivot - k_i||^2 / (2 sigma^2)) per slot [B, H, L] (0 where pivot = -1)."""
    k_pivot = keys.gather(2, pivot.clamp(min=0)[..., None].expand(-1, -1, -1, keys.shape[-1]))
    g = torch.exp(-(k_pivot - keys).pow(2).sum(-1) / (2 * sigma**2))
    return g.masked_fill(pivot < 0, 0.0)


class KVMerger(H2O):
    """threshold: cosine similarity above which adjacent keys may merge (0.75); sigma: Gaussian
    kernel width (5); recent_ratio / heavy_ratio: shares of the budget kept unmerged as the
    newest / most attended tokens (0.17 / 0.12, the paper's settings at a 50% budget read as
    budget shares; their unit is unclear in the sources); sink: first tokens kept unmerged (0)."""

    name: ClassVar[str] = "kvmerger"
    default_decode_interval: ClassVar[int] = 0

    def __init__(
        self,
        n_layer: int,
        budget: Budget,
        *,
        threshold: float = 0.75,
        sigma: float = 5.0,
        recent_ratio: float = 0.17,
        heavy_ratio: float = 0.12,
        **common,
    ) -> None:
        super().__init__(n_layer, budget, recent_ratio=recent_ratio, **common)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if not 0.0 <= heavy_ratio <= 1.0 or recent_ratio + heavy_ratio > 1.0:
            raise ValueError(f"heavy_ratio must be in [0, 1 - recent_ratio], got {heavy_ratio}")
        self.threshold, self.sigma, self.heavy_ratio = threshold, sigma, heavy_ratio

    def compress(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        entry = self.layers[layer]
        assert entry is not None
        budget = self.layer_budget(layer)
        n_valid = entry.valid.sum(-1)
        if bool((n_valid <= budget[:, None]).all()):
            return
        cap = torch.minimum(budget[:, None].expand_as(n_valid), n_valid)
        accumulated = self.slot_state(layer, "accumulated")
        sink, window = self.protection(layer, budget)
        fixed = protect(torch.zeros_like(accumulated), entry.valid, cap, sink, window) == float("inf")
        n_heavy = torch.minimum((budget.double() * self.heavy_ratio).floor().long()[:, None], cap - fixed.sum(-1))
        fixed |= top_mask(accumulated.masked_fill(fixed | ~entry.valid, float("-inf")), n_heavy)
        sets = merging_sets(entry.keys, entry.valid, fixed, n_valid - cap, self.threshold)
        pivot = set_pivots(sets, accumulated)
        g = gaussian_weights(entry.keys, pivot, self.sigma)
        entry.keys, entry.values = merge_kv(entry.keys, entry.values, pivot, g, g, use_kernels=wanted(entry.keys))
        is_pivot = pivot == torch.arange(pivot.shape[-1], device=pivot.device)
        # more sets than the budget (not enough similar pairs): evict the least attended sets
        scores = protect(accumulated.masked_fill(~is_pivot, float("-inf")), entry.valid, cap, 0, 0)
        self.keep(layer, *topk_slots(scores.masked_fill(fixed, float("inf")), cap))
