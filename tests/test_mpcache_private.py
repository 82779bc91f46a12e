"""MPCache on secret shares (mpcache/mpc/caches/mpcache.py) against the plaintext reference (methods/mpcache.py).

Simulation (the same code on float tensors) must choose exactly what the plaintext functions choose; 2PC must choose
the same clusters/tokens (ties aside), match attention within fixed-point tolerance and open nothing.
"""

from __future__ import annotations

import pytest
import torch
from test_mpc_layers import tiny

from mpcache.kernels import attention_probs, page_bound
from mpcache.kernels import cached_attention as plain_attention
from mpcache.methods.base import chunk_min_max, protect, top_mask, topk_slots
from mpcache.methods.mpcache import (
    MPCache,
    bound_similarity,
    bucket_top,
    cluster_similarity,
    exact_similarity,
    middle,
    select_clusters,
    sign_split,
    static_scores,
    window_sum,
)
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.caches import mpcache as M
from mpcache.mpc.nn import layers as L
from mpcache.mpc.transport.local import LocalParties

ALPHA = float(N.on_grid(0.6))


def randn(*shape: int, seed: int) -> torch.Tensor:
    return N.on_grid(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def slot_ids(b: int, h: int, length: int) -> torch.Tensor:
    return torch.arange(length, dtype=torch.float64).expand(b, h, length)[..., None].clone()


def entry_of(keys: torch.Tensor, values: torch.Tensor) -> L.PrivateLayerKV:
    b, h, length, _ = keys.shape
    return L.PrivateLayerKV(
        keys, values, torch.arange(length).expand(b, h, length).clone(), torch.ones(b, h, length, dtype=torch.bool)
    )


def read_mask(view_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Slot mask [B, H, L] from the slot ids a view carries in its values [B, H, K, 1]."""
    ids = view_ids[..., 0].round().long()
    return torch.zeros(*ids.shape[:2], length, dtype=torch.bool).scatter_(2, ids, True)


# -------------------------------------------------------------------------------------------------- simulation


def test_pairwise_rank_top_k_and_compaction_match_sorting():
    scores = randn(3, 2, 21, seed=0)
    rank = M.pairwise_rank(scores, N.VALUE_BOUND)
    assert torch.equal(rank.long(), scores.argsort(dim=-1, descending=True, stable=True).argsort(-1))
    for k in (1, 5, 20):
        chosen = M.top_k_mask(scores, k, N.VALUE_BOUND)
        assert torch.equal(chosen.bool(), top_mask(scores, torch.full((3, 2), k)))
        x = randn(3, 2, 21, 4, seed=1)
        index, _ = topk_slots(scores, torch.full((3, 2), k))  # slot order
        gathered = M.oblivious_gather(chosen, k, x)
        assert torch.equal(gathered, x.gather(2, index[..., None].expand(-1, -1, -1, 4)))
    ties = torch.tensor([[1.0, 3.0, 1.0, 3.0]])
    assert M.pairwise_rank(ties, 8.0).tolist() == [[2.0, 0.0, 3.0, 1.0]]  # stable: the lower index first
    for k in (0, 4):
        with pytest.raises(ValueError, match="0 < k < n"):
            M.top_k_mask(ties, k, 8.0)
    with pytest.raises(ValueError, match="outside the declared range"):
        M.pairwise_rank(ties, 2.0)  # 3 - 1 is not below 2: FSS comparisons on that range would wrap


@pytest.mark.parametrize("length", [1, 16, 45, 64])
def test_cluster_summary_matches_chunk_min_max_and_updates_on_append(length):
    keys = randn(2, 3, length + 40, 8, seed=length)
    summary = M.ClusterSummary.build(keys[:, :, :length])
    for n in range(length, length + 40):
        if n > length:
            summary.append(keys[:, :, n - 1 : n])
        assert summary.length == n
        valid = torch.ones(2, 3, n, dtype=torch.bool)
        for size, got in ((16, (summary.child_max, summary.child_min)), (32, (summary.parent_max, summary.parent_min))):
            kmax, kmin, _ = chunk_min_max(keys[:, :, :n], valid, size)
            assert torch.equal(got[0], kmax) and torch.equal(got[1], kmin), (n, size)
    with pytest.raises(ValueError, match="multiple"):
        M.ClusterSummary.build(keys, 32, 12)


def _plain_selection(queries, keys, budget, similarity="bound", topk="rank", group="sum"):
    """queries [B, H, G, D]: the query heads of each KV head."""
    valid = torch.ones(keys.shape[:3], dtype=torch.bool)
    budgets = torch.tensor([budget] * keys.shape[0])
    return select_clusters(queries, keys, valid, budgets, alpha=ALPHA, similarity=similarity, topk=topk, group=group)


MODES = [  # (similarity, topk, group): every selection mode the 2PC side must reproduce
    ("linear", "rank", "sum"),
    ("bound", "rank", "sum"),
    ("bound", "bucket", "sum"),
    ("exact", "bucket", "sum"),
    ("bound", "bucket", "max"),
    ("bound", "rank", "centered"),
    ("linear", "bucket", "centered"),
    ("exact", "bucket", "max"),
    ("exact", "rank", "centered"),
]


@pytest.mark.parametrize("similarity,topk,group", MODES)
@pytest.mark.parametrize("length,budget", [(100, 32), (203, 48), (203, 64), (256, 17), (130, 100), (400, 120)])
def test_simulated_selection_matches_select_clusters(length, budget, similarity, topk, group):
    keys, queries = randn(2, 3, length, 8, seed=length), randn(2, 3, 3, 8, seed=budget)
    summary = M.ClusterSummary.build(keys)
    scores = None
    if similarity != "exact":  # as PrivateMPCache scores: from the append-only representatives
        scores = M.ClusterReps(ALPHA, similarity, group).scores(queries, summary)
    chosen = M.select(queries, summary, budget, ALPHA, similarity=similarity, topk=topk, keys=keys, group=group)
    assert chosen is not None
    if scores is not None:
        again = M.select(queries, summary, budget, ALPHA, similarity=similarity, topk=topk, scores=scores, group=group)
        assert chosen.matrix is again.matrix is None or torch.equal(again.matrix, chosen.matrix)
    view = M.gather_view(entry_of(keys, slot_ids(2, 3, length)), chosen, 16)
    want = _plain_selection(queries, keys, budget, similarity, topk, group)
    assert torch.equal(read_mask(view.values, length), want)
    assert view.capacity == int(want.sum(-1).max())  # a public size: every head reads the same count
    assert M.select(queries, summary, 16 * summary.child_max.shape[2], ALPHA) is None  # everything fits


@pytest.mark.parametrize("m,k", [(10, 3), (12, 4), (7, 6), (5, 1)])
def test_bucket_top_keeps_the_best_of_each_strided_bucket(m, k):
    scores = randn(2, 3, m, seed=m + k)
    scores[0, 0, 0] = scores[0, 0, k % m]  # a tie: the lower index wins
    mask = bucket_top(scores, k)
    assert bool((mask.sum(-1) == k).all())
    for i in range(2):
        for j in range(3):
            for bucket in range(k):
                members = list(range(bucket, m, k))
                best = max(members, key=lambda c: (float(scores[i, j, c]), -c))
                assert {c for c in members if mask[i, j, c]} == {best}, (i, j, bucket)


def _bucket_private(scores: torch.Tensor, k: int) -> torch.Tensor:
    return N.decode(M.bucket_one_hot(N.crypten.cryptensor(scores, src=0), k))


@pytest.mark.timeout(600)
def test_private_bucket_one_hot_is_the_gather_matrix_of_bucket_top(parties):
    scores = randn(1, 2, 11, seed=4)
    hot = parties.run(_bucket_private, scores, 3)[0]  # [1, 2, 3, 11]
    assert torch.equal(hot.sum(-2) > 0.5, bucket_top(scores, 3)) and torch.equal(hot.sum(-1), torch.ones(1, 2, 3))
    assert torch.equal(hot, M.bucket_one_hot(scores, 3))  # the simulator builds the same matrix


def _exact_private(queries: torch.Tensor, keys: torch.Tensor) -> list[torch.Tensor]:
    share = N.crypten.cryptensor
    return [N.decode(x) for x in M.exact_scores(share(queries, src=1), share(keys, src=0), 32, 16)]


@pytest.mark.timeout(600)
def test_private_exact_scores_match_the_plaintext_ablation(parties):
    queries, keys = randn(1, 2, 2, 8, seed=7), randn(1, 2, 70, 8, seed=8)  # 70: partial last child and parent
    parent, child = parties.run(_exact_private, queries, keys)[0]
    valid = torch.ones(1, 2, 70, dtype=torch.bool)
    assert (parent - exact_similarity(queries, keys, valid, 32)).abs().max() < 1e-3
    assert (child - exact_similarity(queries, keys, valid, 16)).abs().max() < 1e-3


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_window_sum_is_a_centred_window_sum(kernel):
    scores = randn(2, 11, seed=kernel)
    r = kernel // 2
    want = torch.stack([scores[:, max(i - r, 0) : i + r + 1].sum(-1) for i in range(11)], -1)
    torch.testing.assert_close(window_sum(scores, kernel), want)


def test_bound_similarity_is_the_quest_bound_of_each_query_head_summed():
    keys, queries = randn(1, 2, 64, 8, seed=5), randn(1, 2, 3, 8, seed=6)
    kmax, kmin, _ = chunk_min_max(keys, torch.ones(1, 2, 64, dtype=torch.bool), 16)
    want = page_bound(queries, kmax, kmin).sum(2)  # Quest's bound per query head, summed over the group
    torch.testing.assert_close(bound_similarity(sign_split(queries), kmax, kmin), want)
    torch.testing.assert_close(M.cluster_scores(queries, kmax, kmin, ALPHA, "bound")[:, :, 0], want)  # simulator
    # an upper bound of every key's score in its cluster, for each head's query
    exact = torch.einsum("bhgd,bhld->bhgl", queries, keys).reshape(1, 2, 3, 4, 16).amax(-1)
    assert bool((page_bound(queries, kmax, kmin) >= exact - 1e-6).all())


def _plain_static(queries, keys, keep, sink, window):
    """Plaintext static keep-set: window attention -> static_scores -> protect -> topk_slots (slot indices)."""
    b, h, length, _ = keys.shape
    w = queries.shape[2]
    pos = torch.arange(length).expand(b, h, length)
    probs = attention_probs(queries, keys, torch.arange(length - w, length).expand(b, w), pos, torch.ones_like(pos) > 0)
    scores = static_scores(probs.double().sum(3))
    guarded = protect(
        scores[:, None].expand(b, h, length), torch.ones_like(pos) > 0, torch.full((b, h), keep), sink, window
    )
    return scores, topk_slots(guarded, torch.full((b, h), keep))[0]


@pytest.mark.parametrize("nonlinear", ["lut", "poly"])
def test_simulated_static_keep_matches_plaintext(nonlinear):
    b, hkv, hq, length, d, keep = 2, 2, 4, 60, 8, 30
    queries, keys = randn(b, hq, 12, d, seed=3), randn(b, hkv, length, d, seed=4)
    want_scores, want = _plain_static(queries, keys, keep, 4, 6)
    scores = M.window_scores(
        queries / d**0.5, keys, torch.arange(48, 60).expand(b, 12), torch.arange(60).expand(b, hkv, 60),
        options=L.PrivateOptions(nonlinear=nonlinear),
    )  # fmt: skip
    assert (scores - want_scores).abs().max() < 1e-4  # the simulator's softmax approximation
    plan = M.static_keep(scores, keep, 4, 6, 13.0)  # 12 window queries' probabilities summed per slot
    kept = M.compact(entry_of(keys, slot_ids(b, hkv, length)), plan)
    assert torch.equal(kept.values[..., 0].long(), want)
    assert torch.equal(kept.keys, keys.gather(2, want[..., None].expand(-1, -1, -1, d)))
    assert kept.capacity == keep and bool((kept.positions <= 59).all())
    full = entry_of(keys, slot_ids(b, hkv, length))
    assert M.compact(full, M.static_keep(scores, 70, 4, 6, 13.0)) is full  # nothing to evict
    ends = M.compact(full, M.static_keep(scores, 10, 4, 6, 13.0))  # no middle slot left
    assert ends.values[0, 0, :, 0].tolist() == [0, 1, 2, 3, 54, 55, 56, 57, 58, 59]


@pytest.mark.parametrize("nonlinear", ["lut", "poly"])
def test_static_eviction_uses_the_model_softmax(nonlinear, monkeypatch):
    """The window attention static eviction recomputes goes through the softmax the model's options choose."""
    m = tiny("llama", n_layer=2, max_position=256)
    pm = L.PrivateTransformer.from_plain(m, lambda t: t, L.PrivateOptions(nonlinear=nonlinear))
    used, softmax = [], M.attention_softmax
    monkeypatch.setattr(M, "attention_softmax", lambda *args: used.append(args[-1]) or softmax(*args))
    cache = M.PrivateMPCache(2, 32, own_first=0, own_last=0)  # layer 1 reuses layer 0's keep-set
    with torch.no_grad():
        pm(L.one_hot(torch.randint(0, 40, (1, 100), generator=torch.Generator().manual_seed(2)), 40), cache)
    assert used == [nonlinear] and cache.layers[0].capacity < 100


def test_simulated_policy_generates_like_plaintext_mpcache():
    m = tiny("llama", n_layer=4, max_position=256)
    knobs = dict(static_ratio=0.5, sink=16, window=16, own_first=0, own_last=0)  # layers 1 and 3 reuse 0 and 2
    ids = torch.randint(0, 40, (1, 150), generator=torch.Generator().manual_seed(9))
    plain = MPCache(4, 48, **knobs)
    private = M.PrivateMPCache(4, 48, **knobs)
    assert private.shared_from == {1: 0, 3: 2} == plain.shared_from
    pm = L.PrivateTransformer.from_plain(m, lambda t: t)
    with torch.no_grad():
        ref, out = m(ids, plain), pm(L.one_hot(ids, 40), private)
        assert (out - ref).abs().max() < 1e-3  # prefill attends densely
        for step in range(4):
            assert torch.equal(out[:, -1:].argmax(-1), ref[:, -1:].argmax(-1)), step
            for layer in range(4):
                assert torch.equal(private.tokens_per_head(layer), plain.layers[layer].valid.sum(-1)), (step, layer)
            token = ref[:, -1:].argmax(-1)
            ref, out = m(token, plain), pm(L.one_hot(token, 40), private)
            assert (out - ref).abs().max() < 2e-3, step
            assert private.attention_view(0).capacity < int(private.tokens_per_head(0).max())  # a real subset
            assert [int(private.attention_view(i).capacity) for i in range(4)] == [
                int(plain.attended_tokens(i).max()) for i in range(4)
            ]


def test_adopted_cache_selects_like_plaintext_mpcache_without_static_eviction():
    m = tiny("llama", n_layer=2, max_position=256)
    ids = torch.randint(0, 40, (1, 100), generator=torch.Generator().manual_seed(12))
    pm = L.PrivateTransformer.from_plain(m, lambda t: t)
    plain, filled = MPCache(2, 48, static_ratio=1.0), L.PrivateKVCache(2)  # keeps the whole prompt
    with torch.no_grad():
        ref, out = m(ids, plain), pm(L.one_hot(ids, 40), filled)
        cut = M.PrivateMPCache.adopt(filled, 30)  # static eviction's public keep count: max(30, 0.5 x 100)
        kept = cut.layers[0].positions[0, 0]
        assert torch.equal(kept, torch.cat([torch.arange(16), torch.arange(66, 100)])) and cut.summary[0].length == 50
        adopted = M.PrivateMPCache.adopt(filled, 48, static_ratio=1.0)
        assert adopted.seen_tokens == 100 and adopted.summary[0].length == 100
        for step in range(3):
            token = ref[:, -1:].argmax(-1)
            ref, out = m(token, plain), pm(L.one_hot(token, 40), adopted)
            assert (out - ref).abs().max() < 2e-3, step
            assert adopted.attention_view(1).capacity == int(plain.attended_tokens(1).max()) < 100


def test_bad_knobs_and_padding_are_value_errors():
    for kwargs, match in (
        (dict(budget=0), "budget"),
        (dict(budget=0.5), "budget"),
        (dict(budget=8, ratio1=0.0), "ratio1"),
        (dict(budget=8, alpha=2.0), "alpha"),
        (dict(budget=8, cluster_size=24), "multiple"),
    ):
        with pytest.raises(ValueError, match=match):
            M.PrivateMPCache(2, **kwargs)
    cache = M.PrivateMPCache(1, 8)
    x = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unpadded"):
        cache.update(0, x, x, torch.arange(3)[None], torch.tensor([[False, True, True]]))


# ------------------------------------------------------------------------------------------------------- MPC


@pytest.fixture(scope="module")
def parties():
    with LocalParties(setup=N.install, timeout=600) as p:
        yield p


def _count_openings() -> dict:
    """Wrap every way an MPCTensor is opened so the caller can assert none happened, and count the FSS
    comparisons' openings (masked values: arith.compare.open_masked) against the comparison batches."""
    counts = {"opened": 0, "masked": 0, "comparisons": 0}
    for name in ("get_plain_text", "reveal"):
        original = getattr(N.MPCTensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["opened"] += 1
            return _original(self, *args, **kwargs)

        setattr(N.MPCTensor, name, counted)
        counts[name] = original
    for name, key in (("open_masked", "masked"), ("negative", "comparisons")):
        original = getattr(N.compare, name)

        def tallied(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        setattr(N.compare, name, tallied)
        counts[name] = original
    return counts


def _restore(counts: dict) -> None:
    for name in ("get_plain_text", "reveal"):
        setattr(N.MPCTensor, name, counts[name])
    for name in ("open_masked", "negative"):
        setattr(N.compare, name, counts[name])


def _private_steps(keys, values, new_key, query, budget, queries, keep) -> dict:
    crypten = N.crypten
    share = lambda t, src=0: crypten.cryptensor(t, src=src)  # noqa: E731  the cache: held as shares
    k, v, q, new = share(keys), share(values), share(query, 1), share(new_key)
    b, h, length, _ = keys.shape
    counts = _count_openings()
    try:
        summary = M.ClusterSummary.build(k)
        summary.append(new)
        entry = entry_of(N.cat([k, new], 2), share(slot_ids(b, h, length + 1)))
        chosen = M.select(q.unsqueeze(2), summary, budget, ALPHA, similarity="bound")
        view = M.gather_view(entry, chosen, 16)
        attn_v = M.gather_view(entry_of(N.cat([k, new], 2), N.cat([v, share(values[:, :, :1])], 2)), chosen, 16)
        qh = q.unsqueeze(2).unsqueeze(2).reshape(b, h, 1, -1)  # one query head per KV head
        out = M.full_attention(qh, attn_v, torch.full((b, 1), length))
        scores = M.window_scores(
            share(queries, 1),
            k,
            torch.arange(length - queries.shape[2], length).expand(b, -1),
            entry.positions[..., :length],
        )
        plan = M.static_keep(scores, keep, 4, 6, 9.0)  # 8 window queries' probabilities summed per slot
        kept = M.compact(entry_of(k, share(slot_ids(b, h, length))), plan)
        private = [chosen.matrix, view.keys, out, scores, plan.matrix, kept.values]
        types_ok = all(isinstance(x, N.MPCTensor) for x in private)
        opened, masked, comparisons = counts["opened"], counts["masked"], counts["comparisons"]
    finally:
        _restore(counts)
    return {
        "opened": opened,
        "masked": masked,
        "comparisons": comparisons,
        "types_ok": types_ok,
        "read": N.decode(view.values),
        "out": N.decode(out),
        "extrema": [
            N.decode(x) for x in (summary.child_max, summary.child_min, summary.parent_max, summary.parent_min)
        ],
        "scores": N.decode(scores),
        "pooled": N.decode(window_sum(scores, 5)),
        "kept": N.decode(kept.values),
    }


@pytest.mark.timeout(600)
def test_private_selection_and_static_keep_match_plaintext_and_open_nothing(parties):
    b, h, length, d, budget = 1, 2, 95, 8, 48
    keys, values = randn(b, h, length, d, seed=11), randn(b, h, length, d, seed=12)
    new_key, query = randn(b, h, 1, d, seed=13), randn(b, h, d, seed=14)
    queries = randn(b, 2 * h, 8, d, seed=15) / d**0.5
    got = parties.run(_private_steps, keys, values, new_key, query, budget, queries, 40)[0]
    assert got["opened"] == 0 and got["types_ok"]
    # the FSS comparisons (the default protocol) open one masked, uniform message per batch and nothing else
    assert got["masked"] == got["comparisons"] > 10
    all_keys = torch.cat([keys, new_key], 2)
    for i, size in enumerate((16, 32)):  # max/min by comparisons are exact, appended key included
        want_max, want_min, _ = chunk_min_max(all_keys, torch.ones(b, h, length + 1) > 0, size)
        assert torch.equal(got["extrema"][2 * i], want_max) and torch.equal(got["extrema"][2 * i + 1], want_min)
    # decode selection: the plaintext reference's slots, and attention over them within fixed-point tolerance
    want = _plain_selection(query[:, :, None], all_keys, budget)
    assert torch.equal(read_mask(got["read"], length + 1), want)
    all_values = torch.cat([values, values[:, :, :1]], 2)
    qh = query[:, :, None]
    pos = torch.arange(length + 1).expand(b, h, -1)
    ref = plain_attention(qh * d**0.5, all_keys, all_values, torch.full((b, 1), length), pos, want)
    assert (got["out"] - ref).abs().max() < 2e-3
    # static eviction: MPC scores within the softmax tolerance; the kept set is exactly the top of the MPC's own
    # scores, and the plaintext set except where two scores sit within the tolerance (ties aside)
    want_scores, want_kept = _plain_static(queries * d**0.5, keys, 40, 4, 6)
    assert (got["scores"] - want_scores).abs().max() < 2e-3
    torch.testing.assert_close(got["pooled"], window_sum(got["scores"], 5), atol=1e-9, rtol=0)  # local: exact
    kept = got["kept"][..., 0].round().long()
    assert torch.equal(kept, _stable_static(got["scores"], 40, 4, 6)[:, None].expand(-1, h, -1))
    mismatch = set(kept[0, 0].tolist()) ^ set(want_kept[0, 0].tolist())
    threshold = want_scores[0, want_kept[0, 0][4:-6]].min()
    assert all(abs(float(want_scores[0, i] - threshold)) < 4e-3 for i in mismatch), mismatch


def _stable_static(scores: torch.Tensor, keep: int, sink: int, window: int) -> torch.Tensor:
    """Kept slots [B, keep] from scores [B, L]: sinks, window, and the best middle slots, exact ties to the lower
    index (the MPC rank's rule; torch.topk breaks ties arbitrarily)."""
    length = scores.shape[-1]
    middle = scores[:, sink : length - window].argsort(dim=-1, descending=True, stable=True)[:, : keep - sink - window]
    ends = torch.cat([torch.arange(sink), torch.arange(length - window, length)]).expand(scores.shape[0], -1)
    return torch.cat([ends, middle + sink], -1).sort(-1).values


def _private_policy(ids: torch.Tensor, steps: int, knobs: dict) -> tuple[list, list]:
    crypten = N.crypten
    m = tiny("llama", n_layer=2, max_position=256)
    pm = L.PrivateTransformer.from_plain(m, lambda t: crypten.cryptensor(t, src=0))
    cache = M.PrivateMPCache(2, 48, **knobs)
    tokens = crypten.cryptensor(L.one_hot(ids, 40), src=1, precision=0)
    logits, reads = [], []
    for step in range(steps + 1):
        out = pm(tokens, cache, last_only=step > 0)
        logits.append(N.decode(out[:, -1:]))
        reads.append([cache.attention_view(i).capacity for i in range(2)])
        tokens = L.greedy_token(out)
    return logits, reads


@pytest.mark.timeout(600)
def test_private_policy_decodes_like_plaintext_mpcache(parties):
    knobs = dict(static_ratio=0.5, sink=16, window=16, own_first=0, own_last=0)  # layer 1 reuses layer 0
    # 124 tokens keep 62; decode steps read caches of 63, 64, 65 slots: a fifth child starts at the last one, so the
    # gather's fixed operand (the middle children) is rebuilt
    ids = torch.randint(0, 40, (1, 124), generator=torch.Generator().manual_seed(10))
    logits, reads = parties.run(_private_policy, ids, 3, knobs)[0]
    m = tiny("llama", n_layer=2, max_position=256)
    plain = MPCache(2, 48, **knobs)
    with torch.no_grad():
        ref = m(ids, plain)
        for step in range(4):
            assert (logits[step] - ref[:, -1:]).abs().max() < 3e-3, step
            if step:
                # child 0, one chosen middle child (budget 48 // 16 = 3 children), the last child (15, 16, then 1)
                assert (
                    reads[step]
                    == [int(plain.attended_tokens(i).max()) for i in range(2)]
                    == [[47] * 2, [48] * 2, [33] * 2][step - 1]
                )
            ref = m(ref[:, -1:].argmax(-1), plain)


@pytest.mark.timeout(600)
def test_selection_rounds_do_not_grow_with_the_cache_and_save_bytes(parties):
    rank = parties.run(M._measure, [256, 512], [], 0, {"topk": "rank"})[0]
    bucket = parties.run(M._measure, [256, 512], [], 0, {"topk": "bucket"})[0]
    assert rank[0]["select"]["rounds"] == rank[1]["select"]["rounds"]  # comparison batches, not sequential argmaxes
    for row, read in zip(rank + bucket, (48, 96) * 2):  # budget L / 5: children 0 and last plus L / 80 - 2 chosen
        assert row["read"] == read and row["mpcache"]["bytes"] < row["full"]["bytes"]
    # m comparisons instead of m^2 / 2 (log2(m / k) levels: rounds may differ). With FSS comparisons (8 bytes
    # online) that shows in the dealer's keys (~730 B per comparison), not online, where the gather's re-opened
    # clusters dominate both (with CrypTen's comparisons, 432 B online: 2.37 vs 3.67 MB, 9.7 vs 36.9 MB at 2048)
    assert bucket[1]["select"]["dealer_bytes"] < 0.8 * rank[1]["select"]["dealer_bytes"], (bucket[1], rank[1])
    assert bucket[1]["select"]["bytes"] < 1.01 * rank[1]["select"]["bytes"]


def test_simulated_policy_follows_plaintext_mpcache_on_the_bundled_model():
    from mpcache.eval.tasks import make_sample
    from mpcache.model.loading import load_bundled

    try:
        model, tok = load_bundled(dtype=torch.float64)
    except FileNotFoundError:
        pytest.skip("no bundled model")
    sample = make_sample("passkey", 512, 0, lambda text: len(tok.encode(text)))
    ids = torch.tensor([tok.encode(sample.prompt)])
    plain, private = MPCache(4, 128), M.PrivateMPCache(4, 128)
    pm = L.PrivateTransformer.from_plain(model, lambda t: t)
    want, got = [], []
    with torch.no_grad():
        ref, out = model(ids, plain), pm(L.one_hot(ids, model.config.vocab_size), private, last_only=True)
        for _ in range(4):
            want.append(int(ref[0, -1].argmax()))
            got.append(int(out[0, -1].argmax()))
            ref = model(torch.tensor([want[-1:]]), plain)
            out = pm(L.one_hot(torch.tensor([got[-1:]]), model.config.vocab_size), private)
    assert got == want  # same evictions, same selections, same tokens (the approximations stay below the margins)
    assert [private.attention_view(i).capacity for i in range(4)] == [
        int(plain.attended_tokens(i).max()) for i in range(4)
    ]
    assert private.attention_view(0).capacity < int(private.tokens_per_head(0).max()) < ids.shape[1]


def test_gather_operand_grows_by_one_child_instead_of_reopening():
    """The middle children are an append-only operand: a filled child is appended (opened alone), never the whole
    block again (the simulator runs the same bookkeeping as 2PC)."""
    m = tiny("llama", n_layer=2, max_position=256)
    ids = torch.randint(0, 40, (1, 120), generator=torch.Generator().manual_seed(2))
    pm = L.PrivateTransformer.from_plain(m, lambda t: t)
    filled = L.PrivateKVCache(2)
    with torch.no_grad():
        out = pm(L.one_hot(ids, 40), filled)
        cache = M.PrivateMPCache.adopt(filled, 48, static_ratio=1.0)
        held, lengths = [], []
        for _ in range(20):  # 120 cached tokens: child 8 fills at 128, child 9 starts
            out = pm(L.one_hot(out[:, -1:].argmax(-1), 40), cache)
            held.append(cache.clusters[0].operand)
            lengths.append(cache.clusters[0].length)
    assert all(h is held[0] for h in held)  # one operand throughout
    assert lengths[0] == 120 // 16 + 1 - 2 and lengths[-1] == lengths[0] + 1  # one middle child appended


@pytest.mark.parametrize(
    "similarity,group", [("bound", "sum"), ("linear", "sum"), ("bound", "max"), ("bound", "centered")]
)
def test_cluster_reps_score_like_cluster_scores_and_append_only_completed_clusters(similarity, group):
    keys, queries = randn(1, 2, 95, 8, seed=21), randn(1, 2, 2, 8, seed=22)
    summary = M.ClusterSummary.build(keys)
    reps = M.ClusterReps(ALPHA, similarity, group)
    kmax, kmin = N.cat([summary.parent_max, summary.child_max], 2), N.cat([summary.parent_min, summary.child_min], 2)
    c1, c2 = summary.parent_max.shape[2], summary.child_max.shape[2]  # 3, 6: children 0-4 and parents 0-1 complete
    per_head = M.cluster_scores(queries, kmax, kmin, ALPHA, similarity, group)
    want = (M.combine_heads(per_head[..., :c1], group), M.combine_heads(per_head[..., c1:], group))
    plain = [  # the plaintext reference's scores of each level's middle clusters
        cluster_similarity(queries, *chunk_min_max(keys, torch.ones(1, 2, 95, dtype=torch.bool), size)[:2], ALPHA,
                           similarity, group, middle(torch.ones(1, 2, n, dtype=torch.bool)))[..., 1 : n - 1]
        for size, n in ((32, c1), (16, c2))
    ]  # fmt: skip
    parent, child = reps.scores(queries, summary)
    torch.testing.assert_close(parent[..., 1 : c1 - 1], want[0][..., 1 : c1 - 1])
    torch.testing.assert_close(child[..., 1 : c2 - 1], want[1][..., 1 : c2 - 1])
    torch.testing.assert_close(parent[..., 1 : c1 - 1], plain[0])
    torch.testing.assert_close(child[..., 1 : c2 - 1], plain[1])
    operand, columns = reps.held.operand, reps.held.length
    assert columns == 5 + 2
    summary.append(randn(1, 2, 1, 8, seed=23))  # token 96 completes child 5 and parent 2
    reps.scores(queries, summary)
    assert reps.held.operand is operand and reps.held.length == columns + 2


def _private_modes(keys, query, budget, modes, queries, keep) -> dict:
    """Selections of every mode and a per-KV-head static keep-set on shares; decoded after counting openings."""
    crypten = N.crypten
    share = lambda t, src=0: crypten.cryptensor(t, src=src)  # noqa: E731
    k, q = share(keys), share(query, 1)
    b, h, length, _ = keys.shape
    counts = _count_openings()
    try:
        views = []
        for similarity, topk, group in modes:
            summary = M.ClusterSummary.build(k)
            scores = None if similarity == "exact" else M.ClusterReps(ALPHA, similarity, group).scores(q, summary)
            chosen = M.select(q, summary, budget, ALPHA, 0.5, similarity, topk, k, scores, group)
            views.append(M.gather_view(entry_of(k, share(slot_ids(b, h, length))), chosen, 16).values)
        w = queries.shape[2]
        scores = M.window_scores(
            share(queries, 1), k, torch.arange(length - w, length).expand(b, -1), torch.arange(length).expand(b, h, -1),
            per_head=True,
        )  # fmt: skip
        plan = M.static_keep(scores, keep, 4, 6, w + 1.0)  # w window queries' probabilities summed per slot
        kept = M.compact(entry_of(k, share(slot_ids(b, h, length))), plan).values
        opened = counts["opened"]
    finally:
        _restore(counts)
    return {"opened": opened, "reads": [N.decode(v) for v in views], "scores": N.decode(scores),
            "kept": N.decode(kept)}  # fmt: skip


@pytest.mark.timeout(600)
def test_private_head_modes_and_per_head_static_keep_match_plaintext_and_open_nothing(parties):
    b, h, length, d, budget, keep = 1, 2, 150, 8, 48, 60
    keys, query = randn(b, h, length, d, seed=31), randn(b, h, 3, d, seed=32)
    queries = randn(b, 3 * h, 8, d, seed=33) / d**0.5
    modes = [("bound", "bucket", "centered"), ("exact", "bucket", "max"), ("linear", "rank", "max")]
    got = parties.run(_private_modes, keys, query, budget, modes, queries, keep)[0]
    assert got["opened"] == 0
    for (similarity, topk, group), read in zip(modes, got["reads"]):
        want = _plain_selection(query, keys, budget, similarity, topk, group)
        assert torch.equal(read_mask(read, length), want), (similarity, topk, group)
    # per-KV-head static votes: within the softmax tolerance of the plaintext's, and each head keeps the top of
    # the MPC's own scores (ties to the lower index)
    pos = torch.arange(length).expand(b, h, length)
    probs = attention_probs(queries * d**0.5, keys, torch.arange(length - 8, length).expand(b, 8), pos, pos >= 0)
    want_scores = static_scores(probs.double().sum(3), per_head=True)  # [B, H, L]
    assert (got["scores"] - want_scores).abs().max() < 2e-3
    kept = got["kept"][..., 0].round().long()
    for head in range(h):
        assert torch.equal(kept[:, head], _stable_static(got["scores"][:, head], keep, 4, 6))
    assert not torch.equal(kept[:, 0], kept[:, 1])  # the heads do keep different slots
