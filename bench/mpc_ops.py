"""Rounds, bytes, dealer bytes and time of the private numerics and layers, beside CrypTen's defaults.

    python -m bench.mpc_ops                 # markdown tables on stdout
    python -m bench.mpc_ops --json ops.json
    python -m bench.mpc_ops --per-row --json bench/results/mpc_per_row.json   # the per-row reciprocal / 1/sqrt only

Two local parties (mpcache.mpc.transport.local, gRPC on loopback), tuples and FSS keys from the in-process dealer
(numerics.LocalDealer, which counts what a dealer process would send each party). Counts are per party (a round =
one communicator call; online bytes = CrypTen's counter, what the party sends plus what it receives; dealer bytes =
correlated randomness the party gets from the dealer), read on party 0, party 1's dealer bytes beside; "per elem"
divides by the op's input elements. Times are one party's wall clock on this machine, with both parties sharing its
cores; with FSS comparisons they include the in-process key generation (each party runs the dealer's keygen for
both parties' keys, as LocalDealer does; a dealer process would do it once, ahead of time).

First table: the comparison-based protocols side by side with FSS keys ("fss") and CrypTen's adder ("crypten").
Second: the rest of the numerics and layers (comparisons with FSS keys, the decoder's default).
`--per-row`: the per-row nonlinearities on the domains the bundled model declares (its norms' inverse square root,
the softmax's reciprocal of the row sum): the comparison ladders + Newton against the octave + table (arith/lut.py),
with the max relative error against plaintext over the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Transformer
from mpcache.mpc.arith import lut
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.nn import layers as L
from mpcache.mpc.transport.local import LocalParties


def _measure(name: str, fn, elements: int, exact: bool, **tags) -> dict:
    crypten = N.crypten
    crypten.cfg.mpc.provider = N.PROVIDER_NAME if exact else "TFP"
    crypten.cfg.communicator.verbose = True
    before = N.counters()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    cost = {k: v - before[k] for k, v in N.counters().items()}
    crypten.cfg.communicator.verbose = False
    crypten.cfg.mpc.provider = N.PROVIDER_NAME
    return dict(op=name, elements=elements, **cost, seconds=seconds, **tags)


def _comparisons() -> list[dict]:
    """Party function: the comparison-based protocols with each comparison protocol (same inputs, same order)."""
    from mpcache.mpc.caches.mpcache import bucket_one_hot

    crypten = N.crypten
    g = torch.Generator().manual_seed(0)
    enc = lambda t: crypten.cryptensor(t, src=0)  # noqa: E731
    x = enc(torch.randn(4096, generator=g) * 4)
    rows_of = {n: enc(torch.randn(8, n, generator=g) * 3) for n in (128, 1024, 4096)}
    logits = enc(torch.randn(1, 264, generator=g) * 5)
    clusters = enc(torch.randn(4, 256, generator=g) * 20)  # 4 KV heads' cluster scores
    ops = [
        ("one comparison (less_than)", lambda: N.less_than(x, [0.0], N.VALUE_BOUND), 4096),
        ("ReLU (comparison + select)", lambda: N.relu(x), 4096),
        *[(f"max over {n} (8 rows)", lambda v=v: N.row_max(v), v.numel()) for n, v in rows_of.items()],
        ("argmax over 264 (one-hot)", lambda: N.argmax(logits), 264),
        ("top-16 of 256 clusters (bucketed, 4 heads)", lambda: bucket_one_hot(clusters, 16), clusters.numel()),
        ("SiLU", lambda: N.silu(x), 4096),
    ]
    for mode in ("fss", "crypten"):  # warm-up: first calls (the compiled key generation's cache, CrypTen's paths)
        with N.comparisons(mode):
            N.relu(x)
    rows = []
    for name, fn, elements in ops:
        for mode in ("fss", "crypten"):
            with N.comparisons(mode):
                rows.append(_measure(name, fn, elements, True, comparisons=mode))
    return rows


def _ops() -> list[dict]:
    """Party function: every measurement, in the same order on both parties."""
    crypten = N.crypten
    g = torch.Generator().manual_seed(0)
    enc = lambda t, src=0: crypten.cryptensor(t, src=src)  # noqa: E731
    x, y = enc(torch.randn(4096, generator=g)), enc(torch.randn(4096, generator=g), 1)
    neg = enc(-torch.rand(4096, generator=g) * 20)
    pos = enc(torch.rand(64, generator=g) * 500 + 0.5)
    var = enc(torch.rand(64, generator=g) * 1000 + 0.1)
    a, w = enc(torch.randn(64, 256, generator=g)), enc(torch.randn(256, 256, generator=g) / 16)
    scores = enc(torch.randn(8, 1, 128, generator=g) * 3)
    long_scores = enc(torch.randn(8, 1, 1024, generator=g) * 3)
    logits = enc(torch.randn(1, 264, generator=g) * 5)
    bound = 12.0
    rows = []
    for exact in (True, False):
        tag = "" if exact else " [CrypTen local truncation]"
        rows += [
            _measure("mul" + tag, lambda: x * y, 4096, exact),
            _measure("matmul 64x256 @ 256x256" + tag, lambda: a @ w, 64 * 256, exact),
        ]
    rows += [
        _measure("truncation (x / 2^16)", lambda: N.rescale(x, 16), 4096, True),
        _measure("less_than, 1 threshold", lambda: N.less_than(x, [0.0], N.VALUE_BOUND), 4096, True),
        _measure("exp_neg", lambda: N.exp_neg(neg), 4096, True),
        _measure("exp_range (no comparison)", lambda: N.exp_range(neg), 4096, True),
        _measure("CrypTen exp", lambda: neg.exp(), 4096, True),
        _measure("gelu", lambda: N.gelu(x), 4096, True),
        _measure("silu", lambda: N.silu(x), 4096, True),
        _measure("reciprocal [0.5, 512]", lambda: N.reciprocal(pos, 0.5, 512), 64, True),
        _measure("CrypTen reciprocal", lambda: pos.reciprocal(), 64, True),
        _measure("inv_sqrt [2^-6, 2^14]", lambda: N.inv_sqrt(var, 2**-6, 2**14, scale_bits=6), 64, True),
        _measure("CrypTen inv_sqrt", lambda: var.inv_sqrt(), 64, True),
        _measure("row_max 8x128 (tournament)", lambda: N.row_max(scores), 1024, True),
        _measure("CrypTen max(dim) 8x128", lambda: scores.max(dim=-1, keepdim=True)[0], 1024, True),
        _measure("softmax 8x128 (max)", lambda: N.softmax(scores), 1024, True),
        _measure("softmax 8x128 (max, exp_range)", lambda: N.softmax(scores, score_range=64.0), 1024, True),
        _measure("softmax 8x128 (bound)", lambda: N.softmax(scores, bound=bound), 1024, True),
        _measure("softmax 8x128 (bound, exp_range)", lambda: N.softmax(scores, None, bound, 64.0), 1024, True),
        _measure("softmax 8x1024 (max, exp_range)", lambda: N.softmax(long_scores, score_range=64.0), 8192, True),
        _measure("CrypTen softmax 8x128", lambda: scores.softmax(-1), 1024, True),
        _measure("argmax over 264 (one-hot)", lambda: N.argmax(logits), 264, True),
        _measure("CrypTen argmax over 264", lambda: logits.argmax(-1), 264, True),
    ]
    return rows


def _bundled_like(prompt: int) -> list[dict]:
    """Layers and one decode step of a model shaped like the bundled one (random weights)."""
    crypten = N.crypten
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=264, n_layer=4, n_head=8, n_kv_head=4, d_model=256, d_ff=768)
    model = Transformer(cfg).double().eval()
    pm = L.PrivateTransformer.from_plain(model, lambda t: crypten.cryptensor(t, src=0))
    ids = torch.randint(0, 264, (1, prompt), generator=torch.Generator().manual_seed(1))
    tokens = crypten.cryptensor(L.one_hot(ids, 264), src=1, precision=0)
    cache = L.PrivateKVCache(cfg.n_layer)
    x = crypten.cryptensor(torch.randn(1, 1, cfg.d_model), src=1)
    blk = pm.blocks[0]
    rows = [_measure(f"prefill {prompt} tokens, 4 layers", lambda: pm(tokens, cache), prompt, True)]
    rows.append(_measure("RMSNorm d=256, 1 token", lambda: blk.attn_norm(x), 256, True))
    rows.append(_measure("SwiGLU MLP 256->768, 1 token", lambda: blk.mlp(x), 256, True))
    side = L.PrivateKVCache(cfg.n_layer)  # a copy of layer 0's cache, so the decode step below is unaffected
    side.layers[0] = cache.layers[0]
    one = torch.ones(1, 1, dtype=torch.bool)
    attend = lambda: blk.attn(x, torch.tensor([[prompt]]), one, side)  # noqa: E731
    rows.append(_measure(f"attention decode, {prompt + 1} cached", attend, 8 * (prompt + 1), True))
    step = crypten.cryptensor(L.one_hot(ids[:, :1], 264), src=1, precision=0)
    step_fn = lambda: L.greedy_token(pm(step, cache), pm.options)  # noqa: E731
    rows.append(_measure("decode step (logits + argmax)", step_fn, 1, True))
    return rows


# (name, function, domain lo, hi, scale_bits, power): the bundled model's norms (d = 256: sum of squares 2^k larger,
# layers.norm_shifts k = 2, c = 13) and the softmax's row sum at 2048 entries with the row max subtracted
PER_ROW = [
    ("norm 1/sqrt: ladder 4/octave + 2 Newton (poly)", lambda v, *d: N.inv_sqrt(v, *d, 4, 2), 1.0, 2.0**34, 14, 0.5),
    ("norm 1/sqrt: ladder 32/octave + 1 Newton (lut before)", lambda v, *d: N.inv_sqrt(v, *d, 32, 1), 1.0, 2.0**34,
     14, 0.5),
    ("norm 1/sqrt: octave + 16-bit table (lut)", lut.inv_sqrt, 1.0, 2.0**34, 14, 0.5),
    ("softmax 1/sum: ladder 16/octave + 2 Newton (poly)", lambda v, *d: N.reciprocal(v, *d, 16, 2), 0.5, 2069.48, 12,
     1.0),
    ("softmax 1/sum: ladder 32/octave + 1 Newton (lut before)", lambda v, *d: N.reciprocal(v, *d, 32, 1), 0.5,
     2069.48, 12, 1.0),
    ("softmax 1/sum: octave + 16-bit table (lut)", lut.reciprocal, 0.5, 2069.48, 12, 1.0),
]  # fmt: skip


def _per_row(rows: int) -> list[dict]:
    """Party function: PER_ROW on `rows` log-uniform values of each domain (the same on both parties)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for name, fn, lo, hi, scale_bits, power in PER_ROW:
        x = torch.exp(torch.empty(rows, 1, dtype=torch.float64).uniform_(math.log(lo), math.log(hi), generator=g))
        shared = N.crypten.cryptensor(x, src=0)
        result = {}

        def run(fn=fn, shared=shared, lo=lo, hi=hi, scale_bits=scale_bits, result=result) -> None:
            result["y"] = fn(shared, lo, hi, scale_bits)

        row = _measure(name, run, rows, True, domain=[lo, hi], scale_bits=scale_bits)
        ref = 2.0**scale_bits * x**-power
        rel = (N.decode(result["y"]) - ref).abs() / ref
        worst = int(rel.argmax())
        out.append({**row, "max_rel_error": float(rel[worst]), "worst_x": float(x.flatten()[worst])})
    return out


def per_row_table(rows: list[dict]) -> str:
    lines = ["| op | rows | rounds | online B per row | dealer B per row (p0 / p1) | max rel error (at x) | ms/row |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        n = r["elements"]
        lines.append(
            f"| {r['op']} | {n} | {r['rounds']} | {r['bytes'] / n:,.0f} | {r['dealer_bytes'] / n:,.0f} / "
            f"{r['dealer_bytes_party1'] / n:,.0f} | {r['max_rel_error']:.2e} ({r['worst_x']:.4g}) | "
            f"{1e3 * r['seconds'] / n:.1f} |"
        )
    return "\n".join(lines)


def _both(parties: LocalParties, fn, *args) -> list[dict]:
    """Party 0's rows, with party 1's dealer bytes beside each."""
    p0, p1 = parties.run(fn, *args)
    return [{**a, "dealer_bytes_party1": b["dealer_bytes"]} for a, b in zip(p0, p1)]


def comparison_table(rows: list[dict]) -> str:
    """The comparison rows as one markdown table, FSS and CrypTen side by side (per element: online bytes, dealer
    bytes of party 0 / party 1, microseconds)."""
    head = "| op | elements |" + "".join(
        f" {m} rounds | {m} online B | {m} dealer B (p0 / p1) | {m} us |" for m in ("fss", "crypten")
    )
    lines = [head, "|---|---:|" + "---:|" * 8]
    by_op: dict[str, dict] = {}
    for r in rows:
        by_op.setdefault(r["op"], {})[r["comparisons"]] = r
    for op, modes in by_op.items():
        n = next(iter(modes.values()))["elements"]
        cells = []
        for m in ("fss", "crypten"):
            r = modes[m]
            dealer = f"{r['dealer_bytes'] / n:,.0f} / {r['dealer_bytes_party1'] / n:,.0f}"
            cells += [str(int(r["rounds"])), f"{r['bytes'] / n:,.1f}", dealer, f"{1e6 * r['seconds'] / n:,.1f}"]
        lines.append(f"| {op} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=32, help="prompt length of the bundled-shape model")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--per-row", type=int, nargs="?", const=64, default=0, metavar="ROWS",
                        help="only the per-row reciprocal / inverse square root table (ROWS rows, default 64)")
    args = parser.parse_args()
    if args.per_row:
        with LocalParties(setup=N.install, timeout=3600) as parties:
            rows = _both(parties, _per_row, args.per_row)
        print(per_row_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"command": f"python -m bench.mpc_ops --per-row {args.per_row}", "per_row": rows}, f,
                          indent=1)
        return
    with LocalParties(setup=N.install, timeout=3600) as parties:
        compared = _both(parties, _comparisons)
        rows = _both(parties, _ops) + _both(parties, _bundled_like, args.prompt)
    print(comparison_table(compared) + "\n")
    print("| op | elements | rounds | bytes (party 0) | bytes per elem | dealer bytes per elem (p0 / p1) | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        per, n = r["bytes"] / r["elements"], r["elements"]
        dealer = f"{r['dealer_bytes'] / n:,.0f} / {r['dealer_bytes_party1'] / n:,.0f}"
        print(f"| {r['op']} | {n} | {r['rounds']} | {r['bytes']:,} | {per:,.0f} | {dealer} | {r['seconds']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"comparisons": compared, "ops": rows}, f, indent=1)


if __name__ == "__main__":
    main()
