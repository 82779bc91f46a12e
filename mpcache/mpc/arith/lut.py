"""Nonlinearities from dealer lookup tables (SIGMA's approach): exp for the softmax, SiLU and GeLU, each from one
round of DPF table lookups (mpcache.mpc.fss.lut) plus one comparison round and one product; per row, the softmax's
reciprocal and the norms' inverse square root from the octave (one comparison batch), a normalising product and one
lookup (`PowerLut`).

The lookup. A secret index i (additive shares in Z_2^64 of a value whose residue mod 2^n is the index) is masked
with the dealer's r, opened as (i + r) mod 2^n (ceil(n/8) bytes per party), and each party evaluates its DPF key
over the whole domain: the shares of T[i mod 2^n] for public tables T, in one round (`lookup`). Several lookups
(any widths) share one round. Dealer: tree.Corrections per element (~200 B at n = 9, fss.batch.batch_bytes).

Indices from shares, locally. The tables are indexed by x truncated to a grid of step h = 2^(s - 16) (x at
CrypTen's 2^16 scale): each party shifts its own share right by s. That truncation is off by a carry c in {0, 1}
(the low parts of the two shares may sum past 2^s) but never by the 2^(64 - s) of SecureML's local truncation,
because the index is only used mod 2^n with n <= 64 - s. Two consequences shape every table below:
* the carry moves x's index down by one step: x / h - index lies in [0, 2) (tables are centred on that interval),
  and the low parts r = r_0 + r_1 (each party's s low bits) give x = h * index + r * 2^-16 exactly;
* each party's index part reduced mod 2^m is in [0, 2^m), so the SUM of the parts is a known-range value in
  [0, 2^(m+1)) whose residue mod 2^m is x's index mod 2^m. A secret 0/1 bit c (a comparison's share) added at
  2^(m+1) then lands in a separate half of a (m+2)-bit table: the clipping of out-of-range inputs costs no
  product (an index that wrapped is harmless: the clip bit sends it to the zero half).

What each learns: as for every FSS gate (fss/__init__.py): the opened values are uniform; the dealer its keys.

Every function has a float simulator path (the same tables and index arithmetic without the random carry), and
states its measured maximum error (tests/test_mpc_lut.py measures them over the whole input range).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor

from mpcache.mpc import fss
from mpcache.mpc.arith import compare
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.arith.crypten_compat import import_crypten
from mpcache.mpc.fss import batch as fss_batch

crypten = import_crypten()
from crypten.mpc import MPCTensor  # noqa: E402

Value = N.Value
SCALE = N.SCALE

# ---------------------------------------------------------------------------------------------------------------
# The secret lookup
# ---------------------------------------------------------------------------------------------------------------


def lookup(items: Sequence[tuple[Tensor, int, np.ndarray]]) -> list[Tensor]:
    """Shares of tables[index mod 2^n] for each (index shares int64 [...], n, tables int64 (2^n,) or (2^n, k)), all
    in ONE round. Returns this party's raw Z_2^64 shares, index.shape (+ (k,)), as int64 tensors."""
    provider = crypten.mpc.get_default_provider()
    if not hasattr(provider, "lut_keys"):
        raise ValueError(
            f"table lookups need a tuple provider with FSS lookup keys (numerics.LocalDealer or the dealer's), "
            f"got {type(provider).__name__}"
        )
    batches, messages = [], []
    for index, n, tables in items:
        fss.LutKey.check_width(n)
        if np.shape(tables)[0] != 1 << n:
            raise ValueError(f"a {n}-bit lookup needs tables of 2^{n} rows, got shape {np.shape(tables)}")
        flat = index.contiguous().reshape(-1).numpy()
        keys = provider.lut_keys(n, flat.size) if flat.size else []
        own = [fss.lut_mask(k, s) for k, s in zip(keys, fss_batch.split(flat, keys))]
        batches.append((keys, index.shape, n, tables))
        messages.append((np.concatenate(own) if own else np.zeros(0, np.uint64), n))
    opened = compare.open_many(messages)
    out = []
    for (keys, shape, _, tables), y in zip(batches, opened):
        k = () if np.ndim(tables) == 1 else (np.shape(tables)[1],)
        if not keys:
            out.append(torch.zeros(*shape, *k, dtype=torch.long))
            continue
        z = np.concatenate([fss.lut_eval(key, v, tables) for key, v in zip(keys, fss_batch.split(y, keys))])
        out.append(torch.from_numpy(z).reshape(*shape, *k))
    return out


def _parts(share: Tensor, shift: int, bits: int) -> Tensor:
    """This party's index part: (share >> shift) mod 2^bits (the sum of both parts: module docstring)."""
    return (share >> shift) & ((1 << bits) - 1)


def _private(raw: Tensor, precision: int) -> MPCTensor:
    return MPCTensor.from_shares(raw, precision=precision)


def _encode(values: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(values, dtype=np.float64) * SCALE).astype(np.int64)


def _signed(j: np.ndarray, bits: int) -> np.ndarray:
    """j mod 2^bits read as a two's complement bits-bit integer."""
    j = j & ((1 << bits) - 1)
    return np.where(j >= 1 << (bits - 1), j - (1 << bits), j)


# ---------------------------------------------------------------------------------------------------------------
# exp for the softmax: two 9-bit lookups and one product
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpLut:
    """exp(d) for d <= 0 as T_hi[H] * T_lo[L]: v = -d on a grid of step u = 2^-frac_bits, split as
    v / u ~ 2^lo_bits H + L. The low part L = L_0 + L_1 (each party's lo_bits bits) is in [0, 2^(lo_bits+1)), so
    the clip bit [d < -clip] goes in at 2^(lo_bits+1) (a zero half of T_lo); H (hi_bits bits) is read signed with
    `negative` steps below zero, so d slightly above 0 (a loose softmax bound) stays exact."""

    frac_bits: int = 12  # u = 2^-12: relative error of the grid <= e^u - 1 = 2.4e-4
    lo_bits: int = 7
    hi_bits: int = 9
    negative: int = 16  # H in [-negative, 2^hi_bits - negative): d up to (negative 2^lo_bits - 2^(lo_bits+1)) u

    @property
    def shift(self) -> int:  # raw bits dropped below the grid
        return N.FRAC_BITS - self.frac_bits

    @property
    def clip(self) -> float:
        """Largest -d whose H stays below the signed range's top (2^hi_bits - negative - 1)."""
        return ((1 << self.hi_bits) - self.negative - 1) * (1 << self.lo_bits) / (1 << self.frac_bits)

    @property
    def top(self) -> float:
        """Largest d whose H (carry included) stays above -negative: the input's declared upper end."""
        return ((self.negative << self.lo_bits) - (2 << self.lo_bits)) / (1 << self.frac_bits)

    @property
    def lo_width(self) -> int:
        return self.lo_bits + 2

    @cache  # noqa: B019  (frozen dataclass: hashable, a handful of instances)
    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(T_hi (2^hi_bits,), T_lo (2^(lo_bits+2),)) on the 2^-16 grid; the product is e^-(v+u) ~ centred on the
        carry's two-step interval (see the module docstring): e^(-u (2^lo_bits H + L + 1))."""
        u = 2.0**-self.frac_bits
        hi = _signed(np.arange(1 << self.hi_bits), self.hi_bits)
        hi = np.where(hi < -self.negative, hi + (1 << self.hi_bits), hi)
        t_hi = np.exp(-u * (1 << self.lo_bits) * hi)
        j = np.arange(1 << self.lo_width)
        t_lo = np.where(j < 1 << (self.lo_bits + 1), np.exp(-u * (j + 1)), 0.0)
        return _encode(t_hi), _encode(t_lo)


EXP = ExpLut()
EXP_BOUND = N.SOFTMAX_BOUND  # |d + clip| < 2^15: the clip comparison's range (softmax inputs, as numerics)


def exp(d: Value, spec: ExpLut = EXP, bound: float = EXP_BOUND) -> Value:
    """exp(d) for d <= top (0.4375: a softmax bound may sit a little below a score), 0 below -clip (-15.47:
    e^-15.47 < 2e-7); the simulator refuses d > top.

    Max error (tests/test_mpc_lut.py, over [-20, 0.37]): relative 2.5e-4 + absolute 4.5e-5 (the tables' rounding)
    in 2PC and in the simulator. MPC: one comparison round ([d < -clip], 4 bytes), one lookup round (two 9-bit
    lookups, 2 bytes each), one product (Beaver + exact truncation, 24 bytes): 4 rounds, 32 bytes sent per element
    and party (CrypTen's counter: 64, both ways); dealer: two 9-bit DPF keys (~420 B) + one 32-bit DCF key.
    """
    t_hi, t_lo = spec.tables()
    clipped = N.less_than(d, [-spec.clip], bound)[0]  # the simulator checks the bound here
    if not N.is_private(d):  # the simulator refuses what 2PC would wrap silently, as comparisons do
        if d.numel() and float(d.max()) > spec.top:
            raise ValueError(f"{int((d > spec.top).sum())} exp inputs lie outside the declared range d <= "
                             f"{spec.top} (largest {float(d.max()):g}): the table index would wrap in 2PC")
        grid = torch.floor(-d * (1 << spec.frac_bits)).long()
        hi = (grid >> spec.lo_bits) & ((1 << spec.hi_bits) - 1)
        lo = (grid & ((1 << spec.lo_bits) - 1)) + (clipped.long() << (spec.lo_bits + 1))
        return (torch.from_numpy(t_hi)[hi].double() * torch.from_numpy(t_lo)[lo].double() / SCALE**2).to(d.dtype)
    v = -d.share  # shares of -d
    lo = _parts(v, spec.shift, spec.lo_bits) + (clipped.share << (spec.lo_bits + 1))
    hi = v >> (spec.shift + spec.lo_bits)
    e_hi, e_lo = lookup([(hi, spec.hi_bits, t_hi), (lo, spec.lo_width, t_lo)])
    return N.mul(_private(e_hi, N.FRAC_BITS), _private(e_lo, N.FRAC_BITS))


# ---------------------------------------------------------------------------------------------------------------
# SiLU and GeLU: a piecewise-linear table inside a clip range, the identity above it, 0 below it
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActLut:
    """f(x) = A[i] + B[i] r for |x| < clip, x above clip, 0 below -clip. The index i counts steps of h = 2^-frac_bits
    (index_bits bits, signed: the table spans [-2^(index_bits-1) h, 2^(index_bits-1) h)), r = x - i h in [0, 2h)
    (the carry's two steps), (A, B) the least-squares line of f on [i h, (i + 2) h). One (index_bits + 2)-bit
    lookup of both columns (the top half is zero: the clip bit)."""

    name: str
    frac_bits: int
    index_bits: int
    clip: float

    def __post_init__(self) -> None:
        half = (1 << (self.index_bits - 1)) / (1 << self.frac_bits)
        if not 0 < self.clip <= half - 2.0**(1 - self.frac_bits):
            raise ValueError(f"clip {self.clip} must leave two grid steps inside the table's range +-{half}")

    @property
    def shift(self) -> int:
        return N.FRAC_BITS - self.frac_bits

    @property
    def width(self) -> int:
        return self.index_bits + 2

    def f(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.asarray(x, dtype=np.float64))
        out = torch.nn.functional.silu(t) if self.name == "silu" else torch.nn.functional.gelu(t)
        return out.numpy()

    @cache  # noqa: B019
    def tables(self) -> np.ndarray:
        """(2^width, 2) int64: columns A (on the 2^-16 grid) and B (the slope per raw unit, times 2^16)."""
        h = 2.0**-self.frac_bits
        i = _signed(np.arange(1 << self.index_bits), self.index_bits).astype(np.float64)
        t = np.linspace(0.0, 2.0, 65)  # offsets in steps
        xs = (i[:, None] + t[None, :]) * h
        ys = self.f(xs)
        tm = t.mean()
        slope = ((t - tm) * (ys - ys.mean(1, keepdims=True))).sum(1) / ((t - tm) ** 2).sum()  # per step
        intercept = ys.mean(1) - slope * tm
        a = np.zeros((1 << self.width,))
        b = np.zeros((1 << self.width,))
        half = 1 << (self.index_bits + 1)
        j = np.arange(half) & ((1 << self.index_bits) - 1)
        a[:half], b[:half] = intercept[j], slope[j] / h  # B per unit of x
        return np.stack([_encode(a), _encode(b)], 1)  # B r: (slope 2^16) (r 2^16) = f's part at scale 2^32


# Measured max abs error over the whole line (tests/test_mpc_lut.py; 2PC within the same bound): SiLU 6.4e-4 (an
# 11-bit lookup; 8 index bits at h = 1/8: 2.6e-3 in a 10-bit one), GeLU 2.6e-4 (11 bits; h = 1/16: 1.0e-3). SiLU
# beyond 14 differs from x by < 1.2e-5, GeLU beyond 6 by < 6e-9.
SILU = ActLut("silu", frac_bits=4, index_bits=9, clip=14.0)
GELU = ActLut("gelu", frac_bits=5, index_bits=9, clip=6.0)
MAX_ERROR = {"silu": 6.5e-4, "gelu": 2.7e-4}


def activation(x: Value, spec: ActLut, bound: float = N.VALUE_BOUND) -> Value:
    """f(x) by `spec` for |x| < bound: one comparison round ([x < -clip], [x < clip]: 8 bytes), one lookup round
    (a (index_bits + 2)-bit lookup: 2 bytes), one Beaver round for B r and [x >= clip] x together (32 bytes),
    one truncation (8 bytes): 4 rounds, 50 bytes sent per element and party (CrypTen's counter: 100, both ways).
    Dealer: one DPF key (~250 B at 11 bits) and two 32-bit DCF keys. Errors: MAX_ERROR (tests)."""
    table = spec.tables()
    bits = N.less_than(x, [-spec.clip, spec.clip], bound)
    if not N.is_private(x):
        raw = torch.floor(x * SCALE)
        step = 1 << spec.shift
        grid = torch.div(raw, step, rounding_mode="floor")
        r = raw - grid * step
        outside = bits[0] + 1 - bits[1]
        j = (grid.long() & ((1 << spec.index_bits) - 1)) + (outside.long() << (spec.index_bits + 1))
        tab = torch.from_numpy(table).double()
        a, b = tab[j, 0], tab[j, 1]
        return ((a + b * r / SCALE) / SCALE + (1 - bits[1]) * x).to(x.dtype)
    outside = bits[0] + 1 - bits[1]
    above = 1 - bits[1]
    xs = x.share
    j = _parts(xs, spec.shift, spec.index_bits) + (outside.share << (spec.index_bits + 1))
    r = xs & ((1 << spec.shift) - 1)  # raw low bits: r_0 + r_1 in [0, 2^(shift+1))
    (ab,) = lookup([(j, spec.width, table)])
    coeffs = _private(torch.stack([ab[..., 1], above.share]), 0)
    prods = N.mul(coeffs, _private(torch.stack([r, xs]), 0)).share  # B r (scale 2^32), [x >= clip] x (scale 2^16)
    raw = prods[0] + (prods[1] << N.FRAC_BITS) + (ab[..., 0] << N.FRAC_BITS)
    return N._from_raw(raw, SCALE * SCALE)


def silu(x: Value, bound: float = N.VALUE_BOUND) -> Value:
    return activation(x, SILU, bound)


def gelu(x: Value, bound: float = N.VALUE_BOUND) -> Value:
    return activation(x, GELU, bound)


# ---------------------------------------------------------------------------------------------------------------
# softmax with the table exp
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Per-row reciprocal and inverse square root: normalise by the octave, then one table (SIGMA / LLAMA style)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLut:
    """2^scale_bits x^-p (p = 1 / base_bits: 1 the reciprocal, 1/2 the inverse square root) for x > 0 in a public
    domain [lo, hi], as 2^(scale_bits - l0 - e) T[m]: the octave e of x (x in [L B^e, L B^(e+1)), B = 2^base_bits,
    L = B^l0 the largest power of B <= lo) from ONE comparison batch against the powers L B^j (its one-hot is a
    difference of the bits: free), the mantissa m = x / (L B^e) in [1, B) from one product with the public factor
    sum_e onehot_e (L B^e)^-1, and T[m] ~ m^-p from ONE index_bits-bit lookup on m's top bits; every octave factor
    is a power of two, applied by one more product. The octaves cover [L, 2 hi] (the comparisons' range, as the
    ladders before); x in [L / B, L) still reads the table (its relative error grows as 1 / m there), below it T
    saturates at the value of m = 1 / B (and in 2PC x < L B 2^-index_bits, i.e. x = 0, may read the table's top
    entry: the carry moves index 0 to -1). No Newton step: the table's grid h = B 2^-index_bits alone gives a
    relative error <= h / 2 at m = 1 (p = 1/2, B = 4) and h at m = 1 (p = 1, B = 2): 3.1e-5 for both at 16 bits
    in 2PC (the carry moves the index by one step inside the centred interval), half that in the simulator (which
    reads the nearest centre, the carry's mean)."""

    base_bits: int  # 2: inverse square root (octaves of 4, factors 2^-e), 1: reciprocal (octaves of 2)
    index_bits: int = 16
    table_bits: int = 32  # T's fixed-point scale (its rounding, 2^-32, is far below the grid's)

    @property
    def power(self) -> float:
        return 1.0 / self.base_bits

    @cache  # noqa: B019
    def table(self) -> np.ndarray:
        """T[j] = 2^table_bits c^-p at the centre c = (j + 1) h of the carry's two grid steps (see the module
        docstring), m = j h on [0, B); c is kept >= 1 / B (the saturation below the domain)."""
        n, b = self.index_bits, self.base_bits
        centre = np.maximum((np.arange(1 << n) + 1.0) * 2.0 ** (b - n), 2.0**-b)
        return np.round(2.0**self.table_bits * centre ** -self.power).astype(np.int64)

    @cache  # noqa: B019
    def plan(self, lo: float, hi: float, scale_bits: int) -> _PowerPlan:
        """The public constants of one domain (raises ValueError for a domain the ring cannot hold)."""
        if not (N.MIN_DOMAIN <= lo < hi and math.isfinite(hi)):
            raise ValueError(f"domain must satisfy 2^-10 <= lo < hi (fixed-point resolution), got lo={lo}, hi={hi}")
        b, n = self.base_bits, self.index_bits
        bound = N.domain_bound(hi)
        l0 = math.floor(math.log2(lo) / b)
        octaves = max(1, math.ceil((math.log2(bound) - b * l0) / b))  # L B^octaves >= 2 hi
        e = np.arange(octaves)
        frac = max(b * (l0 + octaves - 1), n - N.FRAC_BITS - b)  # f = 1 / (L B^e) at scale 2^frac: integers
        if N.FRAC_BITS + frac + b > 62:  # x f = m 2^(16 + frac) < 2^(16 + frac + b) must stay below 2^62
            raise ValueError(f"domain [{lo:g}, {hi:g}] spans {octaves} octaves of 2^{b}: too wide for the ring")
        g_bits = max(0, octaves - 1 + l0 - scale_bits)  # octave factors 2^(scale_bits - l0 - e) at scale 2^g_bits
        if self.table_bits + 1 + g_bits + scale_bits - l0 > 62 or self.table_bits + g_bits < N.FRAC_BITS:
            raise ValueError(f"2^{scale_bits} x^-{self.power:g} on [{lo:g}, {hi:g}] does not fit the ring's products")
        return _PowerPlan(
            thresholds=tuple(float(2.0 ** (b * (l0 + j))) for j in range(1, octaves)),
            bound=bound,
            f_raw=tuple(int(v) for v in 2 ** (frac - b * (l0 + e))),
            g_raw=tuple(int(v) for v in 2 ** (g_bits + scale_bits - l0 - e)),
            shift=N.FRAC_BITS + frac + b - n,
            out_bits=self.table_bits + g_bits,
        )


@dataclass(frozen=True)
class _PowerPlan:
    thresholds: tuple[float, ...]  # L B^j, j = 1 .. octaves - 1
    bound: float  # the comparisons' range (numerics.domain_bound)
    f_raw: tuple[int, ...]  # per octave: 1 / (L B^e) at scale 2^frac
    g_raw: tuple[int, ...]  # per octave: 2^(scale_bits - l0 - e) at scale 2^(out_bits - table_bits)
    shift: int  # m's raw product bits dropped below the index
    out_bits: int  # scale of T g


INV_SQRT = PowerLut(base_bits=2)
RECIPROCAL = PowerLut(base_bits=1)


def _per_octave(bits: Value, values: Sequence[int]) -> Value:
    """sum_e onehot_e values[e] with onehot_0 = b_1, onehot_e = b_(e+1) - b_e, onehot_last = 1 - b_last for the
    bits b_j = [x < t_j]: local. Raw integer shares (the bits' scale is 1) or floats in the simulator."""
    v = torch.tensor(values, dtype=torch.long if N.is_private(bits) else torch.float64)
    w = (v[:-1] - v[1:]).view(-1, *([1] * (bits.dim() - 1)))
    if not N.is_private(bits):
        return (w * bits).sum(0) + v[-1]
    raw = (w * bits.share).sum(0)
    if N.crypten.communicator.get().get_rank() == 0:
        raw = raw + v[-1]
    return raw


def power(x: Value, lo: float, hi: float, scale_bits: int, spec: PowerLut) -> Value:
    """2^scale_bits x^-p for x in [lo, hi] (PowerLut); `inv_sqrt` and `reciprocal` give the measured errors.
    MPC, per row: one comparison round (octaves - 1 comparisons of ceil(n/8) bytes, n the width of |x| < 2 hi),
    one Beaver product x f (16 bytes, no truncation: the index comes from each party's own share shifted, as
    the exp's), one index_bits lookup (2 bytes), one Beaver product T g and its exact truncation (24 bytes):
    5 rounds. Dealer: octaves - 1 DCF keys, one DPF key, two Beaver triples and a truncation tuple."""
    plan = spec.plan(float(lo), float(hi), int(scale_bits))
    if N.is_private(x) and N._scale(x) != SCALE:
        raise ValueError(f"x must be at the 2^{N.FRAC_BITS} scale, got scale {N._scale(x)}")
    bits = N.less_than(x, plan.thresholds, plan.bound)  # the simulator checks |x - t| < 2 hi here
    f = _per_octave(bits, plan.f_raw)
    g = _per_octave(bits, plan.g_raw)
    n, table = spec.index_bits, spec.table()
    if not N.is_private(x):
        if x.numel() and float(x.min()) < 0:
            raise ValueError(f"{int((x < 0).sum())} inputs of x^-{spec.power:g} are negative (smallest "
                             f"{float(x.min()):g}): outside the declared domain [{lo:g}, {hi:g}]")
        raw_m = torch.floor(x.double() * SCALE) * f  # m 2^(16 + frac), as the 2PC product (exact in float64)
        # the nearest centre: 2PC's carry is a stochastic rounding of the index (carry probability 1 - the
        # fraction below the grid), so the simulator takes its mean and stays unbiased (sums of many rows)
        index = (torch.floor(raw_m / 2.0**plan.shift + 0.5).long() - 1).clamp(min=0)
        t = torch.from_numpy(table)[index].double()
        return (t * g / 2.0**plan.out_bits).to(x.dtype)
    from crypten.mpc.primitives import beaver

    f_shares = _private(f, 0)._tensor
    m = beaver.mul(x._tensor, f_shares).share  # m 2^(16 + frac) < 2^62: exact in the ring
    (t,) = lookup([(_parts(m, plan.shift, n), n, table)])
    raw = beaver.mul(_private(t, 0)._tensor, _private(g, 0)._tensor).share
    return N._from_raw(raw, 1 << plan.out_bits)


def inv_sqrt(x: Value, lo: float, hi: float, scale_bits: int = 0) -> Value:
    """2^scale_bits / sqrt(x) for x in [lo, hi] (public, 2^-10 <= lo < hi) from INV_SQRT (octaves of 4, a 16-bit
    table): numerics.inv_sqrt's ladder and Newton iterations replaced by one lookup. Max relative error over the
    whole domain (tests/test_mpc_lut.py): 3.1e-5 (the grid) + 2^-16 / y (the output's grid) in 2PC, 1.5e-5 in the
    simulator (PowerLut). Cost: `power`;
    a norm of the bundled model (x in [1, 2^34], scale_bits 14): 17 comparisons of 52 bits, 5 rounds."""
    return power(x, lo, hi, scale_bits, INV_SQRT)


def reciprocal(x: Value, lo: float, hi: float, scale_bits: int = 0) -> Value:
    """2^scale_bits / x for x in [lo, hi] (public, 2^-10 <= lo < hi) from RECIPROCAL (octaves of 2, a 16-bit
    table). Max relative error over the domain (tests): 3.1e-5 + 2^-16 / y in 2PC, 1.5e-5 in the simulator.
    Cost: `power`
    (the softmax's row sum over rows of n <= 2048: 12 comparisons of 30 bits, 5 rounds)."""
    return power(x, lo, hi, scale_bits, RECIPROCAL)


def softmax(x: Value, mask: Tensor | None = None, bound: float | Tensor | None = None) -> Value:
    """numerics.softmax with the table exp (`exp`) in place of the polynomial and the table reciprocal
    (`reciprocal`) of the row sum: the row max (or a public bound) is subtracted as there; masked entries are
    zeroed after the exp by exact public products. Max error (simulator, rows of 1..2048): |p - p_ref| <= 1.6e-4
    per entry (tests: 2.5e-4)."""
    return N.softmax(x, mask, bound, exp_fn=exp, reciprocal_fn=reciprocal)
