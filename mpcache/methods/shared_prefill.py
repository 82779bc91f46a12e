"""One prefill, many KV-cache methods: record what a prompt's prefill shows the cache, replay it.

    record = PrefillRecord(model.config.n_layer, keep_hidden=True)
    logits = model(input_ids, cache=record, positions=positions, attention_mask=mask, last_only=True)
    for factory in factories:
        cache = factory(model)
        if shares_prefill(cache):
            replay_prefill(cache, record)      # the cache now is what its own prefill would have left
            ... decode from `logits` with `cache` (mpcache.generate.continue_generation)

Why it is exact: with the default `timing="after"` a method acts only after attention, so
the prefill's attention reads every prompt token whatever the method, and every layer's
inputs, queries, keys, values and logits are those of the full cache. What a method sees
during the prefill is the sequence of hook calls attention makes (see `mpcache.model.cache`):
`observe_hidden(x)`, `update(k, v)`, `observe(q)`, (`attend`: None), `attention_view()`,
`after_attention(q)` per layer in order. `PrefillRecord` keeps the arguments (the very
tensors), `replay_prefill` makes the same calls on a fresh cache. A method that changes
what the prefill's attention reads (`timing="before"`, a subset or a dequantized copy in
`read`, block-wise prefill, attention of its own in `attend`) cannot share; `shares_prefill`
says so, and `replay_prefill` checks, layer by layer, that attention would have read the
untouched stored layer. `tests/test_shared_prefill.py` checks that every
method claiming to share gives exactly the tokens and cache of its own prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mpcache.model.cache import KVCache, LayerKV


@dataclass
class LayerCall:
    """The tensors one layer's attention handed to its cache during the prefill."""

    hidden: Tensor | None  # [B, T, d_model], None when not kept
    keys: Tensor  # [B, Hkv, T, D] (after RoPE)
    values: Tensor  # [B, Hkv, T, Dv]
    queries: Tensor  # [B, Hq, T, D] (after RoPE)


class PrefillRecord(KVCache):
    """A full KV cache that also keeps each layer's hook arguments of its first forward.

    keep_hidden: keep the attention blocks' inputs too (methods that score tokens from hidden
    states need them; [B, T, d_model] per layer)."""

    def __init__(self, n_layer: int, keep_hidden: bool = False) -> None:
        super().__init__(n_layer)
        self.keep_hidden = keep_hidden
        self.calls: list[LayerCall | None] = [None] * n_layer
        self.positions: Tensor | None = None  # [B, T]
        self.valid: Tensor | None = None  # [B, T]
        self._hidden: list[Tensor | None] = [None] * n_layer
        self._pending: tuple[Tensor, Tensor] | None = None  # this layer's keys/values, until observe

    def observe_hidden(self, layer: int, hidden: Tensor) -> None:
        if self.calls[layer] is not None:
            raise ValueError("a PrefillRecord records one forward (the prompt's prefill); use a new one per prompt")
        self._hidden[layer] = hidden if self.keep_hidden else None

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> LayerKV:
        if self.positions is None:
            self.positions, self.valid = positions, valid
        self._pending = (keys, values)
        return super().update(layer, keys, values, positions, valid)

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        assert self._pending is not None, "attention calls update before observe"
        keys, values = self._pending
        self.calls[layer] = LayerCall(self._hidden[layer], keys, values, queries)
        self._hidden[layer], self._pending = None, None

    def release(self) -> None:
        """Drop the record's own key/value storage (the replays copy the recorded tensors)."""
        self.layers = [None] * len(self.layers)


def shares_prefill(cache: KVCache) -> bool:
    """Whether `cache` can start from a recorded prefill instead of running its own: its class
    says so, it acts after attention, and it does not compute the prefill's attention itself (`attend`,
    which a replay would skip; `PolicyCache.attend` takes decode steps only)."""
    from mpcache.methods.base import PolicyCache  # base imports the model, as this module's callers do

    own_attend = any("attend" in vars(klass) for klass in type(cache).__mro__ if klass not in (KVCache, PolicyCache))
    return bool(getattr(cache, "shares_prefill", False)) and getattr(cache, "timing", "after") == "after" and not (
        own_attend
    )


def needs_hidden(cache: KVCache) -> bool:
    """Whether the cache reads the attention blocks' inputs (overrides `observe_hidden`)."""
    return type(cache).observe_hidden is not KVCache.observe_hidden


def replay_prefill(cache: KVCache, record: PrefillRecord) -> None:
    """Make on `cache` the hook calls the recorded prefill made, as `Attention.forward` does
    (without recomputing attention: it would read the full prompt, as recorded)."""
    if not shares_prefill(cache):
        raise ValueError(f"{type(cache).__name__} cannot start from a shared prefill (shares_prefill is false)")
    if record.positions is None or record.valid is None or any(call is None for call in record.calls):
        raise ValueError("the PrefillRecord holds no complete prefill")
    if any(entry is not None for entry in cache.layers):
        raise ValueError("replay_prefill needs a fresh cache")
    hidden_needed = needs_hidden(cache)
    positions, valid = record.positions, record.valid
    for layer, call in enumerate(record.calls):
        assert call is not None
        if hidden_needed:
            if call.hidden is None:
                raise ValueError(f"{type(cache).__name__} reads hidden states: record with keep_hidden=True")
            cache.observe_hidden(layer, call.hidden)
        stored = cache.update(layer, call.keys, call.values, positions, valid)
        cache.observe(layer, call.queries, positions)
        view = cache.attention_view(layer)
        if view is not stored or cache.layers[layer] is not stored:
            raise RuntimeError(
                f"{type(cache).__name__} changed what the prefill's attention reads in layer {layer}; "
                "it must not claim shares_prefill"
            )
        cache.after_attention(layer, call.queries, positions)
    cache.seen_tokens = int(positions.max()) + 1
