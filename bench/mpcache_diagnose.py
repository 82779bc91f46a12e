"""Where MPCache loses the needle: per layer and KV head, does the token the next digit copies survive each stage?

    python -m bench.mpcache_diagnose --model smollm2 --tasks passkey,niah --lengths 1024,2048 --samples 4 \\
        --budget 0.1 --store /tmp/prefills --json bench/results/smollm2_mpcache_diagnose.json

Each sample's answer is teacher-forced (the correct digits are fed back), once with a full cache and once with
MPCache, so every decode step asks the same question of both. Decode step j predicts answer token j (j >= 1; token
0 comes from the prompt's full attention); its "target" is the needle's copy of that token (every occurrence in
the prompt). Per step, layer and KV head the MPCache run records, for the layer's own selection and for the one
attention read (with cross-layer sharing an odd layer reads the even layer's):

- full: the attention the target gets from the full cache (max over the KV head's query heads): a head with
  full >= --head-threshold needs the target (a retrieval head for this step);
- static: the target survived look-once static eviction;
- level1 / level2: its 32-token parent / 16-token child cluster was chosen by the layer's own selection;
- read: it is among the slots attention read (the shared selection on reusing layers);
- rank2: rank of its child cluster's similarity score among the child clusters (0 = best), and rank_exact the rank
  by max_k q.k (what an exact cluster score would say).

It prints the survival rates over the (step, layer, head) cells that need the target, per stage and per layer,
and the teacher-forced probability of each correct digit under both caches. The prefill is recorded once per
prompt and kept in --store (mpcache.methods.shared_prefill.PrefillStore), shared with bench.mpcache_real.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mpcache.eval.runner import load_model, parse_budget, prompt_text, task_samples
from mpcache.kernels import attention_probs
from mpcache.methods.base import (
    chunk_ids,
    chunk_min_max,
    chunks_to_slots,
    group_queries,
    resolve_budget,
    top_mask,
)
from mpcache.methods.mpcache import MPCache, cluster_levels, cluster_similarity, exact_similarity, middle
from mpcache.methods.shared_prefill import PrefillRecord, PrefillStore, replay_prefill
from mpcache.model.cache import KVCache, LayerKV
from mpcache.model.transformer import Transformer


def needle_positions(prompt: list[int], answer: list[int]) -> list[list[int]]:
    """Per answer token, its positions in every occurrence of the whole answer inside the prompt."""
    n = len(answer)
    starts = [i for i in range(len(prompt) - n + 1) if prompt[i : i + n] == answer]
    if not starts:
        raise ValueError("the answer's tokens do not occur in the prompt")
    return [[s + j for s in starts] for j in range(n)]


def target_attention(queries: Tensor, entry: Any, position: Tensor, targets: list[int]) -> Tensor:
    """Attention [Hkv] the slots at `targets` get from the step's query heads (max over each KV head's group)."""
    probs = attention_probs(queries, entry.keys, position, entry.positions, entry.valid)[:, :, :, 0]  # [B,H,G,L]
    hit = torch.isin(entry.positions, torch.tensor(targets)) & entry.valid
    return (probs * hit[:, :, None]).sum(-1).amax(2)[0]


class FullProbe(KVCache):
    """A full cache that records, per decode step and layer, the attention the step's target gets."""

    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self.targets: list[int] = []
        self.log: list[list[float]] = []

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        if queries.shape[2] == 1 and self.targets:
            entry = self.layers[layer]
            self.log.append(target_attention(queries, entry, query_positions, self.targets).tolist())


class MPCacheProbe(MPCache):
    """MPCache that records, per decode step, layer and KV head, the target's fate at every stage."""

    targets: list[int]
    log: list[dict[str, Any]]
    own_picks: dict[int, list[set[int]]] = {}  # this step's own choice (positions per KV head) of the last layers

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        super().observe(layer, queries, query_positions)
        if queries.shape[2] != 1 or self.forwards[layer] == 0 or not getattr(self, "targets", None):
            return
        entry = self.layers[layer]
        assert entry is not None and self.budget_tokens is not None
        k = self.knobs
        grouped = group_queries(queries, entry.keys.shape[1])[:, :, :, 0]
        parents, children = cluster_levels(
            grouped,
            entry.keys,
            entry.valid,
            self.budget_tokens,
            k.alpha,
            k.cluster_size,
            k.subcluster_size,
            k.ratio1,
            k.similarity,
            k.topk,
            k.group,
        )
        hit = torch.isin(entry.positions, torch.tensor(self.targets)) & entry.valid  # [1, H, L]
        chosen = self.selected[layer]
        read = torch.zeros_like(hit)
        if chosen is None:
            read = entry.valid.clone()
        else:
            index, count = chosen
            used = torch.arange(index.shape[-1]) < count[..., None]
            read.scatter_(2, index, used)
        kmax, kmin, nonempty = chunk_min_max(entry.keys, entry.valid, k.subcluster_size)
        child_scores = cluster_similarity(grouped, kmax, kmin, k.alpha, k.similarity, k.group, middle(nonempty))
        exact = exact_similarity(grouped, entry.keys, entry.valid, k.subcluster_size, k.group, middle(nonempty))
        ids1 = chunk_ids(entry.valid, k.cluster_size)
        ids2 = chunk_ids(entry.valid, k.subcluster_size)
        attention = target_attention(queries, entry, query_positions, self.targets)
        own = chunks_to_slots(children, entry.valid, k.subcluster_size)
        picked = [set(entry.positions[0, h][own[0, h]].tolist()) for h in range(own.shape[1])]
        before = self.own_picks.get(layer - 1)
        self.own_picks = {layer: picked} | ({} if layer == 0 else {layer - 1: before})
        for h in range(entry.keys.shape[1]):
            slots = hit[0, h].nonzero().flatten()
            cell: dict[str, Any] = {"layer": layer, "head": h, "static": bool(len(slots))}
            cell["attn_kept"] = float(attention[h])
            if before is not None:  # adjacent layers' own choices: the share of this one the previous one also read
                cell["overlap_prev"] = len(picked[h] & before[h]) / max(len(picked[h]), 1)
            if len(slots):
                c1, c2 = ids1[0, h, slots], ids2[0, h, slots]
                valid_children = int((ids2[0, h] >= 0).any()) and int(ids2[0, h].max()) + 1
                order = child_scores[0, h, :valid_children].argsort(descending=True).argsort()
                order_exact = exact[0, h, :valid_children].argsort(descending=True).argsort()
                cell |= {
                    "level1": bool(parents[0, h, c1].any()),
                    "level2": bool(children[0, h, c2].any()),
                    "read": bool(read[0, h, slots].any()),
                    "rank2": int(order[c2].min()),
                    "rank_exact": int(order_exact[c2].min()),
                    "children": valid_children,
                }
            else:
                cell |= {"level1": False, "level2": False, "read": False}
            self.log.append(cell)


class OracleMPCache(MPCache):
    """MPCache whose decode-time choice is made by the true attention (an upper bound of any similarity, not a
    method): static eviction and sharing as configured, then per KV head the `budget` slots ("token") or the
    budget // subcluster_size sub-clusters ("cluster", the first and last always) that receive the most attention
    from the step's query heads (summed, or their max with group="max")."""

    name = "mpcache-oracle"

    def __init__(self, n_layer: int, budget: Any, *, granularity: str = "cluster", **options: Any) -> None:
        super().__init__(n_layer, budget, **options)
        if granularity not in ("token", "cluster"):
            raise ValueError(f"granularity must be 'token' or 'cluster', got {granularity!r}")
        self.granularity = granularity

    def choose(self, entry: LayerKV, queries: Tensor, query_positions: Tensor) -> Tensor:
        assert self.budget_tokens is not None
        probs = attention_probs(queries, entry.keys, query_positions, entry.positions, entry.valid)[:, :, :, 0]
        mass = probs.sum(2) if self.knobs.group == "sum" else probs.amax(2)  # [B, H, L]
        mass = mass.masked_fill(~entry.valid, float("-inf"))
        budget = self.budget_tokens[:, None].expand(mass.shape[:2])
        if self.granularity == "token":
            mask = top_mask(mass, budget)
        else:
            size = self.knobs.subcluster_size
            ids = chunk_ids(entry.valid, size)
            n = int(ids.max()) + 1
            per = mass.new_zeros(*mass.shape[:2], n + 1).scatter_add_(
                2, torch.where(ids < 0, n, ids), mass.clamp(min=0)
            )[..., :n]
            last = (entry.valid.sum(-1, keepdim=True) - 1) // size
            per[..., :1] = float("inf")
            per = per.scatter(-1, last, float("inf"))
            chosen = top_mask(per, (budget // size).clamp(min=2))
            mask = chosen.gather(-1, ids.clamp(min=0)) & entry.valid
        return mask


@torch.no_grad()
def teacher_forced(
    model: Transformer, cache: KVCache, prefill: tuple[PrefillRecord, Tensor], answer: list[int], targets: list
) -> list[float]:
    """Feed the correct answer; returns the probability of each answer token. Sets cache.targets per step."""
    record, logits = prefill
    replay_prefill(cache, record)
    probs = [float(logits[0, -1].softmax(-1)[answer[0]])]
    position = cache.seen_tokens
    for j in range(1, len(answer)):
        cache.targets = targets[j]
        token, at = torch.tensor([[answer[j - 1]]]), torch.tensor([[position]])
        logits = model(token, cache=cache, positions=at, last_only=True)
        probs.append(float(logits[0, -1].softmax(-1)[answer[j]]))
        position += 1
    return probs


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    model, tok = load_model(args.model)
    store = PrefillStore(args.store)
    cells, steps = [], []
    for task in args.tasks:
        for length in args.lengths:
            for index, sample in enumerate(task_samples(tok, task, length, args.samples, seed=args.seed)):
                start = time.perf_counter()
                prompt, answer = tok.encode(prompt_text(tok, sample)), tok.encode(sample.answer, add_bos=False)
                targets = needle_positions(prompt, answer)
                prefill = store.get(model, torch.tensor([prompt]))
                full = FullProbe(model.config.n_layer)
                full_probs = teacher_forced(model, full, prefill, answer, targets)
                probe = MPCacheProbe(model.config.n_layer, args.budget, **args.method_kwargs)
                probe.log = []
                mp_probs = teacher_forced(model, probe, prefill, answer, targets)
                n_layer, n_kv = model.config.n_layer, model.config.n_kv_head
                budget = int(resolve_budget(args.budget, torch.tensor([len(prompt)]))[0])
                for j in range(1, len(answer)):
                    for layer in range(n_layer):
                        full_attn = full.log[(j - 1) * n_layer + layer]
                        at = ((j - 1) * n_layer + layer) * n_kv
                        for cell in probe.log[at : at + n_kv]:
                            cells.append(
                                cell
                                | {
                                    "task": task,
                                    "length": length,
                                    "sample": index,
                                    "step": j,
                                    "full": full_attn[cell["head"]],
                                }
                            )
                steps.append(
                    {
                        "task": task,
                        "length": length,
                        "sample": index,
                        "prompt": len(prompt),
                        "budget": budget,
                        "full_probs": full_probs,
                        "mpcache_probs": mp_probs,
                    }
                )
                print(
                    f"{task} {length} #{index}: P(digit) full {[round(p, 2) for p in full_probs]} "
                    f"mpcache {[round(p, 2) for p in mp_probs]} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    return {"args": {k: str(v) for k, v in vars(args).items()}, "cells": cells, "steps": steps}


def summary(result: dict[str, Any], threshold: float, n_layer: int) -> str:
    """Survival rates over the cells that need the target (full attention >= threshold)."""
    need = [c for c in result["cells"] if c["full"] >= threshold]
    lines = [f"cells needing the target (full attention >= {threshold}): {len(need)} of {len(result['cells'])}"]
    if not need:
        return "\n".join(lines)
    for stage in ("static", "level1", "level2", "read"):
        lines.append(f"  {stage:7s} {sum(c[stage] for c in need) / len(need):.2f}")
    ranked = [c for c in need if "rank2" in c]
    if ranked:
        mean = lambda key: sum(c[key] for c in ranked) / len(ranked)
        lines.append(
            f"  child rank by similarity {mean('rank2'):.1f}, by exact max q.k {mean('rank_exact'):.1f} "
            f"(of {mean('children'):.0f} children)"
        )
    lines.append("per layer (cells needing it: static / level1 / level2 / read):")
    for layer in range(n_layer):
        mine = [c for c in need if c["layer"] == layer]
        if mine:
            stages = ("static", "level1", "level2", "read")
            rates = " / ".join(f"{sum(c[s] for c in mine) / len(mine):.2f}" for s in stages)
            lines.append(f"  layer {layer:2d} ({len(mine):3d}): {rates}")
    overlap = [[c["overlap_prev"] for c in result["cells"] if c["layer"] == layer and "overlap_prev" in c]
               for layer in range(n_layer)]  # fmt: skip
    lines.append("overlap of each layer's own choice with the previous layer's (all cells), layers 1..:")
    lines.append("  " + " ".join(f"{sum(o) / len(o):.2f}" if o else "-" for o in overlap[1:]))
    probs_full = [p for s in result["steps"] for p in s["full_probs"][1:]]
    probs_mp = [p for s in result["steps"] for p in s["mpcache_probs"][1:]]
    lines.append(
        f"mean P(correct digit), steps >= 1: full {sum(probs_full) / len(probs_full):.2f}, "
        f"mpcache {sum(probs_mp) / len(probs_mp):.2f}"
    )
    return "\n".join(lines)


def static_sweep(args: argparse.Namespace, variants: dict[str, dict[str, Any]]) -> str:
    """Static eviction alone, per variant of the knobs: the share of the cells of --cells (a diagnosis JSON) that
    need their target (full attention >= --head-threshold) whose target survives the variant's keep-set. Only
    the prompts' attention is replayed (no decoding), so many variants cost little."""
    model, tok = load_model(args.model)
    store = PrefillStore(args.store)
    cells = [c for c in json.loads(args.cells.read_text())["cells"] if c["full"] >= args.head_threshold]
    kept = {name: [] for name in variants}
    for task in args.tasks:
        for length in args.lengths:
            for index, sample in enumerate(task_samples(tok, task, length, args.samples, seed=args.seed)):
                mine = [c for c in cells if (c["task"], c["length"], c["sample"]) == (task, length, index)]
                if not mine:
                    continue
                prompt, answer = tok.encode(prompt_text(tok, sample)), tok.encode(sample.answer, add_bos=False)
                targets = needle_positions(prompt, answer)
                prefill = store.get(model, torch.tensor([prompt]))
                for name, options in variants.items():
                    cache = MPCache(model.config.n_layer, args.budget, **{**args.method_kwargs, **options})
                    replay_prefill(cache, prefill[0])
                    for c in mine:
                        entry = cache.layers[c["layer"]]
                        assert entry is not None
                        slots = entry.positions[0, c["head"]][entry.valid[0, c["head"]]]
                        kept[name].append(bool(torch.isin(slots, torch.tensor(targets[c["step"]])).any()))
    lines = [f"static survival of the {len(next(iter(kept.values())))} cells that need their target:"]
    lines += [f"  {name:40s} {sum(k) / max(len(k), 1):.3f}" for name, k in kept.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mpcache_diagnose", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="passkey,niah")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=parse_budget, default=0.1)
    parser.add_argument("--method-kwargs", type=json.loads, default={})
    parser.add_argument("--head-threshold", type=float, default=0.1)
    parser.add_argument("--store", type=Path, required=True, help="folder of recorded prefills (shared by runs)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--static-sweep",
        type=json.loads,
        default=None,
        help='{"name": {knobs}, ...}: static eviction alone per variant, on the cells of --cells',
    )
    parser.add_argument("--cells", type=Path, default=None, help="a diagnosis JSON (for --static-sweep)")
    args = parser.parse_args(argv)
    args.tasks = args.tasks.split(",")
    args.lengths = [int(n) for n in args.lengths.split(",")]
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.static_sweep is not None:
        if args.cells is None:
            parser.error("--static-sweep needs --cells")
        print(static_sweep(args, args.static_sweep))
        print(f"({time.perf_counter() - start:.0f} s)")
        return
    result = diagnose(args)
    text = summary(result, args.head_threshold, max(c["layer"] for c in result["cells"]) + 1)
    print(text)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json is not None:
        result["summary"] = text
        args.json.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
