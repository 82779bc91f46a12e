"""Throughput and sizes of the FSS primitives (mpcache.mpc.fss): comparisons (DCF) and table lookups (DPF).

    nice -n 10 python -m bench.fss                       # full run: batches 10^5 and 10^6, JSON in bench/results
    python -m bench.fss --sizes 20000 --lut-sizes 2000 --json /tmp/fss.json     # quick look

One thread (OMP_NUM_THREADS=1, numpy and OpenSSL are single-threaded here). Per row: the dealer's key generation
(compare_gen / lut_gen, drawing both parties' randomness from their AES-CTR streams) and ONE party's online work
(its masking step and its key evaluation on the opened value), as elements per second of CPU time of this process
("per core": other jobs on a shared machine stretch wall time, not CPU time; wall-clock rates are recorded too).
Sizes: `dealer B` is what the dealer sends each party per element (the correction words, the same bytes to both;
the party derives its root and mask share from its seed), `full key B` adds the root and mask share for a dealer
that ships whole keys, `online B` is one party's opening message per element (one round). AES blocks per element
are counted from the construction (dealer: 8 per DCF level; party: 2 per DCF level, 1 per DPF level).

Key generation before / after: the dealer's tree walk as numpy passes (tree.FUSED_WALK = False, the reference)
and as one compiled pass per level (fss/fused.py, the default), same keys bit for bit.

Sweeps: the DCF's early-termination width at n = 32 (why dcf.LEAF_BITS = 2), the full-domain DPF's at n = 8, 12,
16 (why lut.LEAF_BITS), and the chunk size of the DCF walk (why tree.CHUNK).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from mpcache.mpc.fss import compare, dcf, lut, masked, tree
from mpcache.mpc.fss.prg import SEED_KEY, AesStream, permute
from mpcache.mpc.fss.tree import Corrections

SEEDS = (b"bench-fss-seed-0", b"bench-fss-seed-1")


def _timed(fn):
    """(result, cpu seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def _best(fn, repeat: int):
    """Best CPU time (and the wall time of that run) over `repeat` calls; returns the last result."""
    best = (None, float("inf"), float("inf"))
    for _ in range(repeat):
        out, cpu, wall = _timed(fn)
        if cpu < best[1]:
            best = (out, cpu, wall)
    return best


def aes_rate(blocks: int = 1 << 16, repeat: int = 50) -> float:
    """Fixed-key AES-ECB blocks per CPU second through `cryptography` (the PRG's raw speed on this core)."""
    data = np.random.default_rng(0).integers(0, 2**63, (blocks, 2), dtype=np.uint64)
    out = np.empty(data.size + 2, np.uint64)
    _, cpu, _ = _timed(lambda: [permute(data, SEED_KEY, out) for _ in range(repeat)])
    return blocks * repeat / cpu


def comparison_row(n: int, count: int, repeat: int, leaf_bits: int = dcf.LEAF_BITS, check: bool = True) -> dict:
    rng = np.random.default_rng(n)
    x = rng.integers(-(1 << (n - 2)), 1 << (n - 2), count) if n < 64 else rng.integers(-(2**62), 2**62, count)
    x0 = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    x1 = (x.astype(np.uint64) - x0.astype(np.uint64)).view(np.int64)
    gen = lambda: compare.compare_gen(n, count, AesStream(SEEDS[0]), AesStream(SEEDS[1]), leaf_bits)  # noqa: E731
    (k0, k1), gen_cpu, gen_wall = _best(gen, repeat)
    y = masked.reconstruct(compare.compare_mask(k0, x0), compare.compare_mask(k1, x1), n)
    online = lambda: (compare.compare_mask(k0, x0), compare.compare_eval(k0, y))  # noqa: E731
    (_, z0), ev_cpu, ev_wall = _best(online, repeat)
    z = z0.astype(np.uint64) + compare.compare_eval(k1, y).astype(np.uint64)
    assert not check or np.array_equal(z, (x < 0).astype(np.uint64)), "comparison bench produced wrong shares"
    depth = n - 1 - min(leaf_bits, n - 1)
    dealer_b = Corrections.message_size("dcf", n - 1, min(leaf_bits, n - 1), count) / count
    return dict(
        gate="compare", n=n, count=count, leaf_bits=leaf_bits,
        keygen_per_s=count / gen_cpu, eval_per_s=count / ev_cpu,
        keygen_per_s_wall=count / gen_wall, eval_per_s_wall=count / ev_wall,
        dealer_bytes=dealer_b, full_key_bytes=dealer_b + 16 + 8, online_bytes=masked.message_bytes(n),
        aes_dealer=8 * depth + 2 * max(1, (1 << leaf_bits) // 2), aes_party=2 * depth + 1,
    )


def lut_row(n: int, count: int, repeat: int, leaf_bits: int | None = None) -> dict:
    leaf_bits = lut.LEAF_BITS[n] if leaf_bits is None else leaf_bits
    rng = np.random.default_rng(n)
    table = rng.integers(-(2**40), 2**40, 1 << n)
    x = rng.integers(0, 1 << n, count)
    x0 = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    x1 = (x.astype(np.uint64) - x0.astype(np.uint64)).view(np.int64)
    gen = lambda: lut.lut_gen(n, count, AesStream(SEEDS[0]), AesStream(SEEDS[1]), leaf_bits)  # noqa: E731
    (k0, k1), gen_cpu, gen_wall = _best(gen, repeat)
    y = masked.reconstruct(lut.lut_mask(k0, x0), lut.lut_mask(k1, x1), n)
    online = lambda: (lut.lut_mask(k0, x0), lut.lut_eval(k0, y, table))  # noqa: E731
    (_, z0), ev_cpu, ev_wall = _best(online, repeat)
    assert np.array_equal((z0.astype(np.uint64) + lut.lut_eval(k1, y, table).astype(np.uint64)).view(np.int64),
                          table[x]), "lookup bench produced wrong shares"
    dealer_b = Corrections.message_size("dpf", n, leaf_bits, count) / count
    return dict(
        gate="lut", n=n, count=count, leaf_bits=leaf_bits,
        keygen_per_s=count / gen_cpu, eval_per_s=count / ev_cpu,
        keygen_per_s_wall=count / gen_wall, eval_per_s_wall=count / ev_wall,
        dealer_bytes=dealer_b, full_key_bytes=dealer_b + 16 + 8, online_bytes=masked.message_bytes(n),
        aes_dealer=4 * (n - leaf_bits) + 2 * max(1, (1 << leaf_bits) // 2),
        aes_party=2 * ((1 << (n - leaf_bits)) - 1) + (1 << n) // 2,
    )


def walk_rows(bits: list[int], count: int, repeat: int) -> list[dict]:
    """Comparison rows with the numpy reference walk (before) and the compiled walk (after), side by side."""
    rows, saved = [], tree.FUSED_WALK
    try:
        for n in bits:
            for fused_walk in (False, True):
                tree.FUSED_WALK = fused_walk
                rows.append(dict(comparison_row(n, count, repeat), walk="compiled" if fused_walk else "numpy"))
    finally:
        tree.FUSED_WALK = saved
    return rows


def without_aes_row(n: int, count: int, repeat: int) -> dict:
    """The same comparison row with the AES calls replaced by a plain copy: what the numpy around AES costs."""
    real = tree.permute, dcf.permute  # the compiled walk calls AES through tree.permute

    def copy(blocks, key=SEED_KEY, out=None):
        out = np.empty(blocks.size + 2, np.uint64) if out is None else out
        out[: blocks.size] = blocks.reshape(-1)
        return out[: blocks.size].reshape(blocks.shape)

    tree.permute = dcf.permute = copy
    try:
        return dict(comparison_row(n, count, repeat, check=False), gate="compare, AES -> copy")
    finally:
        tree.permute, dcf.permute = real


def chunk_rows(n: int, count: int, chunks: list[int], repeat: int) -> list[dict]:
    rows, saved = [], tree.CHUNK
    try:
        for c in chunks:
            tree.CHUNK = c
            rows.append(dict(comparison_row(n, count, repeat), chunk=c))
    finally:
        tree.CHUNK = saved
    return rows


def _rate(v: float) -> str:
    return f"{v / 1e6:.2f} M" if v >= 1e5 else f"{v / 1e3:.1f} k"


def table(rows: list[dict], title: str, extra: str | None = None) -> str:
    head = ["gate", "n", "batch", "leaf bits"] + ([extra] if extra else [])
    head += ["keygen /s", "eval /s (1 party)", "dealer B/elem", "full key B", "online B/party", "AES dealer/party"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["gate"], r["n"], f"{r['count']:,}", r["leaf_bits"]] + ([r[extra]] if extra else [])
        cells += [_rate(r["keygen_per_s"]), _rate(r["eval_per_s"]), f"{r['dealer_bytes']:.1f}",
                  f"{r['full_key_bytes']:.1f}", r["online_bytes"], f"{r['aes_dealer']} / {r['aes_party']}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comparison batch sizes")
    parser.add_argument("--bits", default="16,32,64", help="comparison bit widths")
    parser.add_argument("--lut-bits", default="8,12,16")
    parser.add_argument("--lut-sizes", default="100000,10000,1000", help="lookup batch size per --lut-bits entry")
    parser.add_argument("--sweep-size", type=int, default=100000, help="batch of the leaf-bits and chunk sweeps")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per row")
    parser.add_argument("--no-sweeps", action="store_true")
    parser.add_argument("--json", default="bench/results/fss.json")
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        os.environ["OMP_NUM_THREADS"] = "1"  # numpy here is single-threaded anyway; keep any BLAS out of it

    started = time.perf_counter()
    load = os.getloadavg()
    aes = aes_rate()
    print(f"fixed-key AES-ECB: {aes / 1e6:.0f} M blocks per CPU second (load average at start {load[0]:.1f})")
    rows = [comparison_row(n, count, args.repeat) for n in map(int, args.bits.split(","))
            for count in map(int, args.sizes.split(","))]
    lut_bits = list(map(int, args.lut_bits.split(",")))
    lut_sizes = list(map(int, args.lut_sizes.split(",")))
    rows += [lut_row(n, count, args.repeat) for n, count in zip(lut_bits, lut_sizes)]
    print(table(rows, "Comparisons and lookups (rates per CPU second, one thread)"))
    walks = walk_rows(list(map(int, args.bits.split(","))), args.sweep_size, args.repeat)
    print("\n" + table(walks, "Key generation: numpy passes (before) and the compiled walk (after)", extra="walk"))
    out = dict(aes_blocks_per_s=aes, load_average_start=load, rows=rows, walks=walks, python=platform.python_version(),
               numpy=np.__version__, command="python -m bench.fss " + " ".join(argv or []))
    if not args.no_sweeps:
        sweep = args.sweep_size
        leaf = [comparison_row(32, sweep, args.repeat, lb) for lb in (1, 2, 3, 4)]
        print("\n" + table(leaf, "DCF early termination at n = 32 (comparison of 32-bit values: a 31-bit DCF)"))
        lut_leaf = [lut_row(n, max(100, count // 5), args.repeat, lb) for n, count in zip(lut_bits, lut_sizes)
                    for lb in (2, 3, 4, 5, 6, 7) if lb <= n]
        print("\n" + table(lut_leaf, "Full-domain DPF early termination (lookups)"))
        chunks = chunk_rows(32, sweep, [1024, 2048, 4096, 8192, 16384, 32768], args.repeat)
        print("\n" + table(chunks, "Chunk size of the DCF walk at n = 32", extra="chunk"))
        profile = [comparison_row(n, sweep, args.repeat) for n in (16, 32)]
        profile += [without_aes_row(n, sweep, args.repeat) for n in (16, 32)]
        print("\n" + table(profile, "Where the time goes: the same rows with AES replaced by a copy"))
        out.update(leaf_sweep=leaf, lut_leaf_sweep=lut_leaf, chunk_sweep=chunks, profile=profile)
    out["load_average_end"] = os.getloadavg()
    out["seconds"] = time.perf_counter() - started
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json} ({out['seconds']:.0f} s; load average at end {out['load_average_end'][0]:.1f})")


if __name__ == "__main__":
    main()
