"""Do a model's activations stay inside the private decoder's public ranges? Recorded on real prompts in plaintext.

The private numerics (arith/numerics.py, nn/layers.py) assume public ranges: the bundled model was trained inside
them, a real checkpoint brings its own scales. The model owner runs the plaintext model (what the float simulator
reproduces up to the approximations' errors) over real prompts, prefill and greedy decoding, and this module
records every quantity that meets a range, per layer, against its limit:

| name | recorded (max unless said) | limit |
|---|---|---|
| norm_lo / norm_hi | min / max of mean(x^2) + eps at norm inputs (var + eps: LayerNorm) | PrivateOptions.norm_range |
| norm_product | |x w / rms| 2^(k + c), the norm's last product (layers.norm_shifts) | 2^30 (exact truncation) |
| score_abs | |q.k / sqrt(d)| over visible pairs | numerics.SCORE_LIMIT = 2^13 |
| spread | row max - visible score | numerics.RANGE_EXP_SAFE = 150 (exp_range; its fit: 64) |
| activation | |input| of SiLU / GeLU | numerics.VALUE_BOUND = 2^15 (their comparisons) |
| linear | |output| of every projection (the LM head: head_linear) | 2^30 (a product before its truncation) |
| residual | |x| of the residual stream after every block | 2^15 (x^2 in the next norm stays below 2^30) |
| logit_spread | row max - row min of the logits | numerics.VALUE_BOUND (the private argmax) |

The prompts stay with the owner; `check` returns the violations (empty: every range holds with its margin).

    python -m mpcache.mpc.nn.ranges --model smollm2 --json bench/results/smollm2_ranges.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mpcache.model.transformer import Transformer
from mpcache.mpc.arith.numerics import RANGE_EXP_SAFE, SCORE_LIMIT, VALUE_BOUND
from mpcache.mpc.arith.score_bounds import ScoreRecorder
from mpcache.mpc.nn.layers import PrivateOptions, norm_shifts

PRODUCT_LIMIT = 2.0**30  # a fixed-point product's value before its exact truncation (numerics: |x y| < 2^30)
PER_LAYER = ("norm_lo", "norm_hi", "norm_product", "score_abs", "spread", "activation", "linear", "residual")


@dataclass
class Ranges:
    """Recorded extremes per block (both of a block's norms fold into its norm_* entries), then the final norm
    (head_norm: lo, hi, product), the LM head's largest |logit| and row spread, and what they were taken over."""

    n_layer: int
    norm_lo: list[float] = field(default_factory=list)
    norm_hi: list[float] = field(default_factory=list)
    norm_product: list[float] = field(default_factory=list)
    score_abs: list[float] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)
    activation: list[float] = field(default_factory=list)
    linear: list[float] = field(default_factory=list)
    residual: list[float] = field(default_factory=list)
    head_norm: list[float] = field(default_factory=lambda: [math.inf, -math.inf, 0.0])
    head_linear: float = 0.0
    logit_spread: float = 0.0
    prompts: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:
        for name in PER_LAYER:
            if not getattr(self, name):
                fill = math.inf if name == "norm_lo" else (-math.inf if name == "norm_hi" else 0.0)
                setattr(self, name, [fill] * self.n_layer)


class _Hooks:
    """Forward hooks on the plaintext modules that fold every call's extremes into `ranges`."""

    def __init__(self, model: Transformer, ranges: Ranges, options: PrivateOptions) -> None:
        k, c = norm_shifts(model.config.d_model, options.norm_range)
        self.r, self.scale, self.handles = ranges, 2.0 ** (k + c), []
        for i, blk in enumerate(model.blocks):
            for norm in (blk.attn_norm, blk.mlp_norm):
                self._hook(norm, lambda m, x, y, i=i: self._norm(m, x, y, i))
            for module in blk.modules():
                if isinstance(module, nn.Linear):
                    self._hook(module, lambda m, x, y, i=i: _fold_max(self.r.linear, i, y))
            act_input = blk.mlp.gate_proj if blk.mlp.family == "llama" else blk.mlp.up_proj
            self._hook(act_input, lambda m, x, y, i=i: _fold_max(self.r.activation, i, y))
            self._hook(blk, lambda m, x, y, i=i: _fold_max(self.r.residual, i, y))
        self._hook(model.norm, lambda m, x, y: self._norm(m, x, y, None))
        self._hook(model.lm_head, self._head)

    def _hook(self, module: nn.Module, fn) -> None:
        self.handles.append(module.register_forward_hook(lambda m, args, out: fn(m, args[0].double(), out.double())))

    def _norm(self, module: nn.Module, x: Tensor, y: Tensor, i: int | None) -> None:
        """The private norm's domain is mean(x^2) + eps (var + eps for LayerNorm); its last product is the output
        without LayerNorm's bias, 2^(k + c) larger."""
        if isinstance(module, nn.LayerNorm):
            x, y = x - x.mean(-1, keepdim=True), y - module.bias.double()
        domain = x.pow(2).mean(-1) + module.eps
        lo, hi, product = float(domain.min()), float(domain.max()), float(y.abs().max()) * self.scale
        if i is None:
            h = self.r.head_norm
            self.r.head_norm = [min(h[0], lo), max(h[1], hi), max(h[2], product)]
            return
        self.r.norm_lo[i], self.r.norm_hi[i] = min(self.r.norm_lo[i], lo), max(self.r.norm_hi[i], hi)
        self.r.norm_product[i] = max(self.r.norm_product[i], product)

    def _head(self, module: nn.Module, x: Tensor, logits: Tensor) -> None:
        self.r.head_linear = max(self.r.head_linear, float(logits.abs().max()))
        self.r.logit_spread = max(self.r.logit_spread, float((logits.amax(-1) - logits.amin(-1)).max()))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _fold_max(values: list[float], i: int, y: Tensor) -> None:
    values[i] = max(values[i], float(y.abs().max()))


def record(model: Transformer, prompts: list[Tensor], steps: int = 16, options: PrivateOptions | None = None) -> Ranges:
    """Extremes over each prompt's prefill (token ids [1, T]) and `steps` greedy decode steps after it, every
    last-position and cache row included (the decoder's own steps meet the same ranges)."""
    options = options or PrivateOptions()
    n = model.config.n_layer
    ranges = Ranges(n)
    hooks = _Hooks(model, ranges, options)
    try:
        with torch.no_grad():
            for ids in prompts:
                cache = ScoreRecorder(n)
                logits = model(ids, cache)
                for _ in range(steps):
                    logits = model(logits[:, -1:].argmax(-1), cache)
                for i in range(n):
                    ranges.score_abs[i] = max(ranges.score_abs[i], abs(cache.max_score[i]), abs(cache.min_score[i]))
                    ranges.spread[i] = max(ranges.spread[i], cache.max_spread[i])
                ranges.prompts += 1
                ranges.tokens += ids.shape[1] + steps
    finally:
        hooks.remove()
    return ranges


def limits(options: PrivateOptions) -> dict[str, tuple[float, float]]:
    """(lowest allowed, highest allowed) of every recorded quantity under `options`."""
    lo, hi = options.norm_range
    return {
        "norm": (lo, hi),
        "norm_product": (0.0, PRODUCT_LIMIT),
        "score_abs": (0.0, SCORE_LIMIT),
        "spread": (0.0, RANGE_EXP_SAFE),  # exp_range (or exp_neg's clip, which is exact to 0 below -14)
        "activation": (0.0, VALUE_BOUND),
        "linear": (0.0, PRODUCT_LIMIT),
        "residual": (0.0, VALUE_BOUND),
        "logit_spread": (0.0, VALUE_BOUND),
    }


def check(ranges: Ranges, options: PrivateOptions | None = None, margin: float = 1.0) -> list[str]:
    """Every range the recorded values leave, or come within a factor `margin` of (>= 1), as readable lines."""
    options = options or PrivateOptions()
    lim = limits(options)
    out = []

    def inside(name: str, where: str, value: float, low: float | None = None) -> None:
        a, b = lim["norm" if name.startswith("norm_") and name != "norm_product" else name]
        if low is not None and low < a * margin:
            out.append(f"{where}: {name} min {low:.4g} below {a:.4g} (margin x{margin})")
        if value * margin > b:
            out.append(f"{where}: {name} max {value:.4g} beyond {b:.4g} (margin x{margin})")

    for i in range(ranges.n_layer):
        inside("norm_hi", f"layer {i}", ranges.norm_hi[i], ranges.norm_lo[i])
        for name in PER_LAYER[2:]:
            inside(name, f"layer {i}", getattr(ranges, name)[i])
    inside("norm_hi", "final norm", ranges.head_norm[1], ranges.head_norm[0])
    inside("norm_product", "final norm", ranges.head_norm[2])
    inside("linear", "lm head", ranges.head_linear)
    inside("logit_spread", "lm head", ranges.logit_spread)
    return out


def headroom(ranges: Ranges, options: PrivateOptions | None = None) -> dict[str, tuple[float, str]]:
    """Per quantity, the smallest factor by which the recorded values stay inside their limit, and where."""
    lim = limits(options or PrivateOptions())
    out: dict[str, tuple[float, str]] = {}

    def fold(name: str, factor: float, where: str) -> None:
        if name not in out or factor < out[name][0]:
            out[name] = (factor, where)

    for i in range(ranges.n_layer):
        fold("norm_lo", ranges.norm_lo[i] / lim["norm"][0], f"layer {i}")
        fold("norm_hi", lim["norm"][1] / ranges.norm_hi[i], f"layer {i}")
        for name in PER_LAYER[2:]:
            fold(name, lim[name][1] / max(getattr(ranges, name)[i], 1e-300), f"layer {i}")
    fold("norm_lo", ranges.head_norm[0] / lim["norm"][0], "final norm")
    fold("norm_hi", lim["norm"][1] / ranges.head_norm[1], "final norm")
    fold("norm_product", lim["norm_product"][1] / ranges.head_norm[2], "final norm")
    fold("linear", lim["linear"][1] / ranges.head_linear, "lm head")
    fold("logit_spread", lim["logit_spread"][1] / ranges.logit_spread, "lm head")
    return out


def real_prompts(tokenizer, lengths: list[int], seed: int = 1) -> list[Tensor]:
    """Chat questions plus task prompts (passkey, NIAH, the standard library's documentation) of each length, in
    the model's chat template when it has one (mpcache.eval.runner.prompt_text)."""
    from mpcache.eval.runner import prompt_overhead, prompt_text
    from mpcache.eval.tasks import make_sample

    texts = []
    if getattr(tokenizer, "chat_template", None) is not None:
        for q in QUESTIONS:
            texts.append(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
    count = lambda text: len(tokenizer.encode(text, add_bos=False))  # noqa: E731
    reserve = prompt_overhead(tokenizer)
    for task in ("passkey", "niah", "stdlib_docs"):
        for n in lengths:
            texts.append(prompt_text(tokenizer, make_sample(task, n, seed, count, reserve=reserve)))
    return [torch.tensor([tokenizer.encode(t)]) for t in texts]


QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 100.",
)


def main(argv: list[str] | None = None) -> int:
    from mpcache.model.loading import load_model

    parser = argparse.ArgumentParser(prog="python -m mpcache.mpc.nn.ranges", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="bundled, smollm2 or a checkpoint folder")
    parser.add_argument("--lengths", default="256,1024", help="task prompt lengths in tokens, comma-separated")
    parser.add_argument("--steps", type=int, default=16, help="greedy decode steps after each prompt")
    parser.add_argument("--json", type=Path, default=None, help="write the recorded ranges, limits and verdict")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_model(opts.model, dtype=torch.float64)
    prompts = real_prompts(tok, [int(v) for v in opts.lengths.split(",")])
    ranges = record(model, prompts, opts.steps)
    options = PrivateOptions()
    problems = check(ranges, options)
    room = headroom(ranges, options)
    out = {
        "model": opts.model, "command": "python -m mpcache.mpc.nn.ranges " + " ".join(argv or sys.argv[1:]),
        "options": asdict(options), "ranges": asdict(ranges), "limits": limits(options), "headroom": room,
        "violations": problems,
    }  # fmt: skip
    print("violations:", *problems, sep="\n  ")
    print("headroom (limit / recorded, the tightest layer):")
    for name, (factor, where) in room.items():
        print(f"{name:>13}: x{factor:.3g} ({where})")
    for name in PER_LAYER:
        values = getattr(ranges, name)
        print(f"{name:>13}: " + " ".join(f"{v:.3g}" for v in values))
    print(f"head: norm {ranges.head_norm}, |logit| {ranges.head_linear:.4g}, logit spread {ranges.logit_spread:.4g}")
    print(f"{ranges.prompts} prompts, {ranges.tokens} tokens; {len(problems)} violations")
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
