"""docker-compose.yml with a real Docker engine (marked `docker`: `make test-docker`; skipped when no daemon answers
or Compose v2 is missing). `make compose-demo`'s script builds the image by the route this machine allows and runs
the private demo: the answer must match and every service exit 0. A party container killed mid-job must make every
other role exit non-zero by itself within the failure timeouts (no abort flag: the roles notice, not Compose)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.docker


def driver():
    spec = importlib.util.spec_from_file_location("compose_demo", REPO / "docker" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compose() -> tuple[list[str], str]:
    """(the compose command with this machine's route's files, the route), after building the image once."""
    demo = driver()
    try:
        command = demo.compose_command()
        demo.check_daemon()
    except demo.Failure as e:
        pytest.skip(str(e))
    route = demo.pick_route("auto")
    if route == "offline":
        demo.prepare_offline()
    command += ["-f", str(REPO / "docker-compose.yml")] + (["-f", str(demo.OFFLINE)] if route == "offline" else [])
    build = subprocess.run([*command, "build"], capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    subprocess.run([*command, "down", "--volumes", "--timeout", "5"], capture_output=True, timeout=120)
    return command, route


@pytest.mark.timeout(3600)
def test_make_compose_demo_answers_through_five_containers(compose, tmp_path):
    _, route = compose
    record = tmp_path / "run.json"
    argv = [sys.executable, str(REPO / "docker" / "demo.py"), "--route", route, "--json", str(record)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=3000)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-5000:]
    measured = json.loads(record.read_text())
    assert measured["exit_codes"] == dict.fromkeys(("setup", "dealer", "party0", "party1", "client"), 0), measured
    lines = [ln.split("|", 1)[1].strip() for ln in out.splitlines() if ln.startswith("client-1") and "|" in ln]
    result = json.loads(next(ln for ln in lines if ln.startswith("RESULT "))[7:])
    assert result["match"] and result["text"].lstrip().startswith(result["expected"]), lines
    assert "KV cache: mpcache (budget 64)" in lines
    built = [ln for ln in out.splitlines() if ln.strip().endswith("Built")]
    assert [ln.split()[0] for ln in built] == ["setup"], built  # one image, built by one service


def container_states(command: list[str]) -> dict[str, dict]:
    listing = subprocess.run([*command, "ps", "--all", "--format", "json"], capture_output=True, text=True, timeout=60)
    rows = [json.loads(line) for line in listing.stdout.splitlines() if line.strip().startswith("{")]
    return {r["Service"]: r for r in rows}


@pytest.mark.timeout(3600)
def test_a_killed_party_makes_every_role_exit_non_zero_within_the_timeouts(compose, tmp_path):
    command, _ = compose
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    step_timeout = float(services["party0"]["environment"]["MPCACHE_TIMEOUT"])
    party_timeout = float(services["dealer"]["environment"]["MPCACHE_PARTY_TIMEOUT"])
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - closed below
    up = subprocess.Popen([*command, "up"], stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 1800
        while "step=job" not in (tmp_path / "up.log").read_text():  # both parties are inside the private job
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(1)
        time.sleep(5)
        party1 = container_states(command)["party1"]["Name"]
        subprocess.run(["docker", "kill", party1], check=True, capture_output=True, timeout=60)
        killed = time.monotonic()
        limit = max(step_timeout, party_timeout) + 60  # the longest failure timeout plus start-up slack
        up.wait(timeout=limit + 120)
        elapsed = time.monotonic() - killed
        states = container_states(command)
    finally:
        if up.poll() is None:
            up.kill()
        subprocess.run([*command, "down", "--volumes", "--timeout", "5"], capture_output=True, timeout=120)
        log.close()
    text = (tmp_path / "up.log").read_text()
    codes = {name: s.get("ExitCode") for name, s in states.items()}
    assert all(s.get("State") == "exited" for s in states.values()), (states, text[-3000:])
    assert codes["setup"] == 0 and codes["party1"] == 137, codes
    assert all(codes[r] not in (0, None) for r in ("dealer", "party0", "client")), (codes, text[-3000:])
    assert elapsed < limit, f"the stack took {elapsed:.0f} s to exit after party 1 was killed: {text[-3000:]}"
    print(f"killed party1: every role exited after {elapsed:.1f} s, exit codes {codes}")


@pytest.mark.timeout(1200)
def test_sigterm_stops_a_role_at_once(compose):
    """Under `init: true` the role is not PID 1, so SIGTERM reaches it with its default action (or, once a role
    handles it, its graceful close): `docker stop` returns in seconds, not after the stop timeout's SIGKILL."""
    command, _ = compose
    try:
        start = subprocess.run([*command, "up", "--detach", "--wait", "dealer"], capture_output=True, text=True,
                               timeout=900)  # fmt: skip
        assert start.returncode == 0, start.stderr[-3000:]
        dealer = container_states(command)["dealer"]["Name"]
        t0 = time.monotonic()
        subprocess.run(["docker", "stop", "--time", "30", dealer], check=True, capture_output=True, timeout=120)
        elapsed = time.monotonic() - t0
        state = container_states(command)["dealer"]
    finally:
        subprocess.run([*command, "down", "--volumes", "--timeout", "5"], capture_output=True, timeout=120)
    assert elapsed < 10, f"docker stop took {elapsed:.1f} s: SIGTERM was not delivered or not acted on"
    assert state["ExitCode"] in (0, 143), state  # a graceful close, or the default action of SIGTERM (128 + 15)
