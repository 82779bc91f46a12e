"""Record a prompt's prefill once, replay it under any KV method: a method's decoding without its prefill's cost.

A method that compresses after the prompt's attention (`timing="after"`, the default) does not change what the
prefill computes: every layer's keys, values and queries are the full cache's. So one full-cache prefill per
prompt, stored (`PrefillStore`), serves every method and knob variant: `replay_prefill` feeds a fresh policy
cache the recorded tensors through the same hooks attention calls (update -> observe -> attention_view ->
after_attention, layer by layer), and decoding then runs on the real model. The generated tokens are exactly
those of `stream_generate` with that policy (tests/test_prefill_replay.py checks it), at the cost of decoding
only. Methods that look at hidden states (`observe_hidden`) or act before attention are refused.

    store = PrefillStore(Path("/tmp/prefills"))
    evaluate(model, tok, "mpcache", 0.1, ..., batch_size=1, generate_fn=store.generate_fn())
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mpcache.generate import stream_generate
from mpcache.methods.base import PolicyCache
from mpcache.model.cache import KVCache
from mpcache.model.transformer import Transformer


@dataclass
class Prefill:
    """A full-cache prefill of one unpadded prompt: per layer keys / values [1, Hkv, T, D] and post-RoPE queries
    [1, Hq, T, D], and the last position's logits [1, 1, V]."""

    keys: list[Tensor]
    values: list[Tensor]
    queries: list[Tensor]
    logits: Tensor

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


class _Recorder(KVCache):
    """A full cache that also keeps every layer's first-forward queries."""

    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self.queries: list[Tensor | None] = [None] * n_layer

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        if self.queries[layer] is None:
            self.queries[layer] = queries.clone()


@torch.no_grad()
def record_prefill(model: Transformer, input_ids: Tensor) -> Prefill:
    """Run the prompt `input_ids` [1, T] through `model` with a full cache and keep what every method may read."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"record one unpadded prompt [1, T], got {tuple(input_ids.shape)}")
    cache = _Recorder(model.config.n_layer)
    logits = model(input_ids, cache=cache, last_only=True)
    keys, values = [], []
    for entry in cache.layers:
        assert entry is not None
        t = int(entry.lengths.max())
        keys.append(entry.keys[:, :, :t].clone())
        values.append(entry.values[:, :, :t].clone())
    queries = [q for q in cache.queries if q is not None]
    return Prefill(keys, values, queries, logits)


def check_replayable(cache: KVCache) -> None:
    """Raise unless `cache` acts only after the prompt's attention and ignores hidden states."""
    if type(cache).observe_hidden is not KVCache.observe_hidden:
        raise ValueError(f"{type(cache).__name__} reads hidden states, which a replayed prefill does not record")
    if isinstance(cache, PolicyCache) and cache.timing != "after":
        raise ValueError(f"{type(cache).__name__} compresses before attention: its prefill differs from a full one")


@torch.no_grad()
def replay_prefill(prefill: Prefill, cache: KVCache) -> Tensor:
    """Feed `cache` the recorded prefill through attention's hooks; returns the prompt's last logits."""
    check_replayable(cache)
    t = prefill.length
    positions = torch.arange(t)[None]
    valid = torch.ones(1, t, dtype=torch.bool)
    for layer, (k, v, q) in enumerate(zip(prefill.keys, prefill.values, prefill.queries)):
        cache.update(layer, k, v, positions, valid)
        cache.observe(layer, q, positions)
        cache.attention_view(layer)
        cache.after_attention(layer, q, positions)
    cache.seen_tokens = t
    return prefill.logits


class _Replaying(torch.nn.Module):
    """`model` whose prefill forward (the first one with a cache) comes from a recorded Prefill."""

    def __init__(self, model: Transformer, prefill: Prefill) -> None:
        super().__init__()
        self.model, self.prefill, self.config = model, prefill, model.config
        self.replayed = False

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, **kwargs: Any) -> Tensor:
        if not self.replayed:
            self.replayed = True
            if cache is None or input_ids.shape[1] != self.prefill.length:
                raise ValueError("the replayed forward must be the prompt's prefill with a cache")
            return replay_prefill(self.prefill, cache)
        return self.model(input_ids, cache=cache, **kwargs)


class PrefillStore:
    """Recorded prefills on disk, one file per prompt (named by a hash of the model and the token ids)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.recorded = 0  # prefills computed (not loaded) by this store

    def path(self, model: Transformer, input_ids: Tensor) -> Path:
        digest = hashlib.sha1(repr(model.config).encode())
        digest.update(input_ids.to(torch.int64).numpy().tobytes())
        return self.folder / f"{digest.hexdigest()[:20]}.pt"

    def get(self, model: Transformer, input_ids: Tensor) -> Prefill:
        path = self.path(model, input_ids)
        if path.exists():
            return Prefill(**torch.load(path, weights_only=True))
        prefill = record_prefill(model, input_ids)
        self.recorded += 1
        tmp = path.with_suffix(".tmp")
        torch.save(vars(prefill), tmp)
        tmp.replace(path)
        return prefill

    def generate_fn(self):
        """A `stream_generate` drop-in for `mpcache.eval.runner.evaluate` (batch_size=1, no padding)."""

        def generate(model: Transformer, input_ids: Tensor, max_new_tokens: int, **kwargs: Any) -> Iterator[Tensor]:
            if input_ids.shape[0] != 1 or kwargs.get("attention_mask") is not None:
                raise ValueError("replayed prefills need batch_size=1 (one unpadded prompt per batch)")
            replaying = _Replaying(model, self.get(model, input_ids))
            yield from stream_generate(replaying, input_ids, max_new_tokens, **kwargs)

        return generate
