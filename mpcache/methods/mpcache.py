"""MPCache (Zeng et al., arXiv 2501.06807): MPC-friendly KV-cache eviction, plaintext reference.

Tokens fall into three groups: useful to every query (kept), useless to every query
(evicted once, at the prompt) and useful to some (picked per decode step). Hence:

1. Look-once static eviction, once after the prompt's attention. The last
   `window_ratio` (20%; 10% above `long_prompt` = 24,000 tokens) of the prompt's queries
   vote: a token's score is its softmax attention from those queries averaged over all
   heads and summed over the window (`static_scores`). One keep-set per layer, shared by
   its heads. We keep a FIXED count, max(budget, static_ratio x prompt length), rather
   than the released code's data-dependent threshold, because under MPC the count is
   revealed when the cache is compacted (the paper's threat model makes it public); the
   first `sink` and last `window` tokens (one 16-token cluster each) are always kept.
   Tokens generated later are never statically evicted.
2. Hierarchical clustering: the retained slots form contiguous clusters of
   `cluster_size` (32) tokens, each split into two sub-clusters of `subcluster_size` (16);
   no k-means, so a cluster's keys summary is an elementwise max/min over its slots.
3. MPC-friendly similarity: a cluster scores q . (alpha r_max + (1 - alpha) r_min),
   alpha = 0.6 (`approx_similarity`): one matrix-vector product with a per-cluster
   representative, no max and no comparison, unlike Quest's bound sum_c max(q_c r_max,
   q_c r_min). With grouped-query attention the group's queries are summed (the score is
   linear in q, so this is the sum of the heads' scores).
4. Query-aware dynamic selection at every decode step, per KV head (`select_clusters`):
   keep a `ratio1` (0.5) share of the 32-token clusters (at least enough parents for
   level 2), then among their 16-token children the budget // 16 best. The first and the
   last cluster (attention sinks; newest and generated tokens) are always selected at
   both levels. Attention reads only the selected sub-clusters.
5. Cross-layer index sharing: adjacent layers' selections overlap, so between the first
   `own_first` (2) and last `own_last` (2) layers each odd layer reuses both the static
   keep-set and the dynamic selection of the even layer before it (`sharing_pairs`).

Every step is a plain tensor function so the MPC implementation can mirror it one to one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mpcache.methods.base import (
    Budget,
    PolicyCache,
    chunk_min_max,
    chunks_to_slots,
    group_queries,
    mask_to_index,
    top_mask,
)
from mpcache.model.cache import LayerKV, gather_slots


def observation_window(
    prompt_length: int, ratio: float = 0.2, long_prompt: int = 24_000, long_ratio: float = 0.1
) -> int:
    """Number of the prompt's last queries that vote in static eviction (>= 1)."""
    return max(1, int(prompt_length * (long_ratio if prompt_length > long_prompt else ratio)))


def static_scores(received: Tensor) -> Tensor:
    """Head-averaged attention [B, L] from the window's attention summed per head [B, Hkv, G, L]."""
    return received.mean((1, 2))


def cluster_representatives(kmax: Tensor, kmin: Tensor, alpha: float) -> Tensor:
    """alpha r_max + (1 - alpha) r_min per cluster [B, H, C, D]: the one vector a query meets."""
    return alpha * kmax + (1.0 - alpha) * kmin


def approx_similarity(query: Tensor, kmax: Tensor, kmin: Tensor, alpha: float) -> Tensor:
    """MPCache's linearised cluster score: query [B, H, D] x clusters [B, H, C, D] -> [B, H, C]."""
    return torch.einsum("bhd,bhcd->bhc", query, cluster_representatives(kmax, kmin, alpha))


def force_ends(scores: Tensor, nonempty: Tensor) -> Tensor:
    """Scores with the first and last non-empty cluster of every head at +inf, empty ones at -inf."""
    index = torch.arange(nonempty.shape[-1], device=nonempty.device).expand_as(nonempty)
    first = torch.where(nonempty, index, nonempty.shape[-1]).amin(-1, keepdim=True)
    last = torch.where(nonempty, index, -1).amax(-1, keepdim=True)
    scores = scores.masked_fill(~nonempty, float("-inf"))
    ends = ((index == first) | (index == last)) & nonempty
    return scores.masked_fill(ends, float("inf"))


def select_clusters(
    query: Tensor,
    keys: Tensor,
    valid: Tensor,
    tokens: Tensor,
    alpha: float = 0.6,
    cluster_size: int = 32,
    subcluster_size: int = 16,
    ratio1: float = 0.5,
) -> Tensor:
    """Two-level query-aware selection; returns the slots attention reads [B, H, L] (bool).

    query [B, H, D]; keys [B, H, L, D] with `valid` [B, H, L]; tokens [B]: per-head budget,
    so budget // subcluster_size (>= 2) sub-clusters are read.
    """
    b, h = keys.shape[:2]
    n_sub = (tokens // subcluster_size).clamp(min=2)[:, None].expand(b, h)
    kmax, kmin, nonempty = chunk_min_max(keys, valid, cluster_size)
    parent_scores = force_ends(approx_similarity(query, kmax, kmin, alpha), nonempty)
    at_least = -(-(n_sub + 1) // 2)  # enough parents to hold n_sub children
    n_parent = torch.maximum(at_least, (ratio1 * nonempty.sum(-1)).floor().long())
    parents = top_mask(parent_scores, n_parent)
    kmax, kmin, nonempty = chunk_min_max(keys, valid, subcluster_size)
    eligible = parents.repeat_interleave(cluster_size // subcluster_size, -1)[..., : nonempty.shape[-1]]
    child_scores = force_ends(approx_similarity(query, kmax, kmin, alpha), nonempty)
    children = top_mask(child_scores.masked_fill(~eligible, float("-inf")), n_sub)
    return chunks_to_slots(children, valid, subcluster_size)


def sharing_pairs(n_layer: int, own_first: int = 2, own_last: int = 2) -> dict[int, int]:
    """{layer: layer it reuses}: between the first `own_first` and the last `own_last`
    layers, every second layer reuses the one before it (32 layers: 3 <- 2, ..., 29 <- 28)."""
    return {layer: layer - 1 for layer in range(own_first + 1, n_layer - own_last, 2)}


def check_knobs(
    static_ratio: float,
    window_ratio: float,
    long_window_ratio: float,
    ratio1: float,
    alpha: float,
    cluster_size: int,
    subcluster_size: int,
) -> None:
    """Validate the knobs the plaintext reference and the private version (mpcache.mpc.mpcache_private) share."""
    for label, value in (
        ("static_ratio", static_ratio),
        ("window_ratio", window_ratio),
        ("long_window_ratio", long_window_ratio),
        ("ratio1", ratio1),
    ):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{label} must be in (0, 1], got {value}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if subcluster_size < 1 or cluster_size % subcluster_size:
        raise ValueError(f"cluster_size ({cluster_size}) must be a multiple of subcluster_size ({subcluster_size})")


class MPCache(PolicyCache):
    """budget: tokens each KV head reads per decode step (int, or a ratio of the prompt).

    static_ratio: prompt share kept by static eviction (at least the budget); 0.5 follows
    the authors' fixed-ratio variant ("fix the static ratio"; the threshold variant kept
    15-50% depending on the dataset). Other knobs and defaults as in the module docstring.
    """

    name: ClassVar[str] = "mpcache"

    def __init__(
        self,
        n_layer: int,
        budget: Budget,
        *,
        static_ratio: float = 0.5,
        window_ratio: float = 0.2,
        long_prompt: int = 24_000,
        long_window_ratio: float = 0.1,
        alpha: float = 0.6,
        cluster_size: int = 32,
        subcluster_size: int = 16,
        ratio1: float = 0.5,
        share_layers: bool = True,
        own_first: int = 2,
        own_last: int = 2,
        sink: int = 16,
        window: int = 16,
        **common,
    ) -> None:
        super().__init__(n_layer, budget, sink=sink, window=window, **common)
        check_knobs(static_ratio, window_ratio, long_window_ratio, ratio1, alpha, cluster_size, subcluster_size)
        if own_first < 0 or own_last < 0:
            raise ValueError("own_first and own_last must be >= 0")
        self.static_ratio, self.alpha, self.ratio1 = static_ratio, alpha, ratio1
        self.window_ratio, self.long_prompt, self.long_window_ratio = window_ratio, long_prompt, long_window_ratio
        self.cluster_size, self.subcluster_size = cluster_size, subcluster_size
        self.shared_from = sharing_pairs(n_layer, own_first, own_last) if share_layers else {}
        self.static_kept: list[tuple[Tensor, Tensor] | None] = [None] * n_layer
        self.selected: list[tuple[Tensor, Tensor] | None] = [None] * n_layer

    # ------------------------------------------------------ 1. static eviction
    def layer_budget(self, layer: int) -> Tensor:
        assert self.budget_tokens is not None and self.prompt_lengths is not None
        by_ratio = (self.prompt_lengths.double() * self.static_ratio).floor().long()
        return torch.maximum(self.budget_tokens, by_ratio)

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        assert self.prompt_lengths is not None
        windows = torch.tensor(
            [
                observation_window(int(n), self.window_ratio, self.long_prompt, self.long_window_ratio)
                for n in self.prompt_lengths.tolist()
            ],
            device=queries.device,
        )
        w = min(int(windows.max()), queries.shape[2])
        own = torch.arange(w, device=queries.device) >= w - windows[:, None]  # [B, W]: each row's own window
        received = self.attention_received(layer, queries, query_positions, last=w, weights=own.float())
        return static_scores(received)[:, None, :].expand(-1, received.shape[1], -1)

    def compress(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        source = self.shared_from.get(layer)
        if source is None:
            super().compress(layer, queries, query_positions)
            return
        kept = self.static_kept[source]  # reuse the previous layer's keep-set (None: it kept everything)
        if kept is not None:
            self.keep(layer, *kept)
        self.static_kept[layer] = kept

    def evict(self, layer: int, index: Tensor, count: Tensor) -> None:
        self.static_kept[layer] = (index, count)
        super().evict(layer, index, count)

    # ---------------------------------------------------- 4. dynamic selection
    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        super().observe(layer, queries, query_positions)
        self.selected[layer] = None
        if self.forwards[layer] == 0 or queries.shape[2] != 1:
            return  # the prompt (and any later block) attends densely
        source = self.shared_from.get(layer)
        if source is not None:
            self.selected[layer] = self.selected[source]
            return
        entry = self.layers[layer]
        assert entry is not None and self.budget_tokens is not None
        fits = entry.valid.sum(-1) <= self.budget_tokens[:, None]  # such heads read everything
        if bool(fits.all()):
            return
        with torch.no_grad():
            query = group_queries(queries, entry.keys.shape[1])[:, :, :, 0].sum(2)
            mask = select_clusters(
                query,
                entry.keys,
                entry.valid,
                self.budget_tokens,
                self.alpha,
                self.cluster_size,
                self.subcluster_size,
                self.ratio1,
            )
        self.selected[layer] = mask_to_index(mask | (entry.valid & fits[..., None]))

    def read(self, layer: int) -> LayerKV:
        entry = super().read(layer)
        chosen = self.selected[layer]
        return entry if chosen is None else gather_slots(entry, *chosen)
