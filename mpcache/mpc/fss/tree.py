"""What DCF and DPF keys share: the GGM tree's correction words, their serialization, and the leaf expansion.

A batch of N keys over an n-bit domain is, per element, a binary tree of depth d = n - leaf_bits (the top d bits
of an input pick a path) whose leaves are expanded to W = 2^leaf_bits 64-bit output words (the low leaf_bits
bits pick a word: "early termination"). Party b's key is its root seed plus correction words that are IDENTICAL
for both parties and look uniformly random to each of them alone.

A node's state is a 128-bit block whose least significant bit is the control bit t (the tree's "am I the party
that applies corrections" bit; roots: t = party) and whose other 127 bits are the seed. Children come from the
fixed-key PRG (prg.py) on the block xor the path bit, under SEED_KEY; a DCF's per-node output value comes from
the same input block under VALUE_KEY; leaf words from the leaf block with a tweak in the high word, VALUE_KEY.

Correction words, level-major (level i of a chunk of elements is a contiguous slice), words split into low and
high halves (numpy is several times faster on 1-D arrays than on (N, 2) blocks with per-element masks):

    seeds   (d, 2, N) uint64  seed correction per level; low word's lsb = t correction of the LEFT child  16 B
    delta   (d, N)    uint8   t correction of the right child xor that of the left child                 1 bit
    values  (d, N)    uint64  DCF only: output correction per level                                       8 B
    leaves  (N, W)    uint64  output corrections of the W leaf words                                    8W B

Serialized (`to_bytes`): a 24-byte header, then seeds, values, delta packed 8 per byte, leaves (little-endian).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from mpcache.mpc.fss import fused
from mpcache.mpc.fss.prg import SEED_KEY, VALUE_KEY, as_seeds, permute

MAX_LEAF_BITS = 7
CHUNK = 1 << 13  # elements per depth-first pass: a level's arrays stay in the core's L2 cache (bench/fss.py)
ONE = np.uint64(1)

MAGIC = b"FSS1"
KINDS = {"dcf": 1, "dpf": 2}
_HEADER = struct.Struct("<4sBBBBQQ")  # magic, kind, n, leaf_bits, reserved, count, reserved
_KEY_HEADER = struct.Struct("<BQ")  # party, count


def check_domain(n: int, leaf_bits: int) -> int:
    """Validate an n-bit domain and the early-termination width; return the tree depth n - leaf_bits."""
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 1 <= n <= 64:
        raise ValueError(f"input bit width n={n!r} must be an integer in 1..64")
    if not isinstance(leaf_bits, int | np.integer) or not 1 <= leaf_bits <= min(n, MAX_LEAF_BITS):
        raise ValueError(f"leaf_bits={leaf_bits!r} must be in 1..min(n, {MAX_LEAF_BITS})")
    return int(n) - int(leaf_bits)


def path_bits(x: np.ndarray, n: int, depth: int) -> np.ndarray:
    """(depth, N) uint64: bit i of row i is x's bit n-1-i (the path from the root)."""
    shifts = np.arange(n - 1, n - 1 - depth, -1, dtype=np.uint64)[:, None]
    return (x[None, :] >> shifts) & ONE


def leaf_words(lo: np.ndarray, hi: np.ndarray, leaf_bits: int) -> np.ndarray:
    """All W = 2^leaf_bits output words of every leaf block (lo, hi): uint64 of shape lo.shape + (W,).

    Block k (< W/2) of a leaf is G_VALUE(lo, hi xor (k + 1)); its two words are outputs 2k and 2k + 1."""
    blocks = max(1, (1 << leaf_bits) // 2)
    pairs = np.empty((lo.size, 2), dtype=np.uint64)
    pairs[:, 0], pairs[:, 1] = lo.reshape(-1), hi.reshape(-1)
    inp = np.tile(pairs, (1, blocks))  # every leaf block repeated, (leaves, 2 * blocks): contiguous rows
    inp ^= _leaf_tweaks(blocks)
    out = permute(inp.reshape(-1, 2), VALUE_KEY).reshape(inp.shape)
    out ^= inp
    return out.reshape(*lo.shape, 2 * blocks)


def _leaf_tweaks(blocks: int) -> np.ndarray:
    tw = np.zeros((blocks, 2), dtype=np.uint64)
    tw[:, 1] = np.arange(1, blocks + 1, dtype=np.uint64)
    return tw.reshape(1, 2 * blocks)


def leaf_word(lo: np.ndarray, hi: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Word `index` of each leaf block (1-D lo, hi, index): one AES block per element."""
    inp = np.empty((lo.size, 2), dtype=np.uint64)
    inp[:, 0] = lo
    np.bitwise_xor(hi, (index >> ONE) + ONE, out=inp[:, 1])
    out = permute(inp, VALUE_KEY)
    out ^= inp
    return out[:, 0] ^ ((out[:, 0] ^ out[:, 1]) & -(index & ONE))


FUSED_WALK = True  # the compiled walk (fused.py); False: the numpy reference below (tests compare the two)


def gen_walk(cw: Corrections, c0: int, c1: int, roots: np.ndarray, alpha: np.ndarray, payload=None):
    """The dealer's walk down the secret paths `alpha` (C,) for elements c0..c1-1: both parties' trees at once
    (axis 0 = party).

    roots: (2, C, 2) uint64 seeds with a clear lsb. Fills cw.seeds and cw.delta and returns the two parties' leaf
    blocks (lo, hi), each (2, C), and acc (C,). With `payload` = (beta, offset) (a DCF), also each level's output
    correction cw.values so that leaving the path to the lose side at level i totals beta * [the lose child is
    the left one] + offset; acc is then the sum of the parties' signed outputs along the path (the leaf
    corrections need it). The AES inputs are ordered (keep, lose) per element (keep = the child on the path), so
    nothing needs selecting after the PRG. One AES-ECB call per key and level, then the level's arithmetic in one
    compiled pass (fused.py)."""
    size = c1 - c0
    lo = roots[:, :, 0] | np.array([[0], [1]], dtype=np.uint64)  # t = party at the root
    hi = roots[:, :, 1].copy()
    acc = np.zeros(size, dtype=np.uint64)
    if not FUSED_WALK or cw.depth == 0:
        return (*_reference_walk(cw, c0, c1, lo, hi, alpha, payload, acc), acc)
    dcf = payload is not None
    beta, offset = payload if dcf else (acc, acc)  # a DPF has no per-level outputs
    inp = np.empty((2, size, 2, 2), dtype=np.uint64)
    child_buf, value_buf = np.empty(inp.size + 2, np.uint64), np.empty(inp.size + 2 if dcf else 0, np.uint64)
    fused.first_input(lo, hi, alpha, cw.n - 1, inp)
    for i in range(cw.depth):
        child = permute(inp, SEED_KEY, child_buf)
        value = permute(inp, VALUE_KEY, value_buf) if dcf else child
        fused.level(
            inp, child, value, lo, hi, alpha, cw.n - 1 - i, beta, offset, acc, cw.seeds[i, 0, c0:c1],
            cw.seeds[i, 1, c0:c1], cw.delta[i, c0:c1], cw.values[i, c0:c1] if dcf else acc, i + 1 == cw.depth, dcf,
        )  # fmt: skip
    return lo, hi, acc


def _reference_walk(cw: Corrections, c0: int, c1: int, lo, hi, alpha, payload, acc):
    """gen_walk in numpy passes (the reference the compiled walk is tested against): in-place ops on
    preallocated buffers, 1-D (strided) views only (see the module docstring)."""
    size = c1 - c0
    bits = path_bits(alpha, cw.n, cw.depth)
    target = None if payload is None else (payload[0] & -bits) + payload[1]
    inp = np.empty((2, size, 2, 2), dtype=np.uint64)
    child_buf, value_buf = np.empty(inp.size + 2, np.uint64), np.empty(inp.size + 2, np.uint64)
    tm, scw_lo, delta = np.empty_like(lo), np.empty(size, np.uint64), np.empty(size, np.uint64)
    signed = np.empty(size, np.uint64)
    for i in range(cw.depth):
        a, seeds = bits[i], cw.seeds[i, :, c0:c1]
        np.bitwise_and(lo, ONE, out=tm)
        np.negative(tm, out=tm)
        np.bitwise_xor(lo, a, out=inp[:, :, 0, 0])
        np.bitwise_xor(inp[:, :, 0, 0], ONE, out=inp[:, :, 1, 0])
        inp[:, :, 0, 1] = hi
        inp[:, :, 1, 1] = hi
        child = permute(inp, SEED_KEY, child_buf)
        child ^= inp
        np.bitwise_xor(child[0, :, 1, 0], child[1, :, 1, 0], out=scw_lo)  # lsb: the lose child's t correction
        np.bitwise_xor(child[0, :, 1, 1], child[1, :, 1, 1], out=seeds[1])
        np.bitwise_xor(child[0, :, 0, 0], child[1, :, 0, 0], out=delta)
        delta ^= scw_lo
        delta &= ONE
        delta ^= ONE  # the keep child's t correction xor the lose child's
        cw.delta[i, c0:c1] = delta
        np.bitwise_xor(scw_lo, delta & (a ^ ONE), out=seeds[0])  # lsb := the left child's t correction
        if target is not None:  # both children's output words under VALUE_KEY
            value = permute(inp, VALUE_KEY, value_buf)
            value ^= inp
            np.subtract(value[1, :, 1, 0], value[0, :, 1, 0], out=signed)
            np.subtract(signed, acc, out=signed)
            np.add(signed, target[i], out=signed)
            np.add(acc, value[0, :, 0, 0], out=acc)
            np.subtract(acc, value[1, :, 0, 0], out=acc)
            np.add(acc, signed, out=acc)
            np.bitwise_xor(signed, tm[1], out=cw.values[i, c0:c1])
            cw.values[i, c0:c1] -= tm[1]  # (-1)^t1 * signed
        scw_lo ^= delta  # the keep child's correction
        np.bitwise_and(scw_lo, tm, out=lo)
        lo ^= child[:, :, 0, 0]
        np.bitwise_and(seeds[1], tm, out=hi)
        hi ^= child[:, :, 0, 1]
    return lo, hi


def eval_walk(key: Key, c0: int, c1: int, bits: np.ndarray, on_level=None):
    """A party's walk down the public path `bits` (depth, C) for elements c0..c1-1; returns the leaf block
    (lo, hi). `on_level(i, inp, tm)`: inp (C, 2) = the level's AES input, tm (C,) = all-ones where this party
    applies corrections (the DCF adds its output words there)."""
    cw = key.cw
    lo, hi = key.start(c0, c1)
    corr_lo = cw.seeds[:, 0, c0:c1] ^ (bits & cw.delta[:, c0:c1])  # incl. the t correction of the path's child
    inp = np.empty((c1 - c0, 2), dtype=np.uint64)
    child_buf, tm = np.empty(inp.size + 2, np.uint64), np.empty(c1 - c0, np.uint64)
    for i in range(cw.depth):
        np.bitwise_and(lo, ONE, out=tm)
        np.negative(tm, out=tm)
        np.bitwise_xor(lo, bits[i], out=inp[:, 0])
        inp[:, 1] = hi
        if on_level is not None:
            on_level(i, inp, tm)
        child = permute(inp, SEED_KEY, child_buf)
        child ^= inp
        np.bitwise_and(corr_lo[i], tm, out=lo)
        lo ^= child[:, 0]
        np.bitwise_and(cw.seeds[i, 1, c0:c1], tm, out=hi)
        hi ^= child[:, 1]
    return lo, hi


def leaf_corrections(lo: np.ndarray, hi: np.ndarray, leaf_bits: int, target: np.ndarray) -> np.ndarray:
    """Leaf correction words (C, W) so that, at the secret path's leaf, party 0's words minus party 1's plus the
    correction (applied by the party whose t is 1, sign (-1)^t1) equal `target` (C, W)."""
    words = leaf_words(lo, hi, leaf_bits)  # (2, C, W)
    signed = target - words[0] + words[1]
    neg = -(lo[1] & ONE)[:, None]
    return (signed ^ neg) - neg


def leaf_output(key: Key, c0: int, c1: int, lo: np.ndarray, hi: np.ndarray, low: np.ndarray) -> np.ndarray:
    """A party's (unsigned) leaf contribution at word `low` of each leaf: word + t * correction."""
    leaves = key.cw.leaves
    flat = np.arange(c0, c1, dtype=np.intp) * leaves.shape[1] + low.astype(np.intp)
    return leaf_word(lo, hi, low) + (np.take(leaves.reshape(-1), flat) & -(lo & ONE))


def chunks(count: int):
    """(start, stop) of each depth-first pass over a batch of `count` elements."""
    return ((c0, min(count, c0 + CHUNK)) for c0 in range(0, count, CHUNK))


def start_gen(kind: str, n: int, alpha, root0, root1, beta, leaf_bits: int):
    """Check and prepare a batch of keys to generate: (empty corrections, alpha as uint64, roots (2, N, 2),
    beta as uint64). leaf_bits is capped at n."""
    if isinstance(n, int) and 1 <= n < leaf_bits:
        leaf_bits = n
    check_domain(n, leaf_bits)
    alpha = as_points(alpha, n, what="alpha")
    roots = np.stack([as_seeds(root0, alpha.size), as_seeds(root1, alpha.size)])
    return Corrections.empty(kind, n, leaf_bits, alpha.size), alpha, roots, as_ring(beta, alpha.size, "beta")


def evaluate(key: Key, x, chunk_fn) -> np.ndarray:
    """A party's shares (int64, x's shape) at public points x: chunk_fn(key, c0, c1, points) gives the unsigned
    sums chunk by chunk; party 1's are negated (its outputs count with sign -1)."""
    points = as_points(x, key.cw.n, key.count, what="x")
    out = np.empty(key.count, dtype=np.uint64)
    for c0, c1 in chunks(key.count):
        out[c0:c1] = chunk_fn(key, c0, c1, points[c0:c1])
    if key.party:
        np.negative(out, out=out)
    return out.view(np.int64).reshape(np.shape(x))


def as_points(x, n: int, count: int | None = None, what: str = "input") -> np.ndarray:
    """Flatten integer inputs into a uint64 vector of n-bit values; refuse floats, bools and out-of-range values."""
    x = np.asarray(x)
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.signedinteger) and x.size and x.min() < 0:
        raise ValueError(f"{what} must hold unsigned n-bit values (>= 0); reduce mod 2^{n} first")
    flat = np.ascontiguousarray(x.reshape(-1), dtype=np.uint64)
    if n < 64 and flat.size and int(flat.max()) >> n:
        raise ValueError(f"{what} has values >= 2^{n}")
    if count is not None and flat.size != count:
        raise ValueError(f"{what} has {flat.size} elements but the key batch has {count}")
    return flat


def as_ring(v, count: int, what: str) -> np.ndarray:
    """A scalar or per-element integer payload as a uint64 vector of length count (Z_2^64, wrapping)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return np.full(count, v % (1 << 64), dtype=np.uint64)
    v = np.asarray(v)
    if v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"{what} must be an integer (array), got dtype {v.dtype}")
    if v.ndim == 0:
        return np.full(count, v.astype(np.uint64), dtype=np.uint64)
    if v.size != count:
        raise ValueError(f"{what} has {v.size} elements for a batch of {count}")
    return np.ascontiguousarray(v.reshape(-1).astype(np.uint64))


@dataclass(frozen=True, eq=False)
class Corrections:
    """The public part of a batch of DCF or DPF keys (the same bytes go to both parties)."""

    kind: str
    n: int
    leaf_bits: int
    seeds: np.ndarray
    delta: np.ndarray
    values: np.ndarray | None
    leaves: np.ndarray

    @property
    def depth(self) -> int:
        return self.n - self.leaf_bits

    @property
    def count(self) -> int:
        return self.leaves.shape[0]

    @staticmethod
    def empty(kind: str, n: int, leaf_bits: int, count: int) -> Corrections:
        d = check_domain(n, leaf_bits)
        return Corrections(
            kind,
            n,
            leaf_bits,
            np.empty((d, 2, count), dtype=np.uint64),
            np.empty((d, count), dtype=np.uint8),
            np.empty((d, count), dtype=np.uint64) if kind == "dcf" else None,
            np.empty((count, 1 << leaf_bits), dtype=np.uint64),
        )

    def slice(self, start: int, stop: int) -> Corrections:
        """The corrections of elements start..stop-1 (views, no copy)."""
        values = None if self.values is None else self.values[:, start:stop]
        return Corrections(self.kind, self.n, self.leaf_bits, self.seeds[:, :, start:stop],
                           self.delta[:, start:stop], values, self.leaves[start:stop])

    @staticmethod
    def bytes_per_element(kind: str, n: int, leaf_bits: int) -> float:
        """Serialized size per element, without the 24-byte header (the delta bits are packed across elements)."""
        d = check_domain(n, leaf_bits)
        return d * (16 + (8 if kind == "dcf" else 0) + 1 / 8) + 8 * (1 << leaf_bits)

    @staticmethod
    def message_size(kind: str, n: int, leaf_bits: int, count: int) -> int:
        """Exact length of `to_bytes()` for `count` keys."""
        d = check_domain(n, leaf_bits)
        return _HEADER.size + count * (d * (16 + (8 if kind == "dcf" else 0)) + (8 << leaf_bits)) + (d * count + 7) // 8

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(MAGIC, KINDS[self.kind], self.n, self.leaf_bits, 0, self.count, 0)
        parts = [header, _le(self.seeds)]
        if self.values is not None:
            parts.append(_le(self.values))
        parts += [np.packbits(self.delta, axis=None, bitorder="little").tobytes(), _le(self.leaves)]
        return b"".join(parts)

    @staticmethod
    def from_bytes(data: bytes | bytearray | memoryview) -> Corrections:
        data = memoryview(data).cast("B")
        if len(data) < _HEADER.size:
            raise ValueError(f"FSS key message of {len(data)} bytes is shorter than its header")
        magic, kind_id, n, leaf_bits, _, count, _ = _HEADER.unpack_from(data)
        kinds = {v: k for k, v in KINDS.items()}
        if magic != MAGIC or kind_id not in kinds:
            raise ValueError("not an FSS key message (bad magic or kind)")
        kind = kinds[kind_id]
        d = check_domain(n, leaf_bits)
        sizes = [d * count * 16, d * count * 8 if kind == "dcf" else 0, (d * count + 7) // 8, count * (8 << leaf_bits)]
        if len(data) != _HEADER.size + sum(sizes):
            raise ValueError(
                f"FSS {kind} message for {count} keys of n={n} must be {_HEADER.size + sum(sizes)} bytes, "
                f"got {len(data)}"
            )
        ends = np.cumsum([_HEADER.size, *sizes]).tolist()
        words = lambda i, shape: np.frombuffer(data[ends[i] : ends[i + 1]], "<u8").astype(np.uint64).reshape(shape)  # noqa: E731
        delta = np.unpackbits(np.frombuffer(data[ends[2] : ends[3]], np.uint8), count=d * count, bitorder="little")
        return Corrections(
            kind,
            n,
            leaf_bits,
            words(0, (d, 2, count)),
            delta.reshape(d, count),
            words(1, (d, count)) if kind == "dcf" else None,
            words(3, (count, 1 << leaf_bits)),
        )

    def equals(self, other: Corrections) -> bool:
        if (self.kind, self.n, self.leaf_bits) != (other.kind, other.n, other.leaf_bits):
            return False
        same = lambda a, b: a is b or (a is not None and b is not None and np.array_equal(a, b))  # noqa: E731
        return all(same(getattr(self, f), getattr(other, f)) for f in ("seeds", "delta", "values", "leaves"))


def _le(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<u8").tobytes()


@dataclass(frozen=True, eq=False)
class Key:
    """One party's keys for a batch: its root seeds (N, 2) uint64 with a clear lsb, and the shared corrections."""

    party: int
    root: np.ndarray
    cw: Corrections

    def __post_init__(self) -> None:
        if self.party not in (0, 1):
            raise ValueError(f"party must be 0 or 1, got {self.party!r}")
        if self.root.shape != (self.cw.count, 2) or self.root.dtype != np.uint64:
            raise ValueError(f"root seeds {self.root.dtype} {self.root.shape} do not match {self.cw.count} keys")

    @property
    def count(self) -> int:
        return self.cw.count

    def slice(self, start: int, stop: int) -> Key:
        return Key(self.party, self.root[start:stop], self.cw.slice(start, stop))

    def start(self, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Root blocks (lo, hi) of elements c0..c1-1, the control bit (= party) in lo's lsb."""
        return self.root[c0:c1, 0] | np.uint64(self.party), self.root[c0:c1, 1].copy()

    def to_bytes(self) -> bytes:
        """Party byte, key count (u64), root seeds, corrections: for a dealer that ships roots instead of letting
        the party derive them from its seed (see compare.py)."""
        return _KEY_HEADER.pack(self.party, self.count) + _le(self.root) + self.cw.to_bytes()

    @staticmethod
    def from_bytes(data: bytes | bytearray | memoryview) -> Key:
        data = memoryview(data).cast("B")
        if len(data) < _KEY_HEADER.size:
            raise ValueError("FSS key message too short")
        party, count = _KEY_HEADER.unpack_from(data)
        cw_start = _KEY_HEADER.size + 16 * count
        if len(data) < cw_start:
            raise ValueError(f"FSS key message too short for {count} root seeds")
        root = np.frombuffer(data[_KEY_HEADER.size : cw_start], "<u8").astype(np.uint64).reshape(count, 2)
        cw = Corrections.from_bytes(data[cw_start:])
        if cw.count != count:
            raise ValueError(f"key message has {count} root seeds for {cw.count} corrections")
        return Key(party, root, cw)
