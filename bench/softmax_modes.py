"""Accuracy of the private softmax's modes on the bundled model: max or calibrated bound, clipped or range exp.

    python -m bench.softmax_modes --length 1024 --steps 8 --json bench/results/softmax_modes.json

Modes (PrivateOptions): "max+clip" subtracts the row max and clips exp's input by a comparison (exp_neg);
"max+range" subtracts the max and uses the comparison-free exp_range (the decoder's default); "bound+range" and
"bound+clip" subtract a public per-layer bound calibrated on plaintext (mpcache.mpc.arith.score_bounds: the largest
score over generated prompts of every task, seed 1, plus `--margin`) instead of the max.

For each passkey prompt (seed 0, so not a calibration prompt) the plaintext model prefills all but the last token;
that cache is shared, and the private model decodes `--steps` greedy tokens from the last prompt token, in the
float simulator and in 2PC (two local CrypTen parties, exact truncation). Reported per mode: the first step's
logits against the exact plaintext logits (max abs difference), the number of greedy tokens equal to the
plaintext's, whether the pass key is answered, and for the bound modes how far each layer's bound lies above the
decode query's actual row max (that gap costs e^gap in precision: the fixed-point rounding does not shrink).
The float simulator does not round to 2^-16, so only the 2PC columns show that loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

MODES = ("max+clip", "max+range", "bound+range", "bound+clip")


def options(mode: str, bounds: tuple[float, ...]):
    from mpcache.mpc.nn.layers import SCORE_RANGE, PrivateOptions

    score_range = SCORE_RANGE if mode.endswith("+range") else None
    return PrivateOptions(score_bound=bounds if mode.startswith("bound") else None, score_range=score_range)


def private_decode(ids: torch.Tensor, steps: int, mode: str, bounds: tuple[float, ...], mpc: bool) -> dict:
    """Greedy decoding of `steps` tokens after a shared plaintext prefill of ids[:, :-1]; in 2PC this runs in each
    party (party 0 holds the model and the prefill; the last token is shared by party 1 as the client would)."""
    from mpcache.model.cache import KVCache
    from mpcache.model.loading import load_bundled
    from mpcache.mpc.arith import numerics as N
    from mpcache.mpc.nn import decoder
    from mpcache.mpc.nn import layers as L

    torch.set_num_threads(1)
    model = load_bundled(dtype=torch.float64)[0]
    config = model.config
    rank = N.crypten.communicator.get().get_rank() if mpc else 0
    if mpc:
        share = lambda t: N.crypten.cryptensor(t, src=0)  # noqa: E731
        reveal = N.decode
    else:
        share = reveal = lambda t: t  # noqa: E731
    n = ids.shape[1] - 1
    plain = None
    if rank == 0:
        plain = KVCache(config.n_layer)
        with torch.no_grad():
            model(ids[:, :n], plain)
    pm = decoder.share_model(model, share, options(mode, bounds))
    cache = decoder.share_cache(plain, config, [(1, config.n_kv_head, n, config.head_dim)] * config.n_layer, share)
    token = L.one_hot(ids[:, n:], config.vocab_size)
    if mpc:
        token = N.crypten.cryptensor(token, src=1, precision=0)
    tokens, first, start = [], None, time.perf_counter()
    for _ in range(steps):
        logits = pm(token, cache, last_only=True)
        token = L.greedy_token(logits)
        first = reveal(logits) if first is None else first
        tokens.append(int(reveal(token)[0, -1].argmax()))
    return {"tokens": tokens, "first_logits": first.double(), "seconds": time.perf_counter() - start}


def bound_gaps(model, ids: torch.Tensor, bounds: tuple[float, ...]) -> list[dict]:
    """Per layer, over the last prompt token's query heads: bound - row max (median and largest) in plaintext."""
    from mpcache.mpc.arith.score_bounds import ScoreRecorder

    class LastRow(ScoreRecorder):
        def __init__(self, n_layer: int) -> None:
            super().__init__(n_layer)
            self.row_max: list[torch.Tensor] = [torch.zeros(0)] * n_layer

        def observe(self, layer, queries, query_positions):
            entry = self.layers[layer]
            b, hq, t, d = queries.shape
            q = queries[:, :, -1:].reshape(b, entry.keys.shape[1], -1, 1, d).double()
            scores = torch.einsum("bhgtd,bhld->bhgtl", q, entry.keys.double()) / d**0.5
            self.row_max[layer] = scores.masked_fill(~entry.valid[:, :, None, None, :], -1e9).amax(-1).flatten()

    cache = LastRow(model.config.n_layer)
    with torch.no_grad():
        model(ids, cache)
    out = []
    for bound, row_max in zip(bounds, cache.row_max):
        gap = bound - row_max
        out.append({"median": round(float(gap.median()), 2), "max": round(float(gap.max()), 2)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.softmax_modes", description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024, help="passkey prompt length in tokens")
    parser.add_argument("--samples", type=int, default=2, help="passkey prompts (needle depths spread evenly)")
    parser.add_argument("--steps", type=int, default=8, help="greedy tokens decoded per prompt")
    parser.add_argument("--margin", type=float, default=2.0, help="calibration margin above the largest score")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-mpc", action="store_true", help="simulator only")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args(argv)
    from mpcache.eval.tasks import TASKS, exact_match, make_samples
    from mpcache.model.loading import load_bundled
    from mpcache.mpc.arith import numerics as N
    from mpcache.mpc.arith.score_bounds import calibrate, task_prompts
    from mpcache.mpc.nn.decoder import plain_greedy
    from mpcache.mpc.transport.local import LocalParties

    torch.set_num_threads(1)
    model, tok = load_bundled(dtype=torch.float64)
    stats = calibrate(model, task_prompts(tok, list(TASKS), [512, 1024], 2, seed=1))
    bounds = stats.bounds(opts.margin)
    print(f"calibrated bounds {[round(b, 2) for b in bounds]}, spreads {[round(s, 1) for s in stats.max_spread]}")
    count = lambda text: len(tok.encode(text, add_bos=False))  # noqa: E731
    samples = make_samples("passkey", opts.length, opts.samples, count, seed=0)
    modes = opts.modes.split(",")
    rows, all_gaps = [], []
    parties = None if opts.no_mpc else LocalParties(setup=N.install, timeout=1800)
    try:
        for i, sample in enumerate(samples):
            ids = torch.tensor([tok.encode(sample.prompt)])
            want, exact = plain_greedy(model, ids, opts.steps)
            gaps = bound_gaps(model, ids, bounds)
            all_gaps.append(gaps)
            for mode in modes:
                for backend in ("simulator",) + (() if parties is None else ("2pc",)):
                    if backend == "2pc":
                        got = parties.run(private_decode, ids, opts.steps, mode, bounds, True)[0]
                    else:
                        got = private_decode(ids, opts.steps, mode, bounds, False)
                    row = {
                        "sample": i, "prompt_tokens": ids.shape[1], "mode": mode, "backend": backend,
                        "logits_vs_exact": float((got["first_logits"] - exact).abs().max()),
                        "tokens_equal": sum(a == b for a, b in zip(got["tokens"], want)), "steps": opts.steps,
                        "passkey": exact_match(tok.decode(got["tokens"]), sample.answer),
                        "plain_passkey": exact_match(tok.decode(want), sample.answer),
                        "seconds": round(got["seconds"], 1),
                        "bound_gap": gaps if mode.startswith("bound") else None,
                    }  # fmt: skip
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "bound_gap"}), flush=True)
    finally:
        if parties is not None:
            parties.close()
    print(f"\nmargin {opts.margin}; bound - row max per layer (median/max over the last token's heads):")
    for i, gaps in enumerate(all_gaps):
        print(f"  sample {i}: {[(g['median'], g['max']) for g in gaps]}")
    print("\n| mode | backend | logits vs exact (max over prompts) | greedy tokens equal | pass key answered |")
    print("|---|---|---|---|---|")
    for mode in modes:
        for backend in ("simulator", "2pc"):
            sel = [r for r in rows if r["mode"] == mode and r["backend"] == backend]
            if sel:
                print(
                    f"| {mode} | {backend} | {max(r['logits_vs_exact'] for r in sel):.2e} | "
                    f"{sum(r['tokens_equal'] for r in sel)}/{sum(r['steps'] for r in sel)} | "
                    f"{sum(r['passkey'] for r in sel)}/{len(sel)} (plaintext {sum(r['plain_passkey'] for r in sel)}) |"
                )
    if opts.json:
        meta = {"bounds": bounds, "margin": opts.margin, "max_score": stats.max_score, "max_spread": stats.max_spread}
        opts.json.write_text(json.dumps({"calibration": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
