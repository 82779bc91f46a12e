"""The prefix cache's eviction rules and victim tier: a demoted block comes back with the KV
it had, the tree stays a consistent prefix tree, LSM-GNN's hybrid keeps the blocks many
requests share, and the engine's tokens do not change with any of it."""

from __future__ import annotations

import random

import pytest
import torch

from mpcache.generate import generate
from mpcache.model import load_bundled
from mpcache.serving.engine import Engine, Request, Scheduler
from mpcache.serving.pool import BlockPool
from mpcache.serving.radix import PrefixCache
from mpcache.serving.tiers import VictimTier


def _tiny_pool(num_blocks: int) -> BlockPool:
    return BlockPool(n_layer=2, n_kv_head=2, head_dim=3, num_blocks=num_blocks, block_size=2)


def _write(pool: BlockPool, block: int, tokens: list[int], start: int) -> None:
    """Fake KV that encodes the block's tokens and positions (checked after every match)."""
    for layer in range(pool.n_layer):
        pool.keys[layer][block] = torch.tensor(tokens, dtype=torch.float32)[None, :, None] + layer
        pool.values[layer][block] = -torch.tensor(tokens, dtype=torch.float32)[None, :, None]
        pool.positions[layer][block] = torch.arange(start, start + len(tokens), dtype=torch.int32)


def _check_block(pool: BlockPool, block: int, tokens: list[int], start: int) -> None:
    for layer in range(pool.n_layer):
        assert pool.keys[layer][block, :, :, 0].tolist() == [[t + layer for t in tokens]] * pool.n_kv_head
        assert pool.values[layer][block, :, :, 0].tolist() == [[-t for t in tokens]] * pool.n_kv_head
        assert pool.positions[layer][block, 0].tolist() == list(range(start, start + len(tokens)))


def _check_path(pool: BlockPool, blocks: list[int | None], tokens: list[int]) -> None:
    """Block i (None: skip) holds the KV of tokens[i * bs : (i + 1) * bs]."""
    bs = pool.block_size
    for i, block in enumerate(blocks):
        if block is not None:
            _check_block(pool, block, tokens[i * bs : (i + 1) * bs], i * bs)


def _check_tree(cache: PrefixCache) -> None:
    """Pool blocks only under pool blocks (what is in the pool is a prefix), every demoted node
    has a tier slot and is listed once, tier slots in use = demoted nodes."""
    seen, stack = 0, [(child, True) for child in cache.root.children.values()]
    slots = set()
    while stack:
        node, parent_resident = stack.pop()
        seen += 1
        if node.block >= 0:
            assert parent_resident and node.slot < 0 and cache.pool.refcount[node.block] >= 1
        else:
            assert node.slot >= 0 and node in cache.demoted and node.slot not in slots
            slots.add(node.slot)
        stack.extend((child, node.block >= 0) for child in node.children.values())
    assert seen == cache.num_nodes and len(slots) == len(cache.demoted)
    if cache.tier is not None:
        assert cache.tier.num_free + len(slots) == cache.tier.num_blocks


def test_victim_tier_round_trip_exact_and_compressed():
    pool = _tiny_pool(4)
    g = torch.Generator().manual_seed(0)
    for layer in range(pool.n_layer):
        pool.keys[layer].copy_(torch.randn(pool.keys[layer].shape, generator=g) * 3)
        pool.values[layer].copy_(torch.randn(pool.values[layer].shape, generator=g))
        pool.positions[layer].copy_(torch.randint(0, 99, pool.positions[layer].shape, generator=g))
    saved = [(k[1].clone(), v[1].clone(), p[1].clone()) for k, v, p in zip(pool.keys, pool.values, pool.positions)]
    for compress in (False, True):
        tier = VictimTier(pool, 3, compress=compress)
        slot = tier.put(1)
        assert slot is not None and tier.num_free == 2
        tier.take(slot, 3)
        assert tier.num_free == 3
        for layer, (k, v, p) in enumerate(saved):
            assert torch.equal(pool.positions[layer][3], p)
            for got, want in ((pool.keys[layer][3], k), (pool.values[layer][3], v)):
                if compress:  # int8 absmax per token and head: |error| <= max |x| / 254
                    bound = want.abs().amax(-1, keepdim=True) / 254 + 1e-6
                    assert bool(((got - want).abs() <= bound).all()) and not torch.equal(got, want)
                else:
                    assert torch.equal(got, want)
    wide = BlockPool(n_layer=2, n_kv_head=2, head_dim=32, num_blocks=2, block_size=16)  # the bundled model's heads
    assert VictimTier(wide, 1, compress=True).bytes / wide.block_bytes == (32 + 4) / (4 * 32)  # int8 + a scale
    tier = VictimTier(pool, 1, compress=True)
    assert tier.put(0) is not None and tier.put(1) is None  # full
    with pytest.raises(ValueError):
        tier.drop(7)
    with pytest.raises(ValueError):
        VictimTier(pool, 0)
    with pytest.raises(ValueError):
        PrefixCache(pool, tier=VictimTier(_tiny_pool(2), 1))
    with pytest.raises(ValueError):
        PrefixCache(pool, weight=-1.0)


@pytest.mark.parametrize("weight,tier_blocks", [(0.0, 0), (0.0, 6), (0.5, 0), (0.5, 6), (0.5, 40)])
def test_random_workload_keeps_tree_and_kv_consistent(weight, tier_blocks):
    """Random prompts over shared prefixes, a pool too small for them, requests that hold
    their blocks for a while: every matched block carries exactly the KV its tokens had when
    computed (through demotions, restores, prefetches and tier overflows), the tree stays
    consistent, and nothing leaks once the requests are gone and the tree is cleared."""
    rng = random.Random(int(weight * 10) + tier_blocks)
    pool = _tiny_pool(14)
    tier = VictimTier(pool, tier_blocks, compress=False) if tier_blocks else None
    cache = PrefixCache(pool, weight=weight, tier=tier)
    prefixes = [[rng.randrange(5) for _ in range(6)] for _ in range(4)]
    running: list[list[int]] = []
    restored_hits = 0
    for _ in range(400):
        prompt = rng.choice(prefixes)[: 2 * rng.randrange(1, 4)] + [
            rng.randrange(5) for _ in range(2 * rng.randrange(3))
        ]
        upcoming = [rng.choice(prefixes) for _ in range(2)]
        if tier is not None and rng.random() < 0.3:
            restores = cache.restores
            cache.prefetch(upcoming[0], room=2)
            assert cache.restores - restores <= 2
            _check_path(pool, [n.block if n.block >= 0 else None for n in cache.walk(upcoming[0])], upcoming[0])
        restores = cache.restores
        blocks, matched = cache.match(prompt)
        restored_hits += cache.restores - restores
        full = matched // pool.block_size
        _check_path(pool, blocks[:full], prompt)
        if matched % pool.block_size:  # the partly common block: this request would copy it
            pool.decref(blocks.pop())
        need = len(prompt) // pool.block_size - full
        if pool.num_free < need:
            cache.evict(need - pool.num_free, upcoming)
        if pool.num_free < need:
            for block in blocks:
                pool.decref(block)
        else:
            for i in range(full, full + need):
                block = pool.allocate()
                _write(pool, block, prompt[i * 2 : i * 2 + 2], i * 2)
                blocks.append(block)
            cache.insert(prompt, blocks)
            running.append(blocks)
        while running and (len(running) > 2 or rng.random() < 0.5):  # requests finish
            for block in running.pop(rng.randrange(len(running))):
                pool.decref(block)
        _check_tree(cache)
    if tier is not None:
        assert cache.demotions > 0 and restored_hits > 0
    for blocks in running:
        for block in blocks:
            pool.decref(block)
    cache.clear()
    assert pool.num_used == 0 and cache.num_nodes == 0 and not cache.demoted
    assert tier is None or tier.num_free == tier.num_blocks


def test_hybrid_keeps_a_popular_prefix_that_lru_evicts():
    """A prefix 8 requests used, then a stream of one-off prompts: LRU evicts the prefix
    (it is the oldest), LSM-GNN's hybrid evicts the one-offs (served once) first."""
    kept = {}
    for weight in (0.0, 0.5):
        pool = _tiny_pool(12)
        cache = PrefixCache(pool, weight=weight)
        popular = [1, 1, 2, 2, 3, 3]
        blocks = [pool.allocate() for _ in range(3)]
        cache.insert(popular, blocks)
        for block in blocks:
            pool.decref(block)
        for _ in range(7):
            got, _ = cache.match(popular)
            for block in got:
                pool.decref(block)
        for i in range(6):  # one-off prompts of 2 blocks each, evicting as they come
            prompt = [10 + i, 10 + i, 20 + i, 20 + i]
            if pool.num_free < 2:
                cache.evict(2 - pool.num_free)
            blocks = [pool.allocate(), pool.allocate()]
            cache.insert(prompt, blocks)
            for block in blocks:
                pool.decref(block)
        kept[weight] = len(cache.walk(popular))
    assert kept[0.0] == 0 and kept[0.5] == 3


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    return load_bundled()


def test_engine_with_victim_tier_gives_the_same_tokens_and_recomputes_less(bundled):
    """Three ~100-token prefixes taking turns in a pool that holds about two: LRU recomputes
    each prefix every time it comes back; with an uncompressed victim tier the prefixes
    come back from the tier (restored, not recomputed; the hybrid demotes them because the
    waiting queue shows they are needed) and every request's tokens equal `generate` on its
    prompt alone. The int8 tier recomputes as little."""
    model, tok = bundled
    rng = random.Random(3)
    words = "river forest garden cat dog bird farmer teacher child window table road city".split()
    prefixes = [tok.encode(" ".join(rng.choice(words) for _ in range(18)) + ".") for _ in range(3)]
    prompts = [prefixes[i % 3] + tok.encode(f" Q{i}?") for i in range(9)]
    alone = [generate(model, torch.tensor([p]), 3)[0].tolist() for p in prompts]
    per_request = -(-(max(len(p) for p in prompts) + 3) // 16) + 1
    stats = {}
    setups = [("lru", 0.0, 0, False), ("lru+tier", 0.0, 24, False), ("hybrid+tier", 0.5, 24, False),
              ("hybrid+int8", 0.5, 24, True)]  # fmt: skip
    for name, weight, tier_blocks, compress in setups:
        pool = BlockPool.for_model(model, 2 * per_request)
        tier = VictimTier(pool, tier_blocks, compress=compress) if tier_blocks else None
        engine = Engine(model, pool, prefix=PrefixCache(pool, weight=weight, tier=tier))
        requests = [Request(prompt, 3, rid=i) for i, prompt in enumerate(prompts)]
        run = engine.run(requests, Scheduler(max_batch=1))  # one at a time, the rest visible in the queue
        if not compress:
            assert [r.output for r in requests] == alone, name
        stats[name] = (run.computed_prompt_tokens, run.restored_blocks)
    assert stats["lru"][1] == 0
    for name in ("lru+tier", "hybrid+tier", "hybrid+int8"):
        assert stats[name][1] > 0 and stats[name][0] < stats["lru"][0] * 0.6, (name, stats)
