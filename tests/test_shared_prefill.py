"""One prefill, many methods: a replayed prefill must leave every sharing method exactly where
its own prefill would have (same generated tokens, same cache contents and sizes)."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from mpcache.eval.runner import MethodSpec, evaluate_many, make_batches, task_samples
from mpcache.generate import continue_generation, prompt_positions, stream_generate
from mpcache.kernels import gather_slots
from mpcache.methods import METHODS, make_policy
from mpcache.methods.base import PolicyCache
from mpcache.methods.shared_prefill import (
    PrefillRecord,
    PrefillStore,
    needs_hidden,
    replay_prefill,
    shares_prefill,
)
from mpcache.model import KVCache, load_bundled

STEPS = 20  # decode steps: past every method's first decode-time compression


@pytest.fixture(scope="module")
def bundled():
    return load_bundled()


@pytest.fixture(scope="module")
def batch(bundled):
    """Two prompts of different lengths (so the batch is left-padded) and their prefill record."""
    model, tok = bundled
    samples = task_samples(tok, "niah", 300, 1, seed=1) + task_samples(tok, "passkey", 260, 1, seed=2)
    _, (batch,) = make_batches(model, tok, samples, batch_size=2, margin=0)
    assert batch.mask is not None
    return batch


def own_prefill(model, factory, batch) -> tuple[list[torch.Tensor], KVCache]:
    caches = []

    def recording(m):
        caches.append(factory(m) if factory is not None else KVCache(m.config.n_layer))
        return caches[-1]

    steps = list(stream_generate(model, batch.input_ids, STEPS, policy=recording, attention_mask=batch.mask))
    return steps, caches[0]


def shared_prefill(model, factory, batch) -> tuple[list[torch.Tensor], KVCache]:
    cache = factory(model) if factory is not None else KVCache(model.config.n_layer)
    record = PrefillRecord(model.config.n_layer, keep_hidden=needs_hidden(cache))
    positions, next_position = prompt_positions(batch.input_ids, batch.mask)
    with torch.no_grad():
        logits = model(batch.input_ids, cache=record, positions=positions, attention_mask=batch.mask, last_only=True)
    record.release()
    replay_prefill(cache, record)
    return list(continue_generation(model, cache, logits, next_position, STEPS)), cache


def assert_same_cache(a: KVCache, b: KVCache) -> None:
    assert a.seen_tokens == b.seen_tokens and a.memory_bytes() == b.memory_bytes()
    for layer, (x, y) in enumerate(zip(a.layers, b.layers, strict=True)):
        assert (x is None) == (y is None)
        if x is None:
            continue
        for name in ("keys", "values", "positions", "valid", "lengths"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (layer, name)
        assert torch.equal(a.tokens_per_head(layer), b.tokens_per_head(layer))


@pytest.mark.parametrize("name", ["full", *METHODS])
@pytest.mark.parametrize("budget", [24, 0.3])
def test_replayed_prefill_equals_own_prefill(bundled, batch, name: str, budget) -> None:
    model, _ = bundled
    factory = None if name == "full" else make_policy(name, budget)
    cache = factory(model) if factory is not None else KVCache(model.config.n_layer)
    if not shares_prefill(cache):
        with pytest.raises(ValueError, match="shared prefill"):
            shared_prefill(model, factory, batch)
        return
    own_steps, own_cache = own_prefill(model, factory, batch)
    steps, replayed = shared_prefill(model, factory, batch)
    assert len(steps) == len(own_steps) == STEPS
    assert torch.equal(torch.stack(steps), torch.stack(own_steps)), name
    assert_same_cache(replayed, own_cache)


def test_every_method_declares_whether_it_shares() -> None:
    assert KVCache.shares_prefill and all(isinstance(cls.shares_prefill, bool) for cls in METHODS.values())
    sharing = [name for name, cls in METHODS.items() if cls.shares_prefill]
    assert len(sharing) >= 15, sharing  # the default: acting after attention leaves the prefill untouched


def test_compressing_before_attention_does_not_share(bundled, batch) -> None:
    model, _ = bundled
    cache = make_policy("snapkv", 24, timing="before")(model)
    assert not shares_prefill(cache)
    with pytest.raises(ValueError, match="shares_prefill is false"):
        shared_prefill(model, make_policy("snapkv", 24, timing="before"), batch)


def test_a_cache_that_attends_itself_does_not_share() -> None:
    class Attends(KVCache):
        def attend(self, layer, queries, query_positions, sliding_window):
            return None

    assert shares_prefill(KVCache(2)) and not shares_prefill(Attends(2))


class SubsetInPrefill(PolicyCache):
    """Claims to share but lets the prefill's attention read only the newest 8 slots."""

    name: ClassVar[str] = "subset_in_prefill"
    compress_prefill: ClassVar[bool] = False

    def read(self, layer: int):
        entry = super().read(layer)
        lengths = entry.lengths
        index = (lengths[..., None] - 8 + torch.arange(8)).clamp(min=0)
        return gather_slots(entry, index, lengths.clamp(max=8))


def test_replay_refuses_a_method_that_changes_the_prefill(bundled, batch) -> None:
    model, _ = bundled
    with pytest.raises(RuntimeError, match="must not claim shares_prefill"):
        shared_prefill(model, lambda m: SubsetInPrefill.from_model(m, 8), batch)


def test_replay_needs_hidden_states_when_the_method_reads_them(bundled, batch) -> None:
    model, _ = bundled
    cache = make_policy("locret", 24)(model)
    assert needs_hidden(cache)
    record = PrefillRecord(model.config.n_layer, keep_hidden=False)
    positions, _ = prompt_positions(batch.input_ids, batch.mask)
    with torch.no_grad():
        model(batch.input_ids, cache=record, positions=positions, attention_mask=batch.mask, last_only=True)
    with pytest.raises(ValueError, match="keep_hidden=True"):
        replay_prefill(cache, record)
    with pytest.raises(ValueError, match="one forward"):
        model(batch.input_ids[:, -1:], cache=record)


def test_evaluate_many_rows_do_not_depend_on_sharing(bundled) -> None:
    model, tok = bundled
    specs = [MethodSpec("full"), MethodSpec("snapkv", 32), MethodSpec("snapkv", 32, {"timing": "before"}),
             MethodSpec("quest", 0.2), MethodSpec("h2o", 0.2)]  # fmt: skip
    kwargs = dict(tasks=["passkey"], lengths=[300], samples=3, batch_size=2, progress=False)
    shared = evaluate_many(model, tok, specs, share_prefill=True, **kwargs)
    own = evaluate_many(model, tok, specs, share_prefill=False, **kwargs)
    drop = ("seconds", "shared_prefill_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in shared] == [
        {k: v for k, v in r.items() if k not in drop} for r in own
    ]
    assert [r["shared_prefill_seconds"] is not None for r in shared] == [True, True, False, True, True]
    assert all(r["shared_prefill_seconds"] is None for r in own)


def test_prefill_store_round_trip_gives_the_same_rows(bundled, tmp_path) -> None:
    model, tok = bundled
    specs = [MethodSpec("full"), MethodSpec("mpcache", 0.2, {"cluster_size": 16, "subcluster_size": 8}),
             MethodSpec("locret", 32)]  # fmt: skip  locret reads hidden states: the store must keep them
    kwargs = dict(tasks=["passkey"], lengths=[300], samples=3, batch_size=2, progress=False)
    drop = ("seconds", "shared_prefill_seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    plain = evaluate_many(model, tok, specs, **kwargs)
    store = PrefillStore(tmp_path)
    first = evaluate_many(model, tok, specs, prefill_store=store, **kwargs)
    assert (store.saved, store.loaded) == (2, 0)  # 3 samples in batches of 2
    second = evaluate_many(model, tok, specs, prefill_store=store, **kwargs)
    assert (store.saved, store.loaded) == (2, 2)
    assert strip(first) == strip(second) == strip(plain)
    # a record stored without hidden states is not used for a method that reads them
    lean = PrefillStore(tmp_path / "lean")
    evaluate_many(model, tok, specs[:2], prefill_store=lean, **kwargs)
    evaluate_many(model, tok, specs, prefill_store=lean, **kwargs)
    assert (lean.saved, lean.loaded) == (4, 0)
