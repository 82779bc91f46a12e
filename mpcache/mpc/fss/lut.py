"""Secret-shared table lookups with one DPF and one online round: shares of T[x mod 2^n] for public tables T.

Setting. Parties hold additive shares of x in Z_2^64; the table index is x mod 2^n (n <= 16 in practice: a
signed input indexes its two's complement, so T[i] for i >= 2^(n-1) holds the value at i - 2^n). The dealer draws
a mask r in Z_2^n; each party sends y_b = (x_b + r_b) mod 2^n (ceil(n/8) bytes, masked.py), both learn
y = (x + r) mod 2^n, which is uniform whatever x is. The dealer's DPF puts beta = 1 at alpha = -r mod 2^n, so
party b's full-domain vector e_b has e_0 + e_1 = the unit vector at -r, and

    z_b = sum_j e_b[j] * T[(y + j) mod 2^n]   gives   z_0 + z_1 = T[(y - r) mod 2^n] = T[x mod 2^n]

in Z_2^64. Putting the point at -r (rather than r) makes the needed table slice for each element a contiguous
window of the doubled table, T2[y : y + 2^n]. Several tables (shape (2^n, k)) share one key and one opening.
What each learns: the dealer only its randomness; a party y (uniform) and its own output share.

Keys: party b's root and mask share are derived from its AesStream (masked.draw_party); the dealer sends the
DPF corrections, identical for both parties: tree.Corrections.bytes_per_element("dpf", n, leaf_bits) per lookup.
Cost per lookup and party: a full-domain DPF evaluation (2^n output words) and a 2^n-long inner product per table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mpcache.mpc.fss import dpf, fused_lut
from mpcache.mpc.fss.masked import GateKey, as_shares, draw_party, mask, reconstruct
from mpcache.mpc.fss.prg import AesStream, low_mask, new_seed
from mpcache.mpc.fss.tree import as_points

MAX_BITS = 16
# Early termination per input width. Measured (bench/fss.py, lookup leaf-bits sweep): 4 is within ~20% of the
# fastest full-domain evaluation at n = 8..16 (2^(n-4) tree leaves of 16 words each) for 64 B more key than the
# smallest key (leaf_bits = 2); beyond 4 the key doubles per bit for little speed.
LEAF_BITS = {n: min(n, 4) for n in range(1, MAX_BITS + 1)}
FUSED = True  # evaluate with the compiled passes (fused_lut.py); False: dpf_eval_all + numpy (the reference)


@dataclass(frozen=True, eq=False)
class LutKey(GateKey):
    """Party `key.party`'s keys for a batch of lookups on n-bit masked values: mask shares r_b and an n-bit
    DPF with beta = 1 at alpha = -r mod 2^n."""

    KIND: ClassVar[str] = "dpf"

    @staticmethod
    def check_width(n: int) -> None:
        if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 1 <= n <= MAX_BITS:
            raise ValueError(f"lookup table input width n={n!r} must be an integer in 1..{MAX_BITS}")

    @staticmethod
    def key_bits(n: int) -> int:
        return n


lut_key = LutKey.derive  # party side: lut_key(party, n, stream, corrections or their bytes)


def lut_gen(
    n: int, count: int, stream0: AesStream, stream1: AesStream, leaf_bits: int | None = None
) -> tuple[LutKey, LutKey]:
    """Dealer: keys for `count` lookups on n-bit masked values, from the parties' streams."""
    LutKey.check_width(n)
    (root0, r0), (root1, r1) = draw_party(stream0, count, n), draw_party(stream1, count, n)
    alpha = (np.uint64(0) - r0 - r1) & low_mask(n)
    k0, k1 = dpf.dpf_gen(n, alpha, root0, root1, 1, LEAF_BITS[n] if leaf_bits is None else leaf_bits)
    return LutKey(n, r0, k0), LutKey(n, r1, k1)


def lut_mask(key: LutKey, x_share) -> np.ndarray:
    """This party's opening message y_b = (x_b + r_b) mod 2^n (uint64, x_share's shape)."""
    return mask(x_share, key.mask_share, key.n)


def _tables(tables, n: int) -> np.ndarray:
    t = np.asarray(tables)
    if t.dtype == np.bool_ or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tables must be integer (fixed-point int64) arrays, got dtype {t.dtype}")
    if t.ndim not in (1, 2) or t.shape[0] != 1 << n:
        raise ValueError(f"tables must have shape (2^{n},) or (2^{n}, k), got {t.shape}")
    return t.astype(np.uint64)


def lut_eval(key: LutKey, y, tables) -> np.ndarray:
    """This party's additive shares (int64, Z_2^64) of tables[x mod 2^n] from the opened y.

    tables: (2^n,) or (2^n, k) integers (int64 fixed point; taken mod 2^64). Returns y.shape, or y.shape + (k,).
    """
    t = _tables(tables, key.n)
    points = as_points(y, key.n, key.count, what="opened value")
    size = 1 << key.n
    cols = np.ascontiguousarray(t.reshape(size, -1))
    out = np.empty((key.count, cols.shape[1]), dtype=np.uint64)
    step = max(1, dpf.FULL_CHUNK_WORDS >> key.n)
    windows = None
    for c0 in range(0, key.count, step):
        c1 = min(key.count, c0 + step)
        if FUSED:
            out[c0:c1] = fused_lut.lookup_chunk(key.key, c0, c1, points[c0:c1], cols)
            continue
        if windows is None:  # row c of windows[k][y]: T[(y_c + j) mod 2^n] for j = 0..2^n-1
            windows = [np.lib.stride_tricks.sliding_window_view(np.concatenate([col, col]), size) for col in cols.T]
        e = dpf.dpf_eval_all(key.key, c0, c1)  # (C, 2^n), already signed for this party
        for k, win in enumerate(windows):
            rows = win[points[c0:c1]]
            rows *= e
            out[c0:c1, k] = rows.sum(axis=1, dtype=np.uint64)
    shape = np.shape(y) if t.ndim == 1 else (*np.shape(y), cols.shape[1])
    return out.view(np.int64).reshape(shape)


def simulate_lut(x0, x1, n: int, tables, seeds: tuple[bytes, bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dealer + both parties in one process: shares (int64) of tables[(x0 + x1) mod 2^n]."""
    LutKey.check_width(n)
    if np.shape(x0) != np.shape(x1):
        raise ValueError(f"share shapes {np.shape(x0)} and {np.shape(x1)} do not match")
    count = as_shares(x0).size
    seeds = seeds or (new_seed(), new_seed())
    k0, k1 = lut_gen(n, count, AesStream(seeds[0]), AesStream(seeds[1]))
    y = reconstruct(lut_mask(k0, x0), lut_mask(k1, x1), n)
    return lut_eval(k0, y, tables), lut_eval(k1, y, tables)
