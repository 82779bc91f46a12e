"""What every role CLI shares: flags backed by environment variables, TLS flags, role-tagged logs, one-line errors.

Every flag `--some-flag` can also be set as `MPCACHE_SOME_FLAG` (a flag on the command line wins), so the same
entry points serve a shell, the local launcher and docker-compose.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from mpcache.mpc.transport import tls

ENV_PREFIX = "MPCACHE_"
MAX_JSON_BYTES = 64 << 10  # job parameters: public knobs, never data
MAX_JSON_DEPTH = 16


class Fatal(Exception):
    """An expected failure: printed as one line (no traceback) and the process exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


class Parser(argparse.ArgumentParser):
    """argparse whose `add(flag, ...)` defaults come from MPCACHE_<FLAG> environment variables."""

    def add(self, flag: str, *, default=None, type=str, help: str = "", **kwargs) -> None:
        env = env_name(flag)
        if env in os.environ:
            raw = os.environ[env]
            try:
                default = type(raw) if type is not bool else raw.lower() in ("1", "true", "yes", "on")
            except ValueError:
                self.error(f"environment variable {env}={raw!r} is not a valid {getattr(type, '__name__', type)}")
        if type is bool:
            self.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=bool(default), help=f"{help} [{env}]"
            )
        else:
            self.add_argument(flag, default=default, type=type, help=f"{help} [{env}]", **kwargs)


def add_tls_flags(p: Parser) -> None:
    p.add("--certs", default="certs", help="directory with ca.pem and <role>.pem/<role>.key (see mpcache-certs)")
    p.add("--tls-ca", default=None, help="CA certificate file (default: <certs>/ca.pem)")
    p.add("--tls-cert", default=None, help="this role's certificate file (default: <certs>/<role>.pem)")
    p.add("--tls-key", default=None, help="this role's private key file (default: <certs>/<role>.key)")
    p.add("--insecure", default=False, type=bool, help="plaintext gRPC, no authentication (development only)")


class Terminated(Exception):
    """SIGTERM arrived where the role stops at once (start-up): a clean exit 0."""


class Termination:
    """SIGTERM as a flag that the role's threads poll: the handler only assigns an attribute, because a handler that
    takes a lock can deadlock the main thread it interrupts (it may hold that very lock). Inside `raising()` (start-
    up, nothing to close gracefully yet) it raises Terminated in the main thread instead."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._raise = False

    def install(self) -> Termination:
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame) -> None:
        self.signal = signal.Signals(signum).name
        if self._raise:
            raise Terminated(f"stopped by {self.signal}")

    @contextlib.contextmanager
    def raising(self):
        self._raise = True
        try:
            if self.signal:
                raise Terminated(f"stopped by {self.signal}")
            yield
        finally:
            self._raise = False

    def __bool__(self) -> bool:
        return self.signal is not None


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 2


def bound_memory() -> None:
    """At a role's start: at most MALLOC_ARENAS malloc arenas (glibc; a no-op elsewhere). glibc gives every thread
    that allocates concurrently an arena of its own, so a role's resident memory would step up with the number of
    gRPC worker threads that ever ran at once (measured: +35-40 MB per party once 4 clients ran jobs together)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). glibc keeps what a large job
    freed mapped (its mmap threshold rises with every large buffer freed), so without this a long-running role's
    resident memory follows the largest job it ever ran, not what it holds now (bench/soak.py measures it)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux: getrusage's ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def host_of(address: str) -> str:
    """'host' of 'host:port' (brackets kept for IPv6)."""
    return address.rpartition(":")[0]


def parse_json(text: str, what: str, *, max_bytes: int | None = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """json.loads for text from outside: size and nesting limits checked before parsing (a deep document would
    exhaust the parser's recursion), only finite numbers (no NaN, Infinity or 1e400), integers of at most 64 bits.
    Raises ValueError naming `what` and the problem."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text, got {type(text).__name__}")
    if max_bytes is not None and len(text) > max_bytes:
        raise ValueError(f"{what} is {len(text)} characters long; at most {max_bytes} are accepted")
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:  # brackets outside strings; the parser itself would recurse once per level
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > max_depth:
                raise ValueError(f"{what} is nested more than {max_depth} levels deep")
        elif ch in "]}":
            depth -= 1

    def constant(name: str) -> Any:
        raise ValueError(f"{what} contains {name}; only finite numbers are accepted")

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{what} contains {text}, beyond the range of finite numbers")
        return value

    def integer(text: str) -> int:
        if len(text.lstrip("-")) > 19 or not -(2**63) <= int(text) < 2**63:
            raise ValueError(f"{what} contains the integer {text[:30]}, beyond 64 bits")
        return int(text)

    try:
        return json.loads(text, parse_constant=constant, parse_float=number, parse_int=integer)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def add_common_flags(p: Parser) -> None:
    p.add("--session", default="demo", help="session id shared by all roles of one run")
    p.add("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    add_tls_flags(p)


class Credentials:
    """This role's TLS material, or plaintext when --insecure; loaded at start so a missing file fails early."""

    def __init__(self, role: str, args: argparse.Namespace) -> None:
        self.role, self.insecure = role, args.insecure
        self.files = None
        if not args.insecure:
            default = tls.TlsFiles.in_dir(Path(args.certs), role)
            self.files = tls.TlsFiles(
                ca=Path(args.tls_ca or default.ca),
                cert=Path(args.tls_cert or default.cert),
                key=Path(args.tls_key or default.key),
            )
            self.files.read()  # raises TlsError naming the missing file

    def server(self) -> grpc.ServerCredentials | None:
        return None if self.files is None else tls.server_credentials(self.files)

    def channel(self) -> grpc.ChannelCredentials | None:
        return None if self.files is None else tls.channel_credentials(self.files)

    def channel_to(self, address: str, role: str, options: list | None = None) -> grpc.Channel:
        """A channel to `address` that (with TLS) only accepts a server holding `role`'s certificate."""
        options = list(options or [])
        if self.files is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, self.channel(), options=options + tls.channel_options(role))


class _RoleFilter(logging.Filter):
    def __init__(self, role: str, session: str) -> None:
        super().__init__()
        self.role, self.session = role, session

    def filter(self, record: logging.LogRecord) -> bool:
        record.role, record.session = self.role, self.session
        return True


def setup_logging(role: str, session: str, level: str = "INFO") -> logging.Logger:
    """Log lines say which role and session they come from; messages say the step (`step=...`)."""
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise Fatal(f"unknown log level {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter(role, session))
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d %(role)s session=%(session)s %(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(f"mpcache.{role}")


def _expected(error: BaseException) -> bool:
    from mpcache.mpc.dealer import service as dealer

    kinds: tuple[type[BaseException], ...] = (Fatal, tls.TlsError, OSError, dealer.DealerUnavailable)
    comm = sys.modules.get("mpcache.mpc.transport.grpc_comm")  # loaded by the parties only (it imports CrypTen)
    if comm is not None:
        kinds += (comm.CommError,)
    return isinstance(error, kinds)


def run_main(role: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a role's main; expected failures become one line `<role>: error: <why>` and a non-zero exit code."""
    try:
        return main(argv)
    except Terminated as e:
        print(f"{role}: {e}", file=sys.stderr, flush=True)
        return 0
    except KeyboardInterrupt:
        print(f"{role}: interrupted", file=sys.stderr, flush=True)
        return 130
    except grpc.RpcError as e:  # a call without its own handling: still one line, naming the status
        print(f"{role}: error: gRPC {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        if not _expected(e):
            raise
        print(f"{role}: error: {e}", file=sys.stderr, flush=True)
        return e.code if isinstance(e, Fatal) else 1
