"""Serving many requests from one paged KV block store (mpcache.serving): simulator and real model.

    python -m bench.serving                        # every section (~30-60 min on 1 CPU thread)
    python -m bench.serving --sections policies    # one section (names below)
    python -m bench.serving --quick                # small sizes, a smoke run (~2 min)

Sections (tables on stdout, in bench/results/serving_<section>.md and joined in serving.md;
rows in serving_<section>.json; plots serving_sim.png, serving_errors.png, serving_cachecraft.png):

- throughput: the trace simulator's requests per minute, each policy on one core (the
  shared-prompt workload, predictions computed beforehand).
- policies: hit rate vs pool size for LRU, LRU with a victim tier, LSM-GNN, the one-bit
  policies (perfect and learned predictions) and Belady on three workloads; hit rate vs
  prediction error (random flips, and every bit inverted).
- share: the bundled model, 64 requests sharing a 512-token system prompt, with prefix
  sharing vs without (same engine, same pool): tokens/s, time to first token, peak KV MiB.
- batchllm: a mixed offline batch (8 few-shot prefixes, prefill- and decode-heavy requests,
  shuffled): first-come-first-served with LRU prefix caching vs BatchLLM's ordering (same
  batch cap) vs BatchLLM with memory-based batching.
- tiers: the real engine's prefix cache under memory pressure (Zipf few-shot prefixes): LRU
  vs LSM-GNN's hybrid, without and with a victim tier (int8 or exact), and LRU given the
  tier's bytes as extra pool blocks: prompt tokens computed, tokens/s, same tokens.
- cachecraft: RAG prompts (header, 4 chunks drawn Zipf from a corpus, a question) on the
  bundled model: prompt tokens computed by prefix caching vs Cache-Craft at several
  recompute fractions, and answer agreement with full recomputation.
- ranking: which tokens Cache-Craft recomputes (its inter-attention ranking vs random and
  reversed rankings with the same budgets), by the last logits' error.

Every timed run uses one torch thread; run it with `nice -n 10` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from mpcache.eval.tasks import _magic_key, filler_sentence
from mpcache.model import load_model
from mpcache.serving import BlockPool, Engine, PrefixCache, Request, Scheduler
from mpcache.serving import traces as T
from mpcache.serving.batchllm import BatchLLM
from mpcache.serving.cachecraft import CacheCraft, ChunkStore, DenseCache
from mpcache.serving.policies import LRU, LSMGNN, Belady, DiscardBits, PhaseBits
from mpcache.serving.predictors import Oracle
from mpcache.serving.simulator import prepare, standard_policies, sweep
from mpcache.serving.tiers import VictimTier

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("throughput", "policies", "share", "batchllm", "tiers", "cachecraft", "ranking")


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table: cols = (key, header, format)."""
    out = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        out.append(
            "| " + " | ".join(format(row.get(k), f) if row.get(k) is not None else "-" for k, _, f in cols) + " |"
        )
    return "\n".join(out)


# --------------------------------------------------------------------- simulator
def bench_throughput(quick: bool) -> tuple[dict, str]:
    """Requests per minute of each policy on one core (labels and next uses computed first)."""
    n_big = 100_000 if quick else 1_000_000
    md = []
    big = T.shared_prompts(n_big, seed=0)
    small = big.head(n_big // 5)
    rows = []
    for policy, requests in (
        (LRU(), n_big),
        (PhaseBits(Oracle("phase")), n_big),
        (DiscardBits(Oracle("discard"), robust=False), n_big // 5),
        (DiscardBits(Oracle("discard")), n_big // 5),
        (LSMGNN(), n_big // 5),
        (Belady(), n_big // 5),
    ):
        trace = big if requests == n_big else small
        prepare(trace, [policy], 1024)
        r = policy.simulate(trace, 1024)
        rows.append(
            dict(
                policy=r.policy,
                requests=r.requests,
                accesses=r.accesses,
                seconds=r.seconds,
                cpu_seconds=r.cpu_seconds,
                rpm=r.requests_per_minute / 1e6,
                hit=r.hit_rate,
            )
        )
        print(f"  sim throughput {r.policy}: {r.requests_per_minute / 1e6:.2f}M requests/min", flush=True)
    md += [
        "### Simulator throughput (one core, shared-prompt workload, 1024-block cache; rates per minute of "
        "the process's CPU time, the machine being shared)",
        "",
        table(
            rows,
            [
                ("policy", "policy", ""),
                ("requests", "requests", ","),
                ("accesses", "block accesses", ","),
                ("seconds", "wall s", ".1f"),
                ("cpu_seconds", "CPU s", ".1f"),
                ("rpm", "M requests / CPU min", ".2f"),
                ("hit", "hit rate", ".3f"),
            ],
        ),
        "",
    ]
    return {"rows": rows}, "\n".join(md)


def bench_policies(quick: bool) -> tuple[dict, str]:
    """Hit rate vs pool size on three workloads, and vs prediction error."""
    n = 5_000 if quick else 20_000
    md = []
    # Hit rate vs pool size.
    workloads = {
        "shared": lambda s: T.shared_prompts(n, seed=s),
        "multiturn": lambda s: T.multiturn(n, seed=s),
        "rag-chunk": lambda s: T.rag(n, seed=s, keying="chunk"),
    }
    capacities = [128, 256, 512, 1024, 2048, 4096]
    sweep_rows = []
    for name, make in workloads.items():
        trace, train = make(0), make(1)
        start = time.perf_counter()
        sweep_rows += sweep(trace, standard_policies(train), capacities)
        print(f"  sim sweep {name}: {time.perf_counter() - start:.0f} s", flush=True)
    rag_prefix = T.rag(n, seed=0, keying="prefix")
    sweep_rows += sweep(rag_prefix, [LRU(), Belady()], capacities)
    md += [
        "### Hit rate vs pool size (blocks of 16 tokens)",
        "",
        "served = hits + victim-buffer hits (no recomputation); learned = the logistic predictor trained on "
        "another trace of the same workload.",
        "",
    ]
    for name in [*workloads, "rag-prefix"]:
        sub = [r for r in sweep_rows if r["trace"] == name]
        pols = list(dict.fromkeys(r["policy"] for r in sub))
        grid = []
        for policy in pols:
            row = {"policy": policy}
            for r in sub:
                if r["policy"] == policy:
                    row[str(r["capacity"])] = r["hit_rate"] if r["victim_hits"] == 0 else r["served_rate"]
            grid.append(row)
        md += [
            f"**{name}** ({sub[0]['requests']:,} requests, {sub[0]['accesses']:,} block accesses)",
            "",
            table(grid, [("policy", "policy", "")] + [(str(c), str(c), ".3f") for c in capacities]),
            "",
        ]
    # Prediction error.
    trace, cap = T.multiturn(n, seed=0), 512
    errors = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
    lru, best = LRU().simulate(trace, cap), Belady().simulate(trace, cap)
    error_rows = []
    for kind, makers in (
        ("discard", (lambda p: DiscardBits(p), lambda p: DiscardBits(p, robust=False))),
        ("phase", (lambda p: PhaseBits(p),)),
    ):
        for make in makers:
            for error in errors + ["inverted"]:
                pred = Oracle(kind, adversarial=True) if error == "inverted" else Oracle(kind, error=float(error))
                r = make(pred).simulate(trace, cap)
                error_rows.append(
                    dict(
                        policy=r.policy.split("[")[0],
                        error=error,
                        hit=r.hit_rate,
                        misses=r.misses,
                        vs_belady=r.misses / best.misses,
                        vs_lru=r.misses / lru.misses,
                    )
                )
    md += [
        f"### Hit rate vs prediction error (multiturn, {cap}-block cache; LRU {lru.hit_rate:.3f}, "
        f"Belady {best.hit_rate:.3f})",
        "",
        "Bounds checked in tests/test_serving_policies.py: discard (robust) misses <= 3 min(follow, LRU) + 3k + 1, "
        "= Belady with perfect bits; phase misses <= k x phases <= k (OPT + 1), = new blocks per phase with "
        "perfect bits.",
        "",
        table(
            error_rows,
            [
                ("policy", "policy", ""),
                ("error", "flipped bits", ""),
                ("hit", "hit rate", ".3f"),
                ("vs_belady", "misses / Belady", ".2f"),
                ("vs_lru", "misses / LRU", ".2f"),
            ],
        ),
        "",
    ]
    _plot_sim(sweep_rows, error_rows, capacities, lru.hit_rate, best.hit_rate)
    return {"sweep": sweep_rows, "errors": error_rows}, "\n".join(md)


def _plot_sim(rows, error_rows, capacities, lru_hit, best_hit) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["trace"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        sub = [r for r in rows if r["trace"] == name]
        for policy in dict.fromkeys(r["policy"] for r in sub):
            pts = [(r["capacity"], r["served_rate"]) for r in sub if r["policy"] == policy]
            style = "k--" if policy == "belady" else "-o"
            ax.plot(*zip(*pts), style, label=policy, markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("pool size (blocks)")
        ax.set_ylabel("hit rate (served without recompute)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "serving_sim.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in error_rows):
        pts = [(r["error"], r["hit"]) for r in error_rows if r["policy"] == policy and r["error"] != "inverted"]
        ax.plot(*zip(*pts), "-o", label=policy, markersize=3)
    ax.axhline(lru_hit, color="gray", ls=":", label="LRU")
    ax.axhline(best_hit, color="k", ls="--", label="Belady")
    ax.set_xlabel("fraction of prediction bits flipped")
    ax.set_ylabel("hit rate")
    ax.set_title("one-bit policies vs prediction error (multiturn)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "serving_errors.png", dpi=120)


# ------------------------------------------------------------------ real model
def _text(rng: random.Random, n: int) -> str:
    return " ".join(filler_sentence(rng) for _ in range(n))


def bench_share(model, tok, quick: bool) -> tuple[dict, str]:
    n_req, system_len, user_len, new = (16, 256, 32, 16) if quick else (64, 512, 32, 32)
    rng = random.Random(0)
    system = tok.encode("You are a helpful assistant. " + _text(rng, 60))[:system_len]
    users = [tok.encode(f"\nUser {i}: " + _text(rng, 3))[:user_len] for i in range(n_req)]
    rows, outputs = [], {}
    for sharing in (False, True):
        requests = [Request(system + u, new, rid=i) for i, u in enumerate(users)]
        per = -(-(system_len + user_len + new) // 16)
        pool = BlockPool.for_model(model, n_req * per + 64)
        stats = Engine(model, pool, prefix_caching=sharing).run(requests, Scheduler(max_batch=n_req))
        outputs[sharing] = [r.output for r in requests]
        rows.append(dict(sharing=sharing, **stats.row()))
        print(f"  share={sharing}: {stats.tokens_per_s:.1f} tok/s, peak {stats.peak_kv_mib:.1f} MiB", flush=True)
    off, on = rows
    ratios = dict(
        tokens_per_s=on["tokens_per_s"] / off["tokens_per_s"],
        peak_kv=on["peak_kv_mib"] / off["peak_kv_mib"],
        ttft=on["ttft_mean_s"] / off["ttft_mean_s"],
        same_tokens=outputs[True] == outputs[False],
    )
    md = [
        f"### {n_req} requests sharing a {system_len}-token system prompt ({user_len}-token questions, "
        f"{new} new tokens each, one batch)",
        "",
        table(
            rows,
            [
                ("sharing", "prefix sharing", ""),
                ("tokens_per_s", "tokens/s", ".1f"),
                ("ttft_mean_s", "TTFT mean s", ".2f"),
                ("ttft_p90_s", "TTFT p90 s", ".2f"),
                ("peak_kv_mib", "peak KV MiB", ".1f"),
                ("computed_prompt_tokens", "prompt tokens computed", ","),
                ("wall_s", "wall s", ".1f"),
                ("cow_copies", "COW copies", ""),
            ],
        ),
        "",
        f"Sharing vs not: {ratios['tokens_per_s']:.2f}x tokens/s, {ratios['peak_kv']:.3f}x peak KV, "
        f"{ratios['ttft']:.3f}x mean TTFT; identical tokens: {ratios['same_tokens']}.",
        "",
    ]
    return {"rows": rows, "ratios": ratios}, "\n".join(md)


def mixed_batch(tok, quick: bool) -> list[Request]:
    rng = random.Random(1)
    groups, per_group = (4, 8) if quick else (8, 16)
    requests = []
    for g in range(groups):
        prefix = tok.encode(f"Task {g}: answer in the style of the examples.\n" + _text(rng, 10))[:320]
        for i in range(per_group):
            question = tok.encode(f"\nQ: {_text(rng, 1)} A:")
            requests.append(Request(prefix + question, 48 if i % 2 else 8, rid=len(requests)))
    random.Random(2).shuffle(requests)
    return requests


def bench_batchllm(model, tok, quick: bool) -> tuple[dict, str]:
    pool_blocks, cap = (160, 16) if quick else (320, 32)
    rows, outputs = [], {}
    for name, scheduler in (
        ("fcfs + LRU prefix cache", Scheduler(cap)),
        ("batchllm order", BatchLLM(max_batch=cap)),
        ("batchllm order + memory batching", BatchLLM(max_batch=None)),
    ):
        requests = mixed_batch(tok, quick)
        stats = Engine(model, BlockPool.for_model(model, pool_blocks)).run(requests, scheduler)
        outputs[name] = {r.rid: r.output for r in requests}
        rows.append(dict(scheduler=name, **stats.row()))
        print(f"  {name}: {stats.tokens_per_s:.1f} tok/s", flush=True)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
    same = all(o == outputs[rows[0]["scheduler"]] for o in outputs.values())
    n, groups = len(mixed_batch(tok, quick)), 4 if quick else 8
    md = [
        f"### BatchLLM vs first-come-first-served on a mixed batch ({n} requests, {groups} shuffled few-shot "
        f"prefixes of 320 tokens, half 8 / half 48 new tokens, {pool_blocks}-block pool, batch cap {cap})",
        "",
        table(
            rows,
            [
                ("scheduler", "scheduler", ""),
                ("tokens_per_s", "tokens/s", ".1f"),
                ("speedup", "x FCFS", ".2f"),
                ("wall_s", "wall s", ".1f"),
                ("computed_prompt_tokens", "prompt tokens computed", ","),
                ("decode_steps", "decode steps", ""),
                ("mean_decode_batch", "mean decode batch", ".1f"),
                ("ttft_mean_s", "TTFT mean s", ".1f"),
                ("evicted_blocks", "LRU evictions", ""),
            ],
        ),
        "",
        f"Same tokens for every request under every scheduler: {same}.",
        "",
    ]
    return {"rows": rows, "same_tokens": same}, "\n".join(md)


def zipf_few_shot(tok, quick: bool) -> list[Request]:
    """A shared system prompt, then one of 12 few-shot prefixes of ~256 tokens drawn Zipf(1), a
    question, 8 new tokens: more distinct prefixes than the pool can keep."""
    rng = random.Random(5)
    system = tok.encode("You are a helpful assistant. " + _text(rng, 6))[:64]
    shots = [tok.encode(f"\nTask {g}: " + _text(rng, 25))[:256] for g in range(12)]
    weights = [1.0 / (g + 1) for g in range(12)]
    requests = []
    for i in range(48 if quick else 96):
        g = rng.choices(range(12), weights)[0]
        requests.append(Request(system + shots[g] + tok.encode(f"\nQ{i}: " + _text(rng, 1))[:32], 8, rid=i))
    return requests


def bench_tiers(model, tok, quick: bool) -> tuple[dict, str]:
    """The prefix cache's eviction rules on the real engine: LRU vs LSM-GNN's hybrid, without
    and with a victim tier (int8, or exact), and LRU given the tier's bytes as pool blocks."""
    pool_blocks, tier_blocks, cap = 112, 128, 8
    probe = BlockPool.for_model(model, 1)
    tier_as_pool = round(VictimTier(probe, tier_blocks, compress=True).bytes / probe.block_bytes)
    setups = [  # name, pool blocks, weight, tier blocks, int8
        ("LRU", pool_blocks, 0.0, 0, True),
        (f"LRU, pool + {tier_as_pool} blocks (the int8 tier's bytes)", pool_blocks + tier_as_pool, 0.0, 0, True),
        ("LRU + victim tier (int8)", pool_blocks, 0.0, tier_blocks, True),
        ("LSM-GNN hybrid", pool_blocks, 0.5, 0, True),
        ("LSM-GNN hybrid + victim tier (int8)", pool_blocks, 0.5, tier_blocks, True),
        ("LSM-GNN hybrid + victim tier (exact)", pool_blocks, 0.5, tier_blocks, False),
    ]
    reference = zipf_few_shot(tok, quick)  # every prefix cached: the tokens with nothing evicted
    Engine(model, BlockPool.for_model(model, 4096)).run(reference, Scheduler(cap))
    rows = []
    for name, blocks, weight, victims, int8 in setups:
        requests = zipf_few_shot(tok, quick)
        pool = BlockPool.for_model(model, blocks)
        tier = VictimTier(pool, victims, compress=int8) if victims else None
        stats = Engine(model, pool, prefix=PrefixCache(pool, weight=weight, tier=tier)).run(requests, Scheduler(cap))
        same = sum(r.output == ref.output for r, ref in zip(requests, reference)) / len(requests)
        rows.append(dict(setup=name, **stats.row(), tier_mib=tier.bytes / 2**20 if tier else 0.0,
                         pool_mib=pool.num_blocks * pool.block_bytes / 2**20, same_tokens=same))  # fmt: skip
        print(f"  {name}: computed {stats.computed_prompt_tokens}, {stats.tokens_per_s:.1f} tok/s", flush=True)
    base = rows[0]["computed_prompt_tokens"]
    for row in rows:
        row["vs_lru"] = row["computed_prompt_tokens"] / base
    n = len(reference)
    md = [
        f"### Eviction rules and victim tier in the real engine ({n} requests: 64-token system prompt + one of 12 "
        f"few-shot prefixes of 256 tokens drawn Zipf(1) + a question, 8 new tokens; {pool_blocks}-block pool, batch "
        f"cap {cap}, look-ahead = the waiting queue)",
        "",
        table(
            rows,
            [
                ("setup", "setup", ""),
                ("computed_prompt_tokens", "prompt tokens computed", ","),
                ("vs_lru", "x LRU", ".2f"),
                ("restored_blocks", "blocks restored", ""),
                ("demoted_blocks", "blocks demoted", ""),
                ("tokens_per_s", "tokens/s", ".1f"),
                ("pool_mib", "pool MiB", ".1f"),
                ("tier_mib", "tier MiB", ".1f"),
                ("same_tokens", "tokens = no eviction", ".3f"),
            ],
        ),
        "",
    ]
    return {"rows": rows}, "\n".join(md)


def rag_workload(tok, n_requests: int, needles_per_prompt: int, seed: int):
    """RAG prompts: a header, 4 chunks (Zipf over a corpus; `needles_per_prompt` of them hold a
    magic number), and a question about the first needle."""
    rng = random.Random(seed)
    header = tok.encode("Some special magic numbers are hidden in the text below. Memorize them.\n")

    def chunk(needle: str | None) -> list[int]:
        sentences = [filler_sentence(rng) for _ in range(3)]
        if needle:
            sentences.insert(1, needle)
        return tok.encode(" ".join(sentences) + " ")

    fillers = [chunk(None) for _ in range(40)]
    needles = []
    for _ in range(40):
        key, value = _magic_key(rng), str(rng.randrange(10**6, 10**7))
        needles.append((chunk(f"One of the special magic numbers for {key} is: {value}."), key, value))
    weights = [1.0 / (i + 1) for i in range(40)]
    out = []
    for _ in range(n_requests):
        picked = []
        while len(picked) < needles_per_prompt:
            i = rng.choices(range(40), weights)[0]
            if i not in picked:
                picked.append(i)
        rest = []
        while len(rest) < 4 - needles_per_prompt:
            i = rng.choices(range(40), weights)[0]
            if i not in rest:
                rest.append(i)
        chunks = [needles[i][0] for i in picked] + [fillers[i] for i in rest]
        rng.shuffle(chunks)
        key, value = needles[picked[0]][1:]
        question = tok.encode(f"\nWhat is the special magic number for {key}? The special magic number for {key} is: ")
        out.append((chunks, question, value))
    return header, out


def _decode(model, cache, logits, n: int) -> list[int]:
    out, token = [], logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(n):
        out.append(int(token))
        token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return out


def prefix_caching_cost(header, prompts, pool_blocks: int) -> list[int]:
    """Prompt tokens prefix caching computes per request (radix tree, LRU, `pool_blocks` blocks)."""
    pool = BlockPool(1, 1, 1, pool_blocks)
    cache = PrefixCache(pool)
    computed = []
    for chunks, question, _ in prompts:
        prompt = header + [t for c in chunks for t in c] + question
        blocks, matched = cache.match(prompt)
        matched = min(matched, len(prompt) - 1)
        computed.append(len(prompt) - matched)
        need = -(-len(prompt) // 16) - len(blocks)
        if pool.num_free < need:
            cache.evict(need - pool.num_free)
        blocks = blocks + [pool.allocate() for _ in range(need)]
        cache.insert(prompt, blocks)
        for block in blocks:
            pool.decref(block)
    return computed


@torch.no_grad()
def bench_cachecraft(
    model, tok, quick: bool, store_blocks: int = 192, fractions: list[float] | None = None, plot: str | None = None
) -> tuple[dict, str]:
    """store_blocks: the chunk store (and prefix cache) size; 192 blocks hold ~20 of the 80 chunks."""
    n_requests = 24 if quick else 64
    if fractions is None:
        fractions = [0.0, 0.1, 0.25, 0.5, 1.0] if not quick else [0.0, 0.25, 1.0]
    rows, md = [], []
    for needles in (1, 4):
        header, prompts = rag_workload(tok, n_requests, needles, seed=needles)
        full = []
        for chunks, question, _ in prompts:
            prompt = header + [t for c in chunks for t in c] + question
            cache = DenseCache(model.config.n_layer)
            logits = model(torch.tensor([prompt]), cache=cache, last_only=True)
            full.append((logits, _decode(model, cache, logits, 8)))
        total = sum(len(header) + sum(len(c) for c in ch) + len(q) for ch, q, _ in prompts)
        prefix_each = prefix_caching_cost(header, prompts, store_blocks)
        prefix_cost, warm = sum(prefix_each), n_requests // 2  # warm: the second half (stores filled)
        prefix_warm = sum(prefix_each[warm:])
        correct_full = sum(tok.decode(f[1]).startswith(v) for f, (_, _, v) in zip(full, prompts)) / n_requests
        rows.append(
            dict(
                workload=f"{needles} needle(s)",
                method="prefix caching",
                computed=prefix_cost / total,
                vs_prefix=1.0,
                vs_prefix_warm=1.0,
                agreement=1.0,
                correct=correct_full,
                max_dlogit=0.0,
            )
        )
        for fraction in fractions:
            craft = CacheCraft(model, ChunkStore(BlockPool.for_model(model, store_blocks + 8), store_blocks), fraction)
            computed = agree = correct = computed_warm = 0
            dlogit = 0.0
            start = time.perf_counter()
            for i, ((chunks, question, value), (ref_logits, ref_tokens)) in enumerate(zip(prompts, full)):
                cache, logits, cost = craft.prefill(header, chunks, question)
                tokens = _decode(model, cache, logits, 8)
                computed += cost.computed
                computed_warm += cost.computed if i >= warm else 0
                agree += tokens == ref_tokens
                correct += tok.decode(tokens).startswith(value)
                dlogit = max(dlogit, float((logits - ref_logits).abs().max()))
            rows.append(
                dict(
                    workload=f"{needles} needle(s)",
                    method=f"cache-craft {fraction:.0%}",
                    fraction=fraction,
                    computed=computed / total,
                    vs_prefix=computed / prefix_cost,
                    vs_prefix_warm=computed_warm / prefix_warm,
                    agreement=agree / n_requests,
                    correct=correct / n_requests,
                    max_dlogit=dlogit,
                    evictions=craft.store.evictions,
                    seconds=time.perf_counter() - start,
                )
            )
            print(
                f"  cachecraft needles={needles} fraction={fraction}: computed {computed / total:.3f}, "
                f"agreement {agree / n_requests:.3f}",
                flush=True,
            )
    md += [
        f"### Cache-Craft vs prefix caching on RAG prompts ({n_requests} requests per workload, header + 4 chunks "
        "of ~100-150 tokens drawn Zipf from 40 filler + 40 needle chunks + question; store of "
        f"{store_blocks} blocks for both)",
        "",
        "computed = prompt tokens run through the model / all prompt tokens; x prefix caching: tokens computed "
        "relative to prefix caching, over all requests and over the second half (stores warm); "
        "agreement = the 8 greedy tokens "
        "equal those of full recomputation; correct = the answer is the needle's number; max |dlogit| = "
        "largest difference of the last prompt token's logits from full recomputation. Signal: Cache-Craft's "
        "inter-attention (share of each token's attention that went to the preceding chunks when the chunk-cache "
        "was made).",
        "",
        table(
            rows,
            [
                ("workload", "workload", ""),
                ("method", "method", ""),
                ("computed", "computed", ".3f"),
                ("vs_prefix", "x prefix caching", ".3f"),
                ("vs_prefix_warm", "x prefix caching, warm", ".3f"),
                ("agreement", "agreement", ".3f"),
                ("correct", "correct", ".3f"),
                ("max_dlogit", "max abs dlogit", ".3f"),
            ],
        ),
        "",
    ]
    _plot_cachecraft(rows, plot or str(RESULTS / "serving_cachecraft.png"))
    return {"rows": rows}, "\n".join(md)


@torch.no_grad()
def bench_ranking(model, tok, quick: bool) -> tuple[dict, str]:
    """Which tokens Cache-Craft recomputes: its inter-attention ranking vs a random and a
    reversed ranking with the same per-chunk budgets (each stored chunk's scores permuted or
    mirrored, which keeps its CCI), on 4-chunk prompts reused in another order."""
    rng_seeds = range(3 if quick else 6)
    rows = []
    for seed in rng_seeds:
        rng = random.Random(seed)
        header = tok.encode("Some special magic numbers are hidden in the text below. Memorize them.\n")
        chunks = [tok.encode(_text(rng, 2) + " ") for _ in range(4)]
        question = tok.encode("\nWhat is the magic number? The special magic number is: ")
        moved = [chunks[i] for i in (3, 1, 0, 2)]
        ref = model(torch.tensor([header + [t for c in moved for t in c] + question]),
                    cache=DenseCache(model.config.n_layer), last_only=True)  # fmt: skip
        for fraction in (0.1, 0.25):
            row = dict(seed=seed, fraction=fraction)
            for ranking in ("inter-attention", "random", "reversed"):
                store = ChunkStore(BlockPool.for_model(model, 256))
                CacheCraft(model, store, 0.0).prefill(header, chunks, question)
                g = torch.Generator().manual_seed(seed)
                for c in store.chunks.values():
                    if ranking == "random":
                        c.inter = c.inter[torch.randperm(c.length, generator=g)]
                    elif ranking == "reversed":
                        c.inter = c.inter.max() + c.inter.min() - c.inter
                _, logits, _ = CacheCraft(model, store, fraction).prefill(header, moved, question)
                row[ranking] = float((logits - ref).abs().max())
            rows.append(row)
            print(f"  ranking seed {seed} fraction {fraction}: {row}", flush=True)
    rankings = ("inter-attention", "random", "reversed")
    totals = []
    for f in (0.1, 0.25):
        some = [r for r in rows if r["fraction"] == f]
        totals.append(dict(fraction=f, **{k: sum(r[k] for r in some) for k in rankings},
                           wins=sum(r["inter-attention"] < r["random"] for r in some)))  # fmt: skip
    md = [
        f"### Cache-Craft's recompute ranking vs random / reversed ({len(rng_seeds)} prompts of 4 chunks, reused in "
        "another order; max |dlogit| of the last prompt token vs full recomputation, summed over prompts)",
        "",
        table(
            totals,
            [
                ("fraction", "recomputed", ".0%"),
                ("inter-attention", "inter-attention", ".3f"),
                ("random", "random", ".3f"),
                ("reversed", "reversed", ".3f"),
                ("wins", "prompts where inter-attention < random", ""),
            ],
        ),
        "",
    ]
    return {"rows": rows, "totals": totals}, "\n".join(md)


def _plot_cachecraft(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for workload in dict.fromkeys(r["workload"] for r in rows):
        craft = [r for r in rows if r["workload"] == workload and "fraction" in r]
        ax.plot([r["computed"] for r in craft], [r["agreement"] for r in craft], "-o", label=f"cache-craft, {workload}")
        prefix = [r for r in rows if r["workload"] == workload and "fraction" not in r][0]
        ax.plot([prefix["computed"]], [1.0], "s", label=f"prefix caching, {workload}")
    ax.set_xlabel("prompt tokens computed (fraction of all)")
    ax.set_ylabel("answer agreement with full recomputation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "serving"), help="prefix of the .json / .md outputs")
    parser.add_argument("--store-blocks", type=int, default=192, help="cachecraft: chunk store / prefix cache blocks")
    parser.add_argument("--fractions", default=None, help="cachecraft: recompute fractions, e.g. 0,0.25,0.5")
    parser.add_argument("--model", default="bundled", help="bundled, smollm2 or a checkpoint folder (model sections)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}")
    model = tok = None
    if set(sections) - {"throughput", "policies"}:
        model, tok = load_model(args.model)
        model.eval()
        print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)", flush=True)
    for section in sections:
        start = time.perf_counter()
        print(f"[{section}]", flush=True)
        if section == "throughput":
            data, md = bench_throughput(args.quick)
        elif section == "policies":
            data, md = bench_policies(args.quick)
        elif section == "share":
            data, md = bench_share(model, tok, args.quick)
        elif section == "batchllm":
            data, md = bench_batchllm(model, tok, args.quick)
        elif section == "tiers":
            data, md = bench_tiers(model, tok, args.quick)
        elif section == "ranking":
            data, md = bench_ranking(model, tok, args.quick)
        else:
            fractions = None if args.fractions is None else [float(f) for f in args.fractions.split(",")]
            data, md = bench_cachecraft(
                model, tok, args.quick, args.store_blocks, fractions, plot=f"{args.out}_cachecraft.png"
            )
        seconds = time.perf_counter() - start
        data["seconds"], data["quick"] = seconds, args.quick
        Path(f"{args.out}_{section}.json").write_text(json.dumps(data, indent=1, default=float))
        extra = "".join(
            f" --{name.replace('_', '-')} {value}"
            for name, value in (
                ("store_blocks", args.store_blocks), ("fractions", args.fractions), ("model", args.model),
                ("out", args.out),
            )  # fmt: skip
            if value != parser.get_default(name)
        ) + (" --quick" if args.quick else "")
        md += f"\n(section wall time {seconds:.0f} s; `python -m bench.serving --sections {section}{extra}`)\n"
        Path(f"{args.out}_{section}.md").write_text(md)
        print(md, flush=True)
    # the combined report: every section's latest tables
    found = [Path(f"{args.out}_{name}.md") for name in SECTIONS]
    Path(f"{args.out}.md").write_text("\n".join(f.read_text() for f in found if f.exists()))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
