"""`dealer`: serve seeds and Beaver-tuple corrections to the two computing parties (mpcache/mpc/dealer/).

    dealer --listen 127.0.0.1:50700 --certs certs --session demo [--sessions 1] [--party-timeout 30]

--session names the sessions this dealer serves (comma-separated; `*` = any name, a session then opens at its
first registration and expires unless every party joins within --party-timeout). Sessions are isolated: an
aborted session, a stray registration or a party with another session name never ends the dealer or another
session. With --sessions N the dealer exits after N sessions that every party joined: 0 if all closed cleanly, 1 if
one was aborted (a party went silent or reported a failure; the message names the party). SIGTERM aborts the live
sessions (their parties hear why on their next heartbeat) and exits 0.
"""

from __future__ import annotations

import queue
import sys
import time

from mpcache.mpc.dealer import service as dealer
from parties.common import (
    Credentials,
    Fatal,
    Parser,
    Termination,
    add_common_flags,
    bound_memory,
    release_memory,
    run_main,
    setup_logging,
)

SETTLE_ON_TERM_S = 3.0  # at SIGTERM, how long the parties get to hear that their session ends
TRIM_EVERY_S = 1.0  # how often freed memory goes back to the OS (common.release_memory)


def parse(argv: list[str] | None) -> Parser:
    p = Parser(prog="dealer", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add("--listen", default="127.0.0.1:50700", help="address to serve on (0.0.0.0:PORT for every interface)")
    p.add("--party-timeout", default=30.0, type=float, help="seconds of silence after which a party is given up")
    p.add("--sessions", default=0, type=int, help="exit after this many sessions (0 = serve forever)")
    p.add("--mask-cache-mb", default=1024, type=int, help="memory for weight-stationary masks kept in plaintext")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    bound_memory()
    args = parse(argv)
    names = [n.strip() for n in args.session.split(",") if n.strip()]
    allowed = None if "*" in names else names
    log = setup_logging("dealer", ",".join(names) or "-", args.log_level)
    if not names:
        raise Fatal("--session needs at least one session name (or * for any)")
    if args.party_timeout <= 0:
        raise Fatal(f"--party-timeout must be > 0, got {args.party_timeout}")
    creds = Credentials("dealer", args)
    term = Termination().install()
    import mpcache.mpc.arith.numerics  # noqa: F401 - EXACT_TRUNCATION's math loads CrypTen: now, not in the first request

    ended: queue.Queue[tuple[str, str]] = queue.Queue()
    service = dealer.DealerService(
        require_roles=not args.insecure,
        party_timeout=args.party_timeout,
        on_session_end=lambda name, error: ended.put((name, error)),
        mask_cache_bytes=args.mask_cache_mb << 20,
        sessions=allowed,
    )
    server, port = dealer.serve(args.listen, service, creds.server())
    log.info("step=serve listening on %s (%s)", args.listen, "plaintext, INSECURE" if args.insecure else "mutual TLS")
    done, failures, trimmed = 0, [], time.monotonic()
    try:
        while args.sessions == 0 or done < args.sessions:
            if time.monotonic() - trimmed > TRIM_EVERY_S:
                release_memory()
                trimmed = time.monotonic()
            try:
                name, error = ended.get(timeout=0.2)
            except queue.Empty:
                if term:
                    _terminate(service, log, term.signal, args.party_timeout)
                    return 0
                continue
            done += 1
            if error:
                failures.append(f"session {name} aborted: {error}")
                log.error("step=session-end session %s aborted (%d/%s): %s", name, done, args.sessions or "inf", error)
            else:
                log.info("step=session-end session %s closed cleanly (%d/%s)", name, done, args.sessions or "inf")
        if failures:
            service.settle(name, args.party_timeout)  # the survivor of the last session hears why first
            raise Fatal(failures[-1])
    finally:
        service.stop()
        server.stop(grace=1.0)
    return 0


def _terminate(service: dealer.DealerService, log, signal_name: str, party_timeout: float) -> None:
    live = service.shut_down(f"the dealer was stopped ({signal_name})")
    log.info("step=terminate %s: ending %d live session(s) %s", signal_name, len(live), live)
    deadline = time.monotonic() + min(SETTLE_ON_TERM_S, party_timeout)
    for name in live:
        service.settle(name, max(deadline - time.monotonic(), 0.0))
    log.info("step=exit stopped by %s", signal_name)


def cli() -> None:
    sys.exit(run_main("dealer", main))


if __name__ == "__main__":
    cli()
