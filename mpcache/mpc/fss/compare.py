"""Secret comparisons with one DCF evaluation and one online round: shares of [x < c], [x <= c], [x > c], [x >= c].

Setting. Parties hold additive shares x_0 + x_1 = x in Z_2^64 of a value known to satisfy |d| < 2^(n-1), where
d = x - c for lt/ge and d = c - x for gt/le (c public; the caller states n and why the bound holds). The dealer
draws a mask r in Z_2^n; each party sends y_b = (d_b + r_b) mod 2^n (ceil(n/8) bytes; masked.py) and both learn
y = (d + r) mod 2^n, uniform whatever d is. Each evaluates its key on y and gets an additive Z_2^64 share of the
result; the shares sum to exactly 0 or 1. What each learns: the dealer only its own randomness (r, the keys);
a party its own shares and y, which is independent of d.

The formula (one (n-1)-bit DCF, no extra share). Write m = n - 1, y = y_top 2^m + y_low and r = r_top 2^m + r_low
(top bit, low m bits). Since |d| < 2^(n-1), [d < 0] is the top bit of d mod 2^n = (y - r) mod 2^n, and
subtracting r from y borrows from the top bit exactly when y_low < r_low, so

    [d < 0] = y_top XOR r_top XOR [y_low < r_low] = y_top XOR w,    w = r_top XOR [y_low < r_low].

w = r_top + (1 - 2 r_top) [y_low < r_low] is a DCF with threshold alpha = r_low, payload beta = 1 - 2 r_top
(= +1 or -1 mod 2^64) and offset r_top (dcf.py folds the offset into its corrections). With y public,
y_top XOR w = w if y_top = 0 else 1 - w: party 0 takes w_0 or 1 - w_0, party 1 w_1 or -w_1. Then lt/gt are
[d < 0] and ge/le are 1 - [d < 0]. The wrap mod 2^n is handled by the borrow term; no second DCF for the wrap
of r + c is needed because c is subtracted before masking. (Same idea as the MSB / signed-comparison gates of
Boyle et al. EUROCRYPT 2021 and LLAMA, PETS 2022.)

Keys. compare_gen (dealer) draws each party's root seeds and mask share from that party's AesStream
(masked.draw_party) and builds the DCF on (n-1)-bit inputs; compare_key (party) derives the same root and mask
share from its own stream and takes the correction words received from the dealer: per comparison
tree.Corrections.bytes_per_element("dcf", n - 1, leaf_bits) bytes, the same bytes to both parties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mpcache.mpc.fss import dcf
from mpcache.mpc.fss.masked import GateKey, as_shares, draw_party, mask, reconstruct
from mpcache.mpc.fss.prg import AesStream, low_mask, new_seed
from mpcache.mpc.fss.tree import as_points

OPS = ("lt", "le", "gt", "ge")


def _check(n: int, op: str) -> None:
    CompareKey.check_width(n)
    if op not in OPS:
        raise ValueError(f"comparison op {op!r} must be one of {OPS}")


@dataclass(frozen=True, eq=False)
class CompareKey(GateKey):
    """Party `key.party`'s keys for a batch of comparisons on n-bit masked values: mask shares r_b and an
    (n-1)-bit DCF of r_top + (1 - 2 r_top) [y_low < r_low]."""

    KIND: ClassVar[str] = "dcf"

    @staticmethod
    def check_width(n: int) -> None:
        if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 2 <= n <= 64:
            raise ValueError(f"comparison bit width n={n!r} must be an integer in 2..64")

    @staticmethod
    def key_bits(n: int) -> int:
        return n - 1


compare_key = CompareKey.derive  # party side: compare_key(party, n, stream, corrections or their bytes)


def compare_gen(
    n: int, count: int, stream0: AesStream, stream1: AesStream, leaf_bits: int = dcf.LEAF_BITS
) -> tuple[CompareKey, CompareKey]:
    """Dealer: keys for `count` comparisons on n-bit masked values, from the parties' streams (party b's roots
    and mask share come from stream_b, as compare_key re-derives them)."""
    _check(n, "lt")
    (root0, r0), (root1, r1) = draw_party(stream0, count, n), draw_party(stream1, count, n)
    r = (r0 + r1) & low_mask(n)
    m = n - 1
    top = r >> np.uint64(m)
    k0, k1 = dcf.dcf_gen(m, r & low_mask(m), root0, root1, beta=np.uint64(1) - (top << np.uint64(1)), offset=top,
                         leaf_bits=leaf_bits)
    return CompareKey(n, r0, k0), CompareKey(n, r1, k1)


def compare_mask(key: CompareKey, x_share, op: str = "lt", c: int = 0) -> np.ndarray:
    """This party's opening message for comparing its share of x with the public c: y_b = (d_b + r_b) mod 2^n,
    d = x - c (lt, ge) or c - x (gt, le); party 0 carries c. uint64 of x_share's shape."""
    _check(key.n, op)
    d = as_shares(x_share).reshape(np.shape(x_share))
    if op in ("gt", "le"):
        d = np.negative(d)
    if key.party == 0 and c:
        d = d + np.uint64(-c % (1 << 64) if op in ("lt", "ge") else c % (1 << 64))
    return mask(d, key.mask_share, key.n)


def compare_eval(key: CompareKey, y, op: str = "lt") -> np.ndarray:
    """This party's additive share (int64, Z_2^64, y's shape) of the comparison, from the opened y."""
    _check(key.n, op)
    points = as_points(y, key.n, key.count, what="opened value")
    m = np.uint64(key.n - 1)
    w = dcf.dcf_eval(key.key, points & low_mask(key.n - 1)).view(np.uint64)
    own = np.uint64(1 - key.party)  # party 0 holds the public constants
    negative = np.where((points >> m).astype(bool), own - w, w)  # share of [d < 0]
    out = negative if op in ("lt", "gt") else own - negative
    return out.view(np.int64).reshape(np.shape(y))


def simulate_compare(
    x0, x1, n: int, op: str = "lt", c: int = 0, seeds: tuple[bytes, bytes] | None = None, check_range: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Dealer + both parties in one process: shares (int64) of the comparison of x = x0 + x1 (Z_2^64) with c.

    With check_range, refuses inputs whose d = x - c (or c - x) lies outside [-2^(n-1), 2^(n-1)) instead of
    returning a wrapped, wrong bit (the simulator sees the plaintext, the parties could not)."""
    _check(n, op)
    a, b = as_shares(x0, "x0"), as_shares(x1, "x1")
    if np.shape(x0) != np.shape(x1):
        raise ValueError(f"share shapes {np.shape(x0)} and {np.shape(x1)} do not match")
    if check_range and n < 64:
        d = (a + b - np.uint64(c % (1 << 64))).view(np.int64)
        d = -d if op in ("gt", "le") else d
        bad = (d < -(1 << (n - 1))) | (d >= 1 << (n - 1))
        if bad.any():
            raise ValueError(f"{int(bad.sum())} of {d.size} compared values lie outside the declared {n}-bit range "
                             f"(|x - c| must be < 2^{n - 1})")
    seeds = seeds or (new_seed(), new_seed())
    k0, k1 = compare_gen(n, a.size, AesStream(seeds[0]), AesStream(seeds[1]))
    y = reconstruct(compare_mask(k0, x0, op, c), compare_mask(k1, x1, op, c), n)
    return compare_eval(k0, y, op), compare_eval(k1, y, op)
