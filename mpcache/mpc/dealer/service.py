"""The dealer: a separate process that hands out correlated randomness (Beaver triples and friends) for 2PC.

Why a dealer: CrypTen's default "trusted first party" lets party 0 generate every triple, so party 0 knows all
masks and could unmask party 1's data. Here a third process, trusted to not collude, makes them instead.

`Register` gives each party a fresh random 256-bit seed for the session, once; the parties expand their seeds
locally and the dealer replays the streams to send party 0 only its correction shares (mpcache/mpc/dealer/tuples.py:
the seed scheme and the tuple math). The dealer serves every tuple index at most once, in increasing order (a
request below the tuples already served is refused, so a replayed request never reuses a mask; numbers a failed job
skipped are never served). FSS keys (`GetKeys`, mpcache/mpc/dealer/keys.py) go to BOTH parties: the correction words
of each key batch, streamed in chunks, each batch number served at most once per party and in increasing order;
otherwise party 1 only registers, heartbeats and closes.

Sessions are isolated: one session's abort ends that session only (never the dealer or another session), a second
registration of a rank is refused (its seed is never sent twice), and a request for a session the dealer does not
serve is refused without creating anything. With `sessions` (an allow-list, e.g. from the dealer's --session) only
those names can be registered; without it, a first registration opens a session, and one that is not joined by
every party within `party_timeout` expires.

This module holds the gRPC service and its client; the CrypTen side (a TupleProvider) is
mpcache/mpc/dealer/provider.py.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from mpcache.mpc.arith.ring import check_mask_block
from mpcache.mpc.dealer import keys as fss_keys
from mpcache.mpc.dealer.tuples import (
    FIXED_OPS,
    SEED_BYTES,
    WORLD_SIZE,
    Spec,
    correction,
    fixed_mask_value,
    int64_from_pb,
    int64_to_pb,
    party_key,
)
from mpcache.mpc.fss import batch as fss_batch
from mpcache.mpc.transport import tls
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc

log = logging.getLogger("mpcache.dealer")

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 256 << 20
MAX_SESSION_NAME = 256
MAX_OPEN_SESSIONS = 64  # sessions not yet joined by every party (bounds what stray registrations can hold)
MAX_ENDED_SESSIONS = 4096  # ended sessions remembered, so their names are never reused
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


# ---------------------------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Session:
    name: str
    seeds: list[bytes]
    keys: list[bytes]
    created: float
    tokens: dict[int, bytes] = field(default_factory=dict)  # rank -> its registration's token
    registered: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)
    last_seen: dict[int, float] = field(default_factory=dict)
    served: int = 0  # tuples whose corrections went to party 0
    masks: dict[int, tuple[int, ...]] = field(default_factory=dict)  # FIXED_MASK tuple number -> shape of B
    mask_cache: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # tuple number -> B (LRU)
    mask_cache_bytes: int = 0

    def mask(self, mask_tuple: int, shape: tuple[int, ...], budget: int) -> torch.Tensor:
        """B of a FIXED_MASK tuple: kept in plaintext up to `budget` bytes (least recently used goes first),
        because every product with that weight needs it and regenerating costs two AES streams of its size."""
        if mask_tuple in self.mask_cache:
            self.mask_cache.move_to_end(mask_tuple)
            return self.mask_cache[mask_tuple]
        value = fixed_mask_value(self.keys, mask_tuple, shape)
        size = value.numel() * 8
        if size <= budget:
            while self.mask_cache_bytes + size > budget:
                self.mask_cache_bytes -= self.mask_cache.popitem(last=False)[1].numel() * 8
            self.mask_cache[mask_tuple] = value
            self.mask_cache_bytes += size
        return value

    bytes_to: dict[int, int] = field(default_factory=dict)
    aborted: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    key_batches: dict[int, int] = field(default_factory=dict)  # rank -> FSS key batches it asked for so far
    chunks: fss_keys.ChunkCache | None = None  # FSS key chunks made for one party, until the other takes them

    @property
    def fss_seeds(self) -> tuple[bytes, bytes]:
        return fss_keys.fss_seed(self.keys[0]), fss_keys.fss_seed(self.keys[1])

    @property
    def done(self) -> bool:
        return bool(self.aborted) or len(self.closed) == WORLD_SIZE

    @property
    def established(self) -> bool:
        """Every party registered: a real session (a half-joined one is only a stray registration so far)."""
        return len(self.registered) == WORLD_SIZE


class DealerService(pb_grpc.DealerServicer, pb_grpc.DealerControlServicer, pb_grpc.HealthServicer):
    """Serves seeds and party-0 corrections; watches party liveness per session.

    `require_roles`: with mutual TLS, the caller's certificate must name the party rank it claims (party0/party1),
    so party 1 cannot fetch party 0's seed or corrections. `party_timeout`: a registered party silent for longer
    aborts its session. `on_session_end(name, error)` is called once per established session (every party
    registered; error "" = clean close); a session that was never joined by every party just expires.
    `sessions`: the only session names this dealer serves (None: any).
    """

    def __init__(
        self,
        *,
        require_roles: bool,
        party_timeout: float = 30.0,
        on_session_end: Callable[[str, str], None] | None = None,
        dealer_id: str = "dealer",
        mask_cache_bytes: int = 1 << 30,
        sessions: Sequence[str] | None = None,
        key_cache_bytes: int = 1 << 29,
    ) -> None:
        self.require_roles = require_roles
        self.allowed = None if sessions is None else frozenset(sessions)
        self.mask_cache_bytes = mask_cache_bytes
        self.key_cache_bytes = key_cache_bytes
        self.party_timeout = party_timeout
        self.on_session_end = on_session_end
        self.dealer_id = dealer_id
        self.sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="dealer-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()

    def shut_down(self, reason: str) -> list[str]:
        """Abort every live session with `reason` (their parties hear it on their next heartbeat); returns their
        names. The dealer's graceful stop (SIGTERM)."""
        with self._lock:
            live = [s for s in self.sessions.values() if not s.done]
        for s in live:
            with s.lock:
                if s.done:
                    continue
                s.aborted = reason
            self._end(s, reason)
        return [s.name for s in live]

    def settle(self, name: str, timeout: float) -> None:
        """After a session ended, wait (at most `timeout` s) until every party that is still alive has closed, so
        a survivor learns why the session was aborted from its next heartbeat before the dealer goes away."""
        deadline = time.monotonic() + timeout
        with self._lock:
            s = self.sessions.get(name)
        while s is not None and time.monotonic() < deadline:
            now = time.monotonic()
            with s.lock:
                alive = [r for r in s.registered if r not in s.closed and now - s.last_seen[r] <= self.party_timeout]
            if not alive:
                return
            time.sleep(0.05)

    # --- checks shared by the RPCs ---

    def _caller(self, context: grpc.ServicerContext, rank: int) -> None:
        if rank not in range(WORLD_SIZE):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"rank {rank} is not a computing party (0..{WORLD_SIZE - 1})"
            )
        if self.require_roles:
            role = tls.peer_role(context)
            if role != f"party{rank}":
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"certificate of {role!r} may not act as party {rank}")

    def _known(self, context: grpc.ServicerContext, name: str) -> _Session:
        """The session `name`, or NOT_FOUND (nothing is created)."""
        with self._lock:
            s = self.sessions.get(name)
        if s is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"dealer does not know session {name!r}{self._serves()}")
        return s

    def _serves(self) -> str:
        if self.allowed is None:
            return "; Register first"
        return f"; it serves {sorted(self.allowed)}"

    def _session(self, context: grpc.ServicerContext, name: str, rank: int, token: bytes) -> _Session:
        s = self._known(context, name)
        self._registered(context, s, rank, token)
        if s.aborted:
            context.abort(grpc.StatusCode.ABORTED, f"session {name!r} aborted: {s.aborted}")
        if rank in s.closed:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"party {rank} already closed session {name!r}")
        s.last_seen[rank] = time.monotonic()
        return s

    def _registered(self, context: grpc.ServicerContext, s: _Session, rank: int, token: bytes) -> None:
        """The caller is the process that registered `rank` in `s` (its token), not another holder of the cert."""
        if rank not in s.registered:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"party {rank} has not registered in session {s.name!r}")
        if not secrets.compare_digest(token, s.tokens[rank]):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this call does not come from the process that registered party {rank} in session {s.name!r}",
            )

    def _end(self, s: _Session, error: str) -> None:
        if error:
            s.aborted = s.aborted or error
            log.error("step=abort session %s aborted: %s", s.name, s.aborted)
        self._forget_ended()
        if not s.established:  # a stray or half-started session: nobody waits for it
            log.warning("step=expire session %s: not joined by every party (%s)", s.name, error or "closed")
        elif self.on_session_end is not None:
            self.on_session_end(s.name, error)

    def _forget_ended(self) -> None:
        """Keep at most MAX_ENDED_SESSIONS ended sessions (their names stay refused while remembered)."""
        with self._lock:
            ended = [n for n, s in self.sessions.items() if s.done]
            for name in ended[: max(0, len(ended) - MAX_ENDED_SESSIONS)]:
                del self.sessions[name]

    # --- Dealer ---

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        self._caller(context, request.rank)
        if request.world_size != WORLD_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"world_size {request.world_size}: this dealer serves 2PC")
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version}; this dealer speaks {PROTOCOL_VERSION}",
            )
        if not 0 < len(request.session) <= MAX_SESSION_NAME:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"session id must be 1..{MAX_SESSION_NAME} characters")
        if self.allowed is not None and request.session not in self.allowed:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"dealer does not serve session {request.session!r}{self._serves()}: start every role with the "
                "same --session",
            )
        with self._lock:
            s = self.sessions.get(request.session)
            if s is None:
                if sum(not x.done and not x.established for x in self.sessions.values()) >= MAX_OPEN_SESSIONS:
                    context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{MAX_OPEN_SESSIONS} sessions are waiting for their parties; try again later",
                    )
                seeds = [secrets.token_bytes(SEED_BYTES) for _ in range(WORLD_SIZE)]
                keys = [party_key(seed, request.session, r) for r, seed in enumerate(seeds)]
                s = self.sessions[request.session] = _Session(request.session, seeds, keys, time.monotonic())
                s.chunks = fss_keys.ChunkCache(self.key_cache_bytes, wait_s=self.party_timeout)
        with s.lock:
            if s.done:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"session {request.session!r} is over ({s.aborted or 'closed'}); tuples are never reused, "
                    "start a new session id",
                )
            if request.rank in s.registered:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"party {request.rank} already registered in session {request.session!r}: a seed is handed out "
                    "once (is another process running with this rank and session?)",
                )
            s.registered.add(request.rank)
            s.tokens[request.rank] = secrets.token_bytes(16)
            s.last_seen[request.rank] = time.monotonic()
            reply = pb.RegisterResponse(
                seed=s.seeds[request.rank], dealer_id=self.dealer_id, token=s.tokens[request.rank]
            )
            s.bytes_to[request.rank] = s.bytes_to.get(request.rank, 0) + reply.ByteSize()
        log.info("step=register session %s: party %d registered", request.session, request.rank)
        return reply

    def GetTuples(self, request: pb.TupleRequest, context: grpc.ServicerContext) -> pb.TupleResponse:
        self._caller(context, request.rank)
        if request.rank != 0:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "only party 0 fetches corrections; other parties use their seed"
            )
        s = self._session(context, request.session, request.rank, request.token)
        try:
            specs = [(Spec.from_pb(m), m.count or 1) for m in request.specs]
            total = 0
            for spec, count in specs:
                if spec.kind in fss_keys.KINDS:
                    raise ValueError(f"{spec.name} keys go to both parties: ask GetKeys")
                spec.check_size()
                if count > 1 << 20:
                    raise ValueError(f"count {count} too large")
                total += 8 * count * spec.correction_numel()
            if total > MAX_MESSAGE_BYTES // 2:
                raise ValueError(
                    f"the reply would carry {total} bytes of corrections; ask in batches under {MAX_MESSAGE_BYTES // 2}"
                )
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with s.lock:
            if request.request_id < s.served:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"party 0 is out of step: it asked for tuple {request.request_id}, the dealer served up to "
                    f"{s.served}; tuples are never served twice",
                )
            out = []
            index = request.request_id
            masks = dict(s.masks)
            for spec, count in specs:
                for _ in range(count):
                    mask = None
                    if spec.kind == pb.FIXED_MASK:
                        masks[index] = spec.shape_a
                    elif spec.kind in FIXED_OPS:
                        if spec.mask_tuple not in masks:
                            context.abort(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"{spec.name} refers to tuple {spec.mask_tuple}, which is not a FIXED_MASK",
                            )
                        try:
                            check_mask_block(masks[spec.mask_tuple], spec.shape_b)
                        except ValueError as e:
                            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{spec.name}: {e}")
                        mask = s.mask(spec.mask_tuple, masks[spec.mask_tuple], self.mask_cache_bytes)
                    out.append(int64_to_pb(correction(s.keys, index, spec, mask)))
                    index += 1
            s.served, s.masks = index, masks
            reply = pb.TupleResponse(request_id=request.request_id, corrections=out)
            s.bytes_to[0] = s.bytes_to.get(0, 0) + reply.ByteSize()
        return reply

    def GetKeys(self, request: pb.KeyRequest, context: grpc.ServicerContext):
        """Stream a key batch's correction words to either party, chunk by chunk (keys.py)."""
        self._caller(context, request.rank)
        s = self._session(context, request.session, request.rank, request.token)
        try:
            kind, n, count = fss_keys.check_spec(Spec.from_pb(request.spec))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rank, batch = request.rank, request.batch
        with s.lock:
            expected = s.key_batches.get(rank, 0)
            if batch < expected:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"party {rank} is out of step: it asks for key batch {batch}, the dealer served it up to "
                    f"{expected}; key batches are never served twice",
                )
            s.key_batches[rank] = batch + 1
            s.chunks.drop_before(min(s.key_batches.get(r, 0) for r in range(WORLD_SIZE)) - 1)
        seeds = s.fss_seeds
        for j, (c0, c1) in enumerate(fss_batch.chunk_bounds(count)):
            if s.aborted:
                context.abort(grpc.StatusCode.ABORTED, f"session {s.name!r} aborted: {s.aborted}")
            data = s.chunks.take((batch, j), rank, lambda j=j, size=c1 - c0: fss_keys.chunk_corrections(
                seeds, n, batch, j, size, kind))  # fmt: skip
            reply = pb.KeyChunk(batch=batch, chunk=j, count=c1 - c0, corrections=data)
            with s.lock:
                s.bytes_to[rank] = s.bytes_to.get(rank, 0) + reply.ByteSize()
                s.last_seen[rank] = time.monotonic()
            yield reply

    # --- DealerControl ---

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        self._caller(context, request.rank)
        s = self._known(context, request.session)
        self._registered(context, s, request.rank, request.token)
        if s.aborted:
            return pb.HeartbeatResponse(aborted=True, reason=s.aborted)
        s.last_seen[request.rank] = time.monotonic()
        return pb.HeartbeatResponse()

    def Close(self, request: pb.CloseRequest, context: grpc.ServicerContext) -> pb.CloseResponse:
        self._caller(context, request.rank)
        s = self._known(context, request.session)
        self._registered(context, s, request.rank, request.token)
        with s.lock:
            was_done = s.done
            s.closed.add(request.rank)
            reply = pb.CloseResponse(
                tuples_served=s.served if request.rank == 0 else 0, bytes_served=s.bytes_to.get(request.rank, 0)
            )
            if request.error and not s.aborted:
                s.aborted = f"party {request.rank} failed: {request.error}"
            now_done = s.done
        log.info(
            "step=close session %s: party %d closed%s (%d tuples, %d bytes sent to it)",
            s.name,
            request.rank,
            f" with error: {request.error}" if request.error else "",
            reply.tuples_served,
            reply.bytes_served,
        )
        if now_done and not was_done:
            self._end(s, s.aborted)
        return reply

    # --- Health ---

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        if self._stop.is_set():
            return pb.HealthResponse(status=pb.HealthResponse.NOT_SERVING, role="dealer", reason="stopping")
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, role="dealer")

    # --- liveness ---

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.party_timeout / 4)):
            now = time.monotonic()
            with self._lock:
                sessions = [s for s in self.sessions.values() if not s.done]
            for s in sessions:
                with s.lock:
                    if s.done:
                        continue
                    silent = [
                        (r, now - t)
                        for r, t in s.last_seen.items()
                        if r not in s.closed and now - t > self.party_timeout
                    ]
                    # A session where only one party ever showed up is stuck too: name the missing one.
                    missing = [r for r in range(WORLD_SIZE) if r not in s.registered]
                    if missing and now - s.created > self.party_timeout:
                        silent = [(r, now - s.created) for r in missing]
                    if not silent:
                        continue
                    rank, age = silent[0]
                    verb = "never registered" if rank not in s.registered else "silent"
                    s.aborted = f"party {rank} {verb} for {age:.1f} s (timeout {self.party_timeout:g} s)"
                self._end(s, s.aborted)


def serve(
    address: str,
    service: DealerService,
    credentials: grpc.ServerCredentials | None,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `service` on `address` (host:port; port 0 = any); returns (server, port).

    Raises OSError naming the address if it cannot be bound (e.g. the port is in use).
    """
    from concurrent import futures

    # so_reuseport off: a second dealer on a taken port must fail, not silently share it with the first
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)]
    )
    pb_grpc.add_DealerServicer_to_server(service, server)
    pb_grpc.add_DealerControlServicer_to_server(service, server)
    pb_grpc.add_HealthServicer_to_server(service, server)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"dealer cannot listen on {address} (port in use or address not available)")
    server.start()
    return server, port


# ---------------------------------------------------------------------------------------------------------------
# The party's client
# ---------------------------------------------------------------------------------------------------------------


class DealerUnavailable(RuntimeError):
    """The dealer could not be reached, did not answer in time or refused a call; the message names the dealer, the
    call, what happened (connection refused, timeout, unknown session, ...) and what to check."""


def _connection_refused(details: str) -> bool:
    return "refused" in details.lower() or "failed to connect" in details.lower()


class DealerClient:
    """A party's connection to the dealer: register once, then (party 0) fetch corrections; heartbeat; close."""

    def __init__(
        self,
        address: str,
        session: str,
        rank: int,
        credentials: grpc.ChannelCredentials | None,
        timeout: float = 30.0,
    ) -> None:
        if rank not in range(WORLD_SIZE):
            raise ValueError(f"rank {rank} is not a computing party (0..{WORLD_SIZE - 1})")
        self.address, self.session, self.rank, self.timeout = address, session, rank, timeout
        options = GRPC_OPTIONS + (tls.channel_options("dealer") if credentials else [])
        if credentials:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.DealerStub(self.channel)
        self.control = pb_grpc.DealerControlStub(self.channel)
        self.bytes_received = 0
        self.tuples_received = 0
        self.token = b""  # from Register: names this process's registration in every later call

    def _call(self, what: str, fn, request, timeout: float | None = None):
        try:
            return fn(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise self._error(what, e, timeout or self.timeout) from None

    def _error(self, what: str, e: grpc.RpcError, timeout: float) -> DealerUnavailable:
        """One line that says what happened and what to check."""
        code, details = e.code(), e.details() or ""
        where = f"dealer at {self.address}"
        if code == grpc.StatusCode.UNAVAILABLE and _connection_refused(details):
            return DealerUnavailable(
                f"{where} refused the connection for {what} (is the dealer running and listening there? check "
                f"--dealer)"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            return DealerUnavailable(f"{where} is unavailable for {what}: {details} (check --dealer and TLS files)")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DealerUnavailable(
                f"{where} did not answer {what} within {timeout:g} s (stalled or overloaded; --timeout sets the wait)"
            )
        if code == grpc.StatusCode.NOT_FOUND:
            return DealerUnavailable(f"{where} refused {what} for session {self.session!r}: {details}")
        return DealerUnavailable(f"{where} refused {what}: {code.name}: {details}")

    def register(self, connect_timeout: float | None = None) -> bytes:
        """Wait for the dealer (it may start after us), register and return this party's seed."""
        wait = connect_timeout if connect_timeout is not None else self.timeout
        request = pb.RegisterRequest(
            session=self.session, rank=self.rank, world_size=WORLD_SIZE, protocol_version=PROTOCOL_VERSION
        )
        try:
            grpc.channel_ready_future(self.channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            try:  # one harmless call, for the reason (connection refused, TLS, ...)
                pb_grpc.HealthStub(self.channel).Check(pb.HealthRequest(), timeout=1.0)
            except grpc.RpcError as e:
                error = self._error("Register", e, 1.0)
                raise DealerUnavailable(f"{error}; still not reachable after {wait:g} s") from None
        reply = self._call("Register", self.stub.Register, request)
        self.bytes_received += reply.ByteSize()
        self.token = reply.token
        if len(reply.seed) < 16:
            raise DealerUnavailable(f"dealer at {self.address} sent a {len(reply.seed)}-byte seed; at least 16 needed")
        return reply.seed

    def get_keys(self, batch: int, spec: Spec) -> Iterator[pb.KeyChunk]:
        """This party's key batch number `batch` (spec: keys.compare_spec), chunk by chunk as the dealer streams it.
        The deadline grows with the batch (the dealer generates as it streams: at least 50k comparisons a second)."""
        request = pb.KeyRequest(session=self.session, rank=self.rank, batch=batch, spec=spec.to_pb(), token=self.token)
        timeout = self.timeout + spec.shape_a[0] / 50_000
        try:
            for chunk in self.stub.GetKeys(request, timeout=timeout):
                self.bytes_received += chunk.ByteSize()
                yield chunk
        except grpc.RpcError as e:
            raise self._error(f"GetKeys (key batch {batch})", e, timeout) from None

    def get_tuples(self, request_id: int, specs: Sequence[Spec]) -> list[torch.Tensor]:
        """Party 0's corrections for `specs`, the first being tuple number `request_id` of the session."""
        request = pb.TupleRequest(
            session=self.session, rank=self.rank, request_id=request_id, specs=[s.to_pb() for s in specs],
            token=self.token,
        )
        reply = self._call("GetTuples", self.stub.GetTuples, request)
        self.bytes_received += reply.ByteSize()
        self.tuples_received += len(reply.corrections)
        if len(reply.corrections) != len(specs):
            raise DealerUnavailable(
                f"dealer at {self.address} returned {len(reply.corrections)} of {len(specs)} tuples"
            )
        return [int64_from_pb(t) for t in reply.corrections]

    def heartbeat(self, timeout: float | None = None) -> str:
        """'' while the session is alive; the dealer's reason once it was aborted."""
        request = pb.HeartbeatRequest(session=self.session, rank=self.rank, token=self.token)
        reply = self._call("Heartbeat", self.control.Heartbeat, request, timeout)
        return reply.reason or ("aborted" if reply.aborted else "")

    def close(self, error: str = "", timeout: float | None = None) -> pb.CloseResponse:
        request = pb.CloseRequest(session=self.session, rank=self.rank, error=error, token=self.token)
        reply = self._call("Close", self.control.Close, request, timeout)
        self.channel.close()
        return reply
