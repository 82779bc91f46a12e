"""Accuracy of KV-cache methods vs budget on the generated long-context tasks.

    python -m bench.accuracy --methods full,snapkv --tasks passkey,niah --lengths 512,1024,2048 \\
        --samples 20 --budgets 64,128 --json results.json --markdown results.md --plot results.png

Prints a table; writes JSON rows {method, task, context_len, budget, accuracy, samples,
seconds, shared_prefill_seconds, cache_tokens, cache_bytes, full_cache_bytes}, a markdown table for the README
and, with several budgets, an accuracy-vs-budget plot per task. "full" keeps every token
and ignores the budgets (one row with budget null). Budgets are token counts (64) or
fractions of the prompt (0.25).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mpcache.eval.runner import ANSWER_MARGIN, Budget, MethodSpec, evaluate_many, load_model, parse_budget
from mpcache.eval.tasks import TASKS
from mpcache.methods.shared_prefill import PrefillStore


def comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def length_list(text: str) -> list[int]:
    try:
        lengths = [int(item) for item in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be integers, got {text!r}") from None
    if any(n < 1 for n in lengths):
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return lengths


def budget_list(text: str) -> list[Budget]:
    try:
        return [parse_budget(item) for item in comma_list(text)]
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, tokenizer = load_model(args.model)
    specs = [
        MethodSpec(method, budget, args.method_kwargs)
        for method in args.methods
        for budget in ([None] if method == "full" else args.budgets)
    ]
    return evaluate_many(
        model,
        tokenizer,
        specs,
        tasks=args.tasks,
        lengths=args.lengths,
        samples=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
        margin=args.margin,
        share_prefill=not args.own_prefill,
        progress=not args.quiet,
        prefill_store=None if args.prefill_store is None else PrefillStore(args.prefill_store),
    )


# ------------------------------------------------------------------ reports
def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:.0f}"


def _ratio(row: dict[str, Any]) -> str:
    if row["cache_bytes"] is None or not row["full_cache_bytes"]:
        return "-"
    return f"{row['cache_bytes'] / row['full_cache_bytes']:.2f}"


COLUMNS = ("method", "task", "context", "budget", "accuracy", "samples", "cache tok", "cache KiB", "vs full", "s")


def table_cells(row: dict[str, Any]) -> list[str]:
    tokens = "-" if row["cache_tokens"] is None else f"{row['cache_tokens']:.0f}"
    budget = "-" if row["budget"] is None else str(row["budget"])
    return [
        row["method"],
        row["task"],
        str(row["context_len"]),
        budget,
        f"{row['accuracy']:.2f}",
        str(row["samples"]),
        tokens,
        _kib(row["cache_bytes"]),
        _ratio(row),
        f"{row['seconds']:.1f}",
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [list(COLUMNS)] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def format_summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (method, budget): accuracy per task averaged over lengths, the mean over
    tasks, and the cache size relative to a full cache."""
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    keys = list(dict.fromkeys((row["method"], row["budget"]) for row in rows))
    body = []
    for method, budget in keys:
        mine = [r for r in rows if (r["method"], r["budget"]) == (method, budget)]
        per_task = [[r["accuracy"] for r in mine if r["task"] == task] for task in tasks]
        cells = [f"{sum(a) / len(a):.2f}" if a else "-" for a in per_task]
        mean = sum(r["accuracy"] for r in mine) / len(mine)
        held = [r["cache_bytes"] / r["full_cache_bytes"] for r in mine if r["cache_bytes"] is not None]
        ratio = f"{sum(held) / len(held):.2f}" if held else "-"
        body.append([method, "-" if budget is None else str(budget), *cells, f"{mean:.2f}", ratio])
    return _markdown_table(["method", "budget", *tasks, "mean", "KV vs full"], body)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """A summary table (accuracy per task, averaged over lengths) and the full table."""
    lengths = ", ".join(str(n) for n in sorted({row["context_len"] for row in rows}))
    samples = sorted({row["samples"] for row in rows})
    lines = [f"Exact-match accuracy, mean over prompt lengths {lengths} ({'/'.join(map(str, samples))} samples each):"]
    lines += ["", *format_summary(rows), "", "Per length:", ""]
    lines += _markdown_table(list(COLUMNS), [table_cells(row) for row in rows])
    shared = {(r["task"], r["context_len"]): r["shared_prefill_seconds"] for r in rows}
    total = sum(seconds for seconds in shared.values() if seconds)
    if total:
        lines += ["", "`s` is each method's own time (replaying the prefill and decoding); the prompts were "
                  f"prefilled once per (task, length) for all methods, {total:.0f} s in all."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], budgets: list[Budget], path: Path) -> None:
    """One panel per task: accuracy vs budget, a line per (method, context length); the
    full cache is a dashed horizontal line. Budgets sit at evenly spaced ticks in the order
    given, so token counts and ratios can share an axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(row["task"] for row in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False, sharey=True)
    ticks = {budget: i for i, budget in enumerate(budgets)}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lengths = sorted({row["context_len"] for row in rows})
    styles = ["-o", "--s", ":^", "-.v", "-D"]
    for ax, task in zip(axes[0], tasks):
        methods = list(dict.fromkeys(row["method"] for row in rows if row["task"] == task))
        for m, method in enumerate(methods):
            for n, length in enumerate(lengths):
                picked = [r for r in rows if r["task"] == task and r["method"] == method and r["context_len"] == length]
                if not picked:
                    continue
                label = f"{method} @{length}"
                color = colors[m % len(colors)]
                if method == "full":
                    ax.axhline(picked[0]["accuracy"], color=color, linestyle="--", alpha=0.6, label=label)
                    continue
                xs = [ticks[r["budget"]] for r in picked]
                ax.plot(xs, [r["accuracy"] for r in picked], styles[n % len(styles)], color=color, label=label)
        ax.set_title(task)
        ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
        ax.set_xlabel("KV budget")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", type=comma_list, default=["full"], help="comma-separated KV methods")
    parser.add_argument("--tasks", type=comma_list, default=list(TASKS), help=f"default: {','.join(TASKS)}")
    parser.add_argument("--lengths", type=length_list, default=[512, 1024, 2048], help="prompt lengths in tokens")
    parser.add_argument("--samples", type=int, default=10, help="samples per (task, length)")
    parser.add_argument("--budgets", type=budget_list, default=[128], help="tokens (64) or prompt fractions (0.25)")
    parser.add_argument(
        "--model", default="bundled", help="bundled (default), smollm2, a checkpoint folder or a .gguf file"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--margin", type=int, default=ANSWER_MARGIN, help="decode steps beyond the answer length")
    parser.add_argument("--method-kwargs", type=json.loads, default=None, help="JSON options, e.g. '{\"window\": 32}'")
    parser.add_argument(
        "--label",
        default=None,
        help="name the rows this instead of the method (one method only), e.g. the knob variant "
        "'mpcache:similarity=linear' that bench.mpc_decode --accuracy matches",
    )
    parser.add_argument(
        "--own-prefill",
        action="store_true",
        help="every method prefills each prompt itself (default: one prefill per prompt, replayed into every "
        "method that can start from it; same outputs, see mpcache/methods/shared_prefill.py)",
    )
    parser.add_argument(
        "--prefill-store",
        type=Path,
        default=None,
        help="keep the shared prefills in this folder and reuse them in later runs over the same prompts "
        "(about 0.5 GB per 4K-token prompt of SmolLM2)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--markdown", type=Path, default=None, help="write a markdown table here")
    parser.add_argument("--plot", type=Path, default=None, help="write an accuracy-vs-budget PNG here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    if args.method_kwargs is not None and not isinstance(args.method_kwargs, dict):
        parser.error("--method-kwargs must be a JSON object")
    if args.label is not None and (len(args.methods) != 1 or args.methods[0] == "full"):
        parser.error("--label names the rows of one method other than full")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        rows = run(args)
        for row in rows:
            row["method"] = args.label or row["method"]
    except (FileNotFoundError, NotImplementedError, TypeError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(format_markdown(rows))
    if args.plot is not None:
        if len(args.budgets) < 2 or all(method == "full" for method in args.methods):
            print("note: --plot needs several budgets and a method other than full; no plot written", file=sys.stderr)
        else:
            plot(rows, args.budgets, args.plot)
    return rows


if __name__ == "__main__":
    main()
