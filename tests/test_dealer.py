"""Dealer: tuple math, the gRPC service's rules, and CrypTen products computed with dealer tuples."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mpcache.mpc.arith import ring
from mpcache.mpc.dealer import service as dealer
from mpcache.mpc.dealer import tuples
from mpcache.mpc.dealer.provider import DealerSession
from mpcache.mpc.transport import tls
from mpcache.mpc.transport.proto import mpcache_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

SPECS = [
    tuples.Spec.beaver("mul", (3, 4), (4,)),
    tuples.Spec.beaver("matmul", (2, 5), (5, 3)),
    tuples.Spec.beaver("conv1d", (1, 2, 9), (4, 2, 3), stride=(2,), padding=(1,)),
    tuples.Spec(pb.SQUARE, (6,)),
    tuples.Spec(pb.BINARY_AND, (4, 1), (1, 5)),
    tuples.Spec(pb.B2A_BIT, (50,)),
    tuples.Spec(pb.TRUNCATION_PAIR, (7,)),
    tuples.Spec.truncation((3, 5), 1 << 16),
    tuples.Spec.truncation((3, 5), torch.tensor([[3], [1000], [1 << 40]])),
]


def _local_sessions(seeds=(11, 22), name="s"):
    keys = [tuples.party_key(seed, name, r) for r, seed in enumerate(seeds)]
    calls, masks = [], {}

    def fetch(request_id, specs):
        calls.append((request_id, len(specs)))
        out = []
        for i, s in enumerate(specs):
            if s.kind == pb.FIXED_MASK:
                masks[request_id + i] = s.shape_a
            out.append(tuples.correction(keys, request_id + i, s, mask_shape=masks.get(s.mask_tuple)))
        return out

    return DealerSession(name, 0, seeds[0], fetch), DealerSession(name, 1, seeds[1]), calls


def _check_tuple(spec, shares0, shares1):
    (r0, d0), (r1, d1) = shares0, shares1
    if spec.kind == pb.BINARY_AND:
        a, b, c = r0[0] ^ r1[0], r0[1] ^ r1[1], d0 ^ d1
        assert torch.equal(c, a & b)
    elif spec.kind in tuples.BEAVER_OPS:
        a, b = r0[0] + r1[0], r0[1] + r1[1]
        op = getattr(torch, tuples.BEAVER_OPS[spec.kind])
        assert torch.equal(d0 + d1, op(a, b, **dict(spec.conv)))
    elif spec.kind == pb.SQUARE:
        r = r0[0] + r1[0]
        assert torch.equal(d0 + d1, r * r)
    elif spec.kind == pb.B2A_BIT:
        bit = r0[0] ^ r1[0]
        assert set(bit.unique().tolist()) == {0, 1}  # a real random bit, both values occur in 50 draws
        assert torch.equal(d0 + d1, bit)
    elif spec.kind == pb.EXACT_TRUNCATION:
        r_unsigned = [(int(x) + int(y)) % 2**64 for x, y in zip(r0[0].flatten().tolist(), r1[0].flatten().tolist())]
        d = torch.broadcast_to(torch.as_tensor(spec.divisor_value()), spec.shape_a).flatten().tolist()
        quotient, msb = (d0 + d1).reshape(2, -1).tolist()
        assert quotient == [(r // k + 2**63) % 2**64 - 2**63 for r, k in zip(r_unsigned, d)]
        assert msb == [r >> 63 for r in r_unsigned]
    elif spec.kind == pb.TRUNCATION_PAIR:
        # wraps of r0 + r1 over the signed 64-bit ring, computed exactly with Python integers
        exact = [int(x) + int(y) for x, y in zip(r0[0].tolist(), r1[0].tolist())]
        wraps = [(v + 2**63) // 2**64 for v in exact]
        assert (d0 + d1).tolist() == wraps
    else:
        raise AssertionError(spec)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_shares_reconstruct_to_valid_tuples(spec):
    p0, p1, _ = _local_sessions()
    for _ in range(2):  # two consecutive tuples of the same spec are different
        t0, t1 = p0.next(spec), p1.next(spec)
        _check_tuple(spec, t0, t1)
    assert not torch.equal(t0[0][0], tuples.random_shares(p0.key, 0, spec)[0])


def test_random_shares_look_uniform_and_independent_per_party():
    k0, k1 = tuples.party_key(1, "s", 0), tuples.party_key(1, "s", 1)  # same seed, different ranks
    a0, a1 = tuples.stream(k0, 0, 0, (4096,)), tuples.stream(k1, 0, 0, (4096,))
    assert not torch.equal(a0, a1)
    bits = torch.stack([(a0 >> i) & 1 for i in range(64)]).float().mean(1)
    assert bits.min() > 0.45 and bits.max() < 0.55  # every bit position about half ones
    assert torch.equal(a0, tuples.stream(k0, 0, 0, (4096,)))  # deterministic in (key, index, part)
    assert not torch.equal(a0, tuples.stream(k0, 1, 0, (4096,)))
    assert not torch.equal(a0, tuples.stream(k0, 0, 1, (4096,)))


def test_weight_stationary_tuples_use_the_mask_they_name():
    p0, p1, _ = _local_sessions()
    (b0,), e0 = p0.next(tuples.Spec(pb.FIXED_MASK, (4, 3)))
    (b1,), e1 = p1.next(tuples.Spec(pb.FIXED_MASK, (4, 3)))
    assert e0.numel() == e1.numel() == 0  # nothing derived, nothing sent
    p0.next(SPECS[0]), p1.next(SPECS[0])  # an unrelated tuple in between
    for spec in (tuples.Spec.fixed("matmul", (2, 4), (4, 3), 0), tuples.Spec.fixed("mul", (5, 4, 3), (4, 3), 0)):
        (a0,), c0 = p0.next(spec)
        (a1,), c1 = p1.next(spec)
        assert torch.equal(c0 + c1, getattr(torch, tuples.FIXED_OPS[spec.kind])(a0 + a1, b0 + b1))
    # a leading block of the mask (an operand that grows into its mask): B[:3, :2] and B[:2, :3]
    for spec, block in ((tuples.Spec.fixed("matmul", (2, 3), (3, 2), 0), (3, 2)),
                        (tuples.Spec.fixed("mul", (5, 2, 3), (2, 3), 0), (2, 3))):  # fmt: skip
        (a0,), c0 = p0.next(spec)
        (a1,), c1 = p1.next(spec)
        b = (b0 + b1)[: block[0], : block[1]]
        assert torch.equal(c0 + c1, getattr(torch, tuples.FIXED_OPS[spec.kind])(a0 + a1, b))


def test_mask_blocks_must_be_leading_blocks_of_the_mask():
    ring.check_mask_block((4, 3), (4, 3))
    ring.check_mask_block((4, 3), (0, 1))
    for block in ((5, 3), (4, 4), (3,), (1, 4, 3)):
        with pytest.raises(ValueError, match="not a leading block"):
            ring.check_mask_block((4, 3), block)
    # the provider refuses before drawing anything, so both parties stay in step
    from mpcache.mpc.dealer.provider import DealerProvider

    p0, _, calls = _local_sessions()
    provider = DealerProvider()
    provider.session = p0
    key, _ = provider.fixed_mask((4, 3))
    with pytest.raises(ValueError, match="not a leading block"):
        provider.fixed_triple(key, (2, 5), "matmul", block=(5, 3))
    assert p0.consumed == 1
    a, c = provider.fixed_triple(key, (2, 4), "matmul", block=(4, 2))
    assert tuple(a.share.shape) == (2, 4) and tuple(c.share.shape) == (2, 2) and p0.consumed == 2


def test_mask_cache_keeps_recent_masks_within_its_budget():
    keys = [tuples.party_key(5, "m", r) for r in range(2)]
    s = dealer._Session("m", [5, 5], keys, 0.0)
    budget = 2 * 8 * 12  # room for two masks of shape (3, 4)
    for index in (0, 1, 0, 2):  # touching 0 again makes 1 the least recently used
        assert torch.equal(s.mask(index, (3, 4), budget), tuples.fixed_mask_value(keys, index, (3, 4)))
    assert list(s.mask_cache) == [0, 2] and s.mask_cache_bytes == budget
    s.mask(3, (10, 10), budget)  # larger than the budget: computed, not cached
    assert list(s.mask_cache) == [0, 2]


def test_prefetch_batches_and_detects_a_diverged_schedule():
    p0, p1, calls = _local_sessions()
    p0.prefetch(SPECS[:3])
    assert calls == [(0, 3)]
    for spec in SPECS[:3]:
        _check_tuple(spec, p0.next(spec), p1.next(spec))
    assert calls == [(0, 3)]  # served from the prefetched batch
    p0.prefetch([SPECS[0]])
    with pytest.raises(RuntimeError, match="diverged"):
        p0.next(SPECS[1])


def test_oversized_tuples_are_refused_by_both_parties_and_the_dealer():
    huge = tuples.Spec.beaver("mul", (1 << 24, 2), (1,))  # a 256 MiB correction
    for session in _local_sessions()[:2]:
        with pytest.raises(ValueError, match="split the operation"):
            session.next(huge)
        assert session.consumed == 0


def test_bad_specs_are_rejected_with_a_message():
    with pytest.raises(ValueError, match="do not fit"):
        tuples.Spec.beaver("matmul", (2, 3), (4, 5)).derived_shape()
    with pytest.raises(ValueError, match="unsupported Beaver op"):
        tuples.Spec.beaver("add", (2,), (2,))
    with pytest.raises(ValueError, match="non-negative"):
        tuples.Spec(pb.SQUARE, (-1,))
    with pytest.raises(ValueError, match="unknown tuple kind"):
        tuples.Spec(0, (1,))
    with pytest.raises(ValueError, match=r"\[1, 2\^62\)"):
        tuples.Spec.truncation((2,), 0)
    with pytest.raises(ValueError, match="broadcast"):
        tuples.Spec.truncation((2,), torch.tensor([2, 3, 4]))


# ---------------------------------------------------------------------------------------------------------------
# The gRPC service
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path):
    tls.make_dev_pki(tmp_path / "certs")
    return tmp_path / "certs"


def _start(require_roles, credentials, party_timeout=30.0, sessions=None):
    ended = []
    service = dealer.DealerService(
        require_roles=require_roles,
        party_timeout=party_timeout,
        on_session_end=lambda n, e: ended.append((n, e)),
        sessions=sessions,
    )
    server, port = dealer.serve("127.0.0.1:0", service, credentials)
    return service, server, port, ended


def _registered(port: int, session: str):
    """Both parties' dealer clients, registered: (client 0, client 1, seed 0, seed 1)."""
    c0 = dealer.DealerClient(f"127.0.0.1:{port}", session, 0, None, timeout=10)
    c1 = dealer.DealerClient(f"127.0.0.1:{port}", session, 1, None, timeout=10)
    return c0, c1, c0.register(), c1.register()


def test_service_serves_party0_corrections_and_nothing_to_party1():
    service, server, port, ended = _start(False, None)
    try:
        c0, c1, s0, s1 = _registered(port, "sess")
        p0 = DealerSession("sess", 0, s0, c0.get_tuples)
        p1 = DealerSession("sess", 1, s1)
        for spec in SPECS:  # over the wire: Spec -> TupleSpec -> Spec -> correction
            _check_tuple(spec, p0.next(spec), p1.next(spec))
        with pytest.raises(dealer.DealerUnavailable, match="PERMISSION_DENIED.*only party 0"):
            c1.get_tuples(0, [SPECS[0]])
        with pytest.raises(dealer.DealerUnavailable, match="out of step"):
            c0.get_tuples(0, [SPECS[0]])  # tuple 0 was served already: never twice
        with pytest.raises(dealer.DealerUnavailable, match="INVALID_ARGUMENT.*split the operation"):
            c0.get_tuples(len(SPECS), [tuples.Spec.beaver("mul", (1 << 24, 2), (1,))])
        with pytest.raises(dealer.DealerUnavailable, match="INVALID_ARGUMENT.*in batches"):
            c0.get_tuples(len(SPECS), [tuples.Spec.beaver("mul", (1 << 23,), (1,))] * 3)
        with pytest.raises(dealer.DealerUnavailable, match="INVALID_ARGUMENT.*not a FIXED_MASK"):
            c0.get_tuples(len(SPECS), [tuples.Spec.fixed("matmul", (2, 3), (3, 3), 1)])  # tuple 1 is a triple
        # a FIXED_MASK of shape (4, 3), a tuple on its leading block (3, 2), then blocks that are not leading blocks
        mask_spec, m = tuples.Spec(pb.FIXED_MASK, (4, 3)), len(SPECS)
        ((b0,), _), ((b1,), _) = p0.next(mask_spec), p1.next(mask_spec)
        block_spec = tuples.Spec.fixed("matmul", (2, 3), (3, 2), m)
        ((a0,), d0), ((a1,), d1) = p0.next(block_spec), p1.next(block_spec)
        assert torch.equal(d0 + d1, (a0 + a1) @ (b0 + b1)[:3, :2])
        for bad in (tuples.Spec.fixed("matmul", (2, 5), (5, 3), m), tuples.Spec.fixed("mul", (3,), (3,), m)):
            with pytest.raises(dealer.DealerUnavailable, match="INVALID_ARGUMENT.*not a leading block"):
                c0.get_tuples(m + 2, [bad])
        assert c1.heartbeat() == ""
        r1, r0 = c1.close(), c0.close()
        assert r0.tuples_served == len(SPECS) + 2 and r1.tuples_served == 0
        # Party 1 got its Register reply (a seed) and no tuple payload at all.
        reply = pb.RegisterResponse(seed=s1, dealer_id="dealer", token=c1.token)
        assert r1.bytes_served == c1.bytes_received == reply.ByteSize()
        payload = sum(8 * torch.Size(s.derived_shape()).numel() for s in SPECS)
        assert r1.bytes_served < 80 and r0.bytes_served > payload  # a 32-byte seed, a 16-byte token, the dealer's name
        assert ended == [("sess", "")]
        again = dealer.DealerClient(f"127.0.0.1:{port}", "sess", 0, None, timeout=10)
        with pytest.raises(dealer.DealerUnavailable, match="never reused"):
            again.register()
    finally:
        server.stop(None)
        service.stop()


def _compare_with(keys0, keys1, x: torch.Tensor, n: int) -> torch.Tensor:
    """[x < 0] from two parties' chunked comparison keys: shares, masked openings, evaluation (what
    arith.compare does over the communicator)."""
    import numpy as np

    from mpcache.mpc import fss
    from mpcache.mpc.fss import batch as fss_batch

    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(-(1 << 62), 1 << 62, x.shape, generator=g)
    shares = [x0.numpy(), (x - x0).numpy()]
    ys = [np.concatenate([fss.compare_mask(k, v) for k, v in zip(ks, fss_batch.split(s, ks))])
          for ks, s in zip((keys0, keys1), shares)]  # fmt: skip
    y = fss.reconstruct(*ys, n)
    out = [np.concatenate([fss.compare_eval(k, v) for k, v in zip(ks, fss_batch.split(y, ks))])
           for ks in (keys0, keys1)]  # fmt: skip
    return torch.from_numpy(out[0] + out[1])


def _lookup_with(keys0, keys1, x: torch.Tensor, n: int, table) -> torch.Tensor:
    """table[x mod 2^n] from two parties' chunked lookup keys (what arith.lut.lookup does over the communicator)."""
    import numpy as np

    from mpcache.mpc import fss
    from mpcache.mpc.fss import batch as fss_batch

    share0 = torch.randint(-(1 << 62), 1 << 62, x.shape, generator=torch.Generator().manual_seed(2))
    shares = (share0.numpy(), (x - share0).numpy())
    own = [np.concatenate([fss.lut_mask(k, v) for k, v in zip(ks, fss_batch.split(s, ks))])
           for ks, s in zip((keys0, keys1), shares)]  # fmt: skip
    y = fss.reconstruct(own[0], own[1], n)
    out = [np.concatenate([fss.lut_eval(k, v, table) for k, v in zip(ks, fss_batch.split(y, ks))])
           for ks in (keys0, keys1)]  # fmt: skip
    return torch.from_numpy(out[0] + out[1])


def test_service_streams_the_same_fss_key_corrections_to_both_parties():
    from mpcache.mpc.dealer import keys as fss_keys
    from mpcache.mpc.fss import batch as fss_batch

    service, server, port, ended = _start(False, None)
    try:
        c0, c1, s0, s1 = _registered(port, "fss")
        p0 = DealerSession("fss", 0, s0, c0.get_tuples, c0.get_keys)
        p1 = DealerSession("fss", 1, s1, None, c1.get_keys)
        count = 2 * fss_batch.CHUNK + 5  # three chunks, the last one short
        g = torch.Generator().manual_seed(0)
        x = torch.randint(-(1 << 31), 1 << 31, (count,), generator=g)
        x[:4] = torch.tensor([0, -1, (1 << 31) - 1, -(1 << 31)])  # the 32-bit range's edges
        k0, k1 = p0.compare_keys(32, count), p1.compare_keys(32, count)
        assert [k.count for k in k0] == [fss_batch.CHUNK, fss_batch.CHUNK, 5] and [k.party for k in k1] == [1] * 3
        assert all(a.key.cw.equals(b.key.cw) for a, b in zip(k0, k1))  # the same corrections to both parties
        assert torch.equal(_compare_with(k0, k1, x, 32), (x < 0).long())
        # a second batch of another width: numbered 1 at both parties, fresh randomness
        k0, k1 = p0.compare_keys(12, 300), p1.compare_keys(12, 300)
        small = torch.arange(-150, 150)
        assert torch.equal(_compare_with(k0, k1, small, 12), (small < 0).long())
        # a lookup batch (FSS_LUT) in the same batch sequence: shares of T[x mod 2^9]
        l0, l1 = p0.lut_keys(9, 300), p1.lut_keys(9, 300)
        table = torch.arange(512) * 3 - 700
        assert torch.equal(_lookup_with(l0, l1, small, 9, table.numpy()), table[small & 511])
        assert p0.key_batches == p1.key_batches == 3
        want = sum(fss_batch.batch_bytes(kind, n, c) for kind, n, c in (("compare", 32, count), ("compare", 12, 300),
                                                                         ("lut", 9, 300)))  # fmt: skip
        assert p0.correction_bytes == p1.correction_bytes == want
        assert service.sessions["fss"].chunks.size == 0  # every chunk made once, taken by the other party
        spec = fss_keys.compare_spec(32, 10)
        with pytest.raises(dealer.DealerUnavailable, match="FAILED_PRECONDITION.*out of step"):
            list(c1.get_keys(0, spec))  # batch 0 was served to party 1 already: never twice
        with pytest.raises(dealer.DealerUnavailable, match="INVALID_ARGUMENT.*GetKeys"):
            c0.get_tuples(0, [spec])
        for bad, why in ((fss_keys.compare_spec(1, 10), "width"), (fss_keys.compare_spec(32, 0), "1..")):
            with pytest.raises(dealer.DealerUnavailable, match=f"INVALID_ARGUMENT.*{why}"):
                list(c0.get_keys(2, bad))
        with pytest.raises(dealer.DealerUnavailable, match="INVALID_ARGUMENT.*FSS_COMPARE"):
            list(c0.get_keys(2, SPECS[0]))
        r1 = c1.close()
        c0.close()
        assert r1.bytes_served == c1.bytes_received > want  # party 1 now gets key corrections (and its seed)
    finally:
        server.stop(None)
        service.stop()


def test_a_malformed_key_chunk_is_refused():
    from mpcache.mpc.dealer import keys as fss_keys
    from mpcache.mpc.fss import batch as fss_batch

    seeds = tuple(fss_keys.fss_seed(tuples.party_key(s, "k", r)) for r, s in enumerate((3, 4)))

    def chunks(n, count, batch=0, shift=0, width=None, drop=0, extra=0):
        def fetch(b, spec):
            bounds = fss_batch.chunk_bounds(count)
            bounds = bounds[: len(bounds) - drop] + [bounds[-1]] * extra
            for j, (c0, c1) in enumerate(bounds):
                data = fss_keys.chunk_corrections(seeds, width or n, batch, j, c1 - c0)
                yield pb.KeyChunk(batch=b, chunk=j + shift, count=c1 - c0, corrections=data)

        return fetch

    def session(fetch):
        return DealerSession("k", 1, 4, None, fetch)

    assert len(session(chunks(16, 10)).compare_keys(16, 10)) == 1  # well formed
    with pytest.raises(ValueError, match="expected batch 0 chunk 0 of 10 gates, got batch 0 chunk 1"):
        session(chunks(16, 10, shift=1)).compare_keys(16, 10)
    with pytest.raises(ValueError, match="malformed.*got nothing"):
        session(chunks(16, fss_batch.CHUNK + 1, drop=1)).compare_keys(16, fss_batch.CHUNK + 1)  # a chunk missing
    with pytest.raises(ValueError, match="more than the 1 chunks"):
        session(chunks(16, 10, extra=1)).compare_keys(16, 10)
    with pytest.raises(ValueError, match="malformed.*needs a 15-bit dcf key, got a 19-bit"):
        session(chunks(16, 10, width=20)).compare_keys(16, 10)
    with pytest.raises(ValueError, match="malformed.*needs a 9-bit dpf key, got a 8-bit dcf"):
        session(chunks(9, 10)).lut_keys(9, 10)  # comparison corrections where lookup ones were asked for
    with pytest.raises(RuntimeError, match="no fetch_keys"):
        DealerSession("k", 1, 4).compare_keys(16, 10)


def test_chunk_cache_makes_each_chunk_once_within_its_budget():
    import threading

    from mpcache.mpc.dealer.keys import ChunkCache

    made = []

    def make(tag):
        def run():
            made.append(tag)
            time.sleep(0.05)  # the other party asks while this one is being made
            return bytes(100)

        return run

    cache = ChunkCache(budget=1000)
    got = {}
    threads = [threading.Thread(target=lambda r=r: got.setdefault(r, cache.take((0, 0), r, make(r)))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and got[0] == got[1] and cache.size == 0  # made once, handed over, forgotten
    tight = ChunkCache(budget=50)  # no room: each party makes its own
    tight.take((0, 0), 0, make("a")), tight.take((0, 0), 1, make("b"))
    assert made[1:] == ["a", "b"] and tight.size == 0
    kept = ChunkCache(budget=1000)
    kept.take((0, 0), 0, make("c")), kept.take((1, 0), 0, make("d"))
    assert kept.size == 200
    kept.drop_before(1)  # both parties are past batch 0
    assert kept.size == 100


def test_mutual_tls_roles_are_enforced(certs):
    creds = tls.server_credentials(tls.TlsFiles.in_dir(certs, "dealer"))
    service, server, port, _ = _start(True, creds)
    try:
        addr = f"127.0.0.1:{port}"

        def client(role, rank):
            return dealer.DealerClient(addr, "s", rank, tls.channel_credentials(tls.TlsFiles.in_dir(certs, role)), 5)

        assert len(client("party0", 0).register()) == 32
        with pytest.raises(dealer.DealerUnavailable, match="PERMISSION_DENIED.*party1.*party 0"):
            client("party1", 0).register()  # party 1's certificate cannot fetch party 0's seed
        with pytest.raises(dealer.DealerUnavailable, match="not reachable"):
            dealer.DealerClient(addr, "s", 0, None, 5).register(connect_timeout=1)  # plaintext is refused
    finally:
        server.stop(None)
        service.stop()


def test_silent_party_aborts_the_session_and_the_other_party_hears_why():
    service, server, port, ended = _start(False, None, party_timeout=0.6)
    try:
        c0 = dealer.DealerClient(f"127.0.0.1:{port}", "quiet", 0, None, timeout=5)
        c1 = dealer.DealerClient(f"127.0.0.1:{port}", "quiet", 1, None, timeout=5)
        c0.register(), c1.register()
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            c0.heartbeat()  # party 0 stays alive, party 1 goes silent
            time.sleep(0.1)
        assert ended and "party 1 silent" in ended[0][1]
        assert "party 1 silent" in c0.heartbeat()
    finally:
        server.stop(None)
        service.stop()


def test_seeds_are_256_bits_handed_out_once_per_session_and_rank():
    """Issue #13, item 4: a second Register of a rank is refused and the seed is never sent again."""
    service, server, port, ended = _start(False, None)
    try:
        address = f"127.0.0.1:{port}"
        c0, c1 = (dealer.DealerClient(address, "live", r, None, timeout=5) for r in (0, 1))
        s0, s1 = c0.register(), c1.register()
        assert len(s0) == len(s1) == 32 and s0 != s1
        for rank in (0, 1):
            with pytest.raises(dealer.DealerUnavailable, match=f"ALREADY_EXISTS: party {rank} already registered"):
                dealer.DealerClient(address, "live", rank, None, timeout=5).register()
        assert c0.heartbeat() == c1.heartbeat() == ""  # the live session is untouched
        imposter = dealer.DealerClient(address, "live", 0, None, timeout=5)  # same identity, not the registered process
        for call in (imposter.heartbeat, lambda: imposter.get_tuples(0, [SPECS[0]]), lambda: imposter.close("x")):
            with pytest.raises(dealer.DealerUnavailable, match="PERMISSION_DENIED: .*not come from the process"):
                call()
        assert c0.heartbeat() == ""  # the imposter's Close did not end the session
        served = [p for p in service.sessions["live"].bytes_to.values()]
        assert served == [c0.bytes_received, c1.bytes_received]  # nothing more went to either rank
    finally:
        server.stop(None)
        service.stop()


def test_unknown_sessions_are_refused_without_side_effects():
    """Issue #13, item 3: with an allow-list, a stray session name creates nothing; every RPC says what it serves."""
    service, server, port, ended = _start(False, None, sessions=["live"])
    try:
        address = f"127.0.0.1:{port}"
        ghost = dealer.DealerClient(address, "ghost", 0, None, timeout=5)
        with pytest.raises(dealer.DealerUnavailable, match=r"does not serve session 'ghost'.*\['live'\].*--session"):
            ghost.register()
        with pytest.raises(dealer.DealerUnavailable, match="NOT_FOUND|does not know session 'ghost'"):
            ghost.heartbeat()
        with pytest.raises(dealer.DealerUnavailable, match="does not know session 'ghost'"):
            ghost.get_tuples(0, [SPECS[0]])
        with pytest.raises(dealer.DealerUnavailable, match="does not know session 'ghost'"):
            ghost.close()
        assert service.sessions == {} and ended == []
    finally:
        server.stop(None)
        service.stop()


def test_one_sessions_abort_or_expiry_leaves_the_others_alone():
    """Issue #13, item 3: any session name accepted; a half-joined one expires unnoticed by the callback, an aborted
    one ends alone, the healthy one keeps serving tuples."""
    service, server, port, ended = _start(False, None, party_timeout=0.6)
    try:
        address = f"127.0.0.1:{port}"
        live = [dealer.DealerClient(address, "live", r, None, timeout=5) for r in (0, 1)]
        doomed = [dealer.DealerClient(address, "doomed", r, None, timeout=5) for r in (0, 1)]
        seeds = [c.register() for c in live]
        for c in doomed:
            c.register()
        dealer.DealerClient(address, "ghost", 1, None, timeout=5).register()  # party 0 never comes
        doomed[1].close(error="boom")
        p0 = DealerSession("live", 0, seeds[0], live[0].get_tuples)
        p1 = DealerSession("live", 1, seeds[1])
        deadline = time.monotonic() + 10
        while len(ended) < 2 and time.monotonic() < deadline:  # doomed: aborted by party 1; then silent party 0
            for c in live:
                assert c.heartbeat() == ""
            _check_tuple(SPECS[0], p0.next(SPECS[0]), p1.next(SPECS[0]))
            time.sleep(0.1)
        assert ended == [("doomed", "party 1 failed: boom")]  # the ghost expired without a session end
        assert service.sessions["ghost"].aborted and "party 0 never registered" in service.sessions["ghost"].aborted
        for c in live:
            assert c.heartbeat() == ""
        _check_tuple(SPECS[1], p0.next(SPECS[1]), p1.next(SPECS[1]))
    finally:
        server.stop(None)
        service.stop()


def test_tuple_numbers_can_be_skipped_but_never_served_twice():
    service, server, port, ended = _start(False, None)
    try:
        c0, c1 = (dealer.DealerClient(f"127.0.0.1:{port}", "s", r, None, timeout=5) for r in (0, 1))
        keys = [tuples.party_key(seed, "s", r) for r, seed in enumerate((c0.register(), c1.register()))]
        c0.get_tuples(0, SPECS[:2])
        (c,) = c0.get_tuples(7, [SPECS[0]])  # a failed job left 2..6 unused: skipped, never served
        assert torch.equal(c, tuples.correction(keys, 7, SPECS[0]))
        for stale in (0, 5, 7):
            with pytest.raises(dealer.DealerUnavailable, match="out of step.*never served twice"):
                c0.get_tuples(stale, [SPECS[0]])
    finally:
        server.stop(None)
        service.stop()


def test_client_errors_say_refused_timeout_or_wrong_session():
    """Issue #13, item 8: a refused connection, a silent dealer and a wrong session are three different lines."""
    with socket.socket() as silent:  # accepts TCP connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(dealer.DealerUnavailable, match="did not answer Heartbeat within 1 s .*--timeout"):
            dealer.DealerClient(f"127.0.0.1:{port}", "s", 0, None, timeout=1).heartbeat()
    closed = dealer.DealerClient(f"127.0.0.1:{port}", "s", 0, None, timeout=1)  # nothing listens there now
    with pytest.raises(dealer.DealerUnavailable, match="refused the connection for GetTuples.*--dealer"):
        closed.get_tuples(0, [SPECS[0]])
    with pytest.raises(dealer.DealerUnavailable, match="refused the connection for Register.*--dealer"):
        closed.register(connect_timeout=0.5)
    service, server, port, _ = _start(False, None, sessions=["demo"])
    try:
        with pytest.raises(dealer.DealerUnavailable, match="does not serve session 'demo2'.*same --session"):
            dealer.DealerClient(f"127.0.0.1:{port}", "demo2", 1, None, timeout=5).register()
    finally:
        server.stop(None)
        service.stop()


def test_port_in_use_is_an_oserror_naming_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            dealer.serve(f"127.0.0.1:{port}", dealer.DealerService(require_roles=False), None)


# ---------------------------------------------------------------------------------------------------------------
# CrypTen with dealer tuples, two OS processes
# ---------------------------------------------------------------------------------------------------------------

PARTY = textwrap.dedent(
    """
    import json, os, sys, torch
    from mpcache.mpc.arith.crypten_compat import import_crypten
    from mpcache.mpc.dealer import service as dealer
    from mpcache.mpc.dealer import tuples
    from mpcache.mpc.dealer import provider
    crypten = import_crypten()
    rank = int(os.environ["RANK"])
    client = dealer.DealerClient(os.environ["DEALER"], "prod", rank, None, timeout=60)
    fetches = []
    def fetch(request_id, specs):
        fetches.append(len(specs))
        return client.get_tuples(request_id, specs)
    session = provider.DealerSession("prod", rank, client.register(), fetch if rank == 0 else None, client.get_keys)
    crypten.init()
    provider.attach(session)
    g = torch.Generator().manual_seed(0)
    x, y, w = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(6, 3, generator=g)
    ex, ey, ew = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1), crypten.cryptensor(w, src=0)
    out = {
        "mul": ((ex * ey).get_plain_text() - x * y).abs().max().item(),
        "matmul": ((ex @ ew).get_plain_text() - x @ w).abs().max().item(),
        "square": (ex.square().get_plain_text() - x * x).abs().max().item(),
        "relu": (ex.relu().get_plain_text() - x.relu()).abs().max().item(),
        "gt": ((ex > ey).get_plain_text() - (x > y).float()).abs().max().item(),
    }
    # The same computation again, tuples prefetched in batches through CrypTen's trace / fill_cache.
    crypten.trace()
    _, _ = ex @ ew, ex * ey
    crypten.trace(False)
    before = len(fetches)
    crypten.fill_cache()
    out["cached_matmul"] = ((ex @ ew).get_plain_text() - x @ w).abs().max().item()
    out["cached_mul"] = ((ex * ey).get_plain_text() - x * y).abs().max().item()
    out["batched_fetches"] = fetches[before:]
    # Exact truncation (mpcache.mpc.arith.numerics) with the dealer's EXACT_TRUNCATION tuples: 10^5 products of size
    # up to 10^6, where CrypTen's local 2PC truncation is off by ~4.3e9 about six times on average.
    from mpcache.mpc.arith import numerics
    numerics.install(provider.PROVIDER_NAME)
    bx, by = torch.rand(100_000, generator=g) * 2000 - 1000, torch.rand(100_000, generator=g) * 2000 - 1000
    before = session.consumed
    prod = numerics.decode(crypten.cryptensor(bx, src=0) * crypten.cryptensor(by, src=1))
    out["exact_err"] = (prod - bx.double() * by.double()).abs().max().item()
    out["exact_tuples"] = session.consumed - before
    # Weight-stationary products (numerics.FixedOperand): one FIXED_MASK for w, then FIXED_MATMUL tuples.
    fw = numerics.fixed(ew)
    out["fixed_err"] = max(
        (numerics.decode(numerics.matmul(v, fw)) - p.double() @ w.double()).abs().max().item()
        for v, p in ((ex, x), (ey, y))
    )
    # An append-only operand (numerics.GrowingOperand): FIXED_MATMUL tuples on leading blocks of a larger mask.
    grow = numerics.GrowingOperand(ew[:4], -2, 6)
    out["growing_err"] = (numerics.decode(numerics.matmul(ex[:, :4], grow)) - x[:, :4].double() @ w[:4].double())
    grow.append(ew[4:])
    out["growing_err"] = max(
        out["growing_err"].abs().max().item(),
        (numerics.decode(numerics.matmul(ex, grow)) - x.double() @ w.double()).abs().max().item(),
    )
    # One-round comparisons from the dealer's FSS keys (both parties fetch the corrections)
    with numerics.comparisons("fss"):
        before = session.correction_bytes
        bits = numerics.less_than(ex - ey, [0.0, 0.5], 2.0**15)
    d = numerics.decode(ex - ey)
    out["fss_err"] = (numerics.decode(bits) - torch.stack([(d < 0).double(), (d < 0.5).double()])).abs().max().item()
    out["fss_key_bytes"] = session.correction_bytes - before
    out["consumed"] = session.consumed
    out["fetch_calls"] = len(fetches)
    out["closed"] = [client.close().bytes_served]
    crypten.uninit()
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_crypten_products_with_dealer_tuples_are_correct():
    service, server, port, ended = _start(False, None)
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    procs = []
    try:
        for rank in (0, 1):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", RENDEZVOUS=rendezvous, DEALER=f"127.0.0.1:{port}")
            procs.append(
                subprocess.Popen([PY, "-c", PARTY], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            )
        outs = [p.communicate(timeout=100) for p in procs]
    finally:
        for p in procs:
            p.kill()
        server.stop(None)
        service.stop()
    results = []
    for (stdout, stderr), p in zip(outs, procs):
        assert p.returncode == 0, stderr.decode()[-3000:]
        line = [ln for ln in stdout.decode().splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(line[0][len("RESULT ") :]))
    r0, r1 = results
    for key in ("mul", "matmul", "square", "cached_matmul", "cached_mul"):
        assert r0[key] < 1e-3 and r1[key] < 1e-3, (key, r0[key])
    assert r0["relu"] < 1e-3 and r0["gt"] == 0.0  # comparisons use binary triples and B2A bits
    assert r0["exact_err"] < 0.1 and r0["exact_tuples"] == 2  # a Beaver triple and an exact-truncation tuple
    assert r0["fixed_err"] < 1e-3 and r1["fixed_err"] < 1e-3
    assert r0["growing_err"] < 1e-3 and r1["growing_err"] < 1e-3
    assert r0["consumed"] == r1["consumed"] > 10
    assert r0["batched_fetches"] == [2]  # the two traced triples came in one GetTuples call
    assert r1["fetch_calls"] == 0
    from mpcache.mpc.fss import batch as fss_batch

    assert r0["fss_err"] == r1["fss_err"] == 0.0
    assert r0["fss_key_bytes"] == r1["fss_key_bytes"] == fss_batch.batch_bytes("compare", 32, 48)
    # party 1 received a 32-byte seed and FSS key corrections, never a Beaver-style tuple
    assert r1["fss_key_bytes"] < r1["closed"][0] < r1["fss_key_bytes"] + 128
    assert ended == [("prod", "")]


def test_matmul_shape_matches_torch():
    shapes = [(3,), (4, 3), (3, 4), (2, 4, 3), (2, 3, 5), (1, 3, 2), (5, 1, 3, 4), (3, 1)]
    for a in shapes:
        for b in shapes:
            try:
                expected = tuple(torch.matmul(torch.zeros(a), torch.zeros(b)).shape)
            except RuntimeError:
                expected = None
            try:
                got = tuples.Spec.beaver("matmul", a, b).derived_shape()
            except ValueError:
                got = None
            assert got == expected, (a, b)


def test_broadcast_shape_matches_torch():
    shapes = [(), (1,), (3,), (4, 1), (1, 3), (2, 4, 3), (5, 1, 1)]
    for a in shapes:
        for b in shapes:
            try:
                expected = tuple(torch.broadcast_shapes(a, b))
            except RuntimeError:
                expected = None
            try:
                got = tuples.Spec.beaver("mul", a, b).derived_shape()
            except ValueError:
                got = None
            assert got == expected, (a, b)
