"""KV cache with one length per (batch row, layer, KV head).

Eviction methods shrink the cache of each KV head independently, so the cache is a
padded tensor per layer plus, for every slot, the original token position (RoPE and
causal masking use it, so positions survive eviction) and a validity bit. `keep`
compacts the storage for real: the padded length drops to the longest kept head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import gather_slots, wanted


@dataclass
class LayerKV:
    """Padded storage of one layer: slots [0, lengths[b, h]) of head (b, h) are in use."""

    keys: Tensor  # [B, H, L, Dk]
    values: Tensor  # [B, H, L, Dv]
    positions: Tensor  # [B, H, L] int64, original token position of each slot
    valid: Tensor  # [B, H, L] bool, False for padding and free slots
    lengths: Tensor  # [B, H] int64, slots in use

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


class KVCache:
    """Per-layer key/value cache whose heads may hold different numbers of tokens.

    Subclasses (eviction policies) override `observe` to see each layer's queries
    after the new keys were stored, and call `keep` to compact.
    """

    # Whether a cache of this class can start from another cache's recorded prefill
    # (`mpcache.methods.shared_prefill`): true when the prompt's attention reads every prompt
    # token, so the prefill is the full cache's. A class whose prefill differs sets it False.
    shares_prefill: ClassVar[bool] = True

    def __init__(self, n_layer: int) -> None:
        self.layers: list[LayerKV | None] = [None] * n_layer
        self.seen_tokens = 0  # positions consumed so far (the next token's position)

    # ----------------------------------------------------------------- writes
    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> LayerKV:
        """Append T new tokens to every head of `layer` and return the whole layer.

        keys/values: [B, H, T, D]; positions, valid: [B, T] (shared by all heads).
        """
        if keys.dim() != 4 or values.dim() != 4 or values.shape[:3] != keys.shape[:3]:
            raise ValueError(f"keys/values must be [B, H, T, D] alike, got {tuple(keys.shape)}, {tuple(values.shape)}")
        b, h, t, _ = keys.shape
        if positions.shape != (b, t) or valid.shape != (b, t):
            shapes = f"{tuple(positions.shape)}, {tuple(valid.shape)}"
            raise ValueError(f"positions/valid must be [B={b}, T={t}], got {shapes}")
        entry = self.layers[layer]
        if entry is not None and entry.keys.shape[:2] != keys.shape[:2]:
            raise ValueError(
                f"layer {layer} caches batch={entry.keys.shape[0]}, kv_heads={entry.keys.shape[1]}; "
                f"got keys for batch={b}, kv_heads={h}"
            )
        if entry is None:
            entry = LayerKV(
                keys.new_zeros(b, h, 0, keys.shape[-1]),
                values.new_zeros(b, h, 0, values.shape[-1]),
                torch.zeros(b, h, 0, dtype=torch.long, device=keys.device),
                torch.zeros(b, h, 0, dtype=torch.bool, device=keys.device),
                torch.zeros(b, h, dtype=torch.long, device=keys.device),
            )
        needed = int(entry.lengths.max()) + t
        if needed > entry.capacity:
            entry = _grow(entry, max(needed, entry.capacity + max(t, entry.capacity // 2)))
        start = int(entry.lengths.min())
        if start == needed - t:  # every head holds as many slots (no eviction yet): a plain slice copy
            end = start + t
            entry.keys[:, :, start:end] = keys
            entry.values[:, :, start:end] = values
            entry.positions[:, :, start:end] = positions[:, None, :]
            entry.valid[:, :, start:end] = valid[:, None, :]
        else:
            slots = entry.lengths[:, :, None] + torch.arange(t, device=keys.device)  # [B, H, T]
            entry.keys.scatter_(2, slots[..., None].expand(-1, -1, -1, keys.shape[-1]), keys)
            entry.values.scatter_(2, slots[..., None].expand(-1, -1, -1, values.shape[-1]), values)
            entry.positions.scatter_(2, slots, positions[:, None, :].expand(b, h, t))
            entry.valid.scatter_(2, slots, valid[:, None, :].expand(b, h, t))
        entry.lengths = entry.lengths + t
        self.layers[layer] = entry
        return entry

    def keep(self, layer: int, index: Tensor, count: Tensor | None = None) -> None:
        """Keep only slots `index` [B, H, K] of `layer` (the first `count[b, h]` of each row
        when given); storage is reallocated to the longest kept row (by the compaction kernel where
        the switch wants it, `mpcache.kernels.wanted`). The checks read back one flag tensor: one
        device sync per call on a GPU, not one per check."""
        entry = self.layers[layer]
        if entry is None:
            raise ValueError(f"layer {layer} has no cache to compact")
        if index.dim() != 3 or index.shape[:2] != entry.lengths.shape:
            b, h = entry.lengths.shape
            raise ValueError(f"index must be [batch={b}, kv_heads={h}, K], got {tuple(index.shape)}")
        b, h, k = index.shape
        if count is None:
            count = torch.full((b, h), k, dtype=torch.long, device=index.device)
        if count.shape != (b, h):
            raise ValueError(f"count must be [batch={b}, kv_heads={h}] with values in [0, K={k}]")
        in_use = torch.arange(k, device=index.device)[None, None, :] < count[:, :, None]
        uses = torch.zeros(b, h, entry.capacity + 1, device=index.device)
        inside = (index >= 0) & (index < entry.lengths[:, :, None])
        uses.scatter_add_(2, torch.where(in_use & inside, index, entry.capacity), in_use.float())
        flags = torch.stack([
            ((count < 0) | (count > k)).any(), (count > entry.lengths).any(), (in_use & ~inside).any(),
            (uses[:, :, :-1] > 1).any(),
        ]).tolist()  # fmt: skip
        for bad, message in zip(flags, KEEP_ERRORS, strict=True):
            if bad:
                raise ValueError(message.format(b=b, h=h, k=k))
        self.layers[layer] = gather_slots(entry, index, count, use_kernels=wanted(entry.keys))

    # ------------------------------------------------------------------ hooks
    # Attention calls, per layer and forward: observe_hidden -> update -> observe -> attend (None
    # unless the cache attends itself) -> attention_view (what attention reads) -> after_attention.
    # All are no-ops here; eviction policies (mpcache.methods) override them.
    def observe_hidden(self, layer: int, hidden: Tensor) -> None:
        """Called with the attention block's normalised input [B, T, d_model] before the
        q/k/v projections (for methods that score tokens from hidden states). No-op here."""

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        """Called by attention with this step's queries [B, Hq, T, D] (after RoPE), after
        the step's keys were stored and before attention reads the cache. No-op here."""

    def attend(self, layer: int, queries: Tensor, query_positions: Tensor, sliding_window: int | None) -> Tensor | None:
        """Attention output [B, Hq, T, Dv] when the cache computes attention itself (the paged
        store of `mpcache.serving` reads through block tables), or None: the model then attends
        over `attention_view`. None here."""
        return None

    def attention_view(self, layer: int) -> LayerKV:
        """The slots attention reads for this step: the whole layer here; a query-aware
        policy may return a gathered subset, a compressed one a dequantised copy."""
        entry = self.layers[layer]
        assert entry is not None
        return entry

    def after_attention(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        """Called after attention read the cache for this step (so the step's queries
        attended to everything stored). Compacting here is eviction after attention. No-op."""

    # ---------------------------------------------------------------- reports
    def tokens_per_head(self, layer: int) -> Tensor:
        """Valid tokens held by each (batch row, KV head) of `layer`."""
        entry = self.layers[layer]
        if entry is None:
            return torch.zeros(0, dtype=torch.long)
        return entry.valid.sum(-1)

    def memory_bytes(self) -> int:
        """Bytes of key/value storage actually allocated (padding included)."""
        total = 0
        for entry in self.layers:
            if entry is not None:
                total += entry.keys.numel() * entry.keys.element_size()
                total += entry.values.numel() * entry.values.element_size()
        return total


KEEP_ERRORS = (
    "count must be [batch={b}, kv_heads={h}] with values in [0, K={k}]",
    "cannot keep more slots than a head holds",
    "index out of range: a head can only keep its slots [0, lengths[b, h])",
    "index keeps a slot twice (attention would count that token twice)",
)


def _grow(entry: LayerKV, capacity: int) -> LayerKV:
    b, h, length, _ = entry.keys.shape
    extra = capacity - length

    def pad(x: Tensor, value: float | bool | int) -> Tensor:
        shape = list(x.shape)
        shape[2] = extra
        return torch.cat([x, x.new_full(shape, value)], dim=2)

    return LayerKV(
        pad(entry.keys, 0.0),
        pad(entry.values, 0.0),
        pad(entry.positions, 0),
        pad(entry.valid, False),
        entry.lengths,
    )
