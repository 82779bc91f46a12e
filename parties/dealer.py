"""`dealer`: serve seeds and Beaver-tuple corrections to the two computing parties (mpcache/mpc/dealer/).

    dealer --listen 0.0.0.0:50700 --certs certs [--sessions 1] [--party-timeout 30]

With --sessions N the dealer exits after N sessions: 0 if all closed cleanly, 1 as soon as one is aborted
(a party went silent or reported a failure), with a message naming the party.
"""

from __future__ import annotations

import queue
import sys

from mpcache.mpc.dealer import service as dealer
from parties.common import Credentials, Fatal, Parser, add_common_flags, run_main, setup_logging


def parse(argv: list[str] | None) -> Parser:
    p = Parser(prog="dealer", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add("--listen", default="0.0.0.0:50700", help="address to serve on")
    p.add("--party-timeout", default=30.0, type=float, help="seconds of silence after which a party is given up")
    p.add("--sessions", default=0, type=int, help="exit after this many sessions (0 = serve forever)")
    p.add("--mask-cache-mb", default=1024, type=int, help="memory for weight-stationary masks kept in plaintext")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    log = setup_logging("dealer", args.session if args.sessions else "*", args.log_level)
    if args.party_timeout <= 0:
        raise Fatal(f"--party-timeout must be > 0, got {args.party_timeout}")
    creds = Credentials("dealer", args)
    import mpcache.mpc.arith.numerics  # noqa: F401 - EXACT_TRUNCATION's math loads CrypTen: now, not in the first request

    ended: queue.Queue[tuple[str, str]] = queue.Queue()
    service = dealer.DealerService(
        require_roles=not args.insecure,
        party_timeout=args.party_timeout,
        on_session_end=lambda name, error: ended.put((name, error)),
        mask_cache_bytes=args.mask_cache_mb << 20,
    )
    server, port = dealer.serve(args.listen, service, creds.server())
    log.info("step=serve listening on %s (%s)", args.listen, "plaintext, INSECURE" if args.insecure else "mutual TLS")
    done = 0
    try:
        while args.sessions == 0 or done < args.sessions:
            name, error = ended.get()
            done += 1
            if error:
                service.settle(name, args.party_timeout)
                raise Fatal(f"session {name} aborted: {error}")
            log.info("step=session-end session %s closed cleanly (%d/%s)", name, done, args.sessions or "inf")
    finally:
        service.stop()
        server.stop(grace=1.0)
    return 0


def cli() -> None:
    sys.exit(run_main("dealer", main))


if __name__ == "__main__":
    cli()
