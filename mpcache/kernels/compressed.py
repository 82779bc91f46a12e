"""Decode attention over compressed side stores, decompression fused into the kernel: the torch references and the
Triton kernel.

Two methods keep tokens beside the full-precision cache in a cheaper form, and attention reads both as one
softmax:
- MiKV's low-precision store: per-token asymmetric round-to-nearest codes of `bits` bits packed as bit planes
  (`pack_bits`), a scale and zero point per token, keys multiplied by a per-channel balance before quantization
  (`quantize_entry`; `dequantize_store` undoes it);
- ThinK's channel-pruned keys: each head stores only channels `channels[b, h]` of its old keys (`expand_pruned`
  puts zeros back, which is the query masked to those channels).

The torch references read the store decompressed beside the main one (`concat_layers`, then `cached_attention`):
`lowbit_attention`, `pruned_attention`. The kernels never write the decompressed store: the main store goes
through stage 1 of `mpcache.kernels.decode`, the side store through `_lowbit_split_kernel` (unpacks and
dequantises each key/value block in registers) or through decode's stage 1 with `channels` (the query is
gathered to the kept channels), both into one `Partials`, and one merge gives the softmax over everything.
The store format lives here, once, for the kernel and for `mpcache.methods.mikv` / `think`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mpcache.kernels.compact import CacheLayer
from mpcache.kernels.decode import (
    Partials,
    _empty_state,
    _online_block,
    _pow2,
    _store_partial,
    concat_layers,
    decode_attention,
    default_splits,
    launch_split,
)
from mpcache.kernels.runtime import helper, runs_on, tl, triton

LOWBIT_BLOCK = 32  # packed slots per inner step (64 x 128 int32 codes for keys and values spill registers)


# ------------------------------------------------------------------ quantization (MiKV's store format)
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
    """uint8 codes [..., D] (< 2^bits) -> bit planes [..., bits, ceil(D / 8)] uint8: bit j of code d is bit d % 8
    of byte d // 8 of plane j."""
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


def quantize_entry(entry: CacheLayer, bits: int, balance: Tensor) -> QuantizedStore:
    """A layer's slots quantized to `bits`, keys times `balance` [B, H, D] first."""
    keys = entry.keys * balance[:, :, None, :]
    kc, ks, kz = quantize(keys, bits)
    vc, vs, vz = quantize(entry.values, bits)
    return QuantizedStore(pack_bits(kc, bits), ks, kz, pack_bits(vc, bits), vs, vz, entry.positions, entry.valid)


def dequantize_store(store: QuantizedStore, bits: int, balance: Tensor, like: CacheLayer) -> CacheLayer:
    """The store at full precision, shaped and typed like the main store `like` (the torch reference's view)."""
    dk, dv, dtype = like.keys.shape[-1], like.values.shape[-1], like.keys.dtype
    keys = dequantize(unpack_bits(store.key_codes, bits, dk), store.key_scale, store.key_zero) / balance[:, :, None]
    values = dequantize(unpack_bits(store.value_codes, bits, dv), store.value_scale, store.value_zero)
    lengths = torch.full(store.valid.shape[:2], store.valid.shape[2], dtype=torch.long, device=store.valid.device)
    return dataclasses.replace(
        like, keys=keys.to(dtype), values=values.to(dtype), positions=store.positions, valid=store.valid,
        lengths=lengths,
    )  # fmt: skip


def concat_stores(a: QuantizedStore | None, b: QuantizedStore) -> QuantizedStore:
    """Two stores of a layer side by side (slot axis)."""
    if a is None:
        return b
    fields = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero", "positions", "valid")
    return QuantizedStore(*(torch.cat([getattr(a, f), getattr(b, f)], 2) for f in fields))




# ------------------------------------------------------------------ channel pruning (ThinK's keys)
def expand_pruned(pruned: CacheLayer, channels: Tensor, dim: int) -> CacheLayer:
    """Keys [B, H, L, Dk] holding channels `channels` [B, H, Dk] of `dim` back at full width, zeros elsewhere."""
    keys = pruned.keys.new_zeros(*pruned.keys.shape[:3], dim)
    keys.scatter_(-1, channels[:, :, None, :].expand(-1, -1, pruned.keys.shape[2], -1), pruned.keys)
    return dataclasses.replace(pruned, keys=keys)


# ------------------------------------------------------------------------------- Triton
@helper
def _dequantize_block(
    CODES, SCALE, ZERO, codes_row, meta_row, slot, live, stride_l, stride_bit,
    DIM: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows `slot` [BLOCK] of a packed store as float32 [BLOCK, BLOCK_D]: bit j of code d is bit d % 8 of byte
    d // 8 of plane j (`pack_bits`), then code * scale + zero per row."""
    d = tl.arange(0, BLOCK_D)
    inside = live[:, None] & (d[None, :] < DIM)
    code = tl.zeros([BLOCK, BLOCK_D], tl.int32)
    byte_ptr = CODES + codes_row + slot[:, None] * stride_l + (d // 8)[None, :]
    for bit in tl.static_range(BITS):
        byte = tl.load(byte_ptr + bit * stride_bit, mask=inside, other=0).to(tl.int32)
        code += ((byte >> (d % 8)[None, :]) & 1) << bit
    scale = tl.load(SCALE + meta_row + slot, mask=live, other=0.0).to(tl.float32)
    zero = tl.load(ZERO + meta_row + slot, mask=live, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale[:, None] + zero[:, None]


@triton.jit
def _lowbit_split_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, BALANCE, QPOS, KPOS, VALID, PART, LSE,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_ch, stride_cl, stride_cbit,
    stride_ub, stride_uh, stride_ul, stride_ubit,
    stride_nb, stride_nh,
    stride_ob, stride_oh, stride_os, stride_od,
    n_kv_head, length, split_size, part_offset, n_parts, window, scale_log2,
    BITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr,
    HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Stage 1 of decode attention over a packed store; its per-slot tensors (scales, zeros, positions, validity)
    are [B, Hkv, L] contiguous."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_kv_head
    h = bh % n_kv_head
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = h * GROUP + g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=(g[:, None] < GROUP) & (d[None, :] < HEAD_DIM), other=0.0,
    ).to(tl.float32)  # fmt: skip
    balance = tl.load(BALANCE + b * stride_nb + h * stride_nh + d, mask=d < HEAD_DIM, other=1.0).to(tl.float32)
    q = q / balance[None, :]  # (k b) / b: the query meets the balanced keys' codes divided by b
    if not UPCAST:
        q = q.to(Q.dtype.element_ty)  # bf16/fp16 tensor-core dots, float32 accumulation
    q_pos = tl.load(QPOS + b)
    meta_row = bh * length
    lo = split * split_size
    hi = tl.minimum(lo + split_size, length)
    m_i, l_i, acc = _empty_state(BLOCK_G, BLOCK_DV)
    for start in range(lo, hi, BLOCK):
        slot = start + tl.arange(0, BLOCK)
        live = slot < hi
        k_pos = tl.load(KPOS + meta_row + slot, mask=live, other=0)
        visible = live & (tl.load(VALID + meta_row + slot, mask=live, other=0) != 0) & (k_pos <= q_pos)
        if HAS_WINDOW:
            visible = visible & (q_pos - k_pos < window)
        k = _dequantize_block(
            KC, KS, KZ, b * stride_cb + h * stride_ch, meta_row, slot, live, stride_cl, stride_cbit,
            HEAD_DIM, BITS, BLOCK, BLOCK_D,
        )  # fmt: skip
        v = _dequantize_block(
            VC, VS, VZ, b * stride_ub + h * stride_uh, meta_row, slot, live, stride_ul, stride_ubit,
            VALUE_DIM, BITS, BLOCK, BLOCK_DV,
        )  # fmt: skip
        if not UPCAST:
            k = k.to(Q.dtype.element_ty)
            v = v.to(Q.dtype.element_ty)
        _, m_i, l_i, acc = _online_block(q, k, v, visible, m_i, l_i, acc, scale_log2)
    _store_partial(
        PART, LSE, b, heads, g < GROUP, part_offset + split, n_parts, n_kv_head * GROUP, m_i, l_i, acc,
        stride_ob, stride_oh, stride_os, stride_od, VALUE_DIM, BLOCK_DV,
    )  # fmt: skip


def lowbit_meta(bits: int, group: int, head_dim: int, value_dim: int, has_window: bool, upcast: bool) -> dict:
    """Compile-time arguments of `_lowbit_split_kernel` (also what `bench.kernels --compile` builds)."""
    return dict(
        BITS=bits, GROUP=group, HEAD_DIM=head_dim, VALUE_DIM=value_dim, BLOCK_G=_pow2(group), BLOCK_D=_pow2(head_dim),
        BLOCK_DV=_pow2(value_dim), BLOCK=LOWBIT_BLOCK, HAS_WINDOW=has_window, UPCAST=upcast, num_warps=8,
    )  # fmt: skip


def launch_lowbit(
    partials: Partials,
    splits: int,
    queries: Tensor,
    store: QuantizedStore,
    bits: int,
    balance: Tensor,
    query_positions: Tensor,
    sliding_window: int | None,
    value_dim: int,
) -> None:
    """Stage 1 over `store` into `splits` ranges of `partials`."""
    b, hq, _, d = queries.shape
    hkv, length = store.valid.shape[1], store.valid.shape[2]
    kc, vc = store.key_codes.contiguous(), store.value_codes.contiguous()
    meta = [x.contiguous() for x in (store.key_scale, store.key_zero, store.value_scale, store.value_zero)]
    positions, valid = store.positions.contiguous(), store.valid.contiguous().view(torch.uint8)
    balance = balance.contiguous()
    q = queries[:, :, 0]
    split_size = triton.cdiv(triton.cdiv(max(length, 1), splits), LOWBIT_BLOCK) * LOWBIT_BLOCK
    _lowbit_split_kernel[(b * hkv, splits)](
        q, kc, meta[0], meta[1], vc, meta[2], meta[3], balance, query_positions[:, 0].contiguous(), positions, valid,
        partials.part, partials.lse,
        *q.stride(), *kc.stride()[:4], *vc.stride()[:4], *balance.stride()[:2], *partials.part.stride(),
        hkv, length, split_size, partials.take(splits), partials.lse.shape[2], sliding_window or 0,
        math.log2(math.e) / math.sqrt(d),
        **lowbit_meta(bits, hq // hkv, d, value_dim, sliding_window is not None, queries.device.type == "cpu"),
    )  # fmt: skip


def _two_stores(
    queries: Tensor, entry: CacheLayer, side_entries: int, side: Callable[[Partials, int], None],
    query_positions: Tensor,
    sliding_window: int | None,
) -> Tensor:  # fmt: skip
    """One softmax over the main store `entry` and a side store whose stage 1 `side(partials, splits)` launches."""
    b, hkv = entry.keys.shape[:2]
    main = default_splits(b * hkv, entry.keys.shape[2], queries.device)
    extra = default_splits(b * hkv, side_entries, queries.device)
    partials = Partials(queries, entry.values.shape[-1], main + extra)
    launch_split(
        partials, main, queries, entry.keys, entry.values, query_positions, entry.positions.contiguous(),
        entry.lengths, sliding_window, valid=entry.valid.contiguous(),
    )  # fmt: skip
    side(partials, extra)
    return partials.merge(queries.dtype)[0]


# ------------------------------------------------------------------------- entry points
def lowbit_attention(
    queries: Tensor,
    entry: CacheLayer,
    store: QuantizedStore,
    bits: int,
    balance: Tensor,
    query_positions: Tensor,
    sliding_window: int | None = None,
    use_kernels: bool = False,
) -> Tensor:
    """Attention of queries [B, Hq, T, D] over MiKV's low-precision `store` and the full-precision `entry` as one
    softmax: `decode_attention` over `concat_layers(dequantize_store(...), entry)`. use_kernels: with T = 1, the
    store is read packed (`_lowbit_split_kernel`) where `runs_on`."""
    if store.valid.shape[:2] != entry.keys.shape[:2] or balance.shape != (*entry.keys.shape[:2], queries.shape[-1]):
        raise ValueError(
            f"store {tuple(store.valid.shape)} and balance {tuple(balance.shape)} do not fit the layer "
            f"{tuple(entry.keys.shape)}: same [B, Hkv], balance [B, Hkv, D]"
        )
    if use_kernels and queries.shape[2] == 1 and runs_on(queries, entry.keys, store.key_codes):

        def side(partials: Partials, splits: int) -> None:
            launch_lowbit(
                partials, splits, queries, store, bits, balance, query_positions, sliding_window,
                entry.values.shape[-1],
            )  # fmt: skip

        return _two_stores(queries, entry, store.valid.shape[2], side, query_positions, sliding_window)
    view = concat_layers(dequantize_store(store, bits, balance, entry), entry)
    return decode_attention(queries, view, query_positions, sliding_window)


def pruned_attention(
    queries: Tensor,
    entry: CacheLayer,
    pruned: CacheLayer,
    channels: Tensor,
    query_positions: Tensor,
    sliding_window: int | None = None,
    use_kernels: bool = False,
) -> Tensor:
    """Attention of queries [B, Hq, T, D] over ThinK's `pruned` store (keys hold channels `channels` [B, Hkv, Dk]
    of D) and the full store `entry` as one softmax: `decode_attention` over
    `concat_layers(expand_pruned(pruned, channels, D), entry)`. use_kernels: with T = 1, the pruned keys are read
    as stored, against the query's kept channels, where `runs_on`."""
    if channels.shape != (*entry.keys.shape[:2], pruned.keys.shape[-1]) or channels.is_floating_point():
        raise ValueError(
            f"channels must be integer [B, Hkv, Dk] = {(*entry.keys.shape[:2], pruned.keys.shape[-1])}, "
            f"got {tuple(channels.shape)} {channels.dtype}"
        )
    if use_kernels and queries.shape[2] == 1 and runs_on(queries, entry.keys, pruned.keys):

        def side(partials: Partials, splits: int) -> None:
            launch_split(
                partials, splits, queries, pruned.keys, pruned.values, query_positions, pruned.positions.contiguous(),
                pruned.lengths, sliding_window, valid=pruned.valid.contiguous(), channels=channels,
            )  # fmt: skip

        return _two_stores(queries, entry, pruned.keys.shape[2], side, query_positions, sliding_window)
    view = concat_layers(expand_pruned(pruned, channels, queries.shape[-1]), entry)
    return decode_attention(queries, view, query_positions, sliding_window)
