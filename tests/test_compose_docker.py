"""docker-compose.yml with a real Docker engine (marked `docker`: `make test-docker`; skipped when no daemon answers
or Compose v2 is missing). `make compose-demo`'s script builds the image by the route this machine allows and runs
the private demo: the answer must match and every service exit 0. A party container killed mid-job must make every
other role exit non-zero by itself within the failure timeouts (no abort flag: the roles notice, not Compose)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
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


@dataclass
class Stack:
    binary: list[str]  # Compose v2
    route: str  # the build route this machine allows (hub or offline)
    files: list[str]  # -f arguments of that route

    @property
    def command(self) -> list[str]:
        return [*self.binary, *self.files]


@pytest.fixture(scope="module")
def compose() -> Stack:
    """Compose with this machine's route, after building the image once."""
    demo = driver()
    try:
        binary = demo.compose_command()
        demo.check_daemon()
    except demo.Failure as e:
        pytest.skip(str(e))
    route = demo.pick_route("auto")
    if route == "offline":
        demo.prepare_offline()
    files = ["-f", str(REPO / "docker-compose.yml")] + (["-f", str(demo.OFFLINE)] if route == "offline" else [])
    stack = Stack(binary, route, files)
    build = subprocess.run([*stack.command, "build"], capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    subprocess.run([*stack.command, "down", "--volumes", "--timeout", "5"], capture_output=True, timeout=120)
    return stack


@pytest.mark.timeout(3600)
def test_make_compose_demo_answers_through_five_containers(compose, tmp_path):
    route = compose.route
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
    assert measured["client"] == result and result["decode_bytes_per_token"] > 0  # what --json records
    assert "KV cache: mpcache (budget 64)" in lines
    built = [ln for ln in out.splitlines() if ln.strip().endswith("Built")]
    assert [ln.split()[0] for ln in built] == ["setup"], built  # one image, built by one service
    print("", *lines, json.dumps(measured), sep="\n")


def container_states(command: list[str]) -> dict[str, dict]:
    """Service -> compose's row for its container, plus `Finished`: when it exited (docker inspect)."""
    listing = subprocess.run([*command, "ps", "--all", "--format", "json"], capture_output=True, text=True, timeout=60)
    rows = {r["Service"]: r for r in (json.loads(ln) for ln in listing.stdout.splitlines() if ln.strip())}
    for row in rows.values():
        inspect = ["docker", "inspect", "--format", "{{.State.FinishedAt}}", row["Name"]]
        row["Finished"] = subprocess.run(inspect, capture_output=True, text=True, timeout=60).stdout.strip()
    return rows


def kill_party1_mid_job(command: list[str], argv: list[str], log: Path, wait: float) -> dict:
    """Run `argv` (which brings the stack up); once both parties run the private job, SIGKILL party 1's container;
    wait at most `wait` s for `argv` to return. What happened: its exit code ("up"), seconds from the kill to its
    return and to each role's exit, the containers' exit codes."""
    with open(log, "w") as out:
        up = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 1800
            while "step=job" not in log.read_text():  # the parties are inside the private job
                assert up.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
            time.sleep(5)
            party1 = container_states(command)["party1"]["Name"]
            subprocess.run(["docker", "kill", party1], check=True, capture_output=True, timeout=60)
            killed, killed_at = time.monotonic(), dt.datetime.now(dt.UTC)
            try:
                up.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - killed
            states = container_states(command)
        finally:
            if up.poll() is None:
                up.kill()
            subprocess.run([*command, "down", "--volumes", "--timeout", "5"], capture_output=True, timeout=120)
    exited = {n: dt.datetime.fromisoformat(s["Finished"]) for n, s in states.items() if s.get("State") == "exited"}
    return {
        "up": up.returncode,
        "up_s": round(elapsed, 1),
        "exit_codes": {n: s.get("ExitCode") if n in exited else None for n, s in states.items()},
        "exit_s": {n: round((t - killed_at).total_seconds(), 1) for n, t in exited.items() if n != "setup"},
        "log": log.read_text()[-3000:],
    }


@pytest.mark.timeout(3600)
def test_a_killed_party_makes_every_role_exit_non_zero_within_the_timeouts(compose, tmp_path):
    """No abort flag: the roles notice by themselves (a broken peer link, a silent party at the dealer)."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    step_timeout = float(services["party0"]["environment"]["MPCACHE_TIMEOUT"])
    party_timeout = float(services["dealer"]["environment"]["MPCACHE_PARTY_TIMEOUT"])
    limit = max(step_timeout, party_timeout) + 30  # the longest failure timeout plus slack for a loaded machine
    seen = kill_party1_mid_job(compose.command, [*compose.command, "up"], tmp_path / "up.log", wait=limit + 120)
    codes = seen["exit_codes"]
    assert codes["setup"] == 0 and codes["party1"] == 137, seen
    assert all(codes[r] not in (0, None) for r in ("dealer", "party0", "client")), seen
    assert max(seen["exit_s"].values()) < limit, seen
    print("\nkilled party1, no abort flag:", {k: v for k, v in seen.items() if k != "log"})


@pytest.mark.timeout(3600)
def test_make_compose_demo_fails_at_once_when_a_party_dies(compose, tmp_path):
    """`make compose-demo` (`compose up --abort-on-container-failure`, which stops the rest at once but itself
    returns 0, then the script checks every exit code) exits non-zero within seconds."""
    argv = [sys.executable, str(REPO / "docker" / "demo.py"), "--route", compose.route, "--keep"]
    seen = kill_party1_mid_job(compose.command, argv, tmp_path / "demo.log", wait=120)
    assert seen["up"] not in (0, None) and seen["up_s"] < 60, seen
    assert all(code is not None for code in seen["exit_codes"].values()), seen  # nothing left running
    assert "compose-demo: compose up" in seen["log"] and "FAILED" in seen["log"], seen["log"]
    print("\nkilled party1 under make compose-demo:", {k: v for k, v in seen.items() if k != "log"})


@pytest.mark.timeout(1200)
def test_sigterm_stops_a_role_at_once(compose):
    """Under `init: true` the role is not PID 1, so SIGTERM reaches it with its default action (or, once a role
    handles it, its graceful close): `docker stop` returns in seconds, not after the stop timeout's SIGKILL."""
    command = compose.command
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
    print(f"\ndocker stop of the dealer: {elapsed:.1f} s, exit code {state['ExitCode']}")


def test_compose_reads_the_smollm2_override_as_the_process_level_test_does(compose, tmp_path):
    """Compose's own merge of docker-compose.smollm2.yml (no containers): party 0 mounts the SmolLM2 folder, the
    client only its config and tokenizer files, nobody else anything new."""
    files = ["-f", str(REPO / "docker-compose.yml"), "-f", str(REPO / "docker-compose.smollm2.yml")]
    env = {**os.environ, "MPCACHE_SMOLLM2_DIR": str(tmp_path)}
    argv = [*compose.binary, *files, "config", "--format", "json"]
    shown = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    services = json.loads(shown.stdout)["services"]
    mounts = {name: {(v["source"], v["target"]) for v in s.get("volumes", [])} for name, s in services.items()}
    assert mounts["party0"] == {("certs-party0", "/certs"), (str(tmp_path), "/model")}
    assert mounts["party1"] == {("certs-party1", "/certs")} and mounts["dealer"] == {("certs-dealer", "/certs")}
    assert mounts["client"] == {("certs-client", "/certs")} | {
        (str(tmp_path / f), f"/tokenizer/{f}") for f in ("config.json", "tokenizer.json", "tokenizer_config.json")
    }
    assert services["client"]["environment"]["MPCACHE_MODEL"] == "/tokenizer"
    assert services["party0"]["environment"]["MPCACHE_TIMEOUT"] == "600"


def available_memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.timeout(2400)
def test_the_smollm2_stack_shares_the_model_and_serves(compose):
    """The SmolLM2 override up to both parties serving: party 0 reads the staged SmolLM2 folder as the image's
    unprivileged user and secret-shares the 30-layer decoder with party 1 (the private job itself is not run here:
    each party already holds about 6 GB)."""
    from mpcache.model.loading import checkpoint_folder

    try:
        source = checkpoint_folder("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if available_memory_gib() < 16:
        pytest.skip(f"needs 16 GiB of available memory (both parties hold ~6 GB), {available_memory_gib():.1f} free")
    folder = driver().stage_model(source)
    env = {**os.environ, "MPCACHE_SMOLLM2_DIR": str(folder)}
    command = [*compose.command, "-f", str(REPO / "docker-compose.smollm2.yml")]
    try:
        up = subprocess.run([*command, "up", "--detach", "--wait", "party0", "party1"], capture_output=True,
                            text=True, env=env, timeout=1800)  # fmt: skip
        logs = subprocess.run([*command, "logs", "party0", "party1"], capture_output=True, text=True, env=env).stdout
    finally:
        subprocess.run([*command, "down", "--volumes", "--timeout", "10"], capture_output=True, env=env, timeout=120)
    assert up.returncode == 0, up.stderr[-2000:] + logs[-3000:]
    assert logs.count("step=model shared the decoder (llama, 30 layers)") == 2, logs[-3000:]
    assert logs.count("step=ready serving jobs") == 2, logs[-3000:]
