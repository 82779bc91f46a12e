"""KV-cache methods: a matrix over every registered method, then each method's own property.

To add a method: register it in `mpcache.methods`, add its tiny-model knobs to `SMALL`
(if its defaults do not fit 48-token prompts) and its expected cache sizes to `EXPECT`.
Property tests recompute what a method should keep from recorded queries and keys, so a
wrong score, keep-set rule or bookkeeping fails them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.generate import generate
from mpcache.kernels import approx_similarity, page_bound
from mpcache.kernels.compressed import dequantize, pack_bits, quantize, unpack_bits
from mpcache.methods import METHODS, PLANNED, make_policy
from mpcache.methods.base import (
    PolicyCache,
    chunk_min_max,
    extend_chunk_min_max,
    global_head_counts,
    prefill_in_chunks,
    split_across_layers,
)
from mpcache.methods.h2o import H2O
from mpcache.methods.mikv import channel_balance
from mpcache.methods.mpcache import MPCache, MPCacheKnobs, select_clusters, sharing_pairs
from mpcache.methods.quest import Quest
from mpcache.methods.snapkv import SnapKV
from mpcache.methods.think import ThinK
from mpcache.methods.tova import TOVA
from mpcache.model import KVCache, ModelConfig, Transformer

PROMPT, PAD, STEPS, VOCAB = 48, 6, 4, 96

# Knobs that fit the tiny prompts (paper defaults assume thousands of tokens).
SMALL: dict[str, dict] = {
    "snapkv": {"window": 8},
    "think": {"window": 8, "recent": 8, "channel_queries": 8},
    "quest": {"page_size": 4, "dense_layers": 1},
    "mpcache": {"cluster_size": 8, "subcluster_size": 4, "sink": 4, "window": 4, "own_first": 1, "own_last": 0},
    "cake": {"window": 4},
    "elastic_cache": {"distance": 4},
    "d2o": {"first_dense": 0, "last_dense": 0},
    "compresskv": {
        "first_k": 2,
        "min_layer": 4,
        "heads": [[1, 2, 0, 3], [3, 0, 1, 2], [2, 3, 1, 0]],
        "layer_errors": [0.2, 0.3, 0.5],
    },
    "lazyeviction": {"window": 2},
    "locret": {"stabilizers": 4, "heads": "random"},  # tiny models have no trained heads
    "ems": {"window": 8},
    "attention_gate": {"gates": "random"},
    "epicache": {"segment_size": 8, "n_medoid": 2, "question_tokens": 8, "split": "uniform"},
}


@dataclass
class Expect:
    """Tokens per KV head a method stores after decode step s (s = 0: after the prompt) and
    reads at decode step s (1-based), given budget b and prompt length p of the row."""

    stored: Callable[[int, int, int], int]
    read: Callable[[int, int, int, int], int]  # (b, p, s, layer)
    read_is_bound: bool = False  # query-aware selection: read <= bound instead of ==
    # layer-adaptive budgets: every head of a layer holds the same count, and the counts summed
    # over layers equal n_layer x stored (reads likewise), but single layers differ
    layer_total: bool = False


def _quest_read(b: int, p: int, s: int, layer: int) -> int:
    page, dense = SMALL["quest"]["page_size"], SMALL["quest"]["dense_layers"]
    return p + s if layer < dense or p + s <= b else max(b // page, 1) * page


def _mpcache_static(b: int, p: int) -> int:
    return min(p, max(b, p // 2))


def _mpcache_read(b: int, p: int, s: int, layer: int) -> int:
    n = _mpcache_static(b, p) + s
    return n if n <= b else max(b // SMALL["mpcache"]["subcluster_size"], 2) * SMALL["mpcache"]["subcluster_size"]


def _lazy_stored(b: int, p: int, s: int) -> int:
    last = SMALL["lazyeviction"]["window"] * (s // SMALL["lazyeviction"]["window"])  # the last eviction step
    return min(p + last, b) + s - last


EXPECT: dict[str, Expect] = {
    "full": Expect(lambda b, p, s: p + s, lambda b, p, s, layer: p + s),
    "streamingllm": Expect(lambda b, p, s: min(b, p + s), lambda b, p, s, layer: min(b, p + s - 1) + 1),
    "h2o": Expect(lambda b, p, s: min(b, p + s), lambda b, p, s, layer: min(b, p + s - 1) + 1),
    "tova": Expect(lambda b, p, s: min(b, p + s), lambda b, p, s, layer: min(b, p + s - 1) + 1),
    "snapkv": Expect(lambda b, p, s: min(b, p) + s, lambda b, p, s, layer: min(b, p) + s),
    "think": Expect(lambda b, p, s: min(b, p) + s, lambda b, p, s, layer: min(b, p) + s),
    "mikv": Expect(lambda b, p, s: p + s, lambda b, p, s, layer: p + s),  # nothing dropped, only quantized
    "quest": Expect(lambda b, p, s: p + s, _quest_read, read_is_bound=True),
    "mpcache": Expect(lambda b, p, s: _mpcache_static(b, p) + s, _mpcache_read, read_is_bound=True),
    "cake": Expect(lambda b, p, s: min(b, p + s), lambda b, p, s, layer: min(b, p + s - 1) + 1, layer_total=True),
    "kvmerger": Expect(lambda b, p, s: min(b, p) + s, lambda b, p, s, layer: min(b, p) + s),
    "elastic_cache": Expect(lambda b, p, s: min(b, p + s), lambda b, p, s, layer: min(b, p + s - 1) + 1),
    "d2o": Expect(  # evicts from the first decode step on
        lambda b, p, s: p if s == 0 else min(b, p + s),
        lambda b, p, s, layer: p + 1 if s == 1 else min(b, p + s - 1) + 1,
        layer_total=True,
    ),
    "compresskv": Expect(lambda b, p, s: min(b, p) + s, lambda b, p, s, layer: min(b, p) + s, layer_total=True),
    "lazyeviction": Expect(_lazy_stored, lambda b, p, s, layer: _lazy_stored(b, p, s - 1) + 1),
    "locret": Expect(lambda b, p, s: min(b, p) + s, lambda b, p, s, layer: min(b, p) + s),
    "ems": Expect(lambda b, p, s: min(b, p) + s, lambda b, p, s, layer: min(b, p) + s),
    "attention_gate": Expect(lambda b, p, s: min(b, p + s), lambda b, p, s, layer: min(b, p + s - 1) + 1),
    "epicache": Expect(lambda b, p, s: min(b, p) + s, lambda b, p, s, layer: min(b, p) + s),
}
SAVES_MEMORY = {name for name in METHODS if name not in ("full", "quest")}


# ------------------------------------------------------------------------ fixtures
def tiny_model(family: str, n_layer: int = 3) -> Transformer:
    torch.manual_seed(0)
    if family == "llama":
        config = ModelConfig(
            family="llama",
            vocab_size=VOCAB,
            n_layer=n_layer,
            n_head=4,
            n_kv_head=2,
            d_model=64,
            d_ff=96,
            max_position=256,
        )
    else:
        config = ModelConfig(
            family="gpt2",
            vocab_size=VOCAB,
            n_layer=n_layer,
            n_head=4,
            n_kv_head=4,
            d_model=64,
            d_ff=96,
            max_position=256,
            activation="gelu_new",
            qkv_bias=True,
            out_bias=True,
        )
    model = Transformer(config).eval()
    with torch.no_grad():  # larger logits make attention peaky, so scores are far from ties
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(3.0)
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request) -> Transformer:
    return tiny_model(request.param)


def batch(pad: int = PAD, length: int = PROMPT, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Two prompts, the second left-padded by `pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def positions_of(mask: Tensor) -> Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def run(model: Transformer, cache: KVCache, ids: Tensor, mask: Tensor, steps: int = STEPS, on_step=None) -> list:
    """Prefill then `steps` fixed decode tokens; returns the last-position logits of every forward."""
    g = torch.Generator().manual_seed(7)
    out = []
    with torch.no_grad():
        out.append(model(ids, cache=cache, positions=positions_of(mask), attention_mask=mask, last_only=True))
        if on_step:
            on_step(0)
        nxt = mask.long().sum(-1)
        for s in range(1, steps + 1):
            token = torch.randint(0, VOCAB, (ids.shape[0], 1), generator=g)
            out.append(model(token, cache=cache, positions=nxt[:, None] + s - 1, last_only=True))
            if on_step:
                on_step(s)
    return out


def policy(name: str, budget, **kwargs) -> Callable[[Transformer], KVCache]:
    return make_policy(name, budget, **{**SMALL.get(name, {}), **kwargs})


class Spy:
    """Mixin recording, per layer and forward, the queries and the stored slots attention saw."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[list[dict]] = [[] for _ in self.layers]

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        entry = self.layers[layer]
        self.seen[layer].append(
            {
                "q": queries.clone(),
                "keys": entry.keys.clone(),
                "pos": entry.positions.clone(),
                "valid": entry.valid.clone(),
            }
        )
        super().observe(layer, queries, query_positions)


def spy(cls: type[PolicyCache], model: Transformer, budget, **kwargs) -> PolicyCache:
    return type("Spy" + cls.__name__, (Spy, cls), {}).from_model(model, budget, **kwargs)


def manual_probs(q: Tensor, keys: Tensor, qpos: Tensor, kpos: Tensor, kvalid: Tensor) -> Tensor:
    """Causal softmax [B, Hkv, G, T, L] written out independently of the library."""
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    logits = (q.view(b, hkv, hq // hkv, t, d) @ keys[:, :, None].transpose(-1, -2)) / math.sqrt(d)
    ok = kvalid[:, :, None, None, :] & (kpos[:, :, None, None, :] <= qpos[:, None, None, :, None])
    return torch.softmax(logits.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)


def kept_positions(cache: KVCache, layer: int) -> list[list[set[int]]]:
    entry = cache.layers[layer]
    return [
        [set(entry.positions[b, h][entry.valid[b, h]].tolist()) for h in range(entry.keys.shape[1])]
        for b in range(entry.keys.shape[0])
    ]


def assert_top_set(kept: set[int], scores: dict[int, float], protected: set[int], count: int, tol: float = 1e-5):
    """`kept` must be `protected` plus a best-scoring rest, `count` tokens in all."""
    assert len(kept) == count, (len(kept), count)
    assert protected <= kept, protected - kept
    free = [scores[p] for p in kept - protected]
    dropped = [scores[p] for p in set(scores) - kept]
    if free and dropped:
        assert min(free) >= max(dropped) - tol, (min(free), max(dropped))


# -------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("budget", [12, 0.4])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_matrix(model: Transformer, name: str, budget) -> None:
    ids, mask = batch()
    lengths = mask.sum(-1).tolist()
    full = KVCache(model.config.n_layer)
    full_logits = run(model, full, ids, mask)[0]
    cache = policy(name, budget)(model)
    expect = EXPECT[name]
    b_rows = [budget if isinstance(budget, int) else max(1, int(budget * p)) for p in lengths]

    def check(step: int) -> None:
        if expect.layer_total:
            check_layer_totals(step)
            return
        for layer in range(model.config.n_layer):
            stored = cache.tokens_per_head(layer)
            assert stored.shape == (2, model.config.n_kv_head)
            for row, (b, p) in enumerate(zip(b_rows, lengths, strict=True)):
                assert stored[row].tolist() == [expect.stored(b, p, step)] * model.config.n_kv_head, (layer, row)
                if step == 0:
                    continue
                read = cache.attended_tokens(layer)[row]
                bound = expect.read(b, p, step, layer)
                assert bool((read <= bound).all() if expect.read_is_bound else (read == bound).all()), (layer, read)
                assert bool((read >= 1).all())
            if name == "mikv":  # the full-precision set stays within the budget
                assert cache.layers[layer].valid.sum(-1).max() <= max(b_rows)

    def check_layer_totals(step: int) -> None:
        n_layer = model.config.n_layer
        stored = torch.stack([cache.tokens_per_head(layer) for layer in range(n_layer)])  # [L, B, Hkv]
        assert stored.shape == (n_layer, 2, model.config.n_kv_head)
        assert bool((stored == stored[..., :1]).all())  # one count per layer
        for row, (b, p) in enumerate(zip(b_rows, lengths, strict=True)):
            assert int(stored[:, row, 0].sum()) == n_layer * expect.stored(b, p, step), (step, row, stored[:, row, 0])
            if step > 0:
                read = torch.stack([cache.attended_tokens(layer)[row] for layer in range(n_layer)])
                assert bool((read >= 1).all())
                assert int(read[:, 0].sum()) == n_layer * expect.read(b, p, step, 0), (step, row, read[:, 0])

    logits = run(model, cache, ids, mask, on_step=check)
    # eviction after attention: the prompt attended to everything, so prefill logits are the full cache's
    assert torch.equal(logits[0], full_logits)
    assert all(torch.isfinite(x).all() for x in logits)
    if name in SAVES_MEMORY:
        assert cache.memory_bytes() < full.memory_bytes()
    else:
        assert cache.memory_bytes() >= full.memory_bytes()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_generate_batch_matches_single_rows(model: Transformer, name: str) -> None:
    ids, mask = batch()
    factory = policy(name, 16)
    together = generate(model, ids, 5, policy=factory, attention_mask=mask)
    assert together.shape == (2, 5) and int(together.max()) < VOCAB
    alone = [generate(model, ids[r : r + 1, PAD * r :], 5, policy=factory)[0] for r in range(2)]
    assert torch.equal(together, torch.stack(alone))  # per-row decisions ignore the other row and the padding


@pytest.mark.parametrize("name", sorted(METHODS))
def test_budget_covering_everything_is_exactly_full(model: Transformer, name: str) -> None:
    ids, mask = batch()
    kwargs = {"channel_ratio": 0.0} if name == "think" else {}  # ThinK prunes channels whatever the token budget
    full = run(model, KVCache(model.config.n_layer), ids, mask)
    ours = run(model, policy(name, PROMPT + STEPS, **kwargs)(model), ids, mask)
    for a, b in zip(full, ours, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- registry, budgets
def test_registry_names_and_validation() -> None:
    assert {"full", "streamingllm", "h2o", "snapkv", "tova", "quest", "think", "mikv", "mpcache"} <= set(METHODS)
    assert not set(PLANNED) & set(METHODS)
    make_policy("full")  # the only method without a budget
    with pytest.raises(ValueError, match="unknown KV-cache method"):
        make_policy("nope", 8)
    for name in PLANNED[:1]:  # a name still to be implemented says so
        with pytest.raises(NotImplementedError, match=name):
            make_policy(name, 8)
    for bad in (0, -3, 1.0, 1.5, 0.0, float("nan"), None):
        with pytest.raises(ValueError, match="budget"):
            make_policy("h2o", bad)
    for bad in ("8", True, [8]):
        with pytest.raises(TypeError, match="budget"):
            make_policy("h2o", bad)
    with pytest.raises(TypeError, match="does not take"):
        make_policy("snapkv", 8, windw=4)
    for name, knobs in [
        ("snapkv", {"kernel": 4}),
        ("quest", {"page_size": 0}),
        ("mikv", {"low_bits": 9}),
        ("mpcache", {"cluster_size": 24, "subcluster_size": 16}),
        ("h2o", {"split": "pyramid"}),
        ("tova", {"timing": "during"}),
        ("h2o", {"recent_ratio": 1.5}),
    ]:
        with pytest.raises(ValueError):
            make_policy(name, 8, **knobs)


def test_split_across_layers_is_exact_and_proportional() -> None:
    total = torch.tensor([100, 7, 64])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    split = split_across_layers(total, weights)
    assert split.sum(-1).tolist() == total.tolist()
    assert torch.all((split - total[:, None] * weights / weights.sum()).abs() < 1)
    assert split[0].tolist() == [10, 20, 30, 40]


def test_global_head_counts_floor_and_global_top() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 4, 30, generator=g)
    scores[:, 0] += 10  # head 0 dominates
    scores[1, 3, 20:] = float("-inf")  # a head with only 20 valid slots
    budget = torch.tensor([8, 8])
    counts = global_head_counts(scores, budget, floor=0.25)
    assert counts.sum(-1).tolist() == [32, 32]
    assert bool((counts >= 2).all())  # 0.25 x 8
    assert counts[0, 0] == 26  # every free slot goes to the dominant head
    for b in range(2):  # the slots beyond the floors are the global best among what is left
        rest = []
        for h in range(4):
            ordered = scores[b, h].sort(descending=True).values
            rest += [(float(v), h, i < int(counts[b, h])) for i, v in enumerate(ordered[2:].tolist(), start=2)]
        taken = [v for v, _, chosen in rest if chosen]
        left = [v for v, _, chosen in rest if not chosen and v > float("-inf")]
        assert min(taken) >= max(left)


def test_global_split_keeps_the_layer_total(model: Transformer) -> None:
    ids, mask = batch(pad=0)
    cache = policy("snapkv", 12, split="global", floor=0.25)(model)
    run(model, cache, ids, mask, steps=0)
    for layer in range(model.config.n_layer):
        counts = cache.tokens_per_head(layer)
        assert counts.sum(-1).tolist() == [12 * model.config.n_kv_head] * 2
        assert bool((counts >= 3).all())


def test_layer_weights_split_the_total() -> None:
    model = tiny_model("llama")
    ids, mask = batch(pad=0)
    cache = policy("snapkv", 12, layer_weights=[1.0, 2.0, 3.0])(model)
    run(model, cache, ids, mask, steps=0)
    assert [int(cache.tokens_per_head(layer)[0, 0]) for layer in range(3)] == [6, 12, 18]


def test_slot_state_follows_keep_and_starts_at_zero() -> None:
    cache = H2O(1, 4)
    kv = torch.randn(2, 2, 6, 8)
    cache.update(0, kv, kv, torch.arange(6).expand(2, 6), torch.ones(2, 6, dtype=torch.bool))
    state = cache.slot_state(0, "accumulated")
    state += torch.arange(1.0, 7.0)  # slot i holds i + 1
    index = torch.tensor([[[1, 4, 5], [0, 2, 5]], [[3, 5, 5], [2, 5, 5]]])
    count = torch.tensor([[3, 3], [1, 1]])  # uneven rows leave stale slots behind the short ones
    cache.keep(0, index, count)
    assert cache.slot_state(0, "accumulated")[0].tolist() == [[2, 5, 6], [1, 3, 6]]
    cache.update(0, kv[:, :, :2], kv[:, :, :2], torch.full((2, 2), 6), torch.ones(2, 2, dtype=torch.bool))
    state = cache.slot_state(0, "accumulated")
    assert state[0, :, :3].tolist() == [[2, 5, 6], [1, 3, 6]] and state[0, :, 3:5].abs().sum() == 0
    assert state[1, :, 0].tolist() == [4, 3] and state[1, :, 1:3].abs().sum() == 0  # fresh slots, no leftovers


def test_attention_received_sums_causal_softmax_in_chunks(model: Transformer) -> None:
    ids, mask = batch()
    cache = spy(H2O, model, 1000)
    run(model, cache, ids, mask, steps=0)
    snap = cache.seen[1][0]
    manual = manual_probs(snap["q"], snap["keys"], positions_of(mask), snap["pos"], snap["valid"])
    manual = (manual * mask[:, None, None, :, None]).sum(3)
    for chunk in (5, 1000):
        got = cache.attention_received(1, snap["q"], positions_of(mask), chunk=chunk)
        assert torch.allclose(got, manual, atol=1e-5)
    weights = torch.rand(2, 10)
    last = cache.attention_received(1, snap["q"], positions_of(mask), last=10, weights=weights, chunk=3)
    assert torch.allclose(
        last,
        (
            manual_probs(snap["q"][:, :, -10:], snap["keys"], positions_of(mask)[:, -10:], snap["pos"], snap["valid"])
            * weights[:, None, None, :, None]
        ).sum(3),
        atol=1e-5,
    )


# --------------------------------------------------------------- when methods act
def test_timing_before_compresses_what_the_prompt_attends_to(model: Transformer) -> None:
    ids, mask = batch(pad=0)
    full = run(model, KVCache(model.config.n_layer), ids, mask, steps=0)[0]
    after = run(model, policy("snapkv", 12)(model), ids, mask, steps=0)[0]
    before_cache = policy("snapkv", 12, timing="before")(model)
    before = run(model, before_cache, ids, mask, steps=0)[0]
    assert torch.equal(after, full)
    assert not torch.allclose(before, full, atol=1e-4)
    assert before_cache.attended_tokens(0).max() == 12  # the prompt's own attention read the compressed cache


def test_decode_interval_compresses_every_n_steps(model: Transformer) -> None:
    ids, mask = batch(pad=0)
    cache = policy("h2o", 12, decode_interval=3)(model)
    sizes = []
    run(model, cache, ids, mask, steps=7, on_step=lambda s: sizes.append(int(cache.tokens_per_head(0).max())))
    assert sizes == [12, 13, 14, 12, 13, 14, 12, 13]


def test_block_wise_prefill_bounds_memory(model: Transformer) -> None:
    class ChunkedSnapKV(SnapKV):
        compress_chunks = True

    ids, _ = batch(pad=0)
    cache = ChunkedSnapKV.from_model(model, 8, window=4)
    peaks = []
    original = cache.update

    def update(layer, keys, values, positions, valid):
        entry = original(layer, keys, values, positions, valid)
        peaks.append(int(entry.valid.sum(-1).max()))
        return entry

    cache.update = update
    prefill_in_chunks(model, ids, cache, chunk_size=10)
    assert max(peaks) <= 8 + 10 and cache.tokens_per_head(0).max() == 8
    assert cache.forwards[0] == 5


def test_hidden_states_hook_sees_the_projection_input() -> None:
    model = tiny_model("gpt2")

    class Hidden(KVCache):
        def observe_hidden(self, layer: int, hidden: Tensor) -> None:
            self.hidden = getattr(self, "hidden", {})
            self.hidden[layer] = hidden

    cache = Hidden(model.config.n_layer)
    ids, mask = batch(pad=0)
    run(model, cache, ids, mask, steps=0)
    keys = model.blocks[1].attn.k_proj(cache.hidden[1]).view(2, PROMPT, 4, 16).transpose(1, 2)
    assert torch.allclose(keys, cache.layers[1].keys, atol=1e-6)


# ------------------------------------------------------------ per-method properties
def test_streamingllm_keeps_exactly_sinks_and_recent(model: Transformer) -> None:
    ids, mask = batch()
    cache = policy("streamingllm", 10)(model)
    lengths = mask.sum(-1).tolist()

    def check(step: int) -> None:
        for layer in range(model.config.n_layer):
            for row, heads in enumerate(kept_positions(cache, layer)):
                n = lengths[row] + step
                assert all(h == set(range(4)) | set(range(n - 6, n)) for h in heads), (layer, row, heads)

    run(model, cache, ids, mask, on_step=check)


# (45, 0.0): row 0 (48 tokens) evicts at once, row 1 (42) only after 4 decode steps, by score alone
@pytest.mark.parametrize(("budget", "recent_ratio"), [(12, 0.5), (45, 0.0)])
def test_h2o_keeps_recent_plus_largest_accumulated_attention(model: Transformer, budget: int, recent_ratio: float):
    ids, mask = batch()
    cache = spy(H2O, model, budget, recent_ratio=recent_ratio)
    n_recent = budget - int(budget * (1 - recent_ratio))
    totals: list[dict] = [{} for _ in range(model.config.n_layer)]  # (row, head, position) -> accumulated

    def check(step: int) -> None:
        for layer, seen in enumerate(cache.seen):
            snap = seen[-1]
            qpos = positions_of(mask) if step == 0 else (mask.sum(-1, keepdim=True) + step - 1)
            probs = manual_probs(snap["q"], snap["keys"], qpos, snap["pos"], snap["valid"])
            if step == 0:
                probs = probs * mask[:, None, None, :, None]  # padding queries vote for nothing
            received = probs.sum((2, 3))
            kept = kept_positions(cache, layer)
            for row in range(2):
                for head in range(model.config.n_kv_head):
                    valid = snap["valid"][row, head]
                    positions = snap["pos"][row, head][valid].tolist()
                    for p, r in zip(positions, received[row, head][valid].tolist(), strict=True):
                        totals[layer][row, head, p] = totals[layer].get((row, head, p), 0.0) + r
                    scores = {p: totals[layer][row, head, p] for p in positions}
                    recent = set(sorted(positions)[len(positions) - n_recent :])
                    assert_top_set(kept[row][head], scores, recent, min(budget, len(positions)), tol=1e-4)
                    for p in set(positions) - kept[row][head]:  # evicted scores are gone for good
                        totals[layer].pop((row, head, p))

    run(model, cache, ids, mask, steps=6, on_step=check)


def test_h2o_accumulates_one_unit_per_query() -> None:
    model = tiny_model("llama")
    ids, mask = batch()
    cache = policy("h2o", 1000)(model)
    run(model, cache, ids, mask, steps=3)
    for layer in range(3):
        total = cache.slot_state(layer, "accumulated").sum(-1)  # G query heads x (prompt + 3) valid queries
        assert torch.allclose(total, (mask.sum(-1)[:, None] + 3).float() * 2, atol=1e-3)


def test_snapkv_keeps_window_plus_top_pooled_votes(model: Transformer) -> None:
    ids, mask = batch(pad=0)
    budget, window = 16, 8
    cache = spy(SnapKV, model, budget, window=window)
    run(model, cache, ids, mask, steps=0)
    for layer, seen in enumerate(cache.seen):
        snap = seen[0]
        probs = manual_probs(
            snap["q"][:, :, -window:], snap["keys"], positions_of(mask)[:, -window:], snap["pos"], snap["valid"]
        )
        vote = probs.sum(3).mean(2)
        vote[..., -window:] = 0
        pooled = F.avg_pool1d(vote.reshape(-1, 1, PROMPT), 5, 1, 2).reshape(vote.shape)
        for row, heads in enumerate(kept_positions(cache, layer)):
            for head, kept in enumerate(heads):
                scores = dict(enumerate(pooled[row, head].tolist()))
                assert_top_set(kept, scores, set(range(PROMPT - window, PROMPT)), budget)


def test_tova_drops_the_lowest_current_attention(model: Transformer) -> None:
    ids, mask = batch()
    budget = 12
    cache = spy(TOVA, model, budget)

    def check(step: int) -> None:
        for layer, seen in enumerate(cache.seen):
            snap = seen[-1]
            qpos = positions_of(mask)[:, -1:] if step == 0 else mask.sum(-1, keepdim=True) + step - 1
            last = manual_probs(snap["q"][:, :, -1:], snap["keys"], qpos, snap["pos"], snap["valid"]).mean((1, 2, 3))
            kept = kept_positions(cache, layer)
            for row in range(2):
                valid = snap["valid"][row, 0]
                scores = dict(zip(snap["pos"][row, 0][valid].tolist(), last[row][valid].tolist(), strict=True))
                assert all(h == kept[row][0] for h in kept[row])  # one set for the whole layer
                assert_top_set(kept[row][0], scores, set(), budget)
                if step > 0:  # exactly one token left: the least attended one
                    (gone,) = set(scores) - kept[row][0]
                    assert scores[gone] == pytest.approx(min(scores.values()), abs=1e-6)

    run(model, cache, ids, mask, on_step=check)


def test_quest_page_summaries_extend_as_tokens_arrive() -> None:
    """Quest's incremental page summary equals the recomputation after every append (left padding shifts each
    row's pages; heads may hold different numbers of slots when appended in uneven blocks)."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 60, 8, generator=g)
    valid = torch.ones(2, 3, 60, dtype=torch.bool)
    valid[1, :, :7] = False  # left padding of row 1
    summary = None
    for end in (20, 21, 22, 29, 30, 44, 45, 60):
        summary = extend_chunk_min_max(summary, keys[:, :, :end], valid[:, :, :end], 5)
        want = chunk_min_max(keys[:, :, :end], valid[:, :, :end], 5)
        for got, ref in zip(summary[:3], want, strict=True):
            assert torch.equal(got, ref), end
        assert torch.equal(summary[3], valid[:, :, :end].sum(-1))


def test_quest_bound_is_an_upper_bound_of_q_dot_k() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 37, 8, generator=g)
    valid = torch.rand(2, 3, 37, generator=g) > 0.2
    q = torch.randn(2, 3, 2, 8, generator=g)
    kmax, kmin, nonempty = chunk_min_max(keys, valid, 5)
    bound = page_bound(q, kmax, kmin)  # [B, H, G, C]
    slot_page = (valid.long().cumsum(-1) - 1) // 5
    dots = torch.einsum("bhgd,bhld->bhgl", q, keys)
    for b in range(2):
        for h in range(3):
            for c in range(int(nonempty[b, h].sum())):
                members = valid[b, h] & (slot_page[b, h] == c)
                assert int(members.sum()) == min(5, int(valid[b, h].sum()) - 5 * c)
                best = dots[b, h][:, members].amax(-1)
                assert bool((bound[b, h, :, c] >= best - 1e-5).all())
                box = keys[b, h][members]  # the bound is attained by the box corner matching q's signs
                corner = torch.where(q[b, h] > 0, box.amax(0), box.amin(0))
                assert torch.allclose(bound[b, h, :, c], (q[b, h] * corner).sum(-1), atol=1e-5)


def test_quest_reads_the_last_page_and_the_top_bounds(model: Transformer) -> None:
    ids, mask = batch()
    page, budget = 4, 12
    cache = spy(Quest, model, budget, page_size=page, dense_layers=1)

    def check(step: int) -> None:
        if step == 0:
            return
        for layer, seen in enumerate(cache.seen):
            snap, read = seen[-1], cache.read(layer)
            if layer == 0:
                assert read.valid.sum() == snap["valid"].sum()
                continue
            hkv = snap["keys"].shape[1]
            q = snap["q"][:, :, 0].view(2, hkv, -1, snap["q"].shape[-1])
            for row in range(2):
                for head in range(hkv):
                    valid = snap["valid"][row, head]
                    keys, pos = snap["keys"][row, head][valid], snap["pos"][row, head][valid].tolist()
                    pages = [list(range(i, min(i + page, len(pos)))) for i in range(0, len(pos), page)]
                    scores = {}
                    for c, members in enumerate(pages):
                        box = keys[members]
                        qh = q[row, head]
                        scores[c] = float(torch.maximum(qh * box.amax(0), qh * box.amin(0)).sum(-1).max())
                    got = set(read.positions[row, head][read.valid[row, head]].tolist())
                    chosen = {c for c, members in enumerate(pages) if pos[members[0]] in got}
                    assert got == {pos[i] for c in chosen for i in pages[c]}  # whole pages
                    assert_top_set(chosen, scores, {len(pages) - 1}, budget // page, tol=1e-4)

    run(model, cache, ids, mask, on_step=check)


def test_think_prunes_the_least_important_key_channels(model: Transformer) -> None:
    ids, mask = batch(pad=0)
    ratio, recent, nq = 0.4, 8, 8
    cache = spy(ThinK, model, 24, window=8, channel_ratio=ratio, recent=recent, channel_queries=nq)
    run(model, cache, ids, mask, steps=0)
    d = model.config.head_dim
    n_prune = int(ratio * d)
    for layer, seen in enumerate(cache.seen):
        snap, pruned, channels = seen[0], cache.pruned[layer], cache.channels[layer]
        full_keys = snap["keys"]  # position p sits in slot p (no padding)
        hkv = full_keys.shape[1]
        qw = snap["q"][:, :, -nq:].reshape(2, hkv, -1, d)
        for row in range(2):
            for head in range(hkv):
                kept_pos = sorted(
                    kept_positions(cache, layer)[row][head]
                    | set(pruned.positions[row, head][pruned.valid[row, head]].tolist())
                )
                assert len(kept_pos) == 24
                k = full_keys[row, head, kept_pos]
                score = torch.stack([qw[row, head][:, c].norm() * k[:, c].norm() for c in range(d)])
                kept_ch = channels[row, head].tolist()
                assert len(kept_ch) == d - n_prune
                dropped = sorted(set(range(d)) - set(kept_ch))
                assert score[kept_ch].min() >= score[dropped].max() - 1e-5
                old = pruned.positions[row, head][pruned.valid[row, head]]
                assert old.max() < kept_pos[-recent]  # only non-recent tokens lost channels
                stored = pruned.keys[row, head][pruned.valid[row, head]]
                assert torch.equal(stored, full_keys[row, head][old][:, kept_ch])  # kept channels bit-identical
                recent_keys = cache.layers[layer].keys[row, head][cache.layers[layer].valid[row, head]]
                assert torch.equal(recent_keys, full_keys[row, head, kept_pos[-recent:]])


def test_think_without_channel_pruning_is_snapkv(model: Transformer) -> None:
    ids, mask = batch()
    think = run(model, policy("think", 12, channel_ratio=0.0)(model), ids, mask)
    snap = run(model, policy("snapkv", 12)(model), ids, mask)
    assert all(torch.equal(a, b) for a, b in zip(think, snap, strict=True))
    pruned = policy("think", 12)(model)
    run(model, pruned, ids, mask)
    unpruned = policy("think", 12, channel_ratio=0.0)(model)
    run(model, unpruned, ids, mask)
    assert pruned.memory_bytes() < unpruned.memory_bytes()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_mikv_quantization_error_within_half_a_step(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 19, generator=g) * torch.rand(3, 5, 1, generator=g) * 4
    x[0, 0] = 1.5  # a constant row
    codes, scale, zero = quantize(x, bits)
    assert int(codes.max()) < 2**bits
    assert bool(((dequantize(codes, scale, zero) - x).abs() <= scale[..., None] / 2 + 1e-5).all())
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, 5, bits, 3) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits, 19), codes)


def test_mikv_keeps_every_token_and_dequantizes_within_bound(model: Transformer) -> None:
    ids, mask = batch()
    bits, budget = 3, 12
    cache = policy("mikv", budget, low_bits=bits)(model)
    full = KVCache(model.config.n_layer)
    run(model, full, ids, mask)
    run(model, cache, ids, mask)
    for layer in range(model.config.n_layer):
        low, balance = cache.low[layer], cache.balance[layer]
        view = cache.read(layer)
        ref = full.layers[layer]
        for row in range(2):
            for head in range(model.config.n_kv_head):
                got = dict(
                    zip(
                        view.positions[row, head][view.valid[row, head]].tolist(),
                        range(int(view.valid[row, head].sum())),
                        strict=True,
                    )
                )
                assert sorted(got) == sorted(ref.positions[row, head][ref.valid[row, head]].tolist())
                vk = view.keys[row, head][view.valid[row, head]]
                vv = view.values[row, head][view.valid[row, head]]
                n_low = int(low.valid[row, head].sum())
                lo_pos = low.positions[row, head][low.valid[row, head]].tolist()
                assert n_low == len(lo_pos) > 0
                for p in lo_pos:
                    slot = int((ref.positions[row, head] == p).nonzero()[-1])
                    true_k, true_v = ref.keys[row, head, slot], ref.values[row, head, slot]
                    v_step = (true_v.max() - true_v.min()) / (2**bits - 1)
                    assert bool(((vv[got[p]] - true_v).abs() <= v_step / 2 + 1e-5).all())
                    kb = true_k * balance[row, head]
                    k_step = (kb.max() - kb.min()) / (2**bits - 1)
                    assert bool(((vk[got[p]] - true_k).abs() <= k_step / (2 * balance[row, head]) + 1e-5).all())
                    assert not torch.equal(vk[got[p]], true_k)  # really stored at low precision
    # the full-precision set is H2O's: same choice at the first layer, where nothing differs yet
    h2o = policy("h2o", budget)(model)
    run(model, h2o, ids, mask, steps=0)
    fresh = policy("mikv", budget, low_bits=bits)(model)
    run(model, fresh, ids, mask, steps=0)
    assert kept_positions(h2o, 0) == kept_positions(fresh, 0)


def test_mikv_balancer_tames_key_outlier_channels() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 64, 16, generator=g)
    keys[..., 0] *= 100  # an outlier key channel the queries barely use
    queries = torch.randn(1, 1, 64, 16, generator=g)
    queries[..., 0] *= 0.01
    valid = torch.ones(1, 1, 64, dtype=torch.bool)
    b = channel_balance(queries, keys, valid)
    assert torch.allclose((queries / b) @ (keys * b).transpose(-1, -2), queries @ keys.transpose(-1, -2), atol=1e-3)

    def logit_error(scale: Tensor) -> float:
        codes, step, zero = quantize(keys * scale, 2)
        approx = dequantize(codes, step, zero) / scale
        return float((queries @ (approx - keys).transpose(-1, -2)).abs().mean())

    assert logit_error(b) < 0.5 * logit_error(torch.ones_like(b))


@pytest.mark.parametrize("window_queries,static_heads", [(0, "layer"), (5, "layer"), (0, "kv"), (3, "kv")])
def test_mpcache_static_eviction_keeps_top_window_attention(
    model: Transformer, window_queries: int, static_heads: str
) -> None:
    ids, mask = batch()
    budget, sink, window = 10, 4, 4
    pool = 5  # each slot's vote is summed with its 2 neighbours on either side
    knobs = {"own_first": 3, "static_pool": pool, "window_queries": window_queries, "static_heads": static_heads}
    cache = spy(MPCache, model, budget, **{**SMALL["mpcache"], **knobs})
    run(model, cache, ids, mask, steps=0)
    lengths = mask.sum(-1).tolist()
    for layer, seen in enumerate(cache.seen):
        snap = seen[0]
        kept = kept_positions(cache, layer)
        hkv = snap["keys"].shape[1]
        for row in range(2):
            w = int(0.2 * lengths[row])  # the row's last 20% of prompt queries vote ...
            w = min(w, window_queries) if window_queries else w  # ... or at most window_queries of them
            probs = manual_probs(
                snap["q"][:, :, -w:], snap["keys"], positions_of(mask)[:, -w:], snap["pos"], snap["valid"]
            )
            if static_heads == "layer":  # head-averaged, summed over the window: one keep-set for the layer
                votes = probs.mean((1, 2)).sum(1)[:, None].expand(-1, hkv, -1)
            else:  # averaged over each KV head's query heads: a keep-set per KV head
                votes = probs.mean(2).sum(2)
            r = pool // 2
            score = torch.stack([votes[..., max(i - r, 0) : i + r + 1].sum(-1) for i in range(votes.shape[-1])], -1)
            for head in range(hkv):
                valid = snap["valid"][row, head]
                pos = snap["pos"][row, head][valid].tolist()
                scores = dict(zip(pos, score[row, head][valid].tolist(), strict=True))
                protected = set(pos[:sink]) | set(pos[-window:])
                assert_top_set(kept[row][head], scores, protected, max(budget, lengths[row] // 2))
            if static_heads == "layer":
                assert all(h == kept[row][0] for h in kept[row])  # one keep-set per layer


def _reference_selection(
    q, keys, valid, n_sub, alpha, size1, size2, ratio1, similarity="linear", topk="rank", group="sum"
):
    """Loop-by-loop MPCache selection for one head: (parents, children) as sets of cluster indices. q: the group's
    query heads [G, D] (or one query [D]); group: "sum" or "max" of the query heads' scores."""
    k = keys[valid]
    q = q.reshape(-1, q.shape[-1])

    def summaries(size):
        heads = []  # per cluster: each query head's score
        for start in range(0, len(k), size):
            hi, lo = k[start : start + size].amax(0), k[start : start + size].amin(0)
            if similarity == "linear":  # each query head's score of the blend (summed: the summed query's score)
                heads.append([float(qh @ (alpha * hi + (1 - alpha) * lo)) for qh in q])
            elif similarity == "exact":  # each query head's best key in the chunk
                heads.append([float((k[start : start + size] @ qh).max()) for qh in q])
            else:  # Quest's bound of every query head
                heads.append([float(torch.maximum(qh * hi, qh * lo).sum()) for qh in q])
        if group == "sum":
            return [sum(h) for h in heads]
        if group == "centered":  # each head's score below its own best middle cluster's (the ends are forced)
            peaks = [max(h[g] for h in heads[1:-1]) for g in range(len(q))]
            heads = [[v - p for v, p in zip(h, peaks)] for h in heads]
        return [max(h) for h in heads]

    def best(scores, candidates, count):
        if topk == "rank":
            return set(sorted(candidates, key=lambda c: -scores[c])[:count])
        # bucket: the best (first on ties) of each strided bucket of the candidates
        return {max(candidates[b::count], key=lambda c: (scores[c], -c)) for b in range(count)} if count > 0 else set()

    s1, s2 = summaries(size1), summaries(size2)
    n_parent = min(len(s1), max(-(-(n_sub + 1) // 2), int(ratio1 * len(s1))))
    forced1 = {0, len(s1) - 1}
    parents = forced1 | best(s1, list(range(1, len(s1) - 1)), n_parent - len(forced1))
    eligible = [c for c in range(len(s2)) if c // (size1 // size2) in parents]
    forced2 = {0, len(s2) - 1}
    if topk == "rank":
        rest = best(s2, sorted(set(eligible) - forced2), max(n_sub - len(forced2), 0))
    else:  # children of unchosen parents compete 1e4 lower
        lowered = [v - (0.0 if c in eligible else 1e4) for c, v in enumerate(s2)]
        rest = best(lowered, list(range(1, len(s2) - 1)), max(min(n_sub, len(s2)) - len(forced2), 0))
    return parents, forced2 | rest, s2


def test_mpcache_cluster_selection_picks_top_approximate_similarity() -> None:
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 100, 8, generator=g)
    valid = torch.ones(2, 3, 100, dtype=torch.bool)
    valid[1, :, :12] = False  # a padded row
    query = torch.randn(2, 3, 8, generator=g)
    tokens = torch.tensor([24, 40])
    mask = select_clusters(
        query[:, :, None], keys, valid, tokens, alpha=0.6, cluster_size=8, subcluster_size=4, ratio1=0.5
    )
    for b in range(2):
        for h in range(3):
            _, children, s2 = _reference_selection(
                query[b, h], keys[b, h], valid[b, h], int(tokens[b]) // 4, 0.6, 8, 4, 0.5
            )
            ranks = (valid[b, h].long().cumsum(-1) - 1)[mask[b, h]]
            assert set((ranks // 4).tolist()) == children, (b, h)
            assert int(mask[b, h].sum()) == 4 * len(children) == int(tokens[b])
    # the linearised score is alpha max + (1 - alpha) min, not Quest's bound
    kmax, kmin, _ = chunk_min_max(keys, valid, 4)
    assert torch.allclose(
        approx_similarity(query, kmax, kmin, 0.6), (query[:, :, None] * (0.6 * kmax + 0.4 * kmin)).sum(-1), atol=1e-5
    )
    assert not torch.allclose(
        approx_similarity(query, kmax, kmin, 0.6), page_bound(query[:, :, None], kmax, kmin)[:, :, 0], atol=1e-2
    )


@pytest.mark.parametrize(
    "similarity,topk,group",
    [
        ("linear", "rank", "sum"),
        ("bound", "bucket", "sum"),
        ("bound", "rank", "sum"),
        ("exact", "bucket", "sum"),
        ("linear", "rank", "max"),
        ("bound", "bucket", "max"),
        ("exact", "rank", "max"),
        ("bound", "bucket", "centered"),
        ("linear", "rank", "centered"),
        ("exact", "bucket", "centered"),
        ("exact", "bucket", "max"),  # MPCacheKnobs.retrieval()
    ],
)
def test_mpcache_decode_reads_the_selected_clusters(model: Transformer, similarity: str, topk: str, group: str) -> None:
    ids, mask = batch()
    budget = 20
    knobs = {**SMALL["mpcache"], "own_first": 3, "similarity": similarity, "topk": topk, "group": group}
    cache = spy(MPCache, model, budget, **knobs)

    def check(step: int) -> None:
        if step == 0:
            return
        for layer, seen in enumerate(cache.seen):
            snap, read = seen[-1], cache.read(layer)
            hkv = snap["keys"].shape[1]
            query = snap["q"][:, :, 0].view(2, hkv, -1, snap["q"].shape[-1])
            for row in range(2):
                for head in range(hkv):
                    valid = snap["valid"][row, head]
                    _, children, _ = _reference_selection(
                        query[row, head], snap["keys"][row, head], valid, budget // 4, 0.6, 8, 4, 0.5, similarity,
                        topk, group,
                    )  # fmt: skip
                    pos = snap["pos"][row, head][valid].tolist()
                    assert len(children) == budget // 4 < -(-len(pos) // 4)  # a real choice among the children
                    expected = {pos[i] for i in range(len(pos)) if i // 4 in children}
                    assert set(read.positions[row, head][read.valid[row, head]].tolist()) == expected

    run(model, cache, ids, mask, on_step=check)


def test_mpcache_presets_are_options_the_registry_rebuilds(model: Transformer) -> None:
    assert MPCacheKnobs().options() == {}
    for preset in (MPCacheKnobs.paper(), MPCacheKnobs.retrieval()):
        assert MPCacheKnobs(**preset.options()) == preset
    retrieval = MPCacheKnobs.retrieval()
    assert (retrieval.similarity, retrieval.group, retrieval.static_ratio) == ("exact", "max", 1.0)
    ids, mask = batch()
    cache = make_policy("mpcache", 12, **retrieval.options())(model)
    assert cache.knobs == retrieval and cache.shared_from == {}
    run(model, cache, ids, mask)
    assert all(entry is not None and bool(entry.valid.sum(-1).eq(mask.sum(-1)[:, None] + STEPS).all())
               for entry in cache.layers)  # fmt: skip  nothing statically evicted: prompt and decoded tokens kept


def test_mpcache_adjacent_layers_share_indices() -> None:
    assert sharing_pairs(32) == {layer: layer - 1 for layer in range(3, 30, 2)}
    model = tiny_model("llama", n_layer=4)
    ids, mask = batch()
    knobs = {**SMALL["mpcache"], "own_first": 0, "own_last": 0}

    def trace(share: bool) -> list:
        cache = policy("mpcache", 12, **knobs, share_layers=share)(model)
        reads = []

        def record(step: int) -> None:
            views = [cache.read(layer) for layer in range(4)] if step else [cache.layers[layer] for layer in range(4)]
            reads.append(
                [[set(v.positions[r, h][v.valid[r, h]].tolist()) for r in range(2) for h in range(2)] for v in views]
            )

        run(model, cache, ids, mask, on_step=record)
        return reads

    shared, own = trace(True), trace(False)
    assert all(step[1] == step[0] and step[3] == step[2] for step in shared)  # static keep-set and selections
    assert any(step[1] != step[0] for step in own)  # without sharing the layers do differ
