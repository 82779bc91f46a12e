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

`PrefillStore` keeps records on disk, so runs over the same prompts (ablations, reruns of a
table) prefill each prompt once in all: `bench.accuracy --prefill-store DIR`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from mpcache.generate import prompt_positions
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


@torch.no_grad()
def record_prefill(
    model: torch.nn.Module, input_ids: Tensor, mask: Tensor | None = None, keep_hidden: bool = False
) -> tuple[PrefillRecord, Tensor]:
    """Prefill `input_ids` [B, T] (left padding marked 0 in `mask`) once: the record and the last logits [B, 1, V]."""
    record = PrefillRecord(model.config.n_layer, keep_hidden)
    positions, _ = prompt_positions(input_ids, mask)
    logits = model(input_ids, cache=record, positions=positions, attention_mask=mask, last_only=True)
    record.release()
    return record, logits


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


class PrefillStore:
    """Prefill records and their last logits on disk, one file per prompt batch (named by a hash of the model's
    config, its first weights and the input), written once and read by every later run over the same prompts.
    A record kept without hidden states is recomputed when a method needs them."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.loaded = self.saved = 0

    def path(self, model: torch.nn.Module, input_ids: Tensor, mask: Tensor | None) -> Path:
        digest = hashlib.sha1(repr(getattr(model, "config", None)).encode())
        first = next(model.parameters()).detach().flatten()[:64]
        for tensor in (first, input_ids, mask if mask is not None else torch.ones_like(input_ids)):
            digest.update(tensor.cpu().contiguous().numpy().tobytes())
        return self.folder / f"{digest.hexdigest()[:24]}.pt"

    def get(
        self, model: torch.nn.Module, input_ids: Tensor, mask: Tensor | None = None, keep_hidden: bool = False
    ) -> tuple[PrefillRecord, Tensor]:
        """(record, logits) of this prompt batch: loaded when stored, else recorded and stored."""
        stored = self.load(model, input_ids, mask, keep_hidden)
        if stored is not None:
            return stored
        record, logits = record_prefill(model, input_ids, mask, keep_hidden)
        self.save(model, input_ids, mask, record, logits)
        return record, logits

    def load(
        self, model: torch.nn.Module, input_ids: Tensor, mask: Tensor | None, keep_hidden: bool
    ) -> tuple[PrefillRecord, Tensor] | None:
        """(record, logits [B, 1, V]) when stored (with hidden states if `keep_hidden`), else None."""
        path = self.path(model, input_ids, mask)
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=True)
        if keep_hidden and not saved["keep_hidden"]:
            return None
        record = PrefillRecord(len(saved["calls"]), saved["keep_hidden"])
        record.calls = [LayerCall(**call) for call in saved["calls"]]
        record.positions, record.valid = saved["positions"], saved["valid"]
        self.loaded += 1
        return record, saved["logits"]

    def save(
        self, model: torch.nn.Module, input_ids: Tensor, mask: Tensor | None, record: PrefillRecord, logits: Tensor
    ) -> None:
        calls = [asdict(call) for call in record.calls if call is not None]
        if len(calls) != len(record.calls):
            raise ValueError("the PrefillRecord holds no complete prefill")
        saved = {"calls": calls, "positions": record.positions, "valid": record.valid, "logits": logits,
                 "keep_hidden": record.keep_hidden}  # fmt: skip
        path = self.path(model, input_ids, mask)
        partial = path.with_suffix(".part")
        torch.save(saved, partial)
        partial.replace(path)  # a run killed mid-write leaves no truncated record
        self.saved += 1
