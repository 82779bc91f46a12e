"""Weighted merging of stored keys/values into kept slots: the torch reference and the Triton kernels.

KVMerger (Gaussian weights around a pivot), Elastic Cache (plain means around anchors), D2O (similarity-weighted
recall of evicted tokens) and EMS (score-weighted class centres) all do the same thing before they compact: every
slot i of a head adds weight[i] x[i] to slot target[i] (-1: to none), and a slot anyone merged into becomes
sum(weight x) / sum(norm) over its contributors; the others keep their vectors. A kept slot lists itself as its
target, so weight = norm = 1 gives plain means.

`merge_into` is the torch reference (one tensor, float32 sums, the result in the input's dtype); `merge_kv` does
keys and values together, with the kernels: `_merge_scatter_kernel` (one program per (batch x head, slot block),
`tl.atomic_add` of both weighted rows and the norm into float32 sums at the targets) then `_merge_finish_kernel`
(sum / norm where a slot received anything, else the stored row). Float atomics add in no fixed order on a GPU,
so merged rows can differ from the reference in the last bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mpcache.kernels.runtime import runs_on, tl, triton

BLOCK_SLOTS = 32  # slots per program


# ------------------------------------------------------------------------- torch reference
def merge_into(x: Tensor, target: Tensor, weight: Tensor, norm: Tensor) -> Tensor:
    """x [B, H, L, D] after every slot i added weight[i] x[i] to slot target[i] (-1: to none) [B, H, L], and a
    slot anyone merged into became sum(weight x) / sum(norm) over its contributors (float32 sums; x's dtype)."""
    b, h, length, d = x.shape
    to = torch.where(target < 0, length, target)  # -1 -> a spare slot, dropped
    rows = weight.float()[..., None] * x.float()
    num = x.new_zeros(b, h, length + 1, d, dtype=torch.float32)
    num.scatter_add_(2, to[..., None].expand(-1, -1, -1, d), rows)
    den = x.new_zeros(b, h, length + 1, dtype=torch.float32).scatter_add_(2, to, norm.float())[..., :length]
    merged = (num[:, :, :length] / den.clamp(min=1e-30)[..., None]).to(x.dtype)
    return torch.where(den[..., None] > 0, merged, x)


# ------------------------------------------------------------------------------- Triton
@triton.jit
def _merge_scatter_kernel(
    K, V, TARGET, WEIGHT, NORM, NUM_K, NUM_V, DEN,
    stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    n_head, length,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // n_head
    h = bh % n_head
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = i < length
    to = tl.load(TARGET + bh * length + i, mask=inside, other=-1)  # TARGET, WEIGHT, NORM: [B, H, L] contiguous
    moves = inside & (to >= 0) & (to < length)  # out-of-range targets move nothing (the reference raises)
    to = tl.where(moves, to, 0)
    w = tl.load(WEIGHT + bh * length + i, mask=moves, other=0.0)
    tl.atomic_add(DEN + bh * length + to, tl.load(NORM + bh * length + i, mask=moves, other=0.0), mask=moves)
    d = tl.arange(0, BLOCK_D)
    rows = moves[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + i[:, None] * stride_kl + d[None, :], mask=rows, other=0.0)
    tl.atomic_add(NUM_K + (bh * length + to[:, None]) * HEAD_DIM + d[None, :], k.to(tl.float32) * w[:, None], mask=rows)
    dv = tl.arange(0, BLOCK_DV)
    rows = moves[:, None] & (dv[None, :] < VALUE_DIM)
    v = tl.load(V + b * stride_vb + h * stride_vh + i[:, None] * stride_vl + dv[None, :], mask=rows, other=0.0)
    tl.atomic_add(
        NUM_V + (bh * length + to[:, None]) * VALUE_DIM + dv[None, :], v.to(tl.float32) * w[:, None], mask=rows
    )


@triton.jit
def _merge_finish_kernel(
    X, NUM, DEN, OUT, stride_xb, stride_xh, stride_xl, n_head, length,
    DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // n_head
    h = bh % n_head
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    rows = (i[:, None] < length) & (d[None, :] < DIM)
    den = tl.load(DEN + bh * length + i, mask=i < length, other=0.0)
    x_ptr = b * stride_xb + h * stride_xh + i[:, None] * stride_xl + d[None, :]
    x = tl.load(X + x_ptr, mask=rows, other=0.0)
    num = tl.load(NUM + (bh * length + i[:, None]) * DIM + d[None, :], mask=rows, other=0.0)
    merged = num / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(OUT + x_ptr, tl.where(den[:, None] > 0, merged.to(x.dtype), x), mask=rows)


def merge_meta(head_dim: int, value_dim: int) -> dict:
    """Compile-time arguments of `_merge_scatter_kernel` (also what `bench.kernels --compile` builds)."""
    return dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, BLOCK=BLOCK_SLOTS, BLOCK_D=triton.next_power_of_2(head_dim),
                BLOCK_DV=triton.next_power_of_2(value_dim), num_warps=4)  # fmt: skip


def triton_merge_kv(
    keys: Tensor, values: Tensor, target: Tensor, weight: Tensor, norm: Tensor
) -> tuple[Tensor, Tensor]:
    """`merge_kv` through the kernels (keys/values contiguous in their last axis)."""
    b, h, length, d = keys.shape
    dv = values.shape[-1]
    if b * h * length == 0:
        return keys.clone(), values.clone()
    keys, values = keys.contiguous(), values.contiguous()
    num_k = torch.zeros(b, h, length, d, dtype=torch.float32, device=keys.device)
    num_v = torch.zeros(b, h, length, dv, dtype=torch.float32, device=keys.device)
    den = torch.zeros(b, h, length, dtype=torch.float32, device=keys.device)
    grid = (b * h, triton.cdiv(length, BLOCK_SLOTS))
    meta = merge_meta(d, dv)
    _merge_scatter_kernel[grid](
        keys, values, target.contiguous(), weight.float().contiguous(), norm.float().contiguous(), num_k, num_v, den,
        *keys.stride()[:3], *values.stride()[:3], h, length, **meta,
    )  # fmt: skip
    out = []
    for x, num, dim in ((keys, num_k, d), (values, num_v, dv)):
        y = torch.empty_like(x)
        _merge_finish_kernel[grid](
            x, num, den, y, *x.stride()[:3], h, length, DIM=dim, BLOCK=BLOCK_SLOTS, BLOCK_D=triton.next_power_of_2(dim)
        )
        out.append(y)
    return out[0], out[1]


# ------------------------------------------------------------------------- entry point
def merge_kv(
    keys: Tensor, values: Tensor, target: Tensor, weight: Tensor, norm: Tensor, use_kernels: bool = False
) -> tuple[Tensor, Tensor]:
    """`merge_into` of keys [B, H, L, D] and values [B, H, L, Dv] with the same targets, weights and norms
    [B, H, L]: the merged (keys, values). use_kernels: the scatter-add kernel where `runs_on`."""
    if keys.dim() != 4 or values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"keys/values must be [B, H, L, D] alike, got {tuple(keys.shape)}, {tuple(values.shape)}")
    for name, x in (("target", target), ("weight", weight), ("norm", norm)):
        if x.shape != keys.shape[:3]:
            raise ValueError(f"{name} must be [B, H, L] = {tuple(keys.shape[:3])}, got {tuple(x.shape)}")
    if target.is_floating_point():
        raise TypeError(f"target must be an integer tensor of slots (-1: none), got {target.dtype}")
    if use_kernels and runs_on(keys, values, target):
        return triton_merge_kv(keys, values, target, weight, norm)
    return merge_into(keys, target, weight, norm), merge_into(values, target, weight, norm)
