"""Window-attention column sums, what SnapKV, MPCache and ThinK vote with: the torch reference and the Triton kernel.

The softmax attention each cached slot receives from a window of W queries, summed over the window with per-query
weights: [B, Hkv, G, L], i.e. `PolicyCache.attention_received`. The torch reference is
`mpcache.kernels.decode.attention_probs` then a weighted sum over queries; the kernel does it without the [W, L]
probabilities in memory. Two passes: `_row_lse_kernel` finds every query's log-sum-exp over the visible slots
(online, one program per (row, query head, query block)); `_column_sum_kernel` recomputes the scores one slot block
at a time and adds exp(s - lse) x weight over the queries. With `STATS` the same pass also sums p^2 and
-p log(p + 1e-10) per slot (`window_attention_stats`): CAKE's per-head statistics, the variance over the window's
queries (temporal shift) and the entropy (spatial dispersion), without the probabilities in memory. Masking is
`mpcache.kernels.decode.visibility`; a query that sees nothing adds nothing. Dots take bf16/fp16 operands on a GPU
(float32 accumulation); on CPU tensors (the interpreter, which mishandles bf16) everything is cast to float32 on load.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mpcache.kernels.decode import attention_probs
from mpcache.kernels.runtime import runs_on, tl, triton

MIN_BLOCK = 16  # GPU `tl.dot` needs every dimension >= 16


# ------------------------------------------------------------------------------- Triton
@triton.jit
def _scores(
    Q, K, QPOS, KPOS, VALID, b, head, kv, t, slot, window, scale_log2,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_pb, stride_pt, stride_mb, stride_mh, stride_ml,
    n_query, length, head_dim,
    BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Masked scores [BLOCK_T, BLOCK_L] (log2 units, -inf where not visible)."""
    d = tl.arange(0, BLOCK_D)
    q_in, k_in = t < n_query, slot < length
    q_ptr = Q + b * stride_qb + head * stride_qh + t[:, None] * stride_qt + d[None, :] * stride_qd
    q = tl.load(q_ptr, mask=q_in[:, None] & (d[None, :] < head_dim), other=0.0)
    k_ptr = K + b * stride_kb + kv * stride_kh + slot[:, None] * stride_kl + d[None, :] * stride_kd
    k = tl.load(k_ptr, mask=k_in[:, None] & (d[None, :] < head_dim), other=0.0)
    if UPCAST:  # the interpreter: float32 throughout
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    else:  # GPU: bf16/fp16 tensor-core dot, float32 accumulation
        q = q.to(k.dtype)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
    q_pos = tl.load(QPOS + b * stride_pb + t * stride_pt, mask=q_in, other=0)
    meta = b * stride_mb + kv * stride_mh + slot * stride_ml
    k_pos = tl.load(KPOS + meta, mask=k_in, other=0)
    ok = tl.load(VALID + meta, mask=k_in, other=0) != 0
    visible = q_in[:, None] & (k_in & ok)[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _row_lse_kernel(
    Q, K, QPOS, KPOS, VALID, LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_pb, stride_pt, stride_mb, stride_mh, stride_ml,
    n_head, group, n_query, length, head_dim, window, scale_log2,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b * n_head + query head
    b = row // n_head
    head = row % n_head
    kv = head // group
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    for l0 in range(0, length, BLOCK_L):
        slot = l0 + tl.arange(0, BLOCK_L)
        s = _scores(
            Q, K, QPOS, KPOS, VALID, b, head, kv, t, slot, window, scale_log2,
            stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
            stride_pb, stride_pt, stride_mb, stride_mh, stride_ml, n_query, length, head_dim,
            BLOCK_D, HAS_WINDOW, UPCAST,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))  # +inf: exp2(s - lse) = 0
    tl.store(LSE + row * n_query + t, lse, mask=t < n_query)


@triton.jit
def _column_sum_kernel(
    Q, K, QPOS, KPOS, VALID, LSE, WEIGHT, OUT, OUT_SQUARES, OUT_ENTROPY,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_pb, stride_pt, stride_mb, stride_mh, stride_ml,
    stride_wb, stride_wt,
    n_head, group, n_query, length, head_dim, window, scale_log2,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr, STATS: tl.constexpr = False,
):  # fmt: skip
    row = tl.program_id(0)
    b = row // n_head
    head = row % n_head
    kv = head // group
    slot = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros([BLOCK_L], tl.float32)
    squares = tl.zeros([BLOCK_L], tl.float32)
    entropy = tl.zeros([BLOCK_L], tl.float32)
    for t0 in range(0, n_query, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        s = _scores(
            Q, K, QPOS, KPOS, VALID, b, head, kv, t, slot, window, scale_log2,
            stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
            stride_pb, stride_pt, stride_mb, stride_mh, stride_ml, n_query, length, head_dim,
            BLOCK_D, HAS_WINDOW, UPCAST,
        )  # fmt: skip
        lse = tl.load(LSE + row * n_query + t, mask=t < n_query, other=float("inf"))
        w = tl.load(WEIGHT + b * stride_wb + t * stride_wt, mask=t < n_query, other=0.0).to(tl.float32)
        p = tl.exp2(s - lse[:, None])
        acc += tl.sum(p * w[:, None], 0)
        if STATS:
            squares += tl.sum(p * p * w[:, None], 0)
            entropy += tl.sum(-p * tl.log(p + 1e-10) * w[:, None], 0)
    tl.store(OUT + row * length + slot, acc, mask=slot < length)
    if STATS:
        tl.store(OUT_SQUARES + row * length + slot, squares, mask=slot < length)
        tl.store(OUT_ENTROPY + row * length + slot, entropy, mask=slot < length)


def window_meta(n_query: int, length: int, head_dim: int, has_window: bool, upcast: bool) -> dict:
    """Compile-time arguments of both kernels (also what `bench.kernels --compile` builds). Under the
    interpreter (`upcast`) blocks are larger: it pays per program and per operation, not per element."""
    cap_t, cap_l = (128, 128) if upcast else (32, 64)
    return dict(
        BLOCK_T=min(cap_t, max(MIN_BLOCK, triton.next_power_of_2(n_query))),
        BLOCK_L=min(cap_l, max(MIN_BLOCK, triton.next_power_of_2(length))),
        BLOCK_D=max(MIN_BLOCK, triton.next_power_of_2(head_dim)),
        HAS_WINDOW=has_window, UPCAST=upcast, num_warps=4,
    )  # fmt: skip


def triton_window_attention_sums(
    queries: Tensor,
    keys: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_valid: Tensor,
    weights: Tensor,
    sliding_window: int | None = None,
    stats: bool = False,
) -> tuple[Tensor, ...]:
    """sum_t weights[b, t] p_t[l], p_t = softmax(q_t . K / sqrt(D)), for queries [B, Hq, W, D] over
    keys [B, Hkv, L, D]: ([B, Hkv, G, L] float32,); with `stats` also the sums of w p^2 and of
    w (-p log(p + 1e-10))."""
    b, hq, w, d = queries.shape
    hkv, length = keys.shape[1], keys.shape[2]
    group = hq // hkv
    outs = [torch.zeros(b, hq, length, dtype=torch.float32, device=queries.device) for _ in range(3 if stats else 1)]
    if outs[0].numel() == 0 or w == 0:
        return tuple(out.view(b, hkv, group, length) for out in outs)
    lse = torch.empty(b, hq, w, dtype=torch.float32, device=queries.device)
    valid = key_valid.view(torch.uint8) if key_valid.dtype == torch.bool else key_valid
    common = (*queries.stride(), *keys.stride(), *query_positions.stride(), *key_positions.stride())
    shape = (hq, group, w, length, d, sliding_window or 0, math.log2(math.e) / math.sqrt(d))
    meta = window_meta(w, length, d, sliding_window is not None, queries.device.type == "cpu")
    block_t, block_l = meta["BLOCK_T"], meta["BLOCK_L"]
    _row_lse_kernel[(b * hq, triton.cdiv(w, block_t))](
        queries, keys, query_positions, key_positions, valid, lse, *common, *shape, **meta
    )
    _column_sum_kernel[(b * hq, triton.cdiv(length, block_l))](
        queries, keys, query_positions, key_positions, valid, lse, weights, *(outs if stats else outs * 3), *common,
        *weights.stride(), *shape, **meta, STATS=stats,
    )  # fmt: skip
    return tuple(out.view(b, hkv, group, length) for out in outs)


# ------------------------------------------------------------------------- entry point
def window_attention_sums(
    queries: Tensor,
    keys: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_valid: Tensor,
    weights: Tensor,
    sliding_window: int | None = None,
    use_kernels: bool = False,
) -> Tensor:
    """Softmax attention every slot receives from the window queries [B, Hq, W, D], summed
    with `weights` [B, W]: [B, Hkv, G, L] float32 (SnapKV's vote; `PolicyCache.attention_received`).
    use_kernels: the Triton kernel where `runs_on`; otherwise the torch reference."""
    _check_window(queries, keys, query_positions, key_positions, key_valid, weights)
    if use_kernels and runs_on(queries, keys):
        return triton_window_attention_sums(
            queries, keys, query_positions, key_positions.contiguous(), key_valid.contiguous(), weights.float(),
            sliding_window,
        )[0]  # fmt: skip
    probs = attention_probs(queries, keys, query_positions, key_positions, key_valid, sliding_window)
    return torch.einsum("bhgtl,bt->bhgl", probs, weights.float())


def window_attention_stats(
    queries: Tensor,
    keys: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_valid: Tensor,
    weights: Tensor,
    sliding_window: int | None = None,
    use_kernels: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per slot and query head [B, Hkv, G, L], over the window queries [B, Hq, W, D] with `weights` [B, W]:
    (sum w p, sum w p^2, sum w (-p log(p + 1e-10))), float64; the first two give the mean and variance of a slot's
    attention over the queries, the last its entropy terms (CAKE). The reference sums `attention_probs` in
    float64; use_kernels: one pass of the Triton kernel (float32 sums) where `runs_on`."""
    _check_window(queries, keys, query_positions, key_positions, key_valid, weights)
    if use_kernels and runs_on(queries, keys):
        out = triton_window_attention_sums(
            queries, keys, query_positions, key_positions.contiguous(), key_valid.contiguous(), weights.float(),
            sliding_window, stats=True,
        )  # fmt: skip
        return out[0].double(), out[1].double(), out[2].double()
    p = attention_probs(queries, keys, query_positions, key_positions, key_valid, sliding_window).double()
    w = weights.double()[:, None, None, :, None]
    return (p * w).sum(3), (p * p * w).sum(3), (-p * torch.log(p + 1e-10) * w).sum(3)


def _check_window(
    queries: Tensor, keys: Tensor, query_positions: Tensor, key_positions: Tensor, key_valid: Tensor, weights: Tensor
) -> None:
    if queries.dim() != 4 or keys.dim() != 4 or queries.shape[0] != keys.shape[0]:
        shapes = f"{tuple(queries.shape)}, {tuple(keys.shape)}"
        raise ValueError(f"need queries [B, Hq, W, D] and keys [B, Hkv, L, D] with the same B, got {shapes}")
    b, hq, w, d = queries.shape
    hkv, length = keys.shape[1], keys.shape[2]
    if keys.shape[3] != d or hq % hkv:
        raise ValueError(f"keys {tuple(keys.shape)} must share D={d} with the queries, and Hq={hq} divide by Hkv")
    if query_positions.shape != (b, w) or weights.shape != (b, w):
        raise ValueError(f"query_positions and weights must be [B, W] = {(b, w)}")
    if key_positions.shape != (b, hkv, length) or key_valid.shape != (b, hkv, length):
        raise ValueError(f"key_positions and key_valid must be [B, Hkv, L] = {(b, hkv, length)}")
