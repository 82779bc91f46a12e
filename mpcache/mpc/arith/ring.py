"""Ring arithmetic shared by the protocols (numerics) and the dealer, without CrypTen: int64 shares are elements
of Z_2^64, and a dealer builds the same tuples the in-process provider does from these pure functions.

- Exact truncation's tuple (r, floor(r / d), msb(r)) for a random ring element r (`truncation_derived`,
  `truncation_tuple`); numerics.exact_truncate_ is the protocol that consumes it.
- The leading block of a weight-stationary mask (`mask_block`): an append-only operand multiplies with the first
  rows of its mask B only (numerics.GrowingOperand), and the dealer derives its tuples from the same block.
- The products of a weight-stationary mask (`FIXED_PRODUCTS`): C = op(A, B) as both the dealer and the
  in-process provider compute it ("matmul_t": A @ B^T, a tied LM head reading the embedding table's mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TRUNC_OFFSET = 1 << 62  # added before opening so the value is non-negative and below 2^63
MAX_DIVISOR = 1 << 62


def pow2_divmod(exponent: int, d: int | Tensor) -> tuple[int | Tensor, int | Tensor]:
    """(floor(2^exponent / d) mod 2^64 as int64, 2^exponent mod d) for exponent in {63, 64}, 2 <= d < 2^62."""
    if isinstance(d, int):
        q, r = divmod(1 << exponent, d)
        return _wrap_int64(q), r
    q, r = (1 << 62) // d, (1 << 62) % d
    for _ in range(exponent - 62):  # double: 2^(k+1) = 2 q d + 2 r, and 2 r < 2 d fits in int64
        carry = (2 * r >= d).long()
        q, r = 2 * q + carry, 2 * r - carry * d
    return q, r


def _wrap_int64(v: int) -> int:
    """Python int -> the int64 with the same value mod 2^64."""
    return ((v + (1 << 63)) % (1 << 64)) - (1 << 63)


def unsigned_floordiv(v: Tensor, divisor: int | Tensor) -> Tensor:
    """floor(u / divisor) where u in [0, 2^64) is the unsigned reading of the int64 tensor `v`, 1 <= d < 2^62."""
    if isinstance(divisor, int) and divisor == 1:
        return v.clone()
    t = v ^ torch.iinfo(torch.int64).min  # t = u - 2^63, exact in int64
    q, rem = torch.div(t, divisor, rounding_mode="floor"), torch.remainder(t, divisor)
    high_q, high_rem = pow2_divmod(63, divisor)
    return q + high_q + (rem + high_rem >= divisor).long()


def truncation_derived(r: Tensor, divisor: int | Tensor) -> Tensor:
    """The derived half of an exact-truncation tuple for the random ring element r: stack(floor(r/d), msb(r))."""
    return torch.stack([unsigned_floordiv(r, divisor), (r < 0).long()])


def truncation_tuple(seed: int, shape: Sequence[int], divisor: int | Tensor) -> tuple[Tensor, Tensor]:
    """Plaintext tuple (r, stack(floor(r/d), msb(r))): a pure function of (seed, shape, divisor)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-(1 << 63), (1 << 63) - 1, tuple(shape), generator=g, dtype=torch.long)
    return r, truncation_derived(r, divisor)


def check_divisor(divisor: int | Tensor) -> None:
    bad = (divisor < 1) | (divisor >= MAX_DIVISOR)
    if bool(torch.as_tensor(bad).any()):
        raise ValueError(f"truncation divisor must lie in [1, 2^62), got {divisor}")


def check_mask_block(mask_shape: Sequence[int], block: Sequence[int]) -> None:
    """ValueError unless `block` is a leading block of a FIXED_MASK of `mask_shape`: same rank, every dim <= the
    mask's. A FIXED_MUL / FIXED_MATMUL tuple then uses B[:block[0], :block[1], ...] (an append-only operand such
    as a KV cache holds a mask for its capacity and multiplies by the rows it has so far)."""
    mask_shape, block = tuple(mask_shape), tuple(block)
    if len(block) != len(mask_shape) or any(b > m for b, m in zip(block, mask_shape)):
        raise ValueError(f"block {block} is not a leading block of the mask of shape {mask_shape}")


def mask_block(mask: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """The leading block B[:block[0], :block[1], ...] of a mask (B itself when the shapes agree)."""
    if tuple(mask.shape) == tuple(block):
        return mask
    check_mask_block(mask.shape, block)
    return mask[tuple(slice(0, n) for n in block)]


def _matmul_t(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b.transpose(-1, -2))


FIXED_PRODUCTS = {"mul": torch.mul, "matmul": torch.matmul, "matmul_t": _matmul_t}
