"""Table nonlinearities from DPF lookups (mpcache/mpc/arith/lut.py): the simulator against plaintext over the whole
input line, 2PC (two local parties, keys from the in-process dealer) against the simulator and plaintext, the
secret lookup itself (exact, several tables and widths in one round), rounds, bytes and dealer bytes per element,
table sizes, and the errors for bad tables / providers / ranges."""

from __future__ import annotations

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


def _party(x: torch.Tensor, d: torch.Tensor, index: torch.Tensor, tables: list[np.ndarray]) -> dict:
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
        res = p.run(_party, x, d, index, tables)
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


def test_softmax_with_table_exp_and_short_ladder():
    """lut.softmax (table exp, 32-step ladder, one Newton iteration) against torch over row lengths 1..2048,
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
