"""The dealer: a separate process that hands out correlated randomness (Beaver triples and friends) for 2PC.

Why a dealer: CrypTen's default "trusted first party" lets party 0 generate every triple, so party 0 knows all
masks and could unmask party 1's data. Here a third process, trusted to not collude, makes them instead.

Seed scheme (the wire format and draw order are specified in protos/mpcache.proto, "Party <-> dealer"):
* `Register` gives party i a fresh random seed s_i for the session. Party i expands it locally with a keyed
  stream cipher (AES-256-CTR, key = SHA-256 of domain, session, rank and s_i), one counter block per
  (tuple index, part), so a tuple's shares are a pure function of (seed, index, spec).
* For every tuple each party draws its own shares of the random inputs (a, b / r / rB); parties >= 1 also draw
  their share of the derived value (c = op(a, b), r^2, wraps, the arithmetic bit). The dealer replays all
  parties' streams, computes the derived value in the clear and sends party 0 only its correction share
  c0 = c - sum_{i>=1} c_i. Party 1 talks to the dealer only to register, heartbeat and close.
* The dealer serves every tuple index once, in order (`request_id` must equal the number of tuples already
  served), so a replayed or out-of-step request is refused instead of reusing a mask.

This module holds the tuple math (shared by the dealer and the parties), the gRPC service and its client.
The CrypTen side (a TupleProvider that uses these) is mpcache/mpc/provider.py.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import secrets
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mpcache.mpc import tls, wire
from mpcache.mpc.proto import mpcache_pb2 as pb
from mpcache.mpc.proto import mpcache_pb2_grpc as pb_grpc

log = logging.getLogger("mpcache.dealer")

PROTOCOL_VERSION = 1
WORLD_SIZE = 2  # computing parties; the dealer is not counted
MAX_MESSAGE_BYTES = 256 << 20
MAX_STREAM_ELEMENTS = 1 << 30  # locally drawn shares (8 GiB): beyond that a request is a bug, not a workload
MAX_CORRECTION_ELEMENTS = 1 << 24  # one correction tensor (128 MiB) must fit a GetTuples reply with room to spare
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

BEAVER_OPS = {
    pb.BEAVER_MUL: "mul",
    pb.BEAVER_MATMUL: "matmul",
    pb.BEAVER_CONV1D: "conv1d",
    pb.BEAVER_CONV2D: "conv2d",
    pb.BEAVER_CONV_TRANSPOSE1D: "conv_transpose1d",
    pb.BEAVER_CONV_TRANSPOSE2D: "conv_transpose2d",
}
OP_KINDS = {op: kind for kind, op in BEAVER_OPS.items()}
FIXED_OPS = {pb.FIXED_MUL: "mul", pb.FIXED_MATMUL: "matmul"}  # products with a weight-stationary mask B
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
            from mpcache.mpc.numerics import MAX_DIVISOR  # imported late: numerics loads CrypTen

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


def check_mask_block(mask_shape: Sequence[int], block: Sequence[int]) -> None:
    """ValueError unless `block` is a leading block of a FIXED_MASK of `mask_shape`: same rank, every dim <= the
    mask's. A FIXED_MUL / FIXED_MATMUL tuple then uses B[:block[0], :block[1], ...] (an append-only operand such
    as a KV cache holds a mask for its capacity and multiplies by the rows it has so far)."""
    mask_shape, block = tuple(mask_shape), tuple(block)
    if len(block) != len(mask_shape) or any(b > m for b, m in zip(block, mask_shape)):
        raise ValueError(f"block {block} is not a leading block of the mask of shape {mask_shape}")


def mask_block(mask: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """The leading block B[:block[0], :block[1], ...] of a mask (B itself when the shapes agree)."""
    if tuple(mask.shape) == tuple(block):
        return mask
    check_mask_block(mask.shape, block)
    return mask[tuple(slice(0, n) for n in block)]


def party_key(seed: int, session: str, rank: int) -> bytes:
    """AES-256 key of party `rank`'s stream; the 64-bit seed is its only secret input."""
    return hashlib.sha256(b"mpcache-dealer-v1\0" + session.encode() + b"\0" + struct.pack(">iQ", rank, seed)).digest()


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
        return getattr(torch, FIXED_OPS[spec.kind])(parts[0], mask_block(mask, spec.shape_b))
    if spec.kind == pb.EXACT_TRUNCATION:
        from mpcache.mpc.numerics import truncation_derived  # the tuple's definition lives with its protocol

        return truncation_derived(parts[0], spec.divisor_value())
    if spec.kind == pb.TRUNCATION_PAIR:
        from mpcache.mpc.crypten_compat import import_crypten

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


# ---------------------------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Session:
    name: str
    seeds: list[int]
    keys: list[bytes]
    created: float
    registered: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)
    last_seen: dict[int, float] = field(default_factory=dict)
    served: int = 0  # tuples whose corrections went to party 0
    masks: dict[int, tuple[int, ...]] = field(default_factory=dict)  # FIXED_MASK tuple number -> shape of B
    mask_cache: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # tuple number -> B (LRU)
    mask_cache_bytes: int = 0

    def mask(self, mask_tuple: int, shape: tuple[int, ...], budget: int) -> torch.Tensor:
        """B of a FIXED_MASK tuple: kept in plaintext up to `budget` bytes (least recently used goes first),
        because every product with that weight needs it and regenerating costs two AES streams of its size."""
        if mask_tuple in self.mask_cache:
            self.mask_cache.move_to_end(mask_tuple)
            return self.mask_cache[mask_tuple]
        value = fixed_mask_value(self.keys, mask_tuple, shape)
        size = value.numel() * 8
        if size <= budget:
            while self.mask_cache_bytes + size > budget:
                self.mask_cache_bytes -= self.mask_cache.popitem(last=False)[1].numel() * 8
            self.mask_cache[mask_tuple] = value
            self.mask_cache_bytes += size
        return value

    bytes_to: dict[int, int] = field(default_factory=dict)
    aborted: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> bool:
        return bool(self.aborted) or len(self.closed) == WORLD_SIZE


class DealerService(pb_grpc.DealerServicer, pb_grpc.DealerControlServicer, pb_grpc.HealthServicer):
    """Serves seeds and party-0 corrections; watches party liveness per session.

    `require_roles`: with mutual TLS, the caller's certificate must name the party rank it claims (party0/party1),
    so party 1 cannot fetch party 0's seed or corrections. `party_timeout`: a registered party silent for longer
    aborts its session. `on_session_end(name, error)` is called once per session (error "" = clean close).
    """

    def __init__(
        self,
        *,
        require_roles: bool,
        party_timeout: float = 30.0,
        on_session_end: Callable[[str, str], None] | None = None,
        dealer_id: str = "dealer",
        mask_cache_bytes: int = 1 << 30,
    ) -> None:
        self.require_roles = require_roles
        self.mask_cache_bytes = mask_cache_bytes
        self.party_timeout = party_timeout
        self.on_session_end = on_session_end
        self.dealer_id = dealer_id
        self.sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="dealer-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()

    def settle(self, name: str, timeout: float) -> None:
        """After a session ended, wait (at most `timeout` s) until every party that is still alive has closed, so
        a survivor learns why the session was aborted from its next heartbeat before the dealer goes away."""
        deadline = time.monotonic() + timeout
        with self._lock:
            s = self.sessions.get(name)
        while s is not None and time.monotonic() < deadline:
            now = time.monotonic()
            with s.lock:
                alive = [r for r in s.registered if r not in s.closed and now - s.last_seen[r] <= self.party_timeout]
            if not alive:
                return
            time.sleep(0.05)

    # --- checks shared by the RPCs ---

    def _caller(self, context: grpc.ServicerContext, rank: int) -> None:
        if rank not in range(WORLD_SIZE):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"rank {rank} is not a computing party (0..{WORLD_SIZE - 1})"
            )
        if self.require_roles:
            role = tls.peer_role(context)
            if role != f"party{rank}":
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"certificate of {role!r} may not act as party {rank}")

    def _session(self, context: grpc.ServicerContext, name: str, rank: int) -> _Session:
        with self._lock:
            s = self.sessions.get(name)
        if s is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {name!r}; Register first")
        if rank not in s.registered:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"party {rank} has not registered in session {name!r}")
        if s.aborted:
            context.abort(grpc.StatusCode.ABORTED, f"session {name!r} aborted: {s.aborted}")
        if rank in s.closed:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"party {rank} already closed session {name!r}")
        s.last_seen[rank] = time.monotonic()
        return s

    def _end(self, s: _Session, error: str) -> None:
        if error and not s.aborted:
            s.aborted = error
            log.error("step=abort session %s aborted: %s", s.name, error)
        if self.on_session_end is not None:
            self.on_session_end(s.name, error)

    # --- Dealer ---

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        self._caller(context, request.rank)
        if request.world_size != WORLD_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"world_size {request.world_size}: this dealer serves 2PC")
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version}; this dealer speaks {PROTOCOL_VERSION}",
            )
        if not request.session:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty session id")
        with self._lock:
            s = self.sessions.get(request.session)
            if s is None:
                seeds = [secrets.randbits(64) for _ in range(WORLD_SIZE)]
                keys = [party_key(seed, request.session, r) for r, seed in enumerate(seeds)]
                s = self.sessions[request.session] = _Session(request.session, seeds, keys, time.monotonic())
        with s.lock:
            if s.done:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"session {request.session!r} is over ({s.aborted or 'closed'}); tuples are never reused, "
                    "start a new session id",
                )
            s.registered.add(request.rank)
            s.last_seen[request.rank] = time.monotonic()
            reply = pb.RegisterResponse(seed=s.seeds[request.rank], dealer_id=self.dealer_id)
            s.bytes_to[request.rank] = s.bytes_to.get(request.rank, 0) + reply.ByteSize()
        log.info("step=register session %s: party %d registered", request.session, request.rank)
        return reply

    def GetTuples(self, request: pb.TupleRequest, context: grpc.ServicerContext) -> pb.TupleResponse:
        self._caller(context, request.rank)
        if request.rank != 0:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "only party 0 fetches corrections; other parties use their seed"
            )
        s = self._session(context, request.session, request.rank)
        try:
            specs = [(Spec.from_pb(m), m.count or 1) for m in request.specs]
            total = 0
            for spec, count in specs:
                spec.check_size()
                if count > 1 << 20:
                    raise ValueError(f"count {count} too large")
                total += 8 * count * spec.correction_numel()
            if total > MAX_MESSAGE_BYTES // 2:
                raise ValueError(
                    f"the reply would carry {total} bytes of corrections; ask in batches under {MAX_MESSAGE_BYTES // 2}"
                )
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with s.lock:
            if request.request_id != s.served:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"party 0 is out of step: it consumed {request.request_id} tuples, the dealer served {s.served}",
                )
            out = []
            index = s.served
            masks = dict(s.masks)
            for spec, count in specs:
                for _ in range(count):
                    mask = None
                    if spec.kind == pb.FIXED_MASK:
                        masks[index] = spec.shape_a
                    elif spec.kind in FIXED_OPS:
                        if spec.mask_tuple not in masks:
                            context.abort(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"{spec.name} refers to tuple {spec.mask_tuple}, which is not a FIXED_MASK",
                            )
                        try:
                            check_mask_block(masks[spec.mask_tuple], spec.shape_b)
                        except ValueError as e:
                            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{spec.name}: {e}")
                        mask = s.mask(spec.mask_tuple, masks[spec.mask_tuple], self.mask_cache_bytes)
                    out.append(int64_to_pb(correction(s.keys, index, spec, mask)))
                    index += 1
            s.served, s.masks = index, masks
            reply = pb.TupleResponse(request_id=request.request_id, corrections=out)
            s.bytes_to[0] = s.bytes_to.get(0, 0) + reply.ByteSize()
        return reply

    # --- DealerControl ---

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        self._caller(context, request.rank)
        with self._lock:
            s = self.sessions.get(request.session)
        if s is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {request.session!r}")
        if s.aborted:
            return pb.HeartbeatResponse(aborted=True, reason=s.aborted)
        s.last_seen[request.rank] = time.monotonic()
        return pb.HeartbeatResponse()

    def Close(self, request: pb.CloseRequest, context: grpc.ServicerContext) -> pb.CloseResponse:
        self._caller(context, request.rank)
        with self._lock:
            s = self.sessions.get(request.session)
        if s is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {request.session!r}")
        with s.lock:
            was_done = s.done
            s.closed.add(request.rank)
            reply = pb.CloseResponse(
                tuples_served=s.served if request.rank == 0 else 0, bytes_served=s.bytes_to.get(request.rank, 0)
            )
            if request.error and not s.aborted:
                s.aborted = f"party {request.rank} failed: {request.error}"
            now_done = s.done
        log.info(
            "step=close session %s: party %d closed%s (%d tuples, %d bytes sent to it)",
            s.name,
            request.rank,
            f" with error: {request.error}" if request.error else "",
            reply.tuples_served,
            reply.bytes_served,
        )
        if now_done and not was_done:
            self._end(s, s.aborted)
        return reply

    # --- Health ---

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        with self._lock:
            live = [n for n, s in self.sessions.items() if not s.done]
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, role="dealer", session=",".join(live))

    # --- liveness ---

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.party_timeout / 4)):
            now = time.monotonic()
            with self._lock:
                sessions = [s for s in self.sessions.values() if not s.done]
            for s in sessions:
                with s.lock:
                    if s.done:
                        continue
                    silent = [
                        (r, now - t)
                        for r, t in s.last_seen.items()
                        if r not in s.closed and now - t > self.party_timeout
                    ]
                    # A session where only one party ever showed up is stuck too: name the missing one.
                    missing = [r for r in range(WORLD_SIZE) if r not in s.registered]
                    if not silent and missing and now - s.created > self.party_timeout:
                        silent = [(r, now - s.created) for r in missing]
                    if not silent:
                        continue
                    rank, age = silent[0]
                    verb = "never registered" if rank not in s.registered else "silent"
                    s.aborted = f"party {rank} {verb} for {age:.1f} s (timeout {self.party_timeout:g} s)"
                self._end(s, s.aborted)


def serve(
    address: str,
    service: DealerService,
    credentials: grpc.ServerCredentials | None,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `service` on `address` (host:port; port 0 = any); returns (server, port).

    Raises OSError naming the address if it cannot be bound (e.g. the port is in use).
    """
    from concurrent import futures

    # so_reuseport off: a second dealer on a taken port must fail, not silently share it with the first
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)]
    )
    pb_grpc.add_DealerServicer_to_server(service, server)
    pb_grpc.add_DealerControlServicer_to_server(service, server)
    pb_grpc.add_HealthServicer_to_server(service, server)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"dealer cannot listen on {address} (port in use or address not available)")
    server.start()
    return server, port


# ---------------------------------------------------------------------------------------------------------------
# The party's client
# ---------------------------------------------------------------------------------------------------------------


class DealerUnavailable(RuntimeError):
    """The dealer could not be reached or did not answer in time; the message names it and the call."""


class DealerClient:
    """A party's connection to the dealer: register once, then (party 0) fetch corrections; heartbeat; close."""

    def __init__(
        self,
        address: str,
        session: str,
        rank: int,
        credentials: grpc.ChannelCredentials | None,
        timeout: float = 30.0,
    ) -> None:
        if rank not in range(WORLD_SIZE):
            raise ValueError(f"rank {rank} is not a computing party (0..{WORLD_SIZE - 1})")
        self.address, self.session, self.rank, self.timeout = address, session, rank, timeout
        options = GRPC_OPTIONS + (tls.channel_options("dealer") if credentials else [])
        if credentials:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.DealerStub(self.channel)
        self.control = pb_grpc.DealerControlStub(self.channel)
        self.bytes_received = 0
        self.tuples_received = 0

    def _call(self, what: str, fn, request, timeout: float | None = None):
        try:
            return fn(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise DealerUnavailable(
                    f"dealer at {self.address} did not answer {what} within {timeout or self.timeout:g} s "
                    f"({code.name}: {e.details()})"
                ) from None
            raise DealerUnavailable(f"dealer at {self.address} refused {what}: {code.name}: {e.details()}") from None

    def register(self, connect_timeout: float | None = None) -> int:
        """Wait for the dealer (it may start after us), register and return this party's seed."""
        wait = connect_timeout if connect_timeout is not None else self.timeout
        try:
            grpc.channel_ready_future(self.channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            raise DealerUnavailable(f"dealer at {self.address} not reachable within {wait:g} s") from None
        request = pb.RegisterRequest(
            session=self.session, rank=self.rank, world_size=WORLD_SIZE, protocol_version=PROTOCOL_VERSION
        )
        reply = self._call("Register", self.stub.Register, request)
        self.bytes_received += reply.ByteSize()
        return reply.seed

    def get_tuples(self, request_id: int, specs: Sequence[Spec]) -> list[torch.Tensor]:
        """Party 0's corrections for `specs`, the first being tuple number `request_id` of the session."""
        request = pb.TupleRequest(
            session=self.session, rank=self.rank, request_id=request_id, specs=[s.to_pb() for s in specs]
        )
        reply = self._call("GetTuples", self.stub.GetTuples, request)
        self.bytes_received += reply.ByteSize()
        self.tuples_received += len(reply.corrections)
        if len(reply.corrections) != len(specs):
            raise DealerUnavailable(
                f"dealer at {self.address} returned {len(reply.corrections)} of {len(specs)} tuples"
            )
        return [int64_from_pb(t) for t in reply.corrections]

    def heartbeat(self, timeout: float | None = None) -> str:
        """'' while the session is alive; the dealer's reason once it was aborted."""
        reply = self._call(
            "Heartbeat", self.control.Heartbeat, pb.HeartbeatRequest(session=self.session, rank=self.rank), timeout
        )
        return reply.reason or ("aborted" if reply.aborted else "")

    def close(self, error: str = "", timeout: float | None = None) -> pb.CloseResponse:
        reply = self._call(
            "Close", self.control.Close, pb.CloseRequest(session=self.session, rank=self.rank, error=error), timeout
        )
        self.channel.close()
        return reply
