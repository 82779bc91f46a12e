"""Which client job runs next, agreed by both parties before any MPC (issue #13: job isolation and agreement).

Every request a party receives becomes a `Job` in its `JobTable`, keyed by the client's job id (a repeated id is
refused). Party 0 orders: it takes its oldest waiting job and proposes it to party 1 (`Coordinator.Propose`: job
number, id, kind and a digest of the public request). Party 1 waits briefly for its own copy of that request,
checks the digest and accepts (it then runs the jobs in party 0's order) or refuses with the reason, and party 0
fails the job with it. A job that only party 1 received is dropped after the same wait: party 1 asks party 0 about
it (`Coordinator.Query`) and ends it with party 0's answer (never received, refused, cancelled, ...). Either way the
session goes on with the next job. Cancelling (the client's Cancel, or its call ending early) marks the job; a
running job stops at its next checkpoint at both parties (`parties/jobs.py`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from mpcache.mpc.transport import tls
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc

log = logging.getLogger("mpcache.party")

SHUTDOWN = "__shutdown__"  # the kind of the pseudo-job that ends the session (both parties agree on it too)
MAX_REMEMBERED = 10_000  # finished jobs whose ids stay refused (and whose outcome Status reports)
FINISHED = (pb.DONE, pb.CANCELLED, pb.FAILED)


@dataclass
class Job:
    """One client request at one party, from arrival to its answer."""

    job_id: str
    kind: str
    params_json: str = "{}"
    inputs: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (share, precision_bits)
    params: dict | None = None  # validated at arrival
    state: int = pb.QUEUED
    number: int = 0  # the agreed job number (both parties run jobs in increasing number); 0 = not ordered yet
    arrived: float = field(default_factory=time.monotonic)
    started: float = 0.0
    elapsed: float = 0.0
    cancel: str = ""  # why the job should stop ("" = it should not)
    received: bool = True  # False: a record of a job this party never received (refused when it comes late)
    result: pb.JobResult | None = None  # until the client's call has taken it
    stats: pb.JobStats | None = None
    error: tuple[grpc.StatusCode, str] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    digest: bytes = b""  # what both parties must agree on (set on creation)

    def __post_init__(self) -> None:
        """The digest: id, kind, parameters and the inputs' shapes and precisions (the public request)."""
        public = [self.job_id, self.kind, self.params_json, [[list(s.shape), b] for s, b in self.inputs]]
        self.digest = hashlib.sha256(json.dumps(public).encode()).digest()

    def finish(self, result: pb.JobResult | None = None, error: tuple[grpc.StatusCode, str] | None = None) -> None:
        self.result, self.error = result, error
        self.stats = result.stats if result is not None else None
        self.inputs, self.params = [], None  # a finished job is remembered by its outcome only
        if self.started:
            self.elapsed = time.monotonic() - self.started
        if error is None:
            self.state = pb.DONE
        else:
            self.state = pb.CANCELLED if error[0] == grpc.StatusCode.CANCELLED else pb.FAILED
        self.done.set()

    def status(self) -> pb.StatusResponse:
        elapsed = self.elapsed or (time.monotonic() - self.started if self.started else 0.0)
        out = pb.StatusResponse(request_id=self.job_id, state=self.state, elapsed_s=elapsed)
        if self.error is not None:
            out.error = self.error[1]
        if self.stats is not None:
            out.rounds, out.bytes_sent = self.stats.rounds, self.stats.bytes
        return out


class Duplicate(ValueError):
    """A job id this party has seen before (`job`: that earlier job)."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job


class JobTable:
    """A party's jobs by id: the waiting ones in arrival order (party 0 proposes from there), the ones party 0
    ordered (a job number; party 1 runs them from `ordered`), and the finished ones, remembered so their ids stay
    refused."""

    def __init__(self, rank: int, agree_timeout: float) -> None:
        self.rank, self.agree_timeout = rank, agree_timeout
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.ordered: collections.deque[Job] = collections.deque()  # party 1: accepted, in party 0's order
        self.last_number = 0
        self._cv = threading.Condition()

    def add(self, job: Job) -> None:
        with self._cv:
            if job.job_id in self.jobs:
                message = f"job id {job.job_id!r} was used before at party {self.rank}; ids are never reused"
                raise Duplicate(message, self.jobs[job.job_id])
            self.jobs[job.job_id] = job
            while len(self.jobs) > MAX_REMEMBERED:
                oldest = next(iter(self.jobs.values()))
                if oldest.state not in FINISHED:
                    break
                self.jobs.popitem(last=False)
            self._cv.notify_all()

    def get(self, job_id: str) -> Job | None:
        with self._cv:
            return self.jobs.get(job_id)

    def finish(self, job: Job, result=None, error=None) -> None:
        with self._cv:
            if job.state not in FINISHED:
                job.finish(result, error)
            self._cv.notify_all()

    def cancel(self, job: Job, reason: str) -> bool:
        """Ask `job` to stop: a waiting one ends now, a running (or, at party 1, ordered) one at its next checkpoint."""
        with self._cv:
            if job.state in FINISHED:
                return False
            job.cancel = job.cancel or reason
            if job.state == pb.QUEUED and job.number == 0:
                job.finish(error=(grpc.StatusCode.CANCELLED, f"job {job.job_id} cancelled: {reason}"))
            self._cv.notify_all()
            return True

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # --- party 0 ---

    def take_next(self, timeout: float) -> Job | None:
        """Party 0: the oldest job still waiting, numbered (its place in the order), or None after `timeout`."""
        with self._cv:
            self._cv.wait_for(lambda: self._first_waiting() is not None, timeout)
            job = self._first_waiting()
            if job is not None:
                self.last_number += 1
                job.number = self.last_number
            return job

    def _first_waiting(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state == pb.QUEUED and j.number == 0), None)

    def query(self, job_id: str) -> pb.JobQueryResponse:
        """Party 0's answer to party 1 about a job party 1 holds but nobody proposed."""
        job = self.get(job_id)
        if job is None:
            return pb.JobQueryResponse(state=pb.JOB_STATE_UNSPECIFIED, reason=f"party 0 never received job {job_id}")
        return pb.JobQueryResponse(state=job.state, reason=job.error[1] if job.error else "")

    # --- party 1 ---

    def accept(self, proposal: pb.JobProposal) -> pb.JobVerdict:
        """Party 0 proposes a job: wait (agree_timeout) for our own copy, check it is the same request, queue it."""
        deadline = time.monotonic() + self.agree_timeout
        with self._cv:
            if proposal.job <= self.last_number:
                return pb.JobVerdict(reason=f"job number {proposal.job} is not after {self.last_number}")
            self._cv.wait_for(lambda: proposal.job_id in self.jobs, max(deadline - time.monotonic(), 0.0))
            job = self.jobs.get(proposal.job_id)
            if job is None:
                reason = (
                    f"party 1 did not receive job {proposal.job_id} within {self.agree_timeout:g} s of party 0 "
                    "(the client's request to party 1 was lost or is late)"
                )
                gone = Job(proposal.job_id, proposal.kind, received=False)
                gone.finish(error=(grpc.StatusCode.ABORTED, reason))
                self.jobs[proposal.job_id] = gone
                return pb.JobVerdict(reason=reason)
            if job.state != pb.QUEUED or job.number:
                why = job.error[1] if job.error else pb.JobState.Name(job.state)
                return pb.JobVerdict(reason=f"party 1 holds job {job.job_id} as {why}", state=job.state)
            if job.digest != proposal.digest or job.kind != proposal.kind:
                reason = f"the parties received different requests under job id {job.job_id}"
                job.finish(error=(grpc.StatusCode.ABORTED, reason))
                return pb.JobVerdict(reason=reason)
            job.number = self.last_number = proposal.job
            self.ordered.append(job)
            self._cv.notify_all()
            return pb.JobVerdict(accepted=True)

    def next_ordered(self, timeout: float) -> Job | None:
        """The next job party 0 ordered, or None after `timeout`."""
        with self._cv:
            self._cv.wait_for(lambda: bool(self.ordered), timeout)
            return self.ordered.popleft() if self.ordered else None

    def unproposed(self) -> list[Job]:
        """Jobs waiting longer than agree_timeout without party 0 proposing them."""
        now = time.monotonic()
        with self._cv:
            return [
                j for j in self.jobs.values()
                if j.state == pb.QUEUED and j.number == 0 and now - j.arrived > self.agree_timeout
            ]  # fmt: skip


class Coordinator(pb_grpc.CoordinatorServicer):
    """The agreement service on the party-to-party port: party 1 answers Propose, party 0 answers Query; with
    mutual TLS only the other party's certificate may call."""

    def __init__(self, table: JobTable, session: str, require_roles: bool) -> None:
        self.table, self.session, self.require_roles = table, session, require_roles

    def _check(self, context: grpc.ServicerContext, session: str, rank: int) -> None:
        if self.require_roles and tls.peer_role(context) != f"party{rank}":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"only party {rank} may call this")
        if session != self.session:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"session {session!r} is not {self.session!r}")
        if self.table.rank == rank:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"party {rank} does not take this call")

    def Propose(self, request: pb.JobProposal, context: grpc.ServicerContext) -> pb.JobVerdict:
        self._check(context, request.session, 0)
        verdict = self.table.accept(request)
        if not verdict.accepted:
            log.warning("step=agree job %s (number %d) refused: %s", request.job_id, request.job, verdict.reason)
        return verdict

    def Query(self, request: pb.JobQuery, context: grpc.ServicerContext) -> pb.JobQueryResponse:
        self._check(context, request.session, 1)
        return self.table.query(request.job_id)

    def add_to(self, server: grpc.Server) -> None:
        pb_grpc.add_CoordinatorServicer_to_server(self, server)


class Peer:
    """This party's calls to the other party's Coordinator (on the channel its MPC stream uses)."""

    def __init__(self, channel: grpc.Channel, session: str, address: str, agree_timeout: float) -> None:
        self.stub = pb_grpc.CoordinatorStub(channel)
        self.session, self.address, self.agree_timeout = session, address, agree_timeout

    def propose(self, job: Job) -> pb.JobVerdict:
        """Party 1's verdict on running `job` as job number job.number (`accepted`, or why not)."""
        request = pb.JobProposal(
            session=self.session, job=job.number, job_id=job.job_id, kind=job.kind, digest=job.digest
        )
        try:
            return self.stub.Propose(request, timeout=self.agree_timeout + 5.0)
        except grpc.RpcError as e:
            reason = f"party 1 at {self.address} did not answer the proposal: {e.code().name}: {e.details()}"
            return pb.JobVerdict(reason=reason, state=pb.JOB_STATE_UNSPECIFIED)

    def query(self, job_id: str) -> pb.JobQueryResponse | None:
        try:
            return self.stub.Query(pb.JobQuery(session=self.session, job_id=job_id), timeout=self.agree_timeout)
        except grpc.RpcError:
            return None  # asked again later; a lost party 0 ends the session by itself


def expire_unproposed(table: JobTable, peer: Peer, stop: Callable[[], bool], period: float) -> None:
    """Party 1's janitor thread: a job nobody proposed within agree_timeout ends with party 0's word on it."""
    while not stop():
        for job in table.unproposed():
            answer = peer.query(job.job_id)
            if answer is None or answer.state in (pb.QUEUED, pb.RUNNING):
                continue  # still waiting in party 0's queue (or party 0 is unreachable right now)
            if answer.state == pb.JOB_STATE_UNSPECIFIED:
                reason = f"{answer.reason} (the client's request to party 0 was lost); dropped by party 1"
            else:
                reason = f"party 0 ended job {job.job_id} ({pb.JobState.Name(answer.state)}: {answer.reason})"
            code = grpc.StatusCode.CANCELLED if answer.state == pb.CANCELLED else grpc.StatusCode.ABORTED
            log.warning("step=agree job %s dropped: %s", job.job_id, reason)
            table.finish(job, error=(code, reason))
        time.sleep(period)
