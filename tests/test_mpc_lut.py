"""Table nonlinearities from DPF lookups (mpcache/mpc/arith/lut.py): the simulator against plaintext over the whole
input line, 2PC (two local parties, keys from the in-process dealer) against the simulator and plaintext, the
secret lookup itself (exact, several tables and widths in one round), rounds, bytes and dealer bytes per element,
table sizes, and the errors for bad tables / providers / ranges."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpcache.mpc.arith import lut
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.fss import batch as fss_batch
from mpcache.mpc.transport.local import LocalParties

EXP_REL, EXP_ABS = 2.5e-4, 4.5e-5  # lut.exp's documented error: relative + the tables' rounding
REFS = {"silu": F.silu, "gelu": F.gelu}
POWER_REL = 3.06e-5  # lut.inv_sqrt / lut.reciprocal in 2PC: the 16-bit table's grid, plus 2^-16 / y (the output's)
SIM_REL = 1.53e-5  # the simulator: the nearest centre
# (function, domain lo, hi, scale_bits): the bundled model's norms (d = 256, k = 2, c = 13) and the softmax's row sum
# (with the max: lo 0.5; with a bound: lo 2^-10; rows up to 2048)
POWER_DOMAINS = {
    "norm": ("inv_sqrt", 1.0, 2.0**34, 14),
    "smollm2_norm": ("inv_sqrt", 2.25, 576 * 2.0**26, 14),
    "softmax": ("reciprocal", 0.5, 1.01 * 2048 + 1, 12),
    "softmax_bound": ("reciprocal", 2.0**-10, 1.01 * 2048 + 1, 12),
}


def _power_inputs(lo: float, hi: float, count: int) -> torch.Tensor:
    """Log-spaced over [lo, 2 hi) (the comparisons' range) plus every octave edge and its neighbours, on the
    2^-16 grid (what 2PC holds)."""
    x = torch.exp(torch.linspace(np.log(lo), np.log(2 * hi), count, dtype=torch.float64))[:-1]
    edges = 2.0 ** torch.arange(-12, 38, dtype=torch.float64)
    edges = edges[(edges >= lo) & (edges < 2 * hi)]
    x = torch.cat([x, edges, edges - 2.0**-16, edges + 2.0**-16, torch.tensor([lo, 2 * hi - 1.0])])
    return (torch.round(x * 2**16) / 2**16).clamp(lo, 2 * hi - 2.0**-16)


def _power_ref(name: str, x: torch.Tensor) -> torch.Tensor:
    fn, _, _, scale_bits = POWER_DOMAINS[name]
    return 2.0**scale_bits * (x.rsqrt() if fn == "inv_sqrt" else 1 / x)


def _power_ok(name: str, y: torch.Tensor, x: torch.Tensor, rel: float = POWER_REL, slack: float = 1.0) -> float:
    """The worst error over the documented bound rel + 2^-16 / y (1.0: exactly at the bound)."""
    ref = _power_ref(name, x)
    return float(((y - ref).abs() / (rel * ref + slack * 2.0**-16)).max())


POWER_ROWS = {name: (dom[0], _power_inputs(*dom[1:3], 1500), dom[1:]) for name, dom in POWER_DOMAINS.items()}
SPECS = {"silu": lut.SILU, "gelu": lut.GELU}


def _exp_ok(e: torch.Tensor, d: torch.Tensor) -> bool:
    ref = torch.exp(d)
    return bool(((e - ref).abs() <= EXP_REL * ref + EXP_ABS).all())


def test_exp_simulator_over_its_whole_domain():
    d = torch.linspace(-40.0, lut.EXP.top, 400_001, dtype=torch.float64)
    e = lut.exp(d)
    assert _exp_ok(e, d)
    assert float(e[d < -lut.EXP.clip].abs().max()) == 0.0  # clipped to 0: e^-15.47 < 2e-7
    # the relative bound is tight: the grid step u = 2^-12 shows (a wrong centring would double it)
    near = d > -0.5
    worst = float(((e - torch.exp(d)).abs() / torch.exp(d))[near].max())
    assert 1.5e-4 < worst < EXP_REL + EXP_ABS / np.exp(-0.5)


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_activation_simulator_over_the_whole_line(name):
    x = torch.linspace(-200.0, 200.0, 800_001, dtype=torch.float64)
    err = (lut.activation(x, SPECS[name]) - REFS[name](x)).abs()
    assert float(err.max()) <= lut.MAX_ERROR[name]
    assert float(err.max()) > lut.MAX_ERROR[name] / 4  # the bound is measured, not loose
    inside = x.abs() < SPECS[name].clip
    assert float(err[~inside].max()) < 2e-5  # the identity / zero beyond the clip


def test_table_sizes_and_zero_halves():
    t_hi, t_lo = lut.EXP.tables()
    assert t_hi.shape == (1 << 9,) and t_lo.shape == (1 << 9,)
    assert (t_lo[256:] == 0).all() and (t_lo[:256] > 0).all()  # the clip bit's half is zero
    assert t_hi[0] == round(np.exp(0) * 2**16) and t_hi[-1] > 2**16  # signed: the top entries are d > 0
    for spec in SPECS.values():
        table = spec.tables()
        assert table.shape == (1 << spec.width, 2) and spec.width == 11
        half = 1 << (spec.index_bits + 1)
        assert (table[half:] == 0).all()
        assert (table[: half // 2] == table[half // 2 : half]).all()  # both halves of the parts' sum agree
    with pytest.raises(ValueError, match="two grid steps"):
        lut.ActLut("silu", frac_bits=4, index_bits=9, clip=16.0)


def test_simulator_checks_the_declared_range():
    with pytest.raises(ValueError, match="declared range"):
        lut.exp(torch.tensor([-(2.0**15) - 20.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="declared range d <= 0.4375"):
        lut.exp(torch.tensor([0.0, 0.5], dtype=torch.float64))  # above the table's top: H would wrap
    with pytest.raises(ValueError, match="declared range"):
        lut.silu(torch.tensor([40.0], dtype=torch.float64), bound=20.0)


# --------------------------------------------------------------------------------------------------------- 2PC


def _party(x: torch.Tensor, d: torch.Tensor, index: torch.Tensor, tables: list[np.ndarray], rows: dict) -> dict:
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    out = {}

    def measured(name, fn, reveal=True):
        before = dict(N.counters())
        value = fn()
        after = N.counters()
        out[name] = (N.decode(value) if reveal else value, {k: after[k] - before[k] for k in after})

    ex, ed = crypten.cryptensor(x, src=0), crypten.cryptensor(d, src=1)
    ei = crypten.cryptensor(index, src=0, precision=0)
    measured("exp", lambda: lut.exp(ed))
    measured("silu", lambda: lut.silu(ex))
    measured("gelu", lambda: lut.gelu(ex))
    measured("lookup", lambda: lut.lookup([(ei.share, 9, tables[0]), (ei.share, 4, tables[1])]), reveal=False)
    for name, (fn, values, lo, hi, scale_bits) in rows.items():
        call = functools.partial(getattr(lut, fn), crypten.cryptensor(values, src=1), lo, hi, scale_bits)
        measured(name, call)
    crypten.cfg.communicator.verbose = False
    return out


@pytest.fixture(scope="module")
def two_party():
    rng = np.random.default_rng(0)
    x = torch.cat([torch.linspace(-30, 30, 3001, dtype=torch.float64), torch.tensor([0.0, -14.0, 14.0, 6.0, -6.0])])
    d = torch.cat([torch.linspace(-25, lut.EXP.top, 3001, dtype=torch.float64), torch.tensor([0.0, -lut.EXP.clip])])
    index = torch.from_numpy(rng.integers(-(1 << 20), 1 << 20, size=(7, 11)))
    tables = [rng.integers(-(1 << 62), 1 << 62, size=(1 << 9, 3)), rng.integers(-(1 << 40), 1 << 40, size=1 << 4)]
    with LocalParties(setup=N.install, timeout=300) as p:
        res = p.run(_party, x, d, index, tables, {k: (fn, x, *dom) for k, (fn, x, dom) in POWER_ROWS.items()})
    return res, x, d, index, tables


def test_2pc_exp_and_activations_match_plaintext_and_simulator(two_party):
    res, x, d, _, _ = two_party
    e, cost = res[0]["exp"]
    assert _exp_ok(e, d)
    assert float((e - lut.exp(d)).abs().max()) <= 2 * EXP_REL  # the carry moves an index by one grid step at most
    assert cost["rounds"] == 4
    # CrypTen's counter (both ways): 8 compare + 8 lookups + 48 product per element; messages padded to 8 bytes
    assert 0 <= cost["bytes"] - 64 * d.numel() < 32
    t_hi, t_lo = lut.EXP.tables()
    dealer = fss_batch.batch_bytes("compare", 32, d.numel()) + 2 * fss_batch.batch_bytes("lut", 9, d.numel())
    assert cost["dealer_bytes"] >= dealer  # plus the product's Beaver and truncation tuples (party 0)
    for name in ("silu", "gelu"):
        y, cost = res[0][name]
        assert float((y - REFS[name](x)).abs().max()) <= lut.MAX_ERROR[name]
        assert cost["rounds"] == 4 and 0 <= cost["bytes"] - 100 * x.numel() < 32
    assert torch.equal(res[0]["exp"][0], res[1]["exp"][0])


def test_2pc_lookup_is_exact_and_one_round(two_party):
    res, _, _, index, tables = two_party
    (s0, s1), cost = res[0]["lookup"][0], res[0]["lookup"][1]
    (t0, t1) = res[1]["lookup"][0]
    got_a, got_b = s0 + t0, s1 + t1  # Z_2^64 sums of the two parties' shares
    idx = index.numpy()
    assert np.array_equal(got_a.numpy(), tables[0][idx & 511])
    assert np.array_equal(got_b.numpy(), tables[1][idx & 15])
    assert got_a.shape == (7, 11, 3) and got_b.shape == (7, 11)
    assert cost["rounds"] == 1
    assert cost["bytes"] == 2 * 8 * -(-3 * index.numel() // 8)  # 2 + 1 bytes per element, one padded message
    assert cost["dealer_bytes"] == fss_batch.batch_bytes("lut", 9, index.numel()) + fss_batch.batch_bytes(
        "lut", 4, index.numel()
    )


def test_lookup_needs_lut_keys_and_full_tables():
    class NoKeys:
        pass

    provider = N.crypten.mpc.get_default_provider
    try:
        N.crypten.mpc.get_default_provider = lambda: NoKeys()
        with pytest.raises(ValueError, match="lookup keys"):
            lut.lookup([(torch.zeros(3, dtype=torch.long), 4, np.zeros(16, np.int64))])
    finally:
        N.crypten.mpc.get_default_provider = provider
    N.install()
    with pytest.raises(ValueError, match="2\\^4 rows"):
        lut.lookup([(torch.zeros(3, dtype=torch.long), 4, np.zeros(8, np.int64))])


def test_softmax_with_table_exp_and_reciprocal():
    """lut.softmax (table exp, table reciprocal of the row sum) against torch over row lengths 1..2048,
    with masked entries and rows of small and large spread: within 2.5e-4 per probability."""
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.1, 1.0, 3.0, 10.0] * 4, dtype=torch.float64)[:, None]
    for n in (1, 2, 7, 300, 2048):
        x = torch.randn(16, n, generator=g, dtype=torch.float64) * spread
        mask = torch.rand(16, n, generator=g) > 0.2
        mask[:, 0] = True
        p = lut.softmax(x, mask)
        ref = torch.softmax(x.masked_fill(~mask, -1e9), -1)
        assert float((p - ref).abs().max()) < 2.5e-4, n
        assert not p[~mask].any()


# ------------------------------------------------------------------ per row: inverse square root and reciprocal


@pytest.mark.parametrize("name", list(POWER_DOMAINS))
def test_power_simulator_over_the_whole_domain(name):
    """The octave + 16-bit table within its documented relative error on every x of [lo, 2 hi) (the comparisons'
    whole range), the bound measured (not loose); x in [L / B, L) still read the table (the grid's relative error
    grows as 1 / m there: up to B times), below it the value saturates."""
    fn, lo, hi, scale_bits = POWER_DOMAINS[name]
    x = _power_inputs(lo, hi, 400_001)
    y = getattr(lut, fn)(x, lo, hi, scale_bits)
    worst = _power_ok(name, y, x, rel=SIM_REL, slack=0.0)
    assert 0.9 < worst <= 1.0
    ref = _power_ref(name, x)
    assert abs(float(((y - ref) / ref).mean())) < SIM_REL / 10  # unbiased: sums over many rows do not drift
    spec = lut.INV_SQRT if fn == "inv_sqrt" else lut.RECIPROCAL
    base = 1 << spec.base_bits
    low = 2.0 ** (spec.base_bits * np.floor(np.log2(lo) / spec.base_bits))  # L
    below = torch.round(torch.tensor([low / base, low / 2, low * 0.99]) * 2**16) / 2**16  # on the input's grid
    ref = _power_ref(name, below)
    assert float(((getattr(lut, fn)(below, lo, hi, scale_bits) - ref).abs() / ref).max()) <= base * SIM_REL
    tiny = torch.tensor([low / 64, low / 1000])
    saturated = 2.0**scale_bits * (base / low) ** spec.power  # the value at m = 1 / B: twice the domain's top
    assert (getattr(lut, fn)(tiny, lo, hi, scale_bits) == saturated).all()


def test_power_tables_and_plans():
    for spec in (lut.INV_SQRT, lut.RECIPROCAL):
        t = spec.table()
        assert t.shape == (1 << 16,) and (np.diff(t) <= 0).all()  # decreasing in m
        assert t[-1] == round(2.0**32 * 2.0 ** (-spec.power * spec.base_bits))  # m -> B: B^-p = 1/2
    plan = lut.INV_SQRT.plan(1.0, 2.0**34, 14)  # the bundled model's norms: 17 comparisons, not a ladder's 1088
    assert plan.thresholds == tuple(4.0**j for j in range(1, 18))
    assert lut.RECIPROCAL.plan(0.5, 2069.48, 12).thresholds == tuple(2.0**j for j in range(0, 13))


def test_power_refuses_what_it_cannot_hold():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="2\\^-10 <= lo < hi"):
        lut.inv_sqrt(x, 2.0**-12, 4.0)
    with pytest.raises(ValueError, match="2\\^-10 <= lo < hi"):
        lut.reciprocal(x, 4.0, 4.0)
    with pytest.raises(ValueError, match="too wide for the ring"):
        lut.inv_sqrt(x, 2.0**-10, 2.0**47)
    with pytest.raises(ValueError, match="does not fit the ring"):
        lut.reciprocal(x, 1.0, 2.0**20, scale_bits=40)
    with pytest.raises(ValueError, match="declared range"):  # above 2 hi: the comparisons would wrap in 2PC
        lut.inv_sqrt(torch.tensor([300.0]), 1.0, 100.0)
    with pytest.raises(ValueError, match="negative"):
        lut.reciprocal(torch.tensor([-0.5, 1.0]), 0.5, 100.0)


def test_2pc_power_matches_plaintext_and_simulator(two_party):
    """2PC within the simulator's bound plus the output's last unit (exact truncation), on the same inputs; rounds,
    bytes and dealer bytes per row as documented (lut.power)."""
    res = two_party[0]
    for name, (fn, x, (lo, hi, scale_bits)) in POWER_ROWS.items():
        y, cost = res[0][name]
        assert torch.equal(y, res[1][name][0])
        assert _power_ok(name, y, x, slack=1.0) <= 1.0, name
        sim = getattr(lut, fn)(x, lo, hi, scale_bits)
        assert float(((y - sim).abs() - 2 * POWER_REL * sim).max()) <= 2.0**-16, name
        plan = (lut.INV_SQRT if fn == "inv_sqrt" else lut.RECIPROCAL).plan(lo, hi, scale_bits)
        n = N.compare.width(plan.bound, 2**16)
        rows, comparisons = x.numel(), len(plan.thresholds)
        assert cost["rounds"] == 5
        # CrypTen's counter, both ways: comparisons ceil(n/8) B each, lookup 2 B, two Beaver products 16 B,
        # one truncation 8 B, per row and party; each FSS message padded to 8 bytes
        sent = comparisons * (-(-n // 8)) + 2 + 16 + 16 + 8
        assert 0 <= cost["bytes"] - 2 * sent * rows < 32, name
        keys = fss_batch.batch_bytes("compare", n, comparisons * rows) + fss_batch.batch_bytes("lut", 16, rows)
        assert keys <= cost["dealer_bytes"] <= keys + 100 * rows, name
