"""Paged attention: queries read keys and values through per-request block tables.

The serving store (`mpcache.serving`) keeps each layer's KV in one pool tensor
[num_blocks, Hkv, block_size, D]. A request owns a list of block ids, its block table;
slot s of KV head h lives in block `block_tables[b, s // block_size]` at offset
`s % block_size`, and slots [0, lengths[b, h]) are in use. Heads of one request may hold
different numbers of slots (per-head eviction compacts each head on its own), and every
slot carries the position its token had when RoPE rotated its key, so masking is by
position: a query at p sees a slot at s <= p (and p - s < window with a sliding window).

The torch reference gathers the table's blocks, then attends (rows that share leading
blocks score them once, cascade-style). The kernel (`triton_paged_attention`, for decode
steps) is stage 1 of `mpcache.kernels.decode` with `PAGED`: each program walks its head's
slots, finds every slot's block in the request's table and reads keys, values and positions
in place, so nothing is gathered; split ranges merge as for any cache.
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
    b, m = block_tables.shape
    index = block_tables.reshape(-1).clamp(0, max(n - 1, 0)).long()
    blocks = pool.index_select(0, index).view(b, m, h, bs, *pool.shape[3:])
    return blocks.transpose(1, 2).reshape(b, h, m * bs, *pool.shape[3:])


def paged_attention(
    queries: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_positions: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
    query_positions: Tensor,
    sliding_window: int | None = None,
    groups: list[tuple[Tensor, int]] | None = None,
    use_kernels: bool = False,
) -> Tensor:
    """Attention of queries [B, Hq, T, D] over the slots their block tables list.

    key_cache / value_cache: [N, Hkv, bs, D] and [N, Hkv, bs, Dv], one layer's pool.
    slot_positions: [N, Hkv, bs] integer token position of every pooled slot.
    block_tables: [B, M] integer block ids (entries past a row's last used block are ignored).
    lengths: [B, Hkv] slots in use per head. query_positions: [B, T].
    groups: optional (rows, c) pairs whose rows list the same first c blocks, all full
        (a shared prefix): those blocks are gathered and scored once for the whole group,
        the rest per row (cascade attention; same result). Rows in no group go per row.
    Returns [B, Hq, T, Dv] in the queries' dtype; a query that sees no slot gets zeros.
    use_kernels: decode steps (T = 1) through `triton_paged_attention` where `runs_on` (groups
        are not needed there: the kernel reads shared blocks in place).
    """
    _check(queries, key_cache, value_cache, slot_positions, block_tables, lengths, query_positions)
    if use_kernels and queries.shape[2] == 1 and runs_on(queries, key_cache, block_tables):
        return triton_paged_attention(
            queries, key_cache, value_cache, slot_positions, block_tables, lengths, query_positions, sliding_window
        )
    bs = key_cache.shape[2]
    if not groups:
        return _attend(queries, key_cache, value_cache, slot_positions, block_tables, lengths, query_positions,
                       sliding_window, None)  # fmt: skip
    out = queries.new_zeros(*queries.shape[:3], value_cache.shape[-1])
    alone = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device)
    for rows, c in groups:
        if c < 1 or bool((lengths[rows] < c * bs).any()):
            raise ValueError(f"a group's {c} shared blocks must be full in every row (c >= 1, lengths >= c * bs)")
        prefix = block_tables[rows[0], :c]
        out[rows] = _attend(queries[rows], key_cache, value_cache, slot_positions, block_tables[rows, c:],
                            lengths[rows] - c * bs, query_positions[rows], sliding_window, prefix)  # fmt: skip
        alone[rows] = False
    if bool(alone.any()):
        rows = alone.nonzero().squeeze(1)
        out[rows] = _attend(queries[rows], key_cache, value_cache, slot_positions, block_tables[rows], lengths[rows],
                            query_positions[rows], sliding_window, None)  # fmt: skip
    return out


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


def _attend(queries, key_cache, value_cache, slot_positions, block_tables, lengths, query_positions, window, prefix):
    """Attention over an optional shared prefix (its block ids, gathered once for all rows)
    followed by each row's own blocks."""
    parts = []
    if prefix is not None:  # [1, Hkv, Lc, D]: broadcast over the group's rows
        ids = prefix[None]
        shared = (gather_blocks(key_cache, ids), gather_blocks(value_cache, ids), gather_blocks(slot_positions, ids))
        parts.append((*shared, None))
    if block_tables.shape[1]:
        keys = gather_blocks(key_cache, block_tables)
        in_use = torch.arange(keys.shape[2], device=keys.device) < lengths[..., None]
        values, positions = gather_blocks(value_cache, block_tables), gather_blocks(slot_positions, block_tables)
        parts.append((keys, values, positions, in_use))
    if not parts:
        return queries.new_zeros(*queries.shape[:3], value_cache.shape[-1])
    return masked_attention(queries, parts, query_positions, window)


def masked_attention(
    queries: Tensor,
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor | None]],
    query_positions: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """Softmax attention of queries [B, Hq, T, D] over the concatenation of `parts`, each
    (keys [B or 1, Hkv, L, D], values [B or 1, Hkv, L, Dv], positions [B or 1, Hkv, L],
    in_use [B, Hkv, L] or None); a slot is visible when in use and its position <= the
    query's (and within the window). One softmax over all parts; a part with batch 1 is
    shared by every row (scored once per row, gathered once). Zeros where nothing is seen.
    A single per-row part goes through PyTorch's fused attention."""
    b, hq, t, d = queries.shape
    hkv = parts[0][0].shape[1]
    g = hq // hkv
    if len(parts) == 1 and parts[0][0].shape[0] == b:
        return _fused(queries, *parts[0], query_positions, sliding_window)
    q = queries.reshape(b, hkv, g * t, d) * (1.0 / math.sqrt(d))
    qpos = query_positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
    scores = []
    for keys, _, positions, in_use in parts:
        kpos = positions[:, :, None, None, :]  # [B or 1, Hkv, 1, 1, L]
        visible = kpos <= qpos
        if sliding_window is not None:
            visible = visible & (qpos - kpos < sliding_window)
        if in_use is not None:
            visible = visible & in_use[:, :, None, None, :]
        if keys.shape[0] == 1 and b > 1:  # shared by all rows: one GEMM per KV head over every row's queries
            s = torch.matmul(q.transpose(0, 1).reshape(hkv, b * g * t, d), keys[0].transpose(-1, -2))
            s = s.view(hkv, b, g, t, -1).transpose(0, 1)
        else:
            s = torch.matmul(q, keys.transpose(-1, -2)).view(b, hkv, g, t, -1)  # one matmul per (row, KV head)
        scores.append(s.float().masked_fill(~visible, float("-inf")))
    probs = torch.softmax(torch.cat(scores, -1), -1).nan_to_num(0.0)  # a query that sees nothing: zeros
    out, start = 0, 0
    for keys, values, _, _ in parts:
        length = keys.shape[2]
        p = probs[..., start : start + length].to(values.dtype)
        if keys.shape[0] == 1 and b > 1:
            o = torch.matmul(p.transpose(0, 1).reshape(hkv, b * g * t, length), values[0])
            out = out + o.view(hkv, b, g * t, -1).transpose(0, 1)
        else:
            out = out + torch.matmul(p.reshape(b, hkv, g * t, length), values)
        start += length
    return out.reshape(b, hq, t, parts[0][1].shape[-1])


def _fused(queries, keys, values, positions, in_use, query_positions, window) -> Tensor:
    """One part: PyTorch's fused attention with a [B, 1 or Hq, T, L] mask (several times faster
    than the explicit softmax for long prefills); one mask for all heads when they agree."""
    hq, hkv = queries.shape[1], keys.shape[1]
    same = bool((positions == positions[:, :1]).all()) and (in_use is None or bool((in_use == in_use[:, :1]).all()))
    if same:
        positions, in_use = positions[:, :1], None if in_use is None else in_use[:, :1]
    qpos = query_positions[:, None, :, None]  # [B, 1, T, 1]
    kpos = positions[:, :, None, :]  # [B, h, 1, L]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (qpos - kpos < window)
    if in_use is not None:
        mask = mask & in_use[:, :, None, :]
    if not same and hq != hkv:
        mask = mask.repeat_interleave(hq // hkv, 1)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=hq != hkv)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # a query that sees nothing: zeros, not NaN


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
