"""The dealer's tree walk, one fused pass per level (numba): key generation's cost besides AES.

tree.gen_walk walks both parties' trees down the secret path for a chunk of keys, one level at a time: one AES-ECB
call per key (SEED_KEY for the children, VALUE_KEY for a DCF's output words) on all elements' input blocks, then
everything else of the level (Matyas-Meyer-Oseas xors, seed and control-bit corrections, the DCF's output
correction, both parties' next node, the next level's AES input) in ONE compiled loop over the elements, where
numpy needed ~30 passes over the chunk (bench/results/fss.json: keygen was 0.3-0.7 M/s, the passes, not AES, were
the cost). The arithmetic is exactly tree.py's / dcf.py's (see their docstrings); a key is bit-identical to the
numpy walk's, which tests/test_fss.py keeps as the reference.

Layouts (uint64 unless said): lo, hi (2, C) the parties' node blocks (low word's lsb = control bit t); inp, child,
value (2, C, 2, 2) [party, element, keep/lose child, word], child and value being E_K(inp) before the MMO xor.
"""

from __future__ import annotations

import numba
import numpy as np

ONE = np.uint64(1)
ZERO = np.uint64(0)


@numba.njit(cache=True, nogil=True)
def first_input(lo: np.ndarray, hi: np.ndarray, alpha: np.ndarray, shift: int, inp: np.ndarray) -> None:
    """The first level's AES input: (lo ^ a, hi) for the keep child, (lo ^ a ^ 1, hi) for the lose child, with
    a = bit `shift` of alpha (the path)."""
    s = np.uint64(shift)
    for p in range(2):
        for e in range(lo.shape[1]):
            x = lo[p, e] ^ ((alpha[e] >> s) & ONE)
            inp[p, e, 0, 0] = x
            inp[p, e, 1, 0] = x ^ ONE
            inp[p, e, 0, 1] = hi[p, e]
            inp[p, e, 1, 1] = hi[p, e]


@numba.njit(cache=True, nogil=True)
def level(
    inp, child, value, lo, hi, alpha, shift: int, beta, offset, acc, seeds_lo, seeds_hi, delta, values,
    last: bool, dcf: bool,
) -> None:
    """One level for every element, given the level's AES outputs `child` (and `value` for a DCF): the path bit
    a = bit `shift` of alpha; writes the level's corrections (seeds_lo / seeds_hi / delta; for a DCF `values`, so
    that leaving the path to the lose side totals beta * [the lose child is the left one] + offset, accumulating
    the path's outputs in `acc`), steps lo / hi down the path and, unless `last`, writes the next level's input
    blocks into `inp` (the next bit: shift - 1)."""
    s = np.uint64(shift)
    for e in range(lo.shape[1]):
        ae = (alpha[e] >> s) & ONE
        k00 = child[0, e, 0, 0] ^ inp[0, e, 0, 0]  # party 0, keep child, low word (MMO)
        k01 = child[0, e, 0, 1] ^ inp[0, e, 0, 1]
        k10 = child[1, e, 0, 0] ^ inp[1, e, 0, 0]
        k11 = child[1, e, 0, 1] ^ inp[1, e, 0, 1]
        scw_lo = child[0, e, 1, 0] ^ inp[0, e, 1, 0] ^ child[1, e, 1, 0] ^ inp[1, e, 1, 0]  # lose children
        scw_hi = child[0, e, 1, 1] ^ inp[0, e, 1, 1] ^ child[1, e, 1, 1] ^ inp[1, e, 1, 1]
        d = ((k00 ^ k10 ^ scw_lo) & ONE) ^ ONE  # keep child's t correction xor the lose child's
        delta[e] = np.uint8(d)
        seeds_lo[e] = scw_lo ^ (d & (ae ^ ONE))  # lsb := the left child's t correction
        seeds_hi[e] = scw_hi
        tm0 = ZERO - (lo[0, e] & ONE)
        tm1 = ZERO - (lo[1, e] & ONE)
        if dcf:
            v0k = value[0, e, 0, 0] ^ inp[0, e, 0, 0]
            v0l = value[0, e, 1, 0] ^ inp[0, e, 1, 0]
            v1k = value[1, e, 0, 0] ^ inp[1, e, 0, 0]
            v1l = value[1, e, 1, 0] ^ inp[1, e, 1, 0]
            signed = v1l - v0l - acc[e] + (beta[e] & (ZERO - ae)) + offset[e]
            acc[e] = acc[e] + v0k - v1k + signed
            values[e] = (signed ^ tm1) - tm1  # (-1)^t1 * signed
        keep = scw_lo ^ d  # the keep child's seed correction (its t correction in the lsb)
        l0 = (keep & tm0) ^ k00
        h0 = (scw_hi & tm0) ^ k01
        l1 = (keep & tm1) ^ k10
        h1 = (scw_hi & tm1) ^ k11
        lo[0, e], hi[0, e], lo[1, e], hi[1, e] = l0, h0, l1, h1
        if not last:
            an = (alpha[e] >> (s - ONE)) & ONE
            inp[0, e, 0, 0] = l0 ^ an
            inp[0, e, 1, 0] = l0 ^ an ^ ONE
            inp[0, e, 0, 1] = h0
            inp[0, e, 1, 1] = h0
            inp[1, e, 0, 0] = l1 ^ an
            inp[1, e, 1, 0] = l1 ^ an ^ ONE
            inp[1, e, 0, 1] = h1
            inp[1, e, 1, 1] = h1
