"""Attention-Gate (Zeng et al., arXiv 2410.12876): trained gates decide, in context, what to cache.

Before each attention layer a small gate reads the layer's input: a reduced causal
attention (a few narrow heads with their own RoPE, over every token seen so far) and a
linear map to one retention logit per KV head. g = sigmoid(logit) is decided once, when
the token is processed (prompt or decode step), and never revisited. Without a budget
(the paper's mode) the flag g >= `threshold` says keep, anything else is evicted right
after the step that produced it (after attention, as every method here: the prompt
attends to the whole prompt, then a generated token sees the flagged prompt tokens, the
flagged earlier generated tokens and itself), except the first `sink` and newest
`window` tokens, which stay until they leave that window. The eviction ratio is an outcome of
training. With a budget, g is the importance score of the usual keep-set rule instead
(each head keeps its `budget` highest-g tokens, re-applied every decode step), so the
gates can be compared with the other methods at equal cache size.

The gate keeps its own small key/value store of every token (2 x heads x head_dim
numbers per token and layer; counted in `memory_bytes`). Gate sizes, the eviction
loss and its target are not in the sources the notes could reach; the choices here are
documented in `mpcache.methods.train_gates`, which trains the gates of the bundled model.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpcache.kernels import cached_attention
from mpcache.methods.base import Budget, mask_to_index, protect
from mpcache.methods.trained import TrainedPolicy
from mpcache.model.cache import KVCache, LayerKV
from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Transformer, apply_rope, rope_inverse_frequencies


class Gates(nn.Module):
    """One gate per layer: `heads` causal attention heads of `head_dim` dims over the layer
    input, then a linear map to a retention logit per KV head (bias starts at +1: keep)."""

    def __init__(self, config: ModelConfig, heads: int = 2, head_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.qkv = nn.ModuleList(nn.Linear(config.d_model, 3 * width, bias=False) for _ in range(config.n_layer))
        self.out = nn.ModuleList(nn.Linear(width, config.n_kv_head) for _ in range(config.n_layer))
        for linear in self.out:
            nn.init.constant_(linear.bias, 1.0)
        self.register_buffer("inv_freq", rope_inverse_frequencies(ModelConfig(head_dim=head_dim)), persistent=False)

    @classmethod
    def of_model(cls, model: Transformer) -> Gates:
        return cls(model.config)

    def project(self, layer: int, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden [B, T, d_model] -> the gate's q, k, v [B, heads, T, head_dim] (q, k rotated)."""
        b, t, _ = hidden.shape
        q, k, v = self.qkv[layer](hidden).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq), v

    def logits(self, layer: int, mixed: Tensor) -> Tensor:
        """The gate attention's output [B, heads, T, head_dim] -> retention logits [B, T, Hkv]."""
        b, _, t, _ = mixed.shape
        return self.out[layer](mixed.transpose(1, 2).reshape(b, t, -1))

    def forward(self, layer: int, hidden: Tensor) -> Tensor:
        """Retention logits [B, T, Hkv] of a whole unpadded sequence (training)."""
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        q, k, v = self.project(layer, hidden, positions)
        return self.logits(layer, F.scaled_dot_product_attention(q, k, v, is_causal=True))


class AttentionGate(TrainedPolicy):
    """threshold: keep a token when its gate g >= threshold (0.5, the paper's hard flag);
    gates: "auto" (this model's trained gates, else random with a warning), "random", or
    a path to a trained artifact; sink / window: first and newest tokens kept whatever
    their gate (4, StreamingLLM's sinks, and 32, SnapKV's window: the paper's choice is
    unknown; the gates are trained with the same protection). budget: optional (see the
    module docstring)."""

    name: ClassVar[str] = "attention_gate"
    needs_budget: ClassVar[bool] = False
    default_decode_interval: ClassVar[int] = 1
    parts_attr: ClassVar[str] = "gates"
    score_state: ClassVar[str] = "gate"
    build_parts = Gates.of_model
    gates: Gates | None

    def __init__(
        self,
        n_layer: int,
        budget: Budget | None = None,
        *,
        threshold: float = 0.5,
        gates: str = "auto",
        sink: int = 4,
        window: int = 32,
        **common,
    ) -> None:
        super().__init__(n_layer, budget, gates, sink=sink, window=window, **common)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.gate_store = KVCache(n_layer)  # the gates' own keys/values, every token
        self.hidden: list[Tensor | None] = [None] * n_layer

    def observe_hidden(self, layer: int, hidden: Tensor) -> None:
        if self.gates is None:
            raise ValueError("attention_gate needs its gates: build it with AttentionGate.from_model(model, ...)")
        self.hidden[layer] = hidden

    @torch.no_grad()
    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> LayerKV:
        entry = super().update(layer, keys, values, positions, valid)
        hidden = self.hidden[layer]
        if hidden is None or self.gates is None:
            raise ValueError(f"layer {layer}: update without observe_hidden (the gates read the layer input)")
        q, k, v = self.gates.project(layer, hidden.float(), positions)  # the gates run in float32
        store = self.gate_store.update(layer, k, v, positions, valid)
        mixed = cached_attention(q, store.keys, store.values, positions, store.positions, store.valid)
        self.store_scores(layer, entry, torch.sigmoid(self.gates.logits(layer, mixed).float()))  # keep [B, T, Hkv]
        self.hidden[layer] = None
        return entry

    def compress(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        if self.budget is not None:
            return super().compress(layer, queries, query_positions)
        entry = self.layers[layer]
        assert entry is not None
        n_valid = entry.valid.sum(-1)
        scores = protect(self.slot_state(layer, "gate"), entry.valid, n_valid, self.sink, self.window)
        keep = scores >= self.threshold
        if not bool((keep == entry.valid).all()):
            self.keep(layer, *mask_to_index(keep))

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.gate_store.memory_bytes()
