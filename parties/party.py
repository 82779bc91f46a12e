"""`party --rank {0,1}`: a computing party. Registers with the dealer, joins the other party over gRPC (CrypTen),
then runs the jobs clients submit (parties/jobs.py) until a client asks it to shut down.

    party --rank 0 --peers party0:50701,party1:50711 --api-listen 0.0.0.0:50702 --dealer dealer:50700 \
          --certs certs --model model.safetensors

Only party 0 loads the model (it is the model owner); its weights are secret-shared with party 1 at start-up.
--model is a safetensors file of named weights (the demo jobs) or a checkpoint folder (config.json + weights, as
mpcache.model.from_pretrained reads): then party 1 learns the architecture (ModelConfig) and both serve the
private decoder, job "generate" (mpcache/mpc/nn/decoder.py).
Threads: gRPC handlers only queue requests; the main thread runs every MPC step (CrypTen keeps global state), and
a heartbeat thread keeps the dealer session alive and notices a dead dealer or an aborted session.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from mpcache.mpc.dealer import service as dealer
from mpcache.mpc.dealer import tuples
from mpcache.mpc.transport import tls, wire
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc
from parties import jobs
from parties.common import Credentials, Fatal, Parser, add_common_flags, run_main, setup_logging

log = logging.getLogger("mpcache.party")
SHUTDOWN = "__shutdown__"
MAX_MESSAGE_BYTES = 256 << 20


def parse(argv: list[str] | None):
    p = Parser(prog="party", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add("--rank", type=int, choices=(0, 1), help="this party's rank (0 owns the model)")
    p.add("--peers", default="127.0.0.1:50701,127.0.0.1:50711", help="party-to-party addresses, rank order")
    p.add("--listen", default=None, help="bind address for party-to-party traffic (default: own --peers entry)")
    p.add("--api-listen", default=None, help="bind address of the client API (default 0.0.0.0:50702 + 10*rank)")
    p.add("--dealer", default="127.0.0.1:50700", help="dealer address")
    p.add("--model", default=None, help="party 0: safetensors file with weights, or a checkpoint folder (decoder)")
    p.add("--timeout", default=30.0, type=float, help="seconds a peer or the dealer may stay silent mid-step")
    p.add("--connect-timeout", default=60.0, type=float, help="seconds to wait for the dealer and the other party")
    p.add("--heartbeat", default=2.0, type=float, help="seconds between heartbeats to the dealer")
    p.add("--idle-timeout", default=0.0, type=float, help="exit after this many seconds without a job (0 = never)")
    args = p.parse_args(argv)
    if args.rank is None:
        p.error("--rank is required (or MPCACHE_RANK)")
    for name in ("timeout", "connect_timeout", "heartbeat"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    peers = [a.strip() for a in args.peers.split(",") if a.strip()]
    if len(peers) != 2:
        p.error(f"--peers needs 2 addresses (party 0, party 1), got {peers}")
    args.peers = peers
    args.api_listen = args.api_listen or f"0.0.0.0:{50702 + 10 * args.rank}"
    if args.model and args.rank != 0:
        p.error("only party 0 (the model owner) takes --model")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Client API: handlers queue work for the main thread and wait for its answer
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Pending:
    """One client request on its way through the main thread."""

    job_id: str
    kind: str
    params_json: str = "{}"
    inputs: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (share, precision_bits)
    done: threading.Event = field(default_factory=threading.Event)
    result: pb.JobResult | None = None
    error: tuple[grpc.StatusCode, str] | None = None

    def finish(self, result: pb.JobResult | None = None, error: tuple[grpc.StatusCode, str] | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def header(self) -> tuple:
        """The public description both parties must agree on before running it."""
        return (self.job_id, self.kind, self.params_json, [(tuple(s.shape), p) for s, p in self.inputs])


class Api(pb_grpc.JobsServicer, pb_grpc.HealthServicer):
    """Client API. With mutual TLS only a caller holding the client's certificate may submit or shut down."""

    def __init__(self, rank: int, session: str, require_client_role: bool) -> None:
        self.rank, self.session, self.require_client_role = rank, session, require_client_role
        self.inbox: queue.Queue[Pending] = queue.Queue()
        self.ready = False
        self.failure: str | None = None  # set once the party is going down; pending requests fail with it

    def _check_caller(self, context: grpc.ServicerContext) -> None:
        if self.require_client_role and tls.peer_role(context) != "client":
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"only the client may call this, not {tls.peer_role(context)}"
            )

    def Run(self, request: pb.JobRequest, context: grpc.ServicerContext) -> pb.JobResult:
        self._check_caller(context)
        if request.party != self.rank:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"share for party {request.party} sent to party {self.rank}"
            )
        if not request.job_id or request.job_id == SHUTDOWN:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid job id {request.job_id!r}")
        try:
            inputs = [(tuples.int64_from_pb(i.share), i.precision_bits) for i in request.inputs]
        except (ValueError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad input share: {e}")
        for _, bits in inputs:
            if not 0 <= bits <= 32:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"precision_bits {bits} outside 0..32")
        pending = Pending(request.job_id, request.kind, request.params_json or "{}", inputs)
        self._submit(pending, context)
        if pending.error is not None:
            context.abort(*pending.error)
        return pending.result

    def Shutdown(self, request: pb.ShutdownRequest, context: grpc.ServicerContext) -> pb.ShutdownResponse:
        self._check_caller(context)
        pending = Pending(SHUTDOWN, SHUTDOWN, json.dumps({"reason": request.reason}))
        self._submit(pending, context)
        if pending.error is not None:
            context.abort(*pending.error)
        return pb.ShutdownResponse()

    def _submit(self, pending: Pending, context: grpc.ServicerContext) -> None:
        if self.failure:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"party {self.rank} is failing: {self.failure}")
        self.inbox.put(pending)
        while not pending.done.wait(0.1):
            if self.failure:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"party {self.rank} failed: {self.failure}")
            if not context.is_active():
                return

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        ok = self.ready and not self.failure
        status = pb.HealthResponse.SERVING if ok else pb.HealthResponse.NOT_SERVING
        return pb.HealthResponse(status=status, role="party", rank=self.rank, reason=self.failure or "")


def serve_api(address: str, api: Api, credentials: grpc.ServerCredentials | None) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="api"),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_JobsServicer_to_server(api, server)
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
# The party
# ---------------------------------------------------------------------------------------------------------------


class Party:
    def __init__(self, args, creds: Credentials) -> None:
        self.args, self.creds, self.rank = args, creds, args.rank
        self.api = Api(self.rank, args.session, require_client_role=creds.files is not None)
        self.dealer: dealer.DealerClient | None = None
        self.session = None  # provider.DealerSession
        self.ctx = jobs.JobContext(self.rank)
        self._stop_heartbeat = threading.Event()
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

        self.dealer = dealer.DealerClient(args.dealer, args.session, self.rank, self.creds.channel(), args.timeout)
        seed = self.dealer.register(connect_timeout=args.connect_timeout)
        log.info("step=register dealer %s gave this party its seed", args.dealer)
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

        self.crypten = provider.crypten
        comm = grpc_comm.init_party(
            self.rank,
            2,
            args.peers,
            args.session,
            listen=args.listen,
            timeout_s=args.timeout,
            connect_timeout_s=args.connect_timeout,
            tls_files=self.creds.files,
        )
        self.comm = comm
        self.crypten.cfg.communicator.verbose = True  # CrypTen counts rounds and bytes only when verbose
        fetch = self.dealer.get_tuples if self.rank == 0 else None
        self.session = provider.DealerSession(args.session, self.rank, seed, fetch, self.dealer.get_keys)
        provider.attach(self.session)
        numerics.install(provider.PROVIDER_NAME)  # exact truncation (dealer EXACT_TRUNCATION tuples) for every product
        log.info("step=connect joined party %d at %s", 1 - self.rank, args.peers[1 - self.rank])
        self._share_model()
        self.api.ready = True
        log.info("step=ready serving jobs %s", sorted(jobs.JOBS))

    def _share_model(self) -> None:
        """Party 0 secret-shares its model weights; party 1 learns only their names and shapes (or the decoder's
        architecture)."""
        model_dir = self.args.model if self.rank == 0 and self.args.model and Path(self.args.model).is_dir() else None
        config = None
        if model_dir is not None:
            from mpcache.model.loading import from_pretrained

            try:
                model = from_pretrained(model_dir, torch.float64)
            except (OSError, ValueError) as e:
                raise Fatal(f"cannot load the model folder {model_dir}: {e}") from None
            config = model.config.to_dict()
        config = self.comm.broadcast_obj(config, 0)
        if config is not None:
            from mpcache.model.config import ModelConfig
            from mpcache.mpc.nn import decoder

            if self.rank == 1:
                model = decoder.architecture_only(ModelConfig.from_dict(config))
            self.ctx.decoder = decoder.share_model(model, lambda t: self.crypten.cryptensor(t, src=0))
            log.info("step=model shared the decoder (%s, %d layers)", config["family"], config["n_layer"])
            return
        weights = {}
        if self.rank == 0 and self.args.model:
            from safetensors.torch import load_file

            path = Path(self.args.model)
            if not path.is_file():
                raise Fatal(f"model file not found: {path}")
            weights = {k: v.float() for k, v in sorted(load_file(str(path)).items())}
        manifest = self.comm.broadcast_obj({k: tuple(v.shape) for k, v in weights.items()}, 0)
        for name, shape in manifest.items():
            plain = weights[name] if self.rank == 0 else torch.empty(shape)
            self.ctx.weights[name] = self.crypten.cryptensor(plain, src=0)
        if manifest:
            log.info("step=model shared %s", ", ".join(f"{k}{list(s)}" for k, s in manifest.items()))

    # --- liveness ---

    def _heartbeat(self) -> None:
        """Keep the dealer session alive; a dead dealer or an aborted session ends this party within --timeout."""
        while not self._stop_heartbeat.wait(self.args.heartbeat):
            try:
                reason = self.dealer.heartbeat(timeout=self.args.timeout)
                if reason:
                    reason = f"dealer aborted the session: {reason}"
            except dealer.DealerUnavailable as e:
                reason = str(e)  # names the dealer's address and what failed
                self._dealer_lost = True
            if reason and not self._stop_heartbeat.is_set():
                self._give_up(reason)
                return

    def _give_up(self, reason: str) -> None:
        """From a background thread: fail pending requests, let the main thread exit, force it after a grace."""
        self.api.failure = reason

        def force() -> None:
            time.sleep(self.args.timeout)
            print(f"party{self.rank}: error: {reason}", file=sys.stderr, flush=True)
            os._exit(1)

        threading.Thread(target=force, daemon=True).start()

    # --- the job loop ---

    def _next(self) -> Pending:
        idle_since = time.monotonic()
        while True:
            if self.api.failure:
                raise Fatal(self.api.failure)
            try:
                return self.api.inbox.get(timeout=0.1)
            except queue.Empty:
                idle = time.monotonic() - idle_since
                if self.args.idle_timeout and idle > self.args.idle_timeout:
                    raise Fatal(f"no job for {idle:.0f} s (--idle-timeout {self.args.idle_timeout:g})") from None

    def _agree(self, pending: Pending) -> str:
        """Both parties must be about to run the same request; '' if they are, else why not (at both)."""
        mine = pending.header()
        theirs = self.comm.broadcast_obj(mine if self.rank == 0 else None, 0)
        verdict = ""
        if self.rank == 1 and theirs != mine:
            verdict = f"the parties received different requests: party 0 {theirs[:2]}, party 1 {mine[:2]}"
        return self.comm.broadcast_obj(verdict if self.rank == 1 else None, 1)

    def serve(self) -> None:
        while True:
            pending = self._next()
            log.info("step=job id=%s kind=%s", pending.job_id, pending.kind)
            verdict = self._agree(pending)
            if verdict:
                log.warning("step=job id=%s refused: %s", pending.job_id, verdict)
                pending.finish(error=(grpc.StatusCode.ABORTED, verdict))
                continue
            if pending.kind == SHUTDOWN:
                pending.finish(pb.JobResult(job_id=SHUTDOWN))
                log.info("step=shutdown requested by the client")
                return
            try:
                bits = jobs.INPUT_BITS.get(pending.kind, self.crypten.cfg.encoder.precision_bits)
                if any(b != bits for _, b in pending.inputs):
                    raise ValueError(f"{pending.kind} inputs must be fixed point with {bits} fractional bits")
                params = json.loads(pending.params_json)
                jobs.check(pending.kind, params, [tuple(s.shape) for s, _ in pending.inputs], self.ctx)
            except (ValueError, json.JSONDecodeError) as e:
                log.warning("step=job id=%s invalid: %s", pending.job_id, e)
                pending.finish(error=(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
                continue
            pending.finish(self._run(pending, params))

    def _run(self, pending: Pending, params: dict) -> pb.JobResult:
        crypten = self.crypten
        stats0 = self.comm.get_communication_stats()
        consumed0, dealer_bytes0 = self.session.consumed, self.session.correction_bytes
        t0 = time.perf_counter()
        self.ctx.report = None
        inputs = [crypten.mpc.MPCTensor.from_shares(share, precision=bits) for share, bits in pending.inputs]
        outputs = jobs.run(pending.kind, self.ctx, inputs, params)
        shares = []
        for out in outputs:
            # Fresh zero sharing on top: what the client receives from each party is uniformly random.
            share = out.share + crypten.mpc.primitives.ArithmeticSharedTensor.PRZS(out.size()).share
            bits = int(round(math.log2(out._tensor.encoder.scale)))
            shares.append(pb.FixedPointShare(precision_bits=bits, share=wire.tensor_to_proto(share)))
        elapsed = time.perf_counter() - t0
        stats = self.comm.get_communication_stats()
        result = pb.JobResult(
            job_id=pending.job_id,
            outputs=shares,
            stats=pb.JobStats(
                elapsed_s=elapsed,
                rounds=int(stats["rounds"] - stats0["rounds"]),
                bytes=int(stats["bytes"] - stats0["bytes"]),
                dealer_bytes=self.session.correction_bytes - dealer_bytes0,
                tuples=self.session.consumed - consumed0,
                report_json="" if self.ctx.report is None else json.dumps(self.ctx.report),
            ),
        )
        log.info(
            "step=job id=%s done in %.3f s: %d rounds, %d bytes to/from the other party, %d tuples, %d dealer bytes",
            pending.job_id,
            elapsed,
            result.stats.rounds,
            result.stats.bytes,
            result.stats.tuples,
            result.stats.dealer_bytes,
        )
        return result

    # --- shut-down ---

    def close(self, error: str = "") -> None:
        self._stop_heartbeat.set()
        self.api.failure = self.api.failure or error or None
        if hasattr(self, "comm"):
            try:
                self.crypten.uninit()  # flushes our last messages and waits for the peer's close
            except Exception as e:  # noqa: BLE001 - best effort while going down
                log.warning("step=close communicator: %s", e)
        if self.dealer is not None and not self._dealer_lost:
            try:
                reply = self.dealer.close(error=error, timeout=min(self.args.timeout, 5.0))
                log.info(
                    "step=close dealer sent this party %d bytes (%d tuples)", reply.bytes_served, reply.tuples_served
                )
            except dealer.DealerUnavailable as e:
                log.warning("step=close %s", e)
        if hasattr(self, "server"):
            self.server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup_logging(f"party{args.rank}", args.session, args.log_level)
    creds = Credentials(f"party{args.rank}", args)
    party = Party(args, creds)
    try:
        party.start()
        party.serve()
    except BaseException as e:
        party.close(error=f"{type(e).__name__}: {e}" if not isinstance(e, Fatal) else str(e))
        raise
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
