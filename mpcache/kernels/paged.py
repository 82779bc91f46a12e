"""Paged attention: queries read keys and values through per-request block tables.

The serving store (`mpcache.serving`) keeps each layer's KV in one pool tensor
[num_blocks, Hkv, block_size, D]. A request owns a list of block ids, its block table;
slot s of KV head h lives in block `block_tables[b, s // block_size]` at offset
`s % block_size`, and slots [0, lengths[b, h]) are in use. Heads of one request may hold
different numbers of slots (per-head eviction compacts each head on its own), and every
slot carries the position its token had when RoPE rotated its key, so masking is by
position: a query at p sees a slot at s <= p (and p - s < window with a sliding window).

The torch reference gathers the table's blocks, then runs one fused attention. The kernel
(`triton_paged_attention`, for decode steps) is stage 1 of `mpcache.kernels.decode` with
`PAGED`: each program walks its head's slots, finds every slot's block in the request's table
and reads keys, values and positions in place, so nothing is gathered; split ranges merge as
for any cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.kernels.decode import Partials, default_splits, launch_split
from mpcache.kernels.runtime import runs_on


def gather_blocks(pool: Tensor, block_tables: Tensor) -> Tensor:
    """The blocks listed in `block_tables` [B, M] of `pool` [N, H, bs, ...] as per-request
    contiguous slots [B, H, M * bs, ...] (entries are clamped into [0, N): callers mask
    slots past each head's length)."""
    n, h, bs = pool.shape[:3]
    index = block_tables.clamp(0, max(n - 1, 0)).long()
    blocks = pool[index]  # [B, M, H, bs, ...]
    blocks = blocks.transpose(1, 2)  # [B, H, M, bs, ...]
    return blocks.reshape(blocks.shape[0], h, index.shape[1] * bs, *pool.shape[3:])


def paged_attention(
    queries: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_positions: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
    query_positions: Tensor,
    sliding_window: int | None = None,
    use_kernels: bool = False,
) -> Tensor:
    """Attention of queries [B, Hq, T, D] over the slots their block tables list.

    key_cache / value_cache: [N, Hkv, bs, D] and [N, Hkv, bs, Dv], one layer's pool.
    slot_positions: [N, Hkv, bs] integer token position of every pooled slot.
    block_tables: [B, M] integer block ids (entries past a row's last used block are ignored).
    lengths: [B, Hkv] slots in use per head. query_positions: [B, T].
    Returns [B, Hq, T, Dv] in the queries' dtype; a query that sees no slot gets zeros.
    use_kernels: decode steps (T = 1) through `triton_paged_attention` where `runs_on`.
    """
    _check(queries, key_cache, value_cache, slot_positions, block_tables, lengths, query_positions)
    if use_kernels and queries.shape[2] == 1 and runs_on(queries, key_cache, block_tables):
        return triton_paged_attention(
            queries, key_cache, value_cache, slot_positions, block_tables, lengths, query_positions, sliding_window
        )
    b, hq, t, d = queries.shape
    hkv = key_cache.shape[1]
    g = hq // hkv
    keys = gather_blocks(key_cache, block_tables)  # [B, Hkv, L, D]
    values = gather_blocks(value_cache, block_tables)
    positions = gather_blocks(slot_positions, block_tables)  # [B, Hkv, L]
    length = keys.shape[2]
    in_use = torch.arange(length, device=keys.device) < lengths[..., None]  # [B, Hkv, L]
    qpos = query_positions[:, None, :, None]  # [B, 1, T, 1]
    kpos = positions[:, :, None, :]  # [B, Hkv, 1, L]
    visible = in_use[:, :, None, :] & (kpos <= qpos)  # [B, Hkv, T, L]
    if sliding_window is not None:
        visible = visible & (qpos - kpos < sliding_window)
    if length == 0:
        return queries.new_zeros(b, hq, t, value_cache.shape[-1])
    q = queries.view(b, hkv, g, t, d)
    mask = visible[:, :, None]  # [B, Hkv, 1, T, L], shared by the G query heads of a KV head
    out = F.scaled_dot_product_attention(
        q,
        keys[:, :, None].expand(b, hkv, g, length, d),
        values[:, :, None].expand(b, hkv, g, length, values.shape[-1]),
        attn_mask=mask,
        scale=1.0 / math.sqrt(d),
    )
    out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.reshape(b, hq, t, values.shape[-1])


def triton_paged_attention(
    queries: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_positions: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
    query_positions: Tensor,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """`paged_attention` of one query per row through decode's stage 1 over the block tables (checked there)."""
    b, hkv = lengths.shape
    entries = block_tables.shape[1] * key_cache.shape[2]
    splits = num_splits or default_splits(b * hkv, entries, queries.device)
    partials = Partials(queries, value_cache.shape[-1], splits)
    launch_split(
        partials, splits, queries, key_cache, value_cache, query_positions, slot_positions, lengths, sliding_window,
        tables=block_tables.contiguous(), block_size=key_cache.shape[2],
    )  # fmt: skip
    return partials.merge(queries.dtype)[0]


def _check(
    queries: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_positions: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
    query_positions: Tensor,
) -> None:
    if queries.dim() != 4 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError(
            f"need queries [B, Hq, T, D] and caches [N, Hkv, bs, D], got {tuple(queries.shape)}, "
            f"{tuple(key_cache.shape)}, {tuple(value_cache.shape)}"
        )
    b, hq, t, d = queries.shape
    n, hkv, bs, kd = key_cache.shape
    if kd != d or hkv == 0 or hq % hkv or value_cache.shape[:3] != key_cache.shape[:3]:
        raise ValueError(
            f"queries {tuple(queries.shape)} do not fit key cache {tuple(key_cache.shape)} / value cache "
            f"{tuple(value_cache.shape)}: same head dim, Hq a multiple of Hkv, values shaped like keys on [N, Hkv, bs]"
        )
    if slot_positions.shape != (n, hkv, bs):
        raise ValueError(f"slot_positions must be [N, Hkv, bs] = {(n, hkv, bs)}, got {tuple(slot_positions.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be [B={b}, M], got {tuple(block_tables.shape)}")
    if lengths.shape != (b, hkv):
        raise ValueError(f"lengths must be [B, Hkv] = {(b, hkv)}, got {tuple(lengths.shape)}")
    if query_positions.shape != (b, t):
        raise ValueError(f"query_positions must be [B, T] = {(b, t)}, got {tuple(query_positions.shape)}")
    for name, x in (("block_tables", block_tables), ("lengths", lengths), ("slot_positions", slot_positions)):
        if x.is_floating_point() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if b and bool(((lengths < 0) | (lengths > block_tables.shape[1] * bs)).any()):
        raise ValueError(f"lengths must lie in [0, M * block_size = {block_tables.shape[1] * bs}]")
    used = torch.arange(block_tables.shape[1], device=block_tables.device) * bs < lengths.max(-1).values[:, None]
    if bool((used & ((block_tables < 0) | (block_tables >= n))).any()):
        raise ValueError(f"a block table lists a block id outside the pool [0, {n}) for slots in use")
