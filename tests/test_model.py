"""The plaintext transformer and its per-head KV cache against independent references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mpcache.generate import generate
from mpcache.model import KVCache, ModelConfig, Transformer
from mpcache.model.transformer import activation, apply_rope

V = 64


def tiny(family: str = "llama", **kw) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(family=family, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, **kw)
    if family == "gpt2":
        config = ModelConfig(**{**config.to_dict(), "n_kv_head": 4, "qkv_bias": True, "out_bias": True})
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the default init so logits are far from ties
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1.0 if p.shape[0] == config.d_model else 0.0, 0.1)
    return model


def ids(b: int, t: int, seed: int = 1) -> Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


FAMILIES = [
    pytest.param("llama", {}, id="llama-gqa"),
    pytest.param("gpt2", {}, id="gpt2"),
    pytest.param("llama", {"qkv_bias": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, id="llama-bias"),
]


# ------------------------------------------------------------ reference model
def reference_logits(model: Transformer, x: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Forward pass written out with explicit loops over heads.

    allowed: optional bool [n_layer, n_kv_head, T, T]; query i may attend key j when allowed
    (on top of causality). This is what attention restricted to a kept token set means."""
    c = model.config
    t = x.shape[1]
    pos = torch.arange(t)[None]
    h = model.tok_emb(x)
    if c.family == "gpt2":
        h = h + model.pos_emb(pos)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for layer, block in enumerate(model.blocks):
        a = block.attn
        z = block.attn_norm(h)
        q = a.q_proj(z).view(1, t, c.n_head, -1).transpose(1, 2)
        k = a.k_proj(z).view(1, t, c.n_kv_head, -1).transpose(1, 2)
        v = a.v_proj(z).view(1, t, c.n_kv_head, -1).transpose(1, 2)
        if c.family == "llama":
            q, k = apply_rope(q, pos, a.inv_freq), apply_rope(k, pos, a.inv_freq)
        heads = []
        for head in range(c.n_head):
            kv = head // c.group_size
            mask = causal if allowed is None else causal & allowed[layer, kv]
            if c.sliding_window is not None:
                mask = mask & (torch.arange(t)[:, None] - torch.arange(t)[None] < c.sliding_window)
            scores = (q[0, head] @ k[0, kv].T) / math.sqrt(c.head_dim)
            heads.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[0, kv])
        h = h + a.o_proj(torch.cat(heads, -1)[None])
        m, z = block.mlp, block.mlp_norm(h)
        if c.family == "llama":
            h = h + m.down_proj(activation(m.gate_proj(z), c.activation) * m.up_proj(z))
        else:
            h = h + m.down_proj(activation(m.up_proj(z), c.activation))
    return model.lm_head(model.norm(h))


@pytest.mark.parametrize("family, kw", FAMILIES)
@torch.no_grad()
def test_paths_match_reference(family: str, kw: dict) -> None:
    """SDPA fast path, cached prefill and the explicit reference agree."""
    model, x = tiny(family, **kw), ids(1, 20)
    fast = model(x)
    cached = model(x, cache=KVCache(model.config.n_layer))
    torch.testing.assert_close(fast, reference_logits(model, x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached, fast, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sliding_window_matches_reference() -> None:
    model, x = tiny(sliding_window=5), ids(1, 16)
    ref = reference_logits(model, x)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    full = tiny()
    assert (full(x)[:, 6:] - ref[:, 6:]).abs().max() > 1e-3  # the window changes later positions


@pytest.mark.parametrize("family, kw", FAMILIES)
@torch.no_grad()
def test_incremental_decode_matches_full_forward(family: str, kw: dict) -> None:
    model, x = tiny(family, **kw), ids(2, 18)
    full = model(x)
    cache = KVCache(model.config.n_layer)
    steps = [model(x[:, :6], cache=cache), model(x[:, 6:10], cache=cache)]  # prefill, then a chunk
    steps += [model(x[:, i : i + 1], cache=cache) for i in range(10, 18)]  # then one token at a time
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.seen_tokens == 18
    assert cache.tokens_per_head(0).tolist() == [[18] * model.config.n_kv_head] * 2


# --------------------------------------------------------------- compaction
@torch.no_grad()
def test_keep_equals_attention_restricted_to_subset() -> None:
    """Compact each (layer, KV head) to its own token subset after prefill, decode a few tokens,
    and compare with a reference forward whose mask removes exactly the evicted tokens."""
    model = tiny()
    c = model.config
    prefill, extra = 14, 4
    x = ids(1, prefill + extra, seed=3)
    gen = torch.Generator().manual_seed(7)
    kept = [
        [torch.randperm(prefill, generator=gen)[: 3 + 4 * h + 2 * layer].sort().values for h in range(c.n_kv_head)]
        for layer in range(c.n_layer)
    ]  # sizes 3..9: different lengths per head

    cache = KVCache(c.n_layer)
    model(x[:, :prefill], cache=cache)
    before = cache.memory_bytes()
    for layer in range(c.n_layer):
        width = max(len(s) for s in kept[layer])
        index = torch.zeros(1, c.n_kv_head, width, dtype=torch.long)
        for h, s in enumerate(kept[layer]):
            index[0, h, : len(s)] = s
        count = torch.tensor([[len(s) for s in kept[layer]]])
        cache.keep(layer, index, count)
        assert cache.tokens_per_head(layer).tolist() == count.tolist()
        entry = cache.layers[layer]
        for h, s in enumerate(kept[layer]):  # original positions survive compaction
            assert entry.positions[0, h, : len(s)].tolist() == s.tolist()
    after = cache.memory_bytes()
    widths = [max(len(s) for s in kept[layer]) for layer in range(c.n_layer)]
    assert after == sum(2 * c.n_kv_head * w * c.head_dim * 4 for w in widths) < before

    got = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(prefill, prefill + extra)], 1)

    t = prefill + extra
    allowed = torch.ones(c.n_layer, c.n_kv_head, t, t, dtype=torch.bool)
    for layer in range(c.n_layer):
        for h, s in enumerate(kept[layer]):
            evicted = torch.ones(prefill, dtype=torch.bool)
            evicted[s] = False
            allowed[layer, h, prefill:, :prefill] = ~evicted  # only decode queries lose the evicted keys
    ref = reference_logits(model, x, allowed)[:, prefill:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    full = model(x)[:, prefill:]
    assert (full - ref).abs().max() > 1e-3  # eviction really changed the result


@torch.no_grad()
def test_keep_everything_in_new_order_is_a_no_op() -> None:
    """Attention is permutation invariant over cached slots, and positions travel with them."""
    model, x = tiny(), ids(1, 12)
    cache = KVCache(model.config.n_layer)
    model(x[:, :10], cache=cache)
    for layer in range(model.config.n_layer):
        cache.keep(layer, torch.randperm(10).expand(1, model.config.n_kv_head, 10).clone())
    got = torch.cat([model(x[:, 10:11], cache=cache), model(x[:, 11:12], cache=cache)], 1)
    torch.testing.assert_close(got, model(x)[:, 10:], atol=1e-5, rtol=1e-5)


def test_keep_rejects_bad_input() -> None:
    cache = KVCache(1)
    b, h, d = 2, 2, 4
    cache.update(
        0,
        torch.randn(b, h, 5, d),
        torch.randn(b, h, 5, d),
        torch.arange(5).expand(b, 5),
        torch.ones(b, 5, dtype=torch.bool),
    )
    with pytest.raises(ValueError, match="no cache"):
        KVCache(2).keep(1, torch.zeros(b, h, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"index must be \[batch=2, kv_heads=2, K\]"):
        cache.keep(0, torch.zeros(1, h, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="more slots than a head holds"):
        cache.keep(0, torch.zeros(b, h, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        cache.keep(0, torch.full((b, h, 2), 5))
    with pytest.raises(ValueError, match="count"):
        cache.keep(0, torch.zeros(b, h, 2, dtype=torch.long), torch.full((b, h), 3))
    with pytest.raises(ValueError, match="twice"):
        cache.keep(0, torch.tensor([0, 1, 1]).expand(b, h, 3))
    with pytest.raises(ValueError, match="batch"):
        cache.update(
            0,
            torch.randn(3, h, 1, d),
            torch.randn(3, h, 1, d),
            torch.zeros(3, 1, dtype=torch.long),
            torch.ones(3, 1, dtype=torch.bool),
        )


# ------------------------------------------------------------------ generate
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_left_padded_batch_matches_rows_alone(family: str) -> None:
    model = tiny(family)
    rows = [ids(1, 9, seed=4)[0], ids(1, 5, seed=5)[0], ids(1, 7, seed=6)[0]]
    width = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    together = generate(model, batch, 12, attention_mask=mask)
    for i, r in enumerate(rows):
        assert together[i].tolist() == generate(model, r[None], 12)[0].tolist()


@torch.no_grad()
def test_sampling_is_reproducible_with_a_seed() -> None:
    model, x = tiny(), ids(2, 6)
    a = generate(model, x, 24, temperature=1.0, seed=11)
    b = generate(model, x, 24, temperature=1.0, seed=11)
    c = generate(model, x, 24, temperature=1.0, seed=12)
    greedy = generate(model, x, 24)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)
    assert torch.equal(generate(model, x, 24, temperature=1.0, top_k=1, seed=3), greedy)
    assert torch.equal(generate(model, x, 24, temperature=1.0, top_p=1e-6, seed=3), greedy)


@torch.no_grad()
def test_greedy_generation_equals_argmax_of_full_forward() -> None:
    model, x = tiny(), ids(1, 7)
    out = generate(model, x, 10)
    seq = torch.cat([x, out], 1)
    assert torch.equal(model(seq[:, :-1])[:, 6:].argmax(-1), out)


@torch.no_grad()
def test_eos_stops_rows() -> None:
    model, x = tiny(), ids(2, 6)
    greedy = generate(model, x, 16)
    eos = int(greedy[0, 3])
    out = generate(model, x, 16, eos_id=eos)
    first = (greedy[0] == eos).nonzero()[0].item()
    assert out[0, : first + 1].tolist() == greedy[0, : first + 1].tolist()
    assert (out[0, first:] == eos).all()


# -------------------------------------------------------------------- errors
def test_bad_shapes_raise_clear_errors() -> None:
    model = tiny()
    x = ids(2, 5)
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model(x[0])
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="positions"):
        model(x, positions=torch.arange(5))
    with pytest.raises(ValueError, match="vocab"):
        model(torch.full((1, 3), V))
    with pytest.raises(TypeError, match="integer"):
        model(x.float())
    with pytest.raises(ValueError, match="empty|non-empty"):
        model(x[:, :0])
    with pytest.raises(ValueError, match="max_position"):
        tiny("gpt2", max_position=8)(ids(1, 9))
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, x[:, :0], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, x, -1)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, x, 3, attention_mask=torch.ones(2, 6))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        ModelConfig(n_head=8, n_kv_head=3)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="unknown config keys"):
        ModelConfig.from_dict({"n_heads": 4})
    for family, kw in [
        ("llama", {}),
        ("gpt2", {"tie_embeddings": True}),
        ("llama", {"qkv_bias": True, "mlp_bias": True}),
    ]:
        model = tiny(family, **kw)
        assert model.num_parameters() == model.config.num_parameters(), (family, kw)
