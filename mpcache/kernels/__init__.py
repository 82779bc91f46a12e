"""Triton kernels for the plaintext path's hot loops, each with its torch reference as fallback.

    from mpcache import kernels
    kernels.available()            # CUDA + triton, or TRITON_INTERPRET=1 set before this import
    kernels.enable(model)          # decode steps of `model` use the Triton decode kernel
    out = kernels.decode_attention(q, entry, positions, index=idx, count=n)   # any function: use_kernels=

Every function here takes `use_kernels` (default True) and runs its Triton kernel only
when `available()` and the tensors live where the kernel can run (a CUDA device, or the
CPU under the interpreter); otherwise it calls the existing torch code the kernel is
tested against (`cached_attention`, `page_bound`, `approx_similarity`, `channel_scores`,
`attention_probs`), so the default CPU path is exactly the torch path.

The kernel files (`decode.py`, `scores.py`, `window.py`) import triton, so they are only
imported when kernels are available (then at once, with this package). `TRITON_INTERPRET=1` must be in the environment
before this package is imported: `@triton.jit` reads it when the kernels are defined.
The interpreter is for correctness tests only (~0.5 ms per program, ~1000x slower than
torch); no timing from it means anything.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor, nn

from mpcache.methods import mpcache as mpcache_method
from mpcache.methods import quest, think
from mpcache.model.cache import LayerKV, gather_slots
from mpcache.model.transformer import Attention, attention_probs, cached_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Triton is installed and can run: a CUDA device, or the interpreter (CPU tensors)."""
    return HAS_TRITON and (INTERPRET or torch.cuda.is_available())


if available():  # defined now, while TRITON_INTERPRET is what INTERPRET says (triton costs ~2 s to import)
    from mpcache.kernels import decode, scores, window


def runs_on(*tensors: Tensor) -> bool:
    """Whether the kernels can take these tensors (all on CUDA, or all on CPU under the interpreter)."""
    if not available():
        return False
    device = "cpu" if INTERPRET else "cuda"
    return all(t.device.type == device for t in tensors)


def enable(model: nn.Module, on: bool = True) -> nn.Module:
    """Route the decode steps (one query token) of every attention layer of `model` through
    `decode_attention` (Triton where `runs_on`, else the same torch path); `on=False` undoes it."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.use_kernels = on
    return model


# ------------------------------------------------------------------------- attention
def decode_attention(
    queries: Tensor,
    entry: LayerKV,
    query_positions: Tensor,
    sliding_window: int | None = None,
    index: Tensor | None = None,
    count: Tensor | None = None,
    use_kernels: bool = True,
    num_splits: int | None = None,
) -> Tensor:
    """Attention of queries [B, Hq, T, D] over the cache `entry` (or, given `index` [B, Hkv, K]
    and `count` [B, Hkv], over the first count[b, h] listed slots of each head, as
    `gather_slots` picks them): [B, Hq, T, Dv], as `cached_attention` computes it.

    The Triton kernel handles decode (T = 1); prefill chunks (T > 1) take the torch path.
    num_splits: split-KV ranges per head (default: enough programs to fill the GPU).
    """
    _check_attention(queries, entry, query_positions, index, count)
    if use_kernels and queries.shape[2] == 1 and runs_on(queries, entry.keys):
        return decode.decode_attention(
            queries, entry.keys, entry.values, query_positions, entry.positions.contiguous(),
            entry.valid.contiguous(), entry.lengths, sliding_window, index, count, num_splits,
        )  # fmt: skip
    if index is not None:
        entry = gather_slots(entry, index, count)
    return cached_attention(
        queries, entry.keys, entry.values, query_positions, entry.positions, entry.valid, sliding_window
    )


def _check_attention(
    queries: Tensor, entry: LayerKV, query_positions: Tensor, index: Tensor | None, count: Tensor | None
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


# ----------------------------------------------------------------------------- scores
def page_bound(queries: Tensor, kmax: Tensor, kmin: Tensor, use_kernels: bool = True) -> Tensor:
    """Quest criticality [B, H, G, C] of queries [B, H, G, D] for pages [B, H, C, D]
    (`mpcache.methods.quest.page_bound`), float32 from the kernel."""
    _check_chunks(queries, kmax, kmin)
    if use_kernels and runs_on(queries, kmax, kmin):
        return scores.chunk_scores(queries, kmax, kmin, scores.QUEST)
    return quest.page_bound(queries, kmax, kmin)


def approx_similarity(query: Tensor, kmax: Tensor, kmin: Tensor, alpha: float, use_kernels: bool = True) -> Tensor:
    """MPCache's cluster score [B, H, C] of query [B, H, D] for clusters [B, H, C, D]
    (`mpcache.methods.mpcache.approx_similarity`), float32 from the kernel."""
    if query.dim() != 3:
        raise ValueError(f"query must be [B, H, D], got {tuple(query.shape)}")
    _check_chunks(query[:, :, None], kmax, kmin)
    if use_kernels and runs_on(query, kmax, kmin):
        return scores.chunk_scores(query[:, :, None], kmax, kmin, scores.LINEAR, alpha)[:, :, 0]
    return mpcache_method.approx_similarity(query, kmax, kmin, alpha)


def _check_chunks(queries: Tensor, kmax: Tensor, kmin: Tensor) -> None:
    if queries.dim() != 4 or kmax.dim() != 4 or kmax.shape != kmin.shape:
        raise ValueError(
            f"need queries [B, H, G, D] and kmax/kmin [B, H, C, D] alike, got "
            f"{tuple(queries.shape)}, {tuple(kmax.shape)}, {tuple(kmin.shape)}"
        )
    if queries.shape[:2] != kmax.shape[:2] or queries.shape[3] != kmax.shape[3]:
        raise ValueError(f"queries {tuple(queries.shape)} and chunks {tuple(kmax.shape)} differ in B, H or D")


def token_key_norms(keys: Tensor, valid: Tensor, use_kernels: bool = True) -> Tensor:
    """||k|| of every slot [B, H, L] (float32), 0 where `valid` [B, H, L] is False."""
    _check_keys(keys, valid)
    if use_kernels and runs_on(keys, valid):
        return scores.token_key_norms(keys, valid.contiguous())
    return torch.linalg.vector_norm(keys.float(), dim=-1) * valid


def channel_scores(window_queries: Tensor, keys: Tensor, valid: Tensor, use_kernels: bool = True) -> Tensor:
    """ThinK's channel criterion [B, H, D] (`mpcache.methods.think.channel_scores`): the
    key-channel norms over the valid slots come from the kernel."""
    _check_keys(keys, valid)
    if use_kernels and runs_on(keys, valid):
        return window_queries.norm(dim=2) * scores.channel_key_norms(keys, valid.contiguous())
    return think.channel_scores(window_queries, keys, valid)


def _check_keys(keys: Tensor, valid: Tensor) -> None:
    if keys.dim() != 4 or valid.shape != keys.shape[:3]:
        raise ValueError(f"need keys [B, H, L, D] and valid [B, H, L], got {tuple(keys.shape)}, {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")


def window_attention_sums(
    queries: Tensor,
    keys: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    key_valid: Tensor,
    weights: Tensor,
    sliding_window: int | None = None,
    use_kernels: bool = True,
) -> Tensor:
    """Softmax attention every slot receives from the window queries [B, Hq, W, D], summed
    with `weights` [B, W]: [B, Hkv, G, L] float32 (SnapKV's vote; `PolicyCache.attention_received`)."""
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
    if use_kernels and runs_on(queries, keys):
        return window.window_attention_sums(
            queries, keys, query_positions, key_positions.contiguous(), key_valid.contiguous(), weights.float(),
            sliding_window,
        )  # fmt: skip
    probs = attention_probs(queries, keys, query_positions, key_positions, key_valid, sliding_window)
    return torch.einsum("bhgtl,bt->bhgl", probs, weights.float())


__all__ = [
    "approx_similarity",
    "available",
    "channel_scores",
    "decode_attention",
    "enable",
    "page_bound",
    "runs_on",
    "token_key_norms",
    "window_attention_sums",
]
