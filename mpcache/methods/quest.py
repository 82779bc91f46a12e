"""Quest (Tang et al., arXiv 2406.10774): query-aware page selection, nothing evicted.

The cache is split into pages of `page_size` consecutive tokens, each summarised by the
per-channel max and min of its keys (kept incrementally, `extend_chunk_min_max`: only
the last, still filling page changes). At every decode step each KV head reads only its
budget // page_size pages: the last page (the newest tokens) and the pages with the
largest criticality, an upper bound of q.k over the page's box,
    U = sum_c max(q_c * max_c, q_c * min_c) >= max_{t in page} q . k_t.
With grouped-query attention a page's score is the max of U over the group's query heads
(a page matters if one head needs it; the official code selects per query head on a
GQA-expanded cache). The prompt and the first `dense_layers` layers attend densely.
Memory does not drop (Quest keeps everything plus metadata); what drops is what a
decode step reads.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import page_bound, wanted
from mpcache.methods.base import (
    Budget,
    ChunkSummary,
    PolicyCache,
    chunks_to_slots,
    extend_chunk_min_max,
    group_queries,
    mask_to_index,
    top_mask,
)


class Quest(PolicyCache):
    """page_size: tokens per page (16); dense_layers: leading layers that attend densely (2)."""

    name: ClassVar[str] = "quest"
    compress_prefill: ClassVar[bool] = False

    def __init__(self, n_layer: int, budget: Budget, *, page_size: int = 16, dense_layers: int = 2, **common) -> None:
        super().__init__(n_layer, budget, **common)
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {dense_layers}")
        self.page_size, self.dense_layers = page_size, dense_layers
        self.meta: list[ChunkSummary | None] = [None] * n_layer  # page key max, min, nonempty; tokens summarised

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        super().observe(layer, queries, query_positions)  # resets selected[layer]: attend densely
        decoding = self.forwards[layer] > 0 and queries.shape[2] == 1
        entry = self.layers[layer]
        assert entry is not None and self.budget_tokens is not None
        if not decoding or layer < self.dense_layers:
            return
        with torch.no_grad():
            self.meta[layer] = extend_chunk_min_max(self.meta[layer], entry.keys, entry.valid, self.page_size)
            kmax, kmin, nonempty, _ = self.meta[layer]
            budget = self.budget_tokens
            fits = entry.valid.sum(-1) <= budget[:, None]  # such heads attend densely: the full cache
            if bool(fits.all()):
                return
            grouped = group_queries(queries, entry.keys.shape[1])[:, :, :, 0]
            bound = page_bound(grouped, kmax, kmin, use_kernels=wanted(queries)).amax(2)
            last_page = (entry.valid.sum(-1) - 1) // self.page_size
            bound = bound.masked_fill(~nonempty, float("-inf"))
            bound = bound.scatter(-1, last_page[..., None], float("inf"))  # the newest tokens are always read
            pages = (budget // self.page_size).clamp(min=1)[:, None].expand_as(last_page)
            chosen = top_mask(bound, pages) | fits[..., None]
            self.selected[layer] = mask_to_index(chunks_to_slots(chosen, entry.valid, self.page_size))

    def memory_bytes(self) -> int:
        extra = sum(m[0].numel() * m[0].element_size() * 2 for m in self.meta if m is not None)
        return super().memory_bytes() + extra
