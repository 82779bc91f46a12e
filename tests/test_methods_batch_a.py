"""Properties of CAKE, KVMerger, Elastic Cache, D2O, CompressKV and LazyEviction.

The method matrix in test_methods.py covers sizes, batching and the full-cache limit; here each
method's own rule is recomputed from recorded queries, keys and values with plain loops (or a
closed form) and compared with what the cache kept, so a wrong score, split or merge fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_methods import PROMPT, VOCAB, assert_top_set, batch, kept_positions, manual_probs, run
from test_methods import tiny_model as make_tiny_model
from torch import Tensor

from mpcache.generate import generate
from mpcache.methods import make_policy
from mpcache.methods.base import PolicyCache, split_bounded
from mpcache.methods.cake import CAKE
from mpcache.methods.compresskv import (
    CompressKV,
    error_aware_budgets,
    layer_eviction_errors,
    needle_probes,
    rank_heads,
    retrieval_head_scores,
)
from mpcache.methods.d2o import D2O
from mpcache.methods.elastic_cache import ElasticCache
from mpcache.methods.full import FullCache
from mpcache.methods.kvmerger import KVMerger, merging_sets
from mpcache.methods.lazyeviction import LazyEviction, rank_with_recency, recurrence_priority, update_recurrence
from mpcache.model import ModelConfig, Transformer
from mpcache.model.tokenizer import ByteTokenizer


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request) -> Transformer:
    return make_tiny_model(request.param)


class Snap:
    """Mixin recording, per layer and forward, everything attention saw (before any compression)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[list[dict]] = [[] for _ in self.layers]

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        entry = self.layers[layer]
        self.seen[layer].append(
            {
                "q": queries.clone(),
                "qpos": query_positions.clone(),
                "qvalid": self.step_valid.clone(),
                "keys": entry.keys.clone(),
                "values": entry.values.clone(),
                "pos": entry.positions.clone(),
                "valid": entry.valid.clone(),
            }
        )
        super().observe(layer, queries, query_positions)


def snap(cls: type[PolicyCache], model: Transformer, budget, **kwargs) -> PolicyCache:
    return type("Snap" + cls.__name__, (Snap, cls), {}).from_model(model, budget, **kwargs)


def head_tokens(s: dict, row: int, head: int) -> tuple[list[int], Tensor, Tensor]:
    """(positions, keys, values) of one head's valid slots in a snapshot, in slot order."""
    valid = s["valid"][row, head]
    return s["pos"][row, head][valid].tolist(), s["keys"][row, head][valid], s["values"][row, head][valid]


def stored(cache: PolicyCache, layer: int, row: int, head: int) -> dict[int, tuple[Tensor, Tensor]]:
    """position -> (key, value) of what a head holds now."""
    e = cache.layers[layer]
    valid = e.valid[row, head]
    return {
        int(p): (k, v)
        for p, k, v in zip(e.positions[row, head][valid], e.keys[row, head][valid], e.values[row, head][valid])
    }


def received(s: dict) -> Tensor:
    """Attention every slot received from the snapshot's (valid) queries per query head [B, Hkv, G, L]."""
    p = manual_probs(s["q"], s["keys"], s["qpos"], s["pos"], s["valid"])
    return (p * s["qvalid"][:, None, None, :, None]).sum(3)


# ------------------------------------------------------------------------------- CAKE
def test_split_bounded_sums_caps_and_is_proportional() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = torch.rand(3, 6, generator=g) ** 3
        total = torch.randint(0, 400, (3,), generator=g)
        high = torch.randint(0, 120, (3, 6), generator=g)
        out = split_bounded(total, w, high)
        assert out.sum(-1).tolist() == torch.minimum(total, high.sum(-1)).tolist()
        assert bool((out >= 0).all() and (out <= high).all())
        assert torch.equal(out, split_bounded(total, w * 7.5, high))  # only ratios matter
        free = out < high  # uncapped layers share the rest in proportion to their weights
        for r in range(3):
            idx = free[r].nonzero().flatten().tolist()
            rest = int(total[r]) - int(out[r][~free[r]].sum())
            if idx and rest <= int(high[r][idx].sum()):
                share = rest * w[r, idx].double() / w[r, idx].double().sum()
                assert bool(((out[r, idx] - share).abs() < 1).all()), (out[r], share)
    # the more a layer prefers, the more it gets
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = split_bounded(torch.tensor([100]), w, torch.tensor([[100, 100, 100, 100]]))
    assert out.tolist() == [[10, 20, 30, 40]]


def cake_reference(s: dict, w: int, gamma: float) -> tuple[Tensor, Tensor]:
    """(preference [B], indicator [B, Hkv, L]) written out from a prefill snapshot."""
    p = manual_probs(s["q"][:, :, -w:], s["keys"], s["qpos"][:, -w:], s["pos"], s["valid"])  # [B, Hkv, G, w, L]
    valid = s["valid"]
    newest = valid.flip(-1).long().cumsum(-1).flip(-1) <= w
    older = (valid & ~newest)[:, :, None, None, :]
    a = p.double() * older
    mean = a.mean(3)
    var = a.var(3, unbiased=True)
    entropy = -(a * torch.log(a + 1e-10)).sum((1, 2, 3, 4))
    preference = entropy * var.sum((1, 2, 3))
    indicator = (mean + gamma * var).float()
    pooled = F.avg_pool1d(indicator.flatten(0, 2)[:, None], 5, 1, 2).view(indicator.shape)
    return preference, pooled.mean(2)


def test_cake_budgets_follow_preference_and_keep_top_indicator(model: Transformer) -> None:
    ids, mask = batch()
    budget, w, gamma, n_layer = 12, 4, 200.0, model.config.n_layer
    cache = snap(CAKE, model, budget, window=w)
    run(model, cache, ids, mask, steps=0)
    prefs, indicators = zip(*(cake_reference(cache.seen[layer][0], w, gamma) for layer in range(n_layer)), strict=True)
    prefs = torch.stack(prefs, -1)  # [B, L]
    assert torch.allclose(prefs, torch.stack(cache.preference, -1), rtol=1e-4)
    for row in range(2):
        got = cache.budgets[row] - w
        assert int(got.sum()) == n_layer * (budget - w)  # the total, exactly
        share = n_layer * (budget - w) * prefs[row] / prefs[row].sum()
        assert bool(((got - share).abs() < 1).all()), (got, share)  # in proportion to the preference
    for layer in range(n_layer):
        s = cache.seen[layer][0]
        for row, heads in enumerate(kept_positions(cache, layer)):
            for head, kept in enumerate(heads):
                pos, _, _ = head_tokens(s, row, head)
                valid = s["valid"][row, head]
                scores = dict(zip(pos, indicators[layer][row, head][valid].tolist(), strict=True))
                assert_top_set(kept, scores, set(pos[-w:]), int(cache.budgets[row, layer]))


def test_cake_cascading_only_shrinks_and_ends_where_one_shot_does(model: Transformer) -> None:
    ids, mask = batch()
    budget, w, n_layer = 12, 4, model.config.n_layer

    class Held(CAKE):
        """Records, as each layer starts, how many tokens the layers before it hold."""

        def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
            self.held = getattr(self, "held", [])
            if self.forwards[layer] == 0:
                self.held.append(sum(self.tokens_per_head(k).amax(-1) for k in range(layer)))
            super().observe(layer, queries, query_positions)

    cascading = Held.from_model(model, budget, window=w)
    run(model, cascading, ids, mask, steps=0)
    once = make_policy("cake", budget, window=w, cascading=False)(model)
    run(model, once, ids, mask, steps=0)
    stages = cascading.stages
    assert len(stages) == n_layer and len(once.stages) == 1
    for m, (earlier, later) in enumerate(zip(stages, stages[1:], strict=False)):
        assert bool((later[:, : m + 1] <= earlier[:, : m + 1]).all())  # a prefilled layer's budget never grows
    for m in range(1, n_layer):  # when layer m starts, layers 0..m-1 hold at most the total plus their windows
        assert bool((cascading.held[m] <= n_layer * (budget - w) + m * w).all()), (m, cascading.held[m])
    assert torch.equal(stages[-1], once.budgets)
    assert all(kept_positions(cascading, layer) == kept_positions(once, layer) for layer in range(n_layer))


def test_cake_without_variance_on_mha_is_snapkv_at_its_layer_budgets() -> None:
    model = make_tiny_model("gpt2")  # G = 1: the group mean is the head itself
    ids, _ = batch(pad=0)
    ids, mask = ids[:1], torch.ones_like(ids[:1])
    cake = make_policy("cake", 12, window=4, gamma=0.0)(model)
    run(model, cake, ids, mask, steps=0)
    assert len(set(cake.budgets[0].tolist())) > 1  # the layers really differ
    snapkv = make_policy("snapkv", 12, window=4, layer_weights=cake.budgets[0].tolist())(model)
    run(model, snapkv, ids, mask, steps=0)
    for layer in range(model.config.n_layer):
        assert kept_positions(cake, layer) == kept_positions(snapkv, layer)


def test_cake_decoding_evicts_by_the_new_query(model: Transformer) -> None:
    ids, mask = batch()
    w = 4
    cache = snap(CAKE, model, 12, window=w)

    def check(step: int) -> None:
        if step == 0:
            return
        for layer in range(model.config.n_layer):
            s = cache.seen[layer][-1]
            vote = received(s)
            newest = s["valid"].flip(-1).long().cumsum(-1).flip(-1) <= w
            vote = vote.masked_fill(newest[:, :, None], 0.0)
            vote = F.avg_pool1d(vote.flatten(0, 2)[:, None], 5, 1, 2).view(vote.shape).mean(2)
            for row, heads in enumerate(kept_positions(cache, layer)):
                for head, kept in enumerate(heads):
                    pos, _, _ = head_tokens(s, row, head)
                    scores = dict(zip(pos, vote[row, head][s["valid"][row, head]].tolist(), strict=True))
                    assert_top_set(kept, scores, set(pos[-w:]), int(cache.budgets[row, layer]))

    run(model, cache, ids, mask, on_step=check)


# --------------------------------------------------------------------------- KVMerger
def test_kvmerger_merges_runs_of_equal_keys_into_their_exact_means() -> None:
    a, b, c = torch.eye(4)[:3] * 3
    keys = torch.stack([a, a, a, b, c, c, b])[None, None]  # [1, 1, 7, 4]
    valid = torch.ones(1, 1, 7, dtype=torch.bool)
    fixed = torch.zeros_like(valid)
    fixed[..., -1] = True  # the newest token stays on its own
    sets = merging_sets(keys, valid, fixed, torch.tensor([[3]]), threshold=0.75)
    assert sets[0, 0].tolist() == [0, 0, 0, 1, 2, 2, 3]
    sets = merging_sets(keys, valid, fixed, torch.tensor([[2]]), threshold=0.75)  # ties: any two of three links
    assert sets[0, 0].max() == 4 and bool((sets[0, 0].diff() >= 0).all())
    assert merging_sets(keys, valid, fixed, torch.tensor([[3]]), threshold=1.5)[0, 0].tolist() == list(range(7))
    # end to end: equal keys merge to themselves, values to the (Gaussian weights = 1) plain mean
    cache = KVMerger(1, 4, threshold=0.75, recent_ratio=0.25, heavy_ratio=0.0)
    values = torch.arange(28.0).view(1, 1, 7, 4)
    cache.update(0, keys, values, torch.arange(7)[None], torch.ones(1, 7, dtype=torch.bool))
    cache.slot_state(0, "accumulated").copy_(torch.tensor([[[0.1, 0.5, 0.2, 0.3, 0.4, 0.1, 0.2]]]))
    cache.compress(0, torch.zeros(1, 1, 1, 4), torch.tensor([[6]]))
    e = cache.layers[0]
    assert e.positions[0, 0].tolist() == [1, 3, 4, 6]  # each set sits at its pivot (most attended member)
    assert torch.equal(e.keys[0, 0], torch.stack([a, b, c, b]))
    assert torch.allclose(
        e.values[0, 0],
        torch.stack([values[0, 0, :3].mean(0), values[0, 0, 3], values[0, 0, 4:6].mean(0), values[0, 0, 6]]),
    )


def kvmerger_reference(pos, keys, values, acc, budget, threshold, sigma, recent_ratio, heavy_ratio):
    """Loop-by-loop KVMerger for one head: position -> (key, value) of what it keeps."""
    n = len(pos)
    if n <= budget:
        return {p: (keys[i], values[i]) for i, p in enumerate(pos)}
    n_recent = budget - int(budget * (1 - recent_ratio))
    fixed = set(range(n - n_recent, n))
    rest = sorted(set(range(n)) - fixed, key=lambda i: -acc[i])
    fixed |= set(rest[: min(int(budget * heavy_ratio), budget - len(fixed))])
    links = []
    for i in range(n - 1):
        sim = float(F.cosine_similarity(keys[i], keys[i + 1], dim=0))
        if i not in fixed and i + 1 not in fixed and sim > threshold:
            links.append((sim, i))
    joined = {i for _, i in sorted(links, reverse=True)[: n - budget]}
    sets, current = [], [0]
    for i in range(1, n):
        if i - 1 in joined:
            current.append(i)
        else:
            sets.append(current)
            current = [i]
    sets.append(current)
    merged = []
    for members in sets:
        pivot = max(members, key=lambda i: (acc[i], -i))
        g = torch.tensor([math.exp(-float((keys[pivot] - keys[i]).pow(2).sum()) / (2 * sigma**2)) for i in members])
        wts = g / g.sum()
        k = sum(wt * keys[i] for wt, i in zip(wts, members, strict=True))
        v = sum(wt * values[i] for wt, i in zip(wts, members, strict=True))
        merged.append((pivot, members, k, v))
    if len(merged) > budget:  # evict the least attended unprotected sets
        order = sorted(merged, key=lambda m: (m[1][0] in fixed, acc[m[0]]), reverse=True)
        merged = order[:budget]
    return {pos[p]: (k, v) for p, _, k, v in merged}


@pytest.mark.parametrize("threshold", [-1.0, 0.3, 2.0])
def test_kvmerger_matches_a_loop_reference(model: Transformer, threshold: float) -> None:
    ids, mask = batch()
    budget, sigma = 12, 1.0
    cache = snap(KVMerger, model, budget, threshold=threshold, sigma=sigma)
    run(model, cache, ids, mask, steps=0)
    n_merged = 0
    for layer in range(model.config.n_layer):
        s = cache.seen[layer][0]
        acc = received(s).sum(2)
        for row in range(2):
            for head in range(model.config.n_kv_head):
                pos, keys, values = head_tokens(s, row, head)
                a = acc[row, head][s["valid"][row, head]].tolist()
                want = kvmerger_reference(pos, keys, values, a, budget, threshold, sigma, 0.17, 0.12)
                got = stored(cache, layer, row, head)
                assert sorted(got) == sorted(want), (layer, row, head)
                for p, (k, v) in want.items():
                    assert torch.allclose(got[p][0], k, atol=1e-5) and torch.allclose(got[p][1], v, atol=1e-5)
                    n_merged += not torch.equal(got[p][0], keys[pos.index(p)])
    if threshold > 1:
        assert n_merged == 0  # nothing is similar enough: plain eviction, untouched entries
    else:
        assert n_merged > 0


# ----------------------------------------------------------------------- Elastic Cache
def test_elastic_cache_anchors_buckets_and_means(model: Transformer) -> None:
    ids, mask = batch()
    budget = 12
    cache = snap(ElasticCache, model, budget, distance=4)
    run(model, cache, ids, mask, steps=0)
    for layer in range(model.config.n_layer):
        s = cache.seen[layer][0]
        importance = received(s).mean((1, 2))  # [B, L]: all query heads, all prompt queries
        kept = kept_positions(cache, layer)
        for row in range(2):
            pos, _, _ = head_tokens(s, row, 0)
            anchors = kept[row][0]
            assert all(h == anchors for h in kept[row])  # one anchor set per layer
            scores = dict(zip(pos, importance[row][s["valid"][row, 0]].tolist(), strict=True))
            assert_top_set(anchors, scores, {pos[0], pos[-1]}, budget)
            ordered = sorted(anchors)
            bucket = {a: [] for a in ordered}
            for p in pos:  # nearest anchor by position, ties to the earlier one
                best = min(ordered, key=lambda a: (abs(a - p), a))
                bucket[best].append(p)
            assert sum(len(v) for v in bucket.values()) == len(pos)
            for a, members in bucket.items():
                assert a in members and members == list(range(min(members), max(members) + 1))  # contiguous
            for head in range(model.config.n_kv_head):
                hp, keys, values = head_tokens(s, row, head)
                got = stored(cache, layer, row, head)
                for a, members in bucket.items():
                    idx = [hp.index(p) for p in members]
                    assert torch.allclose(got[a][0], keys[idx].mean(0), atol=1e-6)
                    assert torch.allclose(got[a][1], values[idx].mean(0), atol=1e-6)


def test_elastic_cache_evicts_at_the_fixed_truncation_point(model: Transformer) -> None:
    ids, mask = batch()
    budget, distance = 12, 4
    cache = make_policy("elastic_cache", budget, distance=distance)(model)
    history: list[list[list[list[int]]]] = []

    def check(step: int) -> None:
        layers = []
        for layer in range(model.config.n_layer):
            e = cache.layers[layer]
            layers.append(
                [[e.positions[r, h][e.valid[r, h]].tolist() for h in range(e.keys.shape[1])] for r in range(2)]
            )
        history.append(layers)
        if step == 0:
            return
        point = budget - distance  # merged prompt length - distance
        assert cache.truncation.tolist() == [point, point]
        for before, after in zip(history[-2], layers, strict=True):
            for rows_b, rows_a in zip(before, after, strict=True):
                for b, a in zip(rows_b, rows_a, strict=True):
                    assert len(a) == budget
                    assert a == b[:point] + b[point + 1 :] + [a[-1]]  # exactly index N_tl left; the head is frozen

    run(model, cache, ids, mask, steps=5, on_step=check)


# -------------------------------------------------------------------------------- D2O
def test_d2o_layer_budgets_follow_attention_density(model: Transformer) -> None:
    ids, mask = batch()
    budget, n_layer = 12, model.config.n_layer
    cache = snap(D2O, model, budget, first_dense=0, last_dense=0)
    run(model, cache, ids, mask, steps=1)
    sigma = []
    for layer in range(n_layer):
        s = cache.seen[layer][0]
        acc = received(s).flatten(1, 2)  # [B, Hq, L]
        row_sigma = []
        for row in range(2):
            x = acc[row][:, s["valid"][row, 0]].double()
            var = x.var(-1, unbiased=True)
            row_sigma.append(float(((var - var.min()) / (var.max() - var.min())).mean()))
        sigma.append(row_sigma)
    sigma = torch.tensor(sigma, dtype=torch.float64).T  # [B, L]
    assert torch.allclose(sigma, torch.stack(cache.sigma, -1).double(), atol=1e-6)
    for row in range(2):
        got = cache.budgets[row]
        assert int(got.sum()) == n_layer * budget
        weight = torch.softmax(-sigma[row], -1)
        assert bool(((got - 1 - n_layer * (budget - 1) * weight).abs() < 1).all())
        for i in range(n_layer):  # denser (lower variance) layers get more
            for j in range(n_layer):
                if sigma[row, i] < sigma[row, j]:
                    assert got[i] >= got[j]


def test_d2o_dense_layers_are_never_compressed(model: Transformer) -> None:
    ids, mask = batch()
    cache = make_policy("d2o", 12, first_dense=1, last_dense=0)(model)
    run(model, cache, ids, mask, steps=3)
    lengths = mask.sum(-1)
    assert cache.tokens_per_head(0)[:, 0].tolist() == (lengths + 3).tolist()
    total = sum(cache.tokens_per_head(layer)[:, 0] for layer in (1, 2))
    assert total.tolist() == [2 * 12, 2 * 12]


class RecordEvictions:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.evictions: list[dict] = []

    def evict(self, layer: int, index: Tensor, count: Tensor) -> None:
        e = self.layers[layer]
        before = {
            "keys": e.keys.clone(),
            "values": e.values.clone(),
            "pos": e.positions.clone(),
            "valid": e.valid.clone(),
        }
        super().evict(layer, index, count)
        self.evictions.append({"layer": layer, "before": before, "tau": self.tau[layer].clone()})


def test_d2o_merges_evicted_tokens_above_the_ema_threshold(model: Transformer) -> None:
    ids, mask = batch()
    alpha, beta, sink = 0.3, 0.7, 4
    cache = type("RecD2O", (RecordEvictions, D2O), {}).from_model(
        model, 12, first_dense=0, last_dense=0, alpha=alpha, beta=beta, sink=sink
    )
    tau = {}
    n_merged = 0

    def check(step: int) -> None:
        nonlocal n_merged
        for record in cache.evictions:
            layer, before = record["layer"], record["before"]
            for row in range(2):
                us, merged_into = [], {}
                for head in range(model.config.n_kv_head):
                    now = stored(cache, layer, row, head)
                    valid = before["valid"][row, head]
                    pos = before["pos"][row, head][valid].tolist()
                    keys, values = before["keys"][row, head][valid], before["values"][row, head][valid]
                    kept = [i for i, p in enumerate(pos) if p in now]
                    assert set(pos[:sink]) <= set(now)  # sinks always stay
                    for i, p in enumerate(pos):
                        if p in now:
                            continue
                        sims = [float(F.cosine_similarity(keys[i], keys[j], dim=0)) for j in kept]
                        best = max(range(len(kept)), key=lambda j: sims[j])
                        us.append(sims[best])
                        merged_into.setdefault((head, kept[best]), []).append((sims[best], i))
                    assert len(now) == int(cache.budgets[row, layer])
                key = (layer, row)
                mean_u = sum(us) / len(us)
                tau[key] = mean_u if key not in tau else alpha * tau[key] + beta * mean_u
                assert record["tau"][row].item() == pytest.approx(tau[key], abs=1e-5)
                for head in range(model.config.n_kv_head):
                    now = stored(cache, layer, row, head)
                    valid = before["valid"][row, head]
                    pos = before["pos"][row, head][valid].tolist()
                    keys, values = before["keys"][row, head][valid], before["values"][row, head][valid]
                    for c, p in enumerate(pos):
                        if p not in now:
                            continue
                        group = [(u, e) for u, e in merged_into.get((head, c), []) if u >= tau[key] - 1e-6]
                        n_merged += len(group)
                        want_k = (keys[c] + sum(u * keys[e] for u, e in group)) / (1 + len(group))
                        want_v = (values[c] + sum(u * values[e] for u, e in group)) / (1 + len(group))
                        assert torch.allclose(now[p][0], want_k, atol=1e-5), (layer, row, head, p)
                        assert torch.allclose(now[p][1], want_v, atol=1e-5)
        cache.evictions.clear()

    run(model, cache, ids, mask, steps=4, on_step=check)
    assert n_merged > 0


def test_d2o_without_merging_keeps_entries_untouched(model: Transformer) -> None:
    ids, mask = batch()
    full = make_policy("full")(model)
    run(model, full, ids, mask, steps=3)
    cache = make_policy("d2o", 12, first_dense=0, last_dense=0, merge=False)(model)
    run(model, cache, ids, mask, steps=3)
    first = [stored(full, 0, r, h) for r in range(2) for h in range(model.config.n_kv_head)]
    ours = [stored(cache, 0, r, h) for r in range(2) for h in range(model.config.n_kv_head)]
    for a, b in zip(first, ours, strict=True):  # layer 0 sees identical inputs: kept entries are the originals
        assert all(torch.equal(b[p][0], a[p][0]) and torch.equal(b[p][1], a[p][1]) for p in b)


# -------------------------------------------------------------------------- CompressKV
def test_compresskv_allocation_is_exact_bounded_and_error_ordered() -> None:
    g = torch.Generator().manual_seed(0)
    for budget in (8, 40, 128):
        errors = torch.rand(6, generator=g) ** 2
        out = error_aware_budgets(errors, torch.tensor([budget, budget]), 32, 3.0)
        low = min(32, budget)
        assert out.sum(-1).tolist() == [6 * budget] * 2
        assert bool((out >= low).all() and (out <= 3 * budget).all())
        order = errors.argsort()
        assert bool((out[0][order].diff() >= 0).all())  # more error, more budget


def compresskv_reference(s: dict, heads: list[int], w: int) -> Tensor:
    """Pooled SRH vote per slot [B, L] (window zeroed) from a prefill snapshot."""
    p = manual_probs(s["q"][:, :, -w:], s["keys"], s["qpos"][:, -w:], s["pos"], s["valid"])
    vote = p.sum(3).flatten(1, 2)[:, heads]  # [B, k, L]
    newest = s["valid"][:, :1].flip(-1).long().cumsum(-1).flip(-1) <= w
    vote = vote.masked_fill(newest, 0.0)
    return F.avg_pool1d(vote.flatten(0, 1)[:, None], 5, 1, 2).view(vote.shape).mean(1)


def test_compresskv_keeps_one_set_per_layer_from_the_retrieval_heads(model: Transformer) -> None:
    ids, mask = batch()
    budget, w = 12, 8
    heads = [[1, 2, 0, 3], [3, 0, 1, 2], [2, 3, 1, 0]]
    errors = [0.2, 0.3, 0.5]
    cache = snap(CompressKV, model, budget, first_k=2, heads=heads, layer_errors=errors, min_layer=4)
    run(model, cache, ids, mask, steps=0)
    budgets = error_aware_budgets(torch.tensor(errors), torch.tensor([budget, budget]), 4, 3.0)
    for layer in range(model.config.n_layer):
        s = cache.seen[layer][0]
        vote = compresskv_reference(s, heads[layer][:2], w)
        for row, per_head in enumerate(kept_positions(cache, layer)):
            assert all(h == per_head[0] for h in per_head)  # every KV head keeps the same tokens
            pos, _, _ = head_tokens(s, row, 0)
            scores = dict(zip(pos, vote[row][s["valid"][row, 0]].tolist(), strict=True))
            assert_top_set(per_head[0], scores, set(pos[-w:]), int(budgets[row, layer]))


def test_compresskv_ignores_heads_that_are_not_retrieval_heads() -> None:
    ids, mask = batch()
    heads = [[0, 2, 1, 3]] * 3

    def kept_after_prefill(model: Transformer) -> list:
        cache = make_policy("compresskv", 12, first_k=2, heads=heads, min_layer=4)(model)
        run(model, cache, ids, mask, steps=0)
        return kept_positions(cache, 0)

    reference = kept_after_prefill(make_tiny_model("llama"))
    d = 16  # head_dim of the tiny model
    for head, changes in ((1, False), (3, False), (0, True)):
        model = make_tiny_model("llama")
        with torch.no_grad():
            rows = model.blocks[0].attn.q_proj.weight[head * d : (head + 1) * d]
            rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(head)) * 3)
        assert (kept_after_prefill(model) != reference) == changes, head


def test_compresskv_with_every_head_on_mqa_is_snapkv() -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        family="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=1, d_model=64, d_ff=96, max_position=256
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(3.0)
    ids, mask = batch()
    ours = make_policy("compresskv", 12)(model)
    run(model, ours, ids, mask, steps=0)
    snapkv = make_policy("snapkv", 12, window=8)(model)
    run(model, snapkv, ids, mask, steps=0)
    for layer in range(2):
        assert kept_positions(ours, layer) == kept_positions(snapkv, layer)


def test_retrieval_head_scores_sum_needle_attention_at_needle_tokens() -> None:
    model = make_tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    start, end = 10, 10 + VOCAB
    ids = torch.cat([torch.randint(0, VOCAB, (start,), generator=g), torch.randperm(VOCAB, generator=g)])
    ids = torch.cat([ids, torch.randint(0, VOCAB, (14,), generator=g)])  # every token occurs in the needle
    steps = 6
    scores = retrieval_head_scores(model, [(ids, start, end)], steps=steps, min_recall=0.0)
    out = generate(model, ids[None], steps)[0]  # recompute with one plain forward over prompt + generated tokens
    seq = torch.cat([ids, out[:-1]])[None]
    cache = snap(FullCache, model, None)
    model(seq, cache=cache)
    want = torch.zeros_like(scores)
    for layer in range(model.config.n_layer):
        s = cache.seen[layer][0]
        p = manual_probs(s["q"], s["keys"], s["qpos"], s["pos"], s["valid"])  # [1, Hkv, G, T, L]
        on_span = p[..., start:end].sum(-1).flatten(1, 2)[0]  # [Hq, T]
        for step in range(steps):
            want[layer] += on_span[:, len(ids) - 1 + step].double()
    assert torch.allclose(scores, want, atol=1e-5)
    assert bool((scores > 0).all())
    # a probe whose output misses the needle is dropped
    assert retrieval_head_scores(model, [(ids, start, end)], steps=steps, min_recall=0.5).abs().sum() == 0
    assert rank_heads(torch.tensor([[0.1, 0.9, 0.5]])) == [[1, 2, 0]]
    with pytest.raises(ValueError, match="needle span"):
        retrieval_head_scores(model, [(ids, 5, 500)])


def test_needle_probes_span_the_pass_key() -> None:
    tokenizer = ByteTokenizer()
    probes = needle_probes(tokenizer, n=3, context_len=300)
    assert len(probes) == 3
    for ids, start, end in probes:
        key = tokenizer.decode(ids[start:end].tolist())
        assert len(key) == 5 and key.isdigit()
        assert key not in tokenizer.decode(ids[:start].tolist())  # its first mention
        assert tokenizer.decode(ids[:start].tolist()).endswith("The pass key is ")


def test_layer_eviction_errors_vanish_without_eviction() -> None:
    model = make_tiny_model("llama")
    ids, _ = batch(pad=0)
    errors = layer_eviction_errors(model, [ids[0], ids[1]], budget=8, window=4)
    assert bool((errors > 0).all()) and errors.sum().item() == pytest.approx(1.0)
    none = layer_eviction_errors(model, [ids[0]], budget=PROMPT, window=4)
    assert none.abs().sum() == 0


# ------------------------------------------------------------------------ LazyEviction
def test_recurrence_tracking_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    important = torch.rand(2, 3, 20, 7, generator=g) < 0.3
    times = torch.arange(20).expand(2, 20) + torch.tensor([[5], [9]])  # after every initial t_last
    last0 = torch.randint(0, 5, (2, 3, 7), generator=g).float()
    mri0 = torch.randint(0, 3, (2, 3, 7), generator=g).float()
    last, mri = update_recurrence(important, times, last0.clone(), mri0.clone())
    for b in range(2):
        for h in range(3):
            for i in range(7):
                t_last, interval, gaps = float(last0[b, h, i]), float(mri0[b, h, i]), []
                for step in range(20):
                    if important[b, h, step, i]:
                        gaps.append(float(times[b, step]) - t_last)
                        t_last = float(times[b, step])
                        interval = max(interval, gaps[-1])
                assert last[b, h, i] == t_last and mri[b, h, i] == interval
                assert all(mri[b, h, i] >= gap for gap in gaps) and mri[b, h, i] >= mri0[b, h, i]
    assert bool((last <= times.amax(-1)[:, None, None]).all())


def test_recurring_token_outlives_a_one_off() -> None:
    steps = 400
    important = torch.zeros(1, 1, steps, 3, dtype=torch.bool)
    important[0, 0, ::50, 0] = True  # a: every 50 steps
    important[0, 0, [0, 10], 1] = True  # b: once, long ago
    important[0, 0, 380:, 2] = True  # c: only recently, never recurred
    last, mri = update_recurrence(important, torch.arange(steps)[None], torch.zeros(1, 1, 3), torch.zeros(1, 1, 3))
    priority = recurrence_priority(last, mri, torch.tensor([steps - 1]))
    rank = rank_with_recency(priority, torch.tensor([[[0, 1, 2]]]))
    assert rank[0, 0].tolist() == [1.0, 0.0, 2.0]  # b goes first, then a; c was important just now
    # everything important at every step: pure recency
    last, mri = update_recurrence(
        torch.ones(1, 1, 5, 4, dtype=torch.bool), torch.arange(5)[None], torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    )
    assert rank_with_recency(
        recurrence_priority(last, mri, torch.tensor([4])), torch.tensor([[[3, 0, 2, 1]]])
    ).tolist() == [[[3.0, 0.0, 2.0, 1.0]]]


def test_lazyeviction_is_lazy_and_ranks_by_recurrence(model: Transformer) -> None:
    ids, mask = batch()
    budget, window, alpha = 12, 3, 0.05
    cache = snap(LazyEviction, model, budget, window=window, alpha=alpha)
    state: list[dict] = [dict() for _ in range(model.config.n_layer)]  # (row, head, position) -> [t_last, mri]
    lengths = mask.sum(-1).tolist()
    for row in range(2):
        assert lengths[row] > budget

    def check(step: int) -> None:
        for layer in range(model.config.n_layer):
            s = cache.seen[layer][-1]
            p = manual_probs(s["q"], s["keys"], s["qpos"], s["pos"], s["valid"]).amax(2)  # [B, Hkv, T, L]
            kept = kept_positions(cache, layer)
            for row in range(2):
                for head in range(model.config.n_kv_head):
                    valid = s["valid"][row, head]
                    pos = s["pos"][row, head][valid].tolist()
                    probs = p[row, head][:, valid]
                    for t in range(probs.shape[0]):
                        if not s["qvalid"][row, t]:
                            continue
                        now = int(s["qpos"][row, t])
                        for j, q in enumerate(pos):
                            st = state[layer].setdefault((row, head, q), [float(q), 0.0])
                            if q <= now and probs[t, j] >= alpha:
                                st[1] = max(st[1], now - st[0])
                                st[0] = float(now)
                    now = lengths[row] - 1 + step
                    evicts = step % window == 0
                    n = len(pos)
                    assert len(kept[row][head]) == (min(n, budget) if evicts else n)
                    if evicts and n > budget:
                        prio = {
                            q: -(now - state[layer][row, head, q][0]) / max(state[layer][row, head, q][1], 1.0)
                            for q in pos
                        }
                        newest = set(sorted(pos)[-window:])
                        assert newest <= kept[row][head]  # younger than the window: never evicted
                        order = sorted(set(pos) - newest, key=lambda q: (prio[q], q), reverse=True)
                        assert kept[row][head] == newest | set(order[: budget - window]), (layer, row, head, step)
                    for q in set(pos) - kept[row][head]:
                        del state[layer][row, head, q]

    run(model, cache, ids, mask, steps=7, on_step=check)


def test_lazyeviction_alpha_zero_is_recency(model: Transformer) -> None:
    ids, mask = batch()
    cache = make_policy("lazyeviction", 12, window=2, alpha=0.0)(model)
    lengths = mask.sum(-1).tolist()

    def check(step: int) -> None:
        if step % 2:
            return
        for layer in range(model.config.n_layer):
            for row, heads in enumerate(kept_positions(cache, layer)):
                n = lengths[row] + step
                assert all(h == set(range(n - 12, n)) for h in heads)

    run(model, cache, ids, mask, steps=4, on_step=check)


def test_batch_a_knobs_are_validated() -> None:
    for name, knobs in [
        ("cake", {"gamma": -1.0}),
        ("cake", {"tau1": 0.0}),
        ("cake", {"window": 0}),
        ("kvmerger", {"sigma": 0.0}),
        ("kvmerger", {"heavy_ratio": 0.9}),
        ("elastic_cache", {"distance": -1}),
        ("d2o", {"alpha": 1.5}),
        ("d2o", {"first_dense": -1}),
        ("compresskv", {"first_k": 0}),
        ("compresskv", {"heads": [[0, 0]]}),
        ("compresskv", {"layer_errors": [-1.0]}),
        ("lazyeviction", {"window": 0}),
        ("lazyeviction", {"alpha": 2.0}),
    ]:
        with pytest.raises(ValueError):
            make_policy(name, 8, **knobs)
    factory = make_policy("compresskv", 8, heads=[[0, 1]] * 2)  # two layers' worth, for a three-layer model
    with pytest.raises(ValueError, match="heads"):
        factory(make_tiny_model("llama"))
    with pytest.raises(ValueError, match="layer_errors"):
        make_policy("compresskv", 8, layer_errors=[1.0, 2.0])(make_tiny_model("llama"))
