"""FSS primitives (mpcache.mpc.fss): DCF / DPF correctness, comparison and lookup gates, determinism, key
privacy statistics, serialization, and input validation. All in-process, a few seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpcache.mpc.fss import compare, dcf, dpf, lut, masked, prg, tree
from mpcache.mpc.fss.prg import AesStream
from mpcache.mpc.fss.tree import Corrections, Key

U64 = np.uint64


def _seeds(count, a=b"A" * 16, b=b"B" * 16):
    return AesStream(a).seeds(count), AesStream(b).seeds(count)


def _sum(z0, z1):
    """The reconstructed value in Z_2^64 (uint64)."""
    return z0.astype(U64) + z1.astype(U64)


def _shares(x, rng):
    """Random additive shares of int64 x in Z_2^64 (x0 spans the whole ring, so x0 + x1 wraps)."""
    x = np.asarray(x, dtype=np.int64)
    x0 = rng.integers(-(2**63), 2**63 - 1, x.shape, dtype=np.int64, endpoint=True)
    return x0, (x.astype(U64) - x0.astype(U64)).view(np.int64)


def _edge_points(n, count, rng):
    top = (1 << n) - 1
    fixed = np.array([0, 1, 2, top, top - 1, top >> 1, (top >> 1) + 1], dtype=U64) & U64(top)
    rand = rng.integers(0, top, count - fixed.size, dtype=U64, endpoint=True)
    return np.concatenate([fixed, rand])


# ---------------------------------------------------------------------------------------------------------------
# DCF and DPF


@pytest.mark.parametrize("n", [1, 2, 5, 16, 24, 31, 32, 47, 63, 64])
@pytest.mark.parametrize("leaf_bits", [1, 2, 4])
def test_dcf_sums_to_beta_below_alpha(n, leaf_bits):
    rng = np.random.default_rng(n * 10 + leaf_bits)
    count = 600
    alpha = _edge_points(n, count, rng)
    beta = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    offset = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    k0, k1 = dcf.dcf_gen(n, alpha, *_seeds(count), beta=beta, offset=offset, leaf_bits=leaf_bits)
    assert k0.cw is k1.cw and k0.cw.leaf_bits == min(leaf_bits, n)
    mask = U64((1 << n) - 1)
    for x in (alpha, (alpha - U64(1)) & mask, (alpha + U64(1)) & mask, np.zeros_like(alpha), alpha | mask,
              _edge_points(n, count, rng)[rng.permutation(count)]):
        want = np.where(x < alpha, beta.astype(U64), U64(0)) + offset.astype(U64)
        assert np.array_equal(_sum(dcf.dcf_eval(k0, x), dcf.dcf_eval(k1, x)), want)


def test_dcf_keeps_shapes_and_scalar_payloads():
    alpha = np.arange(12, dtype=U64).reshape(3, 4) * U64(5)
    k0, k1 = dcf.dcf_gen(8, alpha, *_seeds(12), beta=1)
    x = np.full((3, 4), 27, dtype=np.int64)
    z0, z1 = dcf.dcf_eval(k0, x), dcf.dcf_eval(k1, x)
    assert z0.shape == (3, 4) and z0.dtype == np.int64
    assert np.array_equal(_sum(z0, z1), (27 < alpha).astype(U64))
    # each share alone is a uniform-looking word, not the bit
    assert len(set(z0.reshape(-1).tolist())) == 12


@pytest.mark.parametrize("n", [1, 3, 8, 16, 40, 64])
@pytest.mark.parametrize("leaf_bits", [1, 3, 7])
def test_dpf_point_and_full_domain(n, leaf_bits):
    rng = np.random.default_rng(100 + n)
    count = 300
    alpha = _edge_points(n, count, rng)
    beta = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    k0, k1 = dpf.dpf_gen(n, alpha, *_seeds(count), beta=beta, leaf_bits=leaf_bits)
    mask = U64((1 << n) - 1)
    for x in (alpha, alpha ^ U64(1), (alpha + U64(1)) & mask, _edge_points(n, count, rng)):
        want = np.where(x == alpha, beta.astype(U64), U64(0))
        assert np.array_equal(_sum(dpf.dpf_eval(k0, x), dpf.dpf_eval(k1, x)), want)
    if n <= 12:
        e0, e1 = dpf.dpf_eval_all(k0), dpf.dpf_eval_all(k1)
        want = np.zeros((count, 1 << n), dtype=U64)
        want[np.arange(count), alpha.astype(np.intp)] = beta.astype(U64)
        assert np.array_equal(e0 + e1, want)
        # the full-domain vector agrees with point evaluation (same key, same party)
        assert np.array_equal(e0[np.arange(count), alpha.astype(np.intp)].view(np.int64), dpf.dpf_eval(k0, alpha))
        assert np.array_equal(dpf.dpf_eval_all(k1, 5, 9), e1[5:9])


def test_chunked_batches_match_small_batches(monkeypatch):
    """Batches larger than a chunk walk several chunks: results must not depend on the chunk size."""
    rng = np.random.default_rng(7)
    alpha = rng.integers(0, 1 << 20, 3000, dtype=U64)
    x = rng.integers(0, 1 << 20, 3000, dtype=U64)
    k0, k1 = dcf.dcf_gen(20, alpha, *_seeds(3000))
    ref = dcf.dcf_eval(k0, x)
    monkeypatch.setattr(tree, "CHUNK", 256)
    small0, small1 = dcf.dcf_gen(20, alpha, *_seeds(3000))
    assert small0.cw.equals(k0.cw) and np.array_equal(dcf.dcf_eval(small0, x), ref)
    assert np.array_equal(_sum(dcf.dcf_eval(small0, x), dcf.dcf_eval(small1, x)), (x < alpha).astype(U64))


@pytest.mark.parametrize("n,leaf_bits", [(1, 1), (2, 2), (7, 2), (16, 4), (33, 2), (64, 1), (64, 7)])
def test_compiled_walk_gives_the_numpy_reference_keys(n, leaf_bits, monkeypatch):
    """The dealer's fused walk (fss/fused.py) must produce the numpy reference walk's keys bit for bit."""
    rng = np.random.default_rng(n)
    count = 700
    alpha = _edge_points(n, count, rng)
    beta = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    offset = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    gens = [lambda: dcf.dcf_gen(n, alpha, *_seeds(count), beta=beta, offset=offset, leaf_bits=leaf_bits),
            lambda: dpf.dpf_gen(n, alpha, *_seeds(count), beta=beta, leaf_bits=leaf_bits)]  # fmt: skip
    fused = [gen()[0].cw for gen in gens]
    monkeypatch.setattr(tree, "FUSED_WALK", False)
    for got, gen in zip(fused, gens):
        assert got.equals(gen()[0].cw)


# ---------------------------------------------------------------------------------------------------------------
# comparison gate


@pytest.mark.parametrize("n", [2, 8, 16, 17, 32, 40, 64])
@pytest.mark.parametrize("op,c", [("lt", 0), ("ge", 0), ("gt", 0), ("le", 0), ("lt", 1000), ("gt", -3), ("le", 7)])
def test_compare_all_ops(n, op, c):
    rng = np.random.default_rng(n)
    lim = 1 << (n - 1)
    # d = x - c (lt, ge) or c - x (gt, le) over [-2^(n-1), 2^(n-1)), its ends, 0 and +-1; x itself as int64 without
    # wrapping (at n = 64 that excludes the d near the ends for which x - c would leave int64)
    hi = lim if n < 64 else 1 << 62
    d = np.concatenate([rng.integers(-hi, hi, 2000), [-hi, hi - 1, 0, 1, -1, hi - 2, -hi + 1]])
    x = d + c if op in ("lt", "ge") else c - d
    if n == 64 and c == 0:
        x = np.concatenate([x, [-(2**63) + (op in ("gt", "le")), 2**63 - 1]])
    z0, z1 = compare.simulate_compare(*_shares(x, rng), n, op, c)
    want = {"lt": x < c, "ge": x >= c, "gt": x > c, "le": x <= c}[op]
    assert z0.dtype == np.int64 and np.array_equal(_sum(z0, z1), want.astype(U64))


def test_compare_protocol_with_derived_keys_and_wire_messages():
    """Dealer -> corrections bytes -> each party derives its own root and mask share from its seed; the parties
    exchange ceil(n/8)-byte openings; the shares sum to [x < 0]."""
    rng = np.random.default_rng(3)
    n, shape = 20, (50, 40)
    x = rng.integers(-(1 << 19), 1 << 19, shape)
    x0, x1 = _shares(x, rng)
    seeds = (prg.new_seed(), prg.new_seed())
    k0, k1 = compare.compare_gen(n, x.size, AesStream(seeds[0], 7), AesStream(seeds[1], 7))
    wire = k0.key.cw.to_bytes()
    assert wire == k1.key.cw.to_bytes()
    assert len(wire) == Corrections.message_size("dcf", n - 1, dcf.LEAF_BITS, x.size)
    parties = [compare.compare_key(b, n, AesStream(seeds[b], 7), wire) for b in (0, 1)]
    for mine, dealers in zip(parties, (k0, k1)):
        assert np.array_equal(mine.mask_share, dealers.mask_share) and np.array_equal(mine.key.root, dealers.key.root)
    msgs = [masked.open_bytes(compare.compare_mask(k, s), n) for k, s in zip(parties, (x0, x1))]
    assert all(len(m) == x.size * 3 for m in msgs)  # ceil(20 / 8) bytes per element and party
    y = masked.reconstruct(*(masked.from_open_bytes(m, n, x.size).reshape(shape) for m in msgs), n)
    z = _sum(compare.compare_eval(parties[0], y), compare.compare_eval(parties[1], y))
    assert z.shape == shape and np.array_equal(z, (x < 0).astype(U64))


def test_opened_value_is_the_masked_input_only():
    """y = x + r mod 2^n: with fresh masks, y is spread over the whole n-bit range even for a constant x."""
    x = np.zeros(4000, dtype=np.int64)
    k0, k1 = compare.compare_gen(16, x.size, AesStream(b"s" * 16), AesStream(b"t" * 16))
    y = masked.reconstruct(compare.compare_mask(k0, x), compare.compare_mask(k1, x), 16)
    counts = np.bincount((y >> U64(12)).astype(np.intp), minlength=16)
    assert _chi2_uniform_p(counts) > 1e-4


def test_simulator_refuses_values_outside_the_declared_range():
    rng = np.random.default_rng(0)
    x0, x1 = _shares(np.array([5, 1 << 15, -3]), rng)
    with pytest.raises(ValueError, match="outside the declared 16-bit range"):
        compare.simulate_compare(x0, x1, 16)
    x0, x1 = _shares(np.array([1 << 15]), rng)
    compare.simulate_compare(x0, x1, 16, "lt", c=1)  # x - c = 2^15 - 1 fits
    with pytest.raises(ValueError, match="outside"):
        compare.simulate_compare(x0, x1, 16, "gt", c=-(1 << 15))


# ---------------------------------------------------------------------------------------------------------------
# lookup tables


@pytest.mark.parametrize("n", [1, 4, 8, 10])
def test_lut_over_the_full_domain(n):
    rng = np.random.default_rng(n)
    size = 1 << n
    x = np.concatenate([np.arange(size), np.arange(size) - size, [2**40 + 3]])  # every index, signed and wrapped
    tables = rng.integers(-(2**63), 2**63 - 1, (size, 2), dtype=np.int64)
    x0, x1 = _shares(x, rng)
    z0, z1 = lut.simulate_lut(x0, x1, n, tables)
    assert z0.shape == (x.size, 2) and z0.dtype == np.int64
    assert np.array_equal(_sum(z0, z1), tables[x & (size - 1)].astype(U64))
    z0, z1 = lut.simulate_lut(x0, x1, n, tables[:, 1])
    assert np.array_equal(_sum(z0, z1), tables[x & (size - 1), 1].astype(U64))


def test_lut_protocol_with_derived_keys_and_fixed_point_table():
    rng = np.random.default_rng(5)
    n, scale = 12, 1 << 8
    grid = (np.arange(1 << n) - (np.arange(1 << n) >= 1 << (n - 1)) * (1 << n)) / scale  # signed fixed point
    table = np.round(np.exp(-np.abs(grid)) * (1 << 16)).astype(np.int64)
    x = rng.integers(-(1 << 11), 1 << 11, (7, 30))
    seeds = (b"p" * 16, b"q" * 16)
    k0, k1 = lut.lut_gen(n, x.size, AesStream(seeds[0], 1), AesStream(seeds[1], 1))
    wire = k0.key.cw.to_bytes()
    assert len(wire) == Corrections.message_size("dpf", n, lut.LEAF_BITS[n], x.size)
    parties = [lut.lut_key(b, n, AesStream(seeds[b], 1), wire) for b in (0, 1)]
    x0, x1 = _shares(x, rng)
    y = masked.reconstruct(lut.lut_mask(parties[0], x0), lut.lut_mask(parties[1], x1), n)
    z = _sum(lut.lut_eval(parties[0], y, table), lut.lut_eval(parties[1], y, table))
    assert np.array_equal(z.view(np.int64), table[x & ((1 << n) - 1)])


# ---------------------------------------------------------------------------------------------------------------
# determinism and serialization


def test_fixed_seed_gives_identical_keys_and_fresh_seeds_do_not():
    a = compare.compare_gen(32, 500, AesStream(b"1" * 16), AesStream(b"2" * 16))
    b = compare.compare_gen(32, 500, AesStream(b"1" * 16), AesStream(b"2" * 16))
    c = compare.compare_gen(32, 500, AesStream(b"1" * 16, stream=1), AesStream(b"2" * 16, stream=1))
    assert a[0].to_bytes() == b[0].to_bytes() and a[1].to_bytes() == b[1].to_bytes()
    assert a[0].key.cw.to_bytes() != c[0].key.cw.to_bytes()
    la = lut.lut_gen(8, 100, AesStream(b"1" * 16), AesStream(b"2" * 16))
    lb = lut.lut_gen(8, 100, AesStream(b"1" * 16), AesStream(b"2" * 16))
    assert la[1].to_bytes() == lb[1].to_bytes()


def test_serialization_round_trips_and_sizes():
    rng = np.random.default_rng(9)
    cases = (("dcf", dcf.dcf_gen, 31, 2), ("dpf", dpf.dpf_gen, 16, 5), ("dcf", dcf.dcf_gen, 3, 3))
    for kind, gen, n, leaf_bits in cases:
        alpha = rng.integers(0, 1 << n, 333, dtype=U64)
        k0, k1 = gen(n, alpha, *_seeds(333), leaf_bits=leaf_bits)
        data = k0.cw.to_bytes()
        assert len(data) == Corrections.message_size(kind, n, leaf_bits, 333)
        assert abs(len(data) - 24 - 333 * Corrections.bytes_per_element(kind, n, leaf_bits)) < 1
        cw = Corrections.from_bytes(data)
        assert cw.equals(k0.cw) and cw.kind == kind
        k = Key.from_bytes(k1.to_bytes())
        assert k.party == 1 and np.array_equal(k.root, k1.root) and k.cw.equals(k1.cw)
        with pytest.raises(ValueError, match="must be"):
            Corrections.from_bytes(data[:-1])
        with pytest.raises(ValueError, match="magic"):
            Corrections.from_bytes(b"XXXX" + data[4:])
    c0, c1 = compare.compare_gen(16, 64, AesStream(b"a" * 16), AesStream(b"b" * 16))
    back = compare.CompareKey.from_bytes(c1.to_bytes())
    assert back.party == 1 and back.n == 16 and np.array_equal(back.mask_share, c1.mask_share)
    assert back.key.cw.equals(c1.key.cw)
    l0, _ = lut.lut_gen(8, 10, AesStream(b"a" * 16), AesStream(b"b" * 16))
    assert lut.LutKey.from_bytes(l0.to_bytes()).key.cw.equals(l0.key.cw)
    with pytest.raises(ValueError):
        lut.LutKey.from_bytes(c0.to_bytes())  # a comparison key is not a lookup key
    sl = c0.slice(10, 20)
    assert sl.count == 10 and np.array_equal(sl.key.root, c0.key.root[10:20])
    y = rng.integers(0, 1 << 12, 77, dtype=U64)
    assert np.array_equal(masked.from_open_bytes(masked.open_bytes(y, 12), 12, 77), y)


# ---------------------------------------------------------------------------------------------------------------
# what one party's key reveals


def _chi2_uniform_p(counts):
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() / counts.size
    stat = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((counts.size - 1) / 2), torch.tensor(stat / 2)))


def _chi2_same_p(a, b, bins):
    """Chi-square homogeneity test of two samples of categories 0..bins-1 (p-value)."""
    table = np.stack([np.bincount(a, minlength=bins), np.bincount(b, minlength=bins)]).astype(np.float64)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2))) if dof else 1.0


def _key_features(key: Key):
    """Categorical features of one party's key: per level the seed correction's top nibble, its t bit and delta,
    the value correction's top nibble (DCF); the leaf corrections' top nibbles; the root's top nibble."""
    cw, top = key.cw, U64(60)
    feats = [(key.root[:, 1] >> top).astype(np.intp)]
    for i in range(cw.depth):
        feats.append((cw.seeds[i, 1] >> top).astype(np.intp))
        feats.append(((cw.seeds[i, 0] & U64(1)) * 2 + cw.delta[i]).astype(np.intp))
        if cw.values is not None:
            feats.append((cw.values[i] >> top).astype(np.intp))
    feats += [(w >> top).astype(np.intp) for w in cw.leaves.T]
    return feats


@pytest.mark.parametrize("gen,n", [(dcf.dcf_gen, 16), (dpf.dpf_gen, 12)])
def test_one_partys_key_does_not_depend_on_the_secret_point(gen, n):
    """Keys for alpha = 0 and alpha = 2^n - 1 (every path bit different), beta = 1: each party's key fields
    have the same (uniform) distribution. Control: the two keys together do reveal alpha."""
    count = 3000
    keys_a = gen(n, np.zeros(count, dtype=U64), *_seeds(count, b"a" * 16, b"b" * 16))
    keys_b = gen(n, np.full(count, (1 << n) - 1, dtype=U64), *_seeds(count, b"c" * 16, b"d" * 16))
    p_same, p_uniform = [], []
    for party in (0, 1):
        for fa, fb in zip(_key_features(keys_a[party]), _key_features(keys_b[party])):
            bins = int(max(fa.max(), fb.max())) + 1
            p_same.append(_chi2_same_p(fa, fb, bins))
            p_uniform.append(_chi2_uniform_p(np.bincount(fa, minlength=bins)))
    # ~50-100 tests: a leaking field gives p ~ 1e-300; uniform, independent fields essentially never < 1e-6
    assert min(p_same) > 1e-6 and min(p_uniform) > 1e-6, (min(p_same), min(p_uniform))
    evaluate = dcf.dcf_eval if gen is dcf.dcf_gen else dpf.dpf_eval
    x = np.zeros(count, dtype=U64)
    joint = [(_sum(evaluate(k[0], x), evaluate(k[1], x)) & U64(15)).astype(np.intp) for k in (keys_a, keys_b)]
    assert _chi2_same_p(*joint, 16) < 1e-100


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_bad_inputs_get_clear_errors():
    seeds = _seeds(4)
    for bad_n in (0, 65, 2.5, True):
        with pytest.raises(ValueError, match="bit width"):
            dcf.dcf_gen(bad_n, np.zeros(4, dtype=U64), *seeds)
    with pytest.raises(ValueError, match=">= 2\\^8"):
        dcf.dcf_gen(8, np.array([1, 2, 3, 256]), *seeds)
    with pytest.raises(ValueError, match="integer"):
        dcf.dcf_gen(8, np.zeros(4), *seeds)
    with pytest.raises(ValueError, match="unsigned"):
        dpf.dpf_gen(8, np.array([1, -2, 3, 4]), *seeds)
    with pytest.raises(ValueError, match="expected 4 seeds"):
        dcf.dcf_gen(8, np.zeros(4, dtype=U64), seeds[0][:3], seeds[1])
    with pytest.raises(ValueError, match="leaf_bits"):
        dpf.dpf_gen(16, np.zeros(4, dtype=U64), *seeds, leaf_bits=8)
    k0, _ = dcf.dcf_gen(8, np.zeros(4, dtype=U64), *seeds)
    with pytest.raises(ValueError, match="key batch has 4"):
        dcf.dcf_eval(k0, np.zeros(5, dtype=U64))
    with pytest.raises(ValueError, match="integer"):
        dcf.dcf_eval(k0, np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="party"):
        Key(2, k0.root, k0.cw)
    with pytest.raises(ValueError, match="full-domain"):
        dpf.dpf_eval_all(dpf.dpf_gen(24, np.zeros(4, dtype=U64), *seeds)[0])
    with pytest.raises(ValueError, match="2..64"):
        compare.compare_gen(1, 4, AesStream(b"a" * 16), AesStream(b"b" * 16))
    c0, _ = compare.compare_gen(16, 4, AesStream(b"a" * 16), AesStream(b"b" * 16))
    with pytest.raises(ValueError, match="one of"):
        compare.compare_mask(c0, np.zeros(4, dtype=np.int64), op="eq")
    with pytest.raises(ValueError, match="integer"):
        compare.compare_mask(c0, np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="key batch has 4"):
        compare.compare_mask(c0, np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="needs a 15-bit dcf key, got a 8-bit dcf"):
        compare.compare_key(0, 16, AesStream(b"a" * 16), dcf.dcf_gen(8, np.zeros(4, dtype=U64), *seeds)[0].cw)
    with pytest.raises(ValueError, match="do not match"):
        compare.simulate_compare(np.zeros(3, dtype=np.int64), np.zeros(4, dtype=np.int64), 16)
    with pytest.raises(ValueError, match="1..16"):
        lut.lut_gen(17, 4, AesStream(b"a" * 16), AesStream(b"b" * 16))
    l0, _ = lut.lut_gen(4, 4, AesStream(b"a" * 16), AesStream(b"b" * 16))
    with pytest.raises(ValueError, match="shape"):
        lut.lut_eval(l0, np.zeros(4, dtype=U64), np.zeros(8, dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        lut.lut_eval(l0, np.zeros(4, dtype=U64), np.zeros(16))
    with pytest.raises(ValueError, match=">= 2\\^4"):
        lut.lut_eval(l0, np.array([0, 1, 2, 16], dtype=U64), np.zeros(16, dtype=np.int64))
    with pytest.raises(ValueError, match="expected 4 x 2"):
        masked.from_open_bytes(b"\0" * 7, 12, 4)
    with pytest.raises(ValueError, match=">= 2\\^12"):
        masked.from_open_bytes(b"\xff" * 8, 12, 4)
    with pytest.raises(ValueError, match="16 \\(or 32\\) bytes"):
        AesStream(b"short")


@pytest.mark.parametrize("n", [1, 4, 5, 9, 11])
def test_fused_lookup_equals_the_numpy_reference(n, monkeypatch):
    """fused_lut.py's compiled evaluation gives bit-identical shares to dpf_eval_all + numpy (lut.FUSED=False)."""
    rng = np.random.default_rng(n)
    count = 700
    k0, k1 = lut.lut_gen(n, count, AesStream(b"x" * 16), AesStream(b"y" * 16))
    y = rng.integers(0, 1 << n, count).astype(np.uint64)
    tables = rng.integers(-(1 << 62), 1 << 62, (1 << n, 3))
    fused = [lut.lut_eval(k, y, tables) for k in (k0, k1)]
    monkeypatch.setattr(lut, "FUSED", False)
    reference = [lut.lut_eval(k, y, tables) for k in (k0, k1)]
    assert all(np.array_equal(a, b) for a, b in zip(fused, reference))
