"""FSS keys from the dealer: the parties' FSS seeds, the key-batch request, and the dealer's chunk cache.

A key batch (tuple kind FSS_COMPARE or FSS_LUT; protos/mpcache.proto, "FSS keys") is `count` comparisons or table
lookups on n-bit masked values. Both parties ask for every batch (GetKeys, numbered per party: 0, 1, 2, ...,
one sequence for both kinds); the dealer streams the correction words chunk by chunk (mpcache.mpc.fss.batch: 16384
gates per chunk), identical for both parties,
and each party derives its root seeds and mask shares from its own FSS seed. Who learns what: the dealer its own
randomness (both parties' streams, so every mask); a party its seed-derived roots and mask shares and the public
corrections, which look random without the other party's roots.

Generating a chunk is the dealer's main cost (both parties' trees). `ChunkCache` keeps a chunk made for the first
party that asks until the other takes it, up to a memory budget; a chunk not kept is regenerated (a pure function
of the seeds, the batch and the chunk number), so the budget bounds memory without changing any party's keys.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from mpcache.mpc.dealer.tuples import Spec
from mpcache.mpc.fss import batch as fss_batch
from mpcache.mpc.transport.proto import mpcache_pb2 as pb

MAX_KEY_COUNT = 1 << 26  # gates per batch (~48 GB of corrections at n = 32: beyond that a request is a bug)
KINDS = {pb.FSS_COMPARE: "compare", pb.FSS_LUT: "lut"}  # tuple kind -> fss.batch gate


def fss_seed(party_key: bytes) -> bytes:
    """A party's FSS seed from its AES-256 stream key (tuples.party_key): a separate domain of its randomness."""
    return hashlib.sha256(b"mpcache-fss-v1\0" + party_key).digest()


def key_spec(kind: str, n: int, count: int) -> Spec:
    """The spec of a batch of `count` gates of fss.batch kind `kind` ("compare", "lut") on n-bit masked values."""
    tuple_kind = {gate: k for k, gate in KINDS.items()}.get(kind)
    if tuple_kind is None:
        raise ValueError(f"unknown FSS key kind {kind!r}; expected one of {sorted(KINDS.values())}")
    return Spec(tuple_kind, (count,), bitlength=n)


def compare_spec(n: int, count: int) -> Spec:
    """The spec of a batch of `count` comparisons on n-bit masked values."""
    return key_spec("compare", n, count)


def check_spec(spec: Spec) -> tuple[str, int, int]:
    """(gate kind, n, count) of a key batch request; ValueError for anything GetKeys does not serve."""
    if spec.kind not in KINDS:
        raise ValueError(f"GetKeys serves FSS_COMPARE and FSS_LUT key batches, not {spec.name}")
    if len(spec.shape_a) != 1 or spec.shape_b or spec.conv or spec.mask_tuple is not None:
        raise ValueError(f"{spec.name} takes shape_a = [count] and nothing else, got {spec}")
    kind, count, n = KINDS[spec.kind], spec.shape_a[0], spec.bitlength
    fss_batch.GATES[kind][1].check_width(n)
    if not 1 <= count <= MAX_KEY_COUNT:
        raise ValueError(f"a key batch holds 1..{MAX_KEY_COUNT} gates, got {count}")
    return kind, n, count


def chunk_corrections(
    seeds: tuple[bytes, bytes], n: int, batch: int, chunk: int, size: int, kind: str = "compare"
) -> bytes:
    """Dealer: the correction words of one chunk (the same bytes go to both parties)."""
    k0, _ = fss_batch.gen_chunk(kind, n, seeds, batch, chunk, size)
    return k0.key.cw.to_bytes()


@dataclass
class _Entry:
    maker: int  # the rank whose request generated the chunk
    ready: threading.Event = field(default_factory=threading.Event)
    data: bytes | None = None


class ChunkCache:
    """Chunks generated for one party, kept until the other party takes them (at most `budget` bytes)."""

    def __init__(self, budget: int, wait_s: float = 600.0) -> None:
        self.budget, self.wait_s = budget, wait_s
        self.size = 0
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._lock = threading.Lock()

    def take(self, key: tuple[int, int], rank: int, make: Callable[[], bytes]) -> bytes:
        """The chunk `key` = (batch, chunk) for party `rank`: the other party's copy if it asked first (waiting
        while it is being made), else a fresh one, kept for the other party when the budget allows."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.maker == rank:  # its own chunk again: only for a party out of step
                return make()
            mine = entry is None
            if mine:
                entry = self._entries[key] = _Entry(rank)
        if mine:
            try:
                data = make()
            except BaseException:
                with self._lock:
                    self._entries.pop(key, None)
                entry.ready.set()  # the other party makes its own
                raise
            with self._lock:
                if self.size + len(data) <= self.budget and self._entries.get(key) is entry:
                    entry.data = data
                    self.size += len(data)
                else:
                    self._entries.pop(key, None)
            entry.ready.set()
            return data
        entry.ready.wait(self.wait_s)
        with self._lock:
            data = entry.data
            if data is not None and self._entries.get(key) is entry:
                del self._entries[key]
                self.size -= len(data)
        return data if data is not None else make()

    def drop_before(self, batch: int) -> None:
        """Forget chunks of batches below `batch` (both parties are past them)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] < batch]:
                entry = self._entries.pop(key)
                self.size -= len(entry.data or b"")
