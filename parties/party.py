"""`party --rank {0,1}`: a computing party. Registers with the dealer, joins the other party over gRPC (CrypTen),
then runs the jobs clients submit (parties/jobs.py) until a client asks it to shut down or it gets SIGTERM.

    party --rank 0 --peers party0:50701,party1:50711 --api-listen party0:50702 --dealer dealer:50700 \
          --certs certs/party0 --model model.safetensors

Only party 0 loads the model (it is the model owner); its weights are secret-shared with party 1 at start-up.
--model is a safetensors file of named weights (the demo jobs) or a checkpoint folder (config.json + weights, as
mpcache.model.from_pretrained reads): then party 1 learns the architecture (ModelConfig) and both serve the
private decoder, job "generate" (mpcache/mpc/nn/decoder.py). Party 1 waits for the model --timeout seconds plus
one second per MODEL_BYTES_PER_S bytes of it (party 0 says the size first), so a large model has time to load.

Jobs (issue #13): each party checks a request completely before any MPC (parties/jobs.py) and refuses a bad one
with the reason; the parties agree on every job and on one order of the jobs before running it
(parties/agreement.py); a job that fails half-way at either party (an exception, a stalled or diverged peer, a
cancelled or vanished client) ends with a clear error to the client at both parties, and the session serves the
next job: both parties start every job from the same dealer tuple number and the same shared randomness, whatever
the last one left behind.
Lifecycle: SIGTERM ends the running job, closes the session with the other party and the dealer and exits 0 (the
other party then ends cleanly too). Heartbeats watch the dealer (a lost dealer or an aborted session ends the party,
exit 1, naming the cause) and, while idle, the other party (health NOT_SERVING with the reason until it answers).
Threads: gRPC handlers only queue requests; the main thread runs every MPC step (CrypTen keeps global state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from mpcache.mpc.dealer import service as dealer
from mpcache.mpc.dealer import tuples
from mpcache.mpc.transport import tls, wire
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc
from parties import agreement, jobs
from parties.agreement import SHUTDOWN, Duplicate, Job, JobTable
from parties.common import (
    Credentials,
    Fatal,
    Parser,
    Termination,
    add_common_flags,
    bound_memory,
    host_of,
    parse_json,
    peak_rss_mb,
    release_memory,
    run_main,
    setup_logging,
)

log = logging.getLogger("mpcache.party")
MAX_MESSAGE_BYTES = 256 << 20
MAX_JOB_ID = 128
MODEL_BYTES_PER_S = 4 << 20  # the slowest model load + share the start-up wait allows for (measured ~50 MB/s idle)


def parse(argv: list[str] | None):
    p = Parser(prog="party", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add("--rank", type=int, choices=(0, 1), help="this party's rank (0 owns the model)")
    p.add("--peers", default="127.0.0.1:50701,127.0.0.1:50711", help="party-to-party addresses, rank order")
    p.add("--listen", default=None, help="bind address for party-to-party traffic (default: own --peers entry)")
    p.add("--api-listen", default=None, help="bind address of the client API (default: own --peers host, port "
          "50702 + 10*rank)")  # fmt: skip
    p.add("--dealer", default="127.0.0.1:50700", help="dealer address")
    p.add("--model", default=None, help="party 0: safetensors file with weights, or a checkpoint folder (decoder)")
    p.add("--comparisons", default="fss", choices=("fss", "crypten"),
          help="party 0: the decoder's secret comparisons (FSS keys, or CrypTen's adder); party 1 follows it")
    p.add("--timeout", default=30.0, type=float, help="seconds a peer or the dealer may stay silent mid-step")
    p.add("--connect-timeout", default=60.0, type=float, help="seconds to wait for the dealer and the other party")
    p.add("--heartbeat", default=2.0, type=float, help="seconds between heartbeats to the dealer and the other party")
    p.add("--agree-timeout", default=5.0, type=float, help="seconds a job waits for the other party's copy")
    p.add("--idle-timeout", default=0.0, type=float, help="exit after this many seconds without a job (0 = never)")
    args = p.parse_args(argv)
    if args.rank is None:
        p.error("--rank is required (or MPCACHE_RANK)")
    for name in ("timeout", "connect_timeout", "heartbeat", "agree_timeout"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            p.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    peers = [a.strip() for a in args.peers.split(",") if a.strip()]
    if len(peers) != 2:
        p.error(f"--peers needs 2 addresses (party 0, party 1), got {peers}")
    args.peers = peers
    args.api_listen = args.api_listen or f"{host_of(peers[args.rank])}:{50702 + 10 * args.rank}"
    if args.model and args.rank != 0:
        p.error("only party 0 (the model owner) takes --model")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Client API: handlers check and queue requests, the main thread runs them
# ---------------------------------------------------------------------------------------------------------------


class Api(pb_grpc.JobsServicer, pb_grpc.InferenceServicer, pb_grpc.HealthServicer):
    """Client API. With mutual TLS only a caller holding the client's certificate may submit, cancel or shut
    down; health checks are open to every certificate of the deployment's CA."""

    def __init__(self, party: Party, require_client_role: bool) -> None:
        self.party, self.rank, self.require_client_role = party, party.rank, require_client_role
        self.table: JobTable = party.table
        self.ready = False
        self.failure: str | None = None  # set once the session is ending; pending and new requests fail with it

    def _check_caller(self, context: grpc.ServicerContext) -> None:
        if self.require_client_role and tls.peer_role(context) != "client":
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"only the client may call this, not {tls.peer_role(context)}"
            )

    def _check_serving(self, context: grpc.ServicerContext) -> None:
        if self.failure:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"party {self.rank} is ending its session: {self.failure}")
        if not self.ready:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"party {self.rank} is starting; retry when it is serving")

    def Run(self, request: pb.JobRequest, context: grpc.ServicerContext) -> pb.JobResult:
        self._check_caller(context)
        if request.party != self.rank:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"share for party {request.party} sent to party {self.rank}"
            )
        if not 0 < len(request.job_id) <= MAX_JOB_ID or request.job_id.startswith(SHUTDOWN):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid job id {request.job_id[:MAX_JOB_ID]!r}")
        self._check_serving(context)
        try:
            inputs = [(tuples.int64_from_pb(i.share), i.precision_bits) for i in request.inputs]
        except (ValueError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad input share: {e}")
        job = Job(request.job_id, request.kind, request.params_json or "{}", inputs)
        try:
            job.params = self.party.validate(job)  # before it is queued: party 0 proposes only valid jobs
        except ValueError as e:
            log.warning("step=job id=%s invalid: %s", job.job_id, e)
            job.finish(error=(grpc.StatusCode.INVALID_ARGUMENT, str(e)))  # remembered with the reason
        self._add(job, context)
        return self._answer(job, context)

    def Shutdown(self, request: pb.ShutdownRequest, context: grpc.ServicerContext) -> pb.ShutdownResponse:
        self._check_caller(context)
        self._check_serving(context)
        job = Job(f"{SHUTDOWN}{request.request_id[:MAX_JOB_ID]}", SHUTDOWN, "{}", params={})
        self._add(job, context)
        self._answer(job, context)
        return pb.ShutdownResponse()

    def _add(self, job: Job, context: grpc.ServicerContext) -> None:
        try:
            self.table.add(job)
        except Duplicate as e:
            if not e.job.received and e.job.error:  # the other party gave it up before it came here
                context.abort(*e.job.error)
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        context.add_callback(lambda: self._call_ended(job))

    def _call_ended(self, job: Job) -> None:
        """The client's call ended: early (it died, or its other call failed), the job stops at both parties;
        after the job, its answer is dropped if nobody took it."""
        if not self.table.cancel(job, "the client's call ended before the answer"):
            job.result = None

    def _answer(self, job: Job, context: grpc.ServicerContext):
        while not job.done.wait(0.1):
            if self.failure:
                self.table.finish(job, error=(grpc.StatusCode.UNAVAILABLE, f"party {self.rank}: {self.failure}"))
        if job.error is not None:
            context.abort(*job.error)
        result, job.result = job.result, None  # the job is remembered without its output shares
        return result

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        self._check_caller(context)
        job = self.table.get(request.request_id)
        if job is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"party {self.rank} has no job {request.request_id!r}")
        return job.status()

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        self._check_caller(context)
        job = self.table.get(request.request_id)
        if job is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"party {self.rank} has no job {request.request_id!r}")
        cancelled = self.table.cancel(job, "cancelled by the client")
        return pb.CancelResponse(cancelled=cancelled, state=job.state)

    def SubmitPrompt(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served: submit a prompt as Jobs.Run with kind 'generate'")

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        reason = self.party.trouble()
        status = pb.HealthResponse.NOT_SERVING if reason else pb.HealthResponse.SERVING
        return pb.HealthResponse(status=status, role="party", rank=self.rank, reason=reason)


def serve_api(address: str, api: Api, credentials: grpc.ServerCredentials | None) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="api"),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_JobsServicer_to_server(api, server)
    pb_grpc.add_InferenceServicer_to_server(api, server)
    pb_grpc.add_HealthServicer_to_server(api, server)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"party {api.rank} cannot listen on {address} for clients (port in use or address not available)")
    server.start()
    return server


# ---------------------------------------------------------------------------------------------------------------
# Shared randomness that every job starts from
# ---------------------------------------------------------------------------------------------------------------


class SharedRandomness:
    """CrypTen's generators shared between the parties (pairwise "prev"/"next", "global") restart for every job
    from a value both parties derive from the job number, so a job that stopped half-way at one party (drawing
    less than the other) cannot desynchronise the next one's zero sharings. The bases are drawn once, in step,
    from the generators CrypTen seeded at start-up (secret from anyone but the parties that share them)."""

    KEYS = ("prev", "next", "global")

    def __init__(self, crypten) -> None:
        self.generators = crypten.generators
        self.bases = {}
        for key in self.KEYS:
            g = self.generators[key][torch.device("cpu")]
            draw = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=g)
            self.bases[key] = draw.numpy().tobytes()

    def reseed(self, job: int) -> None:
        for key, base in self.bases.items():
            seed = int.from_bytes(hashlib.sha256(base + job.to_bytes(8, "big")).digest()[:8], "big")
            for g in self.generators[key].values():
                g.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# The party
# ---------------------------------------------------------------------------------------------------------------


class Party:
    def __init__(self, args, creds: Credentials, term: Termination) -> None:
        self.args, self.creds, self.rank, self.term = args, creds, args.rank, term
        self.other = 1 - self.rank
        self.table = JobTable(self.rank, args.agree_timeout)
        self.api = Api(self, require_client_role=creds.files is not None)
        self.dealer: dealer.DealerClient | None = None
        self.session = None  # provider.DealerSession
        self.comm = None
        self.ctx = jobs.JobContext(self.rank)
        self.running: Job | None = None
        self.link_trouble = ""  # the other party misses heartbeats: why
        self._stop = threading.Event()
        self._dealer_lost = False  # no point telling an unreachable dealer that we are closing

    # --- start-up ---

    def start(self) -> None:
        args = self.args
        self.server = serve_api(args.api_listen, self.api, self.creds.server())
        log.info("step=listen client API on %s", args.api_listen)
        # these import CrypTen (only the parties pay for it): before registering, so that the import cannot hold up
        # the heartbeats the dealer starts expecting at registration
        from mpcache.mpc.arith import numerics
        from mpcache.mpc.dealer import provider
        from mpcache.mpc.transport import grpc_comm

        self.grpc_comm = grpc_comm
        self.dealer = dealer.DealerClient(args.dealer, args.session, self.rank, self.creds.channel(), args.timeout)
        seed = self.dealer.register(connect_timeout=args.connect_timeout)
        log.info("step=register dealer %s gave this party its seed", args.dealer)
        self._thread(self._dealer_heartbeat, "dealer-heartbeat")

        self.crypten = provider.crypten
        coordinator = agreement.Coordinator(self.table, args.session, require_roles=self.creds.files is not None)
        self.comm = grpc_comm.init_party(
            self.rank,
            2,
            args.peers,
            args.session,
            listen=args.listen,
            timeout_s=args.timeout,
            connect_timeout_s=args.connect_timeout,
            tls_files=self.creds.files,
            services=[coordinator.add_to],
        )
        self.crypten.cfg.communicator.verbose = True  # CrypTen counts rounds and bytes only when verbose
        fetch = self.dealer.get_tuples if self.rank == 0 else None
        self.session = provider.DealerSession(args.session, self.rank, seed, fetch, self.dealer.get_keys)
        provider.attach(self.session)
        numerics.install(provider.PROVIDER_NAME)  # exact truncation (dealer EXACT_TRUNCATION tuples) for every product
        log.info("step=connect joined party %d at %s", self.other, args.peers[self.other])
        self._share_model()
        self.randomness = SharedRandomness(self.crypten)
        self.peer = agreement.Peer(
            self.comm.peer_channel(self.other), args.session, args.peers[self.other], args.agree_timeout
        )
        self._thread(self._peer_heartbeat, "peer-heartbeat")
        self._thread(self._watch_termination, "termination")
        if self.rank == 1:
            self._thread(
                lambda: agreement.expire_unproposed(
                    self.table, self.peer, self._stop.is_set, min(1.0, args.agree_timeout / 4)
                ),
                "agreement",
            )
        self.api.ready = True
        log.info("step=ready serving jobs %s", sorted(jobs.JOBS))

    def _thread(self, target, name: str) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    def _share_model(self) -> None:
        """Party 0 secret-shares its model weights; party 1 learns only their names and shapes (or the decoder's
        architecture). Party 0 first says how large the model is: party 1 waits for it that much longer."""
        # The code that loads and shares a model is imported first, outside the wait: its cost does not follow the
        # model's size (building the first model imports torch._dynamo: 1-7 s, measured on 2 busy cores).
        import safetensors.torch  # noqa: F401
        import torch._dynamo  # noqa: F401

        import mpcache.model.loading  # noqa: F401
        import mpcache.mpc.nn.decoder  # noqa: F401

        path = Path(self.args.model) if self.rank == 0 and self.args.model else None
        size = _model_bytes(path) if path is not None else 0
        size = self.comm.broadcast_obj(size, 0)
        wait = self.args.timeout + size / MODEL_BYTES_PER_S
        if size:
            log.info("step=model %.1f MB to load and share (waiting up to %.0f s for it)", size / 1e6, wait)
        with self.comm.patience(wait):
            self._load_and_share(path)

    def _load_and_share(self, path: Path | None) -> None:
        config = None
        if path is not None and path.is_dir():
            from mpcache.model.loading import from_pretrained

            try:
                model = from_pretrained(path)  # float32; share_model converts one tensor at a time
            except (OSError, ValueError) as e:
                raise Fatal(f"cannot load the model folder {path}: {e}") from None
            config = model.config.to_dict()
        # the architecture and the comparison protocol are public: party 1 takes party 0's
        config, comparisons = self.comm.broadcast_obj((config, self.args.comparisons), 0)
        if config is not None:
            from mpcache.model.config import ModelConfig
            from mpcache.mpc.arith.numerics import share_owned
            from mpcache.mpc.nn import decoder
            from mpcache.mpc.nn.layers import PrivateOptions

            if self.rank == 1:
                model = decoder.architecture_only(ModelConfig.from_dict(config))  # shapes only
            options = PrivateOptions(comparisons=comparisons)
            self.ctx.decoder = decoder.share_model(model, share_owned, options, consume=True)
            del model
            release_memory()
            log.info(
                "step=model shared the decoder (%s, %d layers, %s comparisons); peak RSS %.0f MiB", config["family"],
                config["n_layer"], comparisons, peak_rss_mb(),
            )  # fmt: skip
            return
        weights = {}
        if path is not None:
            from safetensors.torch import load_file

            if not path.is_file():
                raise Fatal(f"model file not found: {path}")
            weights = {k: v.float() for k, v in sorted(load_file(str(path)).items())}
            jobs.check_weights(weights)
        manifest = self.comm.broadcast_obj({k: tuple(v.shape) for k, v in weights.items()}, 0)
        for name, shape in manifest.items():
            plain = weights[name] if self.rank == 0 else torch.empty(shape)
            self.ctx.weights[name] = self.crypten.cryptensor(plain, src=0)
        if manifest:
            log.info("step=model shared %s", ", ".join(f"{k}{list(s)}" for k, s in manifest.items()))

    # --- liveness ---

    def _dealer_heartbeat(self) -> None:
        """Keep the dealer session alive; a dead dealer or an aborted session ends this party within --timeout."""
        while not self._stop.wait(self.args.heartbeat):
            try:
                reason = self.dealer.heartbeat(timeout=self.args.timeout)
                if reason:
                    reason = f"dealer aborted the session: {reason}"
            except dealer.DealerUnavailable as e:
                reason = str(e)  # names the dealer's address and what failed
                self._dealer_lost = True
            if reason and not self._stop.is_set():
                self._give_up(reason)
                return

    def _peer_heartbeat(self) -> None:
        """While idle, the other party must answer a handshake on our link every --heartbeat seconds; one that does
        not (stopped, cut off) makes health NOT_SERVING with the reason until it answers again. A running job
        watches the other party itself (--timeout)."""
        failing_since = None
        while not self._stop.wait(self.args.heartbeat):
            if self.running is not None:
                continue
            problem = self.comm.ping(timeout=self.args.timeout)
            if problem and failing_since is None:
                failing_since = time.monotonic()
            if problem:
                silent = time.monotonic() - failing_since + self.args.timeout
                self.link_trouble = f"party {self.other}: {problem} (missed heartbeats for {silent:.0f} s)"
                log.warning("step=heartbeat %s", self.link_trouble)
            elif failing_since is not None:
                log.info("step=heartbeat party %d answers again", self.other)
                failing_since, self.link_trouble = None, ""

    def _watch_termination(self) -> None:
        """SIGTERM (a flag, see common.Termination): end the running job now; the main loop then closes."""
        while not self._stop.wait(0.05):
            if self.term:
                log.info("step=terminate %s: ending the running job and the session", self.term.signal)
                self.comm.interrupt(f"party {self.rank} is shutting down ({self.term.signal})")
                self.table.wake()
                return

    def _give_up(self, reason: str) -> None:
        """From a background thread: fail pending requests, let the main thread exit, force it after a grace."""
        self.api.failure = reason
        if self.comm is not None:
            self.comm.interrupt(reason)
        self.table.wake()

        def force() -> None:
            time.sleep(self.args.timeout)
            print(f"party{self.rank}: error: {reason}", file=sys.stderr, flush=True)
            os._exit(1)

        self._thread(force, "force-exit")

    def trouble(self) -> str:
        """Why this party cannot serve now ('' if it can): what health checks report."""
        if self.api.failure:
            return self.api.failure
        if self.term:
            return f"shutting down ({self.term.signal})"
        if not self.api.ready:
            return "starting"
        if self.comm is not None and self.comm.failure is not None:
            return str(self.comm.failure)
        return self.link_trouble

    # --- the job loop ---

    def validate(self, job: Job) -> dict:
        """Everything about a request both parties can check before any MPC (raises ValueError naming the problem)."""
        bits = jobs.INPUT_BITS.get(job.kind, self.crypten.cfg.encoder.precision_bits)
        if any(b != bits for _, b in job.inputs):
            raise ValueError(f"{job.kind} inputs must be fixed point with {bits} fractional bits")
        params = parse_json(job.params_json, "the job parameters")
        jobs.check(job.kind, params, [tuple(s.shape) for s, _ in job.inputs], self.ctx)
        return params

    def serve(self) -> str:
        """Run jobs until the session ends; returns how it ended cleanly (raises Fatal otherwise)."""
        idle_since = time.monotonic()
        while True:
            ended = self._ended()
            if ended:
                return ended
            job = self._next_job()
            if job is None:
                idle = time.monotonic() - idle_since
                if self.args.idle_timeout and idle > self.args.idle_timeout:
                    raise Fatal(f"no job for {idle:.0f} s (--idle-timeout {self.args.idle_timeout:g})")
                continue
            self.running = job
            try:
                self._run(job)
            finally:
                self.running, idle_since = None, time.monotonic()
                release_memory()
            if job.kind == SHUTDOWN and job.state == pb.DONE:
                log.info("step=shutdown requested by the client")
                return "shut down by the client"

    def _ended(self) -> str:
        """'' while the session goes on; how it ended cleanly; raises Fatal if it failed."""
        if self.api.failure:
            raise Fatal(self.api.failure)
        if self.comm.failure is not None:
            raise Fatal(str(self.comm.failure))
        if self.term:
            return f"stopped by {self.term.signal}"
        state = self.comm.peer_status()[self.other]
        if state == "closed":
            return f"party {self.other} ended the session"
        if state:
            raise Fatal(state)
        return ""

    def _next_job(self) -> Job | None:
        """Party 0 picks its oldest waiting job and proposes it; party 1 takes what party 0 ordered."""
        if self.rank == 1:
            return self.table.next_ordered(timeout=0.1)
        job = self.table.take_next(timeout=0.1)
        if job is None:
            return None
        verdict = self.peer.propose(job)
        if verdict.accepted:
            return job
        log.warning("step=agree job %s not run: %s", job.job_id, verdict.reason)
        if verdict.state == pb.JOB_STATE_UNSPECIFIED:  # no answer: party 1 may have queued it, so it must drop it
            self.comm.abort_job(f"party 0 dropped job {job.number}: {verdict.reason}", job=job.number)
        code = grpc.StatusCode.CANCELLED if verdict.state == pb.CANCELLED else grpc.StatusCode.ABORTED
        self.table.finish(job, error=(code, f"job {job.job_id} not run: {verdict.reason}"))
        return None

    def _run(self, job: Job) -> None:
        comm = self.comm
        job.state, job.started = pb.RUNNING, time.monotonic()
        log.info("step=job id=%s number=%d kind=%s", job.job_id, job.number, job.kind)
        try:
            position = comm.begin_job(job.number, self.session.position, job.digest)
            self.session.align(position)
            self.randomness.reseed(job.number)
            self.ctx.checkpoint = lambda: comm.checkpoint(job.cancel)
            result = self._compute(job) if job.kind != SHUTDOWN else None
            comm.end_job(job.cancel)
        except self.grpc_comm.JobCancelledError as e:
            log.info("step=job id=%s cancelled: %s", job.job_id, e)
            self.table.finish(job, error=(grpc.StatusCode.CANCELLED, f"job {job.job_id} cancelled: {e}"))
            return
        except Exception as e:
            if comm.failure is not None or isinstance(e, self.grpc_comm.PeerLostError):
                raise  # the session itself is broken: the party ends (main)
            reason = str(e) if isinstance(e, self.grpc_comm.CommError) else f"{type(e).__name__}: {e}"
            reason = f"party {self.rank}: {reason}" if not isinstance(e, self.grpc_comm.JobAbortedError) else reason
            comm.abort_job(reason)
            log.warning("step=job id=%s failed: %s", job.job_id, reason)
            message = f"job {job.job_id} failed: {reason}; the parties serve the next job"
            self.table.finish(job, error=(grpc.StatusCode.ABORTED, message))
            return
        finally:
            self.ctx.checkpoint = jobs.no_checkpoint
        self.table.finish(job, result)
        if result is not None:
            log.info(
                "step=job id=%s done in %.3f s: %d rounds, %d bytes to/from the other party, %d tuples, "
                "%d dealer bytes; peak RSS %.0f MiB", job.job_id, result.stats.elapsed_s, result.stats.rounds,
                result.stats.bytes, result.stats.tuples, result.stats.dealer_bytes, peak_rss_mb(),
            )  # fmt: skip

    def _compute(self, job: Job) -> pb.JobResult:
        crypten = self.crypten
        stats0 = self.comm.get_communication_stats()
        consumed0, dealer_bytes0 = self.session.consumed, self.session.correction_bytes
        t0 = time.perf_counter()
        self.ctx.report = None
        inputs = [crypten.mpc.MPCTensor.from_shares(share, precision=bits) for share, bits in job.inputs]
        outputs = jobs.run(job.kind, self.ctx, inputs, job.params)
        shares = []
        for out in outputs:
            # Fresh zero sharing on top: what the client receives from each party is uniformly random.
            share = out.share + crypten.mpc.primitives.ArithmeticSharedTensor.PRZS(out.size()).share
            bits = int(round(math.log2(out._tensor.encoder.scale)))
            shares.append(pb.FixedPointShare(precision_bits=bits, share=wire.tensor_to_proto(share)))
        stats = self.comm.get_communication_stats()
        return pb.JobResult(
            job_id=job.job_id,
            outputs=shares,
            stats=pb.JobStats(
                elapsed_s=time.perf_counter() - t0,
                rounds=int(stats["rounds"] - stats0["rounds"]),
                bytes=int(stats["bytes"] - stats0["bytes"]),
                dealer_bytes=self.session.correction_bytes - dealer_bytes0,
                tuples=self.session.consumed - consumed0,
                report_json="" if self.ctx.report is None else json.dumps(self.ctx.report),
            ),
        )

    # --- shut-down ---

    def close(self, error: str = "") -> None:
        """End the session: fail whatever is still pending, close the link to the other party (it hears OP_CLOSE),
        tell the dealer (a clean close, or the error that aborts the session) and stop serving."""
        self._stop.set()
        self.api.failure = self.api.failure or error or "the session ended"
        self.table.wake()
        if self.comm is not None:
            if error:  # the other party must not take this for a clean end
                self.comm.abort_session(f"party {self.rank} failed: {error}")
            try:
                self.crypten.uninit()  # flushes our last messages and waits for the peer's close
            except Exception as e:  # noqa: BLE001 - best effort while going down
                log.warning("step=close communicator: %s", e)
        if self.dealer is not None and self.dealer.token and not self._dealer_lost:  # only a registered party
            try:
                reply = self.dealer.close(error=error, timeout=min(self.args.timeout, 5.0))
                log.info(
                    "step=close dealer sent this party %d bytes (%d tuples)", reply.bytes_served, reply.tuples_served
                )
            except dealer.DealerUnavailable as e:
                log.warning("step=close %s", e)
        if hasattr(self, "server"):
            self.server.stop(grace=1.0)


def _model_bytes(path: Path) -> int:
    """Size on disk of a model file or checkpoint folder (0 if missing: loading it reports that)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return 0


def main(argv: list[str] | None = None) -> int:
    bound_memory()
    args = parse(argv)
    setup_logging(f"party{args.rank}", args.session, args.log_level)
    creds = Credentials(f"party{args.rank}", args)
    term = Termination().install()
    party = Party(args, creds, term)
    try:
        with term.raising():  # until serving, SIGTERM stops the start-up at once
            party.start()
        ended = party.serve()
    except BaseException as e:
        party.close(error=f"{type(e).__name__}: {e}" if not isinstance(e, Fatal) else str(e))
        raise
    log.info("step=close %s: closing the session", ended)
    party.close()
    log.info("step=exit clean")
    return 0


def cli() -> None:
    sys.exit(run_main(f"party{_rank_hint()}", main))


def _rank_hint() -> str:
    argv = sys.argv[1:]
    if "--rank" in argv and argv.index("--rank") + 1 < len(argv):
        return argv[argv.index("--rank") + 1]
    return os.environ.get("MPCACHE_RANK", "")


if __name__ == "__main__":
    cli()
