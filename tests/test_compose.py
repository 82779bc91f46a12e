"""docker-compose.yml without Docker: each service's command runs as a local process with that service's
environment, host names mapped to 127.0.0.1 and every port made unique, in the order its depends_on conditions
(completed / healthy, via the service's own healthcheck command) demand. The demo must print the right answer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mpcache.mpc.transport.ports import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADDRESS = re.compile(r"\b(dealer|party0|party1|client|0\.0\.0\.0|127\.0\.0\.1|localhost):(\d+)\b")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_declares_the_deployment(compose):
    services = compose["services"]
    assert {"setup", "dealer", "party0", "party1", "client"} <= set(services)
    for name in ("dealer", "party0", "party1", "client"):
        s = services[name]
        assert s["networks"] == ["mpc"] and "data:/data" in s["volumes"], name
        assert "MPCACHE_INSECURE" not in s.get("environment", {}), f"{name} must use mutual TLS"
        assert s["environment"]["MPCACHE_CERTS"] == "/data/certs"
        if name != "client":
            assert s["healthcheck"]["test"][:2] == ["CMD", "mpcache-health"], name
    assert services["party0"]["environment"]["MPCACHE_MODEL"].startswith("/data/")
    assert "MPCACHE_MODEL" not in services["party1"]["environment"]  # only the model owner loads it
    assert services["client"]["depends_on"] == {p: {"condition": "service_healthy"} for p in ("party0", "party1")}
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu torch==2.13.0" in dockerfile and "--no-deps crypten==0.4.1" in dockerfile


class LocalCompose:
    """Runs compose services as processes; every string goes through `rewrite` (hosts, ports, /data)."""

    def __init__(self, compose: dict, workdir: Path) -> None:
        self.services = compose["services"]
        self.workdir = workdir
        ports = sorted({int(m.group(2)) for m in ADDRESS.finditer(yaml.safe_dump(compose))})
        self.ports = dict(zip(ports, free_ports(len(ports))))
        self.procs: dict[str, subprocess.Popen] = {}

    def rewrite(self, text: str) -> str:
        text = ADDRESS.sub(lambda m: f"127.0.0.1:{self.ports[int(m.group(2))]}", str(text))
        return re.sub(r"(?<![\w.])/data\b", str(self.workdir / "data"), text)

    def argv(self, command: list[str]) -> list[str]:
        exe, *rest = [self.rewrite(c) for c in command]
        exe = sys.executable if exe == "python" else str(BIN / exe)
        return [exe, *rest]

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MPCACHE_")}
        env.update({k: self.rewrite(v) for k, v in (self.services[name].get("environment") or {}).items()})
        return env

    def start(self, name: str) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        out = subprocess.PIPE if name == "client" else log
        argv = self.argv(self.services[name]["command"])
        self.procs[name] = subprocess.Popen(argv, env=self.env(name), stdout=out, stderr=log, cwd=self.workdir)
        log.close()

    def healthy(self, name: str) -> bool:
        test = self.services[name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        return subprocess.run(self.argv(test[1:]), env=self.env(name), capture_output=True, timeout=30).returncode == 0

    def wait_for(self, dependency: str, condition: str, deadline: float) -> None:
        proc = self.procs[dependency]
        while time.monotonic() < deadline:
            if condition == "service_completed_successfully":
                if proc.poll() is not None:
                    assert proc.returncode == 0, f"{dependency} exited {proc.returncode}: {self.log(dependency)}"
                    return
            else:
                assert proc.poll() is None, f"{dependency} exited early: {self.log(dependency)}"
                if condition == "service_started" or self.healthy(dependency):
                    return
            time.sleep(0.5)
        raise AssertionError(f"{dependency} not {condition} in time: {self.log(dependency)}")

    def up(self, deadline: float) -> None:
        """Start every service once its dependencies' conditions hold (compose's order, sequentially)."""
        pending = list(self.services)
        while pending:
            ready = [n for n in pending if all(d in self.procs for d in self.services[n].get("depends_on") or {})]
            assert ready, f"dependency cycle among {pending}"
            name = ready[0]
            for dependency, spec in (self.services[name].get("depends_on") or {}).items():
                self.wait_for(dependency, spec["condition"], deadline)
            self.start(name)
            pending.remove(name)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def down(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.mark.timeout(240)
def test_compose_services_run_the_demo_to_the_expected_answer(compose, tmp_path):
    (tmp_path / "data").mkdir()
    local = LocalCompose(compose, tmp_path)
    try:
        local.up(deadline=time.monotonic() + 180)
        client_out, _ = local.procs["client"].communicate(timeout=120)
        codes = {name: proc.wait(60) for name, proc in local.procs.items()}
    finally:
        local.down()
    assert codes == dict.fromkeys(local.services, 0), {n: local.log(n) for n, c in codes.items() if c}
    result = json.loads(next(ln for ln in client_out.decode().splitlines() if ln.startswith("RESULT "))[7:])
    model = load_file(str(tmp_path / "data" / "model.safetensors"))
    x = torch.tensor(json.loads(compose["services"]["client"]["environment"]["MPCACHE_INPUT"]))
    expected = torch.relu(x @ model["weight"] + model["bias"])
    assert torch.allclose(torch.tensor(result["answer"]), expected, atol=2e-3), (result["answer"], expected)
    assert (expected > 0).any() and (expected == 0).any()  # the demo exercises both sides of the ReLU
    assert "mutual TLS" in local.log("dealer")
