"""Private prefill cost per prompt length: rounds, online MiB, dealer MiB, time and peak memory per party.

    python -m bench.mpc_prefill --lengths 256,512,1024,2048 --block 128 --json bench/results/mpc_prefill.json

Two local parties (mpcache.mpc.transport.local: separate processes over gRPC on loopback, keys and tuples from the
in-process dealer, numerics.LocalDealer, which counts what a dealer process would send each party) run the private
prefill of a passkey prompt of each length on the bundled model: the prompt is fed in public blocks of `--block`
tokens (decoder.prefill), so the attention holds block x length scores at a time and memory stays bounded. The
prompt's one-hot rows are shared by party 0 (the client's sharing is not counted; it moves one share per token).
Rows: party 0's counters over the prefill (rounds = communicator calls; MiB = CrypTen's byte counter, both
directions, as bench.mpc_decode reports it; dealer MiB = key and tuple corrections to party 0 / party 1), wall time,
peak RSS of each party process, the first generated token against plaintext, and the max |logit difference| of
the last position against the plaintext model, and the same counters per operation class (accounting.OPS).
`--nonlinear poly` measures the polynomial path for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

PASSKEY = "The pass key is 48213. Remember it. 48213 is the pass key. "
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is "


def passkey_ids(length: int) -> torch.Tensor:
    """A byte-level passkey prompt of exactly `length` tokens: the key, filler, the question."""
    head, tail = PASSKEY.encode(), QUESTION.encode()
    if length < len(head) + len(tail):
        raise ValueError(f"a passkey prompt needs at least {len(head) + len(tail)} tokens, got {length}")
    body = (FILLER.encode() * (length // len(FILLER) + 1))[: length - len(head) - len(tail)]
    return torch.tensor([list(head + body + tail)])


def _party(ids: torch.Tensor, block: int, nonlinear: str) -> dict:
    from mpcache.model.loading import load_bundled
    from mpcache.mpc.arith import numerics as N
    from mpcache.mpc.arith.accounting import Ledger, summarize
    from mpcache.mpc.nn import decoder as D
    from mpcache.mpc.nn import layers as L

    crypten = N.crypten
    rank = crypten.communicator.get().get_rank()
    model = load_bundled(dtype=torch.float64)[0]
    if rank != 0:
        model = D.architecture_only(model.config)  # party 1 knows the architecture only
    options = L.PrivateOptions(nonlinear=nonlinear)
    pm = D.share_model(model, N.share_owned, options)  # party 1 passes meta tensors
    tokens = crypten.cryptensor(L.one_hot(ids, model.config.vocab_size), src=0, precision=0)
    cache = L.PrivateKVCache(model.config.n_layer)
    crypten.cfg.communicator.verbose = True
    start = time.perf_counter()
    with Ledger(N.counters) as ledger:
        ledger.begin_step("prefill")
        logits = D.prefill(pm, tokens, cache, block)
        record = ledger.end_step()
    seconds = time.perf_counter() - start
    crypten.cfg.communicator.verbose = False
    keygen = getattr(crypten.mpc.get_default_provider(), "keygen_seconds", 0.0)
    return {
        "rounds": record["rounds"], "bytes": record["bytes"], "dealer_bytes": record["dealer_bytes"],
        "seconds": seconds, "keygen_seconds": keygen, "logits": N.decode(logits),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "by_op": summarize([record]),
    }  # fmt: skip


def measure(length: int, block: int, nonlinear: str, timeout: float) -> dict:
    from mpcache.model.loading import load_bundled
    from mpcache.mpc.arith import numerics as N
    from mpcache.mpc.transport.local import LocalParties

    ids = passkey_ids(length)
    with LocalParties(setup=N.install, timeout=timeout) as parties:
        r0, r1 = parties.run(_party, ids, block, nonlinear)
    model = load_bundled(dtype=torch.float64)[0]
    with torch.no_grad():
        plain = model(ids)[:, -1:]
    mib = 1 << 20
    return {
        "length": length, "block": block, "nonlinear": nonlinear, "rounds": int(r0["rounds"]),
        "online_mib": r0["bytes"] / mib, "dealer_mib_p0": r0["dealer_bytes"] / mib,
        "dealer_mib_p1": r1["dealer_bytes"] / mib, "seconds": r0["seconds"],
        "keygen_seconds": max(r0["keygen_seconds"], r1["keygen_seconds"]),
        "peak_rss_mib": max(r0["peak_rss_mib"], r1["peak_rss_mib"]),
        "max_logit_err": float((r0["logits"] - plain).abs().max()),
        "token_equal": int(r0["logits"][0, -1].argmax()) == int(plain[0, -1].argmax()),
        "online_kib_per_token": r0["bytes"] / 1024 / length,
        "dealer_kib_per_token_p0": r0["dealer_bytes"] / 1024 / length,
        "by_op": r0["by_op"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="256,512,1024,2048", help="prompt lengths, comma-separated")
    parser.add_argument("--block", type=int, default=128, help="prefill block size (public)")
    parser.add_argument("--nonlinear", default="lut", choices=["lut", "poly"])
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per party call")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (appends to an existing file)")
    args = parser.parse_args(argv)
    rows = []
    print("len   block nonlin rounds online MiB dealer MiB p0/p1    s    keygen s  RSS MiB  max|dlogit| token")
    for length in (int(v) for v in args.lengths.split(",") if v.strip()):
        r = measure(length, args.block, args.nonlinear, args.timeout)
        rows.append(r)
        print(f"{r['length']:5d} {r['block']:5d} {r['nonlinear']:6s} {r['rounds']:6d} {r['online_mib']:10.1f} "
              f"{r['dealer_mib_p0']:8.1f} / {r['dealer_mib_p1']:7.1f} {r['seconds']:7.1f} {r['keygen_seconds']:8.1f} "
              f"{r['peak_rss_mib']:8.0f} {r['max_logit_err']:11.4f} {r['token_equal']}", flush=True)  # fmt: skip
        ops = sorted(r["by_op"].items(), key=lambda kv: -kv[1]["bytes"])
        print("      by op (rounds / online MiB / dealer MiB p0): " + ", ".join(
            f"{op} {c['rounds']:.0f}/{c['bytes'] / 2**20:.1f}/{c['dealer_bytes'] / 2**20:.0f}" for op, c in ops))
        if args.json:
            old = json.loads(args.json.read_text()) if args.json.exists() else []
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(old + [r], indent=1))


if __name__ == "__main__":
    main()
