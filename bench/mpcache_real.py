"""MPCache variants and baselines on a real model, each prompt prefilled once (bench.prefill_replay).

    python -m bench.mpcache_real --model smollm2 --variants full,quest,mpcache,mpcache:paper \\
        --tasks passkey,niah --lengths 1024,2048 --samples 10 --budgets 0.1 --store /tmp/prefills \\
        --json bench/results/smollm2_mpcache_ablations.json --markdown bench/results/smollm2_mpcache_ablations.md

A variant is a name from VARIANTS (a method and its options) or `method:{"json": "options"}`; rows are labelled
with the variant's name. Accuracy is exact match of greedy decoding, as bench.accuracy measures it (the same
`evaluate`, batch size 1). Every prompt's full-cache prefill is recorded in --store on first use and replayed
for every variant, so a variant costs only its decoding; the store may be shared by several runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.accuracy import budget_list, comma_list, format_markdown, format_table, length_list, plot
from bench.prefill_replay import PrefillStore
from mpcache.eval.runner import evaluate, load_model
from mpcache.methods import METHODS

# name -> (method, options). The MPCache rows ablate one knob at a time from the defaults (or the paper preset).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "quest": ("quest", {}),
    "snapkv": ("snapkv", {}),
    "streamingllm": ("streamingllm", {}),
    "h2o": ("h2o", {}),
    "mpcache": ("mpcache", {}),
    "mpcache:paper": ("mpcache", {"similarity": "linear", "static_pool": 1, "topk": "rank"}),
    "mpcache:no-share": ("mpcache", {"share_layers": False}),
    "mpcache:no-static": ("mpcache", {"static_ratio": 1.0}),
    "mpcache:rank": ("mpcache", {"topk": "rank"}),
    "mpcache:exact": ("mpcache", {"similarity": "exact"}),
    "mpcache:ratio1=1": ("mpcache", {"ratio1": 1.0}),
}


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """(label, method, options) of a VARIANTS name or `method:{json}`."""
    if text in VARIANTS:
        return text, *VARIANTS[text]
    method, _, options = text.partition(":")
    if not options.startswith("{"):
        raise argparse.ArgumentTypeError(f"unknown variant {text!r}; known: {', '.join(VARIANTS)} or method:{{json}}")
    return text, method, json.loads(options)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.mpcache_diagnose import OracleMPCache

    METHODS.setdefault(OracleMPCache.name, OracleMPCache)  # the diagnostic upper bound, by name in this bench only
    model, tokenizer = load_model(args.model)
    store = PrefillStore(args.store)
    rows = []
    for label, method, options in args.variants:
        for budget in [None] if method == "full" else args.budgets:
            start = time.perf_counter()
            found = evaluate(
                model,
                tokenizer,
                method,
                budget,
                tasks=args.tasks,
                lengths=args.lengths,
                samples=args.samples,
                seed=args.seed,
                batch_size=1,
                method_kwargs=options,
                generate_fn=store.generate_fn(),
                progress=False,
            )
            for row in found:
                row["method"], row["options"] = label, options
            rows += found
            summary = ", ".join(f"{r['task']}@{r['context_len']} {r['accuracy']:.2f}" for r in found)
            print(f"{label} @{budget}: {summary} ({time.perf_counter() - start:.0f} s)", flush=True)
            if args.json is not None:  # partial results survive an interrupted run
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m bench.mpcache_real", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--variants", type=lambda t: [parse_variant(v) for v in t.split(";")], required=True,
                        help="';'-separated VARIANTS names or method:{json}")
    parser.add_argument("--tasks", type=comma_list, default=["passkey", "niah"])
    parser.add_argument("--lengths", type=length_list, default=[1024, 2048])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--budgets", type=budget_list, default=[0.1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", type=Path, required=True, help="folder of recorded prefills (shared by runs)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = run(args)
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.0f} s, {PrefillStore(args.store).folder} holds the prefills)")
    if args.markdown is not None:
        args.markdown.write_text(format_markdown(rows))
    if args.plot is not None and len(args.budgets) > 1:
        plot(rows, args.budgets, args.plot)
    return rows


if __name__ == "__main__":
    main()
