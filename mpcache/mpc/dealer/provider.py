"""CrypTen TupleProvider backed by the dealer (mpcache/mpc/dealer/), and the insecure test-only alternative.

Every CrypTen party makes the same sequence of tuple requests (CrypTen is SPMD), so both parties number tuples
0, 1, 2, ... identically: party i derives its random shares from its own seed and the tuple number, party 1 also
derives its share of the derived value, and party 0 gets its correction share from the dealer. FSS comparison keys
(`compare_keys`, for mpcache.mpc.arith.compare) are numbered the same way in their own sequence of key batches:
each party derives its roots and mask shares from its FSS seed and both receive the batch's correction words
(mpcache/mpc/dealer/keys.py). Batching: CrypTen's
`trace()` / `fill_cache()` records a computation's tuple requests; `fill_cache` here fetches all of party 0's
corrections in as few GetTuples calls as the message size allows, instead of one call per tuple.

CrypTen's own "TFP" provider (and mpcache.mpc.arith.numerics.LocalDealer built on it) stays available for in-process
unit tests only: party 0 makes every tuple there, so it knows all masks. INSECURE; no role CLI can select it.
"""

from __future__ import annotations

import collections
import inspect
import logging

import torch

from mpcache.mpc.arith import ring
from mpcache.mpc.arith.crypten_compat import import_crypten
from mpcache.mpc.dealer import keys, tuples
from mpcache.mpc.fss import batch as fss_batch
from mpcache.mpc.transport.proto import mpcache_pb2 as pb

crypten = import_crypten()
from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor  # noqa: E402
from crypten.mpc.provider.provider import TupleProvider  # noqa: E402

log = logging.getLogger("mpcache.provider")

PROVIDER_NAME = "DEALER"
BATCH_BYTES = 32 << 20  # corrections per GetTuples response when prefetching (well under the message cap)


class DealerSession:
    """One party's view of a dealer session: its key, the tuple counter and (party 0) the dealer connection.

    `fetch(request_id, specs)` returns party 0's corrections; it is DealerClient.get_tuples in a deployment and
    any equivalent function in tests. Ranks >= 1 need no fetch: everything they use comes from their seed.
    `fetch_keys(batch, spec)` yields the KeyChunks of an FSS key batch (DealerClient.get_keys), for both ranks;
    without it the session serves no comparison keys.
    """

    def __init__(self, session: str, rank: int, seed: bytes | int, fetch=None, fetch_keys=None) -> None:
        if rank not in range(tuples.WORLD_SIZE):
            raise ValueError(f"rank {rank} is not a computing party")
        if rank == 0 and fetch is None:
            raise ValueError("party 0 needs a way to fetch corrections from the dealer")
        self.session, self.rank = session, rank
        self.key = tuples.party_key(seed, session, rank)
        self.fss_seed = keys.fss_seed(self.key)
        self.fetch = fetch if rank == 0 else None
        self.fetch_keys = fetch_keys
        self.consumed = 0  # tuples used so far (= index of the next tuple)
        self.fetched = 0  # party 0: tuples whose corrections have arrived
        self.key_batches = 0  # FSS key batches received so far (= number of the next one)
        self.correction_bytes = 0  # everything received from the dealer for the tuples and keys used
        self.masks: dict[int, tuple[int, ...]] = {}  # FIXED_MASK tuple number -> shape of B
        self._ready: collections.deque[tuple[int, tuples.Spec, torch.Tensor]] = collections.deque()

    @property
    def position(self) -> tuple[int, int]:
        """The next tuple number this party may use (party 0: also past every correction it fetched) and the next
        FSS key batch number."""
        return max(self.consumed, self.fetched), self.key_batches

    def align(self, position: tuple[int, int]) -> None:
        """Continue from tuple number position[0] and key batch position[1]. The parties agree on the largest of
        their positions before each job, so a job that stopped half-way (one party drew more than the other)
        leaves no offset between them; the numbers skipped are never used (the dealer never serves them)."""
        tuple_number, key_batch = position
        if tuple_number < self.position[0] or key_batch < self.key_batches:
            raise ValueError(f"cannot go back from {self.position} to {tuple(position)}: tuples are never reused")
        self._ready.clear()
        self.consumed = self.fetched = tuple_number
        self.key_batches = key_batch

    def prefetch(self, specs: list[tuples.Spec]) -> None:
        """Party 0: fetch corrections for the next tuples (in the order they will be used). No-op elsewhere."""
        if self.rank != 0 or not specs:
            return
        start = 0
        while start < len(specs):
            stop, size = start, 0
            while stop < len(specs) and (stop == start or size + 8 * specs[stop].correction_numel() <= BATCH_BYTES):
                size += 8 * specs[stop].correction_numel()
                stop += 1
            chunk = specs[start:stop]
            for spec, c0 in zip(chunk, self.fetch(self.fetched, chunk), strict=True):
                self._ready.append((self.fetched, spec, c0))
                self.correction_bytes += 8 * c0.numel()
                self.fetched += 1
            start = stop

    def next(self, spec: tuples.Spec) -> tuple[list[torch.Tensor], torch.Tensor]:
        """This party's shares of the next tuple: (random input shares, share of the derived value)."""
        spec.check_size()  # both parties refuse an oversized tuple the same way, before any traffic
        index = self.consumed
        randoms = tuples.random_shares(self.key, index, spec)
        if self.rank == 0:
            if not self._ready:
                self.prefetch([spec])
            ready_index, ready_spec, derived = self._ready.popleft()
            if (ready_index, ready_spec) != (index, spec):
                raise RuntimeError(
                    f"tuple schedule diverged at tuple {index}: prefetched {ready_spec.name} {ready_spec.shape_a} "
                    f"{ready_spec.shape_b}, CrypTen asked for {spec.name} {spec.shape_a} {spec.shape_b}"
                )
        else:
            derived = tuples.derived_share(self.key, index, spec)
        if spec.kind == pb.FIXED_MASK:
            self.masks[index] = spec.shape_a
        self.consumed += 1
        return randoms, derived

    def compare_keys(self, n: int, count: int) -> list:
        """This party's keys of the next key batch, `count` comparisons on n-bit masked values (fss.CompareKey per
        chunk, in order): `gate_keys`."""
        return self.gate_keys("compare", n, count)

    def lut_keys(self, n: int, count: int) -> list:
        """This party's keys of the next key batch, `count` table lookups on n-bit masked values (fss.LutKey per
        chunk, in order): `gate_keys`."""
        return self.gate_keys("lut", n, count)

    def gate_keys(self, kind: str, n: int, count: int) -> list:
        """This party's keys of the next key batch (`count` gates of fss.batch kind `kind`), derived chunk by chunk
        as the dealer streams the corrections; a chunk of the wrong number, size, kind or width is refused
        (ValueError naming it)."""
        if self.fetch_keys is None:
            raise RuntimeError("this dealer session cannot fetch FSS keys (no fetch_keys)")
        spec = keys.key_spec(kind, n, count)
        keys.check_spec(spec)  # refused here, before any traffic, as the dealer would
        batch, bounds = self.key_batches, fss_batch.chunk_bounds(count)
        self.key_batches += 1
        out = []
        stream = iter(self.fetch_keys(batch, spec))
        for j, (c0, c1) in enumerate(bounds):
            chunk = next(stream, None)
            try:
                if chunk is None or (chunk.batch, chunk.chunk, chunk.count) != (batch, j, c1 - c0):
                    got = "nothing" if chunk is None else f"batch {chunk.batch} chunk {chunk.chunk} of {chunk.count}"
                    raise ValueError(f"expected batch {batch} chunk {j} of {c1 - c0} gates, got {got}")
                corrections = chunk.corrections
                out.append(fss_batch.derive_chunk(kind, self.rank, n, self.fss_seed, batch, j, c1 - c0, corrections))
            except ValueError as e:
                raise ValueError(f"the dealer sent a malformed FSS key chunk: {e}") from None
            self.correction_bytes += len(chunk.corrections)
        if next(stream, None) is not None:
            raise ValueError(f"the dealer sent more than the {len(bounds)} chunks of key batch {batch}")
        return out


def _cpu(device) -> None:
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"the dealer provider makes CPU tuples only, got device {device}")


class DealerProvider(TupleProvider):
    """CrypTen tuple provider whose correlated randomness comes from the dealer; see the module docstring."""

    NAME = PROVIDER_NAME

    def __init__(self) -> None:
        super().__init__()
        self.session: DealerSession | None = None

    def _session(self) -> DealerSession:
        if self.session is None:
            raise RuntimeError("dealer provider used before attach(): no dealer session")
        return self.session

    def _next(self, spec: tuples.Spec, device) -> tuple[list[torch.Tensor], torch.Tensor]:
        _cpu(device)
        return self._session().next(spec)

    @property
    def dealer_bytes(self) -> int:
        """Bytes this party received from the dealer for what it used (numerics.counters)."""
        return 0 if self.session is None else self.session.correction_bytes

    def compare_keys(self, n: int, count: int) -> list:
        """FSS comparison keys for mpcache.mpc.arith.compare (DealerSession.compare_keys)."""
        return self._session().compare_keys(n, count)

    def lut_keys(self, n: int, count: int) -> list:
        """FSS lookup keys for mpcache.mpc.arith.lut (DealerSession.lut_keys)."""
        return self._session().lut_keys(n, count)

    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        if args:
            raise ValueError(f"positional arguments for {op} triples are not supported: {args}")
        (a, b), c = self._next(tuples.Spec.beaver(op, size0, size1, **kwargs), device)
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, b, c))

    def square(self, size, device=None):
        (r,), r2 = self._next(tuples.Spec(pb.SQUARE, tuple(size)), device)
        return ArithmeticSharedTensor.from_shares(r, precision=0), ArithmeticSharedTensor.from_shares(r2, precision=0)

    def generate_binary_triple(self, size0, size1, device=None):
        (a, b), c = self._next(tuples.Spec(pb.BINARY_AND, tuple(size0), tuple(size1)), device)
        return tuple(BinarySharedTensor.from_shares(t) for t in (a, b, c))

    def wrap_rng(self, size, device=None):
        (r,), theta = self._next(tuples.Spec(pb.TRUNCATION_PAIR, tuple(size)), device)
        return ArithmeticSharedTensor.from_shares(r, precision=0), ArithmeticSharedTensor.from_shares(
            theta, precision=0
        )

    def B2A_rng(self, size, device=None):
        (r_bin,), r_arith = self._next(tuples.Spec(pb.B2A_BIT, tuple(size)), device)
        return ArithmeticSharedTensor.from_shares(r_arith, precision=0), BinarySharedTensor.from_shares(r_bin)

    def exact_truncation_tuple(self, size, divisor, device=None):
        """(r, stack(floor(r / divisor), msb(r))) for mpcache.mpc.arith.numerics' exact truncation."""
        (r,), derived = self._next(tuples.Spec.truncation(tuple(size), divisor), device)
        return ArithmeticSharedTensor.from_shares(r, precision=0), ArithmeticSharedTensor.from_shares(
            derived, precision=0
        )

    def fixed_mask(self, size, device=None):
        """(key, B) for a weight-stationary operand (numerics.FixedOperand); key = B's tuple number."""
        key = self._session().consumed
        (b,), _ = self._next(tuples.Spec(pb.FIXED_MASK, tuple(size)), device)
        return key, ArithmeticSharedTensor.from_shares(b, precision=0)

    def fixed_triple(self, key: int, size, op: str, device=None, block=None):
        """(A, op(A, B)) with a fresh A for the mask B of `fixed_mask`'s `key`, or for its leading `block`
        (B[:block[0], :block[1], ...]; numerics.GrowingOperand)."""
        masks = self._session().masks
        if key not in masks:
            raise ValueError(f"no weight-stationary mask with key {key} in this session")
        shape_b = masks[key] if block is None else tuple(block)
        ring.check_mask_block(masks[key], shape_b)  # refused here, before any traffic, as the dealer would
        (a,), c = self._next(tuples.Spec.fixed(op, tuple(size), shape_b, key), device)
        return ArithmeticSharedTensor.from_shares(a, precision=0), ArithmeticSharedTensor.from_shares(c, precision=0)

    def fill_cache(self) -> None:
        """Fetch party 0's corrections for every traced request in batched calls, then fill CrypTen's cache."""
        if self.session is not None:
            self.session.prefetch([_request_spec(name, args, kwargs) for name, args, kwargs in self.request_cache])
        super().fill_cache()


def _request_spec(func_name: str, args: tuple, kwargs: dict) -> tuples.Spec:
    """The Spec a traced provider call will consume (mirrors the methods above)."""
    method = getattr(TupleProvider, func_name)
    bound = inspect.signature(method).bind(None, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if func_name == "generate_additive_triple":
        return tuples.Spec.beaver(a["op"], a["size0"], a["size1"], **a.get("kwargs", {}))
    if func_name == "generate_binary_triple":
        return tuples.Spec(pb.BINARY_AND, tuple(a["size0"]), tuple(a["size1"]))
    kind = {"square": pb.SQUARE, "wrap_rng": pb.TRUNCATION_PAIR, "B2A_rng": pb.B2A_BIT}[func_name]
    return tuples.Spec(kind, tuple(a["size"]))


_PROVIDER = DealerProvider()


def attach(session: DealerSession) -> DealerProvider:
    """Make CrypTen take its tuples from the dealer session (cfg.mpc.provider = "DEALER")."""
    providers = vars(crypten.mpc)["__SUPPORTED_PROVIDERS"]
    providers[PROVIDER_NAME] = _PROVIDER
    _PROVIDER.session = session
    crypten.cfg.mpc.provider = PROVIDER_NAME
    return _PROVIDER
