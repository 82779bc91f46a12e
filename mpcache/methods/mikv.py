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

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import gather_slots
from mpcache.methods.base import Budget, StepKind, concat_layers, group_queries, mask_to_index
from mpcache.methods.h2o import H2O
from mpcache.model.cache import LayerKV


# ------------------------------------------------------------------ quantization
def quantize(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row asymmetric RTN over the last axis: (codes uint8, scale, zero) with
    x ~= codes * scale + zero and |error| <= scale / 2."""
    lo, hi = x.amin(-1), x.amax(-1)
    scale = (hi - lo) / (2**bits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((x - lo[..., None]) / safe[..., None]).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return codes.float() * scale[..., None] + zero[..., None]


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., D] (< 2^bits) -> bit planes [..., bits, ceil(D / 8)] uint8."""
    d = codes.shape[-1]
    codes = torch.nn.functional.pad(codes, (0, -d % 8))
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    planes = (codes[..., None, :] >> shifts[:, None]) & 1  # [..., bits, D8]
    weights = 2 ** torch.arange(8, device=codes.device, dtype=torch.int32)
    return (planes.view(*planes.shape[:-1], -1, 8).int() * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, d: int) -> Tensor:
    """Inverse of `pack_bits`: [..., bits, ceil(D / 8)] -> codes [..., D] uint8."""
    weights = 2 ** torch.arange(8, device=packed.device, dtype=torch.int32)
    planes = (packed[..., None].int() & weights) > 0  # [..., bits, D8, 8]
    planes = planes.flatten(-2)[..., :d].int()
    shifts = 2 ** torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (planes * shifts[:, None]).sum(-2).to(torch.uint8)


def channel_balance(queries: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
    """b [B, Hkv, D] = sqrt(max |q| / max |k|) per channel over the prompt (1 where undefined).
    queries [B, Hkv, N, D] (the group's queries stacked), keys [B, Hkv, L, D]."""
    qmax = queries.abs().amax(2)
    kmax = (keys.abs() * valid[..., None]).amax(2)
    ok = (qmax > 0) & (kmax > 0)
    return torch.where(ok, (qmax / torch.where(ok, kmax, torch.ones_like(kmax))).sqrt(), torch.ones_like(qmax))


@dataclass
class QuantizedStore:
    """Low-precision tokens of one layer: bit-packed codes plus per-token scale and zero."""

    key_codes: Tensor  # [B, H, L, bits, ceil(D / 8)] uint8
    key_scale: Tensor  # [B, H, L]
    key_zero: Tensor
    value_codes: Tensor
    value_scale: Tensor
    value_zero: Tensor
    positions: Tensor  # [B, H, L]
    valid: Tensor  # [B, H, L]

    def nbytes(self) -> int:
        tensors = (self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale, self.value_zero)
        return sum(t.numel() * t.element_size() for t in tensors)


def quantize_entry(entry: LayerKV, bits: int, balance: Tensor) -> QuantizedStore:
    keys = entry.keys * balance[:, :, None, :]
    kc, ks, kz = quantize(keys, bits)
    vc, vs, vz = quantize(entry.values, bits)
    return QuantizedStore(pack_bits(kc, bits), ks, kz, pack_bits(vc, bits), vs, vz, entry.positions, entry.valid)


def dequantize_store(store: QuantizedStore, bits: int, balance: Tensor, like: LayerKV) -> LayerKV:
    """The store at full precision, shaped and typed like the main store `like`."""
    dk, dv, dtype = like.keys.shape[-1], like.values.shape[-1], like.keys.dtype
    keys = dequantize(unpack_bits(store.key_codes, bits, dk), store.key_scale, store.key_zero) / balance[:, :, None]
    values = dequantize(unpack_bits(store.value_codes, bits, dv), store.value_scale, store.value_zero)
    lengths = torch.full(store.valid.shape[:2], store.valid.shape[2], dtype=torch.long, device=store.valid.device)
    return LayerKV(keys.to(dtype), values.to(dtype), store.positions, store.valid, lengths)


def concat_stores(a: QuantizedStore | None, b: QuantizedStore) -> QuantizedStore:
    if a is None:
        return b
    fields = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero", "positions", "valid")
    return QuantizedStore(*(torch.cat([getattr(a, f), getattr(b, f)], 2) for f in fields))


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

    def tokens_per_head(self, layer: int) -> Tensor:
        low = self.low[layer]
        kept = super().tokens_per_head(layer)
        return kept if low is None else kept + low.valid.sum(-1)

    def memory_bytes(self) -> int:
        return super().memory_bytes() + sum(store.nbytes() for store in self.low if store is not None)
