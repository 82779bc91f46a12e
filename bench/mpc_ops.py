"""Rounds, bytes and time of the private numerics and layers, beside CrypTen's defaults.

    python -m bench.mpc_ops                 # markdown table on stdout
    python -m bench.mpc_ops --json ops.json

Two local parties (mpcache.mpc.transport.local, gRPC on loopback), exact truncation tuples from the in-process
dealer. Counts are CrypTen's per-party counters (a round = one communicator call; bytes = elements x 8, both
directions), read on party 0; "per elem" divides by the op's input elements. Times are one party's wall clock on
this machine, with both parties sharing its cores.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Transformer
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.nn import layers as L
from mpcache.mpc.transport.local import LocalParties


def _measure(name: str, fn, elements: int, exact: bool) -> dict:
    crypten = N.crypten
    crypten.cfg.mpc.provider = N.PROVIDER_NAME if exact else "TFP"
    crypten.cfg.communicator.verbose = True
    crypten.reset_communication_stats()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    stats = crypten.communicator.get().get_communication_stats()
    crypten.cfg.communicator.verbose = False
    crypten.cfg.mpc.provider = N.PROVIDER_NAME
    return dict(op=name, elements=elements, rounds=stats["rounds"], bytes=stats["bytes"], seconds=seconds)


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
        _measure("less_than, 1 threshold", lambda: N.less_than(x, [0.0]), 4096, True),
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
    rows.append(_measure("decode step (logits + argmax)", lambda: L.greedy_token(pm(step, cache)), 1, True))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=32, help="prompt length of the bundled-shape model")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    with LocalParties(setup=N.install, timeout=1800) as parties:
        rows = parties.run(_ops)[0] + parties.run(_bundled_like, args.prompt)[0]
    print("| op | elements | rounds | bytes (party 0) | bytes per elem | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        per = r["bytes"] / r["elements"]
        print(f"| {r['op']} | {r['elements']} | {r['rounds']} | {r['bytes']:,} | {per:,.0f} | {r['seconds']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
