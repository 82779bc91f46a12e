"""Soak test of one deployment (issue #13): many mixed good and bad jobs from concurrent clients.

    python -m bench.soak [--jobs 200] [--clients 4] [--json bench/results/soak.json]

Starts a dealer and both parties on loopback with mutual TLS (the parties run bench.faults: mpcache-party plus the
fault-injection job; party 0 holds the demo weights file), then `clients` client threads, each with its own
channels, take jobs from one shuffled list (seeded): good `poly` and `linear_relu` jobs, whose answers are checked
against plaintext, and bad ones, each of which must end with its own error: invalid parameters, an unknown kind,
a wrong input shape (refused before any MPC), a mid-run exception or diverged calls at either party, a request that
reaches one party only, a reused job id, a cancelled job. It reads the resident memory (VmRSS) of the dealer and both
parties after the first `warmup` jobs and after the last one, both times with no job running (growth: the second
over the first), and every `sample_every` jobs in between (the running jobs' buffers included). At the end
a good job must still run and both parties must answer health checks SERVING. Prints a table and writes JSON;
tests/test_reliability.py::test_soak runs it (slow) and asserts every outcome and growth <= 10%.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from mpcache.mpc.deploy.launcher import Deployment
from mpcache.mpc.transport import wire
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc
from parties.client import Client, share
from parties.common import Credentials, Fatal
from parties.jobs import demo_model

ROLES = ("dealer", "party0", "party1")
# kind of job -> share of the list (good ones about half)
MIX = {
    "good_poly": 0.30,
    "good_linear": 0.20,
    "bad_params": 0.08,
    "bad_kind": 0.05,
    "bad_shape": 0.07,
    "fault_raise": 0.09,
    "fault_diverge": 0.06,
    "one_party": 0.05,
    "duplicate": 0.05,
    "cancel": 0.05,
}
EXPECTED = {  # kind -> the gRPC status its (first failing) answer must carry; None: a correct answer
    "good_poly": None,
    "good_linear": None,
    "bad_params": "INVALID_ARGUMENT",
    "bad_kind": "INVALID_ARGUMENT",
    "bad_shape": "INVALID_ARGUMENT",
    "fault_raise": "ABORTED",
    "fault_diverge": "ABORTED",
    "one_party": "ABORTED",
    "duplicate": "ALREADY_EXISTS",
    "cancel": "CANCELLED",
}


@dataclass
class Soak:
    dep: Deployment
    weights: dict
    timeout: float = 120.0
    outcomes: Counter = field(default_factory=Counter)
    unexpected: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, got: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[(kind, got)] += 1
            if got != (EXPECTED[kind] or "OK"):
                self.unexpected.append({"kind": kind, "got": got, "detail": detail[:300]})

    def run_one(self, c: Client, kind: str, rng: random.Random) -> None:
        x = torch.tensor([rng.uniform(-2, 2) for _ in range(8)], dtype=torch.float64)
        try:
            got = self._run(c, kind, x, rng)
        except Fatal as e:
            text = str(e)
            got = next((name for name in grpc.StatusCode.__members__ if f": {name}:" in text), "ERROR")
            self.record(kind, got, text)
            return
        self.record(kind, got)

    def _run(self, c: Client, kind: str, x: torch.Tensor, rng: random.Random) -> str:
        if kind == "good_poly":
            coeffs = [rng.uniform(-1, 1) for _ in range(3)]
            y, _ = c.run("poly", x, {"coeffs": coeffs}, self.timeout)
            want = coeffs[0] + coeffs[1] * x + coeffs[2] * x * x
            return "OK" if torch.allclose(y, want, atol=1e-3) else f"WRONG {y.tolist()} != {want.tolist()}"
        if kind == "good_linear":
            y, _ = c.run("linear_relu", x, {}, self.timeout)
            want = torch.relu(x.float() @ self.weights["weight"] + self.weights["bias"]).double()
            return "OK" if torch.allclose(y, want, atol=2e-3) else f"WRONG {y.tolist()} != {want.tolist()}"
        if kind == "bad_params":
            c.run("poly", x, {"coeffs": rng.choice(["1,2", [1e308], [], [1] * 17, [True]])}, self.timeout)
        elif kind == "bad_kind":
            c.run("nope", x, {}, self.timeout)
        elif kind == "bad_shape":
            c.run("linear_relu", x[:5], {}, self.timeout)
        elif kind.startswith("fault_"):
            how = kind.removeprefix("fault_")
            c.run("fault", x, {"rank": rng.randrange(2), "after": rng.randrange(4), "how": how}, self.timeout)
        elif kind == "one_party":
            return self._one_party(c, x, rng.randrange(2))
        elif kind == "duplicate":
            job_id = uuid.uuid4().hex
            c.run_all("poly", x, {"coeffs": [1, 1]}, self.timeout, job_id=job_id)
            c.run_all("poly", x, {"coeffs": [1, 1]}, self.timeout, job_id=job_id)
        elif kind == "cancel":
            return self._cancelled(c)
        return "OK"

    def _one_party(self, c: Client, x: torch.Tensor, rank: int) -> str:
        shares = share(x)
        request = pb.JobRequest(job_id=uuid.uuid4().hex, party=rank, kind="poly", params_json='{"coeffs": [1]}',
                                inputs=[pb.FixedPointShare(precision_bits=16,
                                                           share=wire.tensor_to_proto(shares[rank]))])  # fmt: skip
        try:
            c.stubs[rank].Run(request, timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED:
                raise Fatal(f"one-party request: {e.code().name}: {e.details()}") from None
            return "ABORTED"
        return "OK"

    def _cancelled(self, c: Client) -> str:
        """A long job cancelled by its client (Cancel at both parties) as soon as either party runs or queues it."""
        job_id, outcome = uuid.uuid4().hex, {}

        def run() -> None:
            try:
                c.run_all("poly", torch.rand(1 << 18, dtype=torch.float64), {"coeffs": [0.5] * 16}, self.timeout,
                          job_id=job_id)  # fmt: skip
                outcome["got"] = "DONE"
            except Fatal as e:
                outcome["got"] = next((n for n in grpc.StatusCode.__members__ if f": {n}:" in str(e)), str(e))

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + self.timeout
        while runner.is_alive() and time.monotonic() < deadline:
            try:
                c.cancel(job_id)
                break
            except Fatal:  # not there yet at one of the parties
                time.sleep(0.05)
        runner.join(self.timeout)
        return outcome.get("got", "HUNG")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(workdir: Path, jobs: int = 200, clients: int = 4, seed: int = 0, warmup: int = 40,
        sample_every: int = 10) -> dict:  # fmt: skip
    """Run the soak; returns the summary (see the module docstring)."""
    rng = random.Random(seed)
    kinds = [k for k, share_ in MIX.items() for _ in range(round(share_ * jobs))]
    kinds = (kinds + ["good_poly"] * jobs)[:jobs]
    rng.shuffle(kinds)
    dep = Deployment(workdir, timeout=20.0, party_timeout=60.0, heartbeat=1.0, agree_timeout=2.0, session="soak",
                     party_command=(sys.executable, "-m", "bench.faults"))  # fmt: skip
    weights = demo_model()
    soak = Soak(dep, weights)
    samples: list[dict] = []
    t0 = time.perf_counter()
    try:
        for role in ROLES:
            dep.start(role)
        deadline = time.monotonic() + 300
        while not all("step=ready" in dep.log(r) for r in ("party0", "party1")):
            if time.monotonic() > deadline or any(dep.procs[r].poll() is not None for r in ROLES):
                raise RuntimeError("the deployment did not start: " + dep.log("party0")[-500:])
            time.sleep(0.1)
        creds = Credentials("client", argparse.Namespace(insecure=False, certs=str(dep.certs_dir("client")),
                                                        tls_ca=None, tls_cert=None, tls_key=None))  # fmt: skip
        addresses = [dep.address("api0"), dep.address("api1")]
        pool = [Client(addresses, creds, connect_timeout=120) for _ in range(clients)]
        queue: list[tuple[int, str]] = []
        lock = threading.Lock()

        def sample(index: int) -> dict:
            return {"job": index, **{r: rss_mb(dep.procs[r].pid) for r in ROLES}}

        def worker(c: Client, wrng: random.Random) -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    index, kind = queue.pop(0)
                    if index > warmup and index % sample_every == 0:
                        samples.append(sample(index))  # mid-run: includes the running jobs' buffers
                soak.run_one(c, kind, wrng)

        def phase(jobs_in_phase: list[tuple[int, str]]) -> None:
            queue.extend(jobs_in_phase)
            threads = [threading.Thread(target=worker, args=(c, random.Random(seed + 1 + i + len(queue))))
                       for i, c in enumerate(pool)]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        started = time.perf_counter()
        phase(list(enumerate(kinds))[:warmup])
        idle_after_warmup = sample(warmup)  # both growth samples are taken with no job running
        samples.append(idle_after_warmup)
        phase(list(enumerate(kinds))[warmup:])
        elapsed = time.perf_counter() - started
        samples.append(sample(jobs))
        final = soak._run(pool[0], "good_poly", torch.linspace(-2, 2, 8, dtype=torch.float64), rng)
        health = [pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=10).status for ch in pool[0].channels]
        alive = {r: dep.procs[r].poll() is None for r in ROLES}
    finally:
        dep.stop_all()
    first, last = idle_after_warmup, samples[-1]
    growth = {r: last[r] / first[r] - 1 for r in ROLES}
    return {
        "jobs": jobs,
        "clients": clients,
        "seed": seed,
        "wall_s": round(time.perf_counter() - t0, 1),
        "jobs_s": round(elapsed, 1),
        "outcomes": {f"{k} -> {g}": n for (k, g), n in sorted(soak.outcomes.items())},
        "unexpected": soak.unexpected,
        "final_job": final,
        "serving": all(s == pb.HealthResponse.SERVING for s in health) and all(alive.values()),
        "rss_mb": {"after_warmup": first, "end": last},
        "rss_growth": {r: round(g, 4) for r, g in growth.items()},
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--workdir", default=None, help="logs and certificates (default: a temporary directory)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mpcache-soak-"))
    summary = run(workdir, args.jobs, args.clients, args.seed)
    print(f"soak: {summary['jobs']} jobs from {summary['clients']} clients in {summary['jobs_s']} s "
          f"({summary['wall_s']} s with start-up); logs in {workdir}")  # fmt: skip
    print("| job | answer | count |\n|---|---|---|")
    for key, n in summary["outcomes"].items():
        kind, got = key.split(" -> ")
        print(f"| {kind} | {got} | {n} |")
    print("| role | RSS after warm-up (MB) | RSS at the end (MB) | growth |\n|---|---|---|---|")
    for r in ROLES:
        first, last = summary["rss_mb"]["after_warmup"][r], summary["rss_mb"]["end"][r]
        print(f"| {r} | {first:.1f} | {last:.1f} | {100 * summary['rss_growth'][r]:+.1f}% |")
    print(f"unexpected outcomes: {len(summary['unexpected'])}; still serving: {summary['serving']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if not summary["unexpected"] and summary["serving"] and summary["final_job"] == "OK" else 1


if __name__ == "__main__":
    raise SystemExit(main())
