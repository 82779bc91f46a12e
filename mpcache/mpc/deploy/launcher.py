"""One command for the whole deployment on this machine: dealer, party 0, party 1 and client as separate OS
processes on loopback, with mutual TLS (a throw-away CA) unless --insecure.

    python -m mpcache.mpc.deploy.launcher [--job linear_relu] [--input '[...]'] [--params '{}'] [--timeout 180]
    python -m mpcache.mpc.deploy.launcher --job generate --model mpcache/assets/bundled --prompt '...' --params \
        '{"max_new_tokens": 8}'                       # the private decoder on a checkpoint folder

It waits for the client, prints the client's output (answer, latency, communication per party) and the exit
status of every role. If any role fails or the deadline passes, it kills every process it started (no orphans),
prints the tail of each role's log and exits non-zero. `Deployment` is the same machinery for tests.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mpcache.mpc.transport.ports import free_ports

ROLES = ("dealer", "party0", "party1", "client")


def prepare(workdir: Path, insecure: bool) -> None:
    """As docker-compose's volumes: development certificates (unless insecure) with each role's key and certificate
    alone in workdir/pki/<role> and the CA key in workdir/pki/ca (what `mpcache-certs --per-role` writes), and the
    demo model in party 0's directory only (workdir/party0)."""
    from safetensors.torch import save_file

    from mpcache.mpc.transport.tls import make_role_dirs
    from parties.jobs import demo_model

    workdir.mkdir(parents=True, exist_ok=True)
    if not insecure and not (workdir / "pki" / "ca" / "ca.pem").exists():
        make_role_dirs(workdir / "pki")
    model = workdir / "party0" / "model.safetensors"
    if not model.exists():
        model.parent.mkdir(exist_ok=True)
        save_file(demo_model(), str(model))


@dataclass
class Deployment:
    """Four role processes on loopback with unique ports; every process it starts, it also stops."""

    workdir: Path
    insecure: bool = False
    timeout: float = 30.0  # peer / dealer silence allowed mid-step
    party_timeout: float = 30.0  # dealer: a party silent this long aborts the session
    heartbeat: float = 2.0
    agree_timeout: float = 5.0  # a job waits this long for the other party's copy of the request
    session: str = "local"
    model: Path | None = None  # party 0's --model (default: the demo weights file in workdir)
    party_command: tuple[str, ...] | None = None  # instead of `python -m parties.party` (bench.faults in tests)
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        prepare(self.workdir, self.insecure)
        names = ("dealer", "peer0", "peer1", "api0", "api1")
        self.ports = dict(zip(names, free_ports(len(names)))) | self.ports

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def certs_dir(self, role: str) -> Path:
        """Where `role`'s TLS files are (its --certs): its own certificate and key, the CA's certificate."""
        return self.workdir / "pki" / role

    def command(self, role: str, *extra: str) -> list[str]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        peers = f"{self.address('peer0')},{self.address('peer1')}"
        connect = ["--connect-timeout", str(max(60.0, 2 * self.timeout))]
        party = ["--peers", peers, "--dealer", self.address("dealer"), "--timeout", str(self.timeout), *connect]
        party += ["--heartbeat", str(self.heartbeat), "--agree-timeout", str(self.agree_timeout)]
        if role == "dealer":
            args = ["--listen", self.address("dealer"), "--sessions", "1", "--party-timeout", str(self.party_timeout)]
        elif role == "party0":
            args = ["--rank", "0", "--api-listen", self.address("api0"), *party]
            args += ["--model", str(self.model or self.workdir / "party0" / "model.safetensors")]
        elif role == "party1":
            args = ["--rank", "1", "--api-listen", self.address("api1"), *party]
        else:
            args = ["--parties", f"{self.address('api0')},{self.address('api1')}", "--shutdown", *connect]
        common = ["--session", self.session, "--certs", str(self.certs_dir(role))]
        if self.insecure:
            common.append("--insecure")
        if role.startswith("party") and self.party_command:
            return [*self.party_command, *common, *args, *extra]
        module = "parties.party" if role.startswith("party") else f"parties.{role}"
        return [sys.executable, "-m", module, *common, *args, *extra]

    def start(self, role: str, *extra: str) -> subprocess.Popen:
        if role in self.procs and self.procs[role].poll() is None:
            raise RuntimeError(f"{role} is already running")
        log = open(self.workdir / f"{role}.log", "wb")  # noqa: SIM115 - owned by the child process
        out = subprocess.PIPE if role == "client" else log
        env = {k: v for k, v in os.environ.items() if not k.startswith("MPCACHE_")}  # flags decide, not leftovers
        env["PYTHONUNBUFFERED"] = "1"
        self.procs[role] = subprocess.Popen(
            self.command(role, *extra), stdout=out, stderr=log, env=env, start_new_session=True
        )
        log.close()
        return self.procs[role]

    def start_all(self, client_args: tuple[str, ...] = ()) -> None:
        for role in ("dealer", "party0", "party1"):
            self.start(role)
        self.start("client", *client_args)

    def log(self, role: str) -> str:
        path = self.workdir / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, role: str, timeout: float) -> int | None:
        """Exit code of `role`, or None if it is still running after `timeout` seconds."""
        try:
            return self.procs[role].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, role: str, sig: int) -> None:
        proc = self.procs[role]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)

    def peak_rss_mib(self) -> dict[str, float]:
        """Each running role's peak resident memory so far (Linux /proc VmHWM), MiB."""
        out = {}
        for role, proc in self.procs.items():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            peak = [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
            out[role] = peak[0] if peak else 0.0
        return out

    def stop_all(self) -> None:
        """Kill every process this deployment started that is still running (SIGCONT first for stopped ones)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not time out
                pass

    def run(self, timeout: float, client_args: tuple[str, ...] = ()) -> tuple[dict[str, int | None], str]:
        """Start all roles, wait for all of them (at most `timeout` s in total); returns (exit codes, client stdout).

        Fails fast: as soon as one role exits non-zero, the others get `timeout`+5 s to report, then are killed.
        """
        deadline = time.monotonic() + timeout
        self.start_all(client_args)
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(self.procs["client"].stdout.readline, b"")))
        reader.start()
        try:
            failed_at = None
            while True:
                codes = {role: p.poll() for role, p in self.procs.items()}
                if all(c is not None for c in codes.values()):
                    break
                now = time.monotonic()
                if failed_at is None and any(c not in (None, 0) for c in codes.values()):
                    failed_at = now
                if now > deadline or (failed_at is not None and now - failed_at > self.timeout + 5):
                    break
                time.sleep(0.1)
        finally:
            self.stop_all()
            reader.join(10)
        codes = {role: p.returncode for role, p in self.procs.items()}
        return codes, b"".join(chunks).decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpcache.mpc.deploy.launcher", description=__doc__.splitlines()[0])
    p.add_argument("--job", default="linear_relu", help="job kind (parties/jobs.py)")
    p.add_argument("--input", default=None, help="input as a JSON list (default: the client's demo input)")
    p.add_argument("--params", default=None, help="job parameters as a JSON object")
    p.add_argument("--model", default=None, help="party 0's model: a checkpoint folder serves job generate")
    p.add_argument("--prompt", default=None, help="job generate: the prompt text")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC instead of mutual TLS")
    p.add_argument("--timeout", type=float, default=180.0, help="deadline for the whole run, seconds")
    p.add_argument("--step-timeout", type=float, default=30.0, help="silence allowed from a peer or the dealer")
    p.add_argument("--workdir", default=None, help="where certificates, model and logs go (default: a temp dir)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mpcache-launch-"))
    client_args = ["--job", args.job, "--timeout", str(args.timeout)]
    if args.input is not None:
        client_args += ["--input", args.input]
    if args.params is not None:
        client_args += ["--params", args.params]
    if args.prompt is not None:
        client_args += ["--prompt", args.prompt]
    if args.model is not None:
        client_args += ["--tokenizer", args.model]
    model = Path(args.model) if args.model else None
    deployment = Deployment(workdir, insecure=args.insecure, timeout=args.step_timeout, model=model)
    print(f"launcher: roles on 127.0.0.1 ports {deployment.ports}, {'plaintext' if args.insecure else 'mutual TLS'}")
    print(f"launcher: logs in {workdir}", flush=True)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # killing the launcher stops its children too (run's finally)
    t0 = time.perf_counter()
    try:
        codes, client_out = deployment.run(args.timeout, tuple(client_args))
    except KeyboardInterrupt:
        print("launcher: interrupted; every role stopped", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    print(client_out, end="" if client_out.endswith("\n") else "\n")
    status = ", ".join(
        f"{role} {'still running (killed)' if c is None or c < 0 else f'exit {c}'}" for role, c in codes.items()
    )
    print(f"launcher: {status}; wall time {wall:.1f} s (process start-up included)")
    if all(c == 0 for c in codes.values()):
        return 0
    for role in ROLES:
        if codes.get(role) != 0:
            tail = deployment.log(role).strip().splitlines()[-3:]
            print(f"launcher: {role} log tail:", *(f"  {line}" for line in tail), sep="\n", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
