"""EpiCache (Kim et al., arXiv 2509.17396): an episode-specific cache for conversational QA.

The conversation history is cut into segments, embedded and clustered (k-means) into
`n_episodes` episodes; the question is routed to the episode whose centroid has the
largest dot product with its embedding. The history is then prefilled block by block
(`episodic_prefill`) and after every block each layer is evicted back to its budget by
the episode's "patched prompt", its `n_medoid` segments closest to the centroid in
chronological order: a slot's score is the largest softmax attention any patched-prompt
query (placed after the context) of the KV head's query group gives it, the softmax
taken over the cached keys only (KVzip's score). By default a layer's Hkv x budget slots
go to the best scores over all its heads (EpiCache's "pair" level, `split="global"`,
`floor=0`; `split="uniform"` is its "pair-uniform"). With `layer_similarity` (from
`layer_similarity()`, EpiCache's block-prefill sensitivity profile) the layer budgets
follow the official code's power law. Decoding appends without eviction.

Adaptations to a per-request cache (EpiCache builds all E caches offline and reuses
them across questions; this builds the one the request's question is routed to):
- The question is the prompt's last `question_tokens` tokens; they are always kept.
- Segments are fixed runs of `segment_size` tokens (the cache sees no utterance
  boundaries) embedded by the mean of their layer-0 attention inputs (the normalised
  token embeddings: EpiCache's "llm" embedding option; it recommends a sentence encoder).
- The patched prompt is not re-run after an instruction: `episodic_prefill` encodes it on
  its own once, and a one-shot prefill (`generate`) reuses the prompt's own layer inputs
  of those tokens; either way its queries are rotated to positions after the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.kernels import attention_probs
from mpcache.methods.base import Budget, PolicyCache, mask_to_index, prefill_in_chunks
from mpcache.model.cache import KVCache, LayerKV
from mpcache.model.transformer import Attention, Transformer, apply_rope


# ------------------------------------------------------------------ episodes
def kmeans(x: Tensor, k: int, seed: int, n_init: int = 10, iters: int = 100) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding, best of `n_init` runs by inertia (as
    scikit-learn's KMeans): (centroids [k, D], labels [N]). Needs k <= N."""
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= points, got k={k} for {x.shape[0]} points")
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(n_init):
        centres = x[torch.randint(x.shape[0], (1,), generator=g)]
        for _ in range(1, k):  # k-means++: next centre drawn in proportion to the squared distance
            d2 = torch.cdist(x, centres).min(-1).values ** 2
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=g) if d2.sum() > 0 else torch.tensor([0])
            centres = torch.cat([centres, x[pick]])
        for _ in range(iters):
            labels = torch.cdist(x, centres).argmin(-1)
            moved = torch.stack([x[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
            if torch.equal(moved, centres):
                break
            centres = moved
        labels = torch.cdist(x, centres).argmin(-1)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centres, labels)
    assert best is not None
    return best[1].float(), best[2]


@dataclass
class Plan:
    """One row's episodes: centroids [E, D], the label of every segment [S], the question's
    episode, and the patched prompt as indices into the row's valid tokens (in order)."""

    centroids: Tensor
    labels: Tensor
    episode: int
    patched: Tensor


def plan_episodes(
    hidden: Tensor, segment_size: int, n_episodes: int, n_medoid: int, question_tokens: int, seed: int
) -> Plan:
    """Segment, embed, cluster and route one row: hidden [T, d] = its valid tokens' layer-0 inputs."""
    history = hidden[: max(hidden.shape[0] - question_tokens, 0)]
    if history.shape[0] == 0:
        return Plan(
            hidden.new_zeros(0, hidden.shape[-1]), torch.zeros(0, dtype=torch.long), 0, torch.zeros(0, dtype=torch.long)
        )
    segments = history.split(segment_size)
    emb = F.normalize(torch.stack([s.mean(0) for s in segments]), dim=-1)
    centroids, labels = kmeans(emb, min(n_episodes, len(segments)), seed)
    question = F.normalize(hidden[history.shape[0] :].mean(0), dim=-1) if question_tokens else emb[-1]
    episode = int((centroids @ question).argmax())
    members = (labels == episode).nonzero().flatten()
    closeness = emb[members] @ centroids[episode] / centroids[episode].norm().clamp(min=1e-12)
    chosen = members[closeness.argsort(descending=True)[:n_medoid]].sort().values  # chronological
    patched = torch.cat([torch.arange(int(c) * segment_size, int(c) * segment_size + len(segments[c])) for c in chosen])
    return Plan(centroids, labels, episode, patched)


def layer_input(model: Transformer, input_ids: Tensor, positions: Tensor) -> Tensor:
    """What the first attention layer reads [B, T, d_model] (its `observe_hidden` argument)."""
    x = model.tok_emb(input_ids)
    if model.config.family == "gpt2":
        x = x + model.pos_emb(positions)
    return model.blocks[0].attn_norm(x)


# --------------------------------------------------------------- layer budgets
def allocate_layer_budget(similarity: Tensor, budget: Tensor, alpha: float) -> Tensor:
    """Per-layer budgets [B, L] from per-layer key similarities [L] (the official code's
    form): min-max normalise, weight (1 - s)^alpha, floor(weight x L x M / sum), at least
    max(1, M // 4). alpha = 0 (or equal similarities) gives every layer M."""
    n = similarity.shape[0]
    spread = similarity.max() - similarity.min()
    if alpha == 0 or spread <= 0:
        return budget[:, None].expand(-1, n).clone()
    weight = (1 - (similarity.double().to(budget.device) - similarity.min()) / spread) ** alpha
    share = (weight / weight.sum())[None] * (n * budget.double())[:, None]
    return torch.maximum(share.floor().long(), (budget // 4).clamp(min=1)[:, None])


class _KeyRecorder(KVCache):
    """Records every key a layer computes, in order, whatever is later evicted."""

    def __init__(self, n_layer: int, sink: int = 0, keep: int | None = None) -> None:
        super().__init__(n_layer)
        self.seen: list[list[Tensor]] = [[] for _ in range(n_layer)]
        self.sink, self.keep_last = sink, keep

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> LayerKV:
        self.seen[layer].append(keys)
        return super().update(layer, keys, values, positions, valid)

    def after_attention(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        entry = self.layers[layer]
        if self.keep_last is None or entry is None:
            return
        end = int(query_positions.max()) + 1  # block prefill: sinks and the last part of this block stay
        self.keep(
            layer,
            *mask_to_index(entry.valid & ((entry.positions < self.sink) | (entry.positions >= end - self.keep_last))),
        )


@torch.no_grad()
def layer_similarity(
    model: Transformer, input_ids: Tensor, block: int = 4096, sink: int = 128, keep: float = 0.5, window: int = 100
) -> list[float]:
    """EpiCache's sensitivity profile: per layer, the mean cosine similarity (over heads and
    `window`-token windows) of the keys of a full causal pass and of a block-prefill pass in
    which each `block` attends to itself, the first `sink` tokens and the last `keep` share
    of the previous block. input_ids [1, T], one long sample."""
    n = model.config.n_layer
    full, blocked = _KeyRecorder(n), _KeyRecorder(n, sink, int(keep * block))
    model(input_ids, cache=full, last_only=True)
    prefill_in_chunks(model, input_ids, blocked, block)
    out = []
    for layer in range(n):
        a, b = torch.cat(full.seen[layer], 2)[0], torch.cat(blocked.seen[layer], 2)[0]  # [Hkv, T, D]
        sims = [
            F.cosine_similarity(a[:, s : s + window].flatten(1), b[:, s : s + window].flatten(1), -1)
            for s in range(0, a.shape[1], window)
        ]
        out.append(float(torch.stack(sims).mean()))
    return out


# ---------------------------------------------------------------------- policy
class EpiCache(PolicyCache):
    """segment_size: tokens per history segment (64); n_episodes: k-means clusters (4, the
    official default); n_medoid: segments in the patched prompt (4, the official args;
    its scripts use 8); question_tokens: the prompt's tail routed and always kept (64);
    layer_similarity / alpha: per-layer key similarities from `layer_similarity()` and the
    power (1.1, the official LLaMA scripts; None: uniform budgets); seed: k-means seed (42)."""

    name: ClassVar[str] = "epicache"
    compress_chunks: ClassVar[bool] = True

    def __init__(
        self,
        n_layer: int,
        budget: Budget,
        *,
        segment_size: int = 64,
        n_episodes: int = 4,
        n_medoid: int = 4,
        question_tokens: int = 64,
        layer_similarity: Sequence[float] | None = None,
        alpha: float = 1.1,
        seed: int = 42,
        split: str = "global",
        floor: float = 0.0,
        **common,
    ) -> None:
        if "window" in common:
            raise TypeError("epicache always keeps the question: set `question_tokens`, not `window`")
        super().__init__(n_layer, budget, window=question_tokens, split=split, floor=floor, **common)
        for label, value in (("segment_size", segment_size), ("n_episodes", n_episodes), ("n_medoid", n_medoid)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        if layer_similarity is not None and (
            len(layer_similarity) == 0 or not all(-1 <= x <= 1 for x in layer_similarity)
        ):
            raise ValueError(f"layer_similarity must be cosine similarities in [-1, 1], got {list(layer_similarity)}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.segment_size, self.n_episodes, self.n_medoid = segment_size, n_episodes, n_medoid
        self.question_tokens, self.alpha, self.seed = question_tokens, alpha, seed
        self.similarity = None if layer_similarity is None else torch.tensor(list(layer_similarity))
        self.attention: list[Attention] = []
        self.hidden: list[Tensor | None] = [None] * n_layer
        self.plans: list[Plan] | None = None
        self.patched: list[Tensor | None] = [None] * n_layer  # [B, P, d_model] patched-prompt layer inputs
        self.patched_valid: Tensor | None = None  # [B, P]

    @classmethod
    def from_model(cls, model: Transformer, budget: Budget | None, **kwargs) -> EpiCache:
        cache = super().from_model(model, budget, **kwargs)
        assert isinstance(cache, EpiCache)
        if cache.similarity is not None and len(cache.similarity) != model.config.n_layer:
            raise ValueError(f"layer_similarity has {len(cache.similarity)} layers, the model {model.config.n_layer}")
        cache.attention = [block.attn for block in model.blocks]
        return cache

    # -------------------------------------------------------------- planning
    def plan(self, hidden: Tensor, valid: Tensor) -> None:
        """Episodes of every row from the layer-0 inputs [B, T, d] of its valid tokens."""
        self.plans = [
            plan_episodes(
                h[v].float().cpu(), self.segment_size, self.n_episodes, self.n_medoid, self.question_tokens, self.seed
            )
            for h, v in zip(hidden, valid, strict=True)  # planning is small and sequential: on the CPU
        ]
        longest = max(len(p.patched) for p in self.plans)
        self.patched_valid = torch.arange(longest) < torch.tensor([len(p.patched) for p in self.plans])[:, None]

    def gather_patched(self, hidden: Tensor, valid: Tensor) -> Tensor:
        """The patched-prompt tokens' rows of `hidden` [B, T, d] -> [B, P, d] (zeros as padding)."""
        assert self.plans is not None and self.patched_valid is not None
        out = hidden.new_zeros(hidden.shape[0], self.patched_valid.shape[1], hidden.shape[-1])
        for row, (plan, h, v) in enumerate(zip(self.plans, hidden, valid, strict=True)):
            out[row, : len(plan.patched)] = h[v][plan.patched.to(h.device)]
        return out

    def observe_hidden(self, layer: int, hidden: Tensor) -> None:
        self.hidden[layer] = hidden

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> LayerKV:
        entry = super().update(layer, keys, values, positions, valid)
        hidden, self.hidden[layer] = self.hidden[layer], None
        if hidden is None:
            raise ValueError(f"layer {layer}: update without observe_hidden (epicache embeds the layer inputs)")
        if self.plans is None:  # one-shot prefill: plan from the prompt itself
            self.plan(hidden, valid)
        if self.patched[layer] is None:
            self.patched[layer] = self.gather_patched(hidden, valid)
        return entry

    # --------------------------------------------------------------- scoring
    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        entry, patched = self.layers[layer], self.patched[layer]
        assert entry is not None and patched is not None and self.patched_valid is not None
        b, p, _ = patched.shape
        if p == 0:
            return torch.zeros(entry.valid.shape, device=entry.keys.device)
        attn = self.attention[layer]
        q = attn.q_proj(patched).view(b, p, attn.n_head, attn.head_dim).transpose(1, 2)
        after = entry.positions.masked_fill(~entry.valid, -1).amax((1, 2)) + 1  # the patched prompt follows the context
        qpos = after[:, None] + torch.arange(p, device=q.device)
        if attn.config.family == "llama":
            q = apply_rope(q, qpos, attn.inv_freq)
        probs = attention_probs(q, entry.keys, qpos, entry.positions, entry.valid, self.sliding_window)
        probs = probs * self.patched_valid[:, None, None, :, None].to(probs.device)
        return probs.amax((2, 3))

    def layer_budget(self, layer: int) -> Tensor:
        if self.similarity is None:
            return super().layer_budget(layer)
        assert self.budget_tokens is not None
        return allocate_layer_budget(self.similarity, self.budget_tokens, self.alpha)[:, layer]


@torch.no_grad()
def episodic_prefill(
    model: Transformer, input_ids: Tensor, cache: EpiCache, block_size: int, attention_mask: Tensor | None = None
) -> Tensor:
    """EpiCache's pipeline for one request: plan the episodes from the whole prompt's token
    embeddings, encode the routed episode's patched prompt on its own, then prefill block by
    block, evicting after every block. Returns the last logits [B, 1, V]."""
    if not isinstance(cache, EpiCache):
        raise TypeError(f"episodic_prefill needs an EpiCache, got {type(cache).__name__}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    valid = mask.bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache.plan(layer_input(model, input_ids, positions), valid)
    assert cache.plans is not None and cache.patched_valid is not None
    if cache.patched_valid.shape[1]:
        ids = input_ids.new_zeros(cache.patched_valid.shape)
        for row, plan in enumerate(cache.plans):
            ids[row, : len(plan.patched)] = input_ids[row][valid[row]][plan.patched.to(input_ids.device)]
        recorder = _HiddenRecorder(model.config.n_layer)
        model(ids, cache=recorder, attention_mask=cache.patched_valid.long().to(ids.device), last_only=True)
        cache.patched = recorder.hidden
    return prefill_in_chunks(model, input_ids, cache, block_size, attention_mask)


class _HiddenRecorder(KVCache):
    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self.hidden: list[Tensor | None] = [None] * n_layer

    def observe_hidden(self, layer: int, hidden: Tensor) -> None:
        self.hidden[layer] = hidden
