"""MPCache variants and baselines on a real model, each prompt prefilled once for all of them and all runs.

    python -m bench.mpcache_real --model smollm2 --variants 'full;quest@0.1;mpcache;mpcache:paper@0.1' \\
        --tasks passkey,niah --lengths 1024,2048 --samples 10 --budgets 0.05,0.1,0.2 --store /tmp/prefills \\
        --json bench/results/smollm2_mpcache_ablations.json --markdown bench/results/smollm2_mpcache_ablations.md

A variant is a name from VARIANTS (a method and its options) or `method:{"json": "options"}`, optionally with its
own budgets (`quest@0.1`); rows are labelled with the variant's name. Accuracy is exact match of greedy decoding,
as bench.accuracy measures it (the same `evaluate_many`): every prompt's prefill is recorded once
(mpcache.methods.shared_prefill), kept in --store and replayed into every variant, so a variant costs only its
decoding, in this run and in later ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.accuracy import budget_list, comma_list, format_markdown, format_table, length_list, plot
from mpcache.eval.runner import Budget, MethodSpec, budget_tokens, evaluate_many, load_model
from mpcache.methods import METHODS
from mpcache.methods.mpcache import MPCacheKnobs
from mpcache.methods.shared_prefill import PrefillStore

RETRIEVAL = MPCacheKnobs.retrieval()
# name -> (method, options). The MPCache rows ablate one knob at a time from the defaults, the paper preset or the
# retrieval preset (MPCacheKnobs.retrieval, measured here on SmolLM2).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "quest": ("quest", {}),
    "snapkv": ("snapkv", {}),
    "streamingllm": ("streamingllm", {}),
    "h2o": ("h2o", {}),
    "mpcache": ("mpcache", {}),
    "mpcache:paper": ("mpcache", MPCacheKnobs.paper().options()),
    "mpcache:no-share": ("mpcache", {"share_layers": False}),
    "mpcache:no-static": ("mpcache", {"static_ratio": 1.0}),
    "mpcache:rank": ("mpcache", {"topk": "rank"}),
    "mpcache:exact": ("mpcache", {"similarity": "exact"}),
    "mpcache:ratio1=1": ("mpcache", {"ratio1": 1.0}),
    "mpcache:retrieval": ("mpcache", RETRIEVAL.options()),
    "retrieval:bound": ("mpcache", MPCacheKnobs.retrieval(similarity="bound").options()),
    "retrieval:sum": ("mpcache", MPCacheKnobs.retrieval(group="sum").options()),
    "retrieval:32/16": ("mpcache", MPCacheKnobs.retrieval(cluster_size=32, subcluster_size=16).options()),
    "retrieval:static0.5": ("mpcache", MPCacheKnobs.retrieval(static_ratio=0.5).options()),
    "retrieval:share": ("mpcache", MPCacheKnobs.retrieval(share_layers=True).options()),
    "retrieval:share4": ("mpcache", MPCacheKnobs.retrieval(share_layers=True, own_first=4, own_last=4).options()),
    "retrieval:share-early": ("mpcache", MPCacheKnobs.retrieval(share_layers=True, own_last=16).options()),
}
# Every registered method under its own name, with its defaults (the accuracy table's rows). Locret's heads and
# Attention-Gate's gates are trained for the bundled model only; on another model ":random" says so in the row name.
VARIANTS.update({name: (name, {}) for name in METHODS if name not in VARIANTS})
VARIANTS.update(
    {"locret:random": ("locret", {"heads": "random"}), "attention_gate:random": ("attention_gate", {"gates": "random"})}
)


def parse_variant(text: str) -> tuple[str, str, dict[str, Any], list[Budget] | None]:
    """(label, method, options, budgets) of `NAME[@BUDGETS]`: NAME a VARIANTS name or `method:{json}`, BUDGETS
    its own comma-separated budgets (default: --budgets)."""
    name, _, budgets = text.partition("@")
    own = budget_list(budgets) if budgets else None
    if name in VARIANTS:
        return name, *VARIANTS[name], own
    method, _, options = name.partition(":")
    if not options.startswith("{"):
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)} or method:{{json}}")
    return name, method, json.loads(options), own


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.mpcache_diagnose import OracleMPCache

    METHODS.setdefault(OracleMPCache.name, OracleMPCache)  # the diagnostic upper bound, by name in this bench only
    model, tokenizer = load_model(args.model)
    store = PrefillStore(args.store)
    specs, labels = [], []
    for label, method, options, budgets in args.variants:
        for budget in [None] if method == "full" else budgets or args.budgets:
            specs.append(MethodSpec(method, budget, options or None))
            labels.append(label)
    rows = []
    for task in args.tasks:  # one task and length at a time, so partial results are written as they come
        for length in args.lengths:
            start = time.perf_counter()
            found = evaluate_many(
                model, tokenizer, specs, tasks=[task], lengths=[length], samples=args.samples, seed=args.seed,
                batch_size=args.batch_size, progress=False, prefill_store=store,
            )  # fmt: skip
            for row, label, spec in zip(found, labels, specs):
                row["method"], row["options"] = label, spec.options or {}
                print(f"{label} @{row['budget']} {task}@{length}: {row['accuracy']:.2f} ({row['seconds']:.0f} s)")
            rows += found
            print(f"-- {task}@{length}: {time.perf_counter() - start:.0f} s", flush=True)
            if args.json is not None:
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def saved_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a saved run: this bench's --json (a list of rows) or a file of runs ({"runs": [{"rows": ...}]})."""
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else [row for run in data["runs"] for row in run["rows"]]


def variant_name(row: dict[str, Any]) -> str:
    """The VARIANTS name of a row run with that method and those options (in any spelling), else its label."""
    method = row["method"].split(":")[0]
    for name, (known, options) in VARIANTS.items():
        if (known, options) == (method, row.get("options", {})):
            return name
    return row["method"]


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows named by their variant (`variant_name`), the last one of each (variant, budget, task, length)."""
    cells = {}
    for row in rows:
        named = {**row, "method": variant_name(row)}
        cells[named["method"], named["budget"], named["task"], named["context_len"]] = named
    return list(cells.values())


def pivot(rows: list[dict[str, Any]], methods: list[str] | None = None) -> str:
    """Markdown accuracy table, one row per variant (and budget), one column per task and length, each cell
    "accuracy (samples)"; a later row for the same cell replaces an earlier one. `methods`: these rows, in order,
    each method's budgets by the share of the shortest prompt they keep (so 256 sits between 0.1 and 0.2 at 2048)."""
    cells: dict[tuple[str, str], str] = {}
    share: dict[str, float] = {}
    for row in latest(rows):
        name = row["method"] if row["budget"] is None else f"{row['method']} @{row['budget']}"
        cells[name, f"{row['task']} {row['context_len']}"] = f"{row['accuracy']:.2f} ({row['samples']})"
        kept = 1.0 if row["budget"] is None else budget_tokens(row["budget"], row["context_len"]) / row["context_len"]
        share[name] = max(share.get(name, 0.0), kept)
    names = list(dict.fromkeys(name for name, _ in cells))
    if methods is not None:
        names = [n for m in methods for n in sorted(names, key=share.get) if n == m or n.startswith(f"{m} @")]
    columns = sorted({c for _, c in cells}, key=lambda c: (int(c.split()[1]), c.split()[0] != "passkey", c))
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(cells.get((n, c), "-") for c in columns) + " |" for n in names]
    return "\n".join(lines) + "\n"


def plot_saved(rows: list[dict[str, Any]], methods: list[str] | None, length: int, path: Path) -> None:
    """Accuracy vs budget at one prompt length (bench.accuracy's plot: a panel per task, a line per variant) from
    saved rows; budgets (and each line's points) in order of the tokens they keep at that length, so 256 sits between
    0.1 and 0.2 at 2048."""
    picked = [r for r in latest(rows) if r["context_len"] == length and (methods is None or r["method"] in methods)]
    order = {name: i for i, name in enumerate(methods or [])}
    picked.sort(
        key=lambda r: (order.get(r["method"], 0), 0 if r["budget"] is None else budget_tokens(r["budget"], length))
    )
    budgets = sorted({r["budget"] for r in picked if r["budget"] is not None}, key=lambda b: budget_tokens(b, length))
    if not budgets:
        raise ValueError(f"no rows with a budget at {length} tokens to plot")
    plot(picked, budgets, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m bench.mpcache_real", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--variants",
        type=lambda t: [parse_variant(v) for v in t.split(";")],
        help="';'-separated VARIANTS names or method:{json}, each optionally @budget,budget",
    )
    parser.add_argument(
        "--render",
        type=lambda t: [Path(p) for p in t.split(",")],
        default=None,
        help="comma-separated saved runs (--json files): print their rows as one accuracy table, run nothing",
    )
    parser.add_argument("--methods", type=comma_list, default=None, help="with --render: these rows, in order")
    parser.add_argument(
        "--tasks", type=comma_list, default=["passkey", "niah"], help="with --render --plot: the panels"
    )
    parser.add_argument(
        "--lengths",
        type=length_list,
        default=None,
        help="prompt lengths (default 1024,2048); with --render: these columns",
    )
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--budgets", type=budget_list, default=[0.1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="prompts per batch and stored prefill record (1: the records bench.mpcache_diagnose reads too)",
    )
    parser.add_argument("--store", type=Path, default=None, help="folder of recorded prefills (shared by runs)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument(
        "--plot", type=Path, default=None, help="accuracy-vs-budget PNG (with --render: at --plot-length)"
    )
    parser.add_argument("--plot-length", type=int, default=2048, help="with --render --plot: the prompt length plotted")
    args = parser.parse_args(argv)
    if args.render is not None:
        rows = [row for path in args.render for row in saved_rows(path)]
        rows = [r for r in rows if args.lengths is None or r["context_len"] in args.lengths]
        text = pivot(rows, args.methods)
        print(text, end="")
        if args.markdown is not None:
            args.markdown.write_text(text)
        if args.plot is not None:
            plot_saved([r for r in rows if r["task"] in args.tasks], args.methods, args.plot_length, args.plot)
        return []
    if args.variants is None or args.store is None:
        parser.error("--variants and --store are needed (or --render)")
    args.lengths = args.lengths or [1024, 2048]
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = run(args)
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.0f} s; {args.store} holds the prefills)")
    if args.markdown is not None:
        args.markdown.write_text(format_markdown(rows))
    if args.plot is not None and len(args.budgets) > 1:
        plot(rows, args.budgets, args.plot)
    return rows


if __name__ == "__main__":
    main()
