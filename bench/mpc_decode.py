"""Private decoding cost per generated token at a given cached length: latency, rounds and bytes per party.

    python -m bench.mpc_decode --method full --seq-lens 512,1024 --link lan,wan --json decode.json

Two party processes over gRPC (mpcache.mpc.transport.grpc_comm, exact truncation tuples from the in-process dealer) run
`--steps` greedy decode steps of the private model after a cache of `seq_len` tokens. Links: "loopback" (the real
transport, always measured and printed beside), "lan" = 1 ms RTT / 1 Gbit/s and "wan" = 40 ms RTT / 100 Mbit/s,
emulated by the communicator (rtt/2 + bytes*8/bandwidth per message on top of loopback; bench.comm_link checks it).

Shortcut, stated in every row (`cache`: "plaintext prefill, then shared"): the cache of length n is built by a
plaintext prefill of random tokens at party 0 and then secret-shared, because a private prefill of thousands of
tokens takes too long on this machine; the decode steps measured after it are fully private (secret one-hot token,
shared weights and cache). `--private-prefill` removes the shortcut where it fits (`cache`: "private prefill,
blocks of B"): the same random tokens, secret-shared as one-hot rows, go through the private prefill in public
blocks of `--prefill-block` tokens (decoder.prefill) into the method's own empty cache (caches.private_cache, as
the generate job builds it: MPCache evicts statically after the last block), and the row keeps the prefill's cost
(`prefill`: rounds, bytes, dealer bytes, seconds of party 0, and per operation class in `by_op`; MPCache's static
eviction is its "selection"). `kept` is the cache's tokens per KV head (most over layers and heads) when the decode
steps start, either way.

Rounds, bytes (party 0's CrypTen counters: online, between the parties; their traffic is symmetric), dealer
bytes (correlated randomness from the dealer: party 0's, and party 1's in `dealer_bytes_party1`; the in-process
dealer counts what a dealer process would send) and latency (wall time) are party 0's means over the
`--steps` decode steps that follow one uncounted warm-up step at every length: the warm-up opens the adopted cache
against fresh dealer masks, a one-time cost like the private prefill's (`per_step` keeps each step). Models: the
bundled model, "paper", the MPCache paper's efficiency setting (1 layer, hidden 1024, 32 heads, SiLU, GPT-2 layout;
random weights; byte vocabulary of 264 so the LM head stays small), "smollm2" (SmolLM2-135M-Instruct) or any
checkpoint folder the plaintext loader reads: party 0 loads it, party 1 builds only its architecture from
config.json. `peak_rss_mib` / `peak_rss_mib_party1`: each party's peak resident memory so far (the in-process dealer
of this bench keeps every weight's mask in the clear at party 0: 8 bytes per weight more than a deployment's party 0).

Comparisons: `--comparisons fss` (default; one round from FSS keys, PrivateOptions.comparisons) and/or `crypten`
(CrypTen's adder), one row per protocol (`comparisons`; ratios to full within the same protocol). With FSS keys the
in-process dealer generates both parties' keys inside each party, inline: that time is part of the latency, and
`keygen_s` says how much of it (a dealer process would generate them once, ahead of the step). Nonlinearities:
`--nonlinear lut` (default; the softmax's exp, SiLU and GeLU from DPF lookup tables, PrivateOptions.nonlinear; FSS
comparisons only) and/or `poly` (the polynomials); the `cmp` column reads "fss+lut" for the former.

Methods plug in through METHODS: a name -> ((budget, **knobs) -> factory of the private cache for one decode run);
"full" is the whole cache; "mpcache", "streamingllm" and "h2o" adopt the shared n-token cache through their private
class's `adopt(cache, budget, **knobs)` (mpcache/mpc/caches/mpcache.py, mpcache/mpc/caches/baselines.py: each cuts
it publicly to the cache its one-time prompt eviction leaves; the decode steps measured are the method's own).
A method may carry knobs for ablations, `--method mpcache,mpcache:static_ratio=1.0,sink=8,h2o` (a comma-separated
item with "=" and no ":" continues the previous method's knobs; values parse as int, float, true/false or text);
the row's `method` is the whole label. Budgets: `--budget N` tokens per KV head, or `--budget-ratio r` (default 0.1
when a method other than full runs): budget = max(32, int(r x seq_len)), stored in each row with the ratio.

When "full" runs in the same invocation, a second table gives full / method for latency, rounds and bytes per
(model, link, seq_len) (rows: `vs_full`). `--accuracy PATH` (rows of `python -m bench.accuracy --json`) prints the
accuracy beside a row when the file holds rows with the same method label, context_len == seq_len and the same
budget: budget null for full; otherwise a float budget equal to the row's ratio or an int equal to its tokens. The
accuracy shown is the sample-weighted mean over the matching rows' tasks (`accuracy`, `accuracy_tasks` in the row);
bundled-model rows only (the paper configuration has random weights); blank when nothing matches (a knob variant
matches rows written by `bench.accuracy --label` with the same label).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mpcache.mpc.caches import PRIVATE_CACHES  # the private KV caches the generate job serves too

LINKS = {"loopback": (0.0, math.inf), "lan": (1.0, 1000.0), "wan": (40.0, 100.0)}
PAPER = dict(
    family="gpt2", vocab_size=264, n_layer=1, n_head=32, n_kv_head=32, d_model=1024, d_ff=4096,
    activation="silu", max_position=8192,
)  # fmt: skip
CACHE_NOTE = "plaintext prefill, then shared"
PRIVATE_NOTE = "private prefill, blocks of {block}"


def _full(budget: int | None, **knobs) -> Callable:
    """The whole cache: the private cache is the shared prefill itself, no eviction."""
    if knobs:
        raise TypeError(f"full takes no knobs, got {sorted(knobs)}")

    def factory(private_cache):
        return private_cache

    return factory


def _adopting(module: str, name: str) -> Callable[..., Callable]:
    """A method whose private cache class `module.name` (imported when first used) takes over the shared cache:
    cls.adopt(cache, budget, **knobs)."""

    def method(budget: int | None, **knobs) -> Callable:
        import importlib

        cls = getattr(importlib.import_module(module), name)

        def factory(private_cache):
            return cls.adopt(private_cache, budget, **knobs)

        return factory

    return method


METHODS: dict[str, Callable[..., Callable]] = {
    "full": _full,
    **{name: _adopting(module, cls) for name, (module, cls) in PRIVATE_CACHES.items()},
}
DEFAULT_RATIO = 0.1
MIN_BUDGET = 32


def _knob_value(text: str) -> int | float | bool | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_methods(text: str) -> list[tuple[str, str, dict]]:
    """'mpcache,mpcache:static_ratio=1.0,sink=8,h2o' -> [(label, name, knobs)]: an item with "=" and no ":"
    continues the previous method's knobs. Raises ValueError on an unknown name or a malformed knob."""
    specs: list[tuple[list[str], str, dict]] = []  # (label parts, name, knobs)
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item:
            if not specs:
                raise ValueError(f"knob {item!r} comes before any method")
            specs[-1][0].append(item)
            pair = item
        else:
            name, _, pair = item.partition(":")
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r}; methods {sorted(METHODS)}")
            specs.append(([item], name, {}))
        if pair:
            key, eq, value = pair.partition("=")
            if not eq or not key.isidentifier() or not value:
                raise ValueError(f"knob {pair!r} is not name=value")
            specs[-1][2][key] = _knob_value(value)
    return [(",".join(parts), name, knobs) for parts, name, knobs in specs]


def budget_for(seq_len: int, budget: int | None, ratio: float | None) -> int | None:
    """Tokens per KV head at this cached length: the given count, else max(32, int(ratio x seq_len))."""
    if budget is not None:
        return budget
    return None if ratio is None else max(MIN_BUDGET, int(ratio * seq_len))


def check_method(name: str, knobs: dict) -> None:
    """Fail before any party starts: adopt a small float (simulator) cache with these knobs."""
    import torch

    from mpcache.mpc.nn.layers import PrivateKVCache, PrivateLayerKV

    cache = PrivateKVCache(1)
    zeros = torch.zeros(1, 1, 96, 4, dtype=torch.float64)
    cache.layers[0] = PrivateLayerKV(zeros, zeros, torch.arange(96).expand(1, 1, 96), torch.ones(1, 1, 96) > 0)
    METHODS[name](MIN_BUDGET, **knobs)(cache)


def _protocol(row: dict) -> str:
    """The row's comparison protocol (rows measured before the option existed used CrypTen's), "+lut" when its
    nonlinearities came from lookup tables (rows without the field used the polynomials)."""
    return row.get("comparisons", "crypten") + ("+lut" if row.get("nonlinear") == "lut" else "")


def add_vs_full(rows: list[dict]) -> None:
    """rows[i]["vs_full"] = full / method for latency, rounds and bytes at the same (model, link, seq_len,
    comparisons, cache source), when "full" ran too."""
    key = lambda r: (r["model"], r["link"], r["seq_len"], _protocol(r), r.get("cache", CACHE_NOTE))  # noqa: E731
    full = {key(r): r for r in rows if r["method"] == "full"}
    for r in rows:
        base = full.get(key(r))
        if base is None or r["method"] == "full":
            continue
        r["vs_full"] = {
            "latency": base["latency_s"] / r["latency_s"],
            "rounds": base["rounds"] / r["rounds"],
            "bytes": base["bytes_per_party"] / r["bytes_per_party"],
        }


def add_accuracy(rows: list[dict], accuracy_rows: list[dict]) -> None:
    """Attach the sample-weighted mean accuracy of the matching bench.accuracy rows (module docstring's rule)."""

    def same_budget(acc: dict, row: dict) -> bool:
        b = acc.get("budget")
        if row["method"] == "full":
            return b is None
        if isinstance(b, float):
            return row.get("budget_ratio") is not None and math.isclose(b, row["budget_ratio"])
        return isinstance(b, int) and b == row["budget"]

    for row in rows:
        if row.get("model", "bundled") != "bundled":  # bench.accuracy measures the bundled model
            continue
        hits = [
            a for a in accuracy_rows
            if a.get("method") == row["method"] and a.get("context_len") == row["seq_len"] and same_budget(a, row)
        ]  # fmt: skip
        if hits:
            samples = sum(a.get("samples", 1) for a in hits)
            row["accuracy"] = sum(a["accuracy"] * a.get("samples", 1) for a in hits) / samples
            row["accuracy_tasks"] = sorted({a.get("task") for a in hits})


def check_model(name: str) -> None:
    """bundled, paper, smollm2 or a checkpoint folder the plaintext loader reads (its config.json); raises
    ValueError / FileNotFoundError before any party starts."""
    if name in ("bundled", "paper"):
        return
    from mpcache.model.loading import checkpoint_folder, model_config

    model_config(checkpoint_folder(name))


def build_model(name: str, rank: int = 0, seed: int = 0):
    """The model as party `rank` has it: the owner (0) loads the weights, party 1 only the architecture (meta
    tensors, shared with numerics.share_owned) except for the random "paper" model both build alike."""
    import torch

    from mpcache.model.config import ModelConfig
    from mpcache.model.loading import checkpoint_folder, load_bundled, load_model, model_config
    from mpcache.model.transformer import Transformer
    from mpcache.mpc.nn.decoder import architecture_only

    if name == "paper":
        torch.manual_seed(seed)
        return Transformer(ModelConfig(**PAPER)).double().eval()
    if rank != 0:
        return architecture_only(model_config(checkpoint_folder(name)))
    if name == "bundled":
        return load_bundled(dtype=torch.float64)[0]
    return load_model(name)[0]  # float32: shared one tensor at a time in float64


def party(rank: int, args: dict) -> None:
    """One party: for every link, join a fresh session; for every model and length, time the decode steps."""
    from mpcache.mpc.arith import numerics as N

    with N.comparisons(args["comparisons"]):  # adopting a cache (MPCache's cluster summaries) compares too
        _party(rank, args)


def _party(rank: int, args: dict) -> None:
    import resource

    import torch

    from mpcache.model.cache import KVCache
    from mpcache.mpc.arith import numerics as N
    from mpcache.mpc.arith.accounting import Ledger, summarize
    from mpcache.mpc.nn import decoder
    from mpcache.mpc.nn import layers as L
    from mpcache.mpc.transport.grpc_comm import crypten, init_party

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
        for model_name in args["models"]:
            model = build_model(model_name, rank)  # party 0 is the model owner
            config = model.config
            options = L.PrivateOptions(comparisons=args["comparisons"], nonlinear=args["nonlinear"])
            pm = decoder.share_model(model, N.share_owned, options)
            for n in args["seq_lens"]:
                ids = torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                budget = budget_for(n, args["budget"], args["budget_ratio"])
                prefill, note = None, CACHE_NOTE
                if args["private_prefill"]:
                    block = args["prefill_block"]
                    tokens = L.one_hot(ids, config.vocab_size) if rank == 0 else torch.zeros(1, n, config.vocab_size)
                    cache, prefill = private_prefill(pm, crypten.cryptensor(tokens, src=0, precision=0), args, budget)
                    note = PRIVATE_NOTE.format(block=block)
                else:
                    plain = None
                    if rank == 0:
                        plain = KVCache(config.n_layer)
                        with torch.no_grad():
                            model(ids, plain)
                    shapes = [(1, config.n_kv_head, n, config.head_dim)] * config.n_layer
                    method = METHODS[args["method"]](budget, **args["knobs"])
                    cache = method(decoder.share_cache(plain, config, shapes, N.share_owned))
                kept = max(int(cache.tokens_per_head(i).max()) for i in range(config.n_layer))
                token = crypten.cryptensor(L.one_hot(torch.tensor([[1]]), config.vocab_size), src=1, precision=0)
                # warm-up step, not counted: first use of the code paths, and the one-time opening of the adopted
                # cache against fresh dealer masks (full: the keys/values; mpcache: the gather's middle children)
                token = L.greedy_token(pm(token, cache, last_only=True), pm.options)
                comm.barrier()
                provider = crypten.mpc.get_default_provider()
                keygen0 = getattr(provider, "keygen_seconds", 0.0)
                with Ledger(N.counters) as ledger:
                    for _ in range(args["steps"]):
                        ledger.begin_step("decode")
                        token = L.greedy_token(pm(token, cache, last_only=True), pm.options)
                        ledger.end_step()
                keygen = (getattr(provider, "keygen_seconds", 0.0) - keygen0) / args["steps"]
                steps = ledger.steps
                by_op = {op: {k: v / len(steps) for k, v in c.items()} for op, c in summarize(steps).items()}
                rows.append({
                    "method": args["label"], "seq_len": n, "link": link, "model": model_name,
                    "comparisons": args["comparisons"], "nonlinear": args["nonlinear"],
                    "latency_s": statistics.mean(s["seconds"] for s in steps),
                    "rounds": round(statistics.mean(s["rounds"] for s in steps)),
                    "bytes_per_party": round(statistics.mean(s["bytes"] for s in steps)),
                    "dealer_bytes_per_party": round(statistics.mean(s["dealer_bytes"] for s in steps)),
                    "keygen_s": keygen, "budget": budget, "kept": kept, "prefill": prefill,
                    "budget_ratio": args["budget_ratio"], "cache": note, "steps": args["steps"],
                    "per_step": [{k: s[k] for k in ("rounds", "bytes", "dealer_bytes", "seconds")} for s in steps],
                    "by_op": by_op, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                })  # fmt: skip
                print(f"party {rank}: {link} {model_name} n={n}: {rows[-1]['latency_s']:.2f} s", flush=True)
        crypten.uninit()
    Path(args["out"].format(rank=rank)).write_text(json.dumps(rows))


def private_prefill(pm, tokens, args: dict, budget: int | None) -> tuple:
    """The method's own empty private cache (caches.private_cache, as the generate job builds it) filled by the
    private prefill of the secret one-hot `tokens` [1, n, V] in blocks of args["prefill_block"]; returns it and
    the prefill's cost at this party (rounds, bytes, dealer bytes, seconds)."""
    from mpcache.mpc.arith import numerics as N
    from mpcache.mpc.arith.accounting import Ledger, summarize
    from mpcache.mpc.caches import private_cache
    from mpcache.mpc.nn import decoder

    spec = None if args["method"] == "full" else {"method": args["method"], "budget": budget, "knobs": args["knobs"]}
    cache = private_cache(pm.config.n_layer, spec)
    with Ledger(N.counters) as ledger:
        ledger.begin_step("prefill")
        decoder.prefill(pm, tokens, cache, args["prefill_block"])
        step = ledger.end_step()
    return cache, {**{k: step[k] for k in ("rounds", "bytes", "dealer_bytes", "seconds")}, "by_op": summarize([step])}


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


def _print_table(header: str, lines: list[str]) -> None:
    print(header)
    print("-" * len(header))
    print("\n".join(lines))


def print_tables(rows: list[dict]) -> None:
    """The rows, then the private prefills (when run) and (when full ran) full / method ratios."""
    w = max([8, *(len(r["method"]) for r in rows)])
    order = sorted(
        rows, key=lambda r: (r["method"], r["model"], r["seq_len"], _protocol(r), list(LINKS).index(r["link"]))
    )
    notes = "; ".join(sorted({r.get("cache", CACHE_NOTE) for r in rows}))
    print(f"cache of length n: {notes}; per decode step, party 0's counters; links {LINKS}")
    header = (
        f"{'method':<{w}} {'model':<8} {'cmp':<7} {'link':<9} {'seq_len':>7} {'budget':>6} {'latency s':>10} "
        f"{'rounds':>7} {'MiB/party':>10} {'dealer MiB p0/p1':>17} {'accuracy':>8}"
    )
    _print_table(header, [
        f"{r['method']:<{w}} {r['model']:<8} {_protocol(r):<7} {r['link']:<9} {r['seq_len']:>7} "
        f"{'-' if r.get('budget') is None else str(r['budget']):>6} {r['latency_s']:>10.3f} {r['rounds']:>7} "
        f"{r['bytes_per_party'] / 2**20:>10.2f} {_dealer(r):>17} "
        f"{'' if r.get('accuracy') is None else format(r['accuracy'], '.2f'):>8}"
        for r in order
    ])  # fmt: skip
    prefills = [r for r in order if r.get("prefill")]
    if prefills:
        print("\nprivate prefill of the n cached tokens (party 0's counters)")
        header = f"{'method':<{w}} {'model':<8} {'link':<9} {'seq_len':>7} {'cache':<30} {'kept':>5} {'rounds':>7} "
        header += f"{'MiB/party':>10} {'dealer MiB p0':>13} {'seconds':>8}"
        _print_table(header, [
            f"{r['method']:<{w}} {r['model']:<8} {r['link']:<9} {r['seq_len']:>7} {r['cache']:<30} {r['kept']:>5} "
            f"{p['rounds']:>7} {p['bytes'] / 2**20:>10.2f} {p['dealer_bytes'] / 2**20:>13.1f} {p['seconds']:>8.1f}"
            for r in prefills
            for p in [r["prefill"]]
        ])  # fmt: skip
    ratios = [r for r in order if "vs_full" in r]
    if ratios:
        print("\nfull / method (higher: the method is cheaper)")
        header = (
            f"{'method':<{w}} {'model':<8} {'cmp':<7} {'link':<9} {'seq_len':>7} {'latency':>8} {'rounds':>7} "
            f"{'bytes':>7}"
        )
        _print_table(header, [
            f"{r['method']:<{w}} {r['model']:<8} {_protocol(r):<7} {r['link']:<9} {r['seq_len']:>7} "
            f"{r['vs_full']['latency']:>8.2f} {r['vs_full']['rounds']:>7.2f} {r['vs_full']['bytes']:>7.2f}"
            for r in ratios
        ])  # fmt: skip


def _dealer(row: dict) -> str:
    """Dealer MiB per party and token, party 0 / party 1 ("-" for rows measured before it was counted)."""
    if "dealer_bytes_per_party" not in row:
        return "-"
    return f"{row['dealer_bytes_per_party'] / 2**20:.2f} / {row.get('dealer_bytes_party1', 0) / 2**20:.2f}"


def markdown(rows: list[dict]) -> str:
    """One markdown table: a row per (model, link, seq_len, method) with the ratios to full beside it."""
    order = sorted(
        rows,
        key=lambda r: (
            r["model"], _protocol(r), list(LINKS).index(r["link"]), r["seq_len"], r["method"] != "full", r["method"]
        ),
    )  # fmt: skip
    lines = [
        "| model | comparisons | link | n | method | budget | rounds | MiB/party | dealer MiB p0 / p1 | latency s | "
        "full/method bytes | full/method rounds | full/method latency | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in order:
        v = r.get("vs_full")
        ratios = [f"{v[k]:.2f}" for k in ("bytes", "rounds", "latency")] if v else ["-"] * 3
        acc = "" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        budget = "-" if r.get("budget") is None else str(r["budget"])
        lines.append(
            f"| {r['model']} | {_protocol(r)} | {r['link']} | {r['seq_len']} | {r['method']} | {budget} | "
            f"{r['rounds']} | {r['bytes_per_party'] / 2**20:.2f} | {_dealer(r)} | {r['latency_s']:.2f} | "
            + " | ".join(ratios) + f" | {acc} |"
        )
    return "\n".join(lines) + "\n"


def report(rows: list[dict], opts: argparse.Namespace, accuracy_rows: list[dict] | None) -> None:
    """Ratios, accuracy, the printed tables and the requested files (JSON, markdown, plot)."""
    add_vs_full(rows)
    if accuracy_rows is not None:
        add_accuracy(rows, accuracy_rows)
    print_tables(rows)
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    if opts.markdown:
        opts.markdown.write_text(markdown(rows))
    plot_path = opts.plot or (opts.json.with_suffix(".png") if opts.json else None)
    if plot_path:
        try:
            plot(rows, plot_path)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mpc_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="full", help=f"comma-separated, from {sorted(METHODS)}")
    parser.add_argument("--budget", type=int, default=None, help="cache budget in tokens (eviction methods)")
    parser.add_argument(
        "--budget-ratio", type=float, default=None,
        help=f"budget = max({MIN_BUDGET}, int(ratio x seq_len)); default {DEFAULT_RATIO} without --budget",
    )  # fmt: skip
    parser.add_argument(
        "--accuracy", type=Path, nargs="+", default=None, help="bench.accuracy JSON file(s): accuracy beside rows"
    )
    parser.add_argument("--seq-lens", default="512,1024", help="cached lengths, comma-separated")
    parser.add_argument("--link", default="lan,wan", help=f"comma-separated, from {sorted(LINKS)}; loopback always")
    parser.add_argument(
        "--models", default="bundled,paper", help="comma-separated: bundled, paper, smollm2, checkpoint folders"
    )
    parser.add_argument("--comparisons", default="fss", help="comma-separated comparison protocols: fss, crypten")
    parser.add_argument(
        "--nonlinear", default="lut", help="comma-separated: lut (DPF tables, needs fss), poly (polynomials)"
    )
    parser.add_argument("--steps", type=int, default=2, help="decode steps timed per length")
    parser.add_argument(
        "--private-prefill", action="store_true",
        help="build each cache by a private blockwise prefill instead of a plaintext prefill that is then shared",
    )  # fmt: skip
    parser.add_argument("--prefill-block", type=int, default=128, help="with --private-prefill: tokens per block")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--plot", type=Path, default=None, help="write a plot here (default: next to --json)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the rows as a markdown table here")
    parser.add_argument(
        "--render", type=Path, nargs="+", default=None,
        help="measure nothing: report the rows of these --json files together (ratios to full, --accuracy)",
    )  # fmt: skip
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
    models = opts.models.split(",")
    try:
        methods = parse_methods(opts.method)
    except ValueError as error:
        parser.error(str(error))
    protocols = [v for v in opts.comparisons.split(",") if v]
    if not protocols or set(protocols) - {"fss", "crypten"}:
        parser.error(f"--comparisons takes fss and/or crypten, got {opts.comparisons!r}")
    nonlinears = [v for v in opts.nonlinear.split(",") if v]
    if not nonlinears or set(nonlinears) - {"lut", "poly"}:
        parser.error(f"--nonlinear takes lut and/or poly, got {opts.nonlinear!r}")
    variants = [(p, v) for p in protocols for v in nonlinears if not (p == "crypten" and v == "lut")]
    if not variants:
        parser.error("lookup tables (--nonlinear lut) need --comparisons fss")
    bad = [v for v in links if v not in LINKS]
    if bad or not methods:
        parser.error(f"unknown link {bad} or no method; links {sorted(LINKS)}, methods {sorted(METHODS)}")
    for name in models:
        try:
            check_model(name)
        except (OSError, ValueError) as error:
            parser.error(f"--models {name}: {error}")
    if any(n < 1 for n in seq_lens) or opts.steps < 1 or opts.prefill_block < 1:
        parser.error("--seq-lens, --steps and --prefill-block must be positive")
    if opts.budget is not None and opts.budget_ratio is not None:
        parser.error("give --budget or --budget-ratio, not both")
    if opts.budget is not None and opts.budget < 1:
        parser.error("--budget must be >= 1")
    if opts.budget_ratio is not None and not 0 < opts.budget_ratio <= 1:
        parser.error("--budget-ratio must be in (0, 1]")
    ratio = opts.budget_ratio
    if ratio is None and opts.budget is None and any(name != "full" for _, name, _ in methods):
        ratio = DEFAULT_RATIO
    for label, name, knobs in methods:
        try:
            check_method(name, knobs)
        except (TypeError, ValueError) as error:
            parser.error(f"method {label!r}: {error}")
    accuracy_rows = None
    if opts.accuracy is not None:
        accuracy_rows = []
        for path in opts.accuracy:
            try:
                accuracy_rows += json.loads(path.read_text())
            except (OSError, ValueError) as error:
                parser.error(f"--accuracy {path}: {error}")
    if opts.render:
        rows = []
        for path in opts.render:
            try:
                rows += json.loads(path.read_text())
            except (OSError, ValueError) as error:
                parser.error(f"--render {path}: {error}")
        for row in rows:  # recomputed against the full rows of all the files
            row.pop("vs_full", None)
        report(rows, opts, accuracy_rows)
        return 0
    if max(seq_lens) + opts.steps > PAPER["max_position"]:
        parser.error(f"--seq-lens must stay below {PAPER['max_position'] - opts.steps}")

    from mpcache.mpc.transport.ports import free_ports

    rows = []
    for (label, method, knobs), (protocol, nonlinear) in itertools.product(methods, variants):
        with tempfile.TemporaryDirectory() as tmp:
            ports = free_ports(2 * len(links))
            peers = [[f"127.0.0.1:{ports[2 * i]}", f"127.0.0.1:{ports[2 * i + 1]}"] for i in range(len(links))]
            budget, budget_ratio = (None, None) if method == "full" else (opts.budget, ratio)
            args = dict(links=links, peers=peers, models=models, seq_lens=seq_lens, steps=opts.steps, method=method,
                        knobs=knobs, label=label, budget=budget, budget_ratio=budget_ratio, comparisons=protocol,
                        nonlinear=nonlinear, private_prefill=opts.private_prefill, prefill_block=opts.prefill_block,
                        out=f"{tmp}/rank{{rank}}.json")  # fmt: skip
            Path(tmp, "args.json").write_text(json.dumps(args))
            cmd = [sys.executable, "-m", "bench.mpc_decode", "--args", f"{tmp}/args.json", "--party"]
            t0 = time.perf_counter()
            procs = [subprocess.Popen([*cmd, str(rank)]) for rank in range(2)]
            if any(p.wait() != 0 for p in procs):
                print("a party failed; see its output above", file=sys.stderr)
                return 1
            party1 = json.loads(Path(tmp, "rank1.json").read_text())
            for row, other in zip(json.loads(Path(tmp, "rank0.json").read_text()), party1, strict=True):
                extra = {"dealer_bytes_party1": other["dealer_bytes_per_party"]}
                rows.append({**row, **extra, "peak_rss_mib_party1": other["peak_rss_mib"]})
            print(f"{label} ({protocol}): measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    report(rows, opts, accuracy_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
