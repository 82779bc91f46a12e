"""Cost accounting of private inference: rounds, bytes, dealer bytes and wall time per step, layer and operation class.

The private layers (mpcache/mpc/nn/layers.py) wrap each leaf operation in `span(op)` and each block in `layer(i)`;
both do nothing unless a `Ledger` is active (`with ledger:`), so the float simulator pays nothing. A span reads the
party's counters (numerics.counters: CrypTen counts rounds and bytes only with cfg.communicator.verbose) before and
after, so the numbers are this party's: rounds = communicator calls, bytes = what CrypTen counts for them (online,
between the parties), dealer_bytes = correlated randomness this party received from the dealer for what ran (its
preprocessing traffic: Beaver corrections to party 0, FSS key corrections to both). Spans do not nest: an inner span
inside an open one is charged to the outer one. Whatever runs outside every span (residual adds, cache
concatenation, reshapes) is charged to op "other" by `Ledger.end_step`, so each step's classes sum to its total.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

OPS = ("linear", "attention", "softmax", "norm", "activation", "rope", "selection", "other")
Counters = Callable[[], dict]  # -> {"rounds": ..., "bytes": ..., "dealer_bytes": ... (0 when absent)}
COLUMNS = ("rounds", "bytes", "dealer_bytes", "seconds")

_active: Ledger | None = None


class Ledger:
    """Accumulates COLUMNS per (step, layer, op); layer is a block index, "embed" or "head"."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.steps: list[dict] = []
        self._cells: dict[tuple[str, str], list[float]] = {}
        self._layer = "embed"
        self._open = False
        self._step_start: tuple[float, ...] | None = None

    def _now(self) -> tuple[float, ...]:
        c = self.counters()
        return float(c.get("rounds", 0)), float(c.get("bytes", 0)), float(c.get("dealer_bytes", 0)), time.perf_counter()

    def __enter__(self) -> Ledger:
        global _active
        if _active is not None:
            raise RuntimeError("another Ledger is already active")
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = None

    def begin_step(self, name: str) -> None:
        self._cells, self._layer, self._name = {}, "embed", name
        self._step_start = self._now()

    def end_step(self) -> dict:
        """Close the step: returns {name, rounds, bytes, dealer_bytes, seconds, cells: [{layer, op, <the same>}]}."""
        if self._step_start is None:
            raise RuntimeError("end_step without begin_step")
        end = self._now()
        total = [e - s for s, e in zip(self._step_start, end)]
        spent = [sum(cell[i] for cell in self._cells.values()) for i in range(len(COLUMNS))]
        other = [t - s for t, s in zip(total, spent)]
        if any(abs(v) > 0 for v in other):
            self._cells[("all", "other")] = other
        cells = [{"layer": layer, "op": op, **_columns(v)} for (layer, op), v in self._cells.items()]
        record = {"name": self._name, **_columns(total), "cells": cells}
        self.steps.append(record)
        self._step_start = None
        return record

    def charge(self, op: str, before: tuple[float, ...]) -> None:
        cell = self._cells.setdefault((str(self._layer), op), [0.0] * len(COLUMNS))
        for i, (s, e) in enumerate(zip(before, self._now())):
            cell[i] += e - s


def _columns(values: list[float]) -> dict:
    """Counter values in COLUMNS order as a record: integers, seconds rounded to microseconds."""
    *counts, seconds = values
    return {**{k: int(v) for k, v in zip(COLUMNS, counts)}, "seconds": round(seconds, 6)}


@contextmanager
def span(op: str) -> Iterator[None]:
    """Charge what runs inside to operation class `op` of the current layer (no-op without an active Ledger)."""
    ledger = _active
    if ledger is None or ledger._open or ledger._step_start is None:
        yield
        return
    if op not in OPS:
        raise ValueError(f"unknown operation class {op!r}; expected one of {OPS}")
    ledger._open = True
    before = ledger._now()
    try:
        yield
    finally:
        ledger._open = False
        ledger.charge(op, before)


@contextmanager
def layer(name: int | str) -> Iterator[None]:
    """Spans inside are charged to layer `name` (a block index, "embed" or "head")."""
    ledger = _active
    if ledger is None:
        yield
        return
    previous, ledger._layer = ledger._layer, str(name)
    try:
        yield
    finally:
        ledger._layer = previous


def summarize(steps: list[dict]) -> dict[str, dict[str, float]]:
    """Per op class over all given steps: {op: {rounds, bytes, dealer_bytes, seconds}} (layers summed)."""
    out: dict[str, dict[str, float]] = {}
    for step in steps:
        for cell in step["cells"]:
            row = out.setdefault(cell["op"], dict.fromkeys(COLUMNS, 0))
            for key in row:
                row[key] += cell.get(key, 0)
    return out
