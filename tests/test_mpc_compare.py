"""Secret comparisons from FSS keys (mpcache/mpc/arith/compare.py) and the protocols built on them.

2PC (two local parties, keys from the in-process dealer) against the simulator (the same numerics on floats) and
plaintext: less_than on edge values with one round and ceil(n/8) bytes per comparison for the declared n; lt / gt
/ ge / sign, select and ReLU, max and argmax tournaments, bucketed top-k, cluster min/max and SiLU; a declared
range is load-bearing (a value outside it wraps in 2PC) and the simulator refuses one; what is opened (uniform
masked values only, one opening per comparison batch); the in-process dealer's byte accounting.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpcache.mpc.arith import compare
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.fss import batch as fss_batch
from mpcache.mpc.transport.local import LocalParties

LSB = 2.0**-16


@pytest.fixture(scope="module")
def parties():
    with LocalParties(setup=N.install, timeout=300) as p:
        yield p


def _stats() -> dict:
    return dict(N.counters())


def _cost(before: dict) -> dict:
    after = N.counters()
    return {k: after[k] - before[k] for k in after}


# --------------------------------------------------------------------------------------------- party functions


def _less_than(x: torch.Tensor, thresholds: list[float], bound: float, precision: int, mode: str) -> dict:
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    ex = crypten.cryptensor(x, src=0, precision=precision)
    before = _stats()
    with N.comparisons(mode):
        bits = N.less_than(ex, thresholds, bound)
    cost = _cost(before)
    crypten.cfg.communicator.verbose = False
    return {"bits": bits.share, "scale": bits.encoder.scale, **cost}


def _protocols(x: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor) -> dict:
    """Every protocol on shared inputs: (opened result, rounds) per name."""
    from mpcache.mpc.caches import mpcache as M

    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    ex, ey = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
    es, ek = crypten.cryptensor(scores, src=0), crypten.cryptensor(keys, src=1)
    b = N.VALUE_BOUND
    ops = {
        "lt": lambda: N.lt(ex, ey, b),
        "gt": lambda: N.gt(ex, ey, b),
        "ge": lambda: N.ge(ex, ey, b),
        "sign": lambda: N.sign(ex, b),
        "select": lambda: N.select(N.lt(ex, ey, b), ex, ey),
        "relu": lambda: N.relu(ex),
        "silu": lambda: N.silu(ex),
        "row_max": lambda: N.row_max(es),
        "argmax": lambda: N.argmax(es),
        "argmax_27": lambda: N.argmax(es[..., :27]),  # unpaired entries at two levels (27 -> 14 -> 7 -> 4 -> 2)
        "bucket_top": lambda: M.bucket_one_hot(es, 4),
        "rank_top": lambda: M.top_k_mask(es, 5, M.SELECT_BOUND),
        "cluster": lambda: N.stack(list(M._extrema_tree(ek, ek, True))),
    }
    out = {"inputs": ([N.decode(v) for v in (ex, ey, es, ek)], 0)}  # what was shared (CrypTen truncates)
    for name, fn in ops.items():
        crypten.reset_communication_stats()
        value = fn()
        rounds = crypten.communicator.get().get_communication_stats()["rounds"]
        out[name] = (N.decode(value), rounds)
    crypten.cfg.communicator.verbose = False
    return out


def _openings(x: torch.Tensor, repeats: int) -> dict:
    """Record every FSS opening (the reconstructed y) and every other way of opening a value."""
    crypten = N.crypten
    seen, others = [], {"count": 0}
    original = compare.open_masked

    def recording(own, n):
        y = original(own, n)
        seen.append((n, y.copy()))
        return y

    def counted(self, *args, _original=N.MPCTensor.get_plain_text, **kwargs):
        others["count"] += 1
        return _original(self, *args, **kwargs)

    compare.open_masked = recording
    plain, N.MPCTensor.get_plain_text = N.MPCTensor.get_plain_text, counted
    try:
        ex = crypten.cryptensor(x, src=0)
        for _ in range(repeats):
            N.relu(ex)  # one comparison batch each
        N.argmax(ex.reshape(-1, 16))  # one batch per level: 4
    finally:
        compare.open_masked, N.MPCTensor.get_plain_text = original, plain
    return {"openings": seen, "plain_opened": others["count"]}


def _dealer_bytes(count: int) -> dict:
    crypten = N.crypten
    x = crypten.cryptensor(torch.randn(count), src=0)
    before = _stats()
    N.less_than(x, [0.0], N.VALUE_BOUND)
    compare_bytes = _cost(before)["dealer_bytes"]
    before = _stats()
    _ = x * x
    mul_bytes = _cost(before)["dealer_bytes"]
    return {"compare": compare_bytes, "mul": mul_bytes}


# -------------------------------------------------------------------------------------------------------- tests


def test_width_follows_the_declared_bound():
    assert compare.width(2.0**15, 1 << 16) == 32  # activations at 16 fractional bits
    assert compare.width(2.0**15 - 1, 1 << 16) == 32 and compare.width(2.0**15 + 1, 1 << 16) == 33
    assert compare.width(1000.0, 1) == 11  # ranks of 1000 items at scale 1
    assert compare.width(1.0, 1) == 2 and compare.width(2.0**70, 1) == 64
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="bound"):
            compare.width(bad, 1)
    with pytest.raises(ValueError, match="comparisons"):
        with N.comparisons("garbled"):
            pass


def test_simulator_refuses_values_outside_the_declared_range():
    x = torch.tensor([0.0, 100.0, -40000.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"1 of 3 compared values lie outside .* < 32768"):
        N.less_than(x, [0.0], 2.0**15)
    with pytest.raises(ValueError, match="outside the declared range"):
        N.less_than(x[:2], [-40000.0], 2.0**15)  # the threshold moves the difference out of range
    assert N.less_than(x[:2], [0.0], 2.0**15).tolist() == [[0.0, 0.0]]
    with N.comparisons("crypten"):  # 64-bit comparisons: no range to declare
        assert N.less_than(x, [0.0], 2.0**15).tolist() == [[0.0, 0.0, 1.0]]
    for fn in (N.relu, N.silu, N.gelu, N.row_max, N.argmax):
        with pytest.raises(ValueError, match="outside the declared range"):
            fn(x)
    scores = torch.zeros(1, 4, dtype=torch.float64)
    scores[0, 1] = 2.0 * N.SCORE_LIMIT  # past the softmax's stated score range: the max's differences overflow
    scores[0, 2] = -2.0 * N.SCORE_LIMIT
    with pytest.raises(ValueError, match="outside the declared range"):
        N.softmax(scores)
    N.softmax(scores / 2.01)  # within it


# (bound, fractional bits, the ring width n it gives): reals, integers (ranks), a tight range, wide ones
EDGE_BOUNDS = [(2.0**15, 16, 32), (1000.0, 0, 11), (3.0, 16, 19), (2.0**31, 16, 48), (2.0**63, 0, 64)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("bound,precision,n", EDGE_BOUNDS, ids=[f"n={c[2]}" for c in EDGE_BOUNDS])
def test_less_than_on_edge_values_is_exact_in_one_round(parties, bound, precision, n):
    lsb = 2.0**-precision
    top = bound - max(lsb, bound * 2**-52)  # the largest value on the grid (and in float64) below the bound
    assert compare.width(bound, 1 << precision) == n
    g = torch.Generator().manual_seed(n)
    half = math.floor(top / 2 / lsb) * lsb  # on the grid, so |x - t| <= 2 half <= top below
    rand = (torch.rand(500, generator=g, dtype=torch.float64) * 2 - 1) * (half - lsb)
    cases = [
        # the range's ends against 0
        ([0.0, lsb, -lsb, top, -top, top - lsb, -top + lsb], [0.0]),
        # values within half the range against thresholds within the other half: |x - t| < bound throughout
        ([0.0, lsb, -lsb, 1.0, -1.0, half, -half, *rand.tolist()], [0.0, lsb, half]),
    ]
    for values, thresholds in cases:
        x = torch.round(torch.tensor(values, dtype=torch.float64) / lsb) * lsb
        want = torch.stack([(x < N.on_grid(t) if precision else x < t).double() for t in thresholds])
        got = parties.run(_less_than, x, thresholds, bound, precision, "fss")
        bits = got[0]["bits"] + got[1]["bits"]
        assert torch.equal(bits.double(), want) and got[0]["scale"] == 1  # arithmetic shares of bits, scale 1
        assert torch.equal(N.less_than(x, thresholds, bound), want)  # the simulator agrees, accepts the range
        count = x.numel() * len(thresholds)
        for party in got:
            assert party["rounds"] == 1
            # ceil(n/8) bytes per element sent, packed into 8-byte words; CrypTen's counter adds what is received
            assert party["bytes"] == 16 * math.ceil(count * math.ceil(n / 8) / 8)
            assert party["dealer_bytes"] == fss_batch.batch_bytes("compare", n, count)


@pytest.mark.timeout(300)
def test_crypten_mode_gives_the_same_bits_in_eight_rounds(parties):
    x = torch.linspace(-50, 50, 401, dtype=torch.float64)
    got = parties.run(_less_than, x, [0.0, 2.5], 2.0**15, 16, "crypten")
    assert torch.equal((got[0]["bits"] + got[1]["bits"]).double(), torch.stack([(x < 0).double(), (x < 2.5).double()]))
    assert got[0]["rounds"] == 8 and got[0]["dealer_bytes"] > 0 and got[1]["dealer_bytes"] == 0  # AND triples, B2A


@pytest.mark.timeout(300)
def test_a_value_outside_the_declared_range_wraps_in_2pc(parties):
    # why the bound must hold: 2PC cannot see the value, n = 11 bits cover |x| < 1024 and 1500 reads as negative
    x = torch.tensor([1500.0, -1500.0, 1000.0, 10.0])
    got = parties.run(_less_than, x, [0.0], 1024.0, 0, "fss")
    assert (got[0]["bits"] + got[1]["bits"]).tolist() == [[1, 0, 0, 0]]
    with pytest.raises(ValueError, match="outside the declared range"):
        N.less_than(x, [0.0], 1024.0)  # the simulator refuses it instead


@pytest.mark.timeout(300)
def test_protocols_match_simulator_and_plaintext(parties):
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(300, generator=g, dtype=torch.float64) * 8, torch.tensor([0.0, -LSB, 3.0, -12.0])])
    y = torch.randn(304, generator=g, dtype=torch.float64) * 8
    y[:3] = N.on_grid(x[:3])  # ties
    scores = torch.randn(3, 2, 32, generator=g, dtype=torch.float64) * 10
    scores[0, 0, 5] = scores[0, 0, 9] = 99.0  # a tie: the lower index wins
    keys = torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64)  # 4 rows: a min/max tree of 2 levels
    got = parties.run(_protocols, x, y, scores, keys)[0]
    from mpcache.methods.mpcache import bucket_top
    from mpcache.mpc.caches import mpcache as M

    xq, yq, sq, kq = got["inputs"][0]
    plain = {
        "lt": (xq < yq).double(),
        "gt": (xq > yq).double(),
        "ge": (xq >= yq).double(),
        "sign": torch.where(xq >= 0, 1.0, -1.0).double(),
        "select": torch.where(xq < yq, xq, yq),
        "relu": xq.clamp(min=0),
        "row_max": sq.amax(-1, keepdim=True),
        "argmax": F.one_hot(sq.argmax(-1), sq.shape[-1]).double(),
        "argmax_27": F.one_hot(sq[..., :27].argmax(-1), 27).double(),
        "rank_top": torch.zeros_like(sq).scatter(-1, sq.topk(5, -1).indices, 1.0),
        "cluster": torch.stack([kq.amax(-2), kq.amin(-2)]),
    }
    for name, want in plain.items():
        assert torch.equal(got[name][0], want), name
    hot = got["bucket_top"][0]  # [3, 2, 4, 32]: the best of each strided bucket
    assert torch.equal(hot.sum(-2) > 0, bucket_top(sq, 4)) and torch.equal(hot.sum(-1), torch.ones(3, 2, 4))
    assert torch.equal(hot.argmax(-1) % 4, torch.arange(4).expand(3, 2, 4))  # row b picks from bucket b
    assert (got["silu"][0] - F.silu(xq)).abs().max() < 2.5e-4
    assert (got["silu"][0] - N.silu(xq)).abs().max() < 1e-4  # the simulator, same pieces
    assert torch.equal(N.relu(xq), plain["relu"])  # the simulator
    assert torch.equal(M.top_k_mask(sq, 5, M.SELECT_BOUND), plain["rank_top"])
    rounds = {name: r for name, (_, r) in got.items() if name != "inputs"}
    # one round per comparison batch; a select is one Beaver product; max: 2 rounds per level (5 levels of 32)
    assert rounds["lt"] == rounds["gt"] == rounds["ge"] == rounds["sign"] == 1, rounds
    assert rounds["select"] == rounds["relu"] == 2 and rounds["row_max"] == 10
    # 5 levels up (no select after the final pair), then the 5 levels' bits multiplied in a tree of 3 rounds
    assert rounds["argmax"] == rounds["argmax_27"] == 2 * 5 - 1 + 3
    assert rounds["rank_top"] == 2  # all pairwise comparisons in one batch, then [rank < k]
    assert rounds["cluster"] == 2 * 2  # 4 rows: 2 levels


def test_simulator_argmax_is_the_first_maximum_for_every_length():
    # the tournament's bookkeeping (unpaired entries carried up, the product tree of per-level bits) on floats
    g = torch.Generator().manual_seed(3)
    for n in range(1, 41):
        x = torch.randint(-3, 4, (64, n), generator=g).double()  # many ties: the lower index must win
        want = F.one_hot(x.argmax(-1), n).double()
        assert torch.equal(N.argmax(x), want), n


@pytest.mark.timeout(300)
def test_only_uniform_masked_values_are_opened(parties):
    x = torch.zeros(4096, dtype=torch.float64)  # the same input everywhere: y must not show it
    got = parties.run(_openings, x, 3)
    assert got[0]["plain_opened"] == got[1]["plain_opened"] == 0
    for party in got:
        assert [(n, y.size) for n, y in party["openings"]] == [(32, 4096)] * 3 + [(32, 2048 >> i) for i in range(4)]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got[0]["openings"], got[1]["openings"]))
    ys = np.concatenate([y for _, y in got[0]["openings"][:3]])
    counts = np.bincount((ys >> np.uint64(28)).astype(np.int64), minlength=16)  # top 4 of the 32 bits
    chi2 = float(((counts - ys.size / 16) ** 2 / (ys.size / 16)).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001
    assert len({y.tobytes() for _, y in got[0]["openings"][:3]}) == 3  # fresh masks every time


@pytest.mark.timeout(300)
def test_local_dealer_counts_what_a_dealer_would_send(parties):
    got = parties.run(_dealer_bytes, 1000)
    want = fss_batch.batch_bytes("compare", 32, 1000)  # the corrections go to both parties
    assert got[0]["compare"] == got[1]["compare"] == want
    assert 600 * 1000 < want < 800 * 1000  # ~730 B per comparison at n = 32
    # a Beaver product: party 0 gets its share of c = a b (+ the truncation tuple), party 1 nothing
    assert got[0]["mul"] == 8 * 1000 * (1 + 2) and got[1]["mul"] == 0
