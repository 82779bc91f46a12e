"""The append-only secret operand (mpcache/mpc/arith/append_only.py): append rows, or start fresh when over capacity.

Its three users (a KV cache's keys and values, MPCache's cluster representatives and middle clusters) are tested
through their caches in test_mpc_layers.py and test_mpcache_private.py; here the life cycle itself, on floats (the
simulator runs the same bookkeeping) and on shares (what each product opens).
"""

from __future__ import annotations

import pytest
import torch

from mpcache.mpc.arith import numerics as N
from mpcache.mpc.arith.append_only import AppendOnlyOperand
from mpcache.mpc.transport.local import LocalParties


class Rows:
    """A value [2, L, 3] that grows along dim -2, and a record of the `rows(start)` calls made for it."""

    def __init__(self, length: int = 200, seed: int = 0) -> None:
        self.value = torch.randn(2, length, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.calls: list[int] = []

    def upto(self, n: int):
        def rows(start: int) -> torch.Tensor:
            self.calls.append(start)
            return self.value[:, start:n]

        return rows


def test_first_update_starts_fresh_with_room_to_grow():
    v, op = Rows(), AppendOnlyOperand(-2)
    assert op.length == 0 and op.operand is None
    held = op.update(10, v.upto(10))
    assert v.calls == [0] and op.operand is held and op.length == 10
    assert held.capacity == N.growing_capacity(10) == 74
    assert torch.equal(held.value, v.value[:, :10])


def test_an_extension_appends_only_the_new_rows_and_keeps_the_operand():
    v, op = Rows(), AppendOnlyOperand(-2)
    held = op.update(10, v.upto(10))
    assert op.update(10, v.upto(10)) is held and v.calls == [0]  # nothing new: rows() is not even called
    assert op.update(13, v.upto(13)) is held and v.calls == [0, 10]
    assert torch.equal(held.value, v.value[:, :13])
    x = torch.randn(2, 4, 13, dtype=torch.float64)
    torch.testing.assert_close(N.matmul(x, held), x @ v.value[:, :13])


def test_over_capacity_or_not_an_extension_starts_fresh():
    v, op = Rows(), AppendOnlyOperand(-2)
    first = op.update(10, v.upto(10))
    full = op.update(74, v.upto(74))  # exactly the capacity: still appended
    assert full is first and v.calls == [0, 10]
    fresh = op.update(75, v.upto(75))  # one row past it: fresh masks, the whole value again
    assert fresh is not first and v.calls == [0, 10, 0]
    assert fresh.capacity == N.growing_capacity(75) and torch.equal(fresh.value, v.value[:, :75])
    fewer = op.update(60, v.upto(60))  # fewer rows than held: not an extension
    assert fewer is not fresh and v.calls[-1] == 0 and fewer.length == 60
    op.reset()  # rows rewritten in place (a compaction): the next update starts fresh even if it "extends"
    assert op.length == 0
    again = op.update(61, v.upto(61))
    assert again is not fewer and v.calls[-1] == 0


def test_bad_use_is_a_clear_error():
    v, op = Rows(), AppendOnlyOperand(-2)
    with pytest.raises(ValueError, match="count from the end"):
        AppendOnlyOperand(1)
    with pytest.raises(ValueError, match="at least one row"):
        op.update(0, v.upto(0))
    with pytest.raises(ValueError, match="returned 9 rows"):
        op.update(10, lambda start: v.value[:, start:9])
    op.update(10, v.upto(10))
    with pytest.raises(ValueError, match=r"rows\(10\) returned 4 rows"):
        op.update(12, lambda start: v.value[:, start : start + 4])


def test_keys_grow_along_the_last_dim():
    v, op = Rows(), AppendOnlyOperand(-1)
    keys = v.value.transpose(-1, -2)  # [2, 3, L]
    held = op.update(5, lambda start: keys[..., start:5])
    op.update(7, lambda start: keys[..., start:7])
    assert torch.equal(held.value, keys[..., :7]) and held.capacity == N.growing_capacity(5)


def _opened_per_product(rows: int) -> dict:
    """Bytes of one product x [1, 2, n] @ V [1, n, 4] on shares after each kind of update (fresh, an append of 3
    rows, nothing new, past the capacity), and the largest error against the plaintext product."""
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    comm = crypten.communicator.get()
    g = torch.Generator().manual_seed(5)
    value, x = torch.randn(1, 80, 4, generator=g), torch.randn(1, 2, 80, generator=g)  # the same at both parties
    shared_v, shared_x = crypten.cryptensor(value, src=0), crypten.cryptensor(x, src=1)
    op = AppendOnlyOperand(-2)
    out = {"err": 0.0}
    for name, n in (("fresh", rows), ("append", rows + 3), ("same", rows + 3), ("past", N.growing_capacity(rows) + 1)):
        held = op.update(n, lambda start, n=n: shared_v[:, start:n])
        comm.reset_communication_stats()
        y = N.matmul(shared_x[:, :, :n], held)
        out[name] = (n, int(comm.get_communication_stats()["bytes"]))
        out["err"] = max(out["err"], float((N.decode(y) - (x[:, :, :n] @ value[:, :n]).double()).abs().max()))
    crypten.cfg.communicator.verbose = False
    return out


@pytest.mark.timeout(300)
def test_on_shares_each_row_is_opened_once_per_operand():
    rows = 10
    with LocalParties(setup=N.install, timeout=300) as parties:
        got = parties.run(_opened_per_product, rows)[0]
    # 16 bytes per opened element (as test_mpc_layers counts them): x - A, the rows of V - B not opened before,
    # and the output's truncation
    new_rows = {"fresh": rows, "append": 3, "same": 0, "past": N.growing_capacity(rows) + 1}
    for name, rows_opened in new_rows.items():
        n, sent = got[name]
        assert sent == 16 * (2 * n + rows_opened * 4 + 2 * 4), name
    assert got["err"] < 1e-3
