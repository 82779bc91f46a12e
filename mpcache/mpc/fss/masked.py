"""The one online message of an FSS gate: a party's masked share, reduced mod 2^n.

Party b holds an additive share x_b of x in Z_2^64 and a share r_b of the dealer's mask r in Z_2^n. It sends
y_b = (x_b + r_b) mod 2^n, ceil(n/8) bytes per element (`open_bytes`); both parties reconstruct
y = (y_0 + y_1) mod 2^n = (x + r) mod 2^n. Reducing a share mod 2^n gives a share of x mod 2^n, so this is exact
for any x; y is uniform whatever x is (r is uniform and unknown to the parties), so the opening reveals nothing.
The gate's keys are then evaluated on y.

What a party gets from the dealer, per gate: its root seed and its mask share are DERIVED from the seed it shares
with the dealer (`draw_party` on its AesStream: the dealer replays both parties' streams to build the keys); only
the correction words travel, and they are the same bytes for both parties. A dealer that prefers not to share
seeds can ship the whole key instead (CompareKey.to_bytes / LutKey.to_bytes: + 16 B root + 8 B mask share).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mpcache.mpc.fss.prg import AesStream, low_mask
from mpcache.mpc.fss.tree import Corrections, Key

_GATE = struct.Struct("<4sBQ")  # magic, n, count


def draw_party(stream: AesStream, count: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A party's randomness for `count` gates on n-bit inputs, in this order from its stream: root seeds
    (count, 2) uint64 with a clear lsb, then mask shares (count,) uint64 < 2^n. The dealer calls it on both
    parties' streams; a party calls it on its own."""
    return stream.seeds(count), stream.bits(count, n)


def as_shares(x, what: str = "share") -> np.ndarray:
    """Integer shares (int64 / uint64 / smaller ints, any shape) as a flat uint64 vector (Z_2^64, wrapping)."""
    x = np.asarray(x)
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array (int64 shares), got dtype {x.dtype}")
    return np.ascontiguousarray(x.reshape(-1).astype(np.uint64, copy=False))


def mask(x_share, r_share: np.ndarray, n: int) -> np.ndarray:
    """This party's message y_b = (x_b + r_b) mod 2^n (uint64, x_share's shape)."""
    flat = as_shares(x_share)
    if flat.size != r_share.size:
        raise ValueError(f"share has {flat.size} elements but the key batch has {r_share.size}")
    return ((flat + r_share) & low_mask(n)).reshape(np.shape(x_share))


def reconstruct(y0, y1, n: int) -> np.ndarray:
    """y = (y_0 + y_1) mod 2^n from the two messages (uint64)."""
    a, b = np.asarray(y0), np.asarray(y1)
    if a.shape != b.shape:
        raise ValueError(f"messages of shapes {a.shape} and {b.shape} do not match")
    return (a.astype(np.uint64) + b.astype(np.uint64)) & low_mask(n)


def message_bytes(n: int) -> int:
    """Bytes per element of one party's opening message."""
    return (n + 7) // 8


def open_bytes(y: np.ndarray, n: int) -> bytes:
    """The wire form of a message: ceil(n/8) little-endian bytes per element."""
    words = np.ascontiguousarray(np.asarray(y, dtype=np.uint64).reshape(-1), dtype="<u8")
    return words.view(np.uint8).reshape(-1, 8)[:, : message_bytes(n)].tobytes()


def from_open_bytes(data: bytes, n: int, count: int) -> np.ndarray:
    """Inverse of open_bytes; refuses a message of the wrong length or with bits above n."""
    width = message_bytes(n)
    if len(data) != width * count:
        raise ValueError(f"opening message of {len(data)} bytes, expected {count} x {width}")
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(count, width)
    y = padded.view("<u8").reshape(-1).astype(np.uint64)
    if n < 64 and count and int(y.max()) >> n:
        raise ValueError(f"opening message has values >= 2^{n}")
    return y


@dataclass(frozen=True, eq=False)
class GateKey:
    """Party `key.party`'s keys for a batch of one-round gates on n-bit masked values: its mask shares and its
    FSS key. Subclasses (compare.CompareKey, lut.LutKey) say which FSS key goes with n."""

    n: int
    mask_share: np.ndarray  # r_b, uint64 (count,) < 2^n
    key: Key

    KIND: ClassVar[str] = ""

    @staticmethod
    def check_width(n: int) -> None:  # the gate's allowed input widths
        raise NotImplementedError

    @staticmethod
    def key_bits(n: int) -> int:  # the FSS key's input width for gate width n
        raise NotImplementedError

    def __post_init__(self) -> None:
        self.check_width(self.n)
        cw = self.key.cw
        if cw.kind != self.KIND or cw.n != self.key_bits(self.n):
            raise ValueError(f"a {type(self).__name__} on {self.n}-bit inputs needs a {self.key_bits(self.n)}-bit "
                             f"{self.KIND} key, got a {cw.n}-bit {cw.kind}")
        if self.mask_share.shape != (self.key.count,):
            raise ValueError(f"{self.mask_share.size} mask shares for {self.key.count} keys")

    @property
    def party(self) -> int:
        return self.key.party

    @property
    def count(self) -> int:
        return self.key.count

    def slice(self, start: int, stop: int):
        return type(self)(self.n, self.mask_share[start:stop], self.key.slice(start, stop))

    @classmethod
    def derive(cls, party: int, n: int, stream: AesStream, cw: Corrections | bytes):
        """Party: its keys from its own stream (root seeds, mask shares: draw_party) and the correction words
        received from the dealer (a Corrections or its bytes)."""
        cls.check_width(n)
        if not isinstance(cw, Corrections):
            cw = Corrections.from_bytes(cw)
        root, r = draw_party(stream, cw.count, n)
        return cls(n, r, Key(party, root, cw))

    def to_bytes(self) -> bytes:
        """The whole key, for a dealer that ships it instead of letting the party derive its part: 8 (mask
        share) + 16 (root) bytes per element more than the corrections alone."""
        shares = np.ascontiguousarray(self.mask_share, dtype="<u8").tobytes()
        return _GATE.pack(b"FSSG", self.n, self.count) + shares + self.key.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview):
        data = memoryview(data).cast("B")
        if len(data) < _GATE.size:
            raise ValueError("gate key message too short")
        magic, n, count = _GATE.unpack_from(data)
        end = _GATE.size + 8 * count
        if magic != b"FSSG" or len(data) < end:
            raise ValueError("not a gate key message (bad magic or truncated)")
        shares = np.frombuffer(data[_GATE.size : end], "<u8").astype(np.uint64)
        return cls(n, shares, Key.from_bytes(data[end:]))
