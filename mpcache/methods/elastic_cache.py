"""Elastic Cache (Liu et al., arXiv 2407.18121, ECCV 2024): merge around anchors, then a fixed truncation point.

"One sequence, two policies":

1. After the prompt ("instruction encoding"), every token's importance in a layer is the
   attention it received from all prompt queries, averaged over the layer's query heads
   (the paper's best "layer-wise sum"). The budget's worth of most important tokens become
   *anchors*, one set shared by all heads of the layer; the first `sink` tokens and the last
   prompt token are always anchors. Every other token joins its nearest anchor by position
   (ties go to the earlier one, the paper's Eq. 2 buckets) and each anchor's KV becomes the
   plain mean of its bucket's keys and values, per head (Eq. 3). Nothing is dropped outright.
2. While generating, once the cache is over budget, the entry at a fixed index
   N_tl = (merged prompt length) - `distance` is evicted each step: everything before N_tl
   (the merged instruction) stays, the part after it slides like a recent window.

The paper states the budget as a ratio of all tokens processed so far; here, as for every
method, it is a token count per KV head fixed on the prompt (a float budget is a ratio of the
prompt), so generation holds the cache at that count. Anchors follow the paper's top-N_I rule
(the released code compares argsort indices with the count, see methods-part1.md 5.4).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import merge_kv, wanted
from mpcache.methods.base import Budget, PolicyCache


def nearest_anchor(positions: Tensor, valid: Tensor, anchors: Tensor) -> Tensor:
    """Slot of the nearest anchor by position for every valid slot [B, H, L] (ties: the earlier
    anchor; -1 for invalid slots). Slots must be in position order and every head needs an anchor."""
    length = positions.shape[-1]
    slot = torch.arange(length, device=positions.device).expand_as(positions)
    before = torch.where(anchors & valid, slot, -1).cummax(-1).values  # last anchor at or before
    after = torch.where(anchors & valid, slot, length).flip(-1).cummin(-1).values.flip(-1)  # first at or after
    pos_before = positions.gather(-1, before.clamp(min=0))
    pos_after = positions.gather(-1, after.clamp(max=length - 1))
    take_before = (after >= length) | ((before >= 0) & (positions - pos_before <= pos_after - positions))
    return torch.where(valid, torch.where(take_before, before, after), -1)


class ElasticCache(PolicyCache):
    """sink: first tokens that are always anchors and never evicted (1, the eval scripts'
    start size); distance: the truncation point's offset from the end of the merged prompt (25)."""

    name: ClassVar[str] = "elastic_cache"
    default_decode_interval: ClassVar[int] = 1

    def __init__(self, n_layer: int, budget: Budget, *, sink: int = 1, distance: int = 25, **common) -> None:
        super().__init__(n_layer, budget, sink=sink, window=1, **common)
        if not isinstance(distance, int) or distance < 0:
            raise ValueError(f"distance must be an int >= 0, got {distance!r}")
        self.distance = distance
        self.truncation: Tensor | None = None  # [B] N_tl, fixed after the prompt

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        entry = self.layers[layer]
        assert entry is not None
        if self.decode_steps[layer] > 0:
            return torch.zeros(entry.valid.shape, device=entry.keys.device)  # only the truncation point decides
        received = self.attention_received(layer, queries, query_positions).mean(2)  # [B, Hkv, L]
        return received.mean(1, keepdim=True).expand_as(received)  # all query heads, one set per layer

    def protection(self, layer: int, budget: Tensor) -> tuple[int | Tensor, int | Tensor]:
        if self.decode_steps[layer] == 0:
            return self.sink, 1  # the first tokens and the last prompt token are anchors
        assert self.prompt_lengths is not None
        merged = torch.minimum(budget, self.prompt_lengths)
        point = torch.maximum(merged - self.distance, torch.full_like(budget, self.sink))  # sinks stay too
        point = torch.minimum(point, (budget - 1).clamp(min=0))  # room for the newest token
        self.truncation = point
        return point, budget - point

    def evict(self, layer: int, index: Tensor, count: Tensor) -> None:
        if self.decode_steps[layer] == 0:  # the prompt: merge every token into its nearest anchor
            entry = self.layers[layer]
            assert entry is not None
            use = torch.arange(index.shape[-1], device=index.device) < count[..., None]
            anchors = torch.zeros_like(entry.valid).scatter_(2, index, use) & entry.valid
            target = nearest_anchor(entry.positions, entry.valid, anchors)
            ones = torch.ones(entry.valid.shape, dtype=entry.keys.dtype, device=entry.keys.device)
            entry.keys, entry.values = merge_kv(
                entry.keys, entry.values, target, ones, ones, use_kernels=wanted(entry.keys)
            )
        super().evict(layer, index, count)
