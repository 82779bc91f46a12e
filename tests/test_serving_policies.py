"""Block eviction policies on traces: Belady bounds every policy, the one-bit policies' consistency
and robustness bounds, LSM-GNN's pieces, and the trace generators."""

from __future__ import annotations

import numpy as np
import pytest

from mpcache.serving import traces
from mpcache.serving.policies import LRU, LSMGNN, Belady, DiscardBits, PhaseBits
from mpcache.serving.policies.discard import robust_bound
from mpcache.serving.predictors import Learned, Oracle, discard_labels, marking_phases, new_per_phase
from mpcache.serving.traces import Trace


def random_trace(seed: int, n: int = 3000, pages: int = 40, zipf: float | None = 0.8, per_request: int = 5) -> Trace:
    rng = np.random.default_rng(seed)
    if zipf is None:
        blocks = rng.integers(0, pages, n)
    else:
        blocks = traces.zipf_choice(rng, pages, zipf, n)
    blocks = rng.permutation(pages)[blocks].astype(np.int64)  # popularity not tied to the id
    starts = np.r_[np.arange(0, n, per_request), n].astype(np.int64)
    return Trace("random", blocks, starts, np.full(n, traces.SHARED, dtype=np.int8))


def workload_traces() -> list[Trace]:
    return [
        traces.shared_prompts(200, seed=1, n_fewshot=64),
        traces.multiturn(200, seed=2, active=16),
        traces.rag(150, seed=3, n_chunks=200, keying="chunk"),
    ]


def all_policies(train: Trace) -> list:
    return [
        LRU(),
        LRU(victim=8),
        LSMGNN(),
        LSMGNN(victim=0),
        LSMGNN(weight=2.0, lookahead=4, protect=1, lead=2),
        DiscardBits(Oracle("discard")),
        DiscardBits(Oracle("discard", error=0.2, seed=1)),
        DiscardBits(Oracle("discard", adversarial=True)),
        DiscardBits(Oracle("discard", error=0.3, seed=2), robust=False),
        DiscardBits(Learned("discard", train)),
        PhaseBits(Oracle("phase")),
        PhaseBits(Oracle("phase", error=0.2, seed=3)),
        PhaseBits(Oracle("phase", adversarial=True)),
        PhaseBits(Learned("phase", train)),
    ]


def brute_force_min_loads(blocks: list[int], k: int) -> int:
    """Fewest loads of any demand-paging schedule (exhaustive over the evicted page)."""
    states = {frozenset(): 0}
    for b in blocks:
        nxt: dict[frozenset, int] = {}
        for cache, cost in states.items():
            if b in cache:
                options = [(cache, cost)]
            elif len(cache) < k:
                options = [(cache | {b}, cost + 1)]
            else:
                options = [((cache - {v}) | {b}, cost + 1) for v in cache]
            for state, c in options:
                nxt[state] = min(c, nxt.get(state, c))
        states = nxt
    return min(states.values())


def test_belady_is_the_exhaustive_optimum_on_tiny_traces():
    rng = np.random.default_rng(0)
    for _ in range(20):
        blocks = rng.integers(0, 5, 14).astype(np.int64)
        trace = Trace("tiny", blocks, np.array([0, len(blocks)]), np.zeros(len(blocks), np.int8))
        for k in (1, 2, 3):
            assert Belady().simulate(trace, k).misses == brute_force_min_loads(blocks.tolist(), k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_belady_loads_fewest_blocks_of_every_policy(seed):
    """On random and workload traces and several cache sizes, no policy (with any predictions,
    victim buffer or prefetch) loads fewer blocks than Belady."""
    train = random_trace(seed + 100)
    candidates = [random_trace(seed), random_trace(seed + 10, zipf=None)]
    if seed == 0:
        candidates += workload_traces()
    for trace in candidates:
        for k in (4, 16, 64):
            best = Belady().simulate(trace, k)
            for policy in all_policies(train):
                result = policy.simulate(trace, k)
                assert result.hits + result.misses + result.victim_hits == trace.num_accesses
                assert best.loads <= result.loads, (trace.name, k, result.policy)
                assert best.hit_rate >= result.hit_rate - 1e-12 or result.prefetches > 0, (trace.name, k, result.policy)


@pytest.mark.parametrize("robust", [True, False])
def test_discard_bits_are_consistent(robust):
    """Perfect discard bits (from the recorded Belady run): exactly Belady's misses, with or
    without the robust switch (which never fires: Belady is optimal on every prefix)."""
    for trace in [random_trace(4), random_trace(5, zipf=None)] + workload_traces():
        for k in (3, 16, 50):
            policy = DiscardBits(Oracle("discard"), robust=robust)
            result = policy.simulate(trace, k)
            assert result.misses == Belady().simulate(trace, k).misses
            assert result.extra["switches"] == 0


def pinning_trace(k: int, rounds: int) -> tuple[Trace, np.ndarray]:
    """k-1 cold blocks once with a wrong 0 bit ("keep"), then two hot blocks alternating with a
    wrong 1 bit: following the bits pins the dead blocks and misses on every hot request."""
    cold = list(range(10, 10 + k - 1))
    hot = [0, 1] * rounds
    blocks = np.array(cold + hot, dtype=np.int64)
    bits = np.array([False] * len(cold) + [True] * len(hot))
    return Trace("pin", blocks, np.array([0, len(blocks)]), np.zeros(len(blocks), np.int8)), bits


def test_discard_bits_robust_bound_under_adversarial_predictions():
    """Robust version: misses <= 3 min(F, LRU) + 3k + 1 for any bits (see discard.py), checked
    with inverted, all-0, all-1, noisy bits and the pinning construction, which breaks the
    plain follow-the-bits rule."""
    k = 8
    pin, pin_bits = pinning_trace(k, rounds=500)
    follow = DiscardBits(lambda t, c: pin_bits, robust=False).simulate(pin, k)
    lru = LRU().simulate(pin, k)
    assert follow.misses > robust_bound(lru.misses, k)  # following wrong bits alone is unbounded
    robust = DiscardBits(lambda t, c: pin_bits).simulate(pin, k)
    assert robust.misses <= robust_bound(lru.misses, k) and robust.extra["switches"] >= 1
    adversaries = [
        Oracle("discard", adversarial=True),
        lambda t, c: np.zeros(t.num_accesses, bool),
        lambda t, c: np.ones(t.num_accesses, bool),
        Oracle("discard", error=0.5, seed=7),
    ]
    for trace in [random_trace(6), random_trace(7, zipf=None)] + workload_traces():
        for cap in (4, 16, 64):
            lru = LRU().simulate(trace, cap)
            for predictor in adversaries:
                result = DiscardBits(predictor).simulate(trace, cap)
                assert result.misses <= robust_bound(lru.misses, cap)
                assert result.misses <= robust_bound(result.extra["follow_faults"], cap)


def test_phase_bits_consistency_and_robustness_bounds():
    """Mark & predict: perfect phase bits miss exactly the blocks new to each phase (the best a
    marking algorithm can do, <= 2 OPT + k); any bits miss at most k per phase, and OPT misses
    at least once per phase after the first, so misses <= k (OPT + 1)."""
    for trace in [random_trace(8), random_trace(9, zipf=None)] + workload_traces():
        for k in (4, 16, 50):
            opt = Belady().simulate(trace, k).misses
            phases = int(marking_phases(trace, k).max()) + 1
            assert opt >= phases - 1
            perfect = PhaseBits(Oracle("phase")).simulate(trace, k)
            assert perfect.misses == new_per_phase(trace, k)
            assert perfect.misses <= 2 * opt + k
            assert perfect.extra["phases"] == phases
            for predictor in (Oracle("phase", adversarial=True), Oracle("phase", error=0.5, seed=1)):
                result = PhaseBits(predictor).simulate(trace, k)
                assert result.misses <= k * phases <= k * (opt + 1)
                assert result.misses >= perfect.misses  # no marking algorithm beats the new blocks


def test_prediction_errors_degrade_hit_rate_gradually():
    trace = traces.multiturn(600, seed=4, active=24)
    k = 64
    best = Belady().simulate(trace, k).misses
    misses = [DiscardBits(Oracle("discard", error=e, seed=0)).simulate(trace, k).misses for e in (0.0, 0.05, 0.2)]
    assert misses[0] == best and misses[0] <= misses[1] <= misses[2]
    bits = discard_labels(trace, k)
    noisy = Oracle("discard", error=0.05, seed=0)(trace, k)
    assert 0.03 < float((bits != noisy).mean()) < 0.07


def test_lsm_gnn_pieces():
    trace = traces.shared_prompts(500, seed=5, n_fewshot=64)  # blocks are distinct within a request
    k = 64
    assert LSMGNN(weight=0.0, victim=0, lead=0, protect=0).simulate(trace, k).hits == LRU().simulate(trace, k).hits
    full = LSMGNN().simulate(trace, k)
    plain = LSMGNN(victim=0).simulate(trace, k)
    assert full.victim_hits + full.prefetches > 0 and full.served_rate >= full.hit_rate
    assert full.misses < plain.misses  # the victim buffer saves recomputation
    again = LSMGNN().simulate(trace, k)
    assert (again.hits, again.victim_hits, again.prefetches) == (full.hits, full.victim_hits, full.prefetches)


def test_trace_generators_are_deterministic_and_well_formed():
    for make in (traces.shared_prompts, traces.multiturn, lambda n, seed: traces.rag(n, seed, n_chunks=50)):
        a, b, c = make(200, seed=0), make(200, seed=0), make(200, seed=1)
        assert np.array_equal(a.blocks, b.blocks) and not np.array_equal(a.blocks, c.blocks)
        assert a.num_requests == 200 and a.starts[-1] == a.num_accesses
        for r in range(a.num_requests):  # a request never reads a block twice
            part = a.blocks[a.starts[r] : a.starts[r + 1]]
            assert len(np.unique(part)) == len(part)
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 7, 200)
    nxt = traces.next_use(blocks)
    for t, b in enumerate(blocks):
        later = [u for u in range(t + 1, len(blocks)) if blocks[u] == b]
        assert nxt[t] == (later[0] if later else len(blocks))
    shared = traces.shared_prompts(100, seed=0, n_system=2, system_blocks=3)
    firsts = {tuple(shared.blocks[s : s + 3]) for s in shared.starts[:-1]}
    assert firsts <= {(0, 1, 2), (3, 4, 5)}  # the system prompt's blocks are shared ids
    prefix = traces.rag(100, seed=0, n_chunks=20, keying="prefix")
    chunk = traces.rag(100, seed=0, n_chunks=20, keying="chunk")
    assert len(np.unique(chunk.blocks)) < len(np.unique(prefix.blocks))  # content keying shares more


def test_policies_reject_bad_input():
    trace = random_trace(0, n=50)
    with pytest.raises(ValueError, match="capacity"):
        LRU().simulate(trace, 0)
    with pytest.raises(ValueError, match="bits"):
        DiscardBits(lambda t, c: np.zeros(3, bool)).simulate(trace, 4)
    with pytest.raises(ValueError, match="kind"):
        Oracle("sometimes")
    with pytest.raises(ValueError, match="starts"):
        Trace("bad", np.zeros(4, np.int64), np.array([0, 3]), np.zeros(4, np.int8))
