"""Speed-up of one shared prefill per prompt over one prefill per method, measured side by side.

    python -m bench.prefill_sharing --model smollm2 --methods full,streamingllm,h2o,snapkv,tova,quest,mpcache \\
        --budgets 0.1,256 --tasks passkey --lengths 1024 --samples 4 --json bench/results/smollm2_prefill_sharing.json

Runs `evaluate_many` on the same samples twice, with `share_prefill` on and off (in that order,
then the check), reports the wall and CPU time of each and their ratio, and checks that the
rows are identical apart from timings (the shared path must not change a single answer).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.accuracy import budget_list, comma_list, length_list
from mpcache.eval.runner import MethodSpec, evaluate_many, load_model

TIMINGS = ("seconds", "shared_prefill_seconds")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill_sharing", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", type=comma_list, default=["full", "streamingllm", "h2o", "snapkv", "tova"])
    parser.add_argument("--budgets", type=budget_list, default=[0.1])
    parser.add_argument("--tasks", type=comma_list, default=["passkey"])
    parser.add_argument("--lengths", type=length_list, default=[1024])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    specs = [MethodSpec(m, b) for m in args.methods for b in ([None] if m == "full" else args.budgets)]
    kwargs = dict(tasks=args.tasks, lengths=args.lengths, samples=args.samples, batch_size=args.batch_size,
                  progress=False)  # fmt: skip
    runs: dict[str, Any] = {}
    for shared in (True, False):
        wall, cpu = time.perf_counter(), time.process_time()
        rows = evaluate_many(model, tokenizer, specs, share_prefill=shared, **kwargs)
        runs["shared" if shared else "own"] = {
            "rows": rows,
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
        }
        print(f"{'one shared prefill' if shared else 'one prefill per method'}: "
              f"{runs['shared' if shared else 'own']['wall_s']:.0f} s wall, "
              f"{runs['shared' if shared else 'own']['cpu_s']:.0f} s CPU", flush=True)  # fmt: skip
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
    identical = strip(runs["shared"]["rows"]) == strip(runs["own"]["rows"])
    report = {
        "model": args.model,
        "specs": [s.label for s in specs],
        "tasks": args.tasks,
        "lengths": args.lengths,
        "samples": args.samples,
        "threads": args.threads,
        "shared_wall_s": runs["shared"]["wall_s"],
        "own_wall_s": runs["own"]["wall_s"],
        "shared_cpu_s": runs["shared"]["cpu_s"],
        "own_cpu_s": runs["own"]["cpu_s"],
        "speedup_wall": runs["own"]["wall_s"] / runs["shared"]["wall_s"],
        "speedup_cpu": runs["own"]["cpu_s"] / runs["shared"]["cpu_s"],
        "rows_identical": identical,
        "rows": runs["shared"]["rows"],
    }
    print(f"{len(specs)} methods x {args.samples} samples x {len(args.tasks)} task(s) x {len(args.lengths)} length(s): "
          f"speed-up {report['speedup_wall']:.2f}x wall, {report['speedup_cpu']:.2f}x CPU; "
          f"rows identical: {identical}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
