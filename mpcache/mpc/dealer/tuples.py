"""Tuple specs and seeds: the dealer's math, shared by the dealer service and the parties' tuple provider.

Seed scheme (the wire format and draw order are specified in protos/mpcache.proto, "Party <-> dealer"):
* `Register` gives party i a fresh random 256-bit seed s_i for the session (once). Party i expands it locally with
  a keyed stream cipher (AES-256-CTR, key = SHA-256 of domain, session, rank and s_i: `party_key`), one counter
  block per (tuple index, part) (`stream`), so a tuple's shares are a pure function of (seed, index, spec).
* For every tuple each party draws its own shares of the random inputs (a, b / r / rB: `random_shares`); parties
  >= 1 also draw their share of the derived value (c = op(a, b), r^2, wraps, the arithmetic bit: `derived_share`).
  The dealer replays all parties' streams, computes the derived value in the clear (`derived_value`) and sends
  party 0 only its correction share c0 = c - sum_{i>=1} c_i (`correction`).

The gRPC service that serves seeds and corrections is mpcache/mpc/dealer/service.py; the CrypTen side (a
TupleProvider that draws the same streams) is mpcache/mpc/dealer/provider.py.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mpcache.mpc.arith.ring import FIXED_PRODUCTS, MAX_DIVISOR, mask_block, truncation_derived
from mpcache.mpc.transport import wire
from mpcache.mpc.transport.proto import mpcache_pb2 as pb

WORLD_SIZE = 2  # computing parties; the dealer is not counted
MAX_STREAM_ELEMENTS = 1 << 30  # locally drawn shares (8 GiB): beyond that a request is a bug, not a workload
MAX_CORRECTION_ELEMENTS = 1 << 24  # one correction tensor (128 MiB) must fit a GetTuples reply with room to spare

BEAVER_OPS = {
    pb.BEAVER_MUL: "mul",
    pb.BEAVER_MATMUL: "matmul",
    pb.BEAVER_CONV1D: "conv1d",
    pb.BEAVER_CONV2D: "conv2d",
    pb.BEAVER_CONV_TRANSPOSE1D: "conv_transpose1d",
    pb.BEAVER_CONV_TRANSPOSE2D: "conv_transpose2d",
}
OP_KINDS = {op: kind for kind, op in BEAVER_OPS.items()}
FIXED_OPS = {pb.FIXED_MUL: "mul", pb.FIXED_MATMUL: "matmul", pb.FIXED_MATMUL_T: "matmul_t"}  # ring.FIXED_PRODUCTS
CONV_KINDS = set(BEAVER_OPS) - {pb.BEAVER_MUL, pb.BEAVER_MATMUL}


# ---------------------------------------------------------------------------------------------------------------
# Tuple specs and the keyed stream
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One tuple's public description: kind (a pb.TupleKind), operand shapes, conv kwargs, bit length, and for
    EXACT_TRUNCATION the public divisor(s) as (shape, flat values) so the spec stays hashable."""

    kind: int
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...] = ()
    conv: tuple[tuple[str, int | tuple[int, ...]], ...] = ()
    bitlength: int = 64
    divisor: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    mask_tuple: int | None = None  # FIXED_MUL / FIXED_MATMUL: tuple number of the FIXED_MASK B (a leading block)

    def __post_init__(self) -> None:
        if self.kind not in pb.TupleKind.values() or self.kind == pb.TUPLE_KIND_UNSPECIFIED:
            raise ValueError(f"unknown tuple kind {self.kind}")
        for shape in (self.shape_a, self.shape_b):
            if any((not isinstance(d, int)) or d < 0 for d in shape):
                raise ValueError(f"tuple shape {shape} must be non-negative integers")
        if not 1 <= self.bitlength <= 64:
            raise ValueError(f"bitlength {self.bitlength} must be in 1..64")
        if self.conv and self.kind not in CONV_KINDS:
            raise ValueError(f"conv parameters given for non-convolution tuple kind {pb.TupleKind.Name(self.kind)}")
        if (self.kind in FIXED_OPS) != (self.mask_tuple is not None):
            raise ValueError("a mask tuple number goes with FIXED_MUL / FIXED_MATMUL tuples and only with them")
        if self.mask_tuple is not None and self.mask_tuple < 0:
            raise ValueError(f"mask tuple number {self.mask_tuple} must be >= 0")
        if (self.kind == pb.EXACT_TRUNCATION) != bool(self.divisor[1]):
            raise ValueError("a divisor goes with EXACT_TRUNCATION tuples and only with them")
        if self.divisor[1]:
            d_shape, values = self.divisor
            if len(values) != int(np.prod(d_shape, dtype=np.int64)):
                raise ValueError(f"divisor has {len(values)} values for shape {d_shape}")
            if not all(1 <= v < MAX_DIVISOR for v in values):
                raise ValueError(f"truncation divisors must lie in [1, 2^62), got {min(values)}..{max(values)}")
            if _broadcast(self.shape_a, d_shape) != self.shape_a:
                raise ValueError(f"divisor of shape {d_shape} does not broadcast to the tuple shape {self.shape_a}")

    @classmethod
    def truncation(cls, shape: Sequence[int], divisor: int | torch.Tensor) -> Spec:
        """EXACT_TRUNCATION tuple for dividing a shared tensor of `shape` by a public integer (or int tensor)."""
        if isinstance(divisor, torch.Tensor):
            if divisor.dtype.is_floating_point or divisor.dtype == torch.bool:
                raise ValueError(f"truncation divisor must be an integer tensor, got {divisor.dtype}")
            d = (tuple(divisor.shape), tuple(int(v) for v in divisor.reshape(-1).tolist()))
        elif isinstance(divisor, int) and not isinstance(divisor, bool):
            d = ((), (divisor,))
        else:
            raise TypeError(f"truncation divisor must be an int or an integer tensor, got {type(divisor).__name__}")
        return cls(pb.EXACT_TRUNCATION, tuple(shape), divisor=d)

    @classmethod
    def fixed(cls, op: str, shape_a: Sequence[int], mask_shape: Sequence[int], mask_tuple: int) -> Spec:
        """(A, op(A, B)) for the weight-stationary mask B drawn as tuple number `mask_tuple`; `mask_shape` may be a
        leading block of B's shape (`check_mask_block`), for an operand that grows into its mask."""
        kinds = {v: k for k, v in FIXED_OPS.items()}
        if op not in kinds:
            raise ValueError(f"unsupported weight-stationary op {op!r}; expected one of {sorted(kinds)}")
        return cls(kinds[op], tuple(shape_a), tuple(mask_shape), mask_tuple=mask_tuple)

    def divisor_value(self) -> int | torch.Tensor:
        shape, values = self.divisor
        return values[0] if shape == () else torch.tensor(values, dtype=torch.int64).reshape(shape)

    @classmethod
    def beaver(cls, op: str, shape_a: Sequence[int], shape_b: Sequence[int], **conv) -> Spec:
        if op not in OP_KINDS:
            raise ValueError(f"unsupported Beaver op {op!r}; expected one of {sorted(OP_KINDS)}")
        conv_items = tuple(sorted((k, tuple(v) if isinstance(v, list | tuple) else int(v)) for k, v in conv.items()))
        for key, _ in conv_items:
            if key not in _CONV_FIELDS:
                raise ValueError(f"unsupported {op} argument {key!r}; expected one of {_CONV_FIELDS}")
        return cls(OP_KINDS[op], tuple(shape_a), tuple(shape_b), conv_items)

    @property
    def name(self) -> str:
        return pb.TupleKind.Name(self.kind)

    def random_parts(self) -> list[tuple[tuple[int, ...], int, bool]]:
        """(shape, bits, xor_shared) of the random inputs every party draws, in draw order."""
        if self.kind in BEAVER_OPS:
            return [(self.shape_a, 64, False), (self.shape_b, 64, False)]
        if self.kind == pb.BINARY_AND:
            return [(self.shape_a, self.bitlength, True), (self.shape_b, self.bitlength, True)]
        if self.kind == pb.B2A_BIT:
            return [(self.shape_a, 1, True)]
        return [(self.shape_a, 64, False)]  # SQUARE, TRUNCATION_PAIR, EXACT_TRUNCATION, FIXED_*

    def derived_shape(self) -> tuple[int, ...]:
        """Shape of the derived value, without arithmetic (meta tensors only for convolutions)."""
        try:
            if self.kind in (pb.BEAVER_MUL, pb.BINARY_AND, pb.FIXED_MUL):
                return _broadcast(self.shape_a, self.shape_b)
            if self.kind in (pb.BEAVER_MATMUL, pb.FIXED_MATMUL):
                return _matmul_shape(self.shape_a, self.shape_b)
            if self.kind == pb.FIXED_MATMUL_T:
                return _matmul_shape(self.shape_a, (*self.shape_b[:-2], *self.shape_b[-2:][::-1]))
            if self.kind in CONV_KINDS:
                a = torch.empty(self.shape_a, device="meta")
                b = torch.empty(self.shape_b, device="meta")
                return tuple(getattr(torch, BEAVER_OPS[self.kind])(a, b, **dict(self.conv)).shape)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"{self.name}: shapes {self.shape_a} and {self.shape_b} do not fit: {e}") from None
        if self.kind == pb.EXACT_TRUNCATION:
            return (2, *self.shape_a)
        if self.kind == pb.FIXED_MASK:
            return (0,)  # nothing derived: B is the sum of the parties' own draws
        return self.shape_a

    def derived_xor(self) -> bool:
        return self.kind == pb.BINARY_AND

    def correction_numel(self) -> int:
        """Elements of the derived value, i.e. of party 0's correction on the wire."""
        return int(np.prod(self.derived_shape(), dtype=np.int64))

    def check_size(self) -> None:
        """ValueError if a share to draw or the correction to send is beyond the limits above."""
        for shape, _, _ in self.random_parts():
            if int(np.prod(shape, dtype=np.int64)) > MAX_STREAM_ELEMENTS:
                raise ValueError(f"{self.name} share of shape {shape} exceeds {MAX_STREAM_ELEMENTS} elements")
        if self.correction_numel() > MAX_CORRECTION_ELEMENTS:
            raise ValueError(
                f"{self.name} correction of shape {self.derived_shape()} exceeds {MAX_CORRECTION_ELEMENTS} elements; "
                "split the operation"
            )

    def to_pb(self) -> pb.TupleSpec:
        msg = pb.TupleSpec(kind=self.kind, shape_a=self.shape_a, shape_b=self.shape_b, bitlength=self.bitlength)
        for key, value in self.conv:
            if key == "groups":
                msg.conv.groups = value
            else:
                getattr(msg.conv, key).extend(value if isinstance(value, tuple) else (value,))
        if self.divisor[1]:
            msg.divisor.CopyFrom(wire.tensor_to_proto(torch.tensor(self.divisor[1]).reshape(self.divisor[0])))
        if self.mask_tuple is not None:
            msg.mask_tuple = self.mask_tuple
        return msg

    @classmethod
    def from_pb(cls, msg: pb.TupleSpec) -> Spec:
        conv = []
        if msg.HasField("conv"):
            for key in _CONV_FIELDS:
                value = getattr(msg.conv, key)
                if key == "groups":
                    if value:
                        conv.append((key, int(value)))
                elif len(value):
                    conv.append((key, tuple(int(v) for v in value)))
        bitlength = msg.bitlength or 64
        if msg.kind in (pb.SQUARE, pb.B2A_BIT, pb.TRUNCATION_PAIR, pb.EXACT_TRUNCATION, pb.FIXED_MASK) and msg.shape_b:
            raise ValueError(f"{pb.TupleKind.Name(msg.kind)} takes one shape, got shape_b={list(msg.shape_b)}")
        if msg.kind == pb.EXACT_TRUNCATION:
            if not msg.HasField("divisor"):
                raise ValueError("EXACT_TRUNCATION needs a divisor")
            return cls.truncation(tuple(msg.shape_a), int64_from_pb(msg.divisor))
        if msg.kind in FIXED_OPS:
            return cls.fixed(FIXED_OPS[msg.kind], tuple(msg.shape_a), tuple(msg.shape_b), int(msg.mask_tuple))
        return cls(msg.kind, tuple(msg.shape_a), tuple(msg.shape_b), tuple(conv), bitlength)


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Broadcast shape of two shapes, in plain Python (torch.broadcast_shapes imports sympy on first use: ~2 s)."""
    out = []
    for x, y in zip(reversed((1,) * (len(b) - len(a)) + a), reversed((1,) * (len(a) - len(b)) + b)):
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """torch.matmul's output shape (its broadcasting rules for 1-D and batched operands)."""
    if not a or not b:
        raise ValueError("matmul operands must have at least one dimension")
    inner_a = a[-1]
    inner_b = b[0] if len(b) == 1 else b[-2]
    if inner_a != inner_b:
        raise ValueError(f"inner dimensions {inner_a} and {inner_b} differ")
    rows = () if len(a) == 1 else (a[-2],)
    cols = () if len(b) == 1 else (b[-1],)
    batch = _broadcast(a[:-2], b[:-2])
    return tuple(batch) + rows + cols


_CONV_FIELDS = ("stride", "padding", "dilation", "groups", "output_padding")


SEED_BYTES = 32  # what the dealer hands out per (session, rank); at least 16 bytes are required


def party_key(seed: bytes | int, session: str, rank: int) -> bytes:
    """AES-256 key of party `rank`'s stream; the seed (SEED_BYTES random bytes from the dealer) is its only secret
    input. An int seed (tests' fixed seeds) stands for its SEED_BYTES-byte big-endian encoding."""
    if isinstance(seed, int):
        seed = seed.to_bytes(SEED_BYTES, "big")
    if not isinstance(seed, bytes) or len(seed) < 16:
        got = f"{len(seed)} bytes" if isinstance(seed, bytes) else repr(seed)
        raise ValueError(f"a dealer seed must be at least 16 bytes, got {got}")
    material = session.encode() + b"\0" + struct.pack(">i", rank) + seed
    return hashlib.sha256(b"mpcache-dealer-v2\0" + material).digest()


def stream(key: bytes, index: int, part: int, shape: Sequence[int], bits: int = 64) -> torch.Tensor:
    """Uniform int64 tensor (or `bits`-bit values when bits < 64) for (tuple index, part) of one party's stream.

    Each (index, part) has its own counter block range, so tuples can be drawn in any order or in parallel.
    """
    n = int(np.prod(shape, dtype=np.int64))
    if n > MAX_STREAM_ELEMENTS:
        raise ValueError(f"tuple tensor of shape {tuple(shape)} exceeds {MAX_STREAM_ELEMENTS} elements")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(struct.pack(">QII", index, part, 0))).encryptor()
    raw = encryptor.update(bytes(8 * n))
    out = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64)).reshape(tuple(shape))
    if bits < 64:
        out &= (1 << bits) - 1
    return out


def random_shares(key: bytes, index: int, spec: Spec) -> list[torch.Tensor]:
    """This party's shares of the tuple's random inputs (a, b / r / rB)."""
    return [stream(key, index, part, shape, bits) for part, (shape, bits, _) in enumerate(spec.random_parts())]


def derived_share(key: bytes, index: int, spec: Spec) -> torch.Tensor:
    """A party >= 1's share of the derived value: pure randomness, the dealer corrects party 0's."""
    bits = spec.bitlength if spec.derived_xor() else 64
    return stream(key, index, len(spec.random_parts()), spec.derived_shape(), bits)


def derived_value(spec: Spec, shares: list[list[torch.Tensor]], mask: torch.Tensor | None = None) -> torch.Tensor:
    """The plaintext derived value from every party's random shares (`shares[rank][part]`) and, for FIXED_*
    tuples, the plaintext mask B (whole: its leading block of shape_b is taken here). Dealer only."""
    parts = []
    for p, (_, _, xor) in enumerate(spec.random_parts()):
        total = shares[0][p].clone()
        for rank_shares in shares[1:]:
            total = total ^ rank_shares[p] if xor else total + rank_shares[p]
        parts.append(total)
    if spec.kind in BEAVER_OPS:
        return getattr(torch, BEAVER_OPS[spec.kind])(parts[0], parts[1], **dict(spec.conv))
    if spec.kind == pb.SQUARE:
        return parts[0] * parts[0]
    if spec.kind == pb.BINARY_AND:
        return parts[0] & parts[1]
    if spec.kind == pb.B2A_BIT:
        return parts[0]
    if spec.kind == pb.FIXED_MASK:
        return torch.empty(0, dtype=torch.int64)
    if spec.kind in FIXED_OPS:
        return FIXED_PRODUCTS[FIXED_OPS[spec.kind]](parts[0], mask_block(mask, spec.shape_b))
    if spec.kind == pb.EXACT_TRUNCATION:
        return truncation_derived(parts[0], spec.divisor_value())
    if spec.kind == pb.TRUNCATION_PAIR:
        from mpcache.mpc.arith.crypten_compat import import_crypten

        import_crypten()  # CrypTen's own definition of the wrap count, so the provider matches its protocol
        from crypten.common.util import count_wraps

        return count_wraps([s[0] for s in shares])
    raise ValueError(f"no derivation for tuple kind {spec.name}")


def fixed_mask_value(keys: Sequence[bytes], mask_tuple: int, shape: Sequence[int]) -> torch.Tensor:
    """The plaintext weight-stationary mask B: the sum of the parties' draws for that FIXED_MASK tuple."""
    mask = stream(keys[0], mask_tuple, 0, shape)
    for key in keys[1:]:
        mask = mask + stream(key, mask_tuple, 0, shape)
    return mask


def correction(
    keys: Sequence[bytes],
    index: int,
    spec: Spec,
    mask: torch.Tensor | None = None,
    mask_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Party 0's share of the derived value: the dealer's whole per-tuple output. FIXED_* tuples take their mask
    B (`fixed_mask_value`) from the caller's cache, or regenerate it from B's whole shape `mask_shape` (default:
    the spec's shape_b; a block's values depend on the whole shape, as B is drawn as one stream)."""
    if spec.kind in FIXED_OPS and mask is None:
        mask = fixed_mask_value(keys, spec.mask_tuple, spec.shape_b if mask_shape is None else mask_shape)
    value = derived_value(spec, [random_shares(k, index, spec) for k in keys], mask)
    for key in keys[1:]:
        other = derived_share(key, index, spec)
        value = value ^ other if spec.derived_xor() else value - other
    return value


# ---------------------------------------------------------------------------------------------------------------
# Tensors on the wire
# ---------------------------------------------------------------------------------------------------------------


def int64_to_pb(t: torch.Tensor) -> pb.Tensor:
    if t.dtype != torch.int64:
        raise TypeError(f"expected an int64 share tensor, got {t.dtype}")
    return wire.tensor_to_proto(t)


def int64_from_pb(msg: pb.Tensor) -> torch.Tensor:
    if msg.dtype != pb.INT64:
        raise wire.WireFormatError(f"expected an INT64 share tensor, got {wire.dtype_name(msg.dtype)}")
    return wire.tensor_from_proto(msg)
