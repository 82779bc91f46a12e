"""Public per-layer attention score bounds for the private softmax, calibrated by the model owner on plaintext.

numerics.softmax can skip the row max (a comparison tree, the costliest part of a private softmax) when a public
bound on the scores is known: it then computes e^(x - bound) / sum. The bound must hold for every prompt, and it
costs precision when loose (every term shrinks by e^(bound - row max) while the fixed-point rounding does not),
so it is measured, not guessed: the owner runs the plaintext model on generated task prompts (mpcache.eval.tasks)
and records, per layer, the largest attention score any visible (query, key) pair reaches, plus how far below
its row's max a visible score lies (the spread `score_range` must cover). The bound is the largest score plus a
margin. The prompts never leave the owner; only the bounds become public (they are part of the protocol).

    python -m mpcache.mpc.arith.score_bounds --lengths 512,1024 --samples 2 --margin 2 --json bounds.json

How accurate a calibrated bound is on the bundled model: `python -m bench.softmax_modes`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from mpcache.kernels import visibility
from mpcache.model.cache import KVCache
from mpcache.model.transformer import Transformer


@dataclass(frozen=True)
class ScoreStats:
    """Per layer: the largest visible attention score, and the largest (row max - visible score) of any row."""

    max_score: tuple[float, ...]
    max_spread: tuple[float, ...]

    def bounds(self, margin: float) -> tuple[float, ...]:
        """The per-layer bounds: largest score + margin (for PrivateOptions.score_bound)."""
        return tuple(s + margin for s in self.max_score)


class ScoreRecorder(KVCache):
    """A full KV cache whose `observe` hook records every layer's attention score extremes (plaintext, owner side)."""

    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self.max_score = [-math.inf] * n_layer
        self.min_score = [math.inf] * n_layer  # the lowest visible score (its magnitude: numerics.SCORE_LIMIT)
        self.max_spread = [0.0] * n_layer

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        entry = self.layers[layer]
        assert entry is not None
        b, hq, t, d = queries.shape
        hkv = entry.keys.shape[1]
        q = queries.view(b, hkv, hq // hkv, t, d).double()
        scores = torch.einsum("bhgtd,bhld->bhgtl", q, entry.keys.double()) / math.sqrt(d)
        visible = visibility(query_positions, entry.positions, entry.valid).expand_as(scores)
        if not bool(visible.any()):
            return
        top = scores.masked_fill(~visible, -math.inf).amax(-1)
        low = scores.masked_fill(~visible, math.inf).amin(-1)
        seen = visible.any(-1)
        self.max_score[layer] = max(self.max_score[layer], float(top[seen].max()))
        self.min_score[layer] = min(self.min_score[layer], float(low[seen].min()))
        self.max_spread[layer] = max(self.max_spread[layer], float((top - low)[seen].max()))


def calibrate(model: Transformer, prompts: list[Tensor], chunk: int = 256) -> ScoreStats:
    """Score extremes per layer over `prompts` (token ids [1, T] each), prefilled `chunk` tokens at a time (the
    scores are those of a one-shot prefill; chunks only bound the memory)."""
    n = model.config.n_layer
    top, spread = [-math.inf] * n, [0.0] * n
    with torch.no_grad():
        for ids in prompts:
            cache = ScoreRecorder(n)
            for start in range(0, ids.shape[1], chunk):
                model(ids[:, start : start + chunk], cache)
            top = [max(a, b) for a, b in zip(top, cache.max_score)]
            spread = [max(a, b) for a, b in zip(spread, cache.max_spread)]
    return ScoreStats(tuple(top), tuple(spread))


def task_prompts(tokenizer, tasks: list[str], lengths: list[int], samples: int, seed: int = 1) -> list[Tensor]:
    """Generated prompts of every task and length (seed 1 by default: evaluations use seed 0, so the calibration
    set and the prompts a bound is judged on differ)."""
    from mpcache.eval.tasks import make_samples

    count = lambda text: len(tokenizer.encode(text, add_bos=False))  # noqa: E731
    return [
        torch.tensor([tokenizer.encode(s.prompt)])
        for task in tasks
        for n in lengths
        for s in make_samples(task, n, samples, count, seed=seed)
    ]


def main(argv: list[str] | None = None) -> int:
    from mpcache.eval.tasks import TASKS
    from mpcache.model.loading import load_bundled

    prog = "python -m mpcache.mpc.arith.score_bounds"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--lengths", default="512,1024", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--samples", type=int, default=2, help="prompts per task and length")
    parser.add_argument("--margin", type=float, default=2.0, help="added to every layer's largest score")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write {max_score, max_spread, margin, bounds}")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_bundled(dtype=torch.float64)
    lengths = [int(v) for v in opts.lengths.split(",")]
    prompts = task_prompts(tok, opts.tasks.split(","), lengths, opts.samples, opts.seed)
    stats = calibrate(model, prompts)
    out = {**asdict(stats), "margin": opts.margin, "bounds": stats.bounds(opts.margin), "prompts": len(prompts)}
    print(json.dumps(out))
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
