"""docker-compose.yml without Docker: each service's command runs as a local process with that service's
environment, host names mapped to 127.0.0.1 and every port made unique, in the order its depends_on conditions
(completed / healthy, via the service's own healthcheck command) demand. Each service sees only its own mounts: its
absolute paths are rewritten into a folder of its own whose mount targets link to that service's volumes (or bind
sources). The demo must print the right answer, and each role's volume must hold only that role's key.
tests/test_compose_docker.py runs the same file with a real Docker engine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mpcache.mpc.transport.ports import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADDRESS = re.compile(r"\b(dealer|party0|party1|client|0\.0\.0\.0|127\.0\.0\.1|localhost):(\d+)\b")
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?-)([^${}]*))?\}")
ROLES = ("dealer", "party0", "party1", "client")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} (unset or empty) and ${VAR-default} (unset); innermost first (nesting)."""

    def value(m: re.Match) -> str:
        name, op, default = m.groups()
        if name in env and (env[name] or op == "-"):
            return env[name]
        return default or ""

    while VARIABLE.search(text):
        text = VARIABLE.sub(value, text)
    return text


def load(*files: str, env: dict[str, str] | None = None) -> dict:
    """The compose files merged as Compose does for what this project uses: mappings key by key, volumes by target;
    variables are interpolated in the parsed strings (so `KEY: ${UNSET:-}` is an empty string, not null)."""
    env = {"HOME": str(Path.home())} | (env or {})
    merged: dict = {}
    for name in files:
        merged = merge(merged, substitute(yaml.safe_load((REPO / name).read_text()), env))
    return merged


def substitute(tree, env: dict[str, str]):
    if isinstance(tree, dict):
        return {k: substitute(v, env) for k, v in tree.items()}
    if isinstance(tree, list):
        return [substitute(v, env) for v in tree]
    return interpolate(tree, env) if isinstance(tree, str) else tree


def merge(base, override, key: str = ""):
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if key == "volumes" and isinstance(base, list):
        out = {mount(v)[1]: v for v in base}
        out.update({mount(v)[1]: v for v in override})
        return list(out.values())
    return override


def mount(spec: str | dict) -> tuple[str, str, bool]:
    """(source, target, read_only) of a short or long volume entry."""
    if isinstance(spec, dict):
        return spec["source"], spec["target"], bool(spec.get("read_only"))
    source, target, *mode = spec.split(":")
    return source, target, mode == ["ro"]


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("docker-compose.yml")


def test_compose_declares_the_deployment(compose):
    services = compose["services"]
    assert set(services) == {"setup", *ROLES}
    assert [n for n, s in services.items() if "build" in s] == ["setup"]  # the image is built once
    assert {s["image"] for s in services.values()} == {"mpcache:dev"}
    for name, s in services.items():
        assert s["init"] is True and s["networks"] == ["mpc"], name  # SIGTERM stops a role at once
        env = s.get("environment") or {}
        assert "MPCACHE_INSECURE" not in env, f"{name} must use mutual TLS"
        mounts = [mount(v) for v in s.get("volumes", [])]
        if name == "setup":
            assert {(src, dst) for src, dst, _ in mounts} == {("ca", "/pki/ca")} | {
                (f"certs-{r}", f"/pki/{r}") for r in ROLES
            }
            continue
        assert env["MPCACHE_CERTS"] == "/certs"
        certs = [(src, ro) for src, dst, ro in mounts if dst == "/certs"]
        assert certs == [(f"certs-{name}", True)], f"{name} must mount only its own keys, read-only"
        others = [src for src, dst, _ in mounts if dst != "/certs"]
        assert others == ([] if name != "party0" else ["./mpcache/assets/bundled"]), name  # only party 0: the model
        if name != "client":
            assert s["healthcheck"]["test"][:2] == ["CMD", "mpcache-health"], name
    assert services["party0"]["environment"]["MPCACHE_MODEL"] == "/model"
    assert all(mount(v)[2] for v in services["party0"]["volumes"])  # read-only
    assert services["client"]["depends_on"] == {p: {"condition": "service_healthy"} for p in ("party0", "party1")}
    client = services["client"]["environment"]
    assert (client["MPCACHE_KV_CACHE"], client["MPCACHE_BUDGET"], client["MPCACHE_KNOBS"]) == ("mpcache", "64", "")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "torch==2.13.0" in dockerfile and "--no-deps crypten==0.4.1" in dockerfile
    assert "COPY docker" not in dockerfile  # the wheel folder is bind-mounted into the pip steps, never copied
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "mpcache/assets/bundled/model.safetensors" in ignored  # no weights in the image


def test_the_smollm2_override_changes_only_the_model(compose):
    folder = "/somewhere/smollm2"
    merged = load("docker-compose.yml", "docker-compose.smollm2.yml", env={"MPCACHE_SMOLLM2_DIR": folder})
    services = merged["services"]
    assert set(services) == set(compose["services"])
    assert [mount(v)[:2] for v in services["party0"]["volumes"]] == [("certs-party0", "/certs"), (folder, "/model")]
    assert [mount(v)[1] for v in services["party1"]["volumes"]] == ["/certs"]
    client = [mount(v) for v in services["client"]["volumes"]]
    assert {src for src, _, _ in client} == {"certs-client"} | {
        f"{folder}/{f}" for f in ("config.json", "tokenizer.json", "tokenizer_config.json")
    }  # config and tokenizer, never the weights
    assert all(ro for _, _, ro in client)
    assert services["client"]["environment"]["MPCACHE_MODEL"] == "/tokenizer"
    for name in ("setup", "dealer"):
        assert services[name]["volumes"] == compose["services"][name]["volumes"]


class LocalCompose:
    """Runs compose services as processes; every string goes through `rewrite` (hosts, ports, mount paths)."""

    def __init__(self, compose: dict, workdir: Path) -> None:
        self.services = compose["services"]
        self.workdir = workdir
        ports = sorted({int(m.group(2)) for m in ADDRESS.finditer(yaml.safe_dump(compose))})
        self.ports = dict(zip(ports, free_ports(len(ports))))
        self.procs: dict[str, subprocess.Popen] = {}
        self.tops = {name: self.make_root(name) for name in self.services}

    def volume(self, name: str) -> Path:
        return self.workdir / "volumes" / name

    def make_root(self, name: str) -> set[str]:
        """The service's own filesystem view: each mount target a link to its volume or bind source."""
        tops = set()
        for spec in self.services[name].get("volumes", []):
            source, target, _ = mount(spec)
            real = (REPO / source).resolve() if is_bind(source) else self.volume(source)
            real.mkdir(parents=True, exist_ok=True)
            link = self.workdir / "root" / name / target.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(real, target_is_directory=True)
            tops.add(target.strip("/").split("/")[0])
        return tops

    def rewrite(self, name: str, text: str) -> str:
        text = ADDRESS.sub(lambda m: f"127.0.0.1:{self.ports[int(m.group(2))]}", str(text))
        for top in self.tops[name]:
            text = re.sub(rf"(?<![\w.])/{top}\b", str(self.workdir / "root" / name / top), text)
        return text

    def argv(self, name: str, command: list[str]) -> list[str]:
        exe, *rest = [self.rewrite(name, c) for c in command]
        exe = sys.executable if exe == "python" else str(BIN / exe)
        return [exe, *rest]

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MPCACHE_")}
        env.update({k: self.rewrite(name, v) for k, v in (self.services[name].get("environment") or {}).items()})
        return env

    def start(self, name: str) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        out = subprocess.PIPE if name == "client" else log
        argv = self.argv(name, self.services[name]["command"])
        self.procs[name] = subprocess.Popen(argv, env=self.env(name), stdout=out, stderr=log, cwd=self.workdir)
        log.close()

    def healthy(self, name: str) -> bool:
        test = self.services[name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        argv = self.argv(name, test[1:])
        return subprocess.run(argv, env=self.env(name), capture_output=True, timeout=60).returncode == 0

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


@pytest.mark.timeout(900)
def test_compose_services_run_the_private_demo_to_the_expected_answer(compose, tmp_path):
    local = LocalCompose(compose, tmp_path)
    try:
        local.up(deadline=time.monotonic() + 400)
        client_out, _ = local.procs["client"].communicate(timeout=600)
        out = client_out.decode()
        assert local.procs["client"].returncode == 0, out + local.log("client")
        codes = {name: proc.wait(120) for name, proc in local.procs.items()}
    finally:
        local.down()
    assert codes == dict.fromkeys(local.services, 0), {n: local.log(n) for n, c in codes.items() if c}
    result = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    assert result["match"] and result["text"].lstrip().startswith(result["expected"]), out
    assert "KV cache: mpcache (budget 64)" in out and result["decode_bytes_per_token"] > 0
    assert "mutual TLS" in local.log("dealer")
    for role in ROLES:  # each role's volume: the CA certificate and its own certificate and key, nothing else
        files = sorted(p.name for p in local.volume(f"certs-{role}").iterdir())
        assert files == ["ca.pem", f"{role}.key", f"{role}.pem"], role
    assert sorted(p.name for p in local.volume("ca").iterdir()) == ["ca.key", "ca.pem"]
