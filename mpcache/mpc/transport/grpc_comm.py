"""CrypTen's communicator over gRPC between separate OS processes, with no torch.distributed.

Topology: every party runs one gRPC server (service `mpcache.v1.Peer`) and opens one long-lived client stream to
every other party, so each ordered pair src -> dst has its own in-order stream. CrypTen is SPMD (all parties make
the same sequence of communicator calls), so every collective is built from point-to-point messages: all_reduce
= send my share to everyone, receive theirs, reduce in rank order. A batched call packs its whole list into one
message (one round, one message per peer).

Matching and failure rules (the reason this module exists rather than a bare socket):
* A party is connected to another once both directions are up: its handshake (`Hello`) reached the peer and the
  peer's stream arrived here (its first message, OP_OPEN, binds the stream to the peer's rank). A second stream
  claiming a connected rank is refused (ALREADY_EXISTS) and the session goes on.
* Each message carries (session, seq, op). The receiving server rejects a foreign session, a gap or a repeat in
  seq, a malformed tensor and (via gRPC) an oversized message; the sender sees the rejection as an error.
  Protocol violations by a known peer are fatal at the receiver too, so neither side hangs.
* The receiving *call* checks the op tag, root, reduce op, dtype and element count against what it is doing, so
  diverged programs fail with a message naming both sides instead of silently mixing shares.
* A peer that dies is noticed from its broken streams at once; a peer that stalls is noticed after `timeout_s`
  without a message. Either way the waiting call raises an error naming the peer, and this party tells the others
  (OP_ABORT) so a 3-party run fails everywhere, fast.

Jobs (a deployment's client requests, parties/party.py): `begin_job(n, ...)` .. `end_job()` bracket job n at every
party and every message carries its job number. Inside a job a stalled peer, diverged calls or a local exception
end that job only: `abort_job(reason)` tells the peers (OP_JOB_ABORT), whose calls in that job then raise
`JobAbortedError` at once; leftovers of an ended job are dropped, never read by the next one. `checkpoint()` lets
both parties stop a job together (a cancelled client). A broken stream or a malformed message still ends the session.

Install into CrypTen with `init_party(rank, world_size, peers, session)`, which rebinds
`crypten.communicator.DistributedCommunicator` (the name `crypten.init()` looks up at call time) and calls
`crypten.init()`; `crypten.uninit()` flushes and closes. Statistics: CrypTen's own counters (rounds, bytes as
elements x 8, time; active when `crypten.cfg.communicator.verbose` is set, exactly as with gloo) plus always-on
wire counters: serialized message bytes + the 5-byte gRPC frame prefix, sent and received (HTTP/2 and TCP
headers, the handshake and the OP_CLOSE / OP_ABORT control messages are not counted).

Link emulation (`rtt_ms`, `bandwidth_mbps`, for benchmarks): a message that arrives at time t becomes visible to
the receiving call at max(t, link_free) + bytes*8/bandwidth + rtt/2, where link_free is when the previous message
on the same directed link finished "transmitting". So one exchange round (both parties send, then receive) costs
rtt/2 + bytes/bandwidth on top of the real loopback time, and a request-response pair costs a full rtt.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from torch.distributed import ReduceOp

from mpcache.mpc.arith.crypten_compat import import_crypten
from mpcache.mpc.transport import tls, wire
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc

crypten = import_crypten()
Communicator = crypten.communicator.Communicator
_logging = crypten.communicator.communicator._logging

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
GRPC_PREFIX_BYTES = 5  # every gRPC message is framed as 1 flag byte + 4 length bytes
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20

_REDUCE_CODES = {
    ReduceOp.SUM: pb.SUM,
    ReduceOp.PRODUCT: pb.PRODUCT,
    ReduceOp.MIN: pb.MIN,
    ReduceOp.MAX: pb.MAX,
    ReduceOp.BAND: pb.BAND,
    ReduceOp.BOR: pb.BOR,
    ReduceOp.BXOR: pb.BXOR,
}
_REDUCE_FNS = {
    pb.SUM: torch.add,  # int64 wraps mod 2^64, as additive shares need
    pb.PRODUCT: torch.mul,
    pb.MIN: torch.minimum,
    pb.MAX: torch.maximum,
    pb.BAND: torch.bitwise_and,
    pb.BOR: torch.bitwise_or,
    pb.BXOR: torch.bitwise_xor,
}
_REJECTION_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,  # our stream arrived second: another process holds our rank there
)
_JOB_OPS = (pb.OP_JOB_BEGIN, pb.OP_JOB_CHECK, pb.OP_JOB_END, pb.OP_JOB_ABORT)
_TTP_UNSUPPORTED = (
    "CrypTen's TTP provider talks to torch.distributed directly (TTPClient._setup_generators) and cannot run over "
    "GrpcCommunicator; keep cfg.mpc.provider='TFP' or register a dealer TupleProvider (service mpcache.v1.Dealer)"
)


class CommError(RuntimeError):
    """A party-to-party failure; the message names the peer involved."""


class PeerTimeoutError(CommError):
    """A peer sent nothing for `timeout_s` while this party waited for it (stalled, crashed or diverged)."""


class PeerLostError(CommError):
    """A peer's connection broke, or it shut down while this party still needed it."""


class PeerAbortedError(CommError):
    """A peer gave up (its own error is quoted) and told this party so."""


class ProtocolError(CommError):
    """A message that breaks the protocol: wrong session, out of order, malformed, or not what this call expects."""


class JobAbortedError(CommError):
    """The current job ended early: a peer gave it up, or this party was interrupted. The session goes on."""


class JobCancelledError(CommError):
    """A party's client cancelled the current job; every party stops it at the same checkpoint."""


class PortInUseError(OSError):
    """The party's listen address is taken by another process."""


@dataclass(frozen=True)
class LinkModel:
    """Emulated link added on top of the real transport; see the module docstring for the exact model."""

    rtt_ms: float = 0.0
    bandwidth_mbps: float = math.inf

    def __post_init__(self) -> None:
        if not (isinstance(self.rtt_ms, int | float) and 0 <= self.rtt_ms < math.inf):
            raise ValueError(f"rtt_ms must be a finite number >= 0, got {self.rtt_ms!r}")
        if not (isinstance(self.bandwidth_mbps, int | float) and self.bandwidth_mbps > 0):
            raise ValueError(f"bandwidth_mbps must be > 0 (math.inf = unlimited), got {self.bandwidth_mbps!r}")

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0

    def transmit_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.bandwidth_mbps * 1e6)


def _check_address(address: Any, what: str) -> str:
    if not isinstance(address, str):
        raise TypeError(f"{what} must be a 'host:port' string, got {type(address).__name__}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must look like 'host:port' with a port in 1..65535, got {address!r}")
    return address


@dataclass(frozen=True)
class PartyConfig:
    """Everything one party needs to join a session; validated on construction."""

    rank: int
    world_size: int
    peers: tuple[str, ...]  # "host:port" of every party's server, indexed by rank (own entry included)
    session: str
    listen: str | None = None  # address to bind, e.g. "0.0.0.0:50701"; default peers[rank]
    timeout_s: float = 30.0  # longest silence from a peer this party is waiting for
    connect_timeout_s: float = 60.0  # how long to wait for every peer to come up
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    link: LinkModel | None = None
    tls_files: tls.TlsFiles | None = None  # mutual TLS between parties (certificate role "party<rank>"); None = plain
    services: tuple = ()  # callables add(grpc.Server): more services on this party's server (e.g. job agreement)

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "max_message_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.world_size < 2:
            raise ValueError(f"world_size must be >= 2 (GrpcCommunicator connects parties), got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if isinstance(self.peers, str) or not isinstance(self.peers, Sequence):
            raise TypeError(f"peers must be a list of 'host:port' strings, got {type(self.peers).__name__}")
        peers = tuple(_check_address(p, f"peers[{i}]") for i, p in enumerate(self.peers))
        if len(peers) != self.world_size:
            raise ValueError(f"peers has {len(peers)} addresses but world_size is {self.world_size}")
        if len(set(peers)) != len(peers):
            raise ValueError(f"peers has duplicate addresses: {list(peers)}")
        object.__setattr__(self, "peers", peers)
        if self.listen is not None:
            _check_address(self.listen, "listen")
        if not isinstance(self.session, str) or not 0 < len(self.session) <= 256:
            raise ValueError(f"session must be a non-empty string of at most 256 characters, got {self.session!r}")
        for name in ("timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")
        if not 1024 <= self.max_message_bytes < 2**31:
            raise ValueError(f"max_message_bytes must be in [1024, 2^31), got {self.max_message_bytes}")
        if self.link is not None and not isinstance(self.link, LinkModel):
            raise TypeError(f"link must be a LinkModel or None, got {type(self.link).__name__}")
        if self.tls_files is not None and not isinstance(self.tls_files, tls.TlsFiles):
            raise TypeError(f"tls_files must be a tls.TlsFiles or None, got {type(self.tls_files).__name__}")

    @classmethod
    def from_env(cls) -> PartyConfig:
        """Read RANK, WORLD_SIZE, MPCACHE_PEERS (comma-separated) and MPCACHE_SESSION (for a bare crypten.init())."""
        missing = [k for k in ("RANK", "WORLD_SIZE", "MPCACHE_PEERS", "MPCACHE_SESSION") if k not in os.environ]
        if missing:
            raise ValueError(f"GrpcCommunicator needs init_party(...) or the environment variables {missing}")
        try:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError as e:
            raise ValueError(f"RANK and WORLD_SIZE must be integers: {e}") from None
        peers = [p.strip() for p in os.environ["MPCACHE_PEERS"].split(",") if p.strip()]
        timeout = float(os.environ.get("MPCACHE_COMM_TIMEOUT_S", "30"))
        return cls(rank, world_size, tuple(peers), os.environ["MPCACHE_SESSION"], timeout_s=timeout)


@dataclass
class _Inbox:
    """Messages from one source, in stream order, plus what we know about that source's liveness."""

    next_seq: int = 0
    messages: collections.deque = field(default_factory=collections.deque)  # (msg, tensors, deliver_at)
    bound: bool = False  # the source's stream arrived (its OP_OPEN); later streams claiming the source are refused
    closed: bool = False  # the source sent OP_CLOSE: it shut down cleanly
    lost: str | None = None  # why the source is gone, if it did not close cleanly
    link_free_at: float = 0.0  # link emulation: when the previous message finished "transmitting"


class _Link:
    """The outgoing stream to one peer: a queue feeding a gRPC request iterator, and a thread draining replies."""

    def __init__(
        self, dst: int, address: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ) -> None:
        self.dst, self.address = dst, address
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:  # only a server holding party <dst>'s certificate is accepted, whatever the host name
            options = options + tls.channel_options(f"party{dst}")
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.stub = pb_grpc.PeerStub(self.channel)
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.seq = 0
        self.lock = threading.Lock()
        self.opened = False
        self.ended = False  # request stream ended (OP_CLOSE + sentinel queued)
        self.done = threading.Event()  # reply stream finished, with or without error

    def open(self, on_error, session: str, src: int, max_bytes: int) -> None:
        replies = self.stub.Exchange(iter(self.outbox.get, None))
        self.opened = True
        self.put(pb.PeerMessage(session=session, src=src, op=pb.OP_OPEN), max_bytes)  # binds the stream there
        threading.Thread(target=self._drain, args=(replies, on_error), name=f"mpc-link-{self.dst}", daemon=True).start()

    def _drain(self, replies, on_error) -> None:
        try:
            for _ in replies:
                pass
        except grpc.RpcError as e:
            on_error(self, e)
        finally:
            self.done.set()

    def put(self, msg: pb.PeerMessage, max_bytes: int) -> int:
        """Stamp the next seq on `msg` and queue it; returns the bytes it puts on the wire."""
        with self.lock:
            if self.ended:
                raise PeerLostError(f"the stream to rank {self.dst} ({self.address}) is already closed")
            msg.seq = self.seq
            size = msg.ByteSize()
            if size > max_bytes:
                raise ValueError(
                    f"a {pb.Op.Name(msg.op)} message of {size} bytes to rank {self.dst} exceeds max_message_bytes="
                    f"{max_bytes}; raise max_message_bytes on every party or split the tensor"
                )
            self.seq += 1
            self.outbox.put(msg)
            if msg.op == pb.OP_CLOSE:
                self.ended = True
                self.outbox.put(None)
            return size + GRPC_PREFIX_BYTES


class _Handle:
    """What isend/irecv return: CrypTen only calls wait()."""

    def __init__(self, fn=None) -> None:
        self._fn = fn

    def wait(self) -> None:
        if self._fn is not None:
            fn, self._fn = self._fn, None
            fn()

    def is_completed(self) -> bool:
        return self._fn is None


def _op_text(op: int, root: int | None = None, reduce_op: int | None = None) -> str:
    text = pb.Op.Name(op) if op in pb.Op.values() else f"op {op}"
    details = []
    if root is not None and op not in (pb.OP_SEND, pb.OP_ALL_REDUCE, pb.OP_ALL_GATHER, pb.OP_BARRIER, pb.OP_SEND_OBJ):
        details.append(f"root {root}")
    if reduce_op:
        details.append(pb.ReduceOp.Name(reduce_op) if reduce_op in pb.ReduceOp.values() else f"reduce {reduce_op}")
    return text + (f"({', '.join(details)})" if details else "")


class GrpcCommunicator(Communicator):
    """CrypTen communicator over gRPC; one instance per party process (see the module docstring)."""

    BYTES_PER_ELEMENT = 8  # what CrypTen's `_logging` counts per element, as for gloo
    instance: GrpcCommunicator | None = None
    _pending_config: PartyConfig | None = None  # set by init_party() for the duration of crypten.init()

    def __init__(self, config: PartyConfig) -> None:
        if not isinstance(config, PartyConfig):
            raise TypeError(f"config must be a PartyConfig, got {type(config).__name__}")
        self.config = config
        self.rank, self.world_size = config.rank, config.world_size
        self._name = f"rank{self.rank}"
        self._peers = [r for r in range(self.world_size) if r != self.rank]
        self._cv = threading.Condition()
        self._failure: CommError | None = None
        self._closing = False
        self._closed = False
        self._job = 0  # the current (or last) job's number; 0 = the session itself (start-up)
        self._in_job = False
        self._aborted: dict[int, str] = {}  # job number -> why it ended early (a peer's OP_JOB_ABORT, interrupt())
        self._patience: float | None = None  # a longer wait than timeout_s for the next calls (see patience())
        self._inbox = {src: _Inbox() for src in self._peers}
        self._links: dict[int, _Link] = {}
        self.reset_communication_stats()
        self._channel_credentials = None if config.tls_files is None else tls.channel_credentials(config.tls_files)
        limit = config.max_message_bytes
        self._options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 0),  # a second process on the same port must fail, not share it
            ("grpc.initial_reconnect_backoff_ms", 100),  # peers start in any order: retry quickly
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._server = self._start_server()
        try:
            self._connect()
        except BaseException:
            self._stop(grace=0)
            raise

    # ---------------------------------------------------------------------------------------------- lifecycle

    @classmethod
    def initialize(cls, rank: int = 0, world_size: int = 1, init_ttp: bool = False) -> None:
        """CrypTen's entry point. `rank`/`world_size` from CrypTen are placeholders (0, 1): the config decides."""
        if init_ttp:
            raise ValueError(_TTP_UNSUPPORTED)
        config = cls._pending_config if cls._pending_config is not None else PartyConfig.from_env()
        cls.instance = cls(config)

    @classmethod
    def is_initialized(cls) -> bool:
        return cls.instance is not None

    @classmethod
    def get(cls) -> GrpcCommunicator | None:
        return cls.instance

    @classmethod
    def shutdown(cls) -> None:
        if cls.instance is not None:
            instance, cls.instance = cls.instance, None
            instance.close()

    def _start_server(self) -> grpc.Server:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2 * self.world_size + 8, thread_name_prefix=f"mpc-r{self.rank}"),
            options=self._options,
        )
        pb_grpc.add_PeerServicer_to_server(_PeerServicer(self), server)
        pb_grpc.add_HealthServicer_to_server(_HealthServicer(self), server)
        for add in self.config.services:
            add(server)
        address = self.config.listen or self.config.peers[self.rank]
        try:
            if self.config.tls_files is None:
                server.add_insecure_port(address)
            else:
                server.add_secure_port(address, tls.server_credentials(self.config.tls_files))
        except RuntimeError:
            raise _bind_error(self.rank, address) from None
        server.start()
        return server

    def _connect(self) -> None:
        """Handshake with every peer (waiting for it to come up), then open the streams."""
        cfg = self.config
        deadline = time.monotonic() + cfg.connect_timeout_s
        hello = pb.PeerHello(
            session=cfg.session, rank=self.rank, world_size=self.world_size, protocol_version=PROTOCOL_VERSION
        )
        for dst in self._peers:
            address = cfg.peers[dst]
            link = self._links[dst] = _Link(dst, address, self._options, self._channel_credentials)
            try:
                reply = link.stub.Hello(hello, timeout=max(deadline - time.monotonic(), 0.01), wait_for_ready=True)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise PeerTimeoutError(
                        f"rank {self.rank} could not reach rank {dst} at {address} within {cfg.connect_timeout_s:g} s "
                        f"(connect_timeout_s): is that party running, and do all parties use the same peers list?"
                    ) from None
                if e.code() in _REJECTION_CODES:
                    raise ProtocolError(f"rank {dst} at {address} refused the handshake: {e.details()}") from None
                raise PeerLostError(
                    f"handshake with rank {dst} at {address} failed: {e.code().name}: {e.details()}"
                ) from None
            if (reply.rank, reply.world_size, reply.session) != (dst, self.world_size, cfg.session):
                raise ProtocolError(
                    f"{address} answered as rank {reply.rank} of {reply.world_size} in session {reply.session!r}, "
                    f"but rank {self.rank} expected rank {dst} of {self.world_size} in session {cfg.session!r}: "
                    f"check the peers list"
                )
        for link in self._links.values():
            link.open(self._on_link_error, cfg.session, self.rank, cfg.max_message_bytes)
        with self._cv:  # both directions: every peer's stream must reach us too
            self._cv.wait_for(
                lambda: self._failure is not None or all(b.bound for b in self._inbox.values()),
                max(deadline - time.monotonic(), 0.0),
            )
            self._raise_failure()
            missing = [src for src, b in self._inbox.items() if not b.bound]
        if missing:
            own = cfg.listen or cfg.peers[self.rank]
            raise PeerTimeoutError(
                f"rank {self.rank} reached rank {missing[0]} at {cfg.peers[missing[0]]}, but rank {missing[0]} did not "
                f"connect back within {cfg.connect_timeout_s:g} s: check that rank {missing[0]}'s peers list names "
                f"this party's address ({cfg.peers[self.rank]}, listening on {own})"
            )

    def close(self) -> None:
        """Flush and stop. Waits (up to timeout_s) until every peer has closed too, so no in-flight message of
        either side is cut off; after a failure it stops at once."""
        if self._closed:
            return
        self._closing = True
        timeout = self.config.timeout_s if self._failure is None else 0.0
        deadline = time.monotonic() + timeout
        close_msg = pb.PeerMessage(session=self.config.session, src=self.rank, op=pb.OP_CLOSE)
        for link in self._links.values():
            if link.opened and not link.ended:
                link.put(pb.PeerMessage.FromString(close_msg.SerializeToString()), self.config.max_message_bytes)
        for link in self._links.values():
            confirmed = link.done.wait(max(deadline - time.monotonic(), 0)) if link.opened else True
            if not confirmed and self._failure is None:
                log.warning(
                    "rank %d: rank %d did not confirm our last messages in %.1f s", self.rank, link.dst, timeout
                )
        with self._cv:
            finished = self._cv.wait_for(
                lambda: all(b.closed or b.lost for b in self._inbox.values()), max(deadline - time.monotonic(), 0)
            )
        if not finished and self._failure is None:
            log.warning("rank %d: not every peer closed its stream within %.1f s", self.rank, timeout)
        self._stop(grace=max(deadline - time.monotonic(), 0.0) + 0.1)

    def _stop(self, grace: float) -> None:
        self._closing = self._closed = True
        self._server.stop(grace).wait()
        for link in self._links.values():
            if link.opened and not link.ended:
                link.outbox.put(None)
            link.channel.close()

    # ----------------------------------------------------------------------------------- receiving (server side)

    def _check_hello(self, hello: pb.PeerHello) -> str | None:
        if hello.protocol_version != PROTOCOL_VERSION:
            return f"protocol version {hello.protocol_version} is not {PROTOCOL_VERSION}"
        if hello.session != self.config.session:
            return (
                f"rank {self.rank} serves session {self.config.session!r} but the caller (rank {hello.rank}) "
                f"is in session {hello.session!r}"
            )
        if hello.world_size != self.world_size:
            return f"rank {self.rank} has world size {self.world_size}, the caller {hello.world_size}"
        if hello.rank not in self._inbox:
            return f"rank {self.rank} cannot accept a peer claiming rank {hello.rank} (world size {self.world_size})"
        return None

    def _bind(self, msg: pb.PeerMessage) -> tuple[grpc.StatusCode, str] | None:
        """The first message of an incoming stream: it must open (OP_OPEN, seq 0) a stream from a known rank of
        this session that has none yet. Refusals are harmless: the session goes on with the stream it has."""
        me = self.rank
        if msg.session != self.config.session:
            reason = f"rank {me} rejected a message for session {msg.session!r}: it serves {self.config.session!r}"
            return grpc.StatusCode.FAILED_PRECONDITION, reason
        if msg.src not in self._inbox:
            return grpc.StatusCode.INVALID_ARGUMENT, f"rank {me} rejected a message from unknown rank {msg.src}"
        if msg.op != pb.OP_OPEN or msg.seq != 0:
            reason = f"rank {me} rejected a stream from rank {msg.src} that did not start with OP_OPEN, seq 0"
            return grpc.StatusCode.INVALID_ARGUMENT, reason
        with self._cv:
            inbox = self._inbox[msg.src]
            if inbox.bound:
                reason = (
                    f"rank {me} is already connected to rank {msg.src} in session {self.config.session!r}; a second "
                    f"process claiming rank {msg.src} is refused"
                )
                return grpc.StatusCode.ALREADY_EXISTS, reason
            inbox.bound, inbox.next_seq = True, 1
            self._cv.notify_all()
        return None

    def _accept(self, msg: pb.PeerMessage) -> tuple[grpc.StatusCode, str] | None:
        """Validate and file one incoming message; returns (status, reason) if it must be rejected."""
        me = self.rank
        if msg.session != self.config.session:
            reason = f"rank {me} rejected a message for session {msg.session!r}: it serves {self.config.session!r}"
            return grpc.StatusCode.FAILED_PRECONDITION, reason  # a stranger: refuse it, but don't die of it
        src = msg.src
        if src not in self._inbox:
            return grpc.StatusCode.INVALID_ARGUMENT, f"rank {me} rejected a message from unknown rank {src}"
        try:
            if msg.op not in pb.Op.values() or msg.op == pb.OP_UNSPECIFIED:
                raise wire.WireFormatError(f"unknown op code {msg.op}")
            tensors = [wire.tensor_from_proto(t) for t in msg.tensors]
        except wire.WireFormatError as e:
            reason = f"rank {me} rejected message seq {msg.seq} from rank {src}: {e}"
            self._fail(ProtocolError(reason))
            return grpc.StatusCode.INVALID_ARGUMENT, reason
        now = time.monotonic()
        nbytes = msg.ByteSize() + GRPC_PREFIX_BYTES
        del msg.tensors[:]  # decoded above: don't hold every payload twice while it waits in the inbox
        with self._cv:
            inbox = self._inbox[src]
            if msg.seq != inbox.next_seq or inbox.closed:
                why = "after its close" if inbox.closed else f"out of order, expected seq {inbox.next_seq}"
                reason = f"rank {me} rejected message seq {msg.seq} ({_op_text(msg.op)}) from rank {src}: {why}"
                self._fail_locked(ProtocolError(reason))
                return grpc.StatusCode.FAILED_PRECONDITION, reason
            inbox.next_seq += 1
            if msg.op == pb.OP_CLOSE:  # teardown, like the sender's, is not counted in the statistics
                inbox.closed = True
            elif msg.op == pb.OP_ABORT:
                self._fail_locked(PeerAbortedError(f"rank {src} aborted the session: {msg.error.message}"))
            elif msg.op == pb.OP_JOB_ABORT:
                self._aborted.setdefault(msg.job, f"rank {src} gave job {msg.job} up: {msg.control.error}")
            else:
                if msg.op not in _JOB_OPS:  # job control, like teardown, is not counted
                    self.wire_bytes_received += nbytes
                    self.wire_messages_received += 1
                deliver_at = now
                if self.config.link is not None:
                    inbox.link_free_at = max(now, inbox.link_free_at) + self.config.link.transmit_s(nbytes)
                    deliver_at = inbox.link_free_at + self.config.link.one_way_s
                inbox.messages.append((msg, tensors, deliver_at))
            self._cv.notify_all()
        return None

    def _incoming_ended(self, src: int, reason: str) -> None:
        with self._cv:
            inbox = self._inbox[src]
            if not inbox.closed and inbox.lost is None:  # while closing too: close() stops waiting for it at once
                inbox.lost = reason
            self._cv.notify_all()

    def _on_link_error(self, link: _Link, error: grpc.RpcError) -> None:
        """The stream to a peer failed: the peer rejected a message, or its process/connection went away."""
        if error.code() in _REJECTION_CODES:
            self._fail(ProtocolError(f"rank {link.dst} ({link.address}) rejected a message: {error.details()}"))
            return
        with self._cv:
            inbox = self._inbox[link.dst]
            if not inbox.closed and inbox.lost is None:  # while closing too: close() stops waiting for it at once
                inbox.lost = f"connection to rank {link.dst} ({link.address}) broke: {error.code().name}"
            self._cv.notify_all()

    def _fail(self, error: CommError) -> CommError:
        with self._cv:
            return self._fail_locked(error)

    def _fail_locked(self, error: CommError) -> CommError:
        """Record the first fatal error, wake every waiting call, and tell the peers (unless they told us)."""
        if self._failure is None:
            self._failure = error
            self._cv.notify_all()
            if not isinstance(error, PeerAbortedError) and not self._closing:
                abort = pb.PeerMessage(
                    session=self.config.session,
                    src=self.rank,
                    op=pb.OP_ABORT,
                    error=pb.PeerError(rank=self.rank, message=str(error)[:4000]),
                )
                for link in self._links.values():
                    if link.opened and not link.ended:
                        try:
                            link.put(
                                pb.PeerMessage.FromString(abort.SerializeToString()), self.config.max_message_bytes
                            )
                        except CommError:
                            pass
        return self._failure

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))
        if self._closed:
            raise CommError(f"rank {self.rank}'s communicator is closed")

    # --------------------------------------------------------------------------------------- point-to-point core

    def _peer_rank(self, rank: Any, what: str) -> int:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank not in self._inbox:
            raise ValueError(
                f"{what} must be another party's rank in [0, {self.world_size}) except {self.rank}, got {rank!r}"
            )
        return rank

    def _root(self, rank: Any, what: str) -> int:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.world_size:
            raise ValueError(f"{what} must be a rank in [0, {self.world_size}), got {rank!r}")
        return rank

    def _send(
        self,
        dst: int,
        op: int,
        tensors: Sequence[torch.Tensor] = (),
        *,
        root: int = 0,
        reduce_op: int = 0,
        obj: bytes = b"",
    ) -> None:
        self._raise_failure()
        self._raise_job_ended()
        inbox = self._inbox[dst]
        if inbox.closed or inbox.lost:
            raise PeerLostError(
                f"rank {self.rank} cannot send {_op_text(op)} to rank {dst} ({self.config.peers[dst]}): "
                + (inbox.lost or "it has shut down")
            )
        msg = pb.PeerMessage(
            session=self.config.session,
            src=self.rank,
            job=self._job,
            op=op,
            root=root,
            reduce_op=reduce_op,
            tensors=[wire.tensor_to_proto(t) for t in tensors],
            object=obj,
        )
        nbytes = self._links[dst].put(msg, self.config.max_message_bytes)
        with self._cv:
            self.wire_bytes_sent += nbytes
            self.wire_messages_sent += 1

    def _recv(
        self, src: int | None, op: int, what: str, *, root: int | None = None, reduce_op: int | None = None
    ) -> tuple[int, pb.PeerMessage, list[torch.Tensor]]:
        """Wait for the next message from `src` (any peer if None), check it is `op`; returns (src, msg, tensors)."""
        sources = self._peers if src is None else [src]
        timeout = self._patience or self.config.timeout_s
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                self._raise_failure()
                self._raise_job_ended()
                ready = [s for s in sources if self._drop_stale(s)]
                if ready:
                    src = ready[0]
                    ahead = self._inbox[src].messages[0][0].job
                    if ahead > self._job:  # the peer left our job (it sends nothing more for it)
                        raise self._job_failure(
                            JobAbortedError(
                                f"rank {src} moved on to job {ahead} while rank {self.rank} waited for {what} in "
                                f"job {self._job}"
                            )
                        )
                    msg, tensors, deliver_at = self._inbox[src].messages.popleft()
                    break
                for s in sources:
                    inbox = self._inbox[s]
                    if inbox.closed or inbox.lost:
                        reason = inbox.lost or "it shut down"
                        error = PeerLostError(
                            f"rank {self.rank} waited for {what} from rank {s} ({self.config.peers[s]}): {reason}"
                        )
                        raise self._fail_locked(error)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    who = " or ".join(f"rank {s} ({self.config.peers[s]})" for s in sources)
                    error = PeerTimeoutError(
                        f"rank {self.rank} waited {timeout:g} s for {what} from {who}, which sent nothing: it has "
                        f"stalled, crashed or taken another code path (timeout_s={timeout:g})"
                    )
                    raise self._job_failure(error)
                self._cv.wait(remaining)
        delay = deliver_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if (
            msg.op != op
            or (root is not None and msg.root != root)
            or (reduce_op is not None and msg.reduce_op != reduce_op)
        ):
            error = ProtocolError(
                f"rank {self.rank} expected {_op_text(op, root, reduce_op)} from rank {src} for {what} but got "
                f"{_op_text(msg.op, msg.root, msg.reduce_op)} (seq {msg.seq}): the parties' programs have diverged"
            )
            with self._cv:
                raise self._job_failure(error)
        return src, msg, tensors

    def _drop_stale(self, src: int) -> bool:
        """Drop the messages of jobs this party has left from the front of src's inbox (under _cv); True if a
        message is left to read."""
        messages = self._inbox[src].messages
        while messages and messages[0][0].job < self._job:
            messages.popleft()
        return bool(messages)

    def _raise_job_ended(self) -> None:
        if self._in_job and self._job in self._aborted:
            raise JobAbortedError(self._aborted[self._job])

    def _job_failure(self, error: CommError) -> CommError:
        """Inside a job a stall or divergence ends the job only (the caller tells the peers with abort_job);
        outside one (start-up) it ends the session. Call under _cv."""
        return error if self._in_job else self._fail_locked(error)

    def _expect_like(
        self, got: list[torch.Tensor], like: Sequence[torch.Tensor], src: int, what: str, same_shape: bool = True
    ) -> None:
        """Received tensors must match the local ones in count, dtype and shape (element count for p2p)."""
        problem = None
        if len(got) != len(like):
            problem = f"{len(got)} tensors, expected {len(like)}"
        else:
            for i, (g, t) in enumerate(zip(got, like)):
                if g.dtype != t.dtype:
                    problem = f"tensor {i} as {g.dtype}, expected {t.dtype}"
                elif (g.shape != t.shape) if same_shape else (g.numel() != t.numel()):
                    problem = f"tensor {i} with shape {list(g.shape)}, expected {list(t.shape)}"
                if problem:
                    break
        if problem:
            with self._cv:
                raise self._job_failure(ProtocolError(f"rank {src} sent {problem} for {what} to rank {self.rank}"))

    @staticmethod
    def _as_list(input: Any, batched: bool, what: str) -> list[torch.Tensor]:
        items = list(input) if batched else [input]
        if batched and not isinstance(input, list | tuple):
            raise TypeError(f"batched {what} expects a list of tensors, got {type(input).__name__}")
        for t in items:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what} expects torch tensors, got {type(t).__name__}")
        return items

    @staticmethod
    def _reduce_code(op: Any) -> int:
        try:
            return _REDUCE_CODES[op]
        except (KeyError, TypeError):
            raise ValueError(f"unsupported reduce op {op!r}; use torch.distributed.ReduceOp.SUM/BXOR/...") from None

    @staticmethod
    def _no_group(group: Any) -> None:
        if group is not None:
            raise ValueError(
                "process groups are a torch.distributed feature (CrypTen's TTP); GrpcCommunicator "
                "connects the computing parties only, so pass group=None"
            )

    def _loads(self, msg: pb.PeerMessage, src: int, what: str) -> Any:
        try:
            return wire.loads(msg.object)
        except (wire.UnsafePickleError, wire.WireFormatError) as e:
            raise self._fail(ProtocolError(f"rank {src} sent an object for {what} that was refused: {e}")) from e

    # ------------------------------------------------------------------------------------------------- jobs

    def begin_job(self, job: int, position: Sequence[int], digest: bytes) -> tuple[int, ...]:
        """Start job number `job` (larger than any before) at every party: each says where its dealer randomness
        stands (`position`: counters, e.g. the next tuple and key batch numbers) and what it runs (`digest`);
        returns the largest position of each counter, where every party continues. Raises JobAbortedError if the
        parties are about to run different requests or a peer gave the job up."""
        with self._cv:
            if job <= self._job:
                raise ValueError(f"job number {job} does not follow job {self._job}")
            self._job, self._in_job = job, True
            self._aborted = {n: why for n, why in self._aborted.items() if n >= job}
            for src in self._peers:
                self._drop_stale(src)
        position = tuple(position)
        self._control(pb.OP_JOB_BEGIN, positions=position, digest=digest)
        agreed = position
        for src in self._peers:
            _, msg, _ = self._recv(src, pb.OP_JOB_BEGIN, f"the start of job {job}")
            if msg.control.digest != digest or len(msg.control.positions) != len(position):
                raise JobAbortedError(f"rank {src} started job {job} with another request (its digest differs)")
            agreed = tuple(max(a, b) for a, b in zip(agreed, msg.control.positions))
        return agreed

    def checkpoint(self, cancel: str = "") -> None:
        """A point where every party may stop the job: raises JobCancelledError at every party if one of them
        asks (`cancel`: why; "" = go on). One message each way, not counted in the statistics."""
        self._checkpoint(pb.OP_JOB_CHECK, cancel)

    def end_job(self, cancel: str = "") -> None:
        """The job's last checkpoint: once it returns at every party, every party's answer stands."""
        try:
            self._checkpoint(pb.OP_JOB_END, cancel)
        finally:
            with self._cv:
                self._in_job = False

    def _checkpoint(self, op: int, cancel: str) -> None:
        self._control(op, cancel=cancel)
        reasons = [cancel] if cancel else []
        for src in self._peers:
            _, msg, _ = self._recv(src, op, f"a checkpoint of job {self._job}")
            if msg.control.cancel:
                reasons.append(msg.control.cancel)
        if reasons:
            with self._cv:
                self._in_job = False
            raise JobCancelledError(reasons[0])

    def abort_job(self, reason: str, job: int | None = None) -> None:
        """Leave the current job (or give up `job`, one this party has not begun) and tell the peers why; their
        calls in it raise JobAbortedError. The session goes on (unless it has failed anyway)."""
        with self._cv:
            if job is None or job == self._job:
                self._in_job, job = False, self._job
        if self._failure is not None or self._closing:
            return
        for dst in self._peers:
            if not (self._inbox[dst].closed or self._inbox[dst].lost):
                try:
                    self._put_control(dst, pb.OP_JOB_ABORT, job, error=reason[:4000])
                except CommError:
                    pass

    def abort_session(self, reason: str) -> None:
        """End the session for every party (they get OP_ABORT with `reason`); close() then stops at once."""
        self._fail(CommError(reason))

    def interrupt(self, reason: str) -> None:
        """From another thread: the current job's pending or next call raises JobAbortedError(reason)."""
        with self._cv:
            if self._in_job:
                self._aborted.setdefault(self._job, reason)
            self._cv.notify_all()

    def _control(self, op: int, **control) -> None:
        self._raise_failure()
        with self._cv:
            self._raise_job_ended()
        for dst in self._peers:
            inbox = self._inbox[dst]
            if inbox.closed or inbox.lost:
                raise PeerLostError(f"rank {dst} ({self.config.peers[dst]}): {inbox.lost or 'it has shut down'}")
            self._put_control(dst, op, self._job, **control)

    def _put_control(self, dst: int, op: int, job: int, **control) -> None:
        msg = pb.PeerMessage(
            session=self.config.session, src=self.rank, op=op, job=job, control=pb.JobControl(**control)
        )
        self._links[dst].put(msg, self.config.max_message_bytes)

    @contextlib.contextmanager
    def patience(self, seconds: float):
        """Wait up to `seconds` instead of timeout_s for the peers inside this block (a party loading a large
        model before it answers)."""
        previous, self._patience = self._patience, max(seconds, self.config.timeout_s)
        try:
            yield
        finally:
            self._patience = previous

    # ----------------------------------------------------------------------------------------------- liveness

    @property
    def failure(self) -> CommError | None:
        """The error that ended the session, if any."""
        return self._failure

    def peer_status(self) -> dict[int, str]:
        """Each peer's state: "" (connected), "closed" (it ended the session cleanly) or why it is lost."""
        with self._cv:
            return {src: "closed" if b.closed else (b.lost or "") for src, b in self._inbox.items()}

    def ping(self, timeout: float) -> str:
        """'' if every peer answers a handshake on its channel within `timeout`, else why not (the idle-link
        heartbeat: a peer that is stopped or cut off answers nothing, though its stream looks open)."""
        cfg = self.config
        hello = pb.PeerHello(session=cfg.session, rank=self.rank, world_size=self.world_size,
                             protocol_version=PROTOCOL_VERSION)  # fmt: skip
        for dst, link in self._links.items():
            try:
                link.stub.Hello(hello, timeout=timeout)
            except grpc.RpcError as e:
                what = (
                    f"did not answer within {timeout:g} s"
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    else (f"refused: {e.code().name}: {e.details()}")
                )
                return f"rank {dst} at {link.address} {what}"
        return ""

    def peer_channel(self, dst: int) -> grpc.Channel:
        """The channel of this party's stream to `dst` (other services of the peer's server use it too)."""
        return self._links[self._peer_rank(dst, "dst")].channel

    # ------------------------------------------------------------------------------------ the CrypTen interface

    @_logging
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._send(self._peer_rank(dst, "dst"), pb.OP_SEND, self._as_list(tensor, False, "send"))

    @_logging
    def recv(self, tensor: torch.Tensor, src: int | None = None) -> torch.Tensor:
        like = self._as_list(tensor, False, "recv")
        src = None if src is None else self._peer_rank(src, "src")
        src, _, got = self._recv(src, pb.OP_SEND, "recv")
        self._expect_like(got, like, src, "recv", same_shape=False)
        return got[0].reshape(tensor.shape)

    @_logging
    def isend(self, tensor: torch.Tensor, dst: int) -> _Handle:
        """The tensor is copied at once, so the handle is already complete."""
        self._send(self._peer_rank(dst, "dst"), pb.OP_SEND, self._as_list(tensor, False, "isend"))
        return _Handle()

    @_logging
    def irecv(self, tensor: torch.Tensor, src: int | None = None) -> _Handle:
        """Fills `tensor` in place when wait() is called (like torch.distributed.irecv)."""
        like = self._as_list(tensor, False, "irecv")
        src = None if src is None else self._peer_rank(src, "src")

        def finish() -> None:
            got_src, _, got = self._recv(src, pb.OP_SEND, "irecv")
            self._expect_like(got, like, got_src, "irecv", same_shape=False)
            tensor.copy_(got[0].reshape(tensor.shape))

        return _Handle(finish)

    @_logging
    def scatter(
        self, scatter_list: Sequence[torch.Tensor] | None, src: int, size: Any = None, device: Any = None
    ) -> torch.Tensor:
        src = self._root(src, "src")
        if self.rank == src:
            if scatter_list is None or len(scatter_list) != self.world_size:
                raise ValueError(f"scatter at its src needs a list of {self.world_size} tensors")
            items = self._as_list(scatter_list, True, "scatter")
            for dst in self._peers:
                self._send(dst, pb.OP_SCATTER, [items[dst]], root=src)
            return items[self.rank]
        if size is None:
            if scatter_list is None:
                raise ValueError("scatter needs `size` (or scatter_list) on the receiving parties")
            size = scatter_list[self.rank].size()
        like = torch.empty(size, dtype=torch.long)  # what gloo allocates for the receive buffer
        _, _, got = self._recv(src, pb.OP_SCATTER, "scatter", root=src)
        self._expect_like(got, [like], src, "scatter")
        return got[0] if device is None else got[0].to(device)

    @_logging
    def reduce(self, input: Any, dst: int, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        dst, code = self._root(dst, "dst"), self._reduce_code(op)
        tensors = self._as_list(input, batched, "reduce")
        if self.rank != dst:
            self._send(dst, pb.OP_REDUCE, tensors, root=dst, reduce_op=code)
            return None
        parts = {self.rank: tensors}
        for src in self._peers:
            _, _, parts[src] = self._recv(src, pb.OP_REDUCE, "reduce", root=dst, reduce_op=code)
            self._expect_like(parts[src], tensors, src, "reduce")
        result = [self._combine([parts[r][i] for r in range(self.world_size)], code) for i in range(len(tensors))]
        return result if batched else result[0]

    @_logging
    def all_reduce(self, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        code = self._reduce_code(op)
        tensors = self._as_list(input, batched, "all_reduce")
        for dst in self._peers:
            self._send(dst, pb.OP_ALL_REDUCE, tensors, reduce_op=code)
        parts = {self.rank: tensors}
        for src in self._peers:
            _, _, parts[src] = self._recv(src, pb.OP_ALL_REDUCE, "all_reduce", reduce_op=code)
            self._expect_like(parts[src], tensors, src, "all_reduce")
        result = [self._combine([parts[r][i] for r in range(self.world_size)], code) for i in range(len(tensors))]
        return result if batched else result[0]

    @staticmethod
    def _combine(parts: list[torch.Tensor], code: int) -> torch.Tensor:
        """Reduce in rank order, so every party computes the bit-identical result."""
        return functools.reduce(_REDUCE_FNS[code], parts[1:], parts[0].clone())

    @_logging
    def gather(self, tensor: torch.Tensor, dst: int) -> list[torch.Tensor | None]:
        dst = self._root(dst, "dst")
        like = self._as_list(tensor, False, "gather")
        if self.rank != dst:
            self._send(dst, pb.OP_GATHER, like, root=dst)
            return [None]
        result: list[torch.Tensor | None] = [None] * self.world_size
        result[self.rank] = tensor.clone()
        for src in self._peers:
            _, _, got = self._recv(src, pb.OP_GATHER, "gather", root=dst)
            self._expect_like(got, like, src, "gather")
            result[src] = got[0]
        return result

    @_logging
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        like = self._as_list(tensor, False, "all_gather")
        for dst in self._peers:
            self._send(dst, pb.OP_ALL_GATHER, like)
        result = [tensor.clone()] * self.world_size
        for src in self._peers:
            _, _, got = self._recv(src, pb.OP_ALL_GATHER, "all_gather")
            self._expect_like(got, like, src, "all_gather")
            result[src] = got[0]
        return result

    @_logging
    def broadcast(self, input: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        """In place, like torch.distributed.broadcast: the receivers' tensors are overwritten and returned."""
        self._no_group(group)
        src = self._root(src, "src")
        tensors = self._as_list(input, batched, "broadcast")
        if self.rank == src:
            for dst in self._peers:
                self._send(dst, pb.OP_BROADCAST, tensors, root=src)
            return input
        _, _, got = self._recv(src, pb.OP_BROADCAST, "broadcast", root=src)
        self._expect_like(got, tensors, src, "broadcast")
        for t, g in zip(tensors, got):
            t.copy_(g)
        return input

    @_logging
    def barrier(self) -> None:
        for dst in self._peers:
            self._send(dst, pb.OP_BARRIER)
        for src in self._peers:
            self._recv(src, pb.OP_BARRIER, "barrier")

    @_logging
    def send_obj(self, obj: Any, dst: int, group: Any = None) -> None:
        self._no_group(group)
        self._send(self._peer_rank(dst, "dst"), pb.OP_SEND_OBJ, obj=wire.dumps(obj))

    @_logging
    def recv_obj(self, src: int, group: Any = None) -> Any:
        self._no_group(group)
        src, msg, _ = self._recv(self._peer_rank(src, "src"), pb.OP_SEND_OBJ, "recv_obj")
        return self._loads(msg, src, "recv_obj")

    @_logging
    def broadcast_obj(self, obj: Any, src: int, group: Any = None) -> Any:
        self._no_group(group)
        src = self._root(src, "src")
        if self.rank == src:
            data = wire.dumps(obj)
            for dst in self._peers:
                self._send(dst, pb.OP_BROADCAST_OBJ, root=src, obj=data)
            return obj
        _, msg, _ = self._recv(src, pb.OP_BROADCAST_OBJ, "broadcast_obj", root=src)
        return self._loads(msg, src, "broadcast_obj")

    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def get_ttp_rank(self) -> int:
        """Where CrypTen would put its TTP (rank = world size); the TTP itself is not supported here."""
        return self.world_size

    def set_name(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"party name must be a str, got {type(name).__name__}")
        self._name = name

    def get_name(self) -> str:
        return self._name

    def get_distributed_backend(self) -> str:
        return "grpc"

    # ----------------------------------------------------------------------------------------------- statistics

    def reset_communication_stats(self) -> None:
        super().reset_communication_stats()
        with self._cv:
            self.wire_bytes_sent = self.wire_bytes_received = 0
            self.wire_messages_sent = self.wire_messages_received = 0

    def get_communication_stats(self) -> dict[str, float]:
        """CrypTen's counters (rounds, bytes = elements x 8, time) plus the bytes and messages really sent."""
        stats = super().get_communication_stats()
        with self._cv:
            stats.update(
                wire_bytes_sent=self.wire_bytes_sent,
                wire_bytes_received=self.wire_bytes_received,
                wire_messages_sent=self.wire_messages_sent,
                wire_messages_received=self.wire_messages_received,
            )
        return stats

    def print_communication_stats(self) -> None:
        super().print_communication_stats()
        stats = self.get_communication_stats()
        crypten.log(f"Wire bytes sent / received: {stats['wire_bytes_sent']} / {stats['wire_bytes_received']}")
        crypten.log(f"Wire messages sent / received: {stats['wire_messages_sent']} / {stats['wire_messages_received']}")


class _PeerServicer(pb_grpc.PeerServicer):
    def __init__(self, comm: GrpcCommunicator) -> None:
        self._comm = comm

    def _check_role(self, rank: int, context: grpc.ServicerContext) -> None:
        """With mutual TLS, a caller may only speak as the rank its certificate names."""
        if self._comm.config.tls_files is not None and tls.peer_role(context) != f"party{rank}":
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"rank {self._comm.rank}: a caller with certificate {tls.peer_role(context)!r} claimed rank {rank}",
            )

    def Hello(self, request: pb.PeerHello, context: grpc.ServicerContext) -> pb.PeerHello:
        self._check_role(request.rank, context)
        problem = self._comm._check_hello(request)
        if problem:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        cfg = self._comm.config
        return pb.PeerHello(
            session=cfg.session, rank=cfg.rank, world_size=cfg.world_size, protocol_version=PROTOCOL_VERSION
        )

    def Exchange(self, request_iterator, context: grpc.ServicerContext):
        received, src, clean = 0, None, False
        try:
            for msg in request_iterator:
                if src is None:
                    self._check_role(msg.src, context)
                    refusal = self._comm._bind(msg)
                    if refusal is not None:
                        context.abort(*refusal)
                    src, received = msg.src, 1
                    continue
                if msg.src != src:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rank {src}'s stream carried rank {msg.src}'s")
                rejection = self._comm._accept(msg)
                if rejection is not None:
                    context.abort(*rejection)
                src, received = msg.src, received + 1
                clean = msg.op == pb.OP_CLOSE
        finally:
            if src is not None and not clean:
                self._comm._incoming_ended(src, f"rank {src}'s stream ended without a clean close (process died?)")
        yield pb.PeerAck(received=received)


class _HealthServicer(pb_grpc.HealthServicer):
    def __init__(self, comm: GrpcCommunicator) -> None:
        self._comm = comm

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        comm = self._comm
        reason = str(comm._failure or "") or ("closing" if comm._closing else "")
        if request.service not in ("", "mpcache.v1.Peer"):
            reason = f"this server has no service {request.service!r}"
        status = pb.HealthResponse.NOT_SERVING if reason else pb.HealthResponse.SERVING
        return pb.HealthResponse(status=status, role="party", rank=comm.rank, reason=reason)


def _bind_error(rank: int, address: str) -> OSError:
    """Turn gRPC's generic bind failure into the real reason, probed with a plain socket."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            s.bind((host, int(port)))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return PortInUseError(
                errno.EADDRINUSE,
                f"rank {rank} cannot listen on {address}: port {port} is already in use (another party or an old "
                f"run holds it; stop it or choose another port)",
            )
        return OSError(e.errno, f"rank {rank} cannot listen on {address}: {e.strerror}")
    return OSError(f"rank {rank} cannot listen on {address} (gRPC refused it; GRPC_VERBOSITY=debug tells why)")


# ------------------------------------------------------------------------------------------------ CrypTen glue

_ORIGINAL_COMMUNICATOR = crypten.communicator.DistributedCommunicator


def install() -> None:
    """Make `crypten.init()` build a GrpcCommunicator (CrypTen looks the class up by this module-global name)."""
    crypten.communicator.DistributedCommunicator = GrpcCommunicator


def uninstall() -> None:
    """Give `crypten.init()` back its torch.distributed communicator."""
    crypten.communicator.DistributedCommunicator = _ORIGINAL_COMMUNICATOR


def init_party(
    rank: int,
    world_size: int,
    peers: Sequence[str],
    session: str,
    *,
    listen: str | None = None,
    timeout_s: float = 30.0,
    connect_timeout_s: float = 60.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    rtt_ms: float | None = None,
    bandwidth_mbps: float | None = None,
    tls_files: tls.TlsFiles | None = None,
    services: Sequence = (),
) -> GrpcCommunicator:
    """Join `session` as `rank` and initialise CrypTen over gRPC; returns the communicator.

    Blocks until every peer is reachable (connect_timeout_s). Finish with `crypten.uninit()`, which flushes and
    waits for the peers to finish too. `rtt_ms`/`bandwidth_mbps` turn on link emulation (module docstring).
    `tls_files`: this party's certificate files for mutual TLS with the other parties (mpcache/mpc/transport/tls.py).
    `services`: callables add(server) that put more services on this party's server (served from start-up on).
    """
    link = None
    if rtt_ms is not None or bandwidth_mbps is not None:
        link = LinkModel(rtt_ms=rtt_ms or 0.0, bandwidth_mbps=math.inf if bandwidth_mbps is None else bandwidth_mbps)
    config = PartyConfig(
        rank=rank,
        world_size=world_size,
        peers=tuple(peers) if isinstance(peers, list | tuple) else peers,
        session=session,
        listen=listen,
        timeout_s=timeout_s,
        connect_timeout_s=connect_timeout_s,
        max_message_bytes=max_message_bytes,
        link=link,
        tls_files=tls_files,
        services=tuple(services),
    )
    if crypten.mpc.ttp_required():
        raise ValueError(_TTP_UNSUPPORTED)
    if crypten.communicator.is_initialized():
        raise RuntimeError("CrypTen is already initialised in this process; call crypten.uninit() first")
    install()
    GrpcCommunicator._pending_config = config
    try:
        crypten.init()
    finally:
        GrpcCommunicator._pending_config = None
    comm = GrpcCommunicator.get()
    assert comm is not None
    return comm
