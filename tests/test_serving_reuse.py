"""Cache-Craft chunk reuse and BatchLLM scheduling on the bundled model."""

from __future__ import annotations

import random

import pytest
import torch

from mpcache.eval.tasks import filler_sentence
from mpcache.model import load_bundled
from mpcache.model.transformer import apply_rope
from mpcache.serving.batchllm import BatchLLM, group_prefixes
from mpcache.serving.cachecraft import CacheCraft, ChunkCache, ChunkStore, DenseCache, overlap
from mpcache.serving.engine import Engine, Request, Scheduler
from mpcache.serving.pool import BlockPool
from mpcache.serving.radix import PrefixCache


@pytest.fixture(scope="module")
def bundled():
    return load_bundled()


def _text(rng: random.Random, sentences: int) -> str:
    return " ".join(filler_sentence(rng) for _ in range(sentences)) + " "


@pytest.fixture(scope="module")
def rag(bundled):
    _, tok = bundled
    rng = random.Random(3)
    header = tok.encode("Some special magic numbers are hidden in the text below. Memorize them.\n")
    chunks = [tok.encode(_text(rng, 2)) for _ in range(4)]
    chunks[1] = tok.encode(_text(rng, 1) + "One of the special magic numbers for amber-otter is: 4417302. ")
    question = tok.encode("\nWhat is the magic number for amber-otter? The special magic number for amber-otter is: ")
    return header, chunks, question


def _full(model, prompt: list[int]):
    cache = DenseCache(model.config.n_layer)
    with torch.no_grad():
        return model(torch.tensor([prompt]), cache=cache, last_only=True)


def _decode(model, cache, logits, n=6) -> list[int]:
    out, token = [], logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(token))
            token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return out


# ------------------------------------------------------------------- Cache-Craft
def test_rerotation_equals_computing_the_key_at_the_new_position(bundled):
    model, _ = bundled
    attn = model.blocks[0].attn
    k = torch.randn(1, 4, 10, 32)
    at = apply_rope(k, torch.arange(10)[None] + 7, attn.inv_freq)
    moved = CacheCraft(model, ChunkStore(BlockPool.for_model(model, 4)), 0.0).rerotate(at[0], 0, 123)
    torch.testing.assert_close(moved, apply_rope(k, torch.arange(10)[None] + 130, attn.inv_freq)[0], atol=2e-5, rtol=0)


def test_full_recomputation_fraction_equals_full_prefill_exactly(bundled, rag):
    """fraction = 1 (and the header recomputed too): every prompt of a sequence reusing chunks
    gives bit-identical logits and the same tokens as a full prefill; with the header reused
    from the store (prefix caching) the tokens are the same and logits agree to rounding."""
    model, _ = bundled
    header, chunks, question = rag
    orders = [[0, 1, 2], [2, 0, 1], [1, 3, 0]]
    for reuse_header in (False, True):
        craft = CacheCraft(model, ChunkStore(BlockPool.for_model(model, 256)), 1.0, reuse_header=reuse_header)
        for n, order in enumerate(orders):
            parts = [chunks[i] for i in order]
            cache, logits, cost = craft.prefill(header, parts, question)
            prompt = header + [t for c in parts for t in c] + question
            ref_cache = DenseCache(model.config.n_layer)
            with torch.no_grad():
                ref = model(torch.tensor([prompt]), cache=ref_cache, last_only=True)
            if reuse_header:
                torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
            else:
                assert torch.equal(logits, ref)
                assert cost.computed == len(prompt)
            if n:
                assert cost.chunk_hits >= 2  # chunks seen before were found (and all recomputed)
            assert _decode(model, cache, logits, 3) == _decode(model, ref_cache, ref, 3)


def test_chunk_reuse_saves_computation_and_exact_context_reuses_exactly(bundled, rag):
    model, _ = bundled
    header, chunks, question = rag
    craft = CacheCraft(model, ChunkStore(BlockPool.for_model(model, 256)), 0.0)
    _, _, first = craft.prefill(header, [chunks[0], chunks[1], chunks[2]], question)
    assert first.chunk_hits == 0 and first.computed == first.prompt
    store = craft.store
    assert store.chunks[tuple(chunks[0])].cci == 0.0  # made without preceding chunks
    assert store.chunks[tuple(chunks[2])].cci > 0.0  # attended to the chunks before it
    # Same chunks, same order: the same positions and context, so the reused KV is the KV a full
    # prefill computes: nothing but the question is computed and the logits match.
    _, logits, again = craft.prefill(header, [chunks[0], chunks[1], chunks[2]], question)
    assert again.computed == len(question) and again.chunk_hits == 3
    torch.testing.assert_close(logits, _full(model, header + chunks[0] + chunks[1] + chunks[2] + question), atol=1e-4,
                               rtol=1e-4)  # fmt: skip
    # Another order: reused at new positions, a fraction recomputed.
    partial = CacheCraft(model, store, 0.25)
    _, _, moved = partial.prefill(header, [chunks[2], chunks[0], chunks[1]], question)
    reused_chunk_tokens = sum(len(c) for c in chunks[:3])
    assert moved.computed == len(question) + round(0.25 * reused_chunk_tokens)


def test_overlap_and_damage_monotonicity():
    assert overlap((1, 2, 3), (1, 2, 3)) == (1.0, 0.0)
    assert overlap((), ()) == (1.0, 0.0)
    assert overlap((1, 2), (3, 4)) == (0.0, 0.0)
    beta, gamma = overlap((1, 2, 3), (3, 2, 1))
    assert beta == 1.0 and gamma == 1.0
    assert overlap((1, 2, 3), (2, 1, 3))[1] == pytest.approx(1 / 3)
    assert overlap((1, 2, 3, 4), (1, 2))[0] == 0.5


def test_store_evicts_by_frequency_times_recency(bundled):
    model, _ = bundled
    pool = BlockPool.for_model(model, 8)
    store = ChunkStore(pool, capacity=3)
    kv = [torch.zeros(4, 16, 32)] * model.config.n_layer
    for key, uses in ((("a",), 5), (("b",), 1), (("c",), 3)):
        store.clock += 1
        store.add(key, ChunkCache((), 0, store.write(kv, kv), 16, torch.zeros(16), uses=uses))
    store.clock += 1
    store.add(("d",), ChunkCache((), 0, store.write(kv, kv), 16, torch.zeros(16)))
    assert set(store.chunks) == {("a",), ("c",), ("d",)} and store.evictions == 1
    assert pool.num_used == 3 == store.used_blocks


# ---------------------------------------------------------------------- BatchLLM
def test_group_prefixes_maximise_shared_tokens():
    bs = 2
    system, f1, f2 = [1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 6, 6]
    prompts = [system + f1 + [9, i] for i in range(3)] + [system + f2 + [8, i] for i in range(3)] + [system + [7, 7]]
    groups = group_prefixes(prompts, bs)
    # cutting at system+f1 and system+f2 shares 2*8 + 2*8 tokens, more than (7-1)*4 at the system prompt
    assert groups[0][1] == system + f1 and groups[3][1] == system + f2
    assert len({g for g, _ in groups[:3]}) == 1 and groups[0][0] != groups[3][0]
    assert groups[6][1] == [] and groups[6][0] not in {groups[0][0], groups[3][0]}
    flat = group_prefixes([system + [i, i] for i in range(5)] + [[0, 0, 1, 1]], bs)
    assert all(prefix == system for _, prefix in flat[:5])


def test_batchllm_orders_groups_decode_heavy_first_and_matches_fcfs_tokens(bundled):
    model, tok = bundled
    rng = random.Random(5)
    prefixes = [tok.encode(f"Task {g}. " + _text(rng, 3))[:96] for g in range(3)]
    requests = []
    for i in range(12):
        g = i % 3
        requests.append(Request(prefixes[g] + tok.encode(f"Q{i}: " + _text(rng, 1)[:20]), 3 + 5 * (g == 1), rid=i))
    sched = BatchLLM()
    ordered = sched.order(requests)
    share = [r.max_new_tokens / len(r.prompt) for r in ordered]
    runs = [[g for g, grp in sched.groups.items() if r in grp.members][0] for r in ordered]
    assert runs == sorted(runs, key=runs.index)  # each group's requests are contiguous
    assert share[0] == max(share)
    outs = {}
    for name, scheduler in (("fcfs", Scheduler(4)), ("batchllm", BatchLLM())):
        reqs = [Request(list(r.prompt), r.max_new_tokens, rid=r.rid) for r in requests]
        pool = BlockPool.for_model(model, 40)  # tight: the prefix cache must evict
        engine = Engine(model, pool)
        engine.run(reqs, scheduler)
        outs[name] = {r.rid: r.output for r in reqs}
        assert engine.prefix is not None
        if name == "batchllm":  # every group's prefix was freed after its last request
            assert all(not grp.pinned for grp in scheduler.groups.values())
            assert not any(engine.prefix.walk(p) for p in prefixes)
    assert outs["fcfs"] == outs["batchllm"]


def test_pinned_prefix_is_never_evicted():
    pool = BlockPool(1, 1, 2, num_blocks=8, block_size=2)
    cache = PrefixCache(pool)
    blocks = [pool.allocate() for _ in range(3)]
    cache.insert([1, 2, 3, 4, 5, 6], blocks)
    for block in blocks:
        pool.decref(block)
    path = cache.pin([1, 2, 3, 4])
    assert cache.evict(10) == 1 and len(cache.walk([1, 2, 3, 4, 5, 6])) == 2
    cache.unpin(path)
    assert cache.drop(path) == 2 and pool.num_used == 0
