"""Secret comparisons of the private numerics: one round from dealer FSS keys, or CrypTen's 64-bit A2B adder.

Every comparison in the private model is `negative(d, bound)`: additive shares of the bit [d < 0] (scale 1, an
arithmetic share, ready for a Beaver product with a real) for a secret d = x - t, with a PUBLIC bound B stated at
the call site: |d| < B for every element. Two protocols (`comparisons(mode)` picks one; PrivateOptions.comparisons
sets it for the decoder):

* "fss" (default): bit-width reduction + a distributed comparison function (mpcache.mpc.fss). With d at
  fixed-point scale s, |d| < B gives |d s| < 2^(n-1) for n = ceil(log2(B s)) + 1 (`width`). Each party reduces
  its share mod 2^n, adds its share of the dealer's n-bit mask r and sends y_b = (d_b + r_b) mod 2^n: ceil(n/8)
  bytes packed (`open_masked`, one round); both learn y = d + r mod 2^n, uniform whatever d is. Each evaluates its
  DCF key on y and holds a Z_2^64 share of [d < 0] (fss/compare.py: one (n-1)-bit DCF). Online: 1 round, n/8
  bytes sent per party and element (CrypTen's counter, both directions: 2 ceil(n/8)). Dealer: the key's
  corrections, ~24 B per bit of n, to EACH party (fss.batch.batch_bytes).
* "crypten": CrypTen's `_ltz` (A2B through a 64-bit adder, then B2A): ~8 rounds, 432 bytes per element in the
  counter, no bound needed. Kept for comparison and tests.

The bound is what makes n small, so it must hold: a value outside it wraps mod 2^n and gives a wrong bit without
any error in MPC (the parties cannot see it). The simulator (the same numerics on float tensors) therefore checks
every declared bound under "fss" and raises ValueError naming it (`check_range`): the tests run the simulator on
the same inputs as 2PC, so an undeclared range fails loudly there, never silently in 2PC.

What each party learns: y (uniform), its key (pseudorandom), its own shares. The dealer: its randomness only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from mpcache.mpc import fss
from mpcache.mpc.arith.crypten_compat import import_crypten
from mpcache.mpc.fss import batch as fss_batch

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402
from crypten.mpc import MPCTensor  # noqa: E402

MODES = ("fss", "crypten")
_mode = ["fss"]  # the active protocol (a one-element list: `comparisons` swaps it)


@contextlib.contextmanager
def comparisons(mode: str) -> Iterator[None]:
    """Run the comparisons inside with protocol `mode` ("fss" or "crypten")."""
    check_mode(mode)
    previous, _mode[0] = _mode[0], mode
    try:
        yield
    finally:
        _mode[0] = previous


def check_mode(mode: object) -> None:
    if mode not in MODES:
        raise ValueError(f"comparisons must be one of {MODES}, got {mode!r}")


def mode() -> str:
    return _mode[0]


def width(bound: float, scale: int) -> int:
    """Ring width n of a comparison of values |d| < bound held at fixed-point scale `scale` (2..64)."""
    if not (isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
        raise ValueError(f"a comparison's range bound must be a positive number, got {bound!r}")
    return min(64, max(2, math.ceil(math.log2(bound * scale)) + 1))


def check_range(d: Tensor, bound: float) -> None:
    """Simulator: refuse differences outside the declared |d| < bound (what 2PC would wrap silently)."""
    if mode() != "fss":
        return
    width(bound, 1)  # validates the bound
    worst = float(d.abs().max()) if d.numel() else 0.0
    if not worst < bound:
        bad = int((d.abs() >= bound).sum())
        raise ValueError(
            f"{bad} of {d.numel()} compared values lie outside the declared range |x - t| < {bound:g} (largest "
            f"{worst:g}): under FSS comparisons they would wrap mod 2^n in 2PC; widen the call site's bound"
        )


def negative(d: MPCTensor, bound: float) -> MPCTensor:
    """Shares (scale 1) of [d < 0] elementwise, for a secret d with |d| < bound (module docstring)."""
    if mode() == "crypten":
        return d._ltz()
    n = width(bound, d.encoder.scale)
    provider = crypten.mpc.get_default_provider()
    if not hasattr(provider, "compare_keys"):
        raise ValueError(
            f"comparisons='fss' needs a tuple provider with FSS keys (numerics.LocalDealer or the dealer's), "
            f"got {type(provider).__name__}; use comparisons('crypten') with this provider"
        )
    share = d.share.contiguous().reshape(-1).numpy()
    if share.size == 0:
        return MPCTensor.from_shares(torch.zeros(d.shape, dtype=torch.long), precision=0)
    keys = provider.compare_keys(n, share.size)
    own = np.concatenate([fss.compare_mask(k, s) for k, s in zip(keys, fss_batch.split(share, keys))])
    y = open_masked(own, n)
    bits = np.concatenate([fss.compare_eval(k, v) for k, v in zip(keys, fss_batch.split(y, keys))])
    return MPCTensor.from_shares(torch.from_numpy(bits).reshape(d.shape), precision=0)


def open_masked(own: np.ndarray, n: int) -> np.ndarray:
    """Both parties' n-bit messages y_b exchanged in one round, ceil(n/8) bytes each; returns y = y_0 + y_1 mod
    2^n (`open_many` with one message)."""
    return open_many([(own, n)])[0]


def open_many(messages: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
    """Several masked messages (own y_b, width n) exchanged in ONE round, each packed to ceil(n/8) bytes per element
    (into int64 words so CrypTen's counter, 8 bytes per element, counts what is sent); returns each y mod 2^n."""
    datas = [fss.open_bytes(own, n) for own, n in messages]
    data = b"".join(datas)
    if not data:
        return [np.zeros(0, dtype=np.uint64) for _ in messages]
    words = torch.frombuffer(bytearray(data + bytes(-len(data) % 8)), dtype=torch.int64)
    parts = [p.numpy().tobytes() for p in comm.get().all_gather(words)]
    out, start = [], 0
    for (own, n), d in zip(messages, datas):
        y0, y1 = (fss.from_open_bytes(p[start : start + len(d)], n, own.size) for p in parts)
        out.append(fss.reconstruct(y0, y1, n))
        start += len(d)
    return out
