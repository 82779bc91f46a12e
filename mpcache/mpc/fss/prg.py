"""Pseudorandom generators for function secret sharing: fixed-key AES in Matyas-Meyer-Oseas mode, and a seeded
AES-CTR stream for the dealer's randomness.

Who sees what: nothing here is secret by itself. The two fixed AES keys are public constants (every party and
the dealer use the same ones); secrecy comes from the 127-bit seeds they are applied to. A tree seed is known to
the party that holds it and to the dealer, who made it; the other party only sees values derived from it
through the PRG.

PRG. G_K(b) = E_K(b) xor b (Matyas-Meyer-Oseas over a fixed-key permutation E_K, AES-128), for a whole batch of
16-byte blocks in ONE AES-ECB call through the `cryptography` package (OpenSSL, AES-NI/VAES: 3-4x10^8 blocks/s
per core on this machine). Blocks are numpy uint64 arrays of shape (..., 2), low word first (the 16 bytes of a
block in little-endian order). In a tree node's block the lsb is the control bit t and the other 127 bits are
the seed; the children are G under SEED_KEY of (block xor path bit), the node's output words G under VALUE_KEY
of the same input (so a party evaluating one path builds one input block per element and level). Security rests
on the usual assumption of FSS implementations (EzPC's LLAMA, Google's distributed_point_functions) that
fixed-key AES behaves as a random permutation: outputs on unknown, high-entropy inputs look uniform.

Stream. `AesStream(seed, stream=i)` is AES-CTR keyed by the seed (16 or 32 bytes) starting at counter block
(i, 0): a deterministic generator of bytes, uint64 words, n-bit values and tree seeds. The dealer keeps one seed
per party; a party that knows its seed replays its own stream and derives its own root seeds and mask shares
(masked.draw_party), so only the correction words travel from the dealer.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Two public fixed keys (any constants work; these are "nothing up my sleeve"): SEED_KEY expands a node's seed
# into its children, VALUE_KEY into its output words. The same input block under the two keys gives independent
# outputs, so a party evaluating one path builds ONE input block per element and level and runs both keys on it.
SEED_KEY, VALUE_KEY = 0, 1
FIXED_KEYS = tuple(hashlib.sha256(b"mpcache fss fixed-key AES-128 MMO v1 %d" % k).digest()[:16] for k in (0, 1))
SEED_MASK = np.array([~np.uint64(1), ~np.uint64(0)], dtype=np.uint64)  # clears a block's lsb (the t bit)

_local = threading.local()


def _ecb(key: int):
    """This thread's fixed-key AES-ECB encryptors (OpenSSL contexts are not shared across threads)."""
    encs = getattr(_local, "encs", None)
    if encs is None:
        encs = _local.encs = [Cipher(algorithms.AES(k), modes.ECB()).encryptor() for k in FIXED_KEYS]
    return encs[key]


def permute(blocks: np.ndarray, key: int = SEED_KEY, out: np.ndarray | None = None) -> np.ndarray:
    """E_K(b) for every 16-byte block of a C-contiguous uint64 array of shape (..., 2): ONE AES-ECB call.

    The caller completes Matyas-Meyer-Oseas by xoring the input back (only into the words it needs). `out`: an
    optional uint64 scratch buffer of at least blocks.size + 2 words (hot loops reuse one; OpenSSL wants room
    for one block more than it writes); the result is a view of it."""
    if blocks.dtype != np.uint64 or blocks.shape[-1:] != (2,) or not blocks.flags.c_contiguous:
        raise ValueError(f"blocks must be C-contiguous uint64 of shape (..., 2), got {blocks.dtype} {blocks.shape}")
    if out is None:
        out = np.empty(blocks.size + 2, dtype=np.uint64)
    _ecb(key).update_into(blocks.reshape(-1).view(np.uint8), out.view(np.uint8))
    return out[: blocks.size].reshape(blocks.shape)


def mmo(blocks: np.ndarray, key: int = SEED_KEY) -> np.ndarray:
    """E_K(b) xor b for every block (..., 2): the fixed-key PRG G_K."""
    out = permute(blocks, key)
    out ^= blocks
    return out


def as_seeds(seeds: np.ndarray | bytes, count: int | None = None) -> np.ndarray:
    """Seeds as a C-contiguous uint64 (count, 2) array with cleared lsb, from (count, 16) uint8, (count, 2) uint64
    or raw bytes."""
    if isinstance(seeds, bytes | bytearray | memoryview):
        seeds = np.frombuffer(bytes(seeds), dtype=np.uint8)
        if seeds.size % 16:
            raise ValueError(f"seed bytes must be a multiple of 16, got {seeds.size}")
        seeds = seeds.reshape(-1, 16)
    seeds = np.asarray(seeds)
    if seeds.dtype == np.uint8 and seeds.ndim == 2 and seeds.shape[1] == 16:
        seeds = np.ascontiguousarray(seeds).view("<u8").astype(np.uint64)
    elif not (seeds.dtype == np.uint64 and seeds.ndim == 2 and seeds.shape[1] == 2):
        raise ValueError(f"seeds must be uint8 (N, 16) or uint64 (N, 2), got {seeds.dtype} {seeds.shape}")
    if count is not None and seeds.shape[0] != count:
        raise ValueError(f"expected {count} seeds, got {seeds.shape[0]}")
    return np.ascontiguousarray(seeds & SEED_MASK)


def new_seed() -> bytes:
    """A fresh 128-bit seed from the OS (the dealer's per-party, per-session secret)."""
    return secrets.token_bytes(16)


class AesStream:
    """Deterministic random values: AES-CTR keyed by `seed`, counter blocks (stream, 0), (stream, 1), ...

    Draws are sequential: the same seed, stream number and sequence of calls give the same values. Different
    stream numbers give independent streams (use one per tuple batch, e.g. the dealer's tuple index).
    """

    def __init__(self, seed: bytes, stream: int = 0) -> None:
        if not isinstance(seed, bytes | bytearray) or len(seed) not in (16, 32):
            raise ValueError("an AesStream seed is 16 (or 32) bytes")
        if not 0 <= stream < 1 << 64:
            raise ValueError(f"stream number {stream} must be in [0, 2^64)")
        self._enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(struct.pack(">QQ", stream, 0))).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._enc.update(bytes(n))

    def uint64(self, count: int) -> np.ndarray:
        """`count` uniform uint64 words."""
        return np.frombuffer(self.bytes(8 * count), dtype="<u8").astype(np.uint64)

    def bits(self, count: int, n: int) -> np.ndarray:
        """`count` uniform n-bit values (uint64), 1 <= n <= 64."""
        if not 1 <= n <= 64:
            raise ValueError(f"bit width {n} must be in 1..64")
        return self.uint64(count) & low_mask(n)

    def seeds(self, count: int) -> np.ndarray:
        """`count` tree seeds: uint64 (count, 2) with cleared lsb."""
        return self.uint64(2 * count).reshape(count, 2) & SEED_MASK


def low_mask(n: int) -> np.uint64:
    """2^n - 1 as a uint64 (n in 0..64)."""
    return np.uint64((1 << n) - 1)
