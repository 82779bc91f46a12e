"""Per-layer attention score bounds (mpcache/mpc/arith/score_bounds.py) and how the private decoder uses them.

The calibration is checked against scores written out independently (recorded at the plaintext attention call,
one-shot prefill, against the recorder's chunked prefill); the decoder's options against the bounds and exp mode
each layer's softmax actually receives; and the bound mode end to end in the simulator with calibrated bounds.
"""

from __future__ import annotations

import math

import pytest
import torch

import mpcache.kernels.decode as D
from mpcache.kernels import visibility
from mpcache.model.cache import KVCache
from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Transformer
from mpcache.mpc.arith.score_bounds import ScoreStats, calibrate
from mpcache.mpc.nn import decoder
from mpcache.mpc.nn import layers as L


def tiny(n_layer: int = 2, sharpen: float = 4.0) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        family="llama", vocab_size=40, n_layer=n_layer, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_position=64,
        activation="silu",
    )  # fmt: skip
    model = Transformer(config).double().eval()
    with torch.no_grad():  # sharper attention than the init's, so layers differ visibly
        for blk in model.blocks:
            blk.attn.q_proj.weight.mul_(1 + sharpen * blk.attn.layer)
    return model


def reference_extremes(model: Transformer, prompts: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Largest visible score and largest row spread per layer, recorded where the plaintext model attends."""
    n = model.config.n_layer
    top, spread, calls = [-math.inf] * n, [0.0] * n, []
    original = D.cached_attention

    def recording(q, keys, values, qpos, kpos, valid, window=None):
        layer = len(calls) % n
        calls.append(layer)
        b, hq, t, d = q.shape
        qq = q.reshape(b, keys.shape[1], hq // keys.shape[1], t, d)
        scores = torch.einsum("bhgtd,bhld->bhgtl", qq, keys) / math.sqrt(d)
        vis = visibility(qpos, kpos, valid, window).expand_as(scores)
        hi = scores.masked_fill(~vis, -math.inf).amax(-1)
        lo = scores.masked_fill(~vis, math.inf).amin(-1)
        ok = vis.any(-1)
        top[layer] = max(top[layer], float(hi[ok].max()))
        spread[layer] = max(spread[layer], float((hi - lo)[ok].max()))
        return original(q, keys, values, qpos, kpos, valid, window)

    D.cached_attention = recording
    try:
        with torch.no_grad():
            for ids in prompts:
                model(ids, KVCache(n))
    finally:
        D.cached_attention = original
    return top, spread


def test_calibration_records_every_layers_largest_score_and_spread():
    model = tiny()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 40, (1, n), generator=g) for n in (9, 23)]
    stats = calibrate(model, prompts, chunk=5)  # chunked prefill: the scores of a one-shot prefill
    top, spread = reference_extremes(model, prompts)
    assert stats.max_score == pytest.approx(top, abs=1e-9) and stats.max_spread == pytest.approx(spread, abs=1e-9)
    assert abs(stats.max_score[0] - stats.max_score[1]) > 1  # the layers' bounds differ
    assert stats.bounds(2.0) == pytest.approx([s + 2.0 for s in top])


def test_private_options_give_each_layer_its_bound_and_exp_mode(monkeypatch):
    assert L.PrivateOptions().layer_bound(3) is None and L.PrivateOptions().score_range == L.SCORE_RANGE
    assert L.PrivateOptions(score_bound=7.0).layer_bound(1) == 7.0
    assert L.PrivateOptions(score_bound=(1.0, 2.5)).layer_bound(1) == 2.5
    with pytest.raises(ValueError, match="no bound for layer 2"):
        L.PrivateOptions(score_bound=(1.0, 2.5)).layer_bound(2)
    seen = []
    softmax = L.N.softmax

    def recording(x, mask=None, bound=None, score_range=None):
        seen.append((bound, score_range))
        return softmax(x, mask, bound, score_range)

    monkeypatch.setattr(L.N, "softmax", recording)
    model = tiny(3)
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(0))
    for opts, want in [
        # score_range picks the polynomial exp (nonlinear="poly"); the table exp has one
        (L.PrivateOptions(score_bound=(40.0, 50.0, 60.0), nonlinear="poly"),
         [(40.0, 64.0), (50.0, 64.0), (60.0, 64.0)]),  # fmt: skip
        (L.PrivateOptions(score_range=None, nonlinear="poly"), [(None, None)] * 3),
    ]:
        seen.clear()
        pm = decoder.share_model(model, lambda t: t, opts)
        pm(L.one_hot(ids, 40), L.PrivateKVCache(3))
        assert seen == want


def test_simulated_decoder_with_calibrated_bounds_matches_plaintext():
    # mild attention: every row's max stays within a few units of the layer's bound (a row whose max lies ~14
    # below it sums to less than the normaliser's 2^-10 floor: bench.softmax_modes shows the bundled model does)
    model = tiny(sharpen=1.0)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 40, (1, 12), generator=g)
    calibration = [torch.randint(0, 40, (1, 40), generator=g) for _ in range(4)] + [ids]
    stats = calibrate(model, calibration)
    want, exact = decoder.plain_greedy(model, ids, 4)
    for opts in (L.PrivateOptions(score_bound=stats.bounds(1.0)), L.PrivateOptions()):
        pm = decoder.share_model(model, lambda t: t, opts)
        tokens, logits = decoder.generate(pm, L.one_hot(ids, 40), 4)
        assert [int(t[0, -1].argmax()) for t in tokens] == want
        assert (logits - exact).abs().max() < 1e-3
    # a bound below the scores by far more than exp_range's extrapolation covers is visibly wrong: the simulator
    # refuses the overflowing normaliser (outside its comparisons' declared range) under FSS comparisons, ...
    low = ScoreStats(tuple(s - 30 for s in stats.max_score), stats.max_spread)
    pm = decoder.share_model(model, lambda t: t, L.PrivateOptions(score_bound=low.bounds(0.0)))
    with pytest.raises(ValueError, match="outside the declared range"):
        decoder.generate(pm, L.one_hot(ids, 40), 1)
    # ... and computes garbage under CrypTen's 64-bit comparisons
    pm = decoder.share_model(model, lambda t: t, L.PrivateOptions(score_bound=low.bounds(0.0), comparisons="crypten"))
    err = (decoder.generate(pm, L.one_hot(ids, 40), 1)[1] - exact).abs().max()
    assert not bool(err < 1e-2)  # far off, or NaN (the extrapolated exp overflows the float simulator's range)
