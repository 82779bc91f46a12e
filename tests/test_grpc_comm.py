"""GrpcCommunicator: parity with CrypTen's gloo communicator, every collective, and every failure mode.

Multi-party tests run each party as its own OS process (tests/grpc_party.py via subprocess); the rejection
tests run two communicators in threads of this process and attack rank 0's server with a raw gRPC client.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from torch.distributed import ReduceOp

from mpcache.mpc.transport import wire
from mpcache.mpc.transport.grpc_comm import (
    GrpcCommunicator,
    JobAbortedError,
    JobCancelledError,
    LinkModel,
    PartyConfig,
    PeerAbortedError,
    PeerLostError,
    PeerTimeoutError,
    PortInUseError,
    ProtocolError,
)
from mpcache.mpc.transport.ports import free_ports
from mpcache.mpc.transport.proto import build
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

PARTY = Path(__file__).with_name("grpc_party.py")


def launch(scenario: str, world_size: int, tmp: Path, backend: str = "grpc", **extra) -> list[subprocess.Popen]:
    """Start one process per party; each writes tmp/<scenario>-<backend>-<rank>.json."""
    ports = free_ports(world_size + 1)
    args = {
        "world_size": world_size,
        "peers": [f"127.0.0.1:{p}" for p in ports[:world_size]],
        "rendezvous": f"tcp://127.0.0.1:{ports[-1]}",
        "session": f"{scenario}-{os.getpid()}",
        "backend": backend,
        "out": str(tmp / f"{scenario}-{backend}-{{rank}}.json"),
        **extra,
    }
    args_file = tmp / f"{scenario}-{backend}.args.json"
    args_file.write_text(json.dumps(args))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen([sys.executable, str(PARTY), scenario, str(rank), str(args_file)], env=env)
        for rank in range(world_size)
    ]


def collect(procs: list[subprocess.Popen], scenario: str, tmp: Path, backend: str = "grpc", timeout: float = 90):
    """Wait for every party (killing all on timeout) and return their JSON results by rank."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario} over {backend} did not finish in {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for rank in range(len(procs)):
        path = tmp / f"{scenario}-{backend}-{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result (exit code {procs[rank].returncode})"
        results.append(json.loads(path.read_text()))
    return results


def no_errors(results: list[dict]) -> list[dict]:
    for r in results:
        assert "error" not in r, f"rank {r['rank']} failed: {r['error']}\n{r.get('trace', '')}"
    return results


# ----------------------------------------------------------------------------------------- multi-process tests


def test_crypten_program_matches_gloo_bit_for_bit(tmp_path):
    """The same CrypTen program and seeds give identical shares, plaintexts, rounds and bytes over both."""
    gloo = launch("crypten_program", 2, tmp_path, backend="gloo")
    grpc_ = launch("crypten_program", 2, tmp_path, backend="grpc")
    over_gloo = no_errors(collect(gloo, "crypten_program", tmp_path, "gloo"))
    over_grpc = no_errors(collect(grpc_, "crypten_program", tmp_path, "grpc"))
    for rank in range(2):
        a, b = over_gloo[rank], over_grpc[rank]
        for step in ("add", "mul", "gt", "relu", "softmax", "matmul"):
            assert a[step]["share"] == b[step]["share"], f"rank {rank} {step}: shares differ"
            assert a[step]["plain"] == b[step]["plain"], f"rank {rank} {step}: plaintexts differ"
            assert (a[step]["rounds"], a[step]["bytes"]) == (b[step]["rounds"], b[step]["bytes"]), step
    # the shares really are secret-shared (not one party holding the value) and the arithmetic is right
    r0, r1 = over_grpc
    assert r0["mul"]["share"] != r1["mul"]["share"]
    assert r0["mul"]["rounds"] == 1 and r0["softmax"]["rounds"] > 50 and r0["add"]["rounds"] == 0
    for step in ("add", "mul", "matmul"):
        assert max(abs(p - e) for p, e in zip(r0[step]["plain"], r0["expected"][step])) < 1e-2, step
    assert max(abs(p - e) for p, e in zip(r0["softmax"]["plain"], r0["expected"]["softmax"])) < 2e-2


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_collective(tmp_path, world_size):
    results = no_errors(collect(launch("collectives", world_size, tmp_path), "collectives", tmp_path))
    xs = [torch.arange(6).reshape(2, 3) + 100 * r for r in range(world_size)]
    total = sum(xs)
    xor = xs[0]
    for x in xs[1:]:
        xor = xor ^ x
    neg_xor = -xs[0]
    for x in xs[1:]:
        neg_xor = neg_xor ^ -x
    plus1_xor = xs[0] + 1
    for x in xs[1:]:
        plus1_xor = plus1_xor ^ (x + 1)
    last = world_size - 1
    for rank, out in enumerate(results):
        assert out["identity"] == [rank, world_size, f"rank{rank}", "grpc"]
        assert out["all_reduce_sum"] == total.tolist()
        assert out["all_reduce_xor"] == xor.tolist()
        assert out["all_reduce_batched"] == [total.tolist(), (3 * total[0]).tolist()]
        assert out["all_reduce_batched_xor"] == [xor.tolist(), neg_xor.tolist()]
        assert out["reduce"] == (total.tolist() if rank == last else None)
        assert out["reduce_batched_xor"] == ([xor.tolist(), plus1_xor.tolist()] if rank == 0 else None)
        assert out["broadcast"] == xs[1].tolist() and out["broadcast_returned_same"]
        assert out["broadcast_batched"] == [xs[0].tolist(), xs[0][:, :1].tolist()]
        assert out["gather"] == ([x.tolist() for x in xs] if rank == 0 else [None])
        assert out["all_gather"] == [x.tolist() for x in xs]
        assert out["scatter"] == [10 * last + rank] * 2
        assert out["scatter_sized"] == [rank] * 2
        prev = (rank - 1) % world_size
        assert out["recv"] == xs[prev].tolist()
        assert out["irecv"] == xs[prev].flatten().tolist()
        assert out["recv_obj"] == [prev, [prev, 2], [float(prev), 1.5], "Size"]
        assert out["broadcast_obj"] == {"root": 1, "items": [1, 2.5, "s"]}
        stats = out["stats"]
        assert out["rounds"] == 20  # one per communicator call in the scenario (isend and irecv count separately)
        assert stats["wire_messages_sent"] > 0 and stats["wire_bytes_sent"] > 0
    # every byte one party sent, another received (totals since init, read after the final barrier)
    assert sum(o["stats"]["wire_bytes_sent"] for o in results) == sum(
        o["stats"]["wire_bytes_received"] for o in results
    )


@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_dead_or_stalled_peer_is_named_within_timeout(tmp_path, how):
    timeout_s = 20.0 if how == "killed" else 2.0
    ready = tmp_path / "ready"
    procs = launch("wait_for_peer_failure", 2, tmp_path, timeout_s=timeout_s, ready=str(ready))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and procs[1].poll() is None, "rank 1 never got ready"
            time.sleep(0.02)
        struck = time.time()
        os.kill(procs[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        procs[0].wait(timeout=30)
    finally:
        os.kill(procs[1].pid, signal.SIGKILL) if procs[1].poll() is None else None
        procs[1].wait()
    out = json.loads((tmp_path / "wait_for_peer_failure-grpc-0.json").read_text())
    assert "rank 1" in out["error"] and "127.0.0.1:" in out["error"]
    waited = out["failed_at"] - struck
    if how == "killed":  # noticed from the broken connection, long before the 20 s timeout
        assert out["error_type"] == "PeerLostError", out["error"]
        assert waited < 5, waited
    else:
        assert out["error_type"] == "PeerTimeoutError", out["error"]
        assert waited < timeout_s + 3, waited


def test_strided_tensors_and_crypten_safe_classes_cross_like_gloo(tmp_path):
    """Issue #13, item 9: broadcasting and expanded tensors serialise; modules CrypTen accepts cross; both parties
    get what gloo would give."""
    results = no_errors(collect(launch("odd_shapes", 2, tmp_path), "odd_shapes", tmp_path))
    for out in results:
        assert out["broadcast_add"] == [3.0]
        assert out["all_reduce_expanded"] == [10] and out["all_reduce_expanded_2d"] == [[0] * 4, [2] * 4, [4] * 4]
        assert out["linear"] == ["Linear", "Parameter", [2, 2]] and out["custom"] == ["Custom", [2, 3]]
        assert out["load_from_party"] == [0.0, 1.0, 2.0, 3.0]


def test_close_ends_at_once_when_the_peer_disappears_while_closing():
    """Issue #13, item 9: rank 0 closes (it waits for rank 1's close, up to timeout_s = 20 s); rank 1 vanishes."""
    comms = make_parties(2, timeout_s=20.0)
    closer = threading.Thread(target=comms[0].close)
    t0 = time.monotonic()
    closer.start()
    time.sleep(0.3)
    comms[1]._stop(grace=0)  # gone without its close
    closer.join(25)
    assert not closer.is_alive() and time.monotonic() - t0 < 5.0


def test_wrong_dtype_is_refused_by_both_parties(tmp_path):
    results = collect(launch("wrong_dtype", 2, tmp_path, timeout_s=10.0), "wrong_dtype", tmp_path)
    for out in results:
        assert out["error_type"] in ("ProtocolError", "PeerAbortedError"), out
        assert "int32" in out["error"] and "int64" in out["error"], out["error"]


def test_malicious_pickle_from_a_peer_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    results = collect(launch("malicious_object", 2, tmp_path, marker=str(marker)), "malicious_object", tmp_path)
    assert results[0]["error_type"] == "ProtocolError"
    assert "refusing to unpickle" in results[0]["error"] and "system" in results[0]["error"]
    assert not marker.exists()


# -------------------------------------------------------------------- in-process tests (two parties in threads)


def make_parties(world_size: int = 2, sessions: list[str] | None = None, **kwargs) -> list[GrpcCommunicator]:
    peers = tuple(f"127.0.0.1:{p}" for p in free_ports(world_size))
    sessions = sessions or ["s"] * world_size
    comms: list = [None] * world_size
    errors: list = [None] * world_size

    def build_party(rank: int) -> None:
        try:
            comms[rank] = GrpcCommunicator(PartyConfig(rank, world_size, peers, sessions[rank], **kwargs))
        except Exception as e:
            errors[rank] = e

    threads = [threading.Thread(target=build_party, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(errors):
        for c in comms:
            if c is not None:
                c._stop(grace=0)
        raise next(e for e in errors if e is not None)
    return comms


def run_all(comms, fn):
    """Run fn(comm) in one thread per party; return the results (or the exceptions) by rank."""
    out: list = [None] * len(comms)

    def target(rank):
        try:
            out[rank] = fn(comms[rank])
        except Exception as e:
            out[rank] = e

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.fixture
def pair():
    comms = make_parties(2, timeout_s=5.0)
    yield comms
    run_all(comms, lambda c: c.close())


def raw_stream(address: str, messages: list[pb.PeerMessage]) -> grpc.RpcError:
    """Play an attacker: push raw messages at a party's server and return the error it answers with."""
    with grpc.insecure_channel(address) as channel:
        try:
            for _ in pb_grpc.PeerStub(channel).Exchange(iter(messages), timeout=10):
                pass
        except grpc.RpcError as e:
            return e
    raise AssertionError("the server accepted the messages")


def tensor_msg(session: str, src: int, seq: int, payload: bytes | None = None) -> pb.PeerMessage:
    t = wire.tensor_to_proto(torch.ones(3, dtype=torch.long))
    if payload is not None:
        t.payload = payload
    return pb.PeerMessage(session=session, src=src, seq=seq, op=pb.OP_ALL_REDUCE, reduce_op=pb.SUM, tensors=[t])


def test_wrong_session_message_is_rejected_and_harmless(pair):
    error = raw_stream(pair[0].config.peers[0], [tensor_msg("intruder", 1, 0)])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'intruder'" in error.details() and "'s'" in error.details()
    x = torch.tensor([1, 2, 3])
    assert [t.tolist() for t in run_all(pair, lambda c: c.all_reduce(x))] == [[2, 4, 6]] * 2


def test_a_second_stream_claiming_a_connected_rank_is_refused_and_harmless(pair):
    """A stray process with rank 1's identity (or an attacker, without TLS) cannot take the session over."""
    opening = pb.PeerMessage(session="s", src=1, seq=0, op=pb.OP_OPEN)
    error = raw_stream(pair[0].config.peers[0], [opening, tensor_msg("s", 1, 1)])
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "already connected to rank 1" in error.details()
    error = raw_stream(pair[0].config.peers[0], [tensor_msg("s", 1, 5)])  # no OP_OPEN either: refused first
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "did not start with OP_OPEN" in error.details()
    x = torch.tensor([1, 2, 3])
    assert [t.tolist() for t in run_all(pair, lambda c: c.all_reduce(x))] == [[2, 4, 6]] * 2


def _inject(comm: GrpcCommunicator, dst: int, msg: pb.PeerMessage, skip: int = 0) -> None:
    """Put a raw message on comm's real stream to dst (`skip` seq numbers left out): a broken peer."""
    link = comm._links[dst]
    link.seq += skip
    link.put(msg, comm.config.max_message_bytes)


def test_out_of_order_message_is_rejected_and_fails_the_session(pair):
    _inject(pair[1], 0, tensor_msg("s", 1, 0), skip=4)
    deadline = time.monotonic() + 10  # rank 0 refuses the stream; rank 1 hears it (rejection or OP_ABORT) at once
    while (pair[0].failure is None or pair[1].failure is None) and time.monotonic() < deadline:
        time.sleep(0.01)
    results = run_all(pair, lambda c: c.all_reduce(torch.ones(2, dtype=torch.long)))
    assert isinstance(results[0], ProtocolError) and "out of order, expected seq 1" in str(results[0])
    assert isinstance(results[1], ProtocolError | PeerAbortedError), results[1]
    assert "out of order" in str(results[1])


def test_malformed_tensor_is_rejected(pair):
    _inject(pair[1], 0, tensor_msg("s", 1, 0, payload=b"\x00" * 5))
    results = run_all(pair, lambda c: c.all_reduce(torch.ones(2, dtype=torch.long)))
    assert isinstance(results[0], ProtocolError), results[0]
    assert "payload is 5 bytes" in str(results[0]) and "needs 24" in str(results[0])


def test_unparseable_bytes_are_rejected_and_harmless(pair):
    with grpc.insecure_channel(pair[0].config.peers[0]) as channel:
        exchange = channel.stream_stream(
            "/mpcache.v1.Peer/Exchange", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as caught:
            for _ in exchange(iter([b"\xff\xff\xff not a protobuf"]), timeout=10):
                pass
    assert caught.value.code() == grpc.StatusCode.INTERNAL and "deserializing" in caught.value.details()
    x = torch.tensor([1, 2, 3])
    assert [t.tolist() for t in run_all(pair, lambda c: c.all_reduce(x))] == [[2, 4, 6]] * 2


def test_a_job_that_ends_half_way_leaves_the_session_in_step(pair):
    """Issue #13: rank 1 gives job 1 up after sending more than rank 0 read; rank 0's pending call ends at once;
    job 2 starts from the larger tuple position and reads none of job 1's leftovers."""
    x = torch.tensor([1, 2, 3])

    def job1(comm):
        comm.begin_job(1, position=(10 * (comm.rank + 1), 3 - comm.rank), digest=b"d1")
        if comm.rank == 1:
            comm.send(x, 0)
            comm.send(x, 0)  # rank 0 never reads this one
            comm.abort_job("rank 1 failed")
            return "aborted"
        comm.recv(torch.zeros(3, dtype=torch.long), 1)
        comm.recv(torch.zeros(2, dtype=torch.long), 1)  # the wrong size: divergence ends the job, not the session
        return "unreachable"

    results = run_all(pair, job1)
    assert results[1] == "aborted"
    assert isinstance(results[0], ProtocolError | JobAbortedError), results[0]
    assert pair[0].failure is None and pair[1].failure is None

    def job2(comm):
        position = comm.begin_job(2, position=(10 * (comm.rank + 1) + 5, 7 * comm.rank), digest=b"d2")
        return position, comm.all_reduce(x).tolist()

    assert run_all(pair, job2) == [((25, 7), [2, 4, 6])] * 2
    assert run_all(pair, lambda c: c.end_job()) == [None, None]


def test_job_timeouts_cancels_and_interrupts_end_the_job_only():
    comms = make_parties(2, timeout_s=1.0)
    try:

        def begin(n):
            return run_all(comms, lambda c: c.begin_job(n, (0,), b"d"))

        begin(1)  # rank 1 stays silent: rank 0 times out, the session survives
        with pytest.raises(PeerTimeoutError):
            comms[0].recv(torch.zeros(1, dtype=torch.long), 1)
        comms[0].abort_job("rank 0 timed out")
        assert comms[0].failure is None
        begin(2)  # a cancelled client: every party stops at the checkpoint
        results = run_all(comms, lambda c: c.checkpoint("the client left" if c.rank == 1 else ""))
        assert all(isinstance(r, JobCancelledError) and "the client left" in str(r) for r in results), results
        begin(3)  # SIGTERM from another thread: the pending call ends at once, with the reason
        threading.Timer(0.2, comms[1].interrupt, args=("party 1 is shutting down",)).start()
        with pytest.raises(JobAbortedError, match="shutting down"):
            comms[1].recv(torch.zeros(1, dtype=torch.long), 0)
        comms[1].abort_job("party 1 is shutting down")
        with pytest.raises(JobAbortedError, match="gave job 3 up: party 1 is shutting down"):
            comms[0].recv(torch.zeros(1, dtype=torch.long), 1)
        begin(4)
        assert [t.tolist() for t in run_all(comms, lambda c: c.all_reduce(torch.ones(2, dtype=torch.long)))] == [
            [2, 2]
        ] * 2
        run_all(comms, lambda c: c.end_job())
        assert comms[0].ping(timeout=5) == "" and comms[0].peer_status() == {1: ""}
    finally:
        run_all(comms, lambda c: c.close())


def test_recv_from_any_source(pair):
    pair[1].send(torch.tensor([7, 8]), 0)
    assert pair[0].recv(torch.zeros(2, dtype=torch.long)).tolist() == [7, 8]


def test_oversized_messages_are_refused_on_both_ends():
    comms = make_parties(2, timeout_s=5.0, max_message_bytes=64 * 1024)
    try:
        with pytest.raises(ValueError, match="exceeds max_message_bytes=65536"):
            comms[0].send(torch.zeros(10_000, dtype=torch.long), 1)  # 80 kB
        big = tensor_msg("s", 1, 0, payload=b"\x00" * 80_000)
        big.tensors[0].shape[:] = [10_000]
        error = raw_stream(comms[0].config.peers[0], [big])  # a sender that skips the check
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        x = torch.arange(1000)  # 8 kB still fine
        assert all(torch.equal(t, 2 * x) for t in run_all(comms, lambda c: c.all_reduce(x)))
    finally:
        run_all(comms, lambda c: c.close())


def test_handshake_rejects_a_party_from_another_session():
    peers = tuple(f"127.0.0.1:{p}" for p in free_ports(2))
    errors = run_all([0, 1], lambda r: GrpcCommunicator(PartyConfig(r, 2, peers, "ab"[r], connect_timeout_s=10.0)))
    refusals = [e for e in errors if isinstance(e, ProtocolError)]
    assert refusals and "session 'a'" in str(refusals[0]) and "session 'b'" in str(refusals[0]), errors
    # the other party either got the same refusal or saw its peer stop mid-handshake; neither may hang or pass
    assert all(isinstance(e, ProtocolError | PeerLostError) for e in errors), errors


def test_port_in_use_is_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        config = PartyConfig(0, 2, (f"127.0.0.1:{port}", "127.0.0.1:1"), "s", connect_timeout_s=1.0)
        with pytest.raises(PortInUseError, match=f"port {port} is already in use"):
            GrpcCommunicator(config)


def test_link_emulation_adds_the_modelled_delay():
    rtt_ms, mbps, n = 60.0, 80.0, 50_000  # 400 kB per message -> 40 ms transmit + 30 ms one way
    comms = make_parties(2, timeout_s=10.0, link=LinkModel(rtt_ms=rtt_ms, bandwidth_mbps=mbps))
    try:
        x = torch.zeros(n, dtype=torch.long)
        run_all(comms, lambda c: c.all_reduce(x))  # warm up
        t0 = time.monotonic()
        run_all(comms, lambda c: [c.all_reduce(x) for _ in range(3)])
        per_round = (time.monotonic() - t0) / 3
        wire_bytes = comms[0].get_communication_stats()["wire_bytes_sent"] / 4  # 4 identical messages so far
        model = rtt_ms / 2000 + wire_bytes * 8 / (mbps * 1e6)
        assert model - 0.002 <= per_round < model + 0.25, (per_round, model)
    finally:
        run_all(comms, lambda c: c.close())


def test_health_reports_the_party(pair):
    with grpc.insecure_channel(pair[1].config.peers[1]) as channel:
        reply = pb_grpc.HealthStub(channel).Check(pb.HealthRequest(), timeout=5)
    assert (reply.status, reply.role, reply.rank, reply.reason) == (pb.HealthResponse.SERVING, "party", 1, "")
    assert "session" not in pb.HealthResponse.DESCRIPTOR.fields_by_name  # a health check says nothing else


def test_bad_arguments_raise_clear_errors(pair):
    with pytest.raises(ValueError, match="rank must be in"):
        PartyConfig(2, 2, ("a:1", "b:2"), "s")
    with pytest.raises(ValueError, match="host:port"):
        PartyConfig(0, 2, ("a:1", "nonsense"), "s")
    with pytest.raises(ValueError, match="peers has 1 addresses"):
        PartyConfig(0, 2, ("a:1",), "s")
    with pytest.raises(ValueError, match="session"):
        PartyConfig(0, 2, ("a:1", "b:2"), "")
    with pytest.raises(ValueError, match="timeout_s"):
        PartyConfig(0, 2, ("a:1", "b:2"), "s", timeout_s=0)
    with pytest.raises(TypeError, match="rank must be an int"):
        PartyConfig("0", 2, ("a:1", "b:2"), "s")
    with pytest.raises(ValueError, match="bandwidth_mbps"):
        LinkModel(bandwidth_mbps=0)
    with pytest.raises(ValueError, match="dst must be another party's rank"):
        pair[0].send(torch.ones(1), 0)
    with pytest.raises(ValueError, match="unsupported reduce op"):
        pair[0].all_reduce(torch.ones(1), op="sum")
    with pytest.raises(TypeError, match="batched all_reduce expects a list"):
        pair[0].all_reduce(torch.ones(1), batched=True)
    with pytest.raises(ValueError, match="process groups"):
        pair[0].send_obj(1, 1, group="ttp")
    with pytest.raises(TypeError, match="cannot go on the wire"):
        pair[0].send(torch.ones(1, dtype=torch.complex64), 1)


# ----------------------------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("dtype", sorted(wire.DTYPES, key=str))
def test_tensor_round_trip_every_dtype(dtype):
    t = (torch.arange(-5, 7) % 2 == 0) if dtype == torch.bool else torch.arange(-5, 7).to(dtype)
    t = t.reshape(3, 4)[:, 1:]  # non-contiguous on purpose
    back = wire.tensor_from_proto(pb.Tensor.FromString(wire.tensor_to_proto(t).SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    scalar = wire.tensor_from_proto(wire.tensor_to_proto(t[0, 0]))
    assert scalar.shape == () and scalar == t[0, 0]
    assert wire.tensor_from_proto(wire.tensor_to_proto(torch.empty(0, 4, dtype=dtype))).shape == (0, 4)


def test_any_strided_tensor_serialises():
    base = torch.arange(24, dtype=torch.long)
    cases = [
        torch.tensor(5).expand(1),  # stride 0 on a size-1 dimension ("contiguous", yet not viewable as bytes)
        torch.tensor([7]).expand(3, 1).t(),
        base[:1].as_strided((1, 1), (5, 3)),  # odd strides on size-1 dimensions
        base.reshape(4, 6)[:, ::2],  # non-contiguous
        base.reshape(2, 3, 4).permute(2, 0, 1),
        torch.zeros(2, 1, dtype=torch.bool).expand(2, 5),
        base.to(torch.bfloat16).reshape(6, 4)[1:2, :1].expand(3, 2),
    ]
    for t in cases:
        back = wire.tensor_from_proto(pb.Tensor.FromString(wire.tensor_to_proto(t).SerializeToString()))
        assert back.shape == t.shape and back.dtype == t.dtype and torch.equal(back, t), t


def test_tensor_int64_extremes_survive():
    t = torch.tensor([-(2**63), 2**63 - 1, 0, -1])
    assert torch.equal(wire.tensor_from_proto(wire.tensor_to_proto(t)), t)


def test_malformed_tensors_are_refused():
    good = wire.tensor_to_proto(torch.ones(2, 2))
    cases = {
        "DTYPE_UNSPECIFIED": pb.Tensor(shape=[1], payload=b"\x00" * 8),
        "negative dimension": pb.Tensor(dtype=pb.INT64, shape=[-1], payload=b""),
        "is 12 bytes but shape \\[2, 2\\] of FLOAT32 needs 16": pb.Tensor(
            dtype=good.dtype, shape=[2, 2], payload=good.payload[:12]
        ),
        "other than 0 and 1": pb.Tensor(dtype=pb.BOOL, shape=[2], payload=b"\x01\x02"),
        "unknown dtype code 99": pb.Tensor(dtype=99, shape=[1], payload=b"\x00"),
    }
    for needle, msg in cases.items():
        with pytest.raises(wire.WireFormatError, match=needle):
            wire.tensor_from_proto(msg)


def test_restricted_pickle_allows_plain_data():
    obj = {
        "n": [1, -2.5, 1 + 2j, True, None, "s", b"b", bytearray(b"x")],
        "set": {1, 2},
        "frozen": frozenset({3}),
        "size": torch.Size([2, 3]),
        "t": torch.arange(6).reshape(2, 3),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "dtype": torch.int64,
        "device": torch.device("cpu"),
        "slice": slice(1, 5, 2),
    }
    back = wire.loads(wire.dumps(obj))
    assert back.keys() == obj.keys() and type(back["size"]) is torch.Size
    for key in obj:
        if isinstance(obj[key], torch.Tensor):
            assert torch.equal(back[key], obj[key]) and back[key].dtype == obj[key].dtype
        else:
            assert back[key] == obj[key]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


class _Plain:
    pass


@pytest.mark.parametrize(
    "payload, needle",
    [
        (pickle.dumps(_Evil()), "system"),
        (pickle.dumps(_Plain()), "_Plain"),
        (pickle.dumps(torch.zeros(2)), "torch._utils._rebuild_tensor_v2"),  # torch's own reducer
        (pickle.dumps(getattr), "builtins.getattr"),
        (pickle.dumps(torch.float32), "torch.float32"),  # plain pickle names torch globals; dumps() does not
    ],
)
def test_restricted_pickle_refuses_code(payload, needle):
    with pytest.raises(wire.UnsafePickleError, match=needle):
        wire.loads(payload)


def test_restricted_pickle_honours_cryptens_safe_classes_only():
    crypten = pytest.importorskip("crypten")
    lin = wire.loads(wire.dumps(torch.nn.Linear(3, 2)))  # on CrypTen's own allow-list
    assert isinstance(lin, torch.nn.Linear) and isinstance(lin.weight, torch.nn.Parameter)

    class Unregistered(torch.nn.Module):
        pass

    globals()["Unregistered"] = Unregistered  # picklable by reference, still not safe
    Unregistered.__qualname__ = "Unregistered"
    with pytest.raises(wire.UnsafePickleError, match="Unregistered"):
        wire.loads(wire.dumps(Unregistered()))
    crypten.common.serial.register_safe_class(Unregistered)
    assert type(wire.loads(wire.dumps(Unregistered()))) is Unregistered
    hooked = torch.nn.Linear(1, 1)
    hooked._forward_hooks[0] = torch.nn.Linear  # a class as a "hook": refused like CrypTen refuses hooks
    with pytest.raises(wire.UnsafePickleError, match="hooks"):
        wire.loads(wire.dumps(hooked))
    with pytest.raises(wire.UnsafePickleError, match="LongStorage"):  # CrypTen lists storages; never here
        wire.loads(pickle.dumps(torch.LongStorage))


def test_restricted_pickle_refuses_garbage():
    with pytest.raises(wire.WireFormatError, match="malformed pickle"):
        wire.loads(b"\x80\x05garbage")

    class StrayRecords(pickle.Pickler):
        def persistent_id(self, obj):
            return ("exec", "print('hi')") if obj == "x" else None

    buf = io.BytesIO()
    StrayRecords(buf).dump(["x"])
    with pytest.raises(wire.UnsafePickleError, match="unknown persistent record"):
        wire.loads(buf.getvalue())


# ---------------------------------------------------------------------------------------------------- stubs


def test_regenerating_the_stubs_changes_nothing():
    pytest.importorskip("grpc_tools")
    assert build.stale_files() == [], "run `python -m mpcache.mpc.transport.proto.build` and commit the result"


def test_reduce_op_table_covers_torch():
    from mpcache.mpc.transport import grpc_comm

    assert set(grpc_comm._REDUCE_CODES) >= {ReduceOp.SUM, ReduceOp.BXOR}
    parts = [torch.tensor([2**62, 5]), torch.tensor([2**62, 3])]
    assert GrpcCommunicator._combine(parts, pb.SUM).tolist() == [-(2**63), 8]  # wraps like the ring
    assert GrpcCommunicator._combine(parts, pb.BXOR).tolist() == [0, 6]
