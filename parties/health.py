"""`mpcache-health`: exit 0 if a role's server answers its health check as SERVING (for container health checks).

    mpcache-health --address 127.0.0.1:50702 --role party0 --certs /certs

A party reports SERVING once it has registered with the dealer and joined the other party, and NOT_SERVING with the
reason while its link to the other party or the dealer is in trouble; the dealer SERVING as soon as it listens. The
answer holds nothing else (no session name). The check presents the certificate of `--as` (default: the checked
role itself, i.e. the container's own).
"""

from __future__ import annotations

import sys

import grpc

from mpcache.mpc.transport import tls
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc
from parties.common import Credentials, Fatal, Parser, add_tls_flags, run_main


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="mpcache-health", description=__doc__.splitlines()[0])
    add_tls_flags(p)
    p.add("--address", default="127.0.0.1:50700", help="server to check")
    p.add("--role", default="dealer", choices=tls.ROLES, help="role the server must hold a certificate for")
    p.add("--as", dest="as_role", default=None, choices=tls.ROLES, help="certificate to present (default: --role)")
    p.add("--timeout", default=5.0, type=float, help="seconds")
    args = p.parse_args(argv)
    creds = Credentials(args.as_role or args.role, args)
    channel = creds.channel_to(args.address, args.role)
    try:
        reply = pb_grpc.HealthStub(channel).Check(pb.HealthRequest(), timeout=args.timeout)
    except grpc.RpcError as e:
        raise Fatal(f"{args.role} at {args.address}: {e.code().name}") from None
    finally:
        channel.close()
    status = pb.HealthResponse.ServingStatus.Name(reply.status)
    print(f"{args.role} at {args.address}: {status}" + (f" ({reply.reason})" if reply.reason else ""))
    return 0 if reply.status == pb.HealthResponse.SERVING else 1


def cli() -> None:
    sys.exit(run_main("health", main))


if __name__ == "__main__":
    cli()
