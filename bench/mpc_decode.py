"""Private decoding cost per generated token at a given cached length: latency, rounds and bytes per party.

    python -m bench.mpc_decode --method full --seq-lens 512,1024 --link lan,wan --json decode.json

Two party processes over gRPC (mpcache.mpc.grpc_comm, exact truncation tuples from the in-process dealer) run
`--steps` greedy decode steps of the private model after a cache of `seq_len` tokens. Links: "loopback" (the real
transport, always measured and printed beside), "lan" = 1 ms RTT / 1 Gbit/s and "wan" = 40 ms RTT / 100 Mbit/s,
emulated by the communicator (rtt/2 + bytes*8/bandwidth per message on top of loopback; bench.comm_link checks it).

Shortcut, stated in every row (`cache`: "plaintext prefill, then shared"): the cache of length n is built by a
plaintext prefill of random tokens at party 0 and then secret-shared, because a private prefill of thousands of
tokens takes too long on this machine; the decode steps measured after it are fully private (secret one-hot token,
shared weights and cache). Rounds and bytes are party 0's CrypTen counters for one decode step (both directions;
the parties' traffic is symmetric); latency is party 0's mean wall time per decode step. Models: the bundled model
and "paper", the MPCache paper's efficiency setting (1 layer, hidden 1024, 32 heads, SiLU, GPT-2 layout; random
weights; byte vocabulary of 264 so the LM head stays small).

Methods plug in through METHODS: a name -> (budget -> factory of the private cache for one decode run); "full" is
the whole cache. Eviction methods (mpcache, streamingllm, h2o) add an entry returning their private cache class.
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
from collections.abc import Callable
from pathlib import Path

LINKS = {"loopback": (0.0, math.inf), "lan": (1.0, 1000.0), "wan": (40.0, 100.0)}
PAPER = dict(
    family="gpt2", vocab_size=264, n_layer=1, n_head=32, n_kv_head=32, d_model=1024, d_ff=4096,
    activation="silu", max_position=8192,
)  # fmt: skip
CACHE_NOTE = "plaintext prefill, then shared"


def _full(budget: int | None) -> Callable:
    """The whole cache: the private cache is the shared prefill itself, no eviction."""

    def factory(private_cache):
        return private_cache

    return factory


METHODS: dict[str, Callable[[int | None], Callable]] = {"full": _full}


def build_model(name: str, seed: int = 0):
    import torch

    from mpcache.model.config import ModelConfig
    from mpcache.model.loading import load_bundled
    from mpcache.model.transformer import Transformer

    if name == "bundled":
        return load_bundled(dtype=torch.float64)[0]
    if name == "paper":
        torch.manual_seed(seed)
        return Transformer(ModelConfig(**PAPER)).double().eval()
    raise ValueError(f"unknown model {name!r}; expected bundled or paper")


def party(rank: int, args: dict) -> None:
    """One party: for every link, join a fresh session; for every model and length, time the decode steps."""
    import torch

    from mpcache.model.cache import KVCache
    from mpcache.mpc import decoder
    from mpcache.mpc import layers as L
    from mpcache.mpc import numerics as N
    from mpcache.mpc.accounting import Ledger, summarize
    from mpcache.mpc.grpc_comm import crypten, init_party

    torch.set_num_threads(1)
    rows = []
    for i, link in enumerate(args["links"]):
        rtt, bw = LINKS[link]
        emulate = link != "loopback"
        comm = init_party(
            rank, 2, args["peers"][i], f"decode-{i}", rtt_ms=rtt if emulate else None,
            bandwidth_mbps=bw if emulate else None, timeout_s=600.0,
        )  # fmt: skip
        N.install()
        crypten.cfg.communicator.verbose = True
        share = lambda t: crypten.cryptensor(t, src=0)  # noqa: E731 - party 0 is the model owner
        for model_name in args["models"]:
            model = build_model(model_name)
            config = model.config
            pm = decoder.share_model(model, share)
            for n in args["seq_lens"]:
                plain = None
                if rank == 0:
                    ids = torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                    plain = KVCache(config.n_layer)
                    with torch.no_grad():
                        model(ids, plain)
                shapes = [(1, config.n_kv_head, n, config.head_dim)] * config.n_layer
                cache = METHODS[args["method"]](args["budget"])(decoder.share_cache(plain, config, shapes, share))
                token = crypten.cryptensor(L.one_hot(torch.tensor([[1]]), config.vocab_size), src=1, precision=0)
                if n == args["seq_lens"][0]:  # warm-up (first use of this model's code paths), not timed
                    token = L.greedy_token(pm(token, cache, last_only=True))
                comm.barrier()
                with Ledger(comm.get_communication_stats) as ledger:
                    for _ in range(args["steps"]):
                        ledger.begin_step("decode")
                        token = L.greedy_token(pm(token, cache, last_only=True))
                        ledger.end_step()
                last = ledger.steps[-1]
                rows.append({
                    "method": args["method"], "seq_len": n, "link": link, "model": model_name,
                    "latency_s": statistics.mean(s["seconds"] for s in ledger.steps),
                    "rounds": last["rounds"], "bytes_per_party": last["bytes"], "budget": args["budget"],
                    "cache": CACHE_NOTE, "steps": args["steps"], "by_op": summarize([last]),
                })  # fmt: skip
                print(f"party {rank}: {link} {model_name} n={n}: {rows[-1]['latency_s']:.2f} s", flush=True)
        crypten.uninit()
    Path(args["out"].format(rank=rank)).write_text(json.dumps(rows))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["model"], r["link"], r["method"]) for r in rows}):
        sel = sorted((r for r in rows if (r["model"], r["link"], r["method"]) == key), key=lambda r: r["seq_len"])
        axes[0].plot([r["seq_len"] for r in sel], [r["latency_s"] for r in sel], "o-", label="/".join(key))
    for key in sorted({(r["model"], r["method"]) for r in rows}):
        sel = sorted((r for r in rows if (r["model"], r["method"]) == key and r["link"] == "loopback"),
                     key=lambda r: r["seq_len"])  # fmt: skip
        mib = [r["bytes_per_party"] / 2**20 for r in sel]
        axes[1].plot([r["seq_len"] for r in sel], mib, "o-", label="/".join(key))
    axes[0].set(xlabel="cached tokens", ylabel="seconds per token", xscale="log", yscale="log", title="latency")
    axes[1].set(xlabel="cached tokens", ylabel="MiB per party per token", xscale="log", title="communication")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mpc_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="full", help=f"comma-separated, from {sorted(METHODS)}")
    parser.add_argument("--budget", type=int, default=None, help="cache budget in tokens (eviction methods)")
    parser.add_argument("--seq-lens", default="512,1024", help="cached lengths, comma-separated")
    parser.add_argument("--link", default="lan,wan", help=f"comma-separated, from {sorted(LINKS)}; loopback always")
    parser.add_argument("--models", default="bundled,paper", help="bundled and/or paper")
    parser.add_argument("--steps", type=int, default=2, help="decode steps timed per length")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--plot", type=Path, default=None, help="write a plot here (default: next to --json)")
    parser.add_argument("--party", type=int, help=argparse.SUPPRESS)  # internal: run one party
    parser.add_argument("--args", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.party is not None:
        party(opts.party, json.loads(opts.args.read_text()))
        return 0
    try:
        seq_lens = [int(v) for v in opts.seq_lens.split(",")]
    except ValueError:
        parser.error(f"--seq-lens must be comma-separated integers, got {opts.seq_lens!r}")
    links = ["loopback"] + [v for v in opts.link.split(",") if v and v != "loopback"]
    methods, models = opts.method.split(","), opts.models.split(",")
    bad = [v for v in links if v not in LINKS] + [m for m in methods if m not in METHODS]
    bad += [m for m in models if m not in ("bundled", "paper")]
    if bad:
        parser.error(f"unknown link/method/model {bad}; links {sorted(LINKS)}, methods {sorted(METHODS)}")
    if any(n < 1 for n in seq_lens) or opts.steps < 1:
        parser.error("--seq-lens and --steps must be positive")
    if max(seq_lens) + opts.steps > PAPER["max_position"]:
        parser.error(f"--seq-lens must stay below {PAPER['max_position'] - opts.steps}")

    from mpcache.mpc.launcher import free_ports

    rows = []
    for method in methods:
        with tempfile.TemporaryDirectory() as tmp:
            ports = free_ports(2 * len(links))
            peers = [[f"127.0.0.1:{ports[2 * i]}", f"127.0.0.1:{ports[2 * i + 1]}"] for i in range(len(links))]
            args = dict(links=links, peers=peers, models=models, seq_lens=seq_lens, steps=opts.steps, method=method,
                        budget=opts.budget, out=f"{tmp}/rank{{rank}}.json")  # fmt: skip
            Path(tmp, "args.json").write_text(json.dumps(args))
            cmd = [sys.executable, "-m", "bench.mpc_decode", "--args", f"{tmp}/args.json", "--party"]
            t0 = time.perf_counter()
            procs = [subprocess.Popen([*cmd, str(rank)]) for rank in range(2)]
            if any(p.wait() != 0 for p in procs):
                print("a party failed; see its output above", file=sys.stderr)
                return 1
            rows += json.loads(Path(tmp, "rank0.json").read_text())
            print(f"{method}: measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    print(f"cache of length n: {CACHE_NOTE}; per decode step, party 0's counters; links {LINKS}")
    header = f"{'method':<8} {'model':<8} {'link':<9} {'seq_len':>7} {'latency s':>10} {'rounds':>7} {'MiB/party':>10}"
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: (r["method"], r["model"], r["seq_len"], list(LINKS).index(r["link"]))):
        print(
            f"{r['method']:<8} {r['model']:<8} {r['link']:<9} {r['seq_len']:>7} {r['latency_s']:>10.3f} "
            f"{r['rounds']:>7} {r['bytes_per_party'] / 2**20:>10.2f}"
        )
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    plot_path = opts.plot or (opts.json.with_suffix(".png") if opts.json else None)
    if plot_path:
        try:
            plot(rows, plot_path)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
