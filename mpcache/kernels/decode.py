"""Decode attention over per-(batch, KV head) variable-length caches: the torch reference and the Triton kernel.

The cache is a `mpcache.model.cache.LayerKV` (keys/values [B, Hkv, L, D], positions, valid, lengths), read by
attribute only. The torch reference is `cached_attention` (masking: `visibility`), over the listed slots of a
per-head index when given (`gather_slots`); `decode_attention` runs the kernel when asked and able.

The kernel is flash-decoding: stage 1 splits every head's slots into `num_splits` ranges, one program per (batch,
KV head, split) runs an online softmax for all G query heads of the group at once (GQA: each key block is loaded
once for G heads, via `tl.dot`) and stores a normalised partial output plus its log-sum-exp; stage 2 merges the
splits. With `index`/`count` a program walks the first `count[b, h]` entries of a per-head slot list instead of
slots [0, lengths[b, h]) - the gather Quest and MPCache need, without materialising the gathered cache.

Masking is `visibility`; an index list means exactly what `gather_slots` means (entries clamped into range, entries
past `count` unused). Rows that see nothing output zeros. On a GPU the dots take the cache's bf16/fp16 tiles with
float32 accumulation (tensor cores; float32 tiles of 64 x 128 spill registers); on CPU tensors, i.e. under the
interpreter, which computes garbage on bf16, every load is cast to float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.kernels.runtime import runs_on, tl, triton

BLOCK_N = 64  # cache slots per inner step (with 8 warps: no register spills at D = 128 on sm_90)
MIN_BLOCK = 16  # GPU `tl.dot` needs every dimension >= 16


class CacheLayer(Protocol):
    """What the attention here reads of a cache layer (`mpcache.model.cache.LayerKV`, a dataclass)."""

    keys: Tensor  # [B, Hkv, L, Dk]
    values: Tensor  # [B, Hkv, L, Dv]
    positions: Tensor  # [B, Hkv, L] int64
    valid: Tensor  # [B, Hkv, L] bool
    lengths: Tensor  # [B, Hkv] int64, slots in use


# ------------------------------------------------------------------------- torch reference
def visibility(
    query_positions: Tensor,
    key_positions: Tensor,
    key_valid: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """Which cached slot each query may attend to, [B, Hkv, 1, T, L] (broadcast over the G
    query heads of a KV head): the slot is valid, its position s <= the query's p, and
    (with a sliding window) p - s < window."""
    qpos = query_positions[:, None, None, :, None]
    kpos = key_positions[:, :, None, None, :]
    visible = key_valid[:, :, None, None, :] & (kpos <= qpos)
    if sliding_window is not None:
        visible = visible & (qpos - kpos < sliding_window)
    return visible


def cached_attention(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_valid: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """Attention of queries [B, Hq, T, D] over per-head caches [B, Hkv, L, D] (masking as in
    `visibility`; rows that see nothing output zeros).

    Same math as `attention_probs` followed by a weighted sum of values, computed by
    PyTorch's fused attention on 4-D tensors with grouped-query heads (its flash kernel on
    CPU: 3x faster than the 5-D math fallback, never materializes fp32 probs). When every
    KV head holds the same slots (a full cache) one mask serves all heads.
    """
    b, hq, t, d = queries.shape
    hkv, length = keys.shape[1], keys.shape[2]
    if length == 0:
        return queries.new_zeros(b, hq, t, values.shape[-1])
    same_slots = hkv == 1 or bool(
        (key_positions == key_positions[:, :1]).all() and (key_valid == key_valid[:, :1]).all()
    )
    if same_slots:
        key_positions, key_valid = key_positions[:, :1], key_valid[:, :1]
    mask = visibility(query_positions, key_positions, key_valid, sliding_window)[:, :, 0]  # [B, 1 or Hkv, T, L]
    if not same_slots and hq != hkv:
        mask = mask.repeat_interleave(hq // hkv, dim=1)  # query head h reads KV head h // G
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=hq != hkv)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # rows that see nothing


def gather_slots(entry: CacheLayer, index: Tensor, count: Tensor) -> CacheLayer:
    """Slots `index` [B, H, K] of `entry` as a new compact layer; only the first `count[b, h]`
    of each row are in use (the rest become invalid padding)."""
    k = index.shape[2]
    index = index.clamp(min=0, max=max(entry.keys.shape[2] - 1, 0))
    in_use = torch.arange(k, device=index.device)[None, None, :] < count[:, :, None]
    new_len = int(count.max()) if count.numel() else 0
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
def _decode_split_kernel(
    Q, K, V, QPOS, KPOS, VALID, LENGTHS, INDEX, COUNT, OUT, LSE,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_pb, stride_ph, stride_pl,
    stride_ib, stride_ih, stride_ik,
    stride_ob, stride_oh, stride_os, stride_od,
    n_kv_head, capacity, n_entries, split_size, window, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_kv_head
    h = bh % n_kv_head

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    heads = h * GROUP + g  # the query heads that share KV head h
    q_ptr = Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_ptr, mask=(g[:, None] < GROUP) & (d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    else:
        q = q.to(K.dtype.element_ty)  # bf16/fp16 tensor-core dots, float32 accumulation
    q_pos = tl.load(QPOS + b)

    # Entries this program walks: slot lists (index) or slots themselves, per head.
    if HAS_INDEX:
        n = tl.minimum(tl.load(COUNT + bh), n_entries)
    else:
        n = tl.minimum(tl.load(LENGTHS + bh), capacity)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, n)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < hi
        if HAS_INDEX:
            slot = tl.load(INDEX + b * stride_ib + h * stride_ih + offs * stride_ik, mask=live, other=0)
            slot = tl.minimum(tl.maximum(slot, 0), capacity - 1)  # as gather_slots clamps
        else:
            slot = offs
        meta = b * stride_pb + h * stride_ph + slot * stride_pl
        k_pos = tl.load(KPOS + meta, mask=live, other=0)
        ok = tl.load(VALID + meta, mask=live, other=0) != 0
        visible = live & ok & (k_pos <= q_pos)
        if HAS_WINDOW:
            visible = visible & (q_pos - k_pos < window)
        k_ptr = K + b * stride_kb + h * stride_kh + slot[:, None] * stride_kl + d[None, :] * stride_kd
        k = tl.load(k_ptr, mask=live[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [G, BLOCK], log2 units
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: keep zeros, not NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        v_ptr = V + b * stride_vb + h * stride_vh + slot[:, None] * stride_vl + dv[None, :] * stride_vd
        v = tl.load(v_ptr, mask=live[:, None] & (dv[None, :] < VALUE_DIM), other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))  # log2 units
    o_ptr = OUT + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + dv[None, :] * stride_od
    tl.store(o_ptr, out, mask=(g[:, None] < GROUP) & (dv[None, :] < VALUE_DIM))
    lse_ptr = LSE + (b * n_kv_head * GROUP + heads) * tl.num_programs(1) + split  # [B, Hq, splits], contiguous
    tl.store(lse_ptr, lse, mask=g < GROUP)


@triton.jit
def _merge_kernel(
    PART, LSE, OUT,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_ob, stride_oh, stride_od,
    n_head, n_splits,
    VALUE_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b * n_head + head
    b = row // n_head
    head = row % n_head
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(LSE + row * n_splits + s, mask=s < n_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_use)  # empty splits weigh 0
    part_ptr = PART + b * stride_pb + head * stride_ph + s[:, None] * stride_ps + dv[None, :] * stride_pd
    part = tl.load(part_ptr, mask=(s[:, None] < n_splits) & (dv[None, :] < VALUE_DIM), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # a row that saw nothing: zeros
    tl.store(OUT + b * stride_ob + head * stride_oh + dv * stride_od, out, mask=dv < VALUE_DIM)


def _pow2(n: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(n))


def split_meta(group: int, head_dim: int, value_dim: int, has_index: bool, has_window: bool, upcast: bool) -> dict:
    """Compile-time arguments of `_decode_split_kernel` (also what `bench.kernels --compile` builds)."""
    return dict(
        GROUP=group, HEAD_DIM=head_dim, VALUE_DIM=value_dim,
        BLOCK_G=_pow2(group), BLOCK_D=_pow2(head_dim), BLOCK_DV=_pow2(value_dim), BLOCK=BLOCK_N,
        HAS_INDEX=has_index, HAS_WINDOW=has_window, UPCAST=upcast, num_warps=8,
    )  # fmt: skip


def merge_meta(value_dim: int, splits: int) -> dict:
    """Compile-time arguments of `_merge_kernel`."""
    return dict(VALUE_DIM=value_dim, BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=triton.next_power_of_2(value_dim))


def default_splits(batch_heads: int, entries: int, device: torch.device) -> int:
    """Enough (batch, KV head, split) programs to fill a GPU (~4 per SM), at least one block
    per split; one split under the interpreter, which runs programs one after another."""
    if device.type != "cuda" or entries == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(entries, BLOCK_N), triton.cdiv(4 * sms, batch_heads)))


def triton_decode_attention(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_valid: Tensor,
    lengths: Tensor,
    sliding_window: int | None = None,
    index: Tensor | None = None,
    count: Tensor | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """Attention of one query per row, queries [B, Hq, 1, D], over the cache [B, Hkv, L, D]
    (slots [0, lengths[b, h]) or, with `index` [B, Hkv, K] + `count` [B, Hkv], the listed
    slots); returns [B, Hq, 1, Dv] in the queries' dtype. `decode_attention` checks the
    arguments; this launches."""
    b, hq, _, d = queries.shape
    hkv, capacity, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    group = hq // hkv
    has_index = index is not None
    if index is None:
        index = lengths.new_zeros(1, 1, 1)
        count = lengths
    assert count is not None
    entries = index.shape[2] if has_index else capacity
    splits = num_splits or default_splits(b * hkv, entries, queries.device)
    split_size = triton.cdiv(max(entries, 1), splits)
    split_size = triton.cdiv(split_size, BLOCK_N) * BLOCK_N
    q = queries[:, :, 0]
    part = torch.empty(b, hq, splits, dv, dtype=torch.float32, device=queries.device)
    lse = torch.empty(b, hq, splits, dtype=torch.float32, device=queries.device)
    valid = key_valid.view(torch.uint8) if key_valid.dtype == torch.bool else key_valid
    qpos = query_positions[:, 0].contiguous()
    lengths, count = lengths.contiguous(), count.contiguous()
    _decode_split_kernel[(b * hkv, splits)](
        q, keys, values, qpos, key_positions, valid, lengths, index, count, part, lse,
        *q.stride(), *keys.stride(), *values.stride(), *key_positions.stride(), *index.stride(), *part.stride(),
        hkv, capacity, entries, split_size, sliding_window or 0, math.log2(math.e) / math.sqrt(d),
        **split_meta(group, d, dv, has_index, sliding_window is not None, queries.device.type == "cpu"),
    )  # fmt: skip
    out = torch.empty(b, hq, 1, dv, dtype=queries.dtype, device=queries.device)
    _merge_kernel[(b * hq,)](
        part, lse, out,
        *part.stride(), out.stride(0), out.stride(1), out.stride(3),
        hq, splits, **merge_meta(dv, splits),
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------- entry point
def decode_attention(
    queries: Tensor,
    entry: CacheLayer,
    query_positions: Tensor,
    sliding_window: int | None = None,
    index: Tensor | None = None,
    count: Tensor | None = None,
    use_kernels: bool = False,
    num_splits: int | None = None,
) -> Tensor:
    """Attention of queries [B, Hq, T, D] over the cache `entry` (or, given `index` [B, Hkv, K]
    and `count` [B, Hkv], over the first count[b, h] listed slots of each head, as
    `gather_slots` picks them): [B, Hq, T, Dv], as `cached_attention` computes it.

    use_kernels: the Triton kernel where `runs_on` and T = 1 (decode); otherwise, and for prefill
    chunks, the torch reference.
    num_splits: split-KV ranges per head (default: enough programs to fill the GPU).
    """
    _check_attention(queries, entry, query_positions, index, count)
    if use_kernels and queries.shape[2] == 1 and runs_on(queries, entry.keys):
        return triton_decode_attention(
            queries, entry.keys, entry.values, query_positions, entry.positions.contiguous(),
            entry.valid.contiguous(), entry.lengths, sliding_window, index, count, num_splits,
        )  # fmt: skip
    if index is not None:
        entry = gather_slots(entry, index, count)
    return cached_attention(
        queries, entry.keys, entry.values, query_positions, entry.positions, entry.valid, sliding_window
    )


def _check_attention(
    queries: Tensor, entry: CacheLayer, query_positions: Tensor, index: Tensor | None, count: Tensor | None
) -> None:
    if queries.dim() != 4:
        raise ValueError(f"queries must be [B, Hq, T, D], got {tuple(queries.shape)}")
    b, hq, t, d = queries.shape
    kb, hkv, length, kd = entry.keys.shape
    if kb != b or kd != d or hkv == 0 or hq % hkv:
        raise ValueError(
            f"queries [B={b}, Hq={hq}, T, D={d}] do not fit keys {tuple(entry.keys.shape)}: "
            "same batch and head dim, and Hq a multiple of the KV heads"
        )
    if entry.values.shape[:3] != entry.keys.shape[:3]:
        raise ValueError(f"values {tuple(entry.values.shape)} must match keys {tuple(entry.keys.shape)} on [B, H, L]")
    if entry.positions.shape != (b, hkv, length) or entry.valid.shape != (b, hkv, length):
        raise ValueError(f"positions and valid must be [B, Hkv, L] = {(b, hkv, length)}")
    if entry.lengths.shape != (b, hkv):
        raise ValueError(f"lengths must be [B, Hkv] = {(b, hkv)}, got {tuple(entry.lengths.shape)}")
    if query_positions.shape != (b, t):
        raise ValueError(f"query_positions must be [B, T] = {(b, t)}, got {tuple(query_positions.shape)}")
    if (index is None) != (count is None):
        raise ValueError("index and count go together: the slot list [B, Hkv, K] and how many of it each head uses")
    if index is not None and count is not None:
        if index.dim() != 3 or index.shape[:2] != (b, hkv) or count.shape != (b, hkv):
            raise ValueError(f"index must be [B, Hkv, K] and count [B, Hkv] with B, Hkv = {b}, {hkv}")
        if index.is_floating_point() or count.is_floating_point():
            raise TypeError(f"index and count must be integer tensors, got {index.dtype}, {count.dtype}")
