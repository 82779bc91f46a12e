"""ThinK (Xu et al., arXiv 2407.21018): prune the least important KEY channels.

Once, after the prompt: SnapKV token eviction to the budget (the official combined path),
then, per KV head, channel c of the keys scores
    ||Q_w[:, c]|| * ||K[:, c]||   (= ||Q_w[:, c] K[:, c]^T||_F, the paper's criterion)
with Q_w the last `channel_queries` prompt queries of the head's query group and K the
kept keys. The floor(channel_ratio x D) lowest channels are dropped from every prompt
key except the newest `recent` ones, and only the kept channels are stored (with their
indices), so key memory really drops. Values, recent keys and decode keys keep all
channels. Attention reads the pruned keys re-expanded with zeros, which equals masking
the query in the pruned channels for those tokens.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from mpcache.kernels import channel_scores, concat_layers, gather_slots, wanted
from mpcache.kernels.compressed import expand_pruned, pruned_attention
from mpcache.methods.base import Budget, group_queries, mask_to_index, recency_rank
from mpcache.methods.snapkv import SnapKV
from mpcache.model.cache import LayerKV


def prune_channels(scores: Tensor, n_prune: int) -> Tensor:
    """Indices [B, H, D - n_prune] of the kept channels (the highest scores), ascending."""
    keep = scores.shape[-1] - n_prune
    return scores.topk(keep, dim=-1).indices.sort(-1).values


class ThinK(SnapKV):
    """channel_ratio: pruned share of key channels (lambda = 0.4 in the official scripts);
    recent: newest prompt tokens whose keys stay whole (32); channel_queries: observation
    queries for the channel criterion (32); SnapKV knobs (window, kernel, pooling) as there."""

    name: ClassVar[str] = "think"

    def __init__(
        self,
        n_layer: int,
        budget: Budget,
        *,
        channel_ratio: float = 0.4,
        recent: int = 32,
        channel_queries: int = 32,
        **snapkv,
    ) -> None:
        if snapkv.get("decode_interval"):
            raise ValueError("ThinK prunes once after the prompt; decode_interval is not supported")
        super().__init__(n_layer, budget, **snapkv)
        if not 0.0 <= channel_ratio < 1.0:
            raise ValueError(f"channel_ratio must be in [0, 1), got {channel_ratio}")
        if recent < 0 or channel_queries < 1:
            raise ValueError(f"recent must be >= 0 and channel_queries >= 1, got {recent}, {channel_queries}")
        self.channel_ratio, self.recent, self.channel_queries = channel_ratio, recent, channel_queries
        self.pruned: list[LayerKV | None] = [None] * n_layer  # keys hold only the kept channels
        self.channels: list[Tensor | None] = [None] * n_layer  # [B, Hkv, D - pruned] kept channel indices

    def compress(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        super().compress(layer, queries, query_positions)  # token eviction (skipped when the prompt fits)
        entry = self.layers[layer]
        assert entry is not None and self.step_valid is not None
        n_prune = int(self.channel_ratio * entry.keys.shape[-1])
        if n_prune == 0:
            return
        w = min(self.channel_queries, queries.shape[2])
        window = group_queries(queries[:, :, -w:] * self.step_valid[:, None, -w:, None], entry.keys.shape[1])
        window = window.flatten(2, 3)  # [B, Hkv, G * w, D]
        scores = channel_scores(window, entry.keys, entry.valid, use_kernels=wanted(entry.keys))
        channels = prune_channels(scores, n_prune)
        old = entry.valid & (recency_rank(entry.valid) >= self.recent)
        if not bool(old.any()):
            return  # every kept prompt token is recent: nothing to prune
        pruned = gather_slots(entry, *mask_to_index(old))
        keys = pruned.keys.gather(-1, channels[:, :, None, :].expand(-1, -1, pruned.capacity, -1))
        self.pruned[layer] = LayerKV(keys, pruned.values, pruned.positions, pruned.valid, pruned.lengths)
        self.channels[layer] = channels
        self.keep(layer, *mask_to_index(entry.valid & ~old))

    def read(self, layer: int) -> LayerKV:
        entry = super().read(layer)
        pruned, channels = self.pruned[layer], self.channels[layer]
        if pruned is None or channels is None:
            return entry
        return concat_layers(expand_pruned(pruned, channels, entry.keys.shape[-1]), entry)

    def attend_kernels(
        self, layer: int, queries: Tensor, query_positions: Tensor, sliding_window: int | None
    ) -> Tensor:
        """`read`'s view without re-expanding the pruned keys: the kernel gathers the query's kept channels."""
        pruned, channels, entry = self.pruned[layer], self.channels[layer], self.layers[layer]
        if pruned is None or channels is None or entry is None:
            return super().attend_kernels(layer, queries, query_positions, sliding_window)
        self.read_tokens[layer] = pruned.valid.sum(-1) + entry.valid.sum(-1)
        return pruned_attention(
            queries, entry, pruned, channels, query_positions, sliding_window, use_kernels=wanted(queries)
        )

    def tokens_per_head(self, layer: int) -> Tensor:
        pruned = self.pruned[layer]
        kept = super().tokens_per_head(layer)
        return kept if pruned is None else kept + pruned.valid.sum(-1)

    def memory_bytes(self) -> int:
        total = super().memory_bytes()
        for pruned, channels in zip(self.pruned, self.channels, strict=True):
            if pruned is not None and channels is not None:
                total += pruned.keys.numel() * pruned.keys.element_size()
                total += pruned.values.numel() * pruned.values.element_size()
                total += channels.numel() * channels.element_size()
        return total
