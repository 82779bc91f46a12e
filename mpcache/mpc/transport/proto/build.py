"""Regenerate the gRPC stubs from protos/mpcache.proto: `python -m mpcache.mpc.transport.proto.build [--check]`.

The stubs are committed so that the package runs without grpcio-tools; this script is the one way to make
them, so the output is a pure function of the .proto file and the pinned grpcio-tools version.
protoc writes `import mpcache_pb2` (a top-level import); it is rewritten to a relative import so the stubs
live inside the package.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
PROTO_DIR = REPO / "protos"
PROTO_NAME = "mpcache.proto"
OUT_DIR = Path(__file__).resolve().parent
GENERATED = ("mpcache_pb2.py", "mpcache_pb2.pyi", "mpcache_pb2_grpc.py")


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on `proto_dir/mpcache.proto` into `out_dir`; return the written files."""
    try:
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("grpcio-tools is needed to regenerate the stubs: pip install -e '.[test]'") from e
    if not (proto_dir / PROTO_NAME).is_file():
        raise FileNotFoundError(f"{proto_dir / PROTO_NAME} not found")
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types, as `python -m grpc_tools.protoc`
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_dir / PROTO_NAME),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    grpc_file = out_dir / "mpcache_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed = re.sub(r"^import mpcache_pb2 as", "from . import mpcache_pb2 as", text, flags=re.M)
    if fixed == text:
        raise RuntimeError("protoc output changed shape: no top-level `import mpcache_pb2` to make relative")
    grpc_file.write_text(fixed)
    return [out_dir / name for name in GENERATED]


def stale_files(out_dir: Path = OUT_DIR) -> list[str]:
    """Names of committed stubs that differ from a fresh generation (empty list = up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f.name
            for f in fresh
            if not (out_dir / f.name).is_file() or (out_dir / f.name).read_bytes() != f.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        print("stubs up to date" if not stale else f"stale stubs: {', '.join(stale)}")
        return 1 if stale else 0
    for path in generate(OUT_DIR):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
