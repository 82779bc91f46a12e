"""The KV-cache policy interface every method implements.

A method is a `PolicyCache`: a `KVCache` subclass built once per request by the factory
that `make_policy` returns. Attention drives it through the cache hooks, per layer and
forward (see `mpcache.model.cache`):

    observe_hidden -> update -> observe -> attention_view -> cached_attention -> after_attention

Decode steps run through the Triton kernels where the switch wants them (`mpcache.kernels.wanted`: on CUDA by
default): `PolicyCache.attend` then computes the step's attention itself (`attend_kernels`), over slot lists
(Quest, MPCache) or side stores (MiKV, ThinK) in place, and for the methods that read the step's attention
(`keeps_probs`) keeps every slot's probability from the same pass, which `attention_received` hands back instead
of recomputing it. The torch path (the reference) is unchanged: the model attends over `attention_view`.

What a method may observe: this step's queries (post-RoPE), every stored key/value with its
original position, the softmax attention any window of this step's queries gives each slot (`attention_received`),
the block's hidden states (`observe_hidden`), and the model itself (`from_model`).

When it acts (`_step`): each forward of a layer is a "prefill" (the layer's first forward,
i.e. the prompt), a "chunk" (a later multi-token forward: block-wise prefill, see
`prefill_in_chunks`) or a "decode" step. `compress_prefill`, `compress_chunks` and
`decode_interval` say after which of them the method compresses. By default it acts
AFTER attention (kvpress): the prompt tokens attend to the full prompt, prefill logits
are exactly those of the full cache, and only generation sees the compressed cache.
`timing="before"` compresses in `observe` instead, so the step's own attention already
reads the compressed cache.

What it may do: evict tokens per (batch row, layer, KV head) through `KVCache.keep`,
which reallocates storage, so memory really drops; keep evicted entries elsewhere in a
cheaper form (merged, quantized, channel-pruned) and hand attention a view of everything
through `read`; or pick, per step, which stored tokens attention reads (Quest, MPCache).

The scorer contract mirrors kvpress: `score(...) -> [B, Hkv, L]` per stored slot, then a
keep-set rule (`select`): the first `sink` and last `window` valid tokens are protected,
the rest ranked by score, and a head whose tokens fit its budget is not touched at all,
so a budget >= the sequence length gives exactly the full cache. The budget (per KV head,
tokens; a float is a ratio of the prompt length) is split across layers (`layer_weights`)
and across the KV heads of a layer: `uniform` (each head keeps the budget) or `global`
(AdaKV: the layer's Hkv x budget slots go to the globally best scores, each head keeping
at least `floor` x budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.kernels import (
    attention_probs,
    decode_attention,
    decode_attention_probs,
    gather_slots,
    wanted,
    window_attention_sums,
)
from mpcache.model.cache import KVCache, LayerKV
from mpcache.model.transformer import Transformer

Budget = int | float
StepKind = Literal["prefill", "chunk", "decode"]


# --------------------------------------------------------------------------- budgets
def check_budget(budget: object) -> None:
    """Raise unless `budget` is an int token count >= 1 or a float ratio in (0, 1)."""
    if budget is None:
        raise ValueError("a budget is required: an int token count per KV head or a float ratio in (0, 1)")
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(f"budget must be an int token count or a float ratio, got {type(budget).__name__}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget must be at least 1 token, got {budget}")
    if isinstance(budget, float) and not 0.0 < budget < 1.0:
        raise ValueError(f"a float budget is a ratio in (0, 1) of the prompt, got {budget}; use an int for tokens")


def resolve_budget(budget: Budget, prompt_lengths: Tensor) -> Tensor:
    """Tokens per KV head for each batch row [B]: the int itself, or floor(ratio x prompt length), >= 1."""
    if isinstance(budget, float):
        return (prompt_lengths.double() * budget).floor().long().clamp(min=1)
    return torch.full_like(prompt_lengths, int(budget))


def split_across_layers(total: Tensor, weights: Tensor) -> Tensor:
    """Split `total` [B] tokens over layers in proportion to `weights` [L] (or one row of
    weights per batch row, [B, L]) by largest remainder, so every row sums exactly to its
    total. Returns [B, L] ints."""
    share = total[:, None].double() * (weights.double() / weights.double().sum(-1, keepdim=True))
    base = share.floor().long()
    short = total - base.sum(-1)
    rank = (base - share).argsort(-1).argsort(-1)  # 0 for the largest remainder
    return base + (rank < short[:, None]).long()


def split_bounded(total: Tensor, weights: Tensor, high: Tensor) -> Tensor:
    """`split_across_layers` with a per-layer cap (CAKE, D2O, CompressKV): `total` [B] tokens
    over layers in proportion to `weights` [B, L] >= 0, no layer above `high` [B, L] (ints).
    A capped layer's excess goes to the others in proportion to their weights (water
    filling), so rows sum exactly to min(total, sum of caps). Returns [B, L] ints."""
    w = weights.double().clamp(min=0.0)
    high = high.expand_as(w).double()
    total = torch.minimum(total.double(), high.sum(-1))
    capped = torch.zeros_like(w, dtype=torch.bool)
    share = high
    for _ in range(w.shape[-1]):
        free = w.masked_fill(capped, 0.0)
        free = torch.where(free.sum(-1, keepdim=True) > 0, free, (~capped).double())  # all-zero weights: even split
        rest = total - high.masked_fill(~capped, 0.0).sum(-1)
        share = torch.where(capped, high, rest[:, None] * free / free.sum(-1, keepdim=True).clamp(min=1e-300))
        over = (share > high) & ~capped
        if not bool(over.any()):
            break
        capped |= over
    share = share.clamp(min=0.0)
    return split_across_layers(total.round().long(), share + (share.sum(-1, keepdim=True) == 0))


def global_head_counts(scores: Tensor, budget: Tensor, floor: float) -> Tensor:
    """AdaKV split of one layer's Hkv x budget slots over its KV heads [B, Hkv].

    Each head first keeps its `floor` x budget best slots (a safeguard), the remaining
    slots go to the best scores over all heads. `scores` [B, H, L] must be comparable
    across heads (e.g. attention probabilities); -inf marks invalid slots.
    """
    b, h, length = scores.shape
    n_valid = (scores > float("-inf")).sum(-1)
    safeguard = torch.minimum((budget.double() * floor).floor().long()[:, None].expand(b, h), n_valid)
    ordered = scores.sort(-1, descending=True).values
    rank = torch.arange(length, device=scores.device)
    pool = ordered.masked_fill(rank < safeguard[..., None], float("-inf")).flatten(1)
    extra = (budget * h - safeguard.sum(-1)).clamp(min=0)
    k = min(int(extra.max()), pool.shape[-1])
    top = pool.topk(k, dim=-1)
    chosen = (torch.arange(k, device=scores.device) < extra[:, None]) & (top.values > float("-inf"))
    counts = torch.zeros(b, h, dtype=torch.long, device=scores.device)
    return safeguard + counts.scatter_add_(1, top.indices // length, chosen.long())


# ------------------------------------------------------------------- keep-set rules
def arrival_rank(valid: Tensor) -> Tensor:
    """Index of each valid slot among its head's valid slots, oldest first (slots are kept in position order)."""
    return valid.long().cumsum(-1) - 1


def recency_rank(valid: Tensor) -> Tensor:
    """Index of each valid slot among its head's valid slots, newest first."""
    return valid.long().flip(-1).cumsum(-1).flip(-1) - 1


def protect(scores: Tensor, valid: Tensor, cap: Tensor, sink: int | Tensor, window: int | Tensor) -> Tensor:
    """`scores` [B, H, L] with the first `sink` and last `window` valid slots of each head set
    to +inf and invalid slots to -inf. Both are clamped to the head's `cap` [B, H] (sinks
    first), so a protected set never exceeds what the head may keep."""
    sink = _per_head(sink, cap)
    window = _per_head(window, cap)
    sink = torch.minimum(sink, cap)
    window = torch.minimum(window, cap - sink)
    protected = (arrival_rank(valid) < sink[..., None]) | (recency_rank(valid) < window[..., None])
    out = scores.float().masked_fill(protected & valid, float("inf"))
    return out.masked_fill(~valid, float("-inf"))


def topk_slots(scores: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """The `count[b, h]` best-scoring slots of every head, in slot (= position) order, as the
    (index [B, H, K], count) pair `KVCache.keep` takes."""
    k = int(count.max()) if count.numel() else 0
    top = scores.topk(k, dim=-1).indices
    unused = torch.arange(k, device=scores.device) >= count[..., None]
    top = top.masked_fill(unused, scores.shape[-1])  # sorts after every real slot
    return top.sort(-1).values.clamp(max=max(scores.shape[-1] - 1, 0)), count


def top_mask(scores: Tensor, count: Tensor) -> Tensor:
    """Boolean mask [B, H, C] of the `count[b, h]` best finite-or-+inf entries of each row."""
    rank = scores.argsort(-1, descending=True).argsort(-1)  # 0 for the best
    return (rank < count[..., None]) & (scores > float("-inf"))


def mask_to_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Slots set in `mask` [B, H, L] as (index [B, H, K] in slot order, count [B, H])."""
    count = mask.sum(-1)
    k = int(count.max()) if count.numel() else 0
    index = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :k]
    return index, count


def pool_scores(x: Tensor, kernel: int, kind: str = "avg") -> Tensor:
    """Same-length 1-D pooling along the last axis (SnapKV: a hit keeps its neighbours).
    Zero padding for "avg", -inf padding for "max"; `kernel` must be odd."""
    if kernel == 1:
        return x
    flat = x.reshape(-1, 1, x.shape[-1])
    pool = F.avg_pool1d if kind == "avg" else F.max_pool1d
    return pool(flat, kernel, stride=1, padding=kernel // 2).reshape(x.shape)


def chunk_ids(valid: Tensor, size: int) -> Tensor:
    """Chunk of every slot [B, H, L]: valid slots, taken in order, form runs of `size`
    (Quest pages, MPCache clusters), so padding and holes never shift a boundary; invalid
    slots get -1."""
    return torch.where(valid, arrival_rank(valid) // size, -1)


def chunk_min_max(keys: Tensor, valid: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel max and min of the keys of every chunk (`chunk_ids`): keys [B, H, L, D]
    -> kmax, kmin [B, H, C, D] with C = ceil(max valid / size), plus `nonempty` [B, H, C].
    Empty chunks get zeros."""
    b, h, length, d = keys.shape
    c = max(-(-int(valid.sum(-1).max()) // size), 1) if valid.numel() else 1
    ids = chunk_ids(valid, size)
    ids = torch.where(ids < 0, c, ids)[..., None].expand(-1, -1, -1, d)  # invalid -> a spare chunk, dropped
    kmax = keys.new_full((b, h, c + 1, d), float("-inf")).scatter_reduce(2, ids, keys, "amax")[:, :, :c]
    kmin = keys.new_full((b, h, c + 1, d), float("inf")).scatter_reduce(2, ids, keys, "amin")[:, :, :c]
    nonempty = torch.arange(c, device=keys.device) < -(-valid.sum(-1, keepdim=True) // size)
    return kmax.masked_fill(~nonempty[..., None], 0.0), kmin.masked_fill(~nonempty[..., None], 0.0), nonempty


ChunkSummary = tuple[Tensor, Tensor, Tensor, Tensor]  # kmax, kmin, nonempty (as chunk_min_max), valid slots [B, H]


def extend_chunk_min_max(summary: ChunkSummary | None, keys: Tensor, valid: Tensor, size: int) -> ChunkSummary:
    """`chunk_min_max` of keys/valid plus the valid count per head, updated from `summary` (the same of an earlier
    state of this append-only store: its slots unchanged, new ones after them) instead of recomputed: only the
    chunks from the first one that can have gained tokens on, over the slots that hold them, are rebuilt. Quest's
    page summaries per decode step: O(new tokens) instead of O(cache). Min and max are exact, so it equals the
    recomputation bit for bit."""
    n = valid.sum(-1)
    if summary is None:
        return (*chunk_min_max(keys, valid, size), n)
    kmax, kmin, _, done = summary
    first = int((done // size).min()) if done.numel() else 0  # chunks before it are complete in every head
    ids = chunk_ids(valid, size)
    changed = (ids >= first).flatten(0, 1).any(0)  # slots holding a rebuilt chunk somewhere
    start = int(changed.nonzero()[0]) if bool(changed.any()) else keys.shape[2]
    tail_ids = torch.where(ids[:, :, start:] >= first, ids[:, :, start:] - first, -1)
    tail = chunk_min_max(keys[:, :, start:], tail_ids >= 0, size) if start < keys.shape[2] else None
    c = max(-(-int(n.max()) // size), 1) if n.numel() else 1
    nonempty = torch.arange(c, device=keys.device) < -(-n[..., None] // size)
    if tail is None:
        return kmax[:, :, :c], kmin[:, :, :c], nonempty, n
    # the tail's own chunks start at a chunk boundary (ranks first * size, ...), so they are chunks first, first + 1...
    new_max = torch.cat([kmax[:, :, :first], tail[0]], 2)[:, :, :c]
    new_min = torch.cat([kmin[:, :, :first], tail[1]], 2)[:, :, :c]
    pad = c - new_max.shape[2]
    if pad > 0:
        new_max, new_min = F.pad(new_max, (0, 0, 0, pad)), F.pad(new_min, (0, 0, 0, pad))
    return new_max.masked_fill(~nonempty[..., None], 0.0), new_min.masked_fill(~nonempty[..., None], 0.0), nonempty, n


def chunks_to_slots(chosen: Tensor, valid: Tensor, size: int) -> Tensor:
    """Slots [B, H, L] of the chunks set in `chosen` [B, H, C]."""
    ids = chunk_ids(valid, size)
    return chosen.gather(-1, ids.clamp(min=0)) & valid


def _per_head(x: int | Tensor, like: Tensor) -> Tensor:
    """An int or a per-row [B] tensor broadcast to `like` [B, H]."""
    if isinstance(x, Tensor):
        return x.to(like.device).reshape(-1, 1).expand_as(like)
    return torch.full_like(like, int(x))


# ---------------------------------------------------------------------- the policy
class PolicyCache(KVCache):
    """A KV cache that compresses itself; subclasses supply `score` or override `compress`.

    budget: tokens per KV head (int) or a ratio (0, 1) of the prompt length, resolved per
        batch row on the first forward (with block-wise prefill: the first block).
    sink / window: protected first / last valid tokens of every head.
    split: "uniform" (every head keeps the budget) or "global" (AdaKV, with `floor`).
    layer_weights: per-layer budget shares (the n_layer x budget total is split by them).
    timing: compress "after" (default, kvpress) or "before" the step's attention reads the cache.
    decode_interval: compress every N decode steps (0: never; default: the method's).
    """

    name: ClassVar[str] = "base"
    needs_budget: ClassVar[bool] = True
    compress_prefill: ClassVar[bool] = True
    compress_chunks: ClassVar[bool] = False
    default_decode_interval: ClassVar[int] = 0
    # Whether decode steps keep the probabilities of the attention kernel's pass, for a `record` or `score` that
    # reads `attention_received` while decoding (a speed choice only: without them it is recomputed).
    keeps_probs: ClassVar[bool] = False

    def __init__(
        self,
        n_layer: int,
        budget: Budget | None,
        *,
        sink: int = 0,
        window: int = 0,
        split: str = "uniform",
        floor: float = 0.2,
        layer_weights: Sequence[float] | None = None,
        timing: str = "after",
        decode_interval: int | None = None,
    ) -> None:
        super().__init__(n_layer)
        if self.needs_budget or budget is not None:
            check_budget(budget)
        for label, value in (("sink", sink), ("window", window)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{label} must be an int >= 0, got {value!r}")
        if split not in ("uniform", "global"):
            raise ValueError(f"split must be 'uniform' or 'global', got {split!r}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        if timing not in ("after", "before"):
            raise ValueError(f"timing must be 'after' or 'before' attention, got {timing!r}")
        interval = self.default_decode_interval if decode_interval is None else decode_interval
        if not isinstance(interval, int) or interval < 0:
            raise ValueError(f"decode_interval must be an int >= 0, got {decode_interval!r}")
        if layer_weights is not None:
            if len(layer_weights) != n_layer or any(not w > 0 for w in layer_weights):
                raise ValueError(f"layer_weights needs {n_layer} positive numbers, got {list(layer_weights)}")
        self.budget = budget
        self.sink, self.window, self.split, self.floor = sink, window, split, floor
        self.layer_weights = None if layer_weights is None else torch.tensor(list(layer_weights), dtype=torch.float64)
        self.timing, self.decode_interval = timing, interval
        self.sliding_window: int | None = None
        self.prompt_lengths: Tensor | None = None  # [B] valid tokens of the first forward
        self.budget_tokens: Tensor | None = None  # [B] per-head budget, resolved on the first forward
        self.forwards = [0] * n_layer  # forwards seen per layer
        self.decode_steps = [0] * n_layer
        self.step_valid: Tensor | None = None  # [B, T] validity of the current step's tokens
        self.state: list[dict[str, Tensor]] = [{} for _ in range(n_layer)]
        self.read_tokens: list[Tensor | None] = [None] * n_layer
        self.step_probs: list[tuple[Tensor, Tensor] | None] = [None] * n_layer  # (keys read, probs) this step
        # Slot lists (index [B, H, K], count [B, H]) a query-aware method (Quest, MPCache) reads this step; None:
        # the whole stored layer. The torch path gathers them (`read`), the kernels read them in place.
        self.selected: list[tuple[Tensor, Tensor] | None] = [None] * n_layer

    @classmethod
    def from_model(cls, model: Transformer, budget: Budget | None, **kwargs) -> PolicyCache:
        """The factory `make_policy` returns calls this (override to load per-model state)."""
        cache = cls(model.config.n_layer, budget, **kwargs)
        cache.sliding_window = model.config.sliding_window
        return cache

    # ------------------------------------------------------------ storage upkeep
    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> LayerKV:
        if self.prompt_lengths is None:
            self.prompt_lengths = valid.sum(-1)
            self.budget_tokens = resolve_budget(self.budget, self.prompt_lengths) if self.budget is not None else None
        old = self.layers[layer]
        old_lengths = old.lengths if old is not None else keys.new_zeros(keys.shape[:2], dtype=torch.long)
        entry = super().update(layer, keys, values, positions, valid)
        self.step_valid = valid
        for name, state in self.state[layer].items():  # new slots start at zero
            state = F.pad(state, (0, entry.capacity - state.shape[-1]))
            fresh = torch.arange(entry.capacity, device=state.device) >= old_lengths[..., None]
            self.state[layer][name] = state.masked_fill(fresh, 0.0)
        return entry

    def keep(self, layer: int, index: Tensor, count: Tensor | None = None) -> None:
        super().keep(layer, index, count)
        entry = self.layers[layer]
        assert entry is not None
        index = index[:, :, : entry.capacity]
        for name, state in self.state[layer].items():
            self.state[layer][name] = state.gather(2, index.clamp(0, max(state.shape[-1] - 1, 0))).contiguous()

    def slot_state(self, layer: int, name: str) -> Tensor:
        """A float per stored slot [B, H, L] (e.g. H2O's accumulated attention) that follows
        the slots through `update` (new slots start at 0) and `keep` (gathered with them)."""
        entry = self.layers[layer]
        assert entry is not None
        if name not in self.state[layer]:
            self.state[layer][name] = torch.zeros(entry.valid.shape, device=entry.keys.device)
        return self.state[layer][name]

    # ---------------------------------------------------------------------- hooks
    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        self.step_probs[layer] = None  # a new forward of this layer: nothing computed yet
        self.selected[layer] = None
        if self.timing == "before":
            self._step(layer, queries, query_positions)

    def after_attention(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        if self.timing == "after":
            self._step(layer, queries, query_positions)

    def attention_view(self, layer: int) -> LayerKV:
        view = self.read(layer)
        self.read_tokens[layer] = view.valid.sum(-1)
        return view

    def read(self, layer: int) -> LayerKV:
        """What attention reads this step: the stored layer, or its `selected` slots gathered (override for
        dequantised or other side stores)."""
        entry = self.layers[layer]
        assert entry is not None
        chosen = self.selected[layer]
        return entry if chosen is None else gather_slots(entry, *chosen)

    def attend(self, layer: int, queries: Tensor, query_positions: Tensor, sliding_window: int | None) -> Tensor | None:
        """A decode step's attention through the kernels where the switch wants them (`attend_kernels`); otherwise
        None (the model attends over `attention_view` with the torch reference), or a store below's own."""
        if queries.shape[2] == 1 and wanted(queries):
            return self.attend_kernels(layer, queries, query_positions, sliding_window)
        return super().attend(layer, queries, query_positions, sliding_window)

    def attend_kernels(
        self, layer: int, queries: Tensor, query_positions: Tensor, sliding_window: int | None
    ) -> Tensor:
        """Decode attention [B, Hq, 1, Dv] over what `read` returns, through the kernels; with `keeps_probs` and
        the stored layer as the view, every slot's probability is kept for `attention_received`. Methods whose
        view the kernels can read in place (slot lists, side stores) override this with the same math."""
        chosen, entry = self.selected[layer], self.layers[layer]
        if chosen is not None and type(self).read is PolicyCache.read:  # slot lists: read in place
            assert entry is not None
            self.read_tokens[layer] = chosen[1]  # the selected slots are valid ones
            return decode_attention(queries, entry, query_positions, sliding_window, *chosen, use_kernels=True)
        view = self.attention_view(layer)
        if self.keeps_probs and view is entry:
            out, probs = decode_attention_probs(queries, view, query_positions, sliding_window, use_kernels=True)
            self.step_probs[layer] = (view.keys, probs)
            return out
        return decode_attention(queries, view, query_positions, sliding_window, use_kernels=True)

    @torch.no_grad()
    def _step(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        kind: StepKind = "prefill" if self.forwards[layer] == 0 else "decode" if queries.shape[2] == 1 else "chunk"
        self.forwards[layer] += 1
        if kind == "decode":
            self.decode_steps[layer] += 1
        self.record(layer, queries, query_positions, kind)
        acts = {
            "prefill": self.compress_prefill,
            "chunk": self.compress_chunks,
            "decode": self.decode_interval > 0 and self.decode_steps[layer] % max(self.decode_interval, 1) == 0,
        }[kind]
        if acts:
            self.compress(layer, queries, query_positions)

    # ------------------------------------------------------ what methods override
    def record(self, layer: int, queries: Tensor, query_positions: Tensor, kind: StepKind) -> None:
        """Update running statistics every forward, before any compression (no-op here)."""

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        """Importance of every stored slot [B, Hkv, L] (higher is kept first)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score() or compress()")

    def layer_budget(self, layer: int) -> Tensor:
        """Tokens per KV head of `layer` for each batch row [B]."""
        assert self.budget_tokens is not None
        if self.layer_weights is None:
            return self.budget_tokens
        weights = self.layer_weights.to(self.budget_tokens.device)
        return split_across_layers(self.budget_tokens * len(self.layers), weights)[:, layer]

    def protection(self, layer: int, budget: Tensor) -> tuple[int | Tensor, int | Tensor]:
        """(sink, window): how many first / last valid tokens of each head are always kept."""
        return self.sink, self.window

    def compress(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        """Scorer contract: score the stored slots, pick the keep-set, evict the rest."""
        entry = self.layers[layer]
        assert entry is not None
        budget = self.layer_budget(layer)
        if bool((entry.valid.sum(-1) <= budget[:, None]).all()):
            return  # everything fits: the cache stays exactly the full cache
        scores = self.score(layer, queries, query_positions)
        index, count = self.select(layer, scores, budget)
        self.evict(layer, index, count)

    def select(self, layer: int, scores: Tensor, budget: Tensor) -> tuple[Tensor, Tensor]:
        """Keep-set rule: protected sinks/window first, then the best scores, per head budget."""
        entry = self.layers[layer]
        assert entry is not None
        cap = torch.minimum(budget[:, None].expand_as(entry.lengths), entry.valid.sum(-1))
        sink, window = self.protection(layer, budget)
        scores = protect(scores, entry.valid, cap, sink, window)
        if self.split == "global":
            cap = global_head_counts(scores, budget, self.floor)
        return topk_slots(scores, cap)

    def evict(self, layer: int, index: Tensor, count: Tensor) -> None:
        """Apply a keep-set (override to merge or quantize what is dropped)."""
        self.keep(layer, index, count)

    # ------------------------------------------------------------------ helpers
    def attention_received(
        self,
        layer: int,
        queries: Tensor,
        query_positions: Tensor,
        last: int | None = None,
        weights: Tensor | None = None,
        chunk: int = 256,
    ) -> Tensor:
        """Softmax attention every stored slot receives from this step's queries (the `last`
        ones when given), summed over those queries: [B, Hkv, G, L]. Padding queries give
        nothing; `weights` [B, T'] rescales each query. A decode step whose attention kernel kept the
        probabilities (`keeps_probs`) returns those; the kernels (`window_attention_sums`) compute it where the
        switch wants them; the torch reference takes the queries `chunk` at a time, so a long prompt never
        materialises its full [T, L] probabilities."""
        entry = self.layers[layer]
        assert entry is not None and self.step_valid is not None
        w = self.step_valid.to(entry.keys.dtype)
        if last is not None:
            queries, query_positions, w = queries[:, :, -last:], query_positions[:, -last:], w[:, -last:]
        if weights is not None:
            w = w * weights
        kept = self.kept_probs(layer, queries)
        if kept is not None:
            return kept * w.float()[:, None, None, :]
        if wanted(queries, entry.keys):
            return window_attention_sums(
                queries, entry.keys, query_positions, entry.positions, entry.valid, w.float(), self.sliding_window,
                use_kernels=True,
            )  # fmt: skip
        total = entry.keys.new_zeros(
            entry.keys.shape[0],
            entry.keys.shape[1],
            queries.shape[1] // entry.keys.shape[1],
            entry.capacity,
            dtype=torch.float32,
        )
        slots = torch.arange(entry.capacity, device=entry.keys.device)
        for start in range(0, queries.shape[2], chunk):
            part = slice(start, start + chunk)
            # Slots are kept in position order, so no query of this chunk sees past the last slot
            # at or before its latest position: the causal upper triangle is never computed.
            seen = entry.valid & (entry.positions <= query_positions[:, part].max())
            cut = int(torch.where(seen, slots, -1).max()) + 1
            if cut == 0:
                continue
            p = attention_probs(
                queries[:, :, part],
                entry.keys[:, :, :cut],
                query_positions[:, part],
                entry.positions[:, :, :cut],
                entry.valid[:, :, :cut],
                self.sliding_window,
            )
            # [B, 1, 1, 1, T'] @ [B, Hkv, G, T', L]: a weighted sum over queries without permuting p
            total[..., :cut] += torch.matmul(w[:, part].float()[:, None, None, None, :], p).squeeze(3)
        return total

    def kept_probs(self, layer: int, queries: Tensor) -> Tensor | None:
        """The probabilities [B, Hkv, G, L] this decode step's attention kernel kept (`keeps_probs`) for the step's
        one query over the stored keys, or None (another step, more queries, or the keys changed since)."""
        kept, entry = self.step_probs[layer], self.layers[layer]
        if kept is None or entry is None or kept[0] is not entry.keys or queries.shape[2] != 1:
            return None
        return kept[1]

    def step_attention(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        """Softmax attention [B, Hkv, G, T, L] of this step's queries over the stored layer (`attention_probs`, or
        what the decode step's attention kernel kept)."""
        kept = self.kept_probs(layer, queries)
        if kept is not None:
            return kept[:, :, :, None]
        entry = self.layers[layer]
        assert entry is not None
        return attention_probs(queries, entry.keys, query_positions, entry.positions, entry.valid, self.sliding_window)

    def attended_tokens(self, layer: int) -> Tensor:
        """Valid tokens attention read in `layer` on the last forward [B, Hkv]."""
        tokens = self.read_tokens[layer]
        if tokens is None:
            raise ValueError(f"layer {layer} has not run attention yet")
        return tokens


def group_queries(queries: Tensor, n_kv_head: int) -> Tensor:
    """[B, Hq, T, D] -> [B, Hkv, G, T, D]: the query heads that share each KV head."""
    b, hq, t, d = queries.shape
    return queries.view(b, n_kv_head, hq // n_kv_head, t, d)


@torch.no_grad()
def prefill_in_chunks(
    model: Transformer, input_ids: Tensor, cache: KVCache, chunk_size: int, attention_mask: Tensor | None = None
) -> Tensor:
    """Block-wise prefill: feed the prompt `chunk_size` tokens at a time, so a method with
    `compress_chunks` keeps memory bounded by budget + chunk. Returns the last logits [B, 1, V]."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = None
    for start in range(0, t, chunk_size):
        part = slice(start, start + chunk_size)
        logits = model(
            input_ids[:, part],
            cache=cache,
            positions=positions[:, part],
            attention_mask=attention_mask[:, part],
            last_only=True,
        )
    assert logits is not None, "empty prompt"
    return logits
