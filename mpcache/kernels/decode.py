"""Decode attention over per-(batch, KV head) variable-length caches: the torch references and the Triton kernels.

The cache is a `mpcache.model.cache.LayerKV` (keys/values [B, Hkv, L, D], positions, valid, lengths), read by
attribute only. The torch references: `cached_attention` (masking: `visibility`), over the listed slots of a
per-head index when given (`gather_slots`), and `attention_probs`, the softmax itself. `decode_attention` runs
the kernel when asked and able; `decode_attention_probs` also returns every slot's probability, what H2O-style
policies accumulate, from the same pass.

The kernel is flash-decoding: stage 1 (`_decode_split_kernel`) splits every head's slots into ranges, one program
per (batch, KV head, split) runs an online softmax for all G query heads of the group at once (GQA: each key block
is loaded once for G heads, via `tl.dot`) and stores a normalised partial output plus its log-sum-exp;
`_merge_kernel` merges the partials. A `Partials` buffer can take the ranges of several stage-1 launches over
different stores (MiKV's low-precision tokens beside the full-precision ones, ThinK's channel-pruned keys, see
`mpcache.kernels.compressed`) and merges them as one softmax. Stage 1 also walks:
- with `index`/`count`, the first `count[b, h]` entries of a per-head slot list instead of slots
  [0, lengths[b, h]): the gather Quest and MPCache need, without materialising the gathered cache;
- with `channels`, keys that hold only some channels of the queries (ThinK): the query is gathered instead;
- with block tables (`PAGED`), a pool of blocks (`mpcache.kernels.paged`);
- with `KEEP_SCORES`, it stores every slot's score, which `_probs_kernel` turns into probabilities once the
  merge knows each head's log-sum-exp: the [Hq, L] probabilities cost one float per slot and head, against the
  key and value rows (2 D elements) the pass reads anyway.

Masking is `visibility`; an index list means exactly what `gather_slots` means (entries clamped into range, entries
past `count` unused). Rows that see nothing output zeros. On a GPU the dots take the cache's bf16/fp16 tiles with
float32 accumulation (tensor cores; float32 tiles of 64 x 128 spill registers); on CPU tensors, i.e. under the
interpreter, which computes garbage on bf16, every load is cast to float32.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.kernels.compact import CacheLayer, gather_slots
from mpcache.kernels.runtime import helper, runs_on, tl, triton

BLOCK_N = 64  # cache slots per inner step (with 8 warps: no register spills at D = 128 on sm_90)
MIN_BLOCK = 16  # GPU `tl.dot` needs every dimension >= 16
PROB_BLOCK = 1024  # slots per program when scores become probabilities


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


def attention_probs(
    queries: Tensor,
    keys: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_valid: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """Softmax attention [B, Hkv, G, T, L] (float32) of queries [B, Hq, T, D] over per-head
    caches [B, Hkv, L, D], with G = Hq / Hkv query heads per KV head; masking as in
    `visibility`. Rows that see nothing are zeros."""
    b, hq, t, d = queries.shape
    hkv = keys.shape[1]
    g = hq // hkv
    # One batched matmul per KV head over its G x T queries; every later step works in place.
    scores = torch.matmul(queries.reshape(b, hkv, g * t, d), keys.transpose(-1, -2)).view(b, hkv, g, t, -1)
    scores = scores.div_(math.sqrt(d)).float()
    visible = visibility(query_positions, key_positions, key_valid, sliding_window)
    scores.masked_fill_(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num_(0.0)


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
    gqa = hq != hkv
    same_slots = hkv == 1 or bool(
        (key_positions == key_positions[:, :1]).all() and (key_valid == key_valid[:, :1]).all()
    )
    if same_slots:
        key_positions, key_valid = key_positions[:, :1], key_valid[:, :1]
        if sliding_window is None and bool(key_valid.all()):
            # Every slot holds a real token of every head: plain causal attention, which the fused
            # kernel computes without a mask (and, for a prompt, without its upper triangle: 2x faster).
            if t == 1 and bool((key_positions[:, 0] <= query_positions).all()):
                return F.scaled_dot_product_attention(queries, keys, values, enable_gqa=gqa)
            if t == length and bool((key_positions[:, 0] == query_positions).all()):
                return F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=gqa)
    mask = visibility(query_positions, key_positions, key_valid, sliding_window)[:, :, 0]  # [B, 1 or Hkv, T, L]
    if not same_slots and gqa:
        mask = mask.repeat_interleave(hq // hkv, dim=1)  # query head h reads KV head h // G
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=gqa)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # rows that see nothing


def concat_layers(first: CacheLayer, second: CacheLayer) -> CacheLayer:
    """A read-only view of two stores side by side (attention only needs positions and validity): what a method
    with a side store (MiKV, ThinK) hands the torch path, and what the kernels read without concatenating."""
    return dataclasses.replace(
        second,
        keys=torch.cat([first.keys, second.keys], 2),
        values=torch.cat([first.values, second.values], 2),
        positions=torch.cat([first.positions, second.positions], 2),
        valid=torch.cat([first.valid, second.valid], 2),
        lengths=first.keys.shape[2] + second.lengths,
    )


# ------------------------------------------------------------------------------- Triton
@helper
def _online_block(q, k, v, visible, m_i, l_i, acc, scale_log2):
    """One key block of an online softmax for G query heads: the block's scores [G, BLOCK] (log2 units, -inf where
    not visible), then the running max, sum and weighted values after it."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
    s = tl.where(visible[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: keep zeros, not NaN
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    l_i = l_i * alpha + tl.sum(p, 1)
    return s, m_new, l_i, acc


@helper
def _empty_state(BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr):
    """An online softmax that has seen nothing: running max, sum and weighted values of G query heads."""
    return (
        tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32),
        tl.zeros([BLOCK_G, BLOCK_DV], tl.float32),
    )  # fmt: skip


@helper
def _store_partial(
    PART, LSE, b, heads, live, part, n_parts, n_head, m_i, l_i, acc,
    stride_ob, stride_oh, stride_os, stride_od,
    VALUE_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Store a split's normalised output and log-sum-exp (log2 units; -inf when it saw nothing) for `heads`."""
    dv = tl.arange(0, BLOCK_DV)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_ptr = PART + b * stride_ob + heads[:, None] * stride_oh + part * stride_os + dv[None, :] * stride_od
    tl.store(o_ptr, out, mask=live[:, None] & (dv[None, :] < VALUE_DIM))
    tl.store(LSE + (b * n_head + heads) * n_parts + part, lse, mask=live)  # [B, Hq, parts], contiguous


@triton.jit
def _decode_split_kernel(
    Q, K, V, QPOS, KPOS, VALID, LENGTHS, INDEX, COUNT, CHANNELS, TABLES, PART, LSE, SCORES,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_pb, stride_ph, stride_pl,
    stride_ib, stride_ih, stride_ik,
    stride_cb, stride_ch,
    stride_tb,
    stride_ob, stride_oh, stride_os, stride_od,
    n_kv_head, capacity, n_entries, split_size, part_offset, n_parts, block_size, window, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_CHANNELS: tl.constexpr, PAGED: tl.constexpr, HAS_WINDOW: tl.constexpr,
    KEEP_SCORES: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_kv_head
    h = bh % n_kv_head

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    heads = h * GROUP + g  # the query heads that share KV head h
    if HAS_CHANNELS:  # the keys hold channels CHANNELS[b, h] of the queries' (ThinK)
        chan = tl.load(CHANNELS + b * stride_cb + h * stride_ch + d, mask=d < HEAD_DIM, other=0)
    else:
        chan = d
    q_ptr = Q + b * stride_qb + heads[:, None] * stride_qh + chan[None, :] * stride_qd
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
    m_i, l_i, acc = _empty_state(BLOCK_G, BLOCK_DV)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < hi
        if HAS_INDEX:
            slot = tl.load(INDEX + b * stride_ib + h * stride_ih + offs * stride_ik, mask=live, other=0)
            slot = tl.minimum(tl.maximum(slot, 0), capacity - 1)  # as gather_slots clamps
        else:
            slot = offs
        if PAGED:  # slot s of the request lives in block TABLES[b, s // block_size]
            row = tl.load(TABLES + b * stride_tb + slot // block_size, mask=live, other=0)
            off = slot % block_size
        else:
            row = b
            off = slot
        meta = row * stride_pb + h * stride_ph + off * stride_pl
        k_pos = tl.load(KPOS + meta, mask=live, other=0)
        visible = live & (k_pos <= q_pos)
        if not PAGED:  # the pool has no holes: slots below the length are in use
            visible = visible & (tl.load(VALID + meta, mask=live, other=0) != 0)
        if HAS_WINDOW:
            visible = visible & (q_pos - k_pos < window)
        k_row = row * stride_kb + h * stride_kh + off * stride_kl  # [BLOCK] (row: a block id per slot when paged)
        k_ptr = K + k_row[:, None] + d[None, :] * stride_kd
        k = tl.load(k_ptr, mask=live[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        v_ptr = V + (row * stride_vb + h * stride_vh + off * stride_vl)[:, None] + dv[None, :] * stride_vd
        v = tl.load(v_ptr, mask=live[:, None] & (dv[None, :] < VALUE_DIM), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s, m_i, l_i, acc = _online_block(q, k, v, visible, m_i, l_i, acc, scale_log2)
        if KEEP_SCORES:  # [B, Hq, capacity] contiguous, by slot
            s_ptr = SCORES + (b * n_kv_head * GROUP + heads[:, None]) * capacity + slot[None, :]
            tl.store(s_ptr, s, mask=(g[:, None] < GROUP) & live[None, :])

    _store_partial(
        PART, LSE, b, heads, g < GROUP, part_offset + split, n_parts, n_kv_head * GROUP, m_i, l_i, acc,
        stride_ob, stride_oh, stride_os, stride_od, VALUE_DIM, BLOCK_DV,
    )  # fmt: skip


@triton.jit
def _merge_kernel(
    PART, LSE, OUT, LSE_OUT,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_ob, stride_oh, stride_od,
    n_head, n_parts,
    VALUE_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b * n_head + head
    b = row // n_head
    head = row % n_head
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(LSE + row * n_parts + s, mask=s < n_parts, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_use)  # empty splits weigh 0
    part_ptr = PART + b * stride_pb + head * stride_ph + s[:, None] * stride_ps + dv[None, :] * stride_pd
    part = tl.load(part_ptr, mask=(s[:, None] < n_parts) & (dv[None, :] < VALUE_DIM), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # a row that saw nothing: zeros
    tl.store(OUT + b * stride_ob + head * stride_oh + dv * stride_od, out, mask=dv < VALUE_DIM)
    tl.store(LSE_OUT + row, tl.where(total > 0, m_use + tl.log2(tl.where(total > 0, total, 1.0)), float("-inf")))


@triton.jit
def _probs_kernel(SCORES, LSE, LENGTHS, group, capacity, BLOCK: tl.constexpr):
    """Scores [B * Hq, capacity] (log2 units) -> softmax probabilities in place, 0 past each head's length."""
    row = tl.program_id(0)  # b * Hq + head; its KV head's row is row // group
    slot = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = slot < capacity
    n = tl.load(LENGTHS + row // group)
    lse = tl.load(LSE + row)
    s = tl.load(SCORES + row * capacity + slot, mask=inside & (slot < n), other=float("-inf"))
    lse = tl.where(lse > float("-inf"), lse, float("inf"))  # a row that saw nothing: exp2(s - inf) = 0
    p = tl.where(slot < n, tl.exp2(s - lse), 0.0)
    tl.store(SCORES + row * capacity + slot, p, mask=inside)


def _pow2(n: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(n))


def split_meta(
    group: int,
    head_dim: int,
    value_dim: int,
    has_index: bool,
    has_window: bool,
    upcast: bool,
    has_channels: bool = False,
    paged: bool = False,
    keep_scores: bool = False,
) -> dict:
    """Compile-time arguments of `_decode_split_kernel` (also what `bench.kernels --compile` builds)."""
    return dict(
        GROUP=group, HEAD_DIM=head_dim, VALUE_DIM=value_dim,
        BLOCK_G=_pow2(group), BLOCK_D=_pow2(head_dim), BLOCK_DV=_pow2(value_dim), BLOCK=BLOCK_N,
        HAS_INDEX=has_index, HAS_CHANNELS=has_channels, PAGED=paged, HAS_WINDOW=has_window, KEEP_SCORES=keep_scores,
        UPCAST=upcast, num_warps=8,
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


class Partials:
    """Normalised partial outputs [B, Hq, S, Dv] and their log-sum-exps [B, Hq, S] of S split ranges, filled by
    one or more stage-1 launches (each `take`s its ranges), then `merge`d into one softmax over all of them."""

    def __init__(self, queries: Tensor, value_dim: int, n_parts: int) -> None:
        b, hq = queries.shape[:2]
        self.part = torch.empty(b, hq, n_parts, value_dim, dtype=torch.float32, device=queries.device)
        self.lse = torch.empty(b, hq, n_parts, dtype=torch.float32, device=queries.device)
        self.used = 0

    def take(self, n: int) -> int:
        """Reserve n split ranges; returns the first one's index."""
        first, self.used = self.used, self.used + n
        assert self.used <= self.lse.shape[2], "more split ranges than reserved"
        return first

    def merge(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(attention output [B, Hq, 1, Dv] in `dtype`, log-sum-exp per row [B, Hq] in log2 units)."""
        assert self.used == self.lse.shape[2], "a reserved split range was never written"
        b, hq, n_parts, dv = self.part.shape
        if n_parts == 1:  # one range: already normalised
            return self.part[:, :, :1].to(dtype), self.lse[:, :, 0]
        out = torch.empty(b, hq, 1, dv, dtype=dtype, device=self.part.device)
        lse = torch.empty(b, hq, dtype=torch.float32, device=self.part.device)
        _merge_kernel[(b * hq,)](
            self.part, self.lse, out, lse,
            *self.part.stride(), out.stride(0), out.stride(1), out.stride(3),
            hq, n_parts, **merge_meta(dv, n_parts),
        )  # fmt: skip
        return out, lse


def launch_split(
    partials: Partials,
    splits: int,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    lengths: Tensor,
    sliding_window: int | None = None,
    *,
    valid: Tensor | None = None,
    index: Tensor | None = None,
    count: Tensor | None = None,
    channels: Tensor | None = None,
    tables: Tensor | None = None,
    block_size: int = 0,
    scores: Tensor | None = None,
) -> None:
    """Stage 1 over one store into `splits` ranges of `partials`: queries [B, Hq, 1, D]; keys [R, Hkv, L, Dk] and
    values [R, Hkv, L, Dv] with key_positions (and `valid`, required unless paged) [R, Hkv, L], where R is the
    batch, or the pool's blocks with `tables` [B, M] (then slots [0, lengths[b, h]) of a request are its table's
    blocks, `block_size` slots each). Optional: `index`/`count` slot lists, `channels` [B, Hkv, Dk] (the query
    channels the keys hold), `scores` [B, Hq, L] float32 to receive every slot's score (no index lists)."""
    b, hq, _, d = queries.shape
    hkv, dk, dv = keys.shape[1], keys.shape[-1], values.shape[-1]
    capacity = tables.shape[1] * block_size if tables is not None else keys.shape[2]
    entries = index.shape[2] if index is not None else capacity
    split_size = triton.cdiv(triton.cdiv(max(entries, 1), splits), BLOCK_N) * BLOCK_N
    dummy = lengths.new_zeros(1, 1, 1)
    index_t = index if index is not None else dummy
    channels_t = channels.contiguous() if channels is not None else dummy
    tables_t = tables if tables is not None else dummy
    valid_t = dummy if valid is None else valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    if valid is not None:
        assert valid.stride() == key_positions.stride(), "valid and key_positions must share strides"
    _decode_split_kernel[(b * hkv, splits)](
        queries[:, :, 0], keys, values, query_positions[:, 0].contiguous(), key_positions, valid_t,
        lengths.contiguous(), index_t, (count if count is not None else lengths).contiguous(), channels_t,
        tables_t, partials.part, partials.lse, scores if scores is not None else partials.lse,
        *queries[:, :, 0].stride(), *keys.stride(), *values.stride(), *key_positions.stride(), *index_t.stride(),
        *channels_t.stride()[:2], tables_t.stride(0), *partials.part.stride(),
        hkv, capacity, entries, split_size, partials.take(splits), partials.lse.shape[2], max(block_size, 1),
        sliding_window or 0, math.log2(math.e) / math.sqrt(d),
        **split_meta(
            hq // hkv, dk, dv, index is not None, sliding_window is not None, queries.device.type == "cpu",
            channels is not None, tables is not None, scores is not None,
        ),
    )  # fmt: skip


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
    keep_probs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention of one query per row, queries [B, Hq, 1, D], over the cache [B, Hkv, L, D]
    (slots [0, lengths[b, h]) or, with `index` [B, Hkv, K] + `count` [B, Hkv], the listed
    slots): ([B, Hq, 1, Dv] in the queries' dtype, with `keep_probs` every slot's probability
    [B, Hkv, G, L] float32). `decode_attention` checks the arguments; this launches."""
    b, hq = queries.shape[:2]
    hkv, capacity = keys.shape[1], keys.shape[2]
    entries = index.shape[2] if index is not None else capacity
    splits = num_splits or default_splits(b * hkv, entries, queries.device)
    partials = Partials(queries, values.shape[-1], splits)
    scores = torch.empty(b, hq, capacity, dtype=torch.float32, device=queries.device) if keep_probs else None
    launch_split(
        partials, splits, queries, keys, values, query_positions, key_positions, lengths, sliding_window,
        valid=key_valid, index=index, count=count, scores=scores,
    )  # fmt: skip
    out, lse = partials.merge(queries.dtype)
    if scores is None:
        return out, None
    if capacity:
        _probs_kernel[(b * hq, triton.cdiv(capacity, PROB_BLOCK))](
            scores, lse, lengths.contiguous(), hq // hkv, capacity, BLOCK=PROB_BLOCK
        )
    return out, scores.view(b, hkv, hq // hkv, capacity)


# ------------------------------------------------------------------------- entry points
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
        )[0]  # fmt: skip
    if index is not None:
        entry = gather_slots(entry, index, count)
    return cached_attention(
        queries, entry.keys, entry.values, query_positions, entry.positions, entry.valid, sliding_window
    )


def decode_attention_probs(
    queries: Tensor,
    entry: CacheLayer,
    query_positions: Tensor,
    sliding_window: int | None = None,
    use_kernels: bool = False,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`decode_attention` of one query per row, queries [B, Hq, 1, D], plus the softmax probability every stored
    slot got from each query head, [B, Hkv, G, L] float32 (0 where not visible): `attention_probs`, from the same
    pass with `use_kernels` (where `runs_on`)."""
    _check_attention(queries, entry, query_positions, None, None)
    if queries.shape[2] != 1:
        raise ValueError(f"decode_attention_probs takes one query per row, got T={queries.shape[2]}")
    if use_kernels and runs_on(queries, entry.keys):
        out, probs = triton_decode_attention(
            queries, entry.keys, entry.values, query_positions, entry.positions.contiguous(),
            entry.valid.contiguous(), entry.lengths, sliding_window, num_splits=num_splits, keep_probs=True,
        )  # fmt: skip
        assert probs is not None
        return out, probs
    out = cached_attention(
        queries, entry.keys, entry.values, query_positions, entry.positions, entry.valid, sliding_window
    )
    probs = attention_probs(queries, entry.keys, query_positions, entry.positions, entry.valid, sliding_window)
    return out, probs[:, :, :, 0]


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
