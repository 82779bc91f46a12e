"""Gate keys in bounded chunks: how a dealer ships a batch of any size, and how a party derives its part of it.

A batch is `count` gates of one kind on n-bit inputs (a comparison batch, a lookup batch), numbered `batch` within
a session. It is cut into chunks of at most CHUNK gates; chunk j's randomness for party b comes from its own stream,
AesStream(seed_b, stream=batch * 2^24 + j) (root seeds, then mask shares: masked.draw_party). So

* the dealer generates the batch chunk by chunk (`gen_chunks`): its memory is one chunk's keys whatever the batch
  size, and it can regenerate any chunk on its own (a pure function of the two seeds, the batch and the chunk);
* a party derives chunk j's keys (`derive_chunk`) from its seed and the chunk's correction words, which are the
  same bytes for both parties (`Corrections.to_bytes`, `chunk_bytes` per chunk on the wire);
* evaluation runs chunk by chunk too (`split`): no concatenated whole-batch key is ever built.

Who learns what is as for one gate (compare.py, lut.py): the dealer its own randomness; a party its root seeds,
mask shares and the corrections (pseudorandom on their own), then the opened masked values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mpcache.mpc.fss.compare import CompareKey, compare_gen
from mpcache.mpc.fss.lut import LutKey, lut_gen
from mpcache.mpc.fss.masked import GateKey
from mpcache.mpc.fss.prg import AesStream
from mpcache.mpc.fss.tree import Corrections

CHUNK = 1 << 14  # gates per chunk: ~12 MB of comparison corrections at n = 32 (one gRPC message, one keygen pass)
CHUNK_BITS = 24  # chunk numbers per batch in the stream number: batches up to 2^24 chunks (2^38 gates)
MAX_BATCH = 1 << (64 - CHUNK_BITS)
GATES = {"compare": (compare_gen, CompareKey), "lut": (lut_gen, LutKey)}


def chunk_bounds(count: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of a batch of `count` gates."""
    if not isinstance(count, int | np.integer) or count < 0:
        raise ValueError(f"a key batch holds a non-negative number of gates, got {count!r}")
    if -(-count // chunk) > 1 << CHUNK_BITS:
        raise ValueError(f"a key batch of {count} gates exceeds {(1 << CHUNK_BITS) * chunk}")
    return [(c0, min(count, c0 + chunk)) for c0 in range(0, count, chunk)]


def chunk_stream(seed: bytes, batch: int, chunk: int) -> AesStream:
    """Party randomness of chunk `chunk` of key batch `batch` (see the module docstring)."""
    if not 0 <= batch < MAX_BATCH:
        raise ValueError(f"key batch number {batch} must be in [0, 2^{64 - CHUNK_BITS})")
    if not 0 <= chunk < 1 << CHUNK_BITS:
        raise ValueError(f"chunk number {chunk} must be in [0, 2^{CHUNK_BITS})")
    return AesStream(seed, stream=(batch << CHUNK_BITS) | chunk)


def _gate(kind: str):
    if kind not in GATES:
        raise ValueError(f"unknown gate kind {kind!r}; expected one of {sorted(GATES)}")
    return GATES[kind]


def gen_chunk(kind: str, n: int, seeds: tuple[bytes, bytes], batch: int, chunk: int, size: int):
    """Dealer: both parties' keys of one chunk of `size` gates (a pure function of its arguments)."""
    gen, _ = _gate(kind)
    return gen(n, size, chunk_stream(seeds[0], batch, chunk), chunk_stream(seeds[1], batch, chunk))


def gen_chunks(kind: str, n: int, count: int, seeds: tuple[bytes, bytes], batch: int) -> Iterator[tuple]:
    """Dealer: (chunk number, party 0's keys, party 1's keys) of every chunk of a batch, one chunk at a time."""
    for j, (c0, c1) in enumerate(chunk_bounds(count)):
        yield (j, *gen_chunk(kind, n, seeds, batch, j, c1 - c0))


def derive_chunk(kind: str, party: int, n: int, seed: bytes, batch: int, chunk: int, size: int, cw) -> GateKey:
    """Party: its keys of one chunk from its own seed and the chunk's corrections (a Corrections or its bytes),
    which must hold exactly `size` gates of the kind and width the party asked for."""
    _, cls = _gate(kind)
    key = cls.derive(party, n, chunk_stream(seed, batch, chunk), cw)
    if key.count != size:
        raise ValueError(f"chunk {chunk} of key batch {batch} holds {key.count} gates, expected {size}")
    return key


def chunk_bytes(kind: str, n: int, size: int) -> int:
    """Wire size of one chunk's corrections (what each party receives per chunk)."""
    gen, cls = _gate(kind)
    cls.check_width(n)
    key_bits = cls.key_bits(n)
    leaf_bits = _leaf_bits(kind, key_bits)
    return Corrections.message_size(cls.KIND, key_bits, leaf_bits, size)


def batch_bytes(kind: str, n: int, count: int) -> int:
    """Corrections bytes of a whole batch (every chunk's message): the dealer's traffic to EACH party."""
    return sum(chunk_bytes(kind, n, c1 - c0) for c0, c1 in chunk_bounds(count))


def _leaf_bits(kind: str, key_bits: int) -> int:
    from mpcache.mpc.fss import dcf, lut

    return min(key_bits, dcf.LEAF_BITS) if kind == "compare" else lut.LEAF_BITS[key_bits]


def split(flat: np.ndarray, keys: Sequence[GateKey]) -> list[np.ndarray]:
    """A flat vector cut into the pieces the chunk keys cover, in order."""
    sizes = [k.count for k in keys]
    if sum(sizes) != flat.size:
        raise ValueError(f"{flat.size} values for key chunks of {sum(sizes)} gates")
    return np.split(flat, np.cumsum(sizes)[:-1]) if keys else []
