"""MPCache (Zeng et al., arXiv 2501.06807): MPC-friendly KV-cache eviction, plaintext reference.

Tokens fall into three groups: useful to every query (kept), useless to every query
(evicted once, at the prompt) and useful to some (picked per decode step). Hence:

1. Look-once static eviction, once after the prompt's attention. The last
   `window_ratio` (20%; 10% above `long_prompt` = 24,000 tokens) of the prompt's queries
   vote: a token's score is its softmax attention from those queries averaged over all
   heads and summed over the window (`static_scores`). One keep-set per layer, shared by
   its heads. We keep a FIXED count, max(budget, static_ratio x prompt length), rather
   than the released code's data-dependent threshold, because under MPC the count is
   revealed when the cache is compacted (the paper's threat model makes it public); the
   first `sink` and last `window` tokens (one 16-token cluster each) are always kept.
   Tokens generated later are never statically evicted.
2. Hierarchical clustering: the retained slots form contiguous clusters of
   `cluster_size` (32) tokens, each split into two sub-clusters of `subcluster_size` (16);
   no k-means, so a cluster's keys summary is an elementwise max/min over its slots.
3. MPC-friendly similarity: a cluster scores q . (alpha r_max + (1 - alpha) r_min),
   alpha = 0.6 (`approx_similarity`): one matrix-vector product with a per-cluster
   representative, no max and no comparison, unlike Quest's bound sum_c max(q_c r_max,
   q_c r_min). With grouped-query attention the group's queries are summed (the score is
   linear in q, so this is the sum of the heads' scores).
4. Query-aware dynamic selection at every decode step, per KV head (`select_clusters`):
   keep a `ratio1` (0.5) share of the 32-token clusters (at least enough parents for
   level 2), then among their 16-token children the budget // 16 best. The first and the
   last cluster (attention sinks; newest and generated tokens) are always selected at
   both levels. Attention reads only the selected sub-clusters.
5. Cross-layer index sharing: adjacent layers' selections overlap, so between the first
   `own_first` (2) and last `own_last` (2) layers each odd layer reuses both the static
   keep-set and the dynamic selection of the even layer before it (`sharing_pairs`).

Every step is a plain tensor function so the MPC implementation can mirror it one to one.

Where our defaults differ from the paper (MPCacheKnobs.paper() restores its choices), measured on the bundled
model, passkey + NIAH at 1024 and 2048 tokens, budget 10%, 8 samples each (`python -m bench.accuracy --methods
mpcache --tasks passkey,niah --lengths 1024,2048 --budgets 0.1 --samples 8 --method-kwargs ...`):
* similarity "bound": Quest's box bound sum_c max(q_c r_max, q_c r_min), written linearly as
  q . r_min + (q [q >= 0]) . (r_max - r_min) (`bound_similarity`); under MPC one comparison per query channel
  (not per token or cluster) and one product, as cheap as the blend. The blend is sign-blind: a negative query
  channel meets 0.6 r_max where the bound uses r_min. Paper choices: 0.25 / 0.00 (passkey / NIAH, 2048, 4
  samples); "bound" alone 0.62 / 0.50 (8 samples, 1024 and 2048).
* static_pool 15: a token's static vote is summed with its 7 neighbours on each side (`window_sum`, local on
  shares). Per-token votes evict needle digits that the question does not attend to yet (the needle's worst
  digit ranked in the bottom half of some layer in 8 of 8 prompts); pooled, the needle is kept as a span.
  "bound" + pool 15: 1.00 / 1.00.
* topk "bucket": each level picks the best cluster of each of k strided buckets {i : i mod k = b} instead of the
  exact top k (`bucket_top`): m comparisons instead of m^2 / 2 under MPC, and the one-hots are the gather matrix.
  "bound" + pool 15 + bucket: 1.00 / 1.00.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import approx_similarity
from mpcache.methods.base import (
    Budget,
    PolicyCache,
    chunk_min_max,
    chunks_to_slots,
    group_queries,
    mask_to_index,
    top_mask,
)
from mpcache.model.cache import LayerKV


def observation_window(
    prompt_length: int, ratio: float = 0.2, long_prompt: int = 24_000, long_ratio: float = 0.1, most: int = 0
) -> int:
    """Number of the prompt's last queries that vote in static eviction (>= 1): a share of the prompt, at most
    `most` queries when `most` > 0 (a public count either way)."""
    w = max(1, int(prompt_length * (long_ratio if prompt_length > long_prompt else ratio)))
    return min(w, most) if most > 0 else w


def static_scores(received: Tensor, per_head: bool = False) -> Tensor:
    """Head-averaged attention [B, L] from the window's attention summed per head [B, Hkv, G, L] (one keep-set per
    layer), or with `per_head` averaged over each KV head's query heads only, [B, Hkv, L] (a keep-set per KV
    head)."""
    return received.mean(2) if per_head else received.mean((1, 2))


def window_sum(scores: Tensor, kernel: int) -> Tensor:
    """Sum of each slot's static score with its neighbours within kernel // 2 on either side (zeros beyond the
    ends): a needle is kept or evicted as a span, following MPCache's token-locality observation (SnapKV pools its
    votes the same way). Written with cumsum and a public gather, so it is local on secret shares too."""
    if kernel <= 1:
        return scores
    length, r = scores.shape[-1], kernel // 2
    index = torch.arange(length, device=scores.device if isinstance(scores, Tensor) else None)  # shares: CPU
    upper, lower = (index + r).clamp(max=length - 1), (index - r).clamp(min=0)
    csum = scores.cumsum(-1)  # sum over [lower, upper] = csum[upper] - csum[lower] + scores[lower]
    return csum.index_select(-1, upper) - csum.index_select(-1, lower) + scores.index_select(-1, lower)


def sign_split(queries: Tensor) -> Tensor:
    """[sum_g q_g, sum_g q_g [q_g >= 0]] over a group of queries [B, H, G, D] -> [B, H, 2, D]: the two vectors the
    box bound needs (`bound_similarity`); under MPC one comparison per query channel, not per token."""
    return torch.stack([queries.sum(2), (queries * (queries >= 0)).sum(2)], 2)


def bound_similarity(split: Tensor, kmax: Tensor, kmin: Tensor) -> Tensor:
    """Quest's box bound sum_c max(q_c kmax_c, q_c kmin_c), summed over the group's query heads, written linearly:
    q . kmin + (q [q >= 0]) . (kmax - kmin). split [B, H, 2, D] (`sign_split`), clusters [B, H, C, D] -> [B, H, C].
    Sign-aware, unlike the alpha blend: a negative query channel meets the cluster's min, a positive one its max."""
    return torch.einsum("bhd,bhcd->bhc", split[:, :, 0], kmin) + torch.einsum(
        "bhd,bhcd->bhc", split[:, :, 1], kmax - kmin
    )


SIMILARITIES = ("linear", "bound", "exact")
GROUPS = ("sum", "max", "centered")


def combine_heads(scores: Tensor, group: str, candidates: Tensor) -> Tensor:
    """One score per cluster [B, H, C] from each query head's [B, H, G, C]: "sum", "max" (a cluster matters if one
    head needs it, as Quest takes it), or "centered": the max over heads of each head's score minus that head's
    best score over the candidate clusters `candidates` [B, H, C] (the middle ones: the first and last are always
    read), so heads of different logit scales compete on how close a cluster comes to their own best (each
    head's best candidate scores 0). Under MPC "max" costs G - 1
    comparisons per cluster, "centered" another C per head."""
    if group == "sum":
        return scores.sum(2)
    if group == "centered":
        peak = scores.masked_fill(~candidates[:, :, None], float("-inf")).amax(-1, keepdim=True)
        scores = scores - peak.clamp(min=torch.finfo(scores.dtype).min)
    return scores.amax(2)


def exact_similarity(
    queries: Tensor, keys: Tensor, valid: Tensor, size: int, group: str = "sum", candidates: Tensor | None = None
) -> Tensor:
    """The ablation without approximation: max over each chunk's keys of q . k per query head, combined over the
    group's heads (`combine_heads`): queries [B, H, G, D], keys [B, H, L, D] -> [B, H, C]. Under MPC: the product
    over every cached key (as full attention's scores) plus a comparison tree per chunk."""
    scores = torch.einsum("bhgd,bhld->bhlg", queries, keys)
    per_head, _, chunks = chunk_min_max(scores, valid, size)
    return combine_heads(per_head.transpose(-1, -2), group, middle(chunks) if candidates is None else candidates)


def cluster_similarity(
    queries: Tensor,
    kmax: Tensor,
    kmin: Tensor,
    alpha: float,
    similarity: str,
    group: str = "sum",
    candidates: Tensor | None = None,
) -> Tensor:
    """Cluster scores [B, H, C] of a group of queries [B, H, G, D]. group "sum": the score of the group's summed
    query (both scores are linear in the query, or in its sign split), one product. Otherwise every query head
    scores on its own (G products) and `combine_heads` combines them ("centered": over the `candidates` [B, H, C],
    all by default). "exact" needs the keys: see exact_similarity."""
    if group != "sum":
        b, h, g, d = queries.shape
        alone = queries.reshape(b, h * g, 1, d)
        spread = lambda x: x.repeat_interleave(g, 1)  # noqa: E731  KV head h serves query heads h*g .. h*g + g - 1
        scores = cluster_similarity(alone, spread(kmax), spread(kmin), alpha, similarity).unflatten(1, (h, g))
        if candidates is None:
            candidates = torch.ones_like(scores[:, :, 0], dtype=torch.bool)
        return combine_heads(scores, group, candidates)
    if similarity == "linear":
        return approx_similarity(queries.sum(2), kmax, kmin, alpha)
    return bound_similarity(sign_split(queries), kmax, kmin)


def ends(nonempty: Tensor) -> Tensor:
    """The first and last non-empty cluster of every head [B, H, C] (always read)."""
    index = torch.arange(nonempty.shape[-1], device=nonempty.device).expand_as(nonempty)
    first = torch.where(nonempty, index, nonempty.shape[-1]).amin(-1, keepdim=True)
    last = torch.where(nonempty, index, -1).amax(-1, keepdim=True)
    return ((index == first) | (index == last)) & nonempty


def middle(nonempty: Tensor) -> Tensor:
    """The non-empty clusters between the ends: the candidates selection chooses among."""
    return nonempty & ~ends(nonempty)


def force_ends(scores: Tensor, nonempty: Tensor) -> Tensor:
    """Scores with the first and last non-empty cluster of every head at +inf, empty ones at -inf."""
    scores = scores.masked_fill(~nonempty, float("-inf"))
    return scores.masked_fill(ends(nonempty), float("inf"))


LIFT = 1.0e4  # pushes an ineligible child below every eligible one (|q . r| stays far below it), as under MPC


def bucket_top(scores: Tensor, k: int) -> Tensor:
    """Bool mask [..., m] of the best entry of each of k strided buckets {i : i mod k = b} (first index on ties):
    an approximate top-k that costs m comparisons under MPC (one argmax tournament per bucket, and the one-hots
    are the gather matrix) instead of the m^2 / 2 of a secret rank. Strided, so neighbouring clusters (which tend
    to matter together) compete in different buckets."""
    m = scores.shape[-1]
    if k >= m:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    s = -(-m // k)
    padded = torch.nn.functional.pad(scores, (0, s * k - m), value=float("-inf")).unflatten(-1, (s, k))
    index = padded.argmax(-2) * k + torch.arange(k, device=scores.device)  # bucket b's first entry b < m wins ties
    return mask.scatter(-1, index, True)


def _bucket_levels(
    parent_scores: Tensor,
    child_scores: Tensor,
    nonempty1: Tensor,
    nonempty2: Tensor,
    n_parent: Tensor,
    n_sub: Tensor,
    r: int,
) -> tuple[Tensor, Tensor]:
    """select_clusters' two levels with bucket_top (per row and head: the public counts may differ per row). The
    first and last cluster are always chosen at both levels; children of unchosen parents are lowered by LIFT. r:
    children per parent. Returns the chosen parents [B, H, C1] and children [B, H, C2]."""
    b, h, _ = child_scores.shape
    parents = torch.zeros_like(parent_scores, dtype=torch.bool)
    children = torch.zeros_like(child_scores, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            n1, n2 = int(nonempty1[i, j].sum()), int(nonempty2[i, j].sum())
            parents[i, j, :n1] = True
            if n1 > 2:
                parents[i, j, 1 : n1 - 1] = bucket_top(parent_scores[i, j, 1 : n1 - 1], int(n_parent[i, j]) - 2)
            eligible = parents[i, j, :n1].repeat_interleave(r)[:n2]
            lowered = child_scores[i, j, :n2] - LIFT * (~eligible).to(child_scores.dtype)
            children[i, j, :n2] = True
            if n2 > 2:
                children[i, j, 1 : n2 - 1] = bucket_top(lowered[1:-1], int(n_sub[i, j]) - 2)
    return parents, children


TOPKS = ("rank", "bucket")
STATIC_HEADS = ("layer", "kv")


def cluster_levels(
    queries: Tensor,
    keys: Tensor,
    valid: Tensor,
    tokens: Tensor,
    alpha: float = 0.6,
    cluster_size: int = 32,
    subcluster_size: int = 16,
    ratio1: float = 0.5,
    similarity: str = "linear",
    topk: str = "rank",
    group: str = "sum",
) -> tuple[Tensor, Tensor]:
    """Two-level query-aware selection: the chosen parent clusters [B, H, C1] and sub-clusters [B, H, C2] (bool;
    `select_clusters` turns the sub-clusters into slots).

    queries [B, H, G, D] (the query heads of each KV head); keys [B, H, L, D] with `valid` [B, H, L]; tokens [B]:
    per-head budget, so budget // subcluster_size (>= 2) sub-clusters are read. topk "rank": the exact top
    entries at both levels; "bucket": `bucket_top` at both levels. group: how the query heads of a KV head
    combine their cluster scores (`cluster_similarity`).
    """
    b, h = keys.shape[:2]
    n_sub = (tokens // subcluster_size).clamp(min=2)[:, None].expand(b, h)
    kmax, kmin, nonempty = chunk_min_max(keys, valid, cluster_size)

    def score(kmax: Tensor, kmin: Tensor, size: int, nonempty: Tensor) -> Tensor:
        if similarity == "exact":
            return exact_similarity(queries, keys, valid, size, group, middle(nonempty))
        return cluster_similarity(queries, kmax, kmin, alpha, similarity, group, middle(nonempty))

    parent_scores = force_ends(score(kmax, kmin, cluster_size, nonempty), nonempty)
    at_least = -(-(n_sub + 1) // 2)  # enough parents to hold n_sub children
    n_parent = torch.maximum(at_least, (ratio1 * nonempty.sum(-1)).floor().long())
    if topk == "bucket":
        kmax2, kmin2, nonempty2 = chunk_min_max(keys, valid, subcluster_size)
        child_scores = score(kmax2, kmin2, subcluster_size, nonempty2)
        n_sub = torch.minimum(n_sub, nonempty2.sum(-1))
        r = cluster_size // subcluster_size
        return _bucket_levels(parent_scores, child_scores, nonempty, nonempty2, n_parent, n_sub, r)
    parents = top_mask(parent_scores, n_parent)
    kmax, kmin, nonempty = chunk_min_max(keys, valid, subcluster_size)
    eligible = parents.repeat_interleave(cluster_size // subcluster_size, -1)[..., : nonempty.shape[-1]]
    child_scores = force_ends(score(kmax, kmin, subcluster_size, nonempty), nonempty)
    return parents, top_mask(child_scores.masked_fill(~eligible, float("-inf")), n_sub)


def select_clusters(
    queries: Tensor,
    keys: Tensor,
    valid: Tensor,
    tokens: Tensor,
    alpha: float = 0.6,
    cluster_size: int = 32,
    subcluster_size: int = 16,
    ratio1: float = 0.5,
    similarity: str = "linear",
    topk: str = "rank",
    group: str = "sum",
) -> Tensor:
    """The slots [B, H, L] (bool) of the sub-clusters `cluster_levels` chooses: what attention reads."""
    _, children = cluster_levels(
        queries, keys, valid, tokens, alpha, cluster_size, subcluster_size, ratio1, similarity, topk, group
    )
    return chunks_to_slots(children, valid, subcluster_size)


def sharing_pairs(n_layer: int, own_first: int = 2, own_last: int = 2) -> dict[int, int]:
    """{layer: layer it reuses}: between the first `own_first` and the last `own_last`
    layers, every second layer reuses the one before it (32 layers: 3 <- 2, ..., 29 <- 28)."""
    return {layer: layer - 1 for layer in range(own_first + 1, n_layer - own_last, 2)}


@dataclass(frozen=True)
class MPCacheKnobs:
    """Every MPCache knob with its default, shared by the plaintext reference (MPCache) and the private version
    (mpcache.mpc.caches.mpcache.PrivateMPCache); validated once, here. Defaults from the paper / authors' code
    (module docstring) except `similarity`, see there."""

    static_ratio: float = 0.5  # prompt share kept by look-once static eviction (at least the budget)
    window_ratio: float = 0.2  # share of the prompt's last queries that vote in static eviction
    window_queries: int = 0  # at most this many of them vote (0: no cap)
    static_heads: str = "layer"  # one static keep-set per "layer" (the paper) or per "kv" head
    static_pool: int = 15  # votes summed over this many neighbouring slots (odd; the paper: 1, per token)
    long_prompt: int = 24_000  # above this prompt length the window share is long_window_ratio
    long_window_ratio: float = 0.1
    alpha: float = 0.6  # blend of the linearised similarity: alpha r_max + (1 - alpha) r_min
    similarity: str = "bound"  # "bound" (Quest's box bound via the sign split) or "linear" (the paper's blend)
    topk: str = "bucket"  # "bucket" (best of k strided buckets: linear cost) or "rank" (exact top-k, the paper)
    group: str = "sum"  # query heads of a KV head: "sum" their cluster scores (the paper), "max" or "centered"
    cluster_size: int = 32  # parent clusters (tokens)
    subcluster_size: int = 16  # child clusters (tokens): the unit attention reads
    ratio1: float = 0.5  # share of parents kept at level 1
    share_layers: bool = True  # cross-layer index sharing
    own_first: int = 2  # leading layers that always select on their own
    own_last: int = 2  # trailing layers that always select on their own
    sink: int = 16  # first tokens always kept by static eviction
    window: int = 16  # last prompt tokens always kept by static eviction

    def __post_init__(self) -> None:
        for f in fields(self):  # a knob from a request (a private job's JSON) must have its field's exact type
            value, kind = getattr(self, f.name), type(f.default)
            if kind is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            else:  # int must not be a float (32.0) or a bool; bool and str as they are
                ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not ok:
                raise ValueError(f"knob {f.name} must be {'a finite number' if kind is float else kind.__name__}, "
                                 f"got {value!r}")  # fmt: skip
        for label in ("static_ratio", "window_ratio", "long_window_ratio", "ratio1"):
            value = getattr(self, label)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{label} must be in (0, 1], got {value}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.topk not in TOPKS:
            raise ValueError(f"topk must be one of {TOPKS}, got {self.topk!r}")
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")
        if self.subcluster_size < 1 or self.cluster_size % self.subcluster_size:
            raise ValueError(
                f"cluster_size ({self.cluster_size}) must be a multiple of subcluster_size ({self.subcluster_size})"
            )
        if min(self.own_first, self.own_last, self.sink, self.window) < 0:
            raise ValueError("own_first, own_last, sink and window must be >= 0")
        if self.static_pool < 1 or self.static_pool % 2 == 0:
            raise ValueError(f"static_pool must be an odd int >= 1, got {self.static_pool}")
        if self.window_queries < 0:
            raise ValueError(f"window_queries must be >= 0, got {self.window_queries}")
        if self.static_heads not in STATIC_HEADS:
            raise ValueError(f"static_heads must be one of {STATIC_HEADS}, got {self.static_heads!r}")
        if self.long_prompt < 1:
            raise ValueError(f"long_prompt must be >= 1, got {self.long_prompt}")

    @classmethod
    def paper(cls, **overrides) -> MPCacheKnobs:
        """The paper's choices where ours differ: linearised similarity, per-token static votes, exact top-k."""
        return cls(**{"similarity": "linear", "static_pool": 1, "topk": "rank", **overrides})

    @classmethod
    def retrieval(cls, **overrides) -> MPCacheKnobs:
        """For a real pretrained model (SmolLM2-135M: 64-dim heads, 3 query heads per KV head), where the defaults
        lose the needle (bench/mpcache_diagnose.py): exact cluster scores (max q.k per sub-cluster, not a box
        bound), the best query head of a group ("max", not the sum), 16/8-token clusters, no static eviction and
        no cross-layer sharing. Under MPC the exact scores cost a product with every cached key and a comparison
        tree per sub-cluster (README, "MPCache on SmolLM2")."""
        return cls(**{"similarity": "exact", "group": "max", "cluster_size": 16, "subcluster_size": 8,
                      "static_ratio": 1.0, "share_layers": False, **overrides})  # fmt: skip

    def options(self) -> dict:
        """The knobs that differ from the defaults, as keyword options (what a registry name or a bench row
        needs to rebuild these knobs)."""
        default = MPCacheKnobs()
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)
        }

    @classmethod
    def split(cls, options: dict) -> tuple[MPCacheKnobs, dict]:
        """(knobs, the remaining options) from keyword options."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names}), {
            k: v for k, v in options.items() if k not in names
        }


class MPCache(PolicyCache):
    """budget: tokens each KV head reads per decode step (int, or a ratio of the prompt).

    static_ratio: prompt share kept by static eviction (at least the budget); 0.5 follows
    the authors' fixed-ratio variant ("fix the static ratio"; the threshold variant kept
    15-50% depending on the dataset). Other knobs and defaults as in the module docstring.
    """

    name: ClassVar[str] = "mpcache"

    Knobs: ClassVar[type] = MPCacheKnobs  # the registry accepts these fields as options

    def __init__(self, n_layer: int, budget: Budget, **options) -> None:
        knobs, common = MPCacheKnobs.split(options)
        super().__init__(n_layer, budget, sink=knobs.sink, window=knobs.window, **common)
        self.knobs = knobs
        self.shared_from = sharing_pairs(n_layer, knobs.own_first, knobs.own_last) if knobs.share_layers else {}
        self.static_kept: list[tuple[Tensor, Tensor] | None] = [None] * n_layer
        self.selected: list[tuple[Tensor, Tensor] | None] = [None] * n_layer

    # ------------------------------------------------------ 1. static eviction
    def layer_budget(self, layer: int) -> Tensor:
        assert self.budget_tokens is not None and self.prompt_lengths is not None
        by_ratio = (self.prompt_lengths.double() * self.knobs.static_ratio).floor().long()
        return torch.maximum(self.budget_tokens, by_ratio)

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        assert self.prompt_lengths is not None
        k = self.knobs
        windows = torch.tensor(
            [
                observation_window(int(n), k.window_ratio, k.long_prompt, k.long_window_ratio, k.window_queries)
                for n in self.prompt_lengths.tolist()
            ],
            device=queries.device,
        )
        w = min(int(windows.max()), queries.shape[2])
        own = torch.arange(w, device=queries.device) >= w - windows[:, None]  # [B, W]: each row's own window
        received = self.attention_received(layer, queries, query_positions, last=w, weights=own.float())
        pooled = window_sum(static_scores(received, k.static_heads == "kv"), k.static_pool)
        return pooled if pooled.dim() == 3 else pooled[:, None, :].expand(-1, received.shape[1], -1)

    def compress(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        source = self.shared_from.get(layer)
        if source is None:
            super().compress(layer, queries, query_positions)
            return
        kept = self.static_kept[source]  # reuse the previous layer's keep-set (None: it kept everything)
        if kept is not None:
            self.keep(layer, *kept)
        self.static_kept[layer] = kept

    def evict(self, layer: int, index: Tensor, count: Tensor) -> None:
        self.static_kept[layer] = (index, count)
        super().evict(layer, index, count)

    # ---------------------------------------------------- 4. dynamic selection
    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        super().observe(layer, queries, query_positions)
        self.selected[layer] = None
        if self.forwards[layer] == 0 or queries.shape[2] != 1:
            return  # the prompt (and any later block) attends densely
        source = self.shared_from.get(layer)
        if source is not None:
            self.selected[layer] = self.selected[source]
            return
        entry = self.layers[layer]
        assert entry is not None and self.budget_tokens is not None
        fits = entry.valid.sum(-1) <= self.budget_tokens[:, None]  # such heads read everything
        if bool(fits.all()):
            return
        with torch.no_grad():
            mask = self.choose(entry, queries, query_positions)
        self.selected[layer] = mask_to_index(mask | (entry.valid & fits[..., None]))

    def choose(self, entry: LayerKV, queries: Tensor, query_positions: Tensor) -> Tensor:
        """The slots [B, Hkv, L] (bool) a decode step's queries [B, Hq, 1, D] read from a layer's own cache."""
        assert self.budget_tokens is not None
        k = self.knobs
        return select_clusters(
            group_queries(queries, entry.keys.shape[1])[:, :, :, 0],
            entry.keys,
            entry.valid,
            self.budget_tokens,
            k.alpha,
            k.cluster_size,
            k.subcluster_size,
            k.ratio1,
            k.similarity,
            k.topk,
            k.group,
        )
