"""Distributed point functions (DPF), batched: keys for f(x) = beta * [x == alpha] over n-bit x, outputs in Z_2^64.

Construction: Boyle, Gilboa, Ishai, "Function Secret Sharing: Improvements and Extensions" (CCS 2016), the
GGM-tree DPF with one seed correction and two control-bit corrections per level, with early termination: the
last `leaf_bits` levels are one leaf expansion into 2^leaf_bits 64-bit words with a vector correction. Outputs are
additive shares in Z_2^64 (not bits): a lookup table then takes ONE online round (lut.py). Bit outputs would let
a leaf cover 128 points, but their shares are XOR shares, and turning the looked-up value back into an
arithmetic share costs a second round (SIGMA's sign fix-up); here every leaf word carries 64 pseudorandom bits.

Who learns what: as for the DCF (dcf.py). The dealer knows alpha, beta and both roots; party b holds its root and
the corrections, identical for both parties, and learns nothing about alpha or beta from them; it evaluates on
public points and gets an additive share.

Point evaluation: 1 AES block per level + 1 for the leaf word. Full-domain evaluation (`dpf_eval_all`, n <= 20):
2 blocks per internal node and 2^leaf_bits / 2 per leaf, level by level over all nodes of a chunk of keys.
Corrections per element: (n - leaf_bits) * (16 B + 1 bit) + 8 * 2^leaf_bits B.
"""

from __future__ import annotations

import numpy as np

from mpcache.mpc.fss.prg import SEED_KEY, permute
from mpcache.mpc.fss.tree import (
    ONE,
    Key,
    chunks,
    eval_walk,
    evaluate,
    gen_walk,
    leaf_corrections,
    leaf_output,
    leaf_words,
    path_bits,
    start_gen,
)

LEAF_BITS = 2  # point evaluation: the smallest key
MAX_FULL_DOMAIN = 20  # full-domain evaluation materializes 2^n words per key
FULL_CHUNK_WORDS = 1 << 18  # keys per full-domain pass: about this many output words (2 MiB) at a time


def dpf_gen(n: int, alpha, root0, root1, beta=1, leaf_bits: int = LEAF_BITS) -> tuple[Key, Key]:
    """Keys of f(x) = beta * [x == alpha] (mod 2^64) for a batch of n-bit points `alpha`.

    Arguments as for dcf.dcf_gen. Returns (party 0's key, party 1's key), which share one Corrections object.
    """
    cw, alpha, roots, beta = start_gen("dpf", n, alpha, root0, root1, beta, leaf_bits)
    index = np.arange(1 << cw.leaf_bits, dtype=np.uint64)
    for c0, c1 in chunks(alpha.size):
        a = alpha[c0:c1]
        lo, hi, _ = gen_walk(cw, c0, c1, roots[:, c0:c1], a)
        hit = (index[None, :] == (a & np.uint64(index.size - 1))[:, None]).astype(np.uint64)
        cw.leaves[c0:c1] = leaf_corrections(lo, hi, cw.leaf_bits, beta[c0:c1, None] & -hit)
    return Key(0, roots[0], cw), Key(1, roots[1], cw)


def dpf_eval(key: Key, x) -> np.ndarray:
    """Party key.party's additive shares (int64) of beta * [x == alpha] at public n-bit points x (any shape)."""
    return evaluate(key, x, _point_chunk)


def _point_chunk(key: Key, c0: int, c1: int, x: np.ndarray) -> np.ndarray:
    lo, hi = eval_walk(key, c0, c1, path_bits(x, key.cw.n, key.cw.depth))
    return leaf_output(key, c0, c1, lo, hi, x & np.uint64(key.cw.leaves.shape[1] - 1))


def dpf_eval_all(key: Key, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Party key.party's shares of beta * e_alpha over the whole domain: uint64 (stop - start, 2^n), row k is
    key k's vector in natural order (entry j is the share of beta * [j == alpha_k]). Unsigned (Z_2^64 words) so
    that lut.py can multiply-accumulate without casts; view as int64 for signed shares. n <= MAX_FULL_DOMAIN."""
    cw = key.cw
    if cw.n > MAX_FULL_DOMAIN:
        raise ValueError(f"full-domain evaluation is for n <= {MAX_FULL_DOMAIN}, got n={cw.n}")
    stop = cw.count if stop is None else stop
    if not 0 <= start <= stop <= cw.count:
        raise ValueError(f"key range {start}:{stop} outside 0:{cw.count}")
    out = np.empty((stop - start, 1 << cw.n), dtype=np.uint64)
    step = max(1, FULL_CHUNK_WORDS >> cw.n)
    for c0 in range(start, stop, step):
        c1 = min(stop, c0 + step)
        out[c0 - start : c1 - start] = _eval_all_chunk(key, c0, c1)
    if key.party:
        np.negative(out, out=out)
    return out


def _eval_all_chunk(key: Key, c0: int, c1: int) -> np.ndarray:
    """Expand every node of keys c0..c1-1 level by level. Arrays are (keys, nodes): the nodes of a key stay in
    natural order, so the leaf words come out as the (keys, 2^n) result without a transpose, and per-key
    corrections broadcast along the contiguous node axis."""
    cw = key.cw
    lo, hi = key.start(c0, c1)
    lo, hi = lo[:, None], hi[:, None]
    for i in range(cw.depth):
        keys, nodes = lo.shape
        inp = np.empty((keys, nodes, 2, 2), dtype=np.uint64)  # key, node, child, word
        inp[:, :, 0, 0] = lo
        np.bitwise_xor(lo, ONE, out=inp[:, :, 1, 0])
        inp[:, :, 0, 1] = hi
        inp[:, :, 1, 1] = hi
        child = permute(inp, SEED_KEY)
        child ^= inp
        tm = -(lo & ONE)
        scw_lo, scw_hi = cw.seeds[i, 0, c0:c1, None], cw.seeds[i, 1, c0:c1, None]
        child[:, :, 0, 0] ^= scw_lo & tm
        child[:, :, 1, 0] ^= (scw_lo ^ cw.delta[i, c0:c1, None]) & tm
        corr_hi = scw_hi & tm
        child[:, :, 0, 1] ^= corr_hi
        child[:, :, 1, 1] ^= corr_hi
        lo, hi = child[..., 0].reshape(keys, 2 * nodes), child[..., 1].reshape(keys, 2 * nodes)
    words = leaf_words(lo, hi, cw.leaf_bits)  # (keys, leaves, W)
    words += cw.leaves[c0:c1, None, :] & -(lo & ONE)[:, :, None]
    return words.reshape(c1 - c0, 1 << cw.n)
