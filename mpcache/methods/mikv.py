"""MiKV (Yang et al., arXiv 2402.18096): keep evicted tokens, but at low precision.

The importance policy is H2O (heavy hitters + recent window, every step). Instead of
being dropped, every token H2O evicts moves to a low-precision store: per-token
asymmetric round-to-nearest quantization to `low_bits` bits (scale = (max - min) /
(2^bits - 1), zero point = min), packed as bit planes so memory really drops. No token
is ever lost. Keys are first flattened by the dynamic channel balancer computed on the
prompt, b_c = sqrt(max_t |q_t,c| / max_t |k_t,c|): quantizing k * b and dividing by b
after dequantization equals scaling queries by 1/b, so q . k is unchanged while key
outlier channels stop dominating the quantization range. The important set stays at
the model's precision. (No official code exists; the balancer direction and the 3-bit
default follow the paper's reported configuration as far as the notes recovered it.)
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import concat_layers, gather_slots, wanted
from mpcache.kernels.compressed import QuantizedStore, concat_stores, dequantize_store, lowbit_attention, quantize_entry
from mpcache.methods.base import Budget, StepKind, group_queries, mask_to_index
from mpcache.methods.h2o import H2O
from mpcache.model.cache import LayerKV


def channel_balance(queries: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
    """b [B, Hkv, D] = sqrt(max |q| / max |k|) per channel over the prompt (1 where undefined).
    queries [B, Hkv, N, D] (the group's queries stacked), keys [B, Hkv, L, D]."""
    qmax = queries.abs().amax(2)
    kmax = (keys.abs() * valid[..., None]).amax(2)
    ok = (qmax > 0) & (kmax > 0)
    return torch.where(ok, (qmax / torch.where(ok, kmax, torch.ones_like(kmax))).sqrt(), torch.ones_like(qmax))


class MiKV(H2O):
    """low_bits: precision of evicted tokens (3); balance: use the channel balancer (True);
    H2O knobs (recent_ratio) as there. The budget is the full-precision set."""

    name: ClassVar[str] = "mikv"

    def __init__(self, n_layer: int, budget: Budget, *, low_bits: int = 3, balance: bool = True, **h2o) -> None:
        super().__init__(n_layer, budget, **h2o)
        if not isinstance(low_bits, int) or not 1 <= low_bits <= 8:
            raise ValueError(f"low_bits must be an int in [1, 8], got {low_bits!r}")
        self.low_bits, self.use_balance = low_bits, balance
        self.low: list[QuantizedStore | None] = [None] * n_layer
        self.balance: list[Tensor | None] = [None] * n_layer

    def record(self, layer: int, queries: Tensor, query_positions: Tensor, kind: StepKind) -> None:
        super().record(layer, queries, query_positions, kind)
        if kind == "prefill":
            entry = self.layers[layer]
            assert entry is not None and self.step_valid is not None
            if self.use_balance:
                q = group_queries(queries * self.step_valid[:, None, :, None], entry.keys.shape[1]).flatten(2, 3)
                self.balance[layer] = channel_balance(q, entry.keys, entry.valid)
            else:
                self.balance[layer] = entry.keys.new_ones(entry.keys.shape[0], entry.keys.shape[1], entry.keys.shape[3])

    def evict(self, layer: int, index: Tensor, count: Tensor) -> None:
        entry = self.layers[layer]
        balance = self.balance[layer]
        assert entry is not None and balance is not None
        in_use = (torch.arange(index.shape[2], device=index.device) < count[..., None]).long()
        kept = index.new_zeros(entry.valid.shape).scatter_add_(2, index, in_use) > 0
        dropped = gather_slots(entry, *mask_to_index(entry.valid & ~kept))
        self.low[layer] = concat_stores(self.low[layer], quantize_entry(dropped, self.low_bits, balance))
        super().evict(layer, index, count)

    def read(self, layer: int) -> LayerKV:
        entry = super().read(layer)
        low, balance = self.low[layer], self.balance[layer]
        if low is None or balance is None:
            return entry
        view = dequantize_store(low, self.low_bits, balance, entry)
        return concat_layers(view, entry)

    def attend_kernels(
        self, layer: int, queries: Tensor, query_positions: Tensor, sliding_window: int | None
    ) -> Tensor:
        """`read`'s view without dequantising the store: the kernel reads the packed codes."""
        low, balance, entry = self.low[layer], self.balance[layer], self.layers[layer]
        if low is None or balance is None or entry is None:
            return super().attend_kernels(layer, queries, query_positions, sliding_window)
        self.read_tokens[layer] = low.valid.sum(-1) + entry.valid.sum(-1)
        return lowbit_attention(
            queries, entry, low, self.low_bits, balance, query_positions, sliding_window, use_kernels=wanted(queries)
        )

    def tokens_per_head(self, layer: int) -> Tensor:
        low = self.low[layer]
        kept = super().tokens_per_head(layer)
        return kept if low is None else kept + low.valid.sum(-1)

    def memory_bytes(self) -> int:
        return super().memory_bytes() + sum(store.nbytes() for store in self.low if store is not None)
