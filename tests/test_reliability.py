"""Issue #13: one bad request, a request that reaches one party, a stray process or a lost link must not take a
deployment down. One test per numbered observation of the issue (item N in the test name), each against real
processes on loopback with mutual TLS, each ending with a good job that must still run, every wait bounded.

Most tests share one deployment (`live`: dealer, party 0 with a tiny decoder checkpoint, party 1; the parties run
bench.faults, i.e. mpcache-party plus the fault-injection job "fault"); tests that stop or kill a role start their
own. Item 9 (the wire format) is tested in tests/test_grpc_comm.py; the soak test is bench/soak.py (slow here).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest
import torch
from test_private_decoder import tiny_checkpoint
from test_roles import _ready
from test_roles import _wait_for as wait_for

from mpcache.mpc.dealer import service as dealer
from mpcache.mpc.deploy.launcher import Deployment
from mpcache.mpc.transport.ports import free_ports
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc
from parties import client as client_cli
from parties.client import Client, share
from parties.common import Credentials, Fatal

FAULTY = (sys.executable, "-m", "bench.faults")
LIVE = dict(timeout=10.0, party_timeout=30.0, heartbeat=0.5, agree_timeout=2.0, session="rel")
X = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)


def ready(dep: Deployment) -> None:
    _ready(dep, timeout=180)


def creds(dep: Deployment, role: str) -> Credentials:
    return Credentials(role, argparse.Namespace(insecure=False, certs=str(dep.certs_dir(role)), tls_ca=None,
                                                tls_cert=None, tls_key=None))  # fmt: skip


def connect(dep: Deployment) -> Client:
    return Client([dep.address("api0"), dep.address("api1")], creds(dep, "client"), connect_timeout=120)


def good_job(c: Client, x: torch.Tensor = X) -> None:
    """The next good job: correct, and answered without waiting on anything left over."""
    y, results = c.run("poly", x, {"coeffs": [1.0, -2.0, 0.5]}, timeout=120)
    assert torch.allclose(y, 1 - 2 * x + 0.5 * x * x, atol=1e-3), y
    assert results[0].stats.tuples == results[1].stats.tuples == 4


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert lines and "Traceback" not in text, text
    return lines[-1]


def request(job_id: str, rank: int, x: torch.Tensor = X, kind: str = "poly", params: str = '{"coeffs": [1, 1]}'):
    s = share(x)[rank]
    from mpcache.mpc.transport import wire

    return pb.JobRequest(job_id=job_id, party=rank, kind=kind, params_json=params,
                         inputs=[pb.FixedPointShare(precision_bits=16, share=wire.tensor_to_proto(s))])  # fmt: skip


def stray(dep: Deployment, role: str, *extra: str) -> subprocess.CompletedProcess:
    """A second process for `role` of `dep` on ports of its own (plus `extra` flags); returns when it exits."""
    listen, api = (f"127.0.0.1:{p}" for p in free_ports(2))
    argv = dep.command(role, "--listen", listen, "--api-listen", api, "--connect-timeout", "20", *extra)
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    tiny_checkpoint(tmp / "model", "llama")
    dep = Deployment(tmp / "run", model=tmp / "model", party_command=FAULTY, **LIVE)
    try:
        for role in ("dealer", "party0", "party1"):
            dep.start(role)
        ready(dep)
        yield dep
    finally:
        dep.stop_all()


@pytest.fixture(scope="module")
def client(live):
    return connect(live)


# ------------------------------------------------------------------------------------------------- item 1


@pytest.mark.timeout(300)
def test_item1_a_failing_job_ends_alone_with_its_error_and_the_next_job_runs(live, client):
    """Bad parameters are refused by both parties before any MPC; a job that fails half-way (an exception or
    diverged calls, at either party) fails at both with the cause and the party named; the session goes on."""
    refusals = [
        ("poly", {"coeffs": [1e308, 1]}, r"coeffs\[0\] = 1e\+308 is beyond the fixed-point range"),
        ("poly", {"coeffs": [1, 2], "degree": 3}, r"unknown poly parameters \['degree'\]"),
    ]
    for kind, params, message in refusals:
        with pytest.raises(Fatal, match=f"party 0 .*INVALID_ARGUMENT: .*{message}"):
            client.run(kind, X, params, timeout=60)
        good_job(client)
    knobs = {"method": "mpcache", "budget": 8, "knobs": {"cluster_size": 32.0, "subcluster_size": 16.0}}
    with pytest.raises(Fatal, match="INVALID_ARGUMENT: .*knob cluster_size must be int, got 32.0"):
        client.generate([1, 2, 3], 40, 2, timeout=60, kv_cache=knobs)
    deep = "[" * 200_000 + "]" * 200_000  # a RecursionError in every role before
    for rank in (0, 1):
        with pytest.raises(grpc.RpcError) as caught:
            client.stubs[rank].Run(request(uuid.uuid4().hex, rank, params=deep), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 65536" in caught.value.details()
        deep_small = "[" * 1000 + "]" * 1000
        with pytest.raises(grpc.RpcError) as caught:
            client.stubs[rank].Run(request(uuid.uuid4().hex, rank, params=deep_small), timeout=60)
        assert "nested more than 16 levels" in caught.value.details()
    good_job(client)
    for rank, how, cause in ((1, "raise", "injected fault at party 1"), (0, "raise", "injected fault at party 0"),
                             (1, "diverge", "diverged|sent 1 tensors|moved on|rank 1")):  # fmt: skip
        job_id = uuid.uuid4().hex
        with pytest.raises(Fatal, match="ABORTED: job .* failed: .*"):
            client.run_all("fault", X, {"rank": rank, "after": 2, "how": how}, timeout=120, job_id=job_id)
        wait_for(lambda j=job_id: pb.RUNNING not in [s.state for s in client.status(j)], 30, "both to end it")
        statuses = client.status(job_id)
        assert [s.state for s in statuses] == [pb.FAILED, pb.FAILED], statuses  # both parties ended it
        assert any(re.search(cause, s.error) for s in statuses), statuses
        good_job(client)
    assert "Traceback" not in live.log("party0") + live.log("party1") + live.log("dealer")


# ------------------------------------------------------------------------------------------------- item 2


@pytest.mark.timeout(300)
def test_item2_a_request_that_reaches_one_party_only_is_dropped_and_the_session_goes_on(live, client):
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        client.stubs[0].Run(request("only-at-0", 0), timeout=60)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert "party 1 did not receive job only-at-0 within 2 s" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        client.stubs[1].Run(request("only-at-1", 1), timeout=60)
    assert caught.value.code() == grpc.StatusCode.ABORTED and "party 0 never received job only-at-1" in (
        caught.value.details()
    )
    for rank in (0, 1):  # a shutdown that reaches one party shuts nothing down
        with pytest.raises(grpc.RpcError) as caught:
            client.stubs[rank].Shutdown(pb.ShutdownRequest(reason="half", request_id=f"half-{rank}"), timeout=60)
        assert caught.value.code() == grpc.StatusCode.ABORTED
    assert time.monotonic() - t0 < 60  # each waited about the agreement timeout, not a session timeout
    with pytest.raises(grpc.RpcError) as caught:  # a late copy of a dropped job is not run on its own
        client.stubs[1].Run(request("only-at-0", 1), timeout=60)
    assert caught.value.code() == grpc.StatusCode.ABORTED and "did not receive" in caught.value.details()
    good_job(client)


# ------------------------------------------------------------------------------------------------- item 3


@pytest.mark.timeout(300)
def test_item3_stray_sessions_leave_the_dealer_and_the_live_session_alone(live, client):
    party0 = creds(live, "party0").channel()
    ghost = dealer.DealerClient(live.address("dealer"), "ghost", 0, party0, timeout=20)
    with pytest.raises(dealer.DealerUnavailable, match="does not serve session 'ghost'.*same --session"):
        ghost.register()
    typo = stray(live, "party1", "--session", "rle")  # party 1 started with a typo in --session
    assert typo.returncode == 1
    line = one_line(typo.stderr)
    assert line.startswith("party1: error: dealer at") and "does not serve session 'rle'" in line, line
    assert live.procs["dealer"].poll() is None
    good_job(client)


# ------------------------------------------------------------------------------------------------- item 4


@pytest.mark.timeout(300)
def test_item4_a_second_process_with_a_live_rank_is_refused_and_gets_no_seed(live, client):
    second = stray(live, "party0")  # a second party 0 on other ports, same session
    assert second.returncode == 1
    line = one_line(second.stderr)
    assert "ALREADY_EXISTS: party 0 already registered in session 'rel'" in line, line
    again = dealer.DealerClient(live.address("dealer"), "rel", 0, creds(live, "party0").channel(), timeout=20)
    with pytest.raises(dealer.DealerUnavailable, match="already registered.*handed out once"):
        again.register()  # whoever holds party 0's certificate: the seed is not sent twice
    good_job(client)


# ------------------------------------------------------------------------------------------------- item 5


def _job_id_in(dep: Deployment, kind: str) -> str:
    lines = [ln for ln in dep.log("party0").splitlines() if "step=job id=" in ln and f"kind={kind}" in ln]
    return lines[-1].split("id=")[1].split()[0] if lines else ""


@pytest.mark.timeout(300)
def test_item5_a_vanished_or_cancelling_client_stops_its_job_at_both_parties(live, client, tmp_path):
    big = tmp_path / "x.json"
    big.write_text(json.dumps(torch.rand(1 << 20).tolist()))
    before = _job_id_in(live, "poly")
    argv = [sys.executable, "-m", "parties.client", "--session", "rel", "--certs", str(live.certs_dir("client")),
            "--parties", f"{live.address('api0')},{live.address('api1')}", "--job", "poly",
            "--input-file", str(big), "--params", json.dumps({"coeffs": [0.5] * 16})]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _job_id_in(live, "poly") not in ("", before), 120, "the client's job to start")
        job_id = _job_id_in(live, "poly")
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    t0 = time.monotonic()
    wait_for(lambda: all(s.state == pb.CANCELLED for s in client.status(job_id)), 60, "both parties to cancel")
    good_job(client)
    assert time.monotonic() - t0 < 60  # the next job did not wait for the 16-step job of a dead client
    # Cancel: a running job stops at its next checkpoint, at both parties
    outcome: dict = {}

    def run_long() -> None:
        try:
            client.run_all("poly", torch.rand(1 << 20, dtype=torch.float64), {"coeffs": [0.5] * 16}, 300,
                           job_id="cancel-me")  # fmt: skip
        except Fatal as e:
            outcome["error"] = str(e)

    runner = threading.Thread(target=run_long)
    runner.start()
    wait_for(lambda: _job_id_in(live, "poly") == "cancel-me", 120, "the job to run")
    assert [r.cancelled for r in client.cancel("cancel-me")] == [True, True]
    runner.join(120)
    assert "CANCELLED" in outcome.get("error", ""), outcome
    wait_for(lambda: [s.state for s in client.status("cancel-me")] == [pb.CANCELLED] * 2, 30, "both to cancel it")
    good_job(client)


@pytest.mark.timeout(400)
def test_item5_heartbeats_stalls_and_sigterm(tmp_path):
    """An idle link to a stopped party 1 turns party 0's health NOT_SERVING with the reason, and SERVING again when
    it answers; a stall mid-job shorter than --party-timeout fails that job only; SIGTERM mid-job ends the job and
    the session cleanly: every role exits 0 within seconds, party 1 having said why."""
    dep = Deployment(tmp_path, timeout=3.0, party_timeout=60.0, heartbeat=0.5, agree_timeout=2.0)
    big = torch.rand(1 << 18, dtype=torch.float64)
    try:
        for role in ("dealer", "party0", "party1"):
            dep.start(role)
        ready(dep)
        c = connect(dep)
        health = pb_grpc.HealthStub(creds(dep, "client").channel_to(dep.address("api0"), "party0"))
        dep.signal("party1", signal.SIGSTOP)
        wait_for(lambda: health.Check(pb.HealthRequest(), timeout=5).status == pb.HealthResponse.NOT_SERVING, 30,
                 "party 0 to notice")  # fmt: skip
        reply = health.Check(pb.HealthRequest(), timeout=5)
        assert "party 1: rank 1 at 127.0.0.1" in reply.reason and "did not answer" in reply.reason, reply.reason
        dep.signal("party1", signal.SIGCONT)
        wait_for(lambda: health.Check(pb.HealthRequest(), timeout=5).status == pb.HealthResponse.SERVING, 30,
                 "party 0 to serve again")  # fmt: skip
        good_job(c)
        # a stall mid-job, shorter than the dealer's party timeout: the job fails, the session goes on
        outcome: dict = {}

        def run_long() -> None:
            try:
                c.run("poly", big, {"coeffs": [0.5] * 16}, timeout=300)
            except Fatal as e:
                outcome["error"] = str(e)

        runner = threading.Thread(target=run_long)
        jobs_before = dep.log("party1").count("kind=poly")
        runner.start()
        wait_for(lambda: dep.log("party1").count("kind=poly") > jobs_before, 60, "a long job to start")
        dep.signal("party1", signal.SIGSTOP)
        time.sleep(5.0)  # > --timeout (3 s), < --party-timeout (60 s)
        dep.signal("party1", signal.SIGCONT)
        runner.join(120)
        assert "ABORTED" in outcome.get("error", "") and "rank 1" in outcome["error"], outcome
        good_job(c)
        # SIGTERM mid-job
        runner = threading.Thread(target=run_long)
        outcome.clear()
        runner.start()
        jobs_before = dep.log("party1").count("kind=poly")
        wait_for(lambda: dep.log("party1").count("kind=poly") > jobs_before, 60, "a long job to start")
        t0 = time.monotonic()
        dep.signal("party1", signal.SIGTERM)
        codes = {role: dep.wait(role, 30) for role in ("party1", "party0", "dealer")}
        elapsed = time.monotonic() - t0
        runner.join(60)
    finally:
        dep.stop_all()
    assert codes == {"party1": 0, "party0": 0, "dealer": 0}, codes
    assert elapsed < 15, elapsed  # each within a few seconds (plus slack for a loaded machine)
    assert "shutting down (SIGTERM)" in outcome.get("error", ""), outcome
    assert "step=terminate SIGTERM" in dep.log("party1") and "step=exit clean" in dep.log("party1")
    assert "party 1 ended the session" in dep.log("party0") and "closed cleanly" in dep.log("dealer")


# ------------------------------------------------------------------------------------------------- item 6


@pytest.mark.timeout(300)
def test_item6_concurrent_clients_are_queued_in_one_order_and_ids_are_never_reused(live, client):
    clients = [connect(live) for _ in range(5)]
    errors, done = [], []

    def submit(i: int, c: Client) -> None:
        x = torch.arange(4, dtype=torch.float64) + i
        try:
            y, _ = c.run("poly", x, {"coeffs": [float(i), 1.0, 1.0]}, timeout=180)
            assert torch.allclose(y, i + x + x * x, atol=1e-3)
            done.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=submit, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    assert not errors and sorted(done) == list(range(5)), errors
    client.run_all("poly", X, {"coeffs": [1, 1]}, timeout=60, job_id="once")
    with pytest.raises(Fatal, match="ALREADY_EXISTS: job id 'once' was used before"):
        client.run_all("poly", X, {"coeffs": [1, 1]}, timeout=60, job_id="once")
    good_job(client)


# ------------------------------------------------------------------------------------------------- item 7


def _parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        client_cli.parse(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_item7_the_client_refuses_bad_input_in_one_line(capsys):
    nan = _parse_error(["--job", "poly", "--input", "[1, NaN]", "--params", '{"coeffs": [1]}'], capsys)
    assert "contains NaN; only finite numbers" in nan
    huge = _parse_error(["--job", "poly", "--input", "[1e300]", "--params", '{"coeffs": [1]}'], capsys)
    assert "|x| < 2^46" in huge
    deep = _parse_error(["--job", "poly", "--params", "[" * 100_000 + "]" * 100_000], capsys)
    assert "--params is 200000 characters long; at most 65536" in deep
    deep = _parse_error(["--job", "poly", "--params", '{"coeffs": ' + "[" * 1000 + "]" * 1000 + "}"], capsys)
    assert "--params is nested more than 16 levels deep" in deep
    wraps = _parse_error(["--job", "poly", "--input", "[1e10]", "--params", '{"coeffs": [1, -2, 0.5]}'], capsys)
    assert "poly: poly would leave the fixed-point range" in wraps and "wrap" in wraps
    assert client_cli.parse(["--job", "poly", "--input", "[1000]", "--params", '{"coeffs": [1, -2, 0.5]}'])


@pytest.mark.timeout(300)
def test_item7_a_non_utf8_prompt_and_a_misspelt_parameter_are_errors_not_tracebacks(live, client):
    argv = [sys.executable, "-m", "parties.client", "--job", "generate", "--insecure"]
    proc = subprocess.run([*argv, "--prompt", b"caf\xe9 \xff".decode(errors="surrogateescape")], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and one_line(proc.stderr).endswith("the prompt is not valid UTF-8 text")
    flags = ["--job", "generate", "--prompt", "abc", "--params", '{"max_new_tokens": 1, "kv_cach": {"budget": 8}}']
    with pytest.raises(Fatal, match=r"INVALID_ARGUMENT: unknown generate parameters \['kv_cach'\]"):
        client_cli._generate(client, client_cli.parse(flags))  # the misspelt key reaches the parties
    good_job(client)


# ------------------------------------------------------------------------------------------------- item 8


@pytest.mark.timeout(400)
def test_item8_errors_say_refused_or_unreachable_and_name_the_flag_to_fix(live, client, tmp_path):
    closed = free_ports(1)[0]
    refused = stray(live, "party1", "--dealer", f"127.0.0.1:{closed}", "--connect-timeout", "3")
    line = one_line(refused.stderr)
    assert f"dealer at 127.0.0.1:{closed} refused the connection for Register" in line and "--dealer" in line, line
    # party 0 is told a wrong address for party 1: party 1 reaches party 0, party 0 never reaches party 1
    dep = Deployment(tmp_path, timeout=10.0, party_timeout=60.0, heartbeat=0.5, session="peers")
    wrong = f"127.0.0.1:{free_ports(1)[0]}"
    try:
        dep.start("dealer")
        dep.start("party0", "--peers", f"{dep.address('peer0')},{wrong}", "--connect-timeout", "8")
        dep.start("party1", "--connect-timeout", "8")
        codes = [dep.wait("party0", 120), dep.wait("party1", 120)]
    finally:
        dep.stop_all()
    assert codes == [1, 1], codes
    line0, line1 = one_line(dep.log("party0")), one_line(dep.log("party1"))
    assert f"could not reach rank 1 at {wrong}" in line0 and "peers list" in line0, line0
    assert "did not connect back" in line1 and "check that rank 0's peers list names this party's address" in line1
    good_job(client)


# ------------------------------------------------------------------------------------------------- item 10


@pytest.mark.timeout(400)
def test_item10_party1_waits_for_the_model_as_long_as_its_size_needs(tmp_path):
    """Party 0 holds a 40 MB model 6 s before sharing it (bench.faults --load-delay); party 1's --timeout is 2 s.
    A constant wait gives up; the wait that follows the size (2 s + 40 MB at 4 MB/s) serves the job."""
    from safetensors.torch import save_file

    from parties.jobs import demo_model

    weights = demo_model() | {"padding": torch.zeros(10 << 20, dtype=torch.float32)}  # 42 MB on disk
    save_file(weights, str(tmp_path / "big.safetensors"))
    dep = Deployment(tmp_path / "run", timeout=2.0, party_timeout=60.0, heartbeat=0.5,
                     model=tmp_path / "big.safetensors", party_command=(*FAULTY, "--load-delay", "6"))  # fmt: skip
    try:
        for role in ("dealer", "party0", "party1"):
            dep.start(role)
        ready(dep)
        c = connect(dep)
        x = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, 1.0, -2.0, 0.25], dtype=torch.float64)
        y, _ = c.run("linear_relu", x, {}, timeout=120)
        assert torch.allclose(y, torch.relu(x.float() @ weights["weight"] + weights["bias"]).double(), atol=2e-3)
    finally:
        dep.stop_all()
    assert "41.9 MB to load and share (waiting up to 12 s" in dep.log("party1")


# ------------------------------------------------------------------------------------------------- units


def test_json_from_outside_is_bounded_and_finite():
    from parties.common import parse_json

    assert parse_json('{"a": ["[{", "\\"]}", 1.5, -2]}', "x") == {"a": ["[{", '"]}', 1.5, -2]}  # brackets in strings
    for text, message in (
        ("[" * 17 + "]" * 17, "nested more than 16"),
        ('{"a": NaN}', "contains NaN"),
        ("[1e400]", "beyond the range of finite numbers"),
        ("[-Infinity]", "contains -Infinity"),
        ("[123456789012345678901]", "beyond 64 bits"),
        ('{"a": 1', "not valid JSON"),
        ("x" * 70_000, "at most 65536"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_json(text, "x")
    assert parse_json("[" * 16 + "]" * 16, "x") == [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]


# ------------------------------------------------------------------------------------------------- soak


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_soak_200_mixed_jobs_from_4_clients(tmp_path):
    """`python -m bench.soak --jobs 200 --clients 4` (~60-80 s with start-up on 2 busy cores): every good job
    right, every bad one its own error, still serving at the end, no role's memory up more than 10%."""
    from bench import soak

    summary = soak.run(tmp_path, jobs=200, clients=4)
    assert summary["unexpected"] == [], summary["unexpected"]
    assert summary["serving"] and summary["final_job"] == "OK"
    assert sum(summary["outcomes"].values()) == 200
    assert all(growth <= 0.10 for growth in summary["rss_growth"].values()), summary["rss_growth"]


def test_deployment_keys_each_role_gets_only_its_own_and_listeners_bind_the_configured_host(tmp_path):
    """Issue #13, deployment keys: one directory per role with its own key and certificate only (the CA key stays
    in pki/ca, with whoever made the certificates), the model in party 0's directory only; listeners default to the
    configured host, not 0.0.0.0; health answers nothing but status, role, rank and a reason."""
    from parties import dealer as dealer_cli
    from parties import party as party_cli

    dep = Deployment(tmp_path)
    for role in ("dealer", "party0", "party1", "client"):
        assert sorted(p.name for p in dep.certs_dir(role).iterdir()) == sorted(["ca.pem", f"{role}.pem", f"{role}.key"])
        argv = dep.command(role)
        others = [r for r in ("dealer", "party0", "party1", "client") if r != role]
        assert not any(str(dep.certs_dir(r)) in a for a in argv for r in others) and str(dep.certs_dir(role)) in argv
        assert ("--model" in argv) == (role == "party0")
    found = {n: [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob(n)] for n in ("ca.key", "*.safetensors")}
    assert found == {"ca.key": ["pki/ca/ca.key"], "*.safetensors": ["party0/model.safetensors"]}
    assert dealer_cli.parse([]).listen == "127.0.0.1:50700"
    args = party_cli.parse(["--rank", "1", "--peers", "10.0.0.1:50701,10.0.0.2:50711"])
    assert (args.api_listen, args.listen) == ("10.0.0.2:50712", None)  # None: its own --peers entry
    assert set(pb.HealthResponse.DESCRIPTOR.fields_by_name) == {"status", "role", "rank", "reason"}
