"""The role CLIs as separate OS processes: the launcher end to end, and what happens when a role dies or stalls.

Timeouts are shortened (3 s of silence, heartbeats every 0.5 s); every test kills what it started.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpcache.mpc.deploy.launcher import Deployment

REPO = Path(__file__).resolve().parents[1]
FAST = dict(timeout=3.0, party_timeout=3.0, heartbeat=0.5)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _ready(dep: Deployment, timeout: float = 90) -> None:
    for role in ("party0", "party1"):
        _wait_for(lambda role=role: "step=ready" in dep.log(role), timeout, f"{role} to be ready")


def _error_line(dep: Deployment, role: str) -> str:
    lines = dep.log(role).strip().splitlines()
    assert lines, f"{role} wrote nothing"
    assert "Traceback" not in dep.log(role), dep.log(role)
    return lines[-1]


@pytest.mark.timeout(150)
def test_launcher_runs_all_roles_and_prints_the_answer(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mpcache.mpc.deploy.launcher", "--workdir", str(tmp_path), "--job", "poly"]
        + ["--input", "[[1.5, -2.0], [0.25, 3.0]]", "--params", '{"coeffs": [1, -2, 0.5, 0.125]}'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    x = torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.float64)
    expected = 1 - 2 * x + 0.5 * x**2 + 0.125 * x**3
    assert torch.allclose(torch.tensor(result["answer"], dtype=torch.float64), expected, atol=1e-3)
    p0, p1 = result["parties"]
    assert p0["rounds"] == p1["rounds"] > 0 and p0["bytes"] == p1["bytes"] > 0
    assert p0["tuples"] == p1["tuples"] == 6  # Horner: three secret products, each a triple + an exact truncation
    assert p0["dealer_bytes"] > 0 and p1["dealer_bytes"] == 0
    assert "mutual TLS" in proc.stdout and "client exit 0" in proc.stdout
    assert "step=listen" in (tmp_path / "party0.log").read_text()  # logs name role, session and step
    assert all("session=local" in (tmp_path / f"{r}.log").read_text() for r in ("dealer", "party0", "party1"))


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            pass
    return pids


@pytest.mark.timeout(60)
def test_launcher_deadline_kills_every_role(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mpcache.mpc.deploy.launcher", "--workdir", str(tmp_path), "--timeout", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 1
    assert "still running (killed)" in proc.stdout
    assert _processes_mentioning(str(tmp_path)) == []  # no orphans


@pytest.mark.timeout(120)
def test_a_dead_party_makes_the_dealer_and_the_other_party_exit_naming_it(tmp_path):
    dep = Deployment(tmp_path, **FAST)
    try:
        for role in ("dealer", "party0", "party1"):
            dep.start(role)
        _ready(dep)
        t0 = time.monotonic()
        dep.signal("party1", signal.SIGKILL)
        assert dep.wait("dealer", 20) == 1 and dep.wait("party0", 20) == 1
        elapsed = time.monotonic() - t0
    finally:
        dep.stop_all()
    # party timeout + the survivor's grace, plus slack: measured up to ~11 s with both cores busy, and
    # still far below the 30 s default timeouts, so a hang cannot pass.
    assert elapsed < 3.0 + 3.0 + 15
    # the dealer hears it from party 1's silence or from party 0, which sees the broken link at once
    assert any(f"{who} 1" in _error_line(dep, "dealer") for who in ("party", "rank"))
    line = _error_line(dep, "party0")
    assert line.startswith("party0: error:") and ("party 1" in line or "rank 1" in line), line


@pytest.mark.timeout(150)
def test_a_party_that_stalls_mid_job_fails_it_and_everyone_names_it(tmp_path):
    """Party 1 stops (SIGSTOP) mid-job for good. Defined outcome: the job fails (party 0 waits --timeout for it, or
    hears first that the dealer gave the session up); the dealer gives the session up after --party-timeout of
    silence; party 0 ends the session. Each exits 1 naming party 1, within the timeouts plus slack, whichever of
    the two clocks runs out first. (A stall shorter than --party-timeout fails the job only: test_reliability.)"""
    dep = Deployment(tmp_path, **FAST)
    (tmp_path / "x.json").write_text(json.dumps(torch.rand(200_000).tolist()))  # a job long enough to stall in
    try:
        for role in ("dealer", "party0", "party1"):
            dep.start(role)
        _ready(dep)
        coeffs = json.dumps({"coeffs": [0.5] * 16})
        dep.start("client", "--job", "poly", "--input-file", str(tmp_path / "x.json"), "--params", coeffs)
        _wait_for(lambda: "step=job" in dep.log("party1"), 90, "the job to start")
        dep.signal("party1", signal.SIGSTOP)
        t0 = time.monotonic()
        codes, elapsed = {}, {}
        for role in ("client", "party0", "dealer"):
            codes[role] = dep.wait(role, max(60 - (time.monotonic() - t0), 1))
            elapsed[role] = time.monotonic() - t0
    finally:
        dep.stop_all()
    assert codes == {"client": 1, "party0": 1, "dealer": 1}, codes
    # --timeout (3 s) or --party-timeout (3 s) + a heartbeat + closing: ~7 s; slack for a loaded machine
    assert max(elapsed.values()) < 3.0 + 3.0 + 30, elapsed
    for role in ("client", "party0", "dealer"):
        line = _error_line(dep, role)
        assert line.startswith(f"{role}: error:") and ("rank 1" in line or "party 1" in line), line
    assert "job" in _error_line(dep, "client")  # the client hears about its job, not a broken connection


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "stalls"])
def test_a_dealer_that_dies_or_stalls_makes_both_parties_exit_naming_it(tmp_path, how):
    dep = Deployment(tmp_path, **FAST)
    try:
        for role in ("dealer", "party0", "party1"):
            dep.start(role)
        _ready(dep)
        t0 = time.monotonic()
        dep.signal("dealer", how)
        codes = [dep.wait("party0", 30), dep.wait("party1", 30)]
        elapsed = time.monotonic() - t0
    finally:
        dep.stop_all()
    assert codes == [1, 1]
    assert elapsed < 0.5 + 3.0 + 3.0 + 15  # a heartbeat, its deadline, close timeouts, slack (see above)
    for role in ("party0", "party1"):  # its own heartbeat, or the other party's abort, names the dealer
        line = _error_line(dep, role)
        assert line.startswith(f"{role}: error:") and f"dealer at 127.0.0.1:{dep.ports['dealer']}" in line, line


@pytest.mark.timeout(90)
def test_a_port_in_use_is_one_clear_line(tmp_path):
    dep = Deployment(tmp_path, insecure=True, **FAST)
    first = Deployment(tmp_path / "first", insecure=True, ports=dict(dep.ports), **FAST)
    try:
        first.start("dealer")  # a live dealer holds the port
        _wait_for(lambda: "step=serve" in first.log("dealer"), 60, "the first dealer")
        dep.start("dealer")
        with socket.socket() as busy:  # and any other program holding party 0's client port
            busy.bind(("127.0.0.1", dep.ports["api0"]))
            busy.listen()
            dep.start("party0")
            codes = dep.wait("dealer", 60), dep.wait("party0", 60)
    finally:
        dep.stop_all()
        first.stop_all()
    assert codes == (1, 1)
    for role, name, message in (("dealer", "dealer", "dealer"), ("party0", "api0", "party 0")):
        assert dep.log(role).strip().splitlines() == [
            f"{role}: error: {message} cannot listen on 127.0.0.1:{dep.ports[name]}"
            + (" for clients" if role == "party0" else "")
            + " (port in use or address not available)"
        ]


@pytest.mark.timeout(120)
def test_bad_requests_get_clear_errors_and_the_parties_stay_in_step(tmp_path):
    from argparse import Namespace

    from parties.client import Client, Fatal
    from parties.common import Credentials

    dep = Deployment(tmp_path, **FAST)

    def creds(role):
        return Credentials(
            role, Namespace(insecure=False, certs=str(dep.certs_dir(role)), tls_ca=None, tls_cert=None, tls_key=None)
        )

    try:
        for role in ("dealer", "party0", "party1"):
            dep.start(role)
        _ready(dep)
        api = [dep.address("api0"), dep.address("api1")]
        client = Client(api, creds("client"), connect_timeout=30)
        x = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, 1.0, -2.0, 0.25], dtype=torch.float64)
        bad = [
            ("nope", x, {}, "INVALID_ARGUMENT: unknown job kind 'nope'"),
            ("poly", x, {"coeffs": "1,2"}, "INVALID_ARGUMENT: poly needs params"),
            ("linear_relu", x[:5], {}, "INVALID_ARGUMENT: linear_relu input has last dimension 5"),
        ]
        for kind, inp, params, message in bad:
            with pytest.raises(Fatal, match=f"party 0 .* failed job .*{message}"):
                client.run(kind, inp, params, timeout=20)
        with pytest.raises(Fatal, match="PERMISSION_DENIED: only the client"):
            Client(api, creds("party1"), connect_timeout=30).run("poly", x, {"coeffs": [1]}, timeout=20)
        y, results = client.run("poly", x, {"coeffs": [0.0, 1.0, 1.0]}, timeout=20)  # still in step: x + x^2
        assert torch.allclose(y, x + x * x, atol=1e-3)
        assert results[0].stats.tuples == results[1].stats.tuples == 4  # 2 products: triple + exact truncation each
        client.shutdown("done", timeout=20)
        assert [dep.wait(r, 30) for r in ("dealer", "party0", "party1")] == [0, 0, 0]
    finally:
        dep.stop_all()


@pytest.mark.timeout(240)
def test_killing_party1_mid_generation_makes_everyone_exit_naming_it(tmp_path):
    """The private decoder's job (bundled model) is running when party 1 is killed: party 0, the dealer and the
    client all exit non-zero within the timeouts, each naming the lost party."""
    from mpcache.model.loading import BUNDLED_DIR

    dep = Deployment(tmp_path, model=BUNDLED_DIR, timeout=10.0, party_timeout=10.0, heartbeat=0.5)
    try:
        for role in ("dealer", "party0", "party1"):
            dep.start(role)
        _ready(dep)
        prompt = "The pass key is 60754. Remember it. What is the pass key? The pass key is "
        dep.start("client", "--job", "generate", "--prompt", prompt, "--params", '{"max_new_tokens": 40}')
        _wait_for(lambda: "step=job" in dep.log("party1"), 120, "the generate job to start")
        time.sleep(1.0)  # inside the private prefill
        t0 = time.monotonic()
        dep.signal("party1", signal.SIGKILL)
        codes = {role: dep.wait(role, 60) for role in ("client", "party0", "dealer")}
        elapsed = time.monotonic() - t0
    finally:
        dep.stop_all()
    assert codes == {"client": 1, "party0": 1, "dealer": 1}, codes
    assert elapsed < 10.0 + 10.0 + 15  # peer timeout + close grace + slack for a loaded machine
    for role in ("client", "party0", "dealer"):
        line = _error_line(dep, role)
        assert line.startswith(f"{role}: error:") and ("rank 1" in line or "party 1" in line), line
