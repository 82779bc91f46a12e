"""Scores of chunks and keys from key summaries: the torch references and the Triton kernels.

- `page_bound`: Quest's criticality of a page with per-channel key bounds kmax/kmin, the upper bound
  sum_i max(q_i kmax_i, q_i kmin_i) of q . k inside the page's box.
- `approx_similarity`: MPCache's linearised cluster score q . (alpha kmax + (1 - alpha) kmin)
  (`cluster_representatives`).
- `token_key_norms`: ||k|| of every stored slot (0 for invalid ones), a key-norm score.
- `channel_scores`: ThinK's channel criterion, the window queries' channel norms times ||K[:, c]|| over a
  head's valid slots.

Each takes `use_kernels` (default False: the torch reference, what the methods compute). The kernels: one
`_chunk_score_kernel` for both chunk scores, one program per (row, query, chunk block), looping over channels,
so the [G, C, D] products are never materialised; `_token_norm_kernel` and `_channel_norm_kernel` for the
norms. Loads are cast to float32 (the interpreter mishandles bf16 arithmetic); outputs are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mpcache.kernels.runtime import runs_on, tl, triton

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


def triton_chunk_scores(queries: Tensor, kmax: Tensor, kmin: Tensor, mode: int, alpha: float = 0.0) -> Tensor:
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


def triton_token_key_norms(keys: Tensor, valid: Tensor) -> Tensor:
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


def triton_channel_key_norms(keys: Tensor, valid: Tensor) -> Tensor:
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


# ------------------------------------------------------------------------- entry points
def page_bound(queries: Tensor, kmax: Tensor, kmin: Tensor, use_kernels: bool = False) -> Tensor:
    """Quest criticality: queries [B, H, G, D], page bounds [B, H, C, D] -> [B, H, G, C],
    an upper bound of q . k for every key inside the page's [kmin, kmax] box (float32 from the kernel)."""
    _check_chunks(queries, kmax, kmin)
    if use_kernels and runs_on(queries, kmax, kmin):
        return triton_chunk_scores(queries, kmax, kmin, QUEST)
    q = queries[:, :, :, None, :]
    return torch.maximum(q * kmax[:, :, None], q * kmin[:, :, None]).sum(-1)


def cluster_representatives(kmax: Tensor, kmin: Tensor, alpha: float) -> Tensor:
    """alpha r_max + (1 - alpha) r_min per cluster [B, H, C, D]: the one vector a query meets."""
    return alpha * kmax + (1.0 - alpha) * kmin


def approx_similarity(query: Tensor, kmax: Tensor, kmin: Tensor, alpha: float, use_kernels: bool = False) -> Tensor:
    """MPCache's linearised cluster score: query [B, H, D] x clusters [B, H, C, D] -> [B, H, C]
    (float32 from the kernel)."""
    if query.dim() != 3:
        raise ValueError(f"query must be [B, H, D], got {tuple(query.shape)}")
    _check_chunks(query[:, :, None], kmax, kmin)
    if use_kernels and runs_on(query, kmax, kmin):
        return triton_chunk_scores(query[:, :, None], kmax, kmin, LINEAR, alpha)[:, :, 0]
    return torch.einsum("bhd,bhcd->bhc", query, cluster_representatives(kmax, kmin, alpha))


def _check_chunks(queries: Tensor, kmax: Tensor, kmin: Tensor) -> None:
    if queries.dim() != 4 or kmax.dim() != 4 or kmax.shape != kmin.shape:
        raise ValueError(
            f"need queries [B, H, G, D] and kmax/kmin [B, H, C, D] alike, got "
            f"{tuple(queries.shape)}, {tuple(kmax.shape)}, {tuple(kmin.shape)}"
        )
    if queries.shape[:2] != kmax.shape[:2] or queries.shape[3] != kmax.shape[3]:
        raise ValueError(f"queries {tuple(queries.shape)} and chunks {tuple(kmax.shape)} differ in B, H or D")


def token_key_norms(keys: Tensor, valid: Tensor, use_kernels: bool = False) -> Tensor:
    """||k|| of every slot [B, H, L] (float32), 0 where `valid` [B, H, L] is False."""
    _check_keys(keys, valid)
    if use_kernels and runs_on(keys, valid):
        return triton_token_key_norms(keys, valid.contiguous())
    return torch.linalg.vector_norm(keys.float(), dim=-1) * valid


def channel_scores(window_queries: Tensor, keys: Tensor, valid: Tensor, use_kernels: bool = False) -> Tensor:
    """ThinK's criterion per KV head and channel [B, Hkv, D]: window_queries [B, Hkv, N, D]
    (the group's window queries stacked), keys [B, Hkv, L, D] with `valid` [B, Hkv, L]; with
    use_kernels the key-channel norms over the valid slots come from the kernel."""
    _check_keys(keys, valid)
    if use_kernels and runs_on(keys, valid):
        return window_queries.norm(dim=2) * triton_channel_key_norms(keys, valid.contiguous())
    return window_queries.norm(dim=2) * (keys * valid[..., None]).norm(dim=2)


def _check_keys(keys: Tensor, valid: Tensor) -> None:
    if keys.dim() != 4 or valid.shape != keys.shape[:3]:
        raise ValueError(f"need keys [B, H, L, D] and valid [B, H, L], got {tuple(keys.shape)}, {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
