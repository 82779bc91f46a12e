"""Per-head compaction of a cache layer by keep indices (`KVCache.keep`'s hot path): torch reference and kernel.

`gather_slots(entry, index, count)` returns the slots `index[b, h, :count[b, h]]` of every head of a layer
(`mpcache.model.cache.LayerKV`, read by attribute) as a new compact layer whose padded length is the longest kept
head. The torch reference is four `gather`s; the kernel moves keys, values, positions and validity of a block of
kept slots per program in one launch (grid: (batch x head, slot blocks)), copying raw bits, so any dtype works
and the interpreter (which mishandles bf16 arithmetic) copies bf16 exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import Tensor

from mpcache.kernels.runtime import runs_on, tl, triton

BLOCK_SLOTS = 32  # kept slots per program on a GPU (64 x 128 rows of keys and values spill registers on sm_90)


class CacheLayer(Protocol):
    """What the kernels read of a cache layer (`mpcache.model.cache.LayerKV`, a dataclass)."""

    keys: Tensor  # [B, Hkv, L, Dk]
    values: Tensor  # [B, Hkv, L, Dv]
    positions: Tensor  # [B, Hkv, L] int64
    valid: Tensor  # [B, Hkv, L] bool
    lengths: Tensor  # [B, Hkv] int64, slots in use


# ------------------------------------------------------------------------- torch reference
def gather_reference(entry: CacheLayer, index: Tensor, count: Tensor) -> CacheLayer:
    """`gather_slots` in torch."""
    k = index.shape[2]
    index = index.clamp(min=0, max=max(entry.keys.shape[2] - 1, 0))
    in_use = torch.arange(k, device=index.device)[None, None, :] < count[:, :, None]
    new_len = min(int(count.max()), k) if count.numel() else 0
    index, in_use = index[:, :, :new_len], in_use[:, :, :new_len]
    gather = index[..., None]
    keys = entry.keys.gather(2, gather.expand(-1, -1, -1, entry.keys.shape[-1]))
    values = entry.values.gather(2, gather.expand(-1, -1, -1, entry.values.shape[-1]))
    positions = entry.positions.gather(2, index)
    valid = entry.valid.gather(2, index) & in_use
    return dataclasses.replace(  # the same kind of layer (LayerKV) with the gathered slots
        entry, keys=keys.contiguous(), values=values.contiguous(), positions=positions.contiguous(),
        valid=valid.contiguous(), lengths=count.clone(),
    )  # fmt: skip


# ------------------------------------------------------------------------------- Triton
@triton.jit
def _compact_kernel(
    K, V, POS, VALID, INDEX, COUNT, K_OUT, V_OUT, POS_OUT, VALID_OUT,
    stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_pb, stride_ph, stride_pl,
    stride_ib, stride_ih, stride_ik, stride_ob, stride_oh, stride_ol, stride_wb, stride_wh, stride_wl,
    stride_mb, stride_mh, stride_ml,
    n_head, capacity, new_len,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // n_head
    h = bh % n_head
    j = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    live = j < new_len
    slot = tl.load(INDEX + b * stride_ib + h * stride_ih + j * stride_ik, mask=live, other=0)
    slot = tl.minimum(tl.maximum(slot, 0), capacity - 1)
    in_use = j < tl.load(COUNT + bh)
    d = tl.arange(0, BLOCK_D)
    rows = live[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + slot[:, None] * stride_kl + d[None, :], mask=rows)
    tl.store(K_OUT + b * stride_ob + h * stride_oh + j[:, None] * stride_ol + d[None, :], k, mask=rows)
    dv = tl.arange(0, BLOCK_DV)
    rows = live[:, None] & (dv[None, :] < VALUE_DIM)
    v = tl.load(V + b * stride_vb + h * stride_vh + slot[:, None] * stride_vl + dv[None, :], mask=rows)
    tl.store(V_OUT + b * stride_wb + h * stride_wh + j[:, None] * stride_wl + dv[None, :], v, mask=rows)
    meta = b * stride_pb + h * stride_ph + slot * stride_pl
    out = b * stride_mb + h * stride_mh + j * stride_ml
    tl.store(POS_OUT + out, tl.load(POS + meta, mask=live, other=0), mask=live)
    ok = (tl.load(VALID + meta, mask=live, other=0) != 0) & in_use
    tl.store(VALID_OUT + out, ok.to(tl.uint8), mask=live)


def compact_meta(head_dim: int, value_dim: int, new_len: int, device: torch.device) -> dict:
    """Compile-time arguments of `_compact_kernel` (also what `bench.kernels --compile` builds)."""
    block = BLOCK_SLOTS if device.type == "cuda" else min(BLOCK_SLOTS, triton.next_power_of_2(max(new_len, 1)))
    return dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, BLOCK_L=block, BLOCK_D=triton.next_power_of_2(head_dim),
                BLOCK_DV=triton.next_power_of_2(value_dim), num_warps=4)  # fmt: skip


def _bits(x: Tensor) -> Tensor:
    """x (contiguous in its last axis) as integers of the same width: copies move bits, never do arithmetic."""
    kind = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.view(kind)


def triton_gather_slots(entry: CacheLayer, index: Tensor, count: Tensor) -> CacheLayer:
    """`gather_slots` through `_compact_kernel`."""
    b, h, capacity, d = entry.keys.shape
    dv = entry.values.shape[-1]
    new_len = min(int(count.max()), index.shape[2]) if count.numel() else 0
    keys = entry.keys.new_empty(b, h, new_len, d)
    values = entry.values.new_empty(b, h, new_len, dv)
    positions = entry.positions.new_empty(b, h, new_len)
    valid = torch.empty(b, h, new_len, dtype=torch.bool, device=entry.valid.device)
    if new_len and b * h:
        src_k, src_v = _bits(entry.keys.contiguous()), _bits(entry.values.contiguous())
        src_pos, src_valid = entry.positions.contiguous(), entry.valid.contiguous()  # one set of strides for both
        src_valid = src_valid.view(torch.uint8) if src_valid.dtype == torch.bool else src_valid
        meta = compact_meta(d, dv, new_len, keys.device)
        _compact_kernel[(b * h, triton.cdiv(new_len, meta["BLOCK_L"]))](
            src_k, src_v, src_pos, src_valid, index, count.contiguous(),
            _bits(keys), _bits(values), positions, valid.view(torch.uint8),
            *src_k.stride()[:3], *src_v.stride()[:3], *src_pos.stride(), *index.stride(),
            *keys.stride()[:3], *values.stride()[:3], *positions.stride(),
            h, capacity, new_len, **meta,
        )  # fmt: skip
    return dataclasses.replace(entry, keys=keys, values=values, positions=positions, valid=valid, lengths=count.clone())


# ------------------------------------------------------------------------- entry point
def gather_slots(entry: CacheLayer, index: Tensor, count: Tensor, use_kernels: bool = False) -> CacheLayer:
    """Slots `index` [B, H, K] of `entry` as a new compact layer; only the first `count[b, h]`
    of each row are in use (the rest become invalid padding). Entries are clamped into the
    layer's slots. use_kernels: `_compact_kernel` where `runs_on`."""
    if index.dim() != 3 or index.shape[:2] != entry.keys.shape[:2] or count.shape != entry.keys.shape[:2]:
        raise ValueError(
            f"index must be [B, H, K] and count [B, H] for keys {tuple(entry.keys.shape)}, "
            f"got {tuple(index.shape)}, {tuple(count.shape)}"
        )
    if index.is_floating_point() or count.is_floating_point():
        raise TypeError(f"index and count must be integer tensors, got {index.dtype}, {count.dtype}")
    if use_kernels and runs_on(entry.keys, index):
        return triton_gather_slots(entry, index, count)
    return gather_reference(entry, index, count)
