"""Exact 2PC truncation and the range-aware approximations of mpcache/mpc/arith/numerics.py.

Plain tests check the simulator (the approximations on float tensors) against the true functions; MPC tests
run two CrypTen parties (forked once per module) and check MPC against the true function, the simulator and
the error bounds stated in the docstrings.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpcache.mpc.arith import numerics as N
from mpcache.mpc.arith import ring
from mpcache.mpc.transport.local import LocalParties, PartyError


@pytest.fixture(scope="module")
def parties():
    with LocalParties(setup=N.install, timeout=300) as p:
        yield p


# ------------------------------------------------------------------------------------------ party functions


def _products(n: int, lo: float, hi: float, seed: int, exact: bool) -> tuple[int, float]:
    """n products x*y with |x|, |y| uniform in [lo, hi] and random signs; (count off by > 1e-2, max error)."""
    crypten = N.crypten
    crypten.cfg.mpc.provider = N.PROVIDER_NAME if exact else "TFP"
    g = torch.Generator().manual_seed(seed)
    x, y = [(torch.rand(n, generator=g) * (hi - lo) + lo) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
            for _ in range(2)]  # fmt: skip
    ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
    err = (N.decode(ex * ey) - N.decode(ex) * N.decode(ey)).abs()
    crypten.cfg.mpc.provider = N.PROVIDER_NAME
    return int((err > 1e-2).sum()), float(err.max())


def _divide(x: torch.Tensor, divisor) -> torch.Tensor:
    crypten = N.crypten
    ex = crypten.cryptensor(x, src=1)
    ex._tensor.div_(divisor)  # raw division of the ring value by a public integer
    return ex._tensor.reveal()


def _divide_together(x: torch.Tensor, y: torch.Tensor, dx: int, dy: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
    crypten.reset_communication_stats()
    N.exact_truncate_([ex._tensor, ey._tensor], [dx, dy])
    rounds = crypten.communicator.get().get_communication_stats()["rounds"]
    crypten.cfg.communicator.verbose = False
    return ex._tensor.reveal(), ey._tensor.reveal(), rounds


def _fixed_products(w: torch.Tensor, xs: list[torch.Tensor]) -> list[tuple[torch.Tensor, int, int]]:
    """x @ W for several x against one FixedOperand W; (result, rounds, bytes) per product."""
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    fw = N.fixed(crypten.cryptensor(w, src=0))
    out = []
    for x in xs:
        ex = crypten.cryptensor(x, src=1)
        crypten.reset_communication_stats()
        y = N.matmul(ex, fw)
        stats = crypten.communicator.get().get_communication_stats()
        out.append((N.decode(y), stats["rounds"], stats["bytes"]))
    crypten.cfg.communicator.verbose = False
    return out


def _apply(name: str, x: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, int, int]:
    """Run numerics.<name> on x shared by party 0; (result, rounds, bytes) of this party."""
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    ex = crypten.cryptensor(x, src=0)
    crypten.reset_communication_stats()
    out = getattr(N, name)(ex, **kwargs)
    stats = crypten.communicator.get().get_communication_stats()
    crypten.cfg.communicator.verbose = False
    return N.decode(out), stats["rounds"], stats["bytes"]


def _one_party_fails() -> float:
    crypten = N.crypten
    x = crypten.cryptensor(torch.ones(3), src=0)
    if crypten.communicator.get().get_rank() == 1:
        raise ValueError("party 1 refuses")
    return float(N.decode(x).sum())  # party 0 now waits for party 1 in a collective


def _rank() -> int:
    return N.crypten.communicator.get().get_rank()


@pytest.mark.timeout(120)
def test_a_failing_party_is_an_error_not_a_hang(parties):
    with pytest.raises(PartyError, match="party 1 refuses"):
        parties.run(_one_party_fails)
    assert parties.run(_rank) == [0, 1]  # a fresh pair serves the next call


# ---------------------------------------------------------------------------------------- exact truncation


def test_unsigned_floordiv_matches_python_integers():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(-(1 << 63), (1 << 63) - 1, (500,), generator=g)
    v[:4] = torch.tensor([0, -1, torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max])
    for d in (1, 2, 3, 7, 1 << 16, (1 << 32) + 5, (1 << 61) + 3):
        want = [(x % (1 << 64)) // d for x in v.tolist()]
        want = [((w + (1 << 63)) % (1 << 64)) - (1 << 63) for w in want]
        assert ring.unsigned_floordiv(v, d).tolist() == want, d
        if d > 1:
            assert ring.unsigned_floordiv(v, torch.full_like(v, d)).tolist() == want, d


def test_truncation_tuple_is_a_pure_function_of_seed_shape_divisor():
    r1, d1 = ring.truncation_tuple(7, (3, 4), 1 << 16)
    r2, d2 = ring.truncation_tuple(7, (3, 4), 1 << 16)
    r3, _ = ring.truncation_tuple(8, (3, 4), 1 << 16)
    assert torch.equal(r1, r2) and torch.equal(d1, d2) and not torch.equal(r1, r3)
    assert torch.equal(d1[0], ring.unsigned_floordiv(r1, 1 << 16)) and torch.equal(d1[1], (r1 < 0).long())


@pytest.mark.timeout(300)
def test_exact_truncation_ten_million_products(parties):
    # 10^7 products of magnitude 2.5e3 .. 1e4 in batches of 10^6 (~5 s): none may be off by more than 1e-2
    assert sum(parties.run(_products, 10**6, 50.0, 100.0, 100 + i, True)[0][0] for i in range(10)) == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crypten_local_truncation_fails_on_the_same_ten_million(parties):
    # the same products with CrypTen's local truncation: ~1.3e-6 fail each (15 measured), so the check above bites
    assert sum(parties.run(_products, 10**6, 50.0, 100.0, 100 + i, False)[0][0] for i in range(10)) > 0


@pytest.mark.timeout(300)
def test_the_check_catches_crypten_local_truncation(parties):
    # magnitudes ~1e6: CrypTen's local truncation fails with probability ~2.3e-4 per product
    local, worst = parties.run(_products, 10**5, 500.0, 2000.0, 2, False)[0]
    assert local > 0 and worst > 1e9
    exact, worst = parties.run(_products, 10**5, 500.0, 2000.0, 2, True)[0]
    assert exact == 0 and worst < 1e-3


@pytest.mark.timeout(300)
def test_division_by_any_public_integer_is_exact_to_two_units(parties):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-(1 << 40), 1 << 40, (4000,), generator=g).double() / N.SCALE
    raw = torch.round(x * N.SCALE).long()
    for d in (2, 3, 1000, 1 << 20):
        got = parties.run(_divide, x, d)[0]
        assert (got - torch.div(raw, d, rounding_mode="floor")).abs().max() <= 2, d
    divisors = torch.randint(1, 1 << 20, (4000,), generator=g)
    got = parties.run(_divide, x, divisors)[0]
    assert (got - torch.div(raw, divisors, rounding_mode="floor")).abs().max() <= 2


@pytest.mark.timeout(300)
def test_several_truncations_share_one_round(parties):
    x, y = torch.linspace(-1000, 1000, 301, dtype=torch.float64), torch.linspace(-5, 5, 7, dtype=torch.float64)
    qx, qy, rounds = parties.run(_divide_together, x, y, 1 << 16, 7)[0]
    assert rounds == 1
    assert (qx - torch.div(torch.round(x * N.SCALE).long(), 1 << 16, rounding_mode="floor")).abs().max() <= 2
    assert (qy - torch.div(torch.round(y * N.SCALE).long(), 7, rounding_mode="floor")).abs().max() <= 2


@pytest.mark.timeout(300)
def test_fixed_operand_products_send_only_the_masked_input(parties):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 48, generator=g, dtype=torch.float64)
    xs = [torch.randn(1, 3, 64, generator=g, dtype=torch.float64) for _ in range(3)]
    for x, (y, rounds, nbytes) in zip(xs, parties.run(_fixed_products, w, xs)[0]):
        assert (y - N.on_grid(x) @ N.on_grid(w)).abs().max() < 1e-3
        # one opening of x - A and one truncation of y, 16 bytes per element each; W is not re-sent
        assert rounds == 2 and nbytes == 16 * (x.numel() + y.numel())


def test_bad_divisor_is_a_value_error():
    with pytest.raises(ValueError, match="divisor"):
        ring.check_divisor(0)
    with pytest.raises(ValueError, match="divisor"):
        ring.check_divisor(torch.tensor([3, -1]))


# ------------------------------------------------------------------------------------------ approximations


def test_tables_are_the_documented_fits():
    assert N.EXP.coeffs == pytest.approx(N._exp_coeffs(N.EXP.clip, N.EXP.halvings, 6), abs=1e-9)
    r = N.RANGE_EXP
    lo = -r.range / 2**r.halvings
    assert r.coeffs == pytest.approx(N.fit_piece(torch.exp, lo, 0.0, len(r.coeffs) - 1).tolist(), abs=1e-9)
    assert r.range == 2 ** round(math.log2(r.range)) <= 2 ** (N.RANGE_EXP_BITS + 1)  # t is an exact multiple of x
    for table, f in ((N.GELU, N._gelu_tail), (N.SILU, N._silu_tail)):
        for (lo, hi), coeffs in zip(zip(table.cuts, table.cuts[1:]), table.coeffs):
            assert coeffs == pytest.approx(N.fit_piece(f, lo, hi, 6).tolist(), abs=1e-9)


def _log_space(lo: float, hi: float, n: int) -> torch.Tensor:
    return torch.exp(torch.linspace(math.log(lo), math.log(hi), n, dtype=torch.float64))


# name, inputs, kwargs, reference, simulator bound as (relative, absolute): |out - ref| <= rel |ref| + abs
SIM_CASES = [
    ("exp_neg", torch.linspace(-40, 0, 40001, dtype=torch.float64), {}, torch.exp, (0, 1e-5)),
    ("exp_range", torch.linspace(-N.RANGE_EXP_SAFE, 0, 150001, dtype=torch.float64), {}, torch.exp, (0, 2e-6)),
    ("exp_range", torch.linspace(-14, 0, 14001, dtype=torch.float64), {}, torch.exp, (3.3e-6, 0)),
    ("gelu", torch.linspace(-30, 30, 60001, dtype=torch.float64), {}, F.gelu, (0, 7e-5)),
    ("silu", torch.linspace(-30, 30, 60001, dtype=torch.float64), {}, F.silu, (0, 2.2e-4)),
    ("reciprocal", _log_space(0.5, 5000, 20001), dict(lo=0.5, hi=5000), torch.reciprocal, (1e-7, 0)),
    ("inv_sqrt", _log_space(2**-10, 1e4, 20001), dict(lo=2**-10, hi=1e4), torch.rsqrt, (1e-4, 0)),
]


def _within(out: torch.Tensor, ref: torch.Tensor, bound: tuple[float, float]) -> bool:
    rel, abs_ = bound
    excess = (out - ref).abs() - (rel * ref.abs() + abs_)
    return bool(excess.max() <= 0)


@pytest.mark.parametrize("name,x,kwargs,ref,bound", SIM_CASES, ids=[c[0] for c in SIM_CASES])
def test_simulator_within_its_bound(name, x, kwargs, ref, bound):
    assert _within(getattr(N, name)(x, **kwargs), ref(x), bound)


def test_gelu_is_close_to_the_tanh_form_too():
    x = torch.linspace(-30, 30, 60001, dtype=torch.float64)
    assert (N.gelu(x) - F.gelu(x, approximate="tanh")).abs().max() < 5e-4


def test_exp_clip_top_saturates_instead_of_overflowing():
    x = torch.linspace(-5, 1000, 1001, dtype=torch.float64)
    assert (N.exp_neg(x, clip_top=True) - x.clamp(max=0).exp()).abs().max() < 1e-5


def test_domain_below_fixed_point_resolution_is_rejected():
    with pytest.raises(ValueError, match="lo"):
        N.reciprocal(torch.ones(3), lo=1e-6, hi=10)
    with pytest.raises(ValueError, match="lo"):
        N.inv_sqrt(torch.ones(3), lo=4.0, hi=2.0)


LSB = 2.0**-16
WIDE = torch.cat([torch.linspace(-30, 30, 4001, dtype=torch.float64), torch.tensor([-3e4, -700.0, 700.0, 3e4])])
# MPC: name, inputs, kwargs, reference, docstring bound vs reference, bound vs simulator, max rounds
MPC_CASES = [
    ("exp_neg", torch.cat([torch.linspace(-40, 0, 4001, dtype=torch.float64), torch.tensor([-3e4, -600.0])]), {},
     torch.exp, (0, 3e-4), (0, 3e-4), 24),
    # no comparison: the last squaring's rounding (2^-16) plus the fit (2e-6), down to RANGE_EXP_SAFE below 0
    # (inputs on the grid, so the shared values are these: input rounding would add up to 2^-16 near 0)
    ("exp_range", N.on_grid(torch.linspace(-N.RANGE_EXP_SAFE, 0, 4001, dtype=torch.float64)), {}, torch.exp,
     (0, LSB + 2e-6), (0, LSB + 1e-6), 17),
    ("gelu", WIDE, {}, F.gelu, (0, 1e-4), (0, 1e-4), 20),
    ("silu", WIDE, {}, F.silu, (0, 2.5e-4), (0, 1e-4), 20),
    # 2^13 / x keeps 16 significant bits up to x = 8192
    ("reciprocal", _log_space(0.5, 5000, 1001), dict(lo=0.5, hi=5000, scale_bits=13),
     lambda x: 2**13 / x, (1e-4, LSB), (1e-4, LSB), 22),
    ("reciprocal", _log_space(0.5, 500, 1001), dict(lo=0.5, hi=500), torch.reciprocal,
     (1e-4, LSB), (5e-5, 2 * LSB), 20),
    ("inv_sqrt", _log_space(0.25, 1e4, 1001), dict(lo=0.25, hi=1e4), torch.rsqrt, (5e-5, LSB), (5e-5, 2 * LSB), 22),
]  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,x,kwargs,ref,bound,sim_bound,max_rounds", MPC_CASES, ids=[c[0] for c in MPC_CASES])
def test_mpc_matches_reference_and_simulator(parties, name, x, kwargs, ref, bound, sim_bound, max_rounds):
    out, rounds, _ = parties.run(_apply, name, x, kwargs)[0]
    xq = N.on_grid(x)  # what party 0 actually shared
    assert _within(out, ref(xq), bound)
    assert _within(out, getattr(N, name)(xq, **kwargs), sim_bound)
    assert rounds <= max_rounds


# rounds of one comparison batch with each protocol (arith/compare.py)
COMPARE_ROUNDS = {"fss": 1, "crypten": 8}


def _softmax(scores, mask, bound, mode="fss"):
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    x = crypten.cryptensor(scores, src=0)
    before = N.decode(x)
    crypten.reset_communication_stats()
    with N.comparisons(mode):
        out = N.softmax(x, mask, bound)
    rounds = crypten.communicator.get().get_communication_stats()["rounds"]
    crypten.cfg.communicator.verbose = False
    assert torch.equal(N.decode(x), before), "softmax changed its input"
    return N.decode(out), rounds


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["fss", "crypten"])
def test_mpc_softmax_with_mask_max_and_bound(parties, mode):
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(6, 3, 96, generator=g, dtype=torch.float64) * 4
    mask = torch.rand(6, 1, 96, generator=g) > 0.3
    mask[0] = False  # a row with nothing to attend to gives zeros
    mask[1, :, 1:] = False  # a single valid key gets probability 1
    ref = torch.softmax(scores.masked_fill(~mask, -float("inf")), -1).nan_to_num(0.0)
    out, rounds = parties.run(_softmax, scores, mask, None, mode)[0]
    assert (out - ref).abs().max() < 3e-4 + 96 * 2**-17
    assert (out - N.softmax(scores, mask)).abs().max() < 2e-4
    assert out[0].abs().max() == 0 and (out[1, :, 0] - 1).abs().max() < 1e-3
    bound = scores.masked_fill(~mask, -1e9).amax(-1, keepdim=True).clamp(min=0) + 1.0  # public, 1 above the max
    out_b, rounds_b = parties.run(_softmax, scores, mask, bound, mode)[0]
    assert (out_b - ref).abs().max() < (3e-4 + 96 * 2**-17) * math.e
    # no max tree (7 levels of a comparison batch and a select), one product more (exp's clip at the top)
    assert rounds_b == rounds - 7 * (COMPARE_ROUNDS[mode] + 1) + 1


def test_softmax_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match="mask"):
        N.softmax(torch.zeros(2, 5), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="score_range"):
        N.softmax(torch.zeros(2, 5), score_range=N.RANGE_EXP_SAFE + 1)


def _shared_then(
    name: str, x: torch.Tensor, kwargs: dict, mode: str = "fss"
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(the input as shared, numerics.<name> of it, rounds, bytes)."""
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    ex = crypten.cryptensor(x, src=0)
    crypten.reset_communication_stats()
    with N.comparisons(mode):
        out = getattr(N, name)(ex, **kwargs)
    stats = crypten.communicator.get().get_communication_stats()
    crypten.cfg.communicator.verbose = False
    return N.decode(ex), N.decode(out), stats["rounds"], stats["bytes"]


@pytest.mark.timeout(300)
def test_mpc_exp_range_extrapolates_above_zero(parties):
    # a bound exceeded by a few units: e^x, not a saturated or wrapped value (overflow starts past 9.7)
    x = torch.linspace(0, 9.5, 39, dtype=torch.float64)
    xs, out, _, _ = parties.run(_shared_then, "exp_range", x, {})[0]
    rel = ((out - xs.exp()) / xs.exp()).abs()
    assert rel[xs <= 5].max() < 1e-4 and rel.max() < 5e-4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["fss", "crypten"])
@pytest.mark.parametrize("n", [1, 2, 5, 96, 1023])
def test_mpc_row_max_is_exact_and_a_tournament(parties, n, mode):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, generator=g, dtype=torch.float64) * 20
    x[0, 0, n // 2] = x[0, 0, -1] = 500.0  # a tie
    xs, out, rounds, nbytes = parties.run(_shared_then, "row_max", x, {}, mode)[0]
    assert torch.equal(out, xs.amax(-1, keepdim=True))
    levels = math.ceil(math.log2(n))
    # a comparison batch and a select per level; per pair 8 bytes of FSS opening (n = 32) + 32 of the select's
    # Beaver product, CrypTen ~430 for its comparison (CrypTen's x.max(dim): ~1.25 kB per element)
    assert rounds == (COMPARE_ROUNDS[mode] + 1) * levels
    assert nbytes <= {"fss": 40, "crypten": 470}[mode] * x.numel()


def _scores_with_outliers(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [6, 3, 96] spread by ~4 around 0, one entry per row 140 below the row's max (inside exp_range's
    safe depth), and masked entries holding values no exp could take (+-3e4)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(6, 3, 96, generator=g, dtype=torch.float64) * 4
    mask = torch.rand(6, 1, 96, generator=g) > 0.3
    mask[0] = False  # a row with nothing to attend to gives zeros
    mask[1, :, 0], mask[1, :, 1:] = True, False  # a single valid key gets probability 1
    mask[2:, :, 7] = True
    scores[2:, :, 7] = scores[2:].amax(-1) - 140.0
    scores[:, :, 3] = torch.where(mask[:, :, 3], scores[:, :, 3], torch.tensor(3e4, dtype=torch.float64))
    scores[:, :, 4] = torch.where(mask[:, :, 4], scores[:, :, 4], torch.tensor(-3e4, dtype=torch.float64))
    return scores, mask


def _softmax_modes(scores, mask, bound, score_range, mode="fss"):
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    x = crypten.cryptensor(scores, src=0)
    crypten.reset_communication_stats()
    with N.comparisons(mode):
        out = N.softmax(x, mask, bound, score_range)
    stats = crypten.communicator.get().get_communication_stats()
    crypten.cfg.communicator.verbose = False
    return N.decode(out), stats["rounds"], stats["bytes"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["fss", "crypten"])
def test_mpc_softmax_with_comparison_free_exp(parties, mode):
    scores, mask = _scores_with_outliers(5)
    ref = torch.softmax(scores.masked_fill(~mask, -float("inf")), -1).nan_to_num(0.0)
    tol = 2**-15 + 96 * 2**-17
    c = COMPARE_ROUNDS[mode]
    clipped, rounds_clip, bytes_clip = parties.run(_softmax_modes, scores, mask, None, None, mode)[0]
    out, rounds, nbytes = parties.run(_softmax_modes, scores, mask, None, 64.0, mode)[0]
    assert (out - ref).abs().max() < tol
    assert (out - N.softmax(scores, mask, score_range=64.0)).abs().max() < 2e-4
    assert out[0].abs().max() == 0 and (out[1, :, 0] - 1).abs().max() < 1e-3
    # no clip (a comparison batch and a select) but 3 more product rounds. With CrypTen comparisons that saves
    # bytes too (the clip's comparison is 432 per score); with FSS ones (8 bytes) the clip is cheaper than the
    # comparison-free exp's extra products, which stays the default for its precision (2^-16 vs 3e-4)
    assert rounds == rounds_clip - (c + 1) + 3
    if mode == "crypten":
        assert nbytes < bytes_clip - 380 * scores.numel()
    else:
        assert bytes_clip < nbytes < bytes_clip + 60 * scores.numel()
    # a public bound 1 above each row's max: no max, no comparison in exp
    bound = scores.masked_fill(~mask, -1e9).amax(-1, keepdim=True).clamp(min=0) + 1.0
    out_b, rounds_b, bytes_b = parties.run(_softmax_modes, scores, mask, bound, 64.0, mode)[0]
    assert (out_b - ref).abs().max() < tol * math.e
    assert (out_b - N.softmax(scores, mask, bound, 64.0)).abs().max() < 2e-4 * math.e
    # the max's 7 levels are gone (CrypTen: ~460 bytes per score, the reciprocal's wider range from 2^-10 takes
    # back 160; FSS: ~40 bytes per score)
    saved = {"fss": 25, "crypten": 250}[mode]
    assert rounds_b == rounds - (c + 1) * 7 and bytes_b < nbytes - saved * scores.numel()
