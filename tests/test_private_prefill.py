"""Blockwise private prefill (decoder.prefill) and the nonlinearity option (PrivateOptions.nonlinear), in the
simulator: a prompt fed in public blocks gives the one-shot prefill's logits and cache, for both families and both
nonlinearity paths; MPCache's look-once eviction waits for the last block; bad options are refused."""

from __future__ import annotations

import pytest
import torch

from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Transformer
from mpcache.mpc.caches.mpcache import PrivateMPCache
from mpcache.mpc.nn import decoder as D
from mpcache.mpc.nn import layers as L


def tiny(family: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        family=family, vocab_size=40, n_layer=2, n_head=4, n_kv_head=2 if family == "llama" else 4, d_model=32,
        d_ff=64, max_position=128, activation="silu" if family == "llama" else "gelu_new",
    )  # fmt: skip
    return Transformer(cfg).double().eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("nonlinear", ["lut", "poly"])
def test_blockwise_prefill_equals_one_shot(family, nonlinear):
    model = tiny(family)
    pm = D.share_model(model, lambda t: t, L.PrivateOptions(nonlinear=nonlinear))
    ids = torch.randint(0, 40, (1, 37), generator=torch.Generator().manual_seed(3))
    tokens = L.one_hot(ids, 40)
    whole, blocks = L.PrivateKVCache(2), L.PrivateKVCache(2)
    ref = D.prefill(pm, tokens, whole)
    out = D.prefill(pm, tokens, blocks, block=8)  # 5 blocks, the last one short
    # the same math in another order: float rounding differs by ~1e-16, which moves a table index across a grid
    # edge now and then (a table step's error, ~1e-4); the polynomials keep it at rounding level
    tol = 1e-3 if nonlinear == "lut" else 1e-9
    assert (out - ref).abs().max() < tol
    assert blocks.seen_tokens == whole.seen_tokens == 37 and not blocks.more_prompt
    for a, b in zip(whole.layers, blocks.layers):
        assert torch.equal(a.positions, b.positions) and (a.keys - b.keys).abs().max() < tol
    with torch.no_grad():
        plain = model(ids)[:, -1:]
    assert (out - plain).abs().max() < 2e-2  # the approximations' error through 2 layers
    with pytest.raises(ValueError, match="prefill_block"):
        D.prefill(pm, tokens, L.PrivateKVCache(2), block=0)


def test_mpcache_static_eviction_waits_for_the_last_block():
    model = tiny("llama")
    pm = D.share_model(model, lambda t: t)
    ids = torch.randint(0, 40, (1, 100), generator=torch.Generator().manual_seed(4))
    cache = PrivateMPCache(2, budget=32)
    seen = []
    original = cache.after_attention

    def record(layer, queries, positions):
        seen.append((layer, queries.shape[2], cache.more_prompt, cache.layers[layer].capacity))
        original(layer, queries, positions)

    cache.after_attention = record
    D.prefill(pm, L.one_hot(ids, 40), cache, block=32)
    evicted = [(layer, cap) for layer, t, more, cap in seen if not more]
    assert [t for _, t, _, _ in seen] == [32, 32, 32, 32, 32, 32, 4, 4]  # 4 blocks x 2 layers
    assert evicted == [(0, 100), (1, 100)]  # only the last block's call evicts, seeing the whole prompt
    assert all(entry.capacity < 100 for entry in cache.layers)


def test_options_are_checked():
    with pytest.raises(ValueError, match="nonlinear must be one of"):
        L.PrivateOptions(nonlinear="table")
    with pytest.raises(ValueError, match="needs comparisons='fss'"):
        L.PrivateOptions(comparisons="crypten", nonlinear="lut")
    assert L.PrivateOptions().nonlinear == "lut" and L.PrivateOptions(comparisons="crypten").nonlinear == "poly"
