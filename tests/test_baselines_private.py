"""StreamingLLM and H2O on secret shares (mpcache/mpc/caches/baselines.py) against the plaintext references.

Simulation (the same code on float tensors) must keep exactly the slots the plaintext policies keep, H2O with the
same accumulated scores up to the softmax approximation; 2PC must match the simulator within fixed-point tolerance
and open nothing.
"""

from __future__ import annotations

import pytest
import torch
from test_mpc_layers import tiny

from mpcache.methods import make_policy
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.caches.baselines import PrivateH2O, PrivateStreamingLLM, ends
from mpcache.mpc.nn import layers as L
from mpcache.mpc.transport.local import LocalParties

SIM = lambda t: t  # noqa: E731  (identity share: the simulator)


class Recording(PrivateH2O):
    """PrivateH2O that remembers every key it stored, so a test can tell which tokens the secret gather kept."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stored: dict[int, list[tuple[torch.Tensor, int]]] = {}

    def update(self, layer, keys, values, positions, valid):
        for t in range(keys.shape[2]):
            self.stored.setdefault(layer, []).append((keys[:, :, t].clone(), int(positions[0, t])))
        return super().update(layer, keys, values, positions, valid)

    def true_positions(self, layer: int) -> torch.Tensor:
        """Positions of the kept slots: a one-hot gather copies a key exactly, so exact equality finds it."""
        entry = self.layers[layer]
        out = torch.full(entry.positions.shape, -1)
        for b in range(out.shape[0]):
            for h in range(out.shape[1]):
                for j in range(out.shape[2]):
                    out[b, h, j] = next(p for k, p in self.stored[layer] if torch.equal(k[b, h], entry.keys[b, h, j]))
        return out


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 40, (1, n), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------------- simulation


def test_ends_are_sinks_and_newest_slots():
    assert ends(10, 6, 2).tolist() == [0, 1, 6, 7, 8, 9]
    assert ends(10, 3, 4).tolist() == [0, 1, 2]  # sinks clamped to the keep count
    assert ends(4, 6, 2).tolist() == [0, 1, 2, 3]


def test_simulated_streamingllm_keeps_the_plaintext_slots():
    m = tiny("llama", n_layer=2, max_position=256)
    ids = _prompt(40, 3)
    plain, private = make_policy("streamingllm", 16)(m), PrivateStreamingLLM(2, 16)
    pm = L.PrivateTransformer.from_plain(m, SIM)
    filled = L.PrivateKVCache(2)
    with torch.no_grad():
        ref, out = m(ids, plain), pm(L.one_hot(ids, 40), private)
        pm(L.one_hot(ids, 40), filled)
        adopted = PrivateStreamingLLM.adopt(filled, 16)
        again = out  # the adopted cache's logits (from the first decode step on)
        assert adopted.seen_tokens == 40
        for step in range(5):
            for layer in range(2):
                want = plain.layers[layer].positions
                assert torch.equal(private.layers[layer].positions, want), (step, layer)
                assert torch.equal(adopted.layers[layer].positions, want), (step, layer)
            if step:
                assert (out - ref).abs().max() < 1e-3 and (again - ref).abs().max() < 1e-3, step
            token = ref[:, -1:].argmax(-1)
            ref, out, again = m(token, plain), pm(L.one_hot(token, 40), private), pm(L.one_hot(token, 40), adopted)
    assert private.layers[0].positions[0, 0].tolist() == [0, 1, 2, 3, *range(33, 45)]


# accumulated attention's error: the polynomial exp is exact to ~1e-6 per probability; the table exp (lut.exp) is
# documented to 2.5e-4 relative (tests/test_mpc_lut.py), so a sum of probabilities carries at most that relative error
SCORE_TOL = {"poly": lambda acc: 1e-4, "lut": lambda acc: 2.5e-4 * acc + 1e-4}


@pytest.mark.parametrize("nonlinear", ["poly", "lut"])
@pytest.mark.parametrize("knobs", [{}, dict(sink=2, recent_ratio=0.25)])
def test_simulated_h2o_keeps_the_plaintext_slots_and_scores(knobs, nonlinear):
    m = tiny("llama", n_layer=2, max_position=256)
    ids = _prompt(40, 4)
    plain, private = make_policy("h2o", 16, **knobs)(m), Recording(2, 16, **knobs)
    pm = L.PrivateTransformer.from_plain(m, SIM, L.PrivateOptions(nonlinear=nonlinear))
    with torch.no_grad():
        ref, out = m(ids, plain), pm(L.one_hot(ids, 40), private)  # the prompt's eviction: top-k of 40 - recent
        for step in range(5):
            assert (out[:, -1:] - ref[:, -1:]).abs().max() < 1e-3, step
            for layer in range(2):
                assert torch.equal(private.true_positions(layer), plain.layers[layer].positions), (step, layer)
                accumulated = plain.state[layer]["accumulated"].double()
                excess = (private.scores[layer] - accumulated).abs() - SCORE_TOL[nonlinear](accumulated.abs())
                assert float(excess.max()) < 0, (step, layer)
                # public positions are lower bounds of the true ones; the recent window's are exact
                assert bool((private.layers[layer].positions <= plain.layers[layer].positions).all())
                _, recent, _ = private.plan()
                assert torch.equal(
                    private.layers[layer].positions[..., -recent:], plain.layers[layer].positions[..., -recent:]
                )
            token = ref[:, -1:].argmax(-1)
            ref, out = m(token, plain), pm(L.one_hot(token, 40), private)
    kept = private.true_positions(0)[0, 0]
    assert kept.shape == (16,) and int(kept[-1]) == 44 and int(kept[0]) < 30  # heavy hitters from the prompt remain


def test_adopted_h2o_starts_from_zero_scores_and_evicts_the_lowest():
    m = tiny("llama", n_layer=2, max_position=256)
    ids = _prompt(30, 5)
    pm = L.PrivateTransformer.from_plain(m, SIM)
    filled = L.PrivateKVCache(2)
    with torch.no_grad():
        pm(L.one_hot(ids, 40), filled)
        cache = PrivateH2O.adopt(filled, 12, sink=1)
        assert cache.scores == [None, None] and cache.seen_tokens == 30
        assert cache.layers[0].positions[0, 0].tolist() == [0, *range(19, 30)]
        before = cache.layers[1].keys.clone()
        pm(L.one_hot(torch.tensor([[7]]), 40), cache)
    sink, recent, heavy = cache.plan()
    assert (sink, recent, heavy) == (1, 6, 5)
    scores = cache.scores[1]  # one query row per query head: every KV head's slots received G = 2 in all
    evicted = 2.0 - scores.sum(-1)  # the one slot dropped (among the 12 - 1 - 6 = 5 + 1 candidates)
    assert bool((evicted > 0).all()) and bool((evicted <= scores[..., sink : sink + heavy].amin(-1) + 1e-3).all())
    keys = cache.layers[1].keys
    assert torch.equal(keys[:, :, :1], before[:, :, :1])  # the sink
    assert torch.equal(keys[:, :, -recent:-1], before[:, :, -(recent - 1) :])  # the window moved by one


def test_bad_budgets_knobs_and_padding_are_value_errors():
    for cls in (PrivateStreamingLLM, PrivateH2O):
        for budget in (0, 1.5, 0.5, True, None):
            with pytest.raises(ValueError, match="budget"):
                cls(2, budget)
        with pytest.raises(ValueError, match="sink"):
            cls(2, 8, sink=-1)
        cache = cls(1, 8)
        x = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
        with pytest.raises(ValueError, match="unpadded"):
            cache.update(0, x, x, torch.arange(3)[None], torch.tensor([[False, True, True]]))
        with pytest.raises(ValueError, match="empty"):
            cls.adopt(L.PrivateKVCache(2), 8)
    for ratio in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="recent_ratio"):
            PrivateH2O(2, 8, recent_ratio=ratio)


# ------------------------------------------------------------------------------------------------------- MPC


@pytest.fixture(scope="module")
def parties():
    with LocalParties(setup=N.install, timeout=600) as p:
        yield p


def _run(cache: L.PrivateKVCache, ids: torch.Tensor, tokens: list[int], share) -> list[torch.Tensor]:
    """Prefill `ids`, then teacher-forced decode steps; the last position's logits after each forward."""
    pm = L.PrivateTransformer.from_plain(tiny("llama", n_layer=2, max_position=256), share)
    onehot = lambda t: L.one_hot(t, 40)  # noqa: E731
    if N.is_private(share(torch.zeros(1))):
        onehot = lambda t: N.crypten.cryptensor(L.one_hot(t, 40), src=1, precision=0)  # noqa: E731  the client's
    logits = [pm(onehot(ids), cache, last_only=True)]
    for token in tokens:
        logits.append(pm(onehot(torch.tensor([[token]])), cache))
    return logits


def _private_baselines(ids: torch.Tensor, tokens: list[int]) -> dict:
    from test_mpcache_private import _count_openings, _restore

    crypten = N.crypten
    share = lambda t: crypten.cryptensor(t, src=0)  # noqa: E731
    h2o, streaming = PrivateH2O(2, 8), PrivateStreamingLLM(2, 8)
    counts = _count_openings()
    try:
        logits = {"h2o": _run(h2o, ids, tokens, share), "streamingllm": _run(streaming, ids, tokens, share)}
        opened, masked, comparisons = counts["opened"], counts["masked"], counts["comparisons"]
    finally:
        _restore(counts)
    return {
        "opened": opened,
        "masked": masked,
        "comparisons": comparisons,
        "private": all(N.is_private(x) for x in (h2o.scores[0], h2o.layers[0].keys, streaming.layers[0].keys)),
        "logits": {k: [N.decode(x) for x in v] for k, v in logits.items()},
        "keys": {
            k: [N.decode(c.layers[i].keys) for i in range(2)] for k, c in (("h2o", h2o), ("streamingllm", streaming))
        },
        "positions": {
            k: [c.layers[i].positions for i in range(2)] for k, c in (("h2o", h2o), ("streamingllm", streaming))
        },
        "scores": [N.decode(s) for s in h2o.scores],
    }


@pytest.mark.timeout(600)
def test_private_baselines_match_the_simulator_and_open_nothing(parties):
    ids, tokens = _prompt(20, 6), [5, 17, 30]
    got = parties.run(_private_baselines, ids, tokens)[0]
    assert got["opened"] == 0 and got["private"]
    assert got["masked"] == got["comparisons"] > 0  # FSS comparisons: one masked, uniform message per batch
    sims = {"h2o": PrivateH2O(2, 8), "streamingllm": PrivateStreamingLLM(2, 8)}
    with torch.no_grad():
        for name, sim in sims.items():
            want = _run(sim, ids, tokens, SIM)
            for step, (a, b) in enumerate(zip(got["logits"][name], want)):
                assert (a - b).abs().max() < 3e-3, (name, step)
            for layer in range(2):  # the same tokens kept (a different token's key differs by far more)
                assert sim.layers[layer].capacity == 8
                assert (got["keys"][name][layer] - sim.layers[layer].keys).abs().max() < 3e-3, (name, layer)
                assert torch.equal(got["positions"][name][layer], sim.layers[layer].positions)
    for layer in range(2):
        assert (got["scores"][layer] - sims["h2o"].scores[layer]).abs().max() < 3e-3
