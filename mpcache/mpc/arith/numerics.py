"""Fixed-point numerics for 2PC that hold at LLM scale: exact truncation and range-aware approximations.

Truncation. CrypTen encodes reals as int64 with 16 fractional bits; after a product (scale 2^32) the result
must be divided by 2^16. With two parties CrypTen lets each party shift its own share (SecureML), which is
off by 2^64 / 2^32 = 4.3e9 whenever the shares straddle the ring's wrap point: probability ~|x*y| / 2^32 per
product, i.e. thousands of garbage values per LLM token. Here the division is right to the last unit, using
a dealer tuple (r, floor(r / d), msb(r)) for a random ring element r (the tuple kind SPU calls TruncAPr):

    the parties open z = x + 2^62 + r  (one round; r masks x perfectly),
    x + 2^62 < 2^63, so the sum wrapped past 2^64 exactly when msb(r) = 1 and msb(z) = 0, and
    x / d ~ floor(z / d) - floor(r / d) + wrap * floor(2^64 / d) - floor(2^62 / d)   (local, per share).

The result is floor(x / d) or floor(x / d) + 1 for d a power of two (an unbiased stochastic rounding), and
within +2 units otherwise. Requirement: |x| < 2^62 before the division, i.e. |x * y| < 2^30 for a product of
two fixed-point values (CrypTen's own products overflow at 2^31). Cost: 1 round and 16 bytes per element per
party on top of the product (a CrypTen product is 1 round, 32 bytes per element). `install()` makes every
division by a public integer in CrypTen (every product, `div`, `mean`, re-encoding) use this protocol when the
active tuple provider offers `exact_truncation_tuple`; with other providers CrypTen's behaviour is unchanged.

Approximations (exp, reciprocal, inv_sqrt, GeLU, SiLU, softmax) are written once, against a handful of
operations that exist for both torch tensors and CrypTen MPCTensors, so calling them on a float tensor *is*
the floating-point simulator of exactly what MPC computes (same polynomials, same iterations, same clipping).
Each states its input domain and its measured maximum error; costs (rounds, bytes) are in their docstrings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mpcache.mpc.arith import compare
from mpcache.mpc.arith.compare import comparisons  # noqa: F401  (re-exported: the protocol switch)
from mpcache.mpc.arith.crypten_compat import import_crypten
from mpcache.mpc.arith.ring import (
    FIXED_PRODUCTS,
    TRUNC_OFFSET,
    check_divisor,
    mask_block,
    pow2_divmod,
    truncation_tuple,
    unsigned_floordiv,
)
from mpcache.mpc.fss import batch as fss_batch

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402
from crypten.common.rng import generate_random_ring_element  # noqa: E402
from crypten.common.tensor_types import is_float_tensor, is_int_tensor  # noqa: E402
from crypten.mpc import MPCTensor  # noqa: E402
from crypten.mpc.primitives import ArithmeticSharedTensor  # noqa: E402
from crypten.mpc.provider import TrustedFirstParty  # noqa: E402

FRAC_BITS = 16  # CrypTen's default fixed-point precision
SCALE = 1 << FRAC_BITS
PROVIDER_NAME = "MPCACHE_LOCAL"

# ---------------------------------------------------------------------------------------------------------------
# Exact truncation: the tuple (pure math, shared with any dealer), the protocol, and an in-process provider
# ---------------------------------------------------------------------------------------------------------------


def exact_truncate_(xs: Sequence[ArithmeticSharedTensor], divisors: Sequence[int | Tensor]) -> None:
    """Divide each shared x by its public positive integer divisor in place (see the module docstring), all
    in one communication round. Requires |x| < 2^62 (raw ring value) and a provider that offers
    `exact_truncation_tuple`."""
    provider = crypten.mpc.get_default_provider()
    masked, tuples = [], []
    for x, d in zip(xs, divisors):
        r, derived = provider.exact_truncation_tuple(x.size(), d, device=x.device)
        share = x.share + r.share
        if x.rank == 0:
            share = share + TRUNC_OFFSET
        masked.append(share)
        tuples.append(derived)
    opened = comm.get().all_reduce(masked, batched=True) if len(masked) > 1 else [comm.get().all_reduce(masked[0])]
    for x, d, z, derived in zip(xs, divisors, opened, tuples):
        q_r, msb_r = derived.share[0], derived.share[1]
        no_top = (z >= 0).long()  # 1 - msb(z)
        wrap_q = pow2_divmod(64, d)[0]
        share = -q_r + no_top * wrap_q * msb_r
        if x.rank == 0:
            share = share + unsigned_floordiv(z, d) - TRUNC_OFFSET // d
        x.share = share


class LocalDealer(TrustedFirstParty):
    """In-process tuple provider for tests and benchmarks: CrypTen's trusted first party plus exact-truncation
    tuples, weight-stationary masks and FSS comparison keys, with no dealer process.

    INSECURE like TFP, by design: party 0 draws every tuple (from a seed, via `truncation_tuple`) and
    secret-shares it with pseudo-random zero shares, so it knows all masks; for FSS keys (`compare_keys`) BOTH
    parties draw the same two dealer seeds from CrypTen's global generator (a seed they share) and each runs the
    dealer's key generation (fss.batch.gen_chunks, exactly what the dealer service runs) keeping its own key, so
    each knows both keys. The dealer service serves the same tuple kinds from seeds only it and one party know.

    `dealer_bytes`: what a dealer process would have sent THIS party for the tuples used so far (party 0: one
    ring element per derived element of every Beaver-style tuple, as mpcache/mpc/dealer sends its corrections;
    both parties: every FSS key's corrections), so benchmarks report the dealer's traffic without running one.
    """

    NAME = PROVIDER_NAME

    def __init__(self) -> None:
        super().__init__()
        self._masks: list[Tensor] = []
        self.dealer_bytes = 0
        self.keygen_seconds = 0.0

    def _sent(self, *derived) -> None:
        """Count what the dealer sends party 0 for a tuple with these derived tensors (nothing to party 1)."""
        if comm.get().get_rank() == 0:
            self.dealer_bytes += 8 * sum(t.share.numel() for t in derived)

    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        a, b, c = super().generate_additive_triple(size0, size1, op, device, *args, **kwargs)
        self._sent(c)
        return a, b, c

    def square(self, size, device=None):
        r, r2 = super().square(size, device)
        self._sent(r2)
        return r, r2

    def generate_binary_triple(self, size0, size1, device=None):
        a, b, c = super().generate_binary_triple(size0, size1, device)
        self._sent(c)
        return a, b, c

    def wrap_rng(self, size, device=None):
        r, theta = super().wrap_rng(size, device)
        self._sent(theta)
        return r, theta

    def B2A_rng(self, size, device=None):
        r_arith, r_bin = super().B2A_rng(size, device)
        self._sent(r_arith)
        return r_arith, r_bin

    def compare_keys(self, n: int, count: int) -> list:
        """This party's keys of `count` comparisons on n-bit masked values (fss.CompareKey chunks, in order)."""
        return self._gate_keys("compare", n, count)

    def lut_keys(self, n: int, count: int) -> list:
        """This party's keys of `count` table lookups on n-bit masked values (fss.LutKey chunks, in order)."""
        return self._gate_keys("lut", n, count)

    def _gate_keys(self, kind: str, n: int, count: int) -> list:
        """`keygen_seconds` adds up the time spent here (a dealer process's work, done inline)."""
        start = time.perf_counter()
        g = crypten.generators["global"][torch.device("cpu")]
        seed = torch.randint(-(1 << 63), (1 << 63) - 1, (4,), generator=g, dtype=torch.long).numpy().tobytes()
        rank = comm.get().get_rank()
        keys = [pair[rank] for _, *pair in fss_batch.gen_chunks(kind, n, count, (seed[:16], seed[16:]), 0)]
        self.dealer_bytes += fss_batch.batch_bytes(kind, n, count)
        self.keygen_seconds += time.perf_counter() - start
        return keys

    def exact_truncation_tuple(self, size, divisor, device=None) -> tuple[ArithmeticSharedTensor, ...]:
        size = tuple(size)
        if comm.get().get_rank() == 0:
            seed = int(torch.randint(0, 1 << 62, (1,), generator=crypten.generators["local"][torch.device("cpu")]))
            r, derived = truncation_tuple(seed, size, divisor)
            both = torch.cat([r.unsqueeze(0), derived])
            shared = ArithmeticSharedTensor(both, precision=0, src=0, device=device)
        else:
            shared = ArithmeticSharedTensor(None, size=(3, *size), precision=0, src=0, device=device)
        r = ArithmeticSharedTensor.from_shares(shared.share[0], precision=0)
        derived = ArithmeticSharedTensor.from_shares(shared.share[1:], precision=0)
        self._sent(derived)
        return r, derived

    # Weight-stationary Beaver tuples (see `FixedOperand`): a mask B drawn once per weight, then per product a
    # fresh A with C = op(A, B). Party 0 keeps B in the clear (as TFP knows every mask); the other parties keep
    # its shape only.
    def fixed_mask(self, size, device=None) -> tuple[int, ArithmeticSharedTensor]:
        size = tuple(size)
        first = comm.get().get_rank() == 0
        b = generate_random_ring_element(size, device=device) if first else torch.empty(size, device="meta")
        self._masks.append(b)  # every party makes the same requests, so keys agree
        return len(self._masks) - 1, ArithmeticSharedTensor(b if first else None, size=size, precision=0, src=0)

    def fixed_triple(self, key: int, size, op: str, device=None, block=None) -> tuple[ArithmeticSharedTensor, ...]:
        """(A, op(A, B)) for the mask of `key`, or for its leading `block` (as the dealer: GrowingOperand)."""
        size, b = tuple(size), self._masks[key]
        b = b if block is None else mask_block(b, block)
        if comm.get().get_rank() == 0:
            a = generate_random_ring_element(size, device=device)
            a, c = ArithmeticSharedTensor(a, precision=0, src=0), ArithmeticSharedTensor(
                FIXED_PRODUCTS[op](a, b), precision=0, src=0
            )
        else:
            c_size = FIXED_PRODUCTS[op](torch.empty(size, device="meta"), b).shape
            a = ArithmeticSharedTensor(None, size=size, precision=0, src=0)
            c = ArithmeticSharedTensor(None, size=c_size, precision=0, src=0)
        self._sent(c)
        return a, c


_original_div_ = ArithmeticSharedTensor.div_


def _div_(self: ArithmeticSharedTensor, y):
    """CrypTen's ArithmeticSharedTensor.div_, with exact truncation for public integer divisors in 2PC."""
    if isinstance(y, float) and int(y) == y:
        y = int(y)
    if is_float_tensor(y) and y.frac().eq(0).all():
        y = y.long()
    integer = isinstance(y, int) or is_int_tensor(y)
    provider = crypten.mpc.get_default_provider()
    if integer and comm.get().get_world_size() == 2 and hasattr(provider, "exact_truncation_tuple"):
        check_divisor(y)
        if is_int_tensor(y):
            self.share = torch.broadcast_tensors(self.share, y)[0].clone()
        elif y == 1:
            return self
        exact_truncate_([self], [y])
        return self
    return _original_div_(self, y)


def decode(x: MPCTensor) -> Tensor:
    """Open x exactly as float64. CrypTen's get_plain_text goes through float32 and divides negative values by
    scale - 1, which makes many negative values beyond ~1000 come out 1.0 too low."""
    return x.reveal().double() / x.encoder.scale


def install(provider: str = PROVIDER_NAME) -> None:
    """Register `LocalDealer`, route CrypTen's integer divisions through exact truncation, and select
    `provider` (idempotent). Call in every party, before or after `crypten.init()`."""
    vars(crypten.mpc)["__SUPPORTED_PROVIDERS"].setdefault(PROVIDER_NAME, LocalDealer())
    ArithmeticSharedTensor.div_ = _div_
    crypten.cfg.mpc.provider = provider


# ---------------------------------------------------------------------------------------------------------------
# Operations shared by MPC and the float simulator
# ---------------------------------------------------------------------------------------------------------------
# Values are torch tensors (the simulator) or MPCTensors. MPCTensors carry a fixed-point scale: 2^16 for reals,
# 1 for the 0/1 bits that comparisons return; products of a bit and a real need no truncation. Every helper
# truncates at most once, so its rounds are: products 1 (Beaver) + 1 (truncation), comparisons 1 per batch with
# FSS keys (arith/compare.py; 8 with CrypTen's adder, `comparisons("crypten")`).

Value = Tensor | MPCTensor

# Comparison ranges (arith/compare.py: every comparison states |x - t| < bound; FSS's ring width follows from it).
VALUE_BOUND = 2.0**15  # activations, queries, keys, logits and their pairwise differences: FSS n = 32 on reals


def is_private(x: object) -> bool:
    return isinstance(x, MPCTensor)


def stack(values: Sequence[Value], dim: int = 0) -> Value:
    """torch.stack for tensors or MPCTensors (CrypTen's own stack, without torch's dispatch warning)."""
    return crypten.stack(list(values), dim) if is_private(values[0]) else torch.stack(list(values), dim)


def cat(values: Sequence[Value], dim: int = 0) -> Value:
    return crypten.cat(list(values), dim) if is_private(values[0]) else torch.cat(list(values), dim)


def on_grid(c: float | Sequence[float] | Tensor) -> Tensor:
    """Public constants rounded to the 2^-16 grid, so MPC and the simulator use identical values."""
    return torch.round(torch.as_tensor(c, dtype=torch.float64) * SCALE) / SCALE


def _encode(c: Tensor | float) -> Tensor:
    return torch.round(torch.as_tensor(c, dtype=torch.float64) * SCALE).long()


def _scale(x: MPCTensor) -> int:
    return x.encoder.scale


def _from_raw(raw: Tensor, raw_scale: int, shift: int = 0) -> MPCTensor:
    """Wrap raw ring shares of scale `raw_scale` as the value / 2^shift at scale 2^16 (shift < 0 keeps extra
    low bits), truncating at most once; or as 0/1 bits (scale 1) when raw_scale is 1 and shift 0."""
    if raw_scale == 1 and shift == 0:
        return MPCTensor.from_shares(raw, precision=0)
    out = MPCTensor.from_shares(raw, precision=FRAC_BITS)
    num, den = raw_scale << max(shift, 0), SCALE << max(-shift, 0)
    if num % den:
        raise ValueError(f"cannot rescale a value of scale {raw_scale} by 2^{-shift} to scale 2^{FRAC_BITS}")
    if num // den > 1:
        out._tensor.div_(num // den)
    return out


class FixedOperand:
    """A private right operand reused by many products, such as a weight matrix (SecureML's trick).

    With plain Beaver every product opens both masked operands, so a decode step re-sends every weight (|W|
    elements per product: 80% of a decode step's traffic; one step of a bundled-shape model, 4 layers of
    d_model 256, moves 13 MB per party instead of 66 MB). Here W - B is opened once for a dealer mask B,
    and every product x @ W takes a tuple (A, A @ B) with a fresh A, opening only x - A:
        x @ W = A @ B + (x - A) @ B + A @ (W - B) + (x - A) @ (W - B).
    B is never reused for another operand, so W - B stays a one-time pad. Needs a provider with `fixed_mask`
    and `fixed_triple`; `fixed(w)` returns w itself otherwise (and for simulator tensors).

    Memory: a party keeps B's share and W - B (16 bytes per element), not W's share: that is B's share plus
    W - B at party 0 (`value` rebuilds it when a public operand needs it). `transposed()` reads the same opening
    as x @ W^T (a tied LM head from the embedding table's operand; tuples (A, A @ B^T)).
    """

    def __init__(self, w: MPCTensor) -> None:
        provider = crypten.mpc.get_default_provider()
        self.shape, self.precision = w.size(), _scale(w)
        self.key, mask = provider.fixed_mask(w.size())
        self.mask = mask.share
        self.opened = comm.get().all_reduce(w.share - self.mask)  # W - B, one round, once

    @property
    def value(self) -> MPCTensor:
        """W as an MPCTensor (this party's share: B's share, plus W - B at party 0)."""
        share = self.mask + self.opened if comm.get().get_rank() == 0 else self.mask.clone()
        return MPCTensor.from_shares(share, precision=int(math.log2(self.precision)))

    def transposed(self) -> TransposedOperand:
        return TransposedOperand(self)

    def product(self, op: str, x: MPCTensor, shift: int) -> MPCTensor:
        """op(x, W) / 2^shift for op in FIXED_PRODUCTS ("matmul_t": x @ W^T)."""
        a, c = crypten.mpc.get_default_provider().fixed_triple(self.key, x.size(), op)
        eps = comm.get().all_reduce(x.share - a.share)
        f = FIXED_PRODUCTS[op]
        raw = c.share + f(eps, self.mask) + f(a.share, self.opened)
        if comm.get().get_rank() == 0:
            raw = raw + f(eps, self.opened)
        return _from_raw(raw, _scale(x) * self.precision, shift)


class TransposedOperand:
    """W^T of a FixedOperand W as a right operand: x @ W^T from W's own mask and opening (no second copy)."""

    def __init__(self, w: FixedOperand) -> None:
        self.w = w

    @property
    def shape(self) -> torch.Size:
        return torch.Size([*self.w.shape[:-2], self.w.shape[-1], self.w.shape[-2]])

    @property
    def value(self) -> MPCTensor:
        return self.w.value.transpose(-1, -2)

    def product(self, op: str, x: MPCTensor, shift: int) -> MPCTensor:
        if op != "matmul":
            raise ValueError(f"a transposed weight-stationary operand takes matmul only, got {op!r}")
        return self.w.product("matmul_t", x, shift)


def fixed(w: Value) -> Value | FixedOperand:
    """Wrap a private weight as a FixedOperand when the tuple provider supports it; otherwise return it."""
    if is_private(w) and hasattr(crypten.mpc.get_default_provider(), "fixed_mask"):
        return FixedOperand(w)
    return w


def transposed(w: Value | FixedOperand) -> Value | TransposedOperand:
    """w^T over the last two dims, sharing w's storage (a FixedOperand's mask and opening; a tensor's view)."""
    return w.transposed() if isinstance(w, FixedOperand) else w.transpose(-1, -2)


def share_owned(t: Tensor, src: int = 0) -> MPCTensor:
    """crypten.cryptensor(t, src=src), where the parties other than `src` may pass a meta tensor (a model's
    architecture without weights, `decoder.architecture_only`): only its shape is used, no memory is allocated
    for values these parties do not have."""
    if not t.is_meta:
        return crypten.cryptensor(t, src=src)
    if comm.get().get_rank() == src:
        raise ValueError("the owner of a shared tensor must pass its values, not a meta tensor")
    return MPCTensor.from_shares(ArithmeticSharedTensor.PRZS(tuple(t.shape)).share)


def growing_capacity(n: int) -> int:
    """Rows a GrowingOperand of n rows gets masks for: n + max(64, n // 2) (see GrowingOperand)."""
    return n + max(64, n // 2)


class GrowingOperand:
    """An append-only private right operand, such as a KV cache's keys (as K^T) or values: FixedOperand's
    weight-stationary trick for an operand that gains rows.

    The dealer mask B has a public capacity along `dim` (`growing_capacity`); row i of the operand is opened once,
    as V_i - B_i, when it is appended, and every product op(x, V) with the n rows so far takes a tuple
    (A, op(A, B[:n])) for a fresh A (the dealer uses the leading block of its mask), opening only x - A:
        op(x, V) = op(A, B') + op(x - A, B') + op(A, V - B') + op(x - A, V - B'),  B' = B[:n].
    A decode step over a cache of n rows thus opens the query and the new row instead of all n rows. `append`
    only stages the new rows' V_i - B_i: they are opened in the same round as the next product's x - A (or by
    `flush_all`), so appending adds no round.

    Security: mask row i pads exactly one value, row i, for the operand's life; nothing is ever rewritten. When
    the capacity is used up, or the rows change otherwise (a cache compacted or gathered by an eviction policy),
    the owner starts a fresh GrowingOperand (a fresh mask) and the whole current content is opened once more.
    Amortisation: a fresh operand of n rows opens n rows and lasts max(64, n // 2) appends, so rows opened per
    append average at most (n + max(64, n // 2)) / max(64, n // 2) <= 3 for any n, against n per step with plain
    Beaver; the mask holds 1.5x the rows (party-local memory and AES draws; the dealer's mask cache too).
    The dealer's per-product output C = op(A, B[:n]) is output-sized, as with plain Beaver.

    On float tensors (the simulator) it is a plain growing tensor with the same products in value.
    """

    def __init__(self, value: Value, dim: int, capacity: int) -> None:
        self.dim = dim if dim < 0 else dim - value.dim()
        self.capacity, self.length, self.private = capacity, 0, is_private(value)
        if capacity < value.shape[self.dim]:
            raise ValueError(f"capacity {capacity} is below the operand's {value.shape[self.dim]} rows")
        full = list(value.shape)
        full[self.dim] = capacity
        self._pending: list[tuple[int, int, Tensor]] = []  # (first row, rows, V - B of those rows), not yet opened
        if self.private:
            self.key, mask = crypten.mpc.get_default_provider().fixed_mask(full)
            self._mask = mask.share
            self._shares = torch.zeros(full, dtype=torch.long)  # V's share (for products with a public x)
            self._opened = torch.zeros(full, dtype=torch.long)  # V - B, row by row
            self._precision = int(math.log2(_scale(value)))
        else:
            self._values = value.new_zeros(full)
        self.append(value)

    @staticmethod
    def supported(value: Value) -> bool:
        """Float tensors, or private ones when the tuple provider serves weight-stationary tuples."""
        return not is_private(value) or hasattr(crypten.mpc.get_default_provider(), "fixed_mask")

    @property
    def shape(self) -> torch.Size:
        buffer = self._shares if self.private else self._values
        return buffer.narrow(self.dim, 0, self.length).shape

    @property
    def value(self) -> Value:
        """The rows so far (a copy on shares: an MPCTensor at the operand's precision)."""
        if not self.private:
            return self._values.narrow(self.dim, 0, self.length)
        return MPCTensor.from_shares(self._shares.narrow(self.dim, 0, self.length).clone(), precision=self._precision)

    def append(self, rows: Value) -> None:
        """Add rows along `dim` (same other dims); their masked value is opened with the next product."""
        n = rows.shape[self.dim]
        if self.length + n > self.capacity:
            raise ValueError(
                f"{self.length} + {n} rows exceed the capacity {self.capacity}: start a fresh operand (fresh mask)"
            )
        expected = list(self.shape)
        expected[self.dim] = n
        if list(rows.shape) != expected or is_private(rows) != self.private:
            raise ValueError(f"rows of shape {tuple(rows.shape)} do not extend an operand of shape {tuple(self.shape)}")
        if self.private:
            if _scale(rows) != 1 << self._precision:
                raise ValueError("appended rows must have the operand's fixed-point precision")
            self._shares.narrow(self.dim, self.length, n).copy_(rows.share)
            masked = rows.share - self._mask.narrow(self.dim, self.length, n)
            self._pending.append((self.length, n, masked.contiguous()))
        else:
            self._values.narrow(self.dim, self.length, n).copy_(rows)
        self.length += n

    @staticmethod
    def flush_all(operands: Sequence[GrowingOperand], extra: Sequence[Tensor] = ()) -> list[Tensor]:
        """Open the staged rows of `operands` and the masked `extra` tensors in one round; returns the opened
        extras (no traffic when there is nothing to open)."""
        staged = [(op, start, n) for op in operands for start, n, _ in op._pending]
        tensors = [masked for op in operands for _, _, masked in op._pending] + list(extra)
        if not tensors:
            return []
        opened = comm.get().all_reduce(tensors, batched=True)
        for (op, start, n), rows in zip(staged, opened):
            op._opened.narrow(op.dim, start, n).copy_(rows)
        for op in operands:
            op._pending = []
        return opened[len(staged) :]

    def product(self, op: str, x: Value, shift: int) -> Value:
        if not (self.private and is_private(x)):
            return _product(op, x, self.value, shift)
        mask = self._mask.narrow(self.dim, 0, self.length)
        a, c = crypten.mpc.get_default_provider().fixed_triple(self.key, x.size(), op, block=tuple(mask.shape))
        (eps,) = GrowingOperand.flush_all([self], [x.share - a.share])
        opened = self._opened.narrow(self.dim, 0, self.length)
        f = getattr(torch, op)
        raw = c.share + f(eps, mask) + f(a.share, opened)
        if comm.get().get_rank() == 0:
            raw = raw + f(eps, opened)
        return _from_raw(raw, _scale(x) * (1 << self._precision), shift)


def _product(
    op: str, x: Value, y: Value | FixedOperand | TransposedOperand | GrowingOperand, shift: int
) -> Value:
    """op(x, y) / 2^shift for op in {mul, matmul}: one Beaver round when both are private, one truncation."""
    if isinstance(y, GrowingOperand):
        return y.product(op, x, shift)
    if isinstance(y, (FixedOperand, TransposedOperand)):
        return y.product(op, x, shift) if is_private(x) else _product(op, x, y.value, shift)
    if not is_private(x) and not is_private(y):
        dtype = x.dtype if x.is_floating_point() else y.dtype
        return getattr(torch, op)(x.to(dtype), y.to(dtype)) / 2.0**shift
    from crypten.mpc.primitives import beaver

    if is_private(x) and is_private(y):
        raw = getattr(beaver, op)(x._tensor, y._tensor).share
        return _from_raw(raw, _scale(x) * _scale(y), shift)
    if is_private(x):
        raw = getattr(torch, op)(x.share, _encode(y))
        return _from_raw(raw, _scale(x) * SCALE, shift)
    raw = getattr(torch, op)(_encode(x), y.share)
    return _from_raw(raw, SCALE * _scale(y), shift)


def mul(x: Value, y: Value | Tensor | float, shift: int = 0) -> Value:
    """Elementwise x * y / 2^shift (broadcasting; a negative shift keeps more bits of small products). In MPC a
    public operand is rounded to the 2^-16 grid: pass on-grid constants (`on_grid`) and the simulator computes
    the same product."""
    return _product("mul", x, y if is_private(y) or torch.is_tensor(y) else torch.tensor(float(y)), shift)


def matmul(x: Value, y: Value | FixedOperand | TransposedOperand | GrowingOperand, shift: int = 0) -> Value:
    """x @ y / 2^shift with one truncation for the whole product."""
    return _product("matmul", x, y, shift)


def square(x: Value, shift: int = 0) -> Value:
    """x * x / 2^shift; in MPC one opening of x (CrypTen's square pair) instead of two."""
    if not is_private(x):
        return x * x / 2.0**shift
    from crypten.mpc.primitives import beaver

    return _from_raw(beaver.square(x._tensor).share, _scale(x) ** 2, shift)


def rescale(x: Value, shift: int) -> Value:
    """x / 2^shift (one truncation)."""
    if not is_private(x):
        return x / (1 << shift)
    return _from_raw(x.share.clone(), _scale(x), shift)


def divide(x: Value, d: int) -> Value:
    """x / d for a public positive integer d (exact to the last bit; no rounded 1/d constant)."""
    if not is_private(x):
        return x / d
    out = x.clone()
    out._tensor.div_(int(d))
    return out


def less_than(x: Value, thresholds: Sequence[float], bound: float) -> Value:
    """Bits [x < t] for every public threshold t, stacked on a new leading dim; all in one comparison batch.

    `bound`: the caller's public statement that |x - t| < bound for every element and threshold (arith/compare.py:
    it sets the FSS ring width n = ceil(log2(bound x scale)) + 1; the simulator refuses a value outside it). MPC
    with comparisons "fss": 1 round, ceil(n/8) bytes sent per party, element and threshold (n = 32 for a bound of
    2^15 on reals); "crypten": 8 rounds, 432 bytes in CrypTen's counter. The bits are arithmetic shares (scale 1)."""
    t = on_grid(list(thresholds))
    if not is_private(x):
        d = x.unsqueeze(0) - t.view(-1, *([1] * x.dim())).to(x.dtype)
        compare.check_range(d, bound)
        return (d < 0).to(x.dtype)
    # one broadcast subtraction for all thresholds (a Python loop of MPCTensor ops costs ~20 ms per threshold)
    full = (len(t), *x.shape)
    return compare.negative(x.unsqueeze(0).expand(*full) - t.view(-1, *([1] * x.dim())).expand(*full), bound)


def lt(x: Value, y: Value | float, bound: float) -> Value:
    """[x < y] elementwise (scale-1 shares in MPC), for |x - y| < bound: one comparison round."""
    return less_than(x - y, [0.0], bound)[0]


def gt(x: Value, y: Value | float, bound: float) -> Value:
    """[x > y] = [y - x < 0]."""
    return less_than(y - x, [0.0], bound)[0]


def ge(x: Value, y: Value | float, bound: float) -> Value:
    """[x >= y] = 1 - [x < y] (no equality test: local)."""
    return 1 - lt(x, y, bound)


def sign(x: Value, bound: float) -> Value:
    """+1 where x >= 0, -1 where x < 0 (scale 1), for |x| < bound: one comparison, the rest local."""
    return 1 - 2 * less_than(x, [0.0], bound)[0]


def select(bit: Value, a: Value, b: Value | float) -> Value:
    """bit ? a : b for a 0/1 `bit` (a comparison's scale-1 share): b + bit (a - b), one Beaver product and no
    truncation (a bit times a real is exact)."""
    return b + mul(bit, a - b)


def counters() -> dict[str, float]:
    """This party's cost counters for arith.accounting.Ledger: CrypTen's rounds and bytes between the parties
    (counted while cfg.communicator.verbose) and the bytes of correlated randomness its tuple provider got from
    the dealer (`dealer_bytes`: LocalDealer counts what a dealer would send; 0 for providers without it)."""
    stats = comm.get().get_communication_stats()
    dealer = getattr(crypten.mpc.get_default_provider(), "dealer_bytes", 0)
    return {"rounds": stats["rounds"], "bytes": stats["bytes"], "dealer_bytes": dealer}


def mask_multiply(x: Value, mask: Tensor) -> Value:
    """x * mask for a public 0/1 (or integer) mask: exact and free in MPC (integer multiple of each share)."""
    if not is_private(x):
        return x * mask.to(x.dtype)
    out = x.clone()  # not shallow_copy: that shares the underlying shares, and the caller's x would change
    out.share = x.share * mask.long()
    return out


def combine(stacked: Value, weights: Tensor, bias: Tensor | float = 0.0, shift: int = 0) -> Value:
    """sum_k weights[k] * stacked[k] / 2^shift + bias, public weights (each broadcast against stacked[k]) and bias
    on the 2^-16 grid. One truncation for all terms, none when `stacked` holds 0/1 bits and shift is 0."""
    w = on_grid(weights)
    w = w.view(*w.shape, *([1] * (stacked.dim() - w.dim())))
    if not is_private(stacked):
        out = (w.to(stacked.dtype) * stacked).sum(0) / 2.0**shift
    else:
        out = _from_raw((_encode(w) * stacked.share).sum(0), _scale(stacked) * SCALE, shift)
    bias = on_grid(bias)
    if bias.dim() == 0:
        return out + float(bias) if float(bias) != 0.0 else out
    return out + (bias.to(out.dtype) if not is_private(out) else bias)


def powers(x: Value, degree: int, shift: int = 0) -> Value:
    """Stack of x^1 .. x^degree in ceil(log2(degree)) product rounds (each doubles the known powers). With a
    shift, x holds a value scaled by 2^shift and so does every power: (x 2^s)^k / 2^((k-1) s)."""
    known = x.unsqueeze(0)
    while known.shape[0] < degree:
        have = known.shape[0]
        m = min(have, degree - have)
        known = cat([known, mul(known[:m], known[have - 1], shift=shift)])
    return known


def polynomial(x: Value, coeffs: Tensor) -> Value:
    """sum_k coeffs[k] x^k (coeffs[0] is the constant term)."""
    return combine(powers(x, len(coeffs) - 1), coeffs[1:], coeffs[0])


# ---------------------------------------------------------------------------------------------------------------
# Coefficient tables (the one definition both MPC and the simulator read)
# ---------------------------------------------------------------------------------------------------------------


def fit_piece(f, lo: float, hi: float, degree: int) -> Tensor:
    """Near-minimax polynomial for f on [lo, hi] in the normalised variable t = (2a - lo - hi) / (hi - lo):
    Lawson-reweighted least squares on Chebyshev nodes. How every table below was made (tests re-fit them).
    numpy, not torch: hundreds of tiny steps, where torch's thread pool only adds overhead."""
    t = np.cos(np.linspace(0, math.pi, 2001))
    a = (t + 1) / 2 * (hi - lo) + lo
    basis = np.stack([t**k for k in range(degree + 1)], 1)
    y, w = f(torch.from_numpy(a)).numpy(), np.ones_like(t)
    for _ in range(100):
        coef = np.linalg.solve(basis.T @ (w[:, None] * basis), basis.T @ (w * y))  # weighted normal equations
        w = w * np.abs(basis @ coef - y)
        w = w / w.sum()
    return torch.from_numpy(coef)


@dataclass(frozen=True)
class ExpTable:
    """exp(x) for x <= 0 as p(x / 2^halvings)^(2^halvings), x clipped to [-clip, 0] first."""

    clip: float
    halvings: int
    coeffs: tuple[float, ...]  # p in monomials of u = x / 2^halvings on [-clip / 2^halvings, 0]


@dataclass(frozen=True)
class TailTable:
    """f(x) = relu(x) - k(|x|) with k(a) = a * F(-a) (F the CDF behind GeLU or SiLU) approximated by one
    polynomial per piece [cuts[i], cuts[i+1]) in t = (2a - lo - hi) / (hi - lo), and 0 beyond cuts[-1]."""

    cuts: tuple[float, ...]
    coeffs: tuple[tuple[float, ...], ...]


def _exp_coeffs(clip: float, halvings: int, degree: int) -> tuple[float, ...]:
    """Monomial coefficients in u of the fit on [-clip/2^h, 0] (u = (t - 1) * clip / 2^(h+1))."""
    lo = -clip / (1 << halvings)
    c = fit_piece(torch.exp, lo, 0.0, degree)
    # t = 2u / (-lo) + 1; expand sum c_k t^k in powers of u
    out = torch.zeros(degree + 1, dtype=torch.float64)
    for k, ck in enumerate(c):
        for j in range(k + 1):
            out[j] += ck * math.comb(k, j) * (2 / -lo) ** j
    return tuple(float(v) for v in out)


def _gelu_tail(a: Tensor) -> Tensor:
    return a * 0.5 * torch.special.erfc(a / math.sqrt(2))


def _silu_tail(a: Tensor) -> Tensor:
    return a * torch.sigmoid(-a)


# exp on [-14, 0]: e^-14 = 8e-7 is below the 2^-16 resolution, so clipping there loses nothing (PUMA/MPCache
# use the same threshold). Three halvings keep u in [-1.75, 0] where a degree-6 fit is 1e-7 accurate.
EXP = ExpTable(
    clip=14.0,
    halvings=3,
    coeffs=(
        0.9999994787664673, 0.9999698496985381, 0.4997146897178856, 0.16564705905828905,
        0.03990525429998039, 0.006720562903934639, 0.0005970229349067225,
    ),
)  # fmt: skip


@dataclass(frozen=True)
class RangeExpTable:
    """exp(x) for x in [-range, 0] with no comparison: p(t)^(2^halvings), t = 1 + 2x / range in [-1, 1]; p is the
    fit of e^u on u = x / 2^halvings in [-range / 2^halvings, 0] in the normalised variable t (`fit_piece`)."""

    range: float  # a power of two up to 2^(RANGE_EXP_BITS + 1), so t 2^RANGE_EXP_BITS is an integer multiple of x
    halvings: int
    coeffs: tuple[float, ...]  # p in monomials of t


# exp without clipping on [-64, 0]: p of degree 7 on u in [-2, 0] (fit error 7.4e-8), squared 5 times (1.9e-6 on
# the domain). Below the domain p(t) keeps falling (t < -1 is a mild extrapolation), so the result stays below
# 2^-16 down to x = -170 in floats; in 2PC the products of powers stay inside the ring down to t = -4 (x = -160).
RANGE_EXP = RangeExpTable(
    range=64.0,
    halvings=5,
    coeffs=(
        0.3678793681076744, 0.3678793762392137, 0.18394205529211147, 0.06131395331760787,
        0.015316665861997045, 0.0030634634715654622, 0.0005294788603735375, 7.556535271452587e-05,
    ),
)  # fmt: skip
RANGE_EXP_BITS = 8  # extra fractional bits of t, p and the squarings (2^-24 resolution; products stay < 2^62)
RANGE_EXP_SAFE = 150.0  # documented safe depth below 0 (tested in 2PC): |exp_range(x) - e^x| <= 2^-16 down to it


# GeLU: k(a) = a * Phi(-a) is below 1.5e-6 beyond a = 5. SiLU: a * sigmoid(-a) is below 7.4e-5 beyond a = 12.
GELU = TailTable(
    cuts=(0.0, 2.0, 5.0),
    coeffs=(
        (0.158665341249, -0.083194561686, -0.121250191785, 0.119980742858,
         -0.019012160801, -0.014055659066, 0.004347143862),
        (0.000831003297, -0.003991387417, 0.009634118215, -0.016105783934,
         0.01442781324, -0.002690304115, -0.002142085129),
    ),
)  # fmt: skip
SILU = TailTable(
    cuts=(0.0, 3.0, 12.0),
    coeffs=(
        (0.273650661799, -0.062002088473, -0.176108696317, 0.147266545915,
         -0.035025432963, -0.014112031927, 0.008623230138),
        (0.004298424173, -0.0153418435, 0.027140649136, -0.043277469217,
         0.04603418493, -0.012676762288, -0.006297572768),
    ),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Approximations
# ---------------------------------------------------------------------------------------------------------------


def exp_neg(x: Value, clip_top: bool = False, bound: float = VALUE_BOUND) -> Value:
    """exp(x) for x <= 0 down to -bound (2^15 by default): exp(max(x, -14)) via a degree-6 polynomial of x/8,
    squared 3 times.

    clip_top also clips at 0 (exp(x) := 1 for x > 0) in the same comparison batch, for callers that only have
    an upper bound on x. `bound`: |x + 14| and |x| stay below it (the clip's comparison range; less_than). Max
    abs error on x <= 0: 3e-4 in MPC (fixed point), 1e-6 in the simulator; relative error ~1.2e-4 + 2^-16/e^x.
    Cost (CrypTen comparisons): 23 rounds, 800 bytes per element, the clip's comparison 432 of them; with FSS
    comparisons the clip is 1 round and 8 bytes (CrypTen's exp, wrong below -512: 17 rounds, 272 bytes).
    """
    bits = less_than(x, [-EXP.clip, 0.0] if clip_top else [-EXP.clip], bound)
    x = x + mul(bits[0], -EXP.clip - x)  # below -clip -> -clip
    if clip_top:
        x = x - mul(1 - bits[1], x)  # above 0 -> 0
    y = polynomial(rescale(x, EXP.halvings), on_grid(EXP.coeffs))
    for _ in range(EXP.halvings):
        y = square(y)
    return y


def exp_range(x: Value) -> Value:
    """exp(x) for x in [-150, 0] without any comparison: p(t)^32 with t = 1 + x / 32 and p of degree 7 (RANGE_EXP).

    t, the powers of t, p(t) and the squarings carry 8 extra fractional bits (scale 2^24): t is an exact integer
    multiple of x (free), the coefficients sit on a 2^-24 grid, and the last squaring returns to 2^-16. Domain: the
    fit holds on [-64, 0]; on [-150, -64] the result stays within 2^-16 of e^x (it is below 2^-16 there).
    Outside: below -160 the powers leave the ring (garbage in that element only); above 0 the result extrapolates
    e^x (relative error < 1e-4 up to x = 5) and overflows past x = 9.7 (the last square's product reaches 2^62).
    Max abs error on [-150, 0]: 2e-6 in the simulator, 2^-16 in MPC (the last squaring's rounding); relative
    error on [-14, 0]: 3.3e-6 in the simulator.
    Cost: 17 rounds, 416 bytes per element per party (exp_neg with its clip: 23 rounds, 800 bytes).
    """
    table, bits = RANGE_EXP, RANGE_EXP_BITS
    t = x * ((2 << bits) // int(table.range)) + float(1 << bits)  # 2^bits t: exact, no truncation
    coeffs = on_grid(torch.tensor(table.coeffs, dtype=torch.float64) * (1 << bits))  # p 2^bits on the 2^-24 grid
    y = combine(powers(t, len(coeffs) - 1, shift=bits), coeffs[1:], coeffs[0], shift=bits)  # 2^bits p(t)
    for i in range(table.halvings):
        y = square(y, shift=bits if i + 1 < table.halvings else 2 * bits)
    return y


MIN_DOMAIN = 2.0**-10  # 64 units of the 2^-16 grid: thresholds below this cannot be resolved


def domain_bound(hi: float) -> float:
    """Comparison range of a guess ladder on a domain [lo, hi] of x >= 0: |x - t| < 2 hi for x up to twice the
    domain's top (such x still get the top segment's guess, as with 64-bit comparisons)."""
    return 2.0 * hi


def _ladder(lo: float, hi: float, steps_per_octave: int) -> Tensor:
    """Thresholds lo * rho^i (i = 1..n, rho = 2^(1/steps)) covering [lo, hi]."""
    if not (MIN_DOMAIN <= lo < hi):
        raise ValueError(f"domain must satisfy 2^-10 <= lo < hi (fixed-point resolution), got lo={lo}, hi={hi}")
    n = math.ceil(math.log2(hi / lo) * steps_per_octave)
    return lo * 2.0 ** (torch.arange(1, n + 1, dtype=torch.float64) / steps_per_octave)


def _piecewise_constant(x: Value, thresholds: Tensor, values: Tensor, bound: float) -> Value:
    """values[i] on [thresholds[i-1], thresholds[i]) (values[0] below thresholds[0], values[-1] above the last):
    one comparison batch (|x - t| < bound); the sum of bits times public constants is exact and free."""
    below = less_than(x, thresholds.tolist(), bound)  # [x < t_i]
    # start from the top segment and step down one segment for every threshold x is below
    return combine(below, values[:-1] - values[1:], float(values[-1]))


def reciprocal(x: Value, lo: float, hi: float, scale_bits: int = 0, steps_per_octave: int = 4, iterations: int = 3):
    """2^scale_bits / x for x in [lo, hi] (public, 2^-10 <= lo < hi).

    Initial guess piecewise constant on a geometric ladder of thresholds (relative error <= 0.087 with 4 steps
    per octave), then Newton y <- y (2 - x y / 2^scale_bits), whose relative error squares each iteration
    (0.087 -> 7.5e-3 -> 5.6e-5 -> 3e-9). scale_bits > 0 returns a scaled reciprocal with that many more
    significant bits, for x much larger than 1. Max error on [lo, hi]: relative 1e-4 plus 2^-16 absolute
    (MPC); the simulator reaches 1e-7 relative (its guesses are rounded to the grid too).
    Cost: one comparison batch of ceil(4 log2(hi/lo)) thresholds, then iterations x 2 products (4 rounds each);
    on [0.5, 512]: 20 rounds, 17.6 kB per element (CrypTen's reciprocal, wrong above ~200: 67 rounds, 1.6 kB).
    """
    t = _ladder(lo, hi, steps_per_octave)
    edges = torch.cat([torch.tensor([lo], dtype=torch.float64), t])  # left edge of each segment
    rho = 2.0 ** (1 / steps_per_octave)
    values = (1 << scale_bits) * 2 / (1 + rho) / edges  # x y0 in [2/(1+rho), 2 rho/(1+rho)) on each segment
    y = _piecewise_constant(x, t, on_grid(values), domain_bound(hi))
    for _ in range(iterations):
        y = mul(y, 2 - mul(x, y, shift=scale_bits))
    return y


def inv_sqrt(x: Value, lo: float, hi: float, scale_bits: int = 0, steps_per_octave: int = 4, iterations: int = 2):
    """2^scale_bits / sqrt(x) for x in [lo, hi] (public, 0 < lo < hi).

    Initial guess piecewise constant on a geometric ladder (x y0^2 within [0.92, 1.09] with 4 steps per
    octave), then Newton y <- y (3 - x y^2) / 2, whose relative error goes 0.09 -> 5.7e-3 -> 2.4e-5 -> 9e-10.
    Needs 2^scale_bits / sqrt(lo) < 2^15 (products stay below 2^30). Max relative error on [lo, hi]:
    5e-5 + 2^-16 * sqrt(x) / 2^scale_bits (MPC). Cost: one comparison batch of ceil(4 log2(hi/lo)) thresholds,
    then iterations x 3 products (6 rounds each); on [2^-6, 2^14]: 20 rounds, 35 kB per element (per row of a
    norm; CrypTen's inv_sqrt, wrong outside ~[0.1, 100]: 41 rounds, 0.75 kB).
    """
    t = _ladder(lo, hi, steps_per_octave)
    edges = torch.cat([torch.tensor([lo], dtype=torch.float64), t])
    rho = 2.0 ** (1 / steps_per_octave)
    values = (1 << scale_bits) * math.sqrt(2 / (1 + rho)) / edges.sqrt()
    y = _piecewise_constant(x, t, on_grid(values), domain_bound(hi))
    for _ in range(iterations):
        half_xyy = mul(mul(x, y), y, shift=2 * scale_bits + 1)  # x y^2 / 2 in units of 2^(2 scale_bits)
        y = mul(y, 1.5 - half_xyy)
    return y


def _relu_minus_tail(x: Value, table: TailTable, bound: float) -> Value:
    """relu(x) - k(|x|) with k piecewise polynomial (see TailTable): one comparison batch for the sign and the
    piece boundaries (|x| + the last cut < bound), one product for |x| normalised per piece, the powers, and one
    product selecting pieces."""
    cuts = table.cuts
    pieces = list(zip(cuts[:-1], cuts[1:]))
    bits = less_than(x, [0.0] + [c for cut in cuts[1:] for c in (cut, -cut)], bound)
    neg = bits[0]
    outside = [1 - bits[2 * i + 1] + bits[2 * i + 2] for i in range(len(cuts) - 1)]  # [|x| >= cut_i], i >= 1
    # t_j = (2|x| - lo - hi) / (hi - lo) = w_j x - 2 w_j neg x - b_j, with w_j = 2 / (hi - lo)
    w = on_grid([2 / (hi - lo) for lo, hi in pieces]).view(-1, *([1] * x.dim()))
    b = on_grid([(lo + hi) / (hi - lo) for lo, hi in pieces]).view(-1, *([1] * x.dim()))
    wx = mul(x.unsqueeze(0), w)
    t = wx - 2 * mul(neg.unsqueeze(0), wx) - b
    p = powers(t, len(table.coeffs[0]) - 1)  # [degree, pieces, ...]
    coeffs = on_grid(table.coeffs)  # [pieces, degree + 1]
    shape = (len(pieces),) + (1,) * x.dim()
    values = combine(p, coeffs[:, 1:].T.reshape(-1, *shape), coeffs[:, 0].view(shape))  # [pieces, ...]
    # piece j is selected where cut_j <= |x| < cut_{j+1}; relu(x) = (1 - neg) x
    inside = [(1 - outside[0]) if j == 0 else outside[j - 1] - outside[j] for j in range(len(pieces))]
    selected = mul(stack([1 - neg, *inside]), cat([x.unsqueeze(0), values]))
    return selected[0] - selected[1:].sum(0)


def relu(x: Value, bound: float = VALUE_BOUND) -> Value:
    """max(x, 0) for |x| < bound: one comparison and one bit-times-value product (exact): `select`."""
    return select(ge(x, 0.0, bound), x, 0.0)


def gelu(x: Value, bound: float = VALUE_BOUND) -> Value:
    """GeLU (erf form) for |x| < bound - 5 (2^15 - 5 by default): relu(x) - k(|x|), k(a) = a Phi(-a) in two
    degree-6 pieces on [0, 5), zero beyond. Max abs error 7e-5 in the simulator, 1e-4 in MPC (and within 5e-4 of
    the tanh form). Cost: one comparison batch (5 thresholds) and 5 product rounds: 18 rounds, 2.8 kB per element
    with CrypTen comparisons; 11 rounds with FSS comparisons (5 x 8 bytes of them)."""
    return _relu_minus_tail(x, GELU, bound)


def silu(x: Value, bound: float = VALUE_BOUND) -> Value:
    """SiLU for |x| < bound - 12: relu(x) - k(|x|), k(a) = a sigmoid(-a) in two degree-6 pieces on [0, 12), zero
    beyond. Max abs error 2.2e-4 in the simulator, 2.5e-4 in MPC. Cost as `gelu`."""
    return _relu_minus_tail(x, SILU, bound)


MASK_FILL = 1.0e4  # masked scores before the max; any finite value below every real score works
SCORE_LIMIT = 2.0**13  # softmax inputs: |score| < 2^13 (q.k / sqrt(d) of real models stays far below it)
SOFTMAX_BOUND = 2.0**15  # > MASK_FILL + SCORE_LIMIT and 2 SCORE_LIMIT + EXP.clip: the softmax's comparison range


def row_max(x: Value, bound: float = VALUE_BOUND) -> Value:
    """Max over the last dim (keepdim), exact, for entries whose pairwise differences stay below `bound`.
    MPC: a tournament of ceil(log2 n) levels, each one comparison batch and one select (a bit-times-difference
    product, no truncation): n - 1 comparisons. CrypTen comparisons: 9 rounds per level, rows of 128: 63 rounds,
    460 bytes per element; FSS: 2 rounds per level (CrypTen's x.max(dim) also builds the argmax one-hot, an
    equality test of every element against the max and a random tie break: 79 rounds, 1.34 kB per element).
    The simulator computes the max directly but checks the bound as every level would."""
    if not is_private(x):
        if x.shape[-1] > 1:
            compare.check_range(x.amax(-1) - x.amin(-1), bound)
        return x.amax(-1, keepdim=True)
    cur = x
    while cur.shape[-1] > 1:
        k = cur.shape[-1] // 2
        left, right, rest = cur[..., :k], cur[..., k : 2 * k], cur[..., 2 * k :]
        cur = cat([select(ge(left, right, bound), left, right), rest], dim=-1)
    return cur


def softmax(
    x: Value,
    mask: Tensor | None = None,
    bound: float | Tensor | None = None,
    score_range: float | None = None,
    exp_fn: Callable[[Value], Value] | None = None,
    reciprocal_fn: Callable[[Value, float, float, int], Value] | None = None,
) -> Value:
    """Softmax over the last dim with a public 0/1 `mask` (False = excluded; rows with nothing valid give 0).

    Without `bound`, subtracts the row max (`row_max`). With a public `bound` >= every score (a number, or a
    tensor broadcasting against x[..., :1]) it subtracts the bound and skips the max entirely. The exp:
    * score_range None: `exp_neg`, whose inputs are clipped to [-14, 0] by comparisons (with a bound, scores
      above it saturate rather than overflow);
    * score_range R (public, at most RANGE_EXP_SAFE = 150): `exp_range`, no comparison at all. The caller
      states that every visible score lies within R below the max (or the bound). Entries down to 150 below are
      still right (e^x < 2^-16 there); deeper ones are garbage in their own entry, and with a bound, scores
      above it by more than ~9 overflow (exp_range's domain): calibrate the bound with a margin.
    Masked entries go to 0 before exp and are zeroed after it by exact public products (before the max they
    are set to -1e4, far inside the fixed-point range). Comparison ranges: scores |x| < SCORE_LIMIT = 2^13 (and a
    bound within it), so the max's differences and exp_neg's input stay below SOFTMAX_BOUND = 2^15 (FSS n = 32).
    The normaliser 2^a / sum (a = ceil(log2 n)) keeps 16 significant bits for long rows.

    Error (max over entries, checked in tests): with the max, |p - p_ref| <= 3e-4 + n 2^-17 with exp_neg,
    2^-15 + n 2^-17 with exp_range (the n 2^-17 term is the sum of n rounded exps); with a bound, that times
    e^(bound - max), as every e^(x - bound) shrinks by that factor while the rounding does not.
    Cost per party (`python -m bench.mpc_ops`), 8 rows of 128: max + exp_neg 108 rounds, 1.41 kB per score;
    max + exp_range 102, 1.02 kB; bound + exp_neg 46, 1.53 kB; bound + exp_range 39, 0.68 kB (CrypTen's softmax,
    with exact truncation: 155 rounds, 1.65 kB). 8 rows of 1024, max + exp_range: 129 rounds, 0.93 kB.
    """
    n = x.shape[-1]
    if mask is not None:
        mask = torch.as_tensor(mask).bool()
        try:
            torch.broadcast_shapes(mask.shape, tuple(x.shape))
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to scores {tuple(x.shape)}"
            ) from None
    if score_range is not None and not 0 < score_range <= RANGE_EXP_SAFE:
        raise ValueError(f"score_range must lie in (0, {RANGE_EXP_SAFE}] (exp_range's domain), got {score_range}")
    if bound is None:
        if mask is not None:
            x = mask_multiply(x, mask) - MASK_FILL * (~mask).double()
        d = x - row_max(x, SOFTMAX_BOUND)
        lo = 0.5  # the max's own term is e^0 = 1
    else:
        d = x - on_grid(bound).to(x.dtype if not is_private(x) else torch.float64)
        lo = 2.0**-10
    # exp_fn: a caller's exp of d <= 0 (arith.lut.exp) instead of the above; reciprocal_fn: a caller's
    # (x, lo, hi, scale_bits) -> 2^scale_bits / x (arith.lut.reciprocal) instead of the ladder + Newton below
    if exp_fn is not None:  # masked entries: exp(0), zeroed below
        e = exp_fn(d if mask is None else mask_multiply(d, mask))
    elif score_range is None:
        e = exp_neg(d, clip_top=bound is not None, bound=SOFTMAX_BOUND)
    else:
        e = exp_range(d if mask is None else mask_multiply(d, mask))  # masked: exp(0), zeroed below
    if mask is not None:
        e = mask_multiply(e, mask)
    total = e.sum(-1, keepdim=True)
    if mask is not None:
        empty = ~mask.expand(*x.shape).any(-1, keepdim=True)
        total = total + empty.double()  # a row with nothing valid divides 0 by 1
    hi = 1.01 * n + 1
    a = math.ceil(math.log2(hi))
    # with one-round comparisons a 4x finer guess ladder replaces a Newton iteration (4 rounds): relative error
    # 0.022 -> 4.7e-4 -> 2.2e-7 (below the 2^-16 grid), at 16 thresholds per octave instead of 4 (one comparison
    # batch either way, per row)
    if reciprocal_fn is not None:
        return mul(e, reciprocal_fn(total, lo, hi, a), shift=a)
    steps, iterations = (16, 2) if compare.mode() == "fss" else (4, 3)
    return mul(e, reciprocal(total, lo, hi, scale_bits=a, steps_per_octave=steps, iterations=iterations), shift=a)


def argmax(x: Value, bound: float = VALUE_BOUND) -> Value:
    """One-hot of the first maximum over the last dim (ties go to the lower index, as torch.argmax), for entries
    whose pairwise differences stay below `bound`.

    A tournament: L = ceil(log2 n) levels of pairwise comparisons (n - 1 in all) carry the larger value up (one
    comparison round and one select round per level, no select after the final pair). Entry i is the argmax when
    it won at every level: its one-hot bit is the product, over the levels, of its ancestor's factor there (the
    pair's comparison bit, its complement, or 1 where the node passed the level unpaired). The product over a run
    of levels a..b depends only on the node at level a, so runs are multiplied pairwise in a balanced tree, each
    at its first level's node count (public gathers are local): ceil(log2 L) product rounds of 0/1 bits (exact,
    no truncation), ~n per round. MPC: 2 L - 1 + ceil(log2 L) rounds (264 logits: 21). The one-hot is
    arithmetic shares of bits (scale 1), the gather matrix of a selection as it is.
    """
    n = x.shape[-1]
    if n == 1:  # a single candidate
        ones = torch.ones(tuple(x.shape))
        return crypten.cryptensor(ones, src=0, precision=0) if is_private(x) else ones.to(x.dtype)
    runs = []  # per run of levels: (factor per node of its first level, that node's node after the run)
    cur = x
    while cur.shape[-1] > 1:
        m, k = cur.shape[-1], cur.shape[-1] // 2
        left, right, rest = cur[..., 0 : 2 * k : 2], cur[..., 1 : 2 * k : 2], cur[..., 2 * k :]
        left_wins = ge(left, right, bound)
        one = mask_multiply(left_wins[..., :1], torch.zeros(1)) + 1
        node = torch.arange(m)
        paired = node < 2 * k
        index = torch.where(paired, node // 2 + k * (node % 2), 2 * k)  # into [bits, 1 - bits, 1]
        parent = torch.where(paired, node // 2, node - k)  # pair p -> node p, unpaired 2k + r -> node k + r
        runs.append((cat([left_wins, 1 - left_wins, one], dim=-1).index_select(-1, index), parent))
        cur = cat([select(left_wins, left, right), rest], dim=-1) if m > 2 else left  # the final winner: unused
    while len(runs) > 1:  # adjacent runs (a, b): a's factor times b's at a's nodes' ancestors, one product round
        pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
        firsts = cat([fa for (fa, _), _ in pairs], dim=-1)
        seconds = cat([fb.index_select(-1, up_a) for (_, up_a), (fb, _) in pairs], dim=-1)
        products, start = mul(firsts, seconds), 0
        merged = []
        for (fa, up_a), (_, up_b) in pairs:
            merged.append((products[..., start : start + fa.shape[-1]], up_b[up_a]))
            start += fa.shape[-1]
        runs = merged + runs[2 * len(pairs) :]
    return runs[0][0]
