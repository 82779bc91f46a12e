"""Plaintext speed: prefill and decode tokens/s of mpcache's model vs transformers, same weights.

    python -m bench.plain_speed --model smollm2 --lengths 512,2048 --json bench/results/smollm2_speed.json \\
        --markdown bench/results/smollm2_speed.md

Both models read the same checkpoint folder (SmolLM2's converted GGUF by default) in float32
on one thread. Per prompt length: prefill of a random prompt (the KV cache kept, logits of the
last position only, as generation needs), then `--decode` single-token steps over that cache.
The two implementations alternate, `--repeats` times each, so machine load hits both alike;
times are the process's CPU time (one thread: the compute time, robust to other jobs sharing
the cores, which wall time is not); the table reports the median time and tokens/s and the
ratio mpcache / transformers (> 1: mpcache slower). transformers is a test dependency only;
the script says so if it is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mpcache.model import checkpoint_folder, from_pretrained
from mpcache.model.cache import KVCache


def mpcache_runner(model) -> Callable[[torch.Tensor, int], tuple[float, float]]:
    def run(ids: torch.Tensor, steps: int) -> tuple[float, float]:
        cache = KVCache(model.config.n_layer)
        start = time.process_time()
        logits = model(ids, cache=cache, last_only=True)
        prefill = time.process_time() - start
        token = logits[:, -1].argmax(-1, keepdim=True)
        start = time.process_time()
        for _ in range(steps):
            token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        return prefill, time.process_time() - start

    return run


def transformers_runner(model) -> Callable[[torch.Tensor, int], tuple[float, float]]:
    from transformers import DynamicCache

    def run(ids: torch.Tensor, steps: int) -> tuple[float, float]:
        cache = DynamicCache()
        start = time.process_time()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.process_time() - start
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.process_time()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, time.process_time() - start

    return run


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench.plain_speed compares against transformers: pip install transformers") from None
    torch.set_num_threads(args.threads)
    folder = checkpoint_folder(args.model)
    runners = {
        "mpcache": mpcache_runner(from_pretrained(folder).eval()),
        "transformers": transformers_runner(
            transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        ),
    }
    rows = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for length in args.lengths:
            ids = torch.randint(100, 40000, (1, length), generator=generator)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
            for run in runners.values():  # warm-up (allocator, kernels)
                run(ids[:, :64], 2)
            for _ in range(args.repeats):
                for name, run in runners.items():
                    times[name].append(run(ids, args.decode))
            for name in runners:
                prefill = statistics.median(t[0] for t in times[name])
                decode = statistics.median(t[1] for t in times[name])
                rows.append(
                    {
                        "impl": name,
                        "prompt_tokens": length,
                        "decode_steps": args.decode,
                        "prefill_s": prefill,
                        "prefill_tok_s": length / prefill,
                        "decode_s": decode,
                        "decode_tok_s": args.decode / decode,
                        "repeats": args.repeats,
                        "threads": args.threads,
                    }
                )
            print(format_table(rows[-2:]), flush=True)
    return rows


COLUMNS = ("prompt", "impl", "prefill s", "prefill tok/s", "decode tok/s", "prefill ratio", "decode ratio")


def format_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Cells per row; ratios are this implementation's time over transformers' at the same length."""
    ref = {r["prompt_tokens"]: r for r in rows if r["impl"] == "transformers"}
    cells = []
    for r in rows:
        base = ref.get(r["prompt_tokens"])
        ratios = [f"{r[key] / base[key]:.2f}x" if base else "-" for key in ("prefill_s", "decode_s")]
        cells.append([str(r["prompt_tokens"]), r["impl"], f"{r['prefill_s']:.2f}", f"{r['prefill_tok_s']:.0f}",
                      f"{r['decode_tok_s']:.1f}", *ratios])
    return cells


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [list(COLUMNS), *format_rows(rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)


def format_markdown(rows: list[dict[str, Any]], note: str) -> str:
    lines = [note, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in format_rows(rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, a checkpoint folder or a .gguf file")
    parser.add_argument("--lengths", default="512,2048", help="prompt lengths in tokens")
    parser.add_argument("--decode", type=int, default=32, help="decode steps after each prefill")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    args.lengths = [int(n) for n in args.lengths.split(",")]
    if min(args.lengths) < 64 or args.decode < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("lengths must be >= 64 and --decode, --repeats, --threads >= 1")
    rows = measure(args)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown is not None:
        note = (f"{args.model}, float32, {args.threads} thread(s), median CPU time of {args.repeats} alternating runs, "
                f"{args.decode} decode steps after the prefill; ratio = time / transformers' time")
        args.markdown.write_text(format_markdown(rows, note))
    return rows


if __name__ == "__main__":
    main()
