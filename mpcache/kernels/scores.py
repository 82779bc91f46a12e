"""Triton score kernels: page/cluster scores from key summaries, and key norms.

- `chunk_scores`: per query and chunk (Quest page, MPCache cluster) with per-channel key
  bounds kmax/kmin, either Quest's upper bound sum_i max(q_i kmax_i, q_i kmin_i)
  (`mpcache.methods.quest.page_bound`) or MPCache's linearised q . (alpha kmax + (1 - alpha)
  kmin) (`mpcache.methods.mpcache.approx_similarity`). One program per (row, query, chunk
  block), looping over channels, so the [G, C, D] products are never materialised.
- `token_key_norms`: ||k|| of every stored slot (0 for invalid ones), a key-norm score.
- `channel_key_norms`: ||K[:, c]|| over a head's valid slots, the key half of ThinK's channel
  criterion (`mpcache.methods.think.channel_scores`).

Loads are cast to float32 (the interpreter mishandles bf16 arithmetic); outputs are float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

QUEST, LINEAR = 0, 1  # chunk score modes


@triton.jit
def _chunk_score_kernel(
    Q, KMAX, KMIN, OUT,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kc, stride_kd,
    n_head, n_group, n_chunk, head_dim, alpha,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (b * n_head + h) * n_group + g
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = row % n_group
    bh = row // n_group
    b = bh // n_head
    h = bh % n_head
    acc = tl.zeros([BLOCK_C], tl.float32)
    for d0 in range(0, head_dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + g * stride_qg + d * stride_qd, mask=d < head_dim, other=0.0)
        q = q.to(tl.float32)[None, :]
        box = b * stride_kb + h * stride_kh + c[:, None] * stride_kc + d[None, :] * stride_kd
        inside = (c[:, None] < n_chunk) & (d[None, :] < head_dim)
        kmax = tl.load(KMAX + box, mask=inside, other=0.0).to(tl.float32)
        kmin = tl.load(KMIN + box, mask=inside, other=0.0).to(tl.float32)
        if MODE == 0:
            acc += tl.sum(tl.maximum(q * kmax, q * kmin), 1)
        else:
            acc += tl.sum(q * (alpha * kmax + (1.0 - alpha) * kmin), 1)
    tl.store(OUT + row * n_chunk + c, acc, mask=c < n_chunk)


@triton.jit
def _token_norm_kernel(
    K, VALID, OUT,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl,
    n_head, length, head_dim,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // n_head
    h = bh % n_head
    slot = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    inside = slot < length
    ok = tl.load(VALID + b * stride_vb + h * stride_vh + slot * stride_vl, mask=inside, other=0) != 0
    acc = tl.zeros([BLOCK_L], tl.float32)
    for d0 in range(0, head_dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ptr = K + b * stride_kb + h * stride_kh + slot[:, None] * stride_kl + d[None, :] * stride_kd
        k = tl.load(ptr, mask=(inside & ok)[:, None] & (d[None, :] < head_dim), other=0.0).to(tl.float32)
        acc += tl.sum(k * k, 1)
    tl.store(OUT + bh * length + slot, tl.sqrt(acc), mask=inside)


@triton.jit
def _channel_norm_kernel(
    K, VALID, OUT,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl,
    n_head, length, head_dim,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // n_head
    h = bh % n_head
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for l0 in range(0, length, BLOCK_L):
        slot = l0 + tl.arange(0, BLOCK_L)
        inside = slot < length
        ok = tl.load(VALID + b * stride_vb + h * stride_vh + slot * stride_vl, mask=inside, other=0) != 0
        ptr = K + b * stride_kb + h * stride_kh + slot[:, None] * stride_kl + d[None, :] * stride_kd
        k = tl.load(ptr, mask=(inside & ok)[:, None] & (d[None, :] < head_dim), other=0.0).to(tl.float32)
        acc += tl.sum(k * k, 0)
    tl.store(OUT + bh * head_dim + d, tl.sqrt(acc), mask=d < head_dim)


def chunk_meta(n_chunk: int, head_dim: int, mode: int) -> dict:
    """Compile-time arguments of `_chunk_score_kernel` (also what `bench.kernels --compile` builds)."""
    return dict(MODE=mode, BLOCK_C=min(64, max(16, triton.next_power_of_2(n_chunk))),
                BLOCK_D=min(64, triton.next_power_of_2(head_dim)))  # fmt: skip


def norm_meta(length: int, head_dim: int) -> dict:
    """Compile-time arguments of `_token_norm_kernel` and `_channel_norm_kernel`."""
    return dict(BLOCK_L=min(64, max(16, triton.next_power_of_2(length))),
                BLOCK_D=min(64, max(16, triton.next_power_of_2(head_dim))))  # fmt: skip


def _as_bytes(valid: Tensor) -> Tensor:
    return valid.view(torch.uint8) if valid.dtype == torch.bool else valid


def chunk_scores(queries: Tensor, kmax: Tensor, kmin: Tensor, mode: int, alpha: float = 0.0) -> Tensor:
    """queries [B, H, G, D], chunk bounds [B, H, C, D] -> scores [B, H, G, C] (float32)."""
    b, h, g, d = queries.shape
    c = kmax.shape[2]
    out = torch.empty(b, h, g, c, dtype=torch.float32, device=queries.device)
    if out.numel() == 0:
        return out
    meta = chunk_meta(c, d, mode)
    _chunk_score_kernel[(b * h * g, triton.cdiv(c, meta["BLOCK_C"]))](
        queries, kmax, kmin, out, *queries.stride(), *kmax.stride(), h, g, c, d, float(alpha), **meta
    )
    return out


def token_key_norms(keys: Tensor, valid: Tensor) -> Tensor:
    """keys [B, H, L, D] -> ||k|| per slot [B, H, L] (float32, 0 where not valid)."""
    b, h, length, d = keys.shape
    out = torch.empty(b, h, length, dtype=torch.float32, device=keys.device)
    if out.numel() == 0:
        return out
    valid = _as_bytes(valid)
    meta = norm_meta(length, d)
    _token_norm_kernel[(b * h, triton.cdiv(length, meta["BLOCK_L"]))](
        keys, valid, out, *keys.stride(), *valid.stride(), h, length, d, **meta
    )
    return out


def channel_key_norms(keys: Tensor, valid: Tensor) -> Tensor:
    """keys [B, H, L, D] -> ||K[:, c]|| over each head's valid slots [B, H, D] (float32)."""
    b, h, length, d = keys.shape
    out = torch.zeros(b, h, d, dtype=torch.float32, device=keys.device)
    if b * h * d == 0 or length == 0:
        return out
    valid = _as_bytes(valid)
    meta = norm_meta(length, d)
    _channel_norm_kernel[(b * h, triton.cdiv(d, meta["BLOCK_D"]))](
        keys, valid, out, *keys.stride(), *valid.stride(), h, length, d, **meta
    )
    return out
