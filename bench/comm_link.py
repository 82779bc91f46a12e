"""GrpcCommunicator on real loopback vs emulated links: time per workload beside what the link model predicts.

    python -m bench.comm_link                      # loopback, LAN (1 ms, 1 Gbit/s), WAN (40 ms, 100 Mbit/s)
    python -m bench.comm_link --links 0:inf,10:200 --repeats 5 --json comm_link.json

Two party processes (separate OS processes, as in a deployment) run each workload `--repeats` times per link.
"loopback" is the real transport; an emulated link adds, per message, rtt/2 + bytes*8/bandwidth on the
receiving side (mpcache/mpc/transport/grpc_comm.py). The "model" column predicts the emulated time as
    loopback time + messages x rtt/2 + wire bytes x 8 / bandwidth,
counting what rank 0 sent (the workloads are symmetric, so it receives as much). With two parties a round is
one message each way, so this is rounds x rtt/2 + bytes/bandwidth. "time" is the mean of the two parties'
medians: parties that exchange in lockstep settle at some offset d < rtt/2 from each other, and then one sees
rtt/2 + d per round and the other rtt/2 - d (a real network does the same), so only the mean is comparable with
the model. Both parties share this machine's cores, so loopback numbers include compute and are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpcache.mpc.transport.ports import free_ports

WORKLOADS = ("all_reduce 1 x int64", "all_reduce 1M x int64", "crypten mul 8x64", "crypten softmax 8x64")


def parse_links(text: str) -> list[tuple[float, float]]:
    """'0:inf,40:100' -> [(rtt_ms, bandwidth_mbps), ...]; 0:inf is the real loopback (no emulation)."""
    links = []
    for item in text.split(","):
        try:
            rtt, bw = item.split(":")
            links.append((float(rtt), float(bw)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"links must look like 'rtt_ms:mbps,...', got {item!r}") from None
        if links[-1][0] < 0 or not links[-1][1] > 0:
            raise argparse.ArgumentTypeError(f"rtt must be >= 0 and bandwidth > 0, got {item!r}")
    if links[0] != (0.0, math.inf):
        links.insert(0, (0.0, math.inf))  # the model needs the loopback baseline
    return links


def link_name(rtt: float, bw: float) -> str:
    return "loopback" if (rtt, bw) == (0.0, math.inf) else f"{rtt:g} ms / {bw:g} Mbit/s"


def workloads(comm, crypten, torch) -> dict:
    """Name -> zero-argument callable; the names are WORKLOADS."""
    x = crypten.cryptensor(torch.randn(8, 64), src=0)
    y = crypten.cryptensor(torch.randn(8, 64), src=1)
    small, big = torch.ones(1, dtype=torch.long), torch.ones(2**20, dtype=torch.long)
    return dict(
        zip(
            WORKLOADS,
            (lambda: comm.all_reduce(small), lambda: comm.all_reduce(big), lambda: x * y, lambda: x.softmax(-1)),
        )
    )


def party(rank: int, args: dict) -> None:
    """One party: for every link, join a fresh session and time every workload."""
    import torch

    from mpcache.mpc.transport.grpc_comm import crypten, init_party

    crypten.cfg.communicator.verbose = True
    results = []
    for i, (rtt, bw) in enumerate(args["links"]):
        emulate = (rtt, bw) != (0.0, math.inf)
        comm = init_party(
            rank,
            2,
            args["peers"][i],
            f"bench-{i}",
            rtt_ms=rtt if emulate else None,
            bandwidth_mbps=bw if emulate else None,
        )
        torch.manual_seed(rank)
        for name, fn in workloads(comm, crypten, torch).items():
            fn()  # warm-up
            times = []
            for _ in range(args["repeats"]):
                comm.barrier()
                before = comm.get_communication_stats()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                # own counters only: the peer's messages can land before our snapshot, its sends are symmetric
                stats = {k: v - before[k] for k, v in comm.get_communication_stats().items()}
            results.append({"link": [rtt, bw], "workload": name, "seconds": statistics.median(times), **stats})
        crypten.uninit()
    Path(args["out"].format(rank=rank)).write_text(json.dumps(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", type=parse_links, default=parse_links("0:inf,1:1000,40:100"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--party", type=int, help=argparse.SUPPRESS)  # internal: run one party
    parser.add_argument("--args", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.party is not None:
        party(opts.party, json.loads(opts.args.read_text()))
        return 0
    if opts.repeats < 1:
        parser.error("--repeats must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        ports = free_ports(2 * len(opts.links))
        peers = [[f"127.0.0.1:{ports[2 * i]}", f"127.0.0.1:{ports[2 * i + 1]}"] for i in range(len(opts.links))]
        args = {"links": opts.links, "peers": peers, "repeats": opts.repeats, "out": f"{tmp}/rank{{rank}}.json"}
        args_file = Path(tmp, "args.json")
        args_file.write_text(json.dumps(args))
        cmd = [sys.executable, "-m", "bench.comm_link", "--args", str(args_file), "--party"]
        procs = [subprocess.Popen([*cmd, str(rank)]) for rank in range(2)]
        if any(p.wait() != 0 for p in procs):
            print("a party failed; see its output above", file=sys.stderr)
            return 1
        rows = json.loads(Path(tmp, "rank0.json").read_text())
        for row, other in zip(rows, json.loads(Path(tmp, "rank1.json").read_text())):
            row["seconds_rank0"], row["seconds_rank1"] = row["seconds"], other["seconds"]
            row["seconds"] = (row["seconds"] + other["seconds"]) / 2

    base = {r["workload"]: r["seconds"] for r in rows if tuple(r["link"]) == (0.0, math.inf)}
    header = (
        f"{'link':<22} {'workload':<24} {'rounds':>6} {'msgs':>5} {'wire bytes':>12} "
        f"{'r0 s':>8} {'r1 s':>8} {'time s':>8} {'model s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rtt, bw = r["link"]
        model = base[r["workload"]] + r["wire_messages_sent"] * rtt / 2000 + r["wire_bytes_sent"] * 8 / (bw * 1e6)
        r["model_seconds"] = model
        print(
            f"{link_name(rtt, bw):<22} {r['workload']:<24} {r['rounds']:>6} {r['wire_messages_sent']:>5} "
            f"{r['wire_bytes_sent']:>12} {r['seconds_rank0']:>8.4f} {r['seconds_rank1']:>8.4f} {r['seconds']:>8.4f} "
            f"{model:>8.4f}"
        )
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
