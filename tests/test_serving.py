"""The paged KV block store: paged attention, pool references, copy-on-write, prefix sharing,
the batching engine, and KV-cache methods running on a request's own blocks."""

from __future__ import annotations

import random

import pytest
import torch

from mpcache.generate import generate
from mpcache.kernels import cached_attention
from mpcache.kernels.paged import paged_attention
from mpcache.methods import make_policy
from mpcache.model import KVCache, load_bundled
from mpcache.serving.engine import Engine, Request
from mpcache.serving.paged import PagedKVCache, Sequence, forward, paged_policy
from mpcache.serving.pool import BlockPool, PoolExhausted
from mpcache.serving.radix import PrefixCache


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    return load_bundled()


def _prompt(tok, words: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    nouns = "river forest garden cat dog bird farmer teacher child window table road city".split()
    text = " ".join(f"The {rng.choice(nouns)} sees the {rng.choice(nouns)}." for _ in range(words))
    return tok.encode(text)


# ----------------------------------------------------------------- paged attention
@pytest.mark.parametrize("window", [None, 7])
def test_paged_attention_matches_dense_attention_over_scattered_blocks(window):
    """Blocks placed anywhere in the pool, per-head lengths, T > 1 queries with positions: the
    paged reference equals `cached_attention` over the same slots laid out densely."""
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, d, bs, n_blocks, t = 3, 6, 3, 8, 4, 40, 3
    lengths = torch.tensor([[9, 5, 12], [1, 12, 7], [0, 3, 12]])
    width = 3  # blocks per row: 12 slots
    k_pool, v_pool = torch.randn(n_blocks, hkv, bs, d, generator=g), torch.randn(n_blocks, hkv, bs, d, generator=g)
    p_pool = torch.randint(0, 30, (n_blocks, hkv, bs), generator=g, dtype=torch.int32)
    tables = torch.randperm(n_blocks, generator=g)[: b * width].view(b, width)
    q = torch.randn(b, hq, t, d, generator=g)
    qpos = torch.tensor([[20, 21, 22], [5, 6, 40], [10, 11, 12]])
    out = paged_attention(q, k_pool, v_pool, p_pool, tables, lengths, qpos, window)
    dense_k = k_pool[tables].transpose(1, 2).reshape(b, hkv, width * bs, d)
    dense_v = v_pool[tables].transpose(1, 2).reshape(b, hkv, width * bs, d)
    dense_p = p_pool[tables].transpose(1, 2).reshape(b, hkv, width * bs).long()
    valid = torch.arange(width * bs) < lengths[..., None]
    ref = cached_attention(q, dense_k, dense_v, qpos, dense_p, valid, window)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[2, 0:2], torch.zeros_like(out[2, 0:2]))  # KV head 0 of row 2 holds nothing


def test_cascade_over_a_shared_prefix_equals_per_row_attention():
    """Rows sharing their first blocks: scoring the shared blocks once for the group gives
    the per-row result."""
    g = torch.Generator().manual_seed(2)
    b, hq, hkv, d, bs, n_blocks = 5, 4, 2, 8, 4, 30
    k_pool, v_pool = torch.randn(n_blocks, hkv, bs, d, generator=g), torch.randn(n_blocks, hkv, bs, d, generator=g)
    p_pool = torch.arange(n_blocks * bs, dtype=torch.int32).view(n_blocks, 1, bs).expand(n_blocks, hkv, bs) % 23
    p_pool = p_pool.contiguous()
    tables = torch.randint(0, n_blocks, (b, 5), generator=g)
    tables[:3, :2] = tables[0, :2]  # rows 0-2 share two blocks
    tables[3:, :1] = tables[3, :1]  # rows 3-4 share one
    lengths = torch.tensor([[20, 9], [12, 17], [8, 8], [4, 19], [11, 6]])
    q, qpos = torch.randn(b, hq, 2, d, generator=g), torch.randint(5, 30, (b, 2), generator=g)
    args = (q, k_pool, v_pool, p_pool, tables, lengths, qpos)
    groups = [(torch.tensor([0, 1, 2]), 2), (torch.tensor([3, 4]), 1)]
    torch.testing.assert_close(paged_attention(*args, groups=groups), paged_attention(*args), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(paged_attention(*args, 5, groups=groups[:1]), paged_attention(*args, 5), atol=1e-6,
                               rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="full in every row"):
        paged_attention(*args, groups=[(torch.tensor([0, 3]), 3)])


def test_paged_attention_rejects_bad_input():
    k = torch.zeros(4, 2, 4, 8)
    p = torch.zeros(4, 2, 4, dtype=torch.int32)
    q = torch.zeros(1, 4, 1, 8)
    ok = dict(key_cache=k, value_cache=k, slot_positions=p, block_tables=torch.tensor([[0, 1]]),
              lengths=torch.tensor([[8, 3]]), query_positions=torch.tensor([[9]]))  # fmt: skip
    paged_attention(q, **ok)
    with pytest.raises(ValueError, match="block id outside the pool"):
        paged_attention(q, **{**ok, "block_tables": torch.tensor([[0, 9]])})
    with pytest.raises(ValueError, match="lengths must lie"):
        paged_attention(q, **{**ok, "lengths": torch.tensor([[9, 3]])})
    with pytest.raises(ValueError, match="do not fit key cache"):
        paged_attention(torch.zeros(1, 3, 1, 8), **ok)
    with pytest.raises(TypeError, match="integer"):
        paged_attention(q, **{**ok, "block_tables": torch.tensor([[0.0, 1.0]])})


# ------------------------------------------------------------------ pool + COW
def test_pool_refcounts_free_list_and_errors():
    pool = BlockPool(1, 1, 4, num_blocks=3, block_size=2)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert pool.num_free == 0 and pool.used_bytes == 3 * pool.block_bytes == 3 * 2 * 2 * 4 * 4
    with pytest.raises(PoolExhausted):
        pool.allocate()
    pool.incref(a)
    pool.decref(a)
    assert pool.num_free == 0
    pool.decref(a)
    assert pool.num_free == 1 and pool.refcount[a] == 0
    with pytest.raises(ValueError, match="double release"):
        pool.decref(a)
    with pytest.raises(ValueError, match="free"):
        pool.incref(a)
    pool.keys[0][b] = 1.0
    pool.incref(b)
    copy = pool.writable(b)  # shared: the writer gets a copy, the other holder keeps b
    assert copy != b and pool.refcount[b] == 1 and pool.refcount[copy] == 1
    assert torch.equal(pool.keys[0][copy], pool.keys[0][b])
    assert pool.writable(c) == c  # sole holder: no copy


def test_paged_forward_equals_dense_cache(bundled):
    model, tok = bundled
    ids = torch.tensor([_prompt(tok, 12, seed=3)])
    pool = BlockPool.for_model(model, 64)
    seq = Sequence(pool)
    dense = KVCache(model.config.n_layer)
    with torch.no_grad():
        ref = model(ids, cache=dense)
        out = forward(model, PagedKVCache(model.config.n_layer, pool, [seq]), ids, last_only=False)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
        token = ref[:, -1:].argmax(-1)
        for _ in range(20):  # crosses block boundaries
            ref = model(token, cache=dense)
            out = forward(model, PagedKVCache(model.config.n_layer, pool, [seq]), token)
            torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
            token = ref[:, -1:].argmax(-1)
    assert len(seq.blocks) == -(-seq.num_tokens // pool.block_size) and pool.num_used == len(seq.blocks)
    seq.release()
    assert pool.num_free == pool.num_blocks


def test_fork_copy_on_write_never_corrupts_the_other_sequence(bundled):
    """Two forks of one prompt decode different tokens into the shared last block: each
    equals a dense run of its own tokens, and the parent's prefix blocks stay shared."""
    model, tok = bundled
    prompt = _prompt(tok, 7, seed=5)  # not a multiple of 16: the last block is shared and partly full
    assert len(prompt) % 16
    pool = BlockPool.for_model(model, 64)
    first = Sequence(pool)
    with torch.no_grad():
        forward(model, PagedKVCache(4, pool, [first]), torch.tensor([prompt]))
        second = first.fork()
        assert all(pool.refcount[b] == 2 for b in first.blocks)
        continuations = ([ord("A"), ord("B"), ord("C")], [ord("x"), ord("y"), ord("z")])
        outs = [[], []]
        for step in range(3):
            ids = torch.tensor([[continuations[0][step]], [continuations[1][step]]])
            logits = forward(model, PagedKVCache(4, pool, [first, second]), ids)
            for i in range(2):
                outs[i].append(logits[i, -1])
    full = len(prompt) // 16
    assert pool.copies == 1 and first.blocks[full] != second.blocks[full]  # the partly full block was copied once
    assert first.blocks[:full] == second.blocks[:full]  # the full prefix blocks are still shared
    for i in range(2):
        ref = model(torch.tensor([prompt + continuations[i]]))[0, len(prompt) - 1 + 1 :]
        torch.testing.assert_close(torch.stack(outs[i]), ref, atol=1e-4, rtol=1e-4)
    first.release()
    second.release()
    assert pool.num_free == pool.num_blocks and all(r == 0 for r in pool.refcount)


# --------------------------------------------------------------- prefix cache
def test_prefix_cache_shares_blocks_and_evicts_lru_leaves():
    pool = BlockPool(1, 1, 2, num_blocks=16, block_size=2)
    cache = PrefixCache(pool)
    a = [1, 2, 3, 4, 5, 6]
    seq_blocks = [pool.allocate() for _ in range(3)]
    cache.insert(a, seq_blocks)
    for block in seq_blocks:  # the request finished
        pool.decref(block)
    assert cache.num_nodes == 3 and pool.num_used == 3 and cache.evictable() == 3
    blocks, matched = cache.match([1, 2, 3, 4, 5, 9, 9])  # two whole blocks + one token of the third
    assert blocks == seq_blocks and matched == 5
    assert cache.evictable() == 0  # held by the new request
    assert cache.evict(10) == 0
    for block in blocks:
        pool.decref(block)
    b = [1, 2, 7, 8]  # shares the first block, then branches
    blocks, matched = cache.match(b)
    assert matched == 2
    new = pool.allocate()
    cache.insert(b, blocks[:1] + [new])
    pool.decref(blocks[0])
    pool.decref(new)
    assert cache.evict(1) == 1  # the least recently used leaf: [5, 6] of the first prompt
    assert cache.walk(a) and len(cache.walk(a)) == 2 and len(cache.walk(b)) == 2
    assert cache.evict(10) == 3 and pool.num_used == 0 and cache.num_nodes == 0


def test_shared_prefix_batch_gives_the_tokens_of_each_request_alone(bundled):
    """10 requests sharing a ~300-token system prompt run as one batch with prefix sharing
    (whole blocks shared, the partly common block copied on write): every request's tokens
    equal those of `generate` on that prompt alone, and the batch holds far fewer blocks."""
    model, tok = bundled
    system = _prompt(tok, 10, seed=11)
    assert len(system) % 16
    requests = [Request(system + tok.encode(f"Q{i}: which animal? A: "), 6, rid=i) for i in range(10)]
    pool = BlockPool.for_model(model, 400)
    stats = Engine(model, pool).run(requests)
    for r in requests:
        alone = generate(model, torch.tensor([r.prompt]), 6)
        assert r.output == alone[0].tolist()
    assert stats.cow_copies >= 1  # the system prompt's last block is partly common: copied on the first write
    assert all(r.cached_tokens >= len(system) for r in requests[1:])
    assert stats.computed_prompt_tokens <= len(system) + sum(len(r.prompt) - len(system) for r in requests)
    per_request = -(-(len(requests[0].prompt) + 6) // 16)
    assert stats.peak_blocks < 10 * per_request / 3


# ------------------------------------------------------------- KV-cache methods
@pytest.mark.parametrize("method,budget", [("streamingllm", 40), ("snapkv", 48), ("h2o", 40)])
def test_method_runs_on_its_blocks_and_frees_them(bundled, method, budget):
    """A per-head eviction method inside the store gives the dense method's logits, and the
    blocks it no longer needs go back to the pool."""
    model, tok = bundled
    prompt = torch.tensor([_prompt(tok, 14, seed=7)])
    pool = BlockPool.for_model(model, 64)
    seq = Sequence(pool)
    cache = paged_policy(method, budget)(model, pool, [seq])
    dense = make_policy(method, budget)(model)
    with torch.no_grad():
        ref = model(prompt, cache=dense, last_only=True)
        out = forward(model, cache, prompt)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
        after_prefill = pool.num_used
        assert after_prefill == -(-budget // 16) < -(-prompt.shape[1] // 16)
        token = ref.argmax(-1)
        for _ in range(12):
            ref = model(token, cache=dense)
            out = forward(model, cache, token)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            token = ref.argmax(-1)
    assert torch.equal(cache.tokens_per_head(0), dense.tokens_per_head(0))
    assert pool.num_used == len(seq.blocks) == -(-seq.max_length // 16)
    assert cache.memory_bytes() == pool.used_bytes


def test_method_on_a_shared_prefix_copies_instead_of_corrupting(bundled):
    """Request B compacts with StreamingLLM while sharing A's prompt blocks: A's next tokens
    are unchanged (B wrote into copies), and B's own result equals StreamingLLM alone."""
    model, tok = bundled
    prompt = _prompt(tok, 12, seed=9)
    pool = BlockPool.for_model(model, 96)
    a = Sequence(pool)
    with torch.no_grad():
        forward(model, PagedKVCache(4, pool, [a]), torch.tensor([prompt[:-1]]))
        b = a.fork()
        cache_b = paged_policy("streamingllm", 32)(model, pool, [b])
        out_b = forward(model, cache_b, torch.tensor([prompt[-1:]]))
        out_a = forward(model, PagedKVCache(4, pool, [a]), torch.tensor([prompt[-1:]]))
        ref_a = model(torch.tensor([prompt]), last_only=True)
    torch.testing.assert_close(out_a, ref_a, atol=1e-5, rtol=1e-5)
    assert len(b.blocks) == 2 and not set(b.blocks) & set(a.blocks)
    dense = KVCache(4)
    with torch.no_grad():  # StreamingLLM after the whole prompt's attention (timing "after") = full logits
        torch.testing.assert_close(out_b, model(torch.tensor([prompt]), cache=dense, last_only=True), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
