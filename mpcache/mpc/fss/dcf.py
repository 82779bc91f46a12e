"""Distributed comparison functions (DCF), batched: keys for f(x) = beta * [x < alpha] + offset over n-bit x.

Construction: Boyle, Chandran, Gilboa, Gupta, Ishai, Kumar, Rathee, "Function Secret Sharing for Mixed-Mode and
Fixed-Point Secure Computation" (EUROCRYPT 2021), Fig. 1 (the DCF with per-level output corrections; EzPC's
LLAMA implements the same scheme), with three changes that do not alter what a key reveals:
* the last `leaf_bits` levels are replaced by one leaf expansion into 2^leaf_bits words with a vector correction
  (early termination; at the default leaf_bits = 2 the key is 24 B smaller than the full tree's and a party
  evaluates 3 AES blocks fewer);
* an additive `offset` is part of every level's target, so a comparison gate gets r's top bit folded in for free
  (compare.py);
* the control bit t lives in the lsb of the node block, and the right child's t correction is stored as its
  xor with the left one's (1 bit instead of 2 per level).

Who learns what. The dealer runs `dcf_gen`: it knows alpha, beta, offset and both roots (its own randomness; it
never sees an input). Party b gets Key(b, root_b, cw): its root seed and the correction words `cw`, the same for
both parties. Each of (root_b, cw) alone is pseudorandom and independent of (alpha, beta, offset)
(tests/test_fss.py checks the distribution of cw for different thresholds). Party b runs `dcf_eval` on PUBLIC
points (masked, opened values) and gets an additive share in Z_2^64; the two shares sum to f(x).

Cost per element and tree level: the dealer encrypts 8 AES blocks (2 parties x {keep, lose child} x {seed key,
value key}); a party encrypts 2 (the child on its path under both keys). One AES-ECB call per key, level and
chunk of tree.CHUNK elements; the path is followed with numpy masks, never a per-element Python loop.
Corrections per element: (n - leaf_bits) * (24 B + 1 bit) + 8 * 2^leaf_bits B; plus a 16-byte root per party
(derived from the party's seed, or shipped with the key).
"""

from __future__ import annotations

import numpy as np

from mpcache.mpc.fss.prg import VALUE_KEY, permute
from mpcache.mpc.fss.tree import (
    Corrections,
    Key,
    as_ring,
    chunks,
    eval_walk,
    evaluate,
    gen_walk,
    leaf_corrections,
    leaf_output,
    path_bits,
    start_gen,
)

LEAF_BITS = 2  # default early termination: the smallest key (bench/fss.py measures 1..4)


def dcf_gen(n: int, alpha, root0, root1, beta=1, offset=0, leaf_bits: int = LEAF_BITS) -> tuple[Key, Key]:
    """Keys of f(x) = beta * [x < alpha] + offset (mod 2^64) for a batch of n-bit thresholds `alpha`.

    alpha: N unsigned n-bit integers (any shape, flattened). root0, root1: the parties' root seeds, uint64 (N, 2)
    or uint8 (N, 16) (normally drawn from each party's AesStream, so the party can derive its own). beta, offset:
    scalars or N integers, taken mod 2^64. leaf_bits is capped at n. Returns (party 0's key, party 1's key),
    which share one Corrections object.
    """
    cw, alpha, roots, beta = start_gen("dcf", n, alpha, root0, root1, beta, leaf_bits)
    offset = as_ring(offset, alpha.size, "offset")
    for c0, c1 in chunks(alpha.size):
        _gen_chunk(cw, c0, c1, roots[:, c0:c1], alpha[c0:c1], beta[c0:c1], offset[c0:c1])
    return Key(0, roots[0], cw), Key(1, roots[1], cw)


def _gen_chunk(cw: Corrections, c0: int, c1: int, roots, alpha, beta, offset) -> None:
    """The seed walk with, per level, the output words of both children under VALUE_KEY (tree.gen_walk): leaving
    alpha's path to the lose side at level i must total target_i = beta * [the lose child is the left one] +
    offset; then the leaf corrections, against the sum `acc` of the outputs along the path."""
    lo, hi, acc = gen_walk(cw, c0, c1, roots, alpha, (beta, offset))
    index = np.arange(1 << cw.leaf_bits, dtype=np.uint64)
    below = (index[None, :] < (alpha & np.uint64(index.size - 1))[:, None]).astype(np.uint64)
    cw.leaves[c0:c1] = leaf_corrections(lo, hi, cw.leaf_bits, (beta[:, None] & -below) + offset[:, None] - acc[:, None])


def dcf_eval(key: Key, x) -> np.ndarray:
    """Party key.party's additive shares (int64, Z_2^64) of beta*[x < alpha] + offset at public n-bit points x.

    x: N unsigned n-bit integers (any shape; the output has x's shape).
    """
    return evaluate(key, x, _eval_chunk)


def _eval_chunk(key: Key, c0: int, c1: int, x: np.ndarray) -> np.ndarray:
    acc = np.zeros(c1 - c0, dtype=np.uint64)
    value_buf, tmp = np.empty(2 * (c1 - c0) + 2, np.uint64), np.empty(c1 - c0, np.uint64)
    values = key.cw.values

    def add_value(i: int, inp: np.ndarray, tm: np.ndarray) -> None:
        value = permute(inp, VALUE_KEY, value_buf)
        np.bitwise_xor(value[:, 0], inp[:, 0], out=tmp)
        np.add(acc, tmp, out=acc)
        np.bitwise_and(values[i, c0:c1], tm, out=tmp)
        np.add(acc, tmp, out=acc)

    lo, hi = eval_walk(key, c0, c1, path_bits(x, key.cw.n, key.cw.depth), add_value)
    return acc + leaf_output(key, c0, c1, lo, hi, x & np.uint64(key.cw.leaves.shape[1] - 1))
