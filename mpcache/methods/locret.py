"""Locret (Huang et al., arXiv 2410.01805): trained retaining heads score tokens for eviction.

Every layer gets a small retaining head that reads a token's pre-RoPE query, key and
value (all heads concatenated) and predicts, per KV head, its causal importance score:
the largest attention logit any later query will give it. The frozen model never sees
the heads, so they cannot change its outputs. A token is scored once, when it arrives,
and keeps that score. The prompt is prefilled chunk by chunk (`prefill_in_chunks`; with
`generate` the whole prompt is one chunk): after every chunk each KV head keeps its
`budget` best-scored tokens, and the newest `stabilizers` tokens are always kept.
Decoding appends tokens without evicting anything (as the official inference loop does).

Differences from the official code, both forced by this repo's cache: keys are cached
after RoPE at their original positions (Locret caches pre-RoPE keys and re-indexes
positions contiguously after eviction), and the stabilizers are also protected after
the final chunk (Locret holds back the last 100 prompt tokens instead, which are never
evicted either). The heads are trained by `python -m mpcache.methods.train_locret`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from mpcache.methods.base import Budget
from mpcache.methods.trained import TrainedPolicy
from mpcache.model.cache import LayerKV
from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Attention, Transformer, activation


def qkv_features(attn: Attention, hidden: Tensor) -> Tensor:
    """The retaining head's input: pre-RoPE [q, k, v] of every token [B, T, (H + 2 Hkv) d]."""
    return torch.cat([attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)], -1)


class RetainingHeads(nn.Module):
    """Per layer: (H + 2 Hkv) d -> hidden -> Hkv, two bias-free linears with the model's
    activation between. Locret uses 1024 hidden units on 3-4k-wide models; `hidden`
    defaults to d_model // 4 so the heads stay a few percent of the model, as there."""

    def __init__(self, config: ModelConfig, hidden: int | None = None) -> None:
        super().__init__()
        assert config.head_dim is not None
        width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        hidden = hidden or max(16, config.d_model // 4)
        self.activation = config.activation
        self.fc1 = nn.ModuleList(nn.Linear(width, hidden, bias=False) for _ in range(config.n_layer))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, config.n_kv_head, bias=False) for _ in range(config.n_layer))

    @classmethod
    def of_model(cls, model: Transformer) -> RetainingHeads:
        return cls(model.config)

    def forward(self, layer: int, features: Tensor) -> Tensor:
        """features [..., width] -> predicted importance [..., Hkv]."""
        return self.fc2[layer](activation(self.fc1[layer](features), self.activation))


class Locret(TrainedPolicy):
    """stabilizers: newest tokens always kept after a chunk (Locret's n_s; its passkey
    example pairs 10 with a budget of 100, the benchmark scripts use 2,500-3,000 with
    budgets of 6k-16k); heads: "auto" (the trained heads of this model, else random with a
    warning), "random", or a path to a trained artifact."""

    name: ClassVar[str] = "locret"
    compress_chunks: ClassVar[bool] = True
    parts_attr: ClassVar[str] = "heads"
    score_state: ClassVar[str] = "importance"
    build_parts = RetainingHeads.of_model
    heads: RetainingHeads | None

    def __init__(self, n_layer: int, budget: Budget, *, stabilizers: int = 10, heads: str = "auto", **common) -> None:
        if "window" in common:
            raise TypeError("locret protects its newest tokens with `stabilizers`, not `window`")
        super().__init__(n_layer, budget, heads, window=stabilizers, **common)
        self.attention: list[Attention] = []
        self.pending: list[Tensor | None] = [None] * n_layer

    @classmethod
    def from_model(cls, model: Transformer, budget: Budget | None, **kwargs) -> Locret:
        cache = super().from_model(model, budget, **kwargs)
        assert isinstance(cache, Locret)
        cache.attention = [block.attn for block in model.blocks]
        return cache

    @torch.no_grad()
    def observe_hidden(self, layer: int, hidden: Tensor) -> None:
        if self.heads is None:
            raise ValueError("locret needs its retaining heads: build the cache with Locret.from_model(model, ...)")
        self.pending[layer] = self.heads(layer, qkv_features(self.attention[layer], hidden).float())

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> LayerKV:
        entry = super().update(layer, keys, values, positions, valid)
        predicted = self.pending[layer]
        if predicted is None:
            raise ValueError(f"layer {layer}: update without observe_hidden (locret scores tokens from their q/k/v)")
        self.store_scores(layer, entry, predicted)
        self.pending[layer] = None
        return entry
