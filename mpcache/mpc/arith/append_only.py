"""The append-only secret operand: append rows, or start fresh when over capacity.

Several right operands of a private decode step only ever gain rows: a KV cache's keys (as K^T) and values
(nn.layers.KVOperands), MPCache's cluster representatives (caches.mpcache.ClusterReps) and the middle clusters its
gather reads (PrivateMPCache). numerics.GrowingOperand opens each row once against its own dealer mask row, up to a
public capacity. `AppendOnlyOperand` is the life cycle around it, in one place: while the value asked for extends
the rows held and fits the capacity, only the new rows are appended (and opened with the next product); otherwise
a fresh GrowingOperand starts (fresh masks, the whole value opened once more) with capacity `growing_capacity(n)`.
So a mask row never pads two values, and opened rows average at most 3 per appended row (numerics.GrowingOperand).

On float tensors (the simulator) the same bookkeeping runs on plain growing tensors.
"""

from __future__ import annotations

from collections.abc import Callable

from mpcache.mpc.arith import numerics as N
from mpcache.mpc.arith.numerics import GrowingOperand, Value


class AppendOnlyOperand:
    """The GrowingOperand of a value that gains rows along `dim` (negative: counted from the end)."""

    def __init__(self, dim: int) -> None:
        if dim >= 0:
            raise ValueError(f"dim must count from the end (the operand's leading dims are batch dims), got {dim}")
        self.dim = dim
        self.operand: GrowingOperand | None = None

    @property
    def length(self) -> int:
        """Rows held (0 before the first update and after a reset)."""
        return 0 if self.operand is None else self.operand.length

    def reset(self) -> None:
        """The value changed other than by appending (its rows were rewritten): the next update starts fresh."""
        self.operand = None

    def update(self, n: int, rows: Callable[[int], Value]) -> GrowingOperand:
        """The operand holding the value's first `n` rows. `rows(start)` returns rows start .. n - 1 of the value; it
        is called at most once: with the rows held when they extend (n > length, n within the capacity), with 0 when
        a fresh operand starts (no operand yet, n below the rows held, or n beyond the capacity), not at all when
        nothing changed."""
        if n < 1:
            raise ValueError(f"an operand holds at least one row, got n={n}")
        held = self.operand
        if held is not None and held.length <= n <= held.capacity:
            if n > held.length:
                held.append(self._rows(rows, held.length, n))
            return held
        self.operand = GrowingOperand(self._rows(rows, 0, n), self.dim, N.growing_capacity(n))  # looked up now
        return self.operand

    def _rows(self, rows: Callable[[int], Value], start: int, n: int) -> Value:
        out = rows(start)
        if out.shape[self.dim] != n - start:
            raise ValueError(f"rows({start}) returned {out.shape[self.dim]} rows along dim {self.dim}, not {n - start}")
        return out
