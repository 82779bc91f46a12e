"""MPCache on secret-shared keys and queries: the MPC side of mpcache/methods/mpcache.py.

Every step mirrors a plaintext function of the reference (imported, not re-derived) and is written against
mpcache.mpc.arith.numerics, so on float tensors it is the simulator and on MPCTensors it runs in 2PC. Knobs and their
defaults are one dataclass, mpcache.methods.mpcache.MPCacheKnobs. The parties learn public sizes only: the prompt
length, the fixed keep count, the cluster boundaries and how many clusters are read; never which tokens or clusters
(no value derived from a score is ever opened; a test counts openings).

1. Look-once static eviction (`static_keep`): the observation window's softmax attention summed over its queries
   and averaged over heads (`static_scores`), summed over neighbouring slots (`window_sum`, local), a FIXED public
   keep count (max(budget, static_ratio x prompt)), the first `sink` and last `window` tokens kept publicly, the
   rest ranked by `pairwise_rank` and compacted by one oblivious gather (a secret one-hot matrix times the cache).
   Done once per layer after the private prefill; quadratic in the prompt (one comparison batch of L^2 / 2).
2. Hierarchical clustering (`ClusterSummary`): contiguous 16-token children and 32-token parents with public
   boundaries; per-channel max/min by a comparison tree; a decode step's appended key changes only the last child
   and parent (one comparison batch).
3. Query-aware selection (`select`): cluster scores from one product of the complete clusters' representatives
   (`ClusterReps`, an append-only operand: each opened once, when its cluster fills) with the query: Quest's box
   bound via the sign split (`sign_split`: one comparison per query channel) by default, the paper's alpha blend
   with similarity="linear", or the exact max of q.k per cluster ("exact", the ablation: `exact_scores`). Top
   clusters at each level: `bucket_one_hot` (default: the best of k strided buckets, one argmax tournament per
   bucket, m comparisons; the one-hots are the gather matrix) or the exact top-k (`pairwise_rank` + `top_k_mask`
   + `compaction_matrix`: m^2 / 2 comparisons in 16 rounds). Children of unchosen parents are pushed down by a
   secret bit times a public constant; the first and last child are always read, publicly. The chosen middle
   children are gathered by the one-hot [k, C] times the middle children viewed as [C, 16 x (Dk + Dv)], an
   append-only operand too (`PrivateMPCache._middle_operand`): a step opens the one-hot, not the cache.
4. Cross-layer sharing (`sharing_pairs`): a reusing layer applies its source's secret compaction and selection
   matrices to its own cache.

The prompt's window attention for static eviction is recomputed in `after_attention` (the private attention does
not expose its probabilities), with the softmax of the model's PrivateOptions (the cache's `options`: the table exp
by default); its cost is that of the window's rows of the prefill attention.

Gathered slots' true positions are secret; they are only needed for causal visibility, which every cached token
passes at decode, so gathered slots carry the lowest position they could hold (a public lower bound). Models with
a sliding window would need the true positions: not supported.

Costs: `python -m bench.mpc_decode --method full,mpcache,...` (whole decode steps over gRPC, per operation class;
README "MPCache under MPC" and bench/results/mpc_decode_*.json); `python -m mpcache.mpc.caches.mpcache` prints
the per-piece costs of one layer's decode-step attention (select / update / attend against full attention, at
bundled-model shapes, two local parties) and of static eviction. Measured per layer at 2048 kept tokens (4 KV
heads, 2 query heads each), one decode step: sign split 9 rounds / 0.12 MB, score product 2 / 0.81 MB before ClusterReps
(now: the query only), parent buckets 19 / 0.12 MB, child buckets 29 / 0.23 MB. `_measure` at 2048 cached
tokens, budget 409, bound similarity, gather re-opened by plain Beaver in both: select 36.6 MB with the exact
top-k, 9.7 MB bucketed (2026-11-25).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mpcache.kernels import cluster_representatives, visibility
from mpcache.methods.mpcache import MPCacheKnobs, observation_window, sharing_pairs, static_scores, window_sum
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.arith.accounting import span
from mpcache.mpc.arith.append_only import AppendOnlyOperand
from mpcache.mpc.arith.numerics import Value
from mpcache.mpc.nn.layers import PrivateKVCache, PrivateLayerKV, PrivateOptions, attention_softmax, cached_attention

LIFT = 1.0e4  # pushes an ineligible cluster's score below every real score (|q . r| stays far below it)
# Comparison ranges (numerics.less_than; arith/compare.py: each sets the FSS ring width and is checked by the
# simulator). Keys, queries and their pairwise differences: numerics.VALUE_BOUND (2^15, n = 32). Cluster scores
# (|q . r| < 2^14 summed over a group) minus a LIFT penalty, or the bucket padding at -3 LIFT: differences below
# 3 LIFT + 2^14 < 2^16 (n = 33). Ranks and prefix counts are integers at scale 1: bounded by the item count.
SELECT_BOUND = 2.0**16


# ----------------------------------------------------------------------------------------------- secret top-k
def _index_add(x: Value, index: Tensor, n: int) -> Value:
    """out[..., m] = sum of x[..., p] over p with index[p] = m (local on shares; x holds integers at scale 1)."""
    if not N.is_private(x):
        return x.new_zeros(*x.shape[:-1], n).index_add_(x.dim() - 1, index, x)
    share = x.share.new_zeros(*x.shape[:-1], n).index_add_(x.dim() - 1, index, x.share)
    return N.MPCTensor.from_shares(share, precision=0)


def _take(x: Value, index: Tensor) -> Value:
    """x[..., index] along the last dim (public index)."""
    return x.index_select(x.dim() - 1, index)


def pairwise_rank(scores: Value, bound: float) -> Value:
    """Rank of every entry of each row [..., n] (0 = best; ties go to the lower index, as a stable sort): one
    comparison batch of the n(n-1)/2 pairwise differences (each below `bound`), the rest is local. Integers at
    scale 1."""
    n = scores.shape[-1]
    i, j = torch.triu_indices(n, n, 1)
    lower = N.lt(_take(scores, i), _take(scores, j), bound)  # [s_i < s_j] for every i < j
    # i is beaten by a later j when s_j > s_i, and by an earlier j unless s_j < s_i
    return _index_add(lower, i, n) - _index_add(lower, j, n) + torch.arange(n, dtype=torch.float64)


def top_k_mask(scores: Value, k: int, bound: float) -> Value:
    """Secret bits [..., n] of the k best entries of each row (public k, 0 < k < n; score differences below
    `bound`): rank, then [rank < k] (ranks are integers in [0, n): that comparison is on log2(n) + 2 bits)."""
    n = scores.shape[-1]
    if not 0 < k < n:
        raise ValueError(f"top-k needs 0 < k < n, got k={k}, n={n}")
    return N.less_than(pairwise_rank(scores, bound), [float(k)], float(n))[0]


def compaction_matrix(chosen: Value, k: int) -> Value:
    """Secret one-hot rows [..., k, n]: row j marks the j-th chosen item (in index order) of `chosen` [..., n], a
    row of 0/1 bits with exactly k ones. One comparison batch (2 k n), no product."""
    n = chosen.shape[-1]
    before = chosen.cumsum(-1) - chosen  # chosen items before i (exclusive prefix count)
    lifted = before + (1 - chosen) * (n + 1)  # an integer multiple of bits: local, exact
    diff = lifted.unsqueeze(-2) - torch.arange(k, dtype=torch.float64)[:, None]  # [..., k, n]
    # integers in [-(k - 1), n + 1 + k]: the comparison range is n + k + 2 at scale 1 (a few bits)
    bits = N.less_than(diff, [1.0, 0.0], float(n + k + 2))  # [v - j < 1], [v - j < 0]: v == j for integers
    return bits[0] - bits[1]


def oblivious_gather(chosen: Value, k: int, x: Value) -> Value:
    """The k chosen rows of x [..., n, F] (secret bits `chosen` [..., n]) in index order: one-hot [k, n] @ x."""
    return N.matmul(compaction_matrix(chosen, k), x)


def _mid_rows(x: Value, start: int, stop: int, dim: int) -> Value:
    return x.narrow(dim, start, stop - start)


# ------------------------------------------------------------------------------------- 1. static eviction
@dataclass
class StaticKeep:
    """A layer's static keep-set: public sink/window counts, how many middle slots stay, and their secret
    compaction (one-hot rows [B, 1, picks, L - sink - window]; None when all or none of the middle stays)."""

    sink: int
    window: int
    picks: int
    matrix: Value | None  # [B, 1 or Hkv, picks, L - sink - window]


def static_plan(length: int, keep: int, sink: int, window: int) -> tuple[int, int, int]:
    """(sink, window, middle picks) for a prompt of `length` kept to `keep` slots, as base.protect clamps them."""
    keep = min(keep, length)
    sink = min(sink, keep)
    window = min(window, keep - sink)
    return sink, window, keep - sink - window


def window_scores(
    queries: Value,
    keys: Value,
    query_positions: Tensor,
    key_positions: Tensor,
    per_head: bool = False,
    options: PrivateOptions | None = None,
) -> Value:
    """Head-averaged attention [B, L] the given (pre-scaled) queries [B, Hq, W, D] give every slot, summed over
    the queries, or with `per_head` averaged over each KV head's query heads, [B, Hkv, L] (plaintext:
    static_scores(attention_received)). The softmax is the one `options` choose (default PrivateOptions():
    the table exp), as the model's own attention."""
    options = options or PrivateOptions()
    b, hq, w, d = queries.shape
    hkv = keys.shape[1]
    q = queries.reshape(b, hkv, hq // hkv, w, d)
    scores = N.matmul(q, keys.unsqueeze(2).transpose(-1, -2))  # [B, Hkv, G, W, L]
    valid = torch.ones(b, hkv, keys.shape[2], dtype=torch.bool)
    visible = visibility(query_positions, key_positions, valid)
    probs = attention_softmax(scores, visible, None, options.score_range, options.nonlinear)
    received = probs.sum(3)  # [B, Hkv, G, L]
    if not N.is_private(received):
        return static_scores(received, per_head)
    if per_head:
        return N.divide(received.sum(2), hq // hkv)
    return N.divide(received.sum(1).sum(1), hq)  # static_scores' head mean, exactly


def static_keep(scores: Value, keep: int, sink: int, window: int, bound: float) -> StaticKeep:
    """Keep-set of a fixed public size from per-slot scores [B, L] (one for the layer) or [B, Hkv, L] (one per KV
    head), non-negative and below `bound`: sinks and window publicly, the best `keep - sink - window` of the rest
    secretly."""
    length = scores.shape[-1]
    sink, window, picks = static_plan(length, keep, sink, window)
    if picks == 0 or picks == length - sink - window:
        return StaticKeep(sink, window, picks, None)
    chosen = top_k_mask(_mid_rows(scores, sink, length - window, -1), picks, bound)
    matrix = compaction_matrix(chosen, picks)
    return StaticKeep(sink, window, picks, matrix.unsqueeze(1) if scores.dim() == 2 else matrix)


def compact(entry: PrivateLayerKV, plan: StaticKeep) -> PrivateLayerKV:
    """Apply a keep-set: [sinks, gathered middle, window], keys and values in one product."""
    length = entry.capacity
    lo, hi = plan.sink, length - plan.window
    if plan.picks == hi - lo:
        return entry
    dk = entry.keys.shape[-1]
    kv = N.cat([entry.keys, entry.values], -1)
    parts = [_mid_rows(kv, 0, lo, 2), _mid_rows(kv, hi, length, 2)]
    if plan.matrix is not None:
        parts.insert(1, N.matmul(plan.matrix, _mid_rows(kv, lo, hi, 2)))  # [B, H, picks, Dk + Dv]
    kv = N.cat([p for p in parts if p.shape[2] > 0], 2)
    positions = entry.positions[..., lo : lo + plan.picks]  # lower bounds of the true positions
    positions = torch.cat([entry.positions[..., :lo], positions, entry.positions[..., hi:]], 2)
    return PrivateLayerKV(kv[..., :dk], kv[..., dk:], positions, torch.ones_like(positions, dtype=torch.bool))


# ------------------------------------------------------------------------------------ 2. clustering
def _extrema_tree(xmax: Value, xmin: Value, same: bool, bound: float = N.VALUE_BOUND) -> tuple[Value, Value]:
    """Max and min over dim -2 of [..., s, D] by pairwise levels (differences below `bound`); each level one
    comparison batch and one bit x real product for both (one comparison serves both when `same`, i.e. xmax is
    xmin)."""
    while xmax.shape[-2] > 1:
        k = xmax.shape[-2] // 2
        a_max, b_max, rest_max = xmax[..., 0 : 2 * k : 2, :], xmax[..., 1 : 2 * k : 2, :], xmax[..., 2 * k :, :]
        a_min, b_min, rest_min = xmin[..., 0 : 2 * k : 2, :], xmin[..., 1 : 2 * k : 2, :], xmin[..., 2 * k :, :]
        if same:
            bit = N.lt(a_max, b_max, bound)  # [a < b]
            step = N.mul(bit, b_max - a_max)
            new_max, new_min = a_max + step, b_max - step
        else:
            bits = N.lt(N.stack([a_max, a_min]), N.stack([b_max, b_min]), bound)
            step = N.mul(bits, N.stack([b_max - a_max, b_min - a_min]))
            new_max, new_min = a_max + step[0], b_min - step[1]
        xmax, xmin = N.cat([new_max, rest_max], -2), N.cat([new_min, rest_min], -2)
        same = False
    return xmax.squeeze(-2), xmin.squeeze(-2)


def _pad_to(x: Value, size: int) -> Value:
    """Pad dim 2 of [B, H, L, D] to a multiple of `size` with copies of the last slot (a member of the last chunk,
    so its max/min do not change)."""
    extra = -x.shape[2] % size
    if extra == 0:
        return x
    return N.cat([x, *([x[:, :, -1:]] * extra)], 2)


@dataclass
class ClusterSummary:
    """Per-channel key max/min of every child (`sub` tokens) and parent (`size` tokens) cluster of one layer."""

    child_max: Value  # [B, H, C2, D]
    child_min: Value
    parent_max: Value  # [B, H, C1, D]
    parent_min: Value
    length: int
    size: int = 32
    sub: int = 16

    @classmethod
    def build(cls, keys: Value, size: int = 32, sub: int = 16) -> ClusterSummary:
        """From a full cache [B, H, L, D]: log2(sub) levels for the children, log2(size / sub) more for parents."""
        if sub < 1 or size % sub:
            raise ValueError(f"cluster size ({size}) must be a multiple of the sub-cluster size ({sub})")
        b, h, length, d = keys.shape
        if length < 1:
            raise ValueError("cannot cluster an empty cache")
        x = _pad_to(keys, sub).reshape(b, h, -1, sub, d)
        cmax, cmin = _extrema_tree(x, x, True)
        r = size // sub
        pmax, pmin = _pad_to(cmax, r).reshape(b, h, -1, r, d), _pad_to(cmin, r).reshape(b, h, -1, r, d)
        pmax, pmin = _extrema_tree(pmax, pmin, False)
        return cls(cmax, cmin, pmax, pmin, length, size, sub)

    def append(self, key: Value) -> None:
        """One appended key [B, H, 1, D]: a new child/parent starts with it, or the last one absorbs it; all
        absorptions share one comparison batch."""
        updates = []
        for name, size in (("child", self.sub), ("parent", self.size)):
            if self.length % size == 0:
                setattr(self, f"{name}_max", N.cat([getattr(self, f"{name}_max"), key], 2))
                setattr(self, f"{name}_min", N.cat([getattr(self, f"{name}_min"), key], 2))
            else:
                updates.append(name)
        if updates:
            last = [getattr(self, f"{n}_{m}")[:, :, -1:] for n in updates for m in ("max", "min")]
            bits = N.lt(N.stack(last), key, N.VALUE_BOUND)  # [v < key]
            moved = N.mul(bits, N.stack([key - v for v in last]))  # max: v + moved; min: key - moved
            for i, n in enumerate(updates):
                new_max, new_min = last[2 * i] + moved[2 * i], key - moved[2 * i + 1]
                setattr(self, f"{n}_max", N.cat([getattr(self, f"{n}_max")[:, :, :-1], new_max], 2))
                setattr(self, f"{n}_min", N.cat([getattr(self, f"{n}_min")[:, :, :-1], new_min], 2))
        self.length += 1


def combine_heads(scores: Value, group: str) -> Value:
    """Private twin of mpcache.methods.mpcache.combine_heads: one score per cluster [B, H, C] from each query head's
    [B, H, G, C], the candidates being the middle clusters 1 .. C - 2 (the ends are always read; their combined
    scores are not meaningful). "max": a comparison tree over the G heads; "centered" first subtracts each head's
    best candidate score (a tree over the C - 2 candidates)."""
    if group == "sum":
        return scores.sum(2)
    if group == "centered" and scores.shape[-1] > 2:
        peak, _ = _extrema_tree(*(2 * [scores[..., 1:-1].unsqueeze(-1)]), True)  # [B, H, G, 1]
        scores = scores - peak
    return _extrema_tree(scores, scores, True)[0]


def head_split(queries: Value) -> Value:
    """[q_g, q_g [q_g >= 0]] for every query head [B, H, G, 2D]: sign_split without the sum over the group (the
    bound of each head on its own); one comparison batch over the query channels."""
    positive = N.ge(queries, 0.0, N.VALUE_BOUND)
    return N.cat([queries, N.mul(positive, queries)], -1)


class ClusterReps:
    """The representatives of every COMPLETE child and parent (`cluster_scores`' right operand: [kmin, kmax -
    kmin] for "bound", the blend for "linear"), transposed [B, H, W, R] as an append-only numerics.GrowingOperand:
    a complete cluster's representative never changes, so each is opened once, when its cluster fills up, and a
    decode step's score product opens only the query. Selection reads only middle clusters' scores (the first and
    last are always read), and those are complete. Order: completion order, child j then (j odd) parent j // 2.
    A fresh operand (everything opened once) when the capacity is used up."""

    def __init__(self, alpha: float, similarity: str, group: str = "sum") -> None:
        self.alpha, self.similarity, self.group = alpha, similarity, group
        self.held = AppendOnlyOperand(-1)  # the representatives, one column per complete cluster
        self.order: list[tuple[str, int]] = []  # ("child" | "parent", index) per operand column

    def _rep(self, kmax: Value, kmin: Value) -> Value:
        if self.similarity == "linear":
            return cluster_representatives(kmax, kmin, float(N.on_grid(self.alpha)))
        return N.cat([kmin, kmax - kmin], -1)

    def scores(self, queries: Value, summary: ClusterSummary) -> tuple[Value, Value]:
        """(parent, child) scores [B, H, C1], [B, H, C2] for the query heads [B, H, G, D] (ends: not meaningful)."""
        b, h, _, d = queries.shape
        r = summary.size // summary.sub
        done = summary.length // summary.sub  # complete children
        order = [
            (kind, i)
            for j in range(done)
            for kind, i in [("child", j)] + ([("parent", j // r)] if (j + 1) % r == 0 else [])
        ]
        if order[: len(self.order)] != self.order:  # not the columns held plus new ones: open everything anew
            self.held.reset()
        pick = {"child": (summary.child_max, summary.child_min), "parent": (summary.parent_max, summary.parent_min)}

        def columns(start: int) -> Value:  # the representatives of clusters start.., as operand columns
            reps = [self._rep(pick[k][0][:, :, i : i + 1], pick[k][1][:, :, i : i + 1]) for k, i in order[start:]]
            return N.cat(reps, 2).transpose(-1, -2)

        operand = self.held.update(len(order), columns)
        self.order = order
        if self.group != "sum":  # every query head on its own: [B, H, G, D or 2D]
            query = queries if self.similarity == "linear" else head_split(queries)
        elif self.similarity == "linear":
            query = queries.sum(2).unsqueeze(2)  # [B, H, 1, D]
        else:
            query = sign_split(queries).reshape(b, h, 1, 2 * d)
        flat = N.matmul(query, operand)  # [B, H, 1 or G, R]
        c1, c2 = summary.parent_max.shape[2], summary.child_max.shape[2]
        column = {key: i for i, key in enumerate(self.order)}
        child = torch.tensor([column.get(("child", j), 0) for j in range(c2)])
        parent = torch.tensor([column.get(("parent", i), 0) for i in range(c1)])
        return combine_heads(_take(flat, parent), self.group), combine_heads(_take(flat, child), self.group)


# ------------------------------------------------------------------------------- 3. dynamic selection
@dataclass
class Selection:
    """One decode step's choice for a layer: the first and last child publicly, `matrix` (secret one-hot rows
    [B, H, k, C2 - 2] over the middle children) for the rest; None when k = 0."""

    matrix: Value | None
    n_child: int


def sign_split(queries: Value) -> Value:
    """Private twin of mpcache.methods.mpcache.sign_split: [sum_g q_g, sum_g q_g [q_g >= 0]] -> [B, H, 2, D]; one
    comparison batch over the query channels (Hq x D per layer, not per token) and a bit x real product (exact)."""
    b, h, _, d = queries.shape
    return head_split(queries).sum(2).reshape(b, h, 2, d)


def cluster_scores(
    queries: Value, kmax: Value, kmin: Value, alpha: float, similarity: str, group: str = "sum"
) -> Value:
    """Per-head scores [B, H, 1 or G, C] of clusters [B, H, C, D] for a group of queries [B, H, G, D] (plaintext:
    cluster_similarity before `combine_heads`): one product with the blended representatives ("linear") or with
    [kmin, kmax - kmin] against the sign split ("bound", Quest's box bound), of the group's sum (group "sum") or
    of every head."""
    b, h, _, d = queries.shape
    if similarity == "linear":
        reps = cluster_representatives(kmax, kmin, float(N.on_grid(alpha)))
        query = queries.sum(2).unsqueeze(2) if group == "sum" else queries
    else:
        reps = N.cat([kmin, kmax - kmin], -1)
        query = sign_split(queries).reshape(b, h, 1, 2 * d) if group == "sum" else head_split(queries)
    return N.matmul(query, reps.transpose(-1, -2))


def bucket_one_hot(scores: Value, k: int) -> Value:
    """Secret one-hot rows [..., k, m]: row b marks the best entry of the strided bucket {i : i mod k = b} of
    `scores` [..., m] (plaintext: bucket_top; 0 < k < m). One argmax tournament per bucket, all buckets in one
    batch: ceil(log2(m / k)) comparison levels and m comparisons in all (a secret rank needs m^2 / 2), and the
    one-hots are the gather matrix directly (no compaction step). Padding sits below every real score."""
    m = scores.shape[-1]
    if not 0 < k < m:
        raise ValueError(f"bucket top-k needs 0 < k < m, got k={k}, m={m}")
    s = -(-m // k)
    if s * k > m:
        low = N.mask_multiply(scores[..., :1], torch.zeros(1)) - 3 * LIFT
        scores = N.cat([scores, *([low] * (s * k - m))], -1)
    hot = N.argmax(scores.reshape(*scores.shape[:-1], s, k).transpose(-1, -2), SELECT_BOUND)  # [..., k, s]
    bucket, j = torch.meshgrid(torch.arange(k), torch.arange(s), indexing="ij")
    index = bucket * m + (j * k + bucket)  # flat position of entry j*k + b in row b of [k, m]
    index = torch.where(j * k + bucket < m, index, k * m)  # padding goes to a spare slot, dropped
    flat = _index_add(hot.reshape(*hot.shape[:-2], k * s), index.reshape(-1), k * m + 1)
    return flat[..., : k * m].reshape(*hot.shape[:-2], k, m)


def exact_scores(queries: Value, keys: Value, size: int, sub: int, group: str = "sum") -> tuple[Value, Value]:
    """Parent and child scores [B, H, C] without approximation (plaintext: exact_similarity): q . k for every
    cached key and query head (one product over the whole cache), the max over each child by a comparison tree
    (log2(sub) levels), over each parent from its children, combined over the group's heads (`combine_heads`)."""
    scores = N.matmul(queries, keys.transpose(-1, -2)).transpose(-1, -2)  # [B, H, L, G]
    b, h, _, g = scores.shape
    child, _ = _extrema_tree(*(2 * [_pad_to(scores, sub).reshape(b, h, -1, sub, g)]), True)
    r = size // sub
    parent, _ = _extrema_tree(*(2 * [_pad_to(child, r).reshape(b, h, -1, r, g)]), True)
    return combine_heads(parent.transpose(-1, -2), group), combine_heads(child.transpose(-1, -2), group)


def select(
    queries: Value,
    summary: ClusterSummary,
    tokens: int,
    alpha: float = 0.6,
    ratio1: float = 0.5,
    similarity: str = "linear",
    topk: str = "rank",
    keys: Value | None = None,
    scores: tuple[Value, Value] | None = None,
    group: str = "sum",
) -> Selection | None:
    """Two-level query-aware choice (plaintext: select_clusters) for the query heads [B, H, G, D] of each KV head
    and a per-head budget of `tokens` (public): budget // sub children are read. None when every child fits.
    topk "rank": exact secret top-k (pairwise ranks, 16 rounds, m^2 / 2 comparisons); "bucket": bucket_one_hot.
    similarity "exact" (the ablation) needs the cached `keys` [B, H, L, D]: see exact_scores. `scores`: (parent,
    child) scores [B, H, C1], [B, H, C2] computed by the caller (ClusterReps); only the middle entries are read."""
    c1, c2, sub = summary.parent_max.shape[2], summary.child_max.shape[2], summary.sub
    n_sub = max(tokens // sub, 2)
    if n_sub >= c2:
        return None
    n_parent = max(-(-(n_sub + 1) // 2), math.floor(ratio1 * c1))
    if scores is not None:
        parent_scores, child_scores = scores
    elif similarity == "exact":
        if keys is None:
            raise ValueError("exact similarity needs the cached keys")
        parent_scores, child_scores = exact_scores(queries, keys, summary.size, sub, group)
    else:
        scores = cluster_scores(  # [B, H, 1 or G, C1 + C2]: one product for both levels
            queries,
            N.cat([summary.parent_max, summary.child_max], 2),
            N.cat([summary.parent_min, summary.child_min], 2),
            alpha,
            similarity,
            group,
        )
        parent_scores, child_scores = combine_heads(scores[..., :c1], group), combine_heads(scores[..., c1:], group)
    r = summary.size // sub
    parent_of = torch.arange(1, c2 - 1) // r  # parents of the middle children
    if n_parent >= c1:
        penalty: Value | Tensor = torch.zeros(c1, dtype=torch.float64)
    elif n_parent == 2:
        penalty = torch.full((c1,), LIFT, dtype=torch.float64)
        penalty[[0, c1 - 1]] = 0.0
    else:
        if topk == "bucket":
            chosen = bucket_one_hot(parent_scores[..., 1 : c1 - 1], n_parent - 2).sum(-2)
        else:
            chosen = top_k_mask(parent_scores[..., 1 : c1 - 1], n_parent - 2, SELECT_BOUND)  # ends: always chosen
        lifted = N.mul(1 - chosen, LIFT)
        zero = N.mask_multiply(lifted[..., :1], torch.zeros(1))
        penalty = N.cat([zero, lifted, zero], -1)
    middle = child_scores[..., 1 : c2 - 1] - _take(penalty, parent_of)
    k = n_sub - 2
    if k == 0:
        return Selection(None, c2)
    if topk == "bucket":
        return Selection(bucket_one_hot(middle, k), c2)
    return Selection(compaction_matrix(top_k_mask(middle, k, SELECT_BOUND), k), c2)


def middle_clusters(entry: PrivateLayerKV, n_child: int, sub: int) -> Value:
    """Keys and values of the middle children 1 .. n_child - 2 as [B, H, n_child - 2, sub x (Dk + Dv)]: the
    operand of the gather. It changes only when a child fills up, so a cache can wrap it as a FixedOperand."""
    b, h = entry.valid.shape[:2]
    kv = N.cat([entry.keys[:, :, sub : (n_child - 1) * sub], entry.values[:, :, sub : (n_child - 1) * sub]], -1)
    return kv.reshape(b, h, n_child - 2, -1)


def gather_view(
    entry: PrivateLayerKV, selection: Selection, sub: int, clusters: Value | N.GrowingOperand | None = None
) -> PrivateLayerKV:
    """What attention reads: the first child, the chosen middle children (one-hot over clusters times
    `middle_clusters`, given or computed here), and the last child."""
    b, h = entry.valid.shape[:2]
    last = (selection.n_child - 1) * sub
    dk = entry.keys.shape[-1]
    kv = N.cat([entry.keys, entry.values], -1)
    parts, positions = [kv[:, :, :sub]], [entry.positions[..., :sub]]
    if selection.matrix is not None:
        k = selection.matrix.shape[2]
        clusters = middle_clusters(entry, selection.n_child, sub) if clusters is None else clusters
        parts.append(N.matmul(selection.matrix, clusters).reshape(b, h, k * sub, -1))
        positions.append(entry.positions[..., sub : sub + k * sub])  # lower bounds of the true positions
    parts.append(kv[:, :, last:])
    positions.append(entry.positions[..., last:])
    kv = N.cat(parts, 2)
    pos = torch.cat(positions, 2)
    return PrivateLayerKV(kv[..., :dk], kv[..., dk:], pos, torch.ones_like(pos, dtype=torch.bool))


# ----------------------------------------------------------------------------------------- the cache
class PrivateMPCache(PrivateKVCache):
    """MPCache on a private KV cache (knobs as mpcache.methods.mpcache.MPCache; `budget`: public int tokens per
    KV head read per decode step). Needs unpadded rows (every slot valid) and no sliding window."""

    def __init__(self, n_layer: int, budget: int, **knobs) -> None:
        super().__init__(n_layer)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a public int token count >= 1, got {budget!r}")
        self.budget, self.knobs = budget, MPCacheKnobs(**knobs)
        k = self.knobs
        self.shared_from = sharing_pairs(n_layer, k.own_first, k.own_last) if k.share_layers else {}
        self.static: list[StaticKeep | None] = [None] * n_layer
        self.summary: list[ClusterSummary | None] = [None] * n_layer
        self.selection: list[Selection | None] = [None] * n_layer
        self.reps: list[ClusterReps | None] = [None] * n_layer  # representatives, each opened once
        # the gather's operand: the middle children, each opened once against its own dealer mask rows
        self.clusters = [AppendOnlyOperand(-2) for _ in range(n_layer)]

    @classmethod
    def adopt(cls, cache: PrivateKVCache, budget: int, static: bool = True, **knobs) -> PrivateMPCache:
        """Take over a filled private cache of n shared tokens (a benchmark's cache, built without a private
        prefill) as the cache static eviction leaves: with `static`, cut publicly to its fixed keep count
        max(budget, static_ratio x n) (the first `sink` and the last tokens; which tokens stay does not change any
        later cost, and the one-time secret top-k of `static_keep` is measured on its own); clusters are
        summarised now, decode steps select."""
        out = cls(len(cache.layers), budget, **knobs)
        out.seen_tokens = cache.seen_tokens
        for layer, entry in enumerate(cache.layers):
            if entry is None:
                raise ValueError(f"layer {layer} of the adopted cache is empty")
            if not bool(entry.valid.all()):
                raise ValueError("the private MPCache needs unpadded rows (every token valid)")
            n = entry.capacity
            keep = max(budget, math.floor(n * out.knobs.static_ratio))
            if static and keep < n:
                sink = min(out.knobs.sink, keep)
                index = torch.cat([torch.arange(sink), torch.arange(n - keep + sink, n)])
                entry = PrivateLayerKV(
                    entry.keys[:, :, index], entry.values[:, :, index], entry.positions[:, :, index],
                    entry.valid[:, :, index],
                )  # fmt: skip
            out.layers[layer] = entry
            out.summary[layer] = ClusterSummary.build(entry.keys, out.knobs.cluster_size, out.knobs.subcluster_size)
        return out

    def update(self, layer: int, keys: Value, values: Value, positions: Tensor, valid: Tensor) -> PrivateLayerKV:
        if not bool(valid.all()):
            raise ValueError("the private MPCache needs unpadded rows (every token valid)")
        entry = super().update(layer, keys, values, positions, valid)
        summary = self.summary[layer]
        if summary is not None:
            with span("selection"):
                for t in range(keys.shape[2]):
                    summary.append(keys[:, :, t : t + 1])
        return entry

    def after_attention(self, layer: int, queries: Value, query_positions: Tensor) -> None:
        """After the prompt's attention (prefill logits are those of the full cache): static eviction, once (after
        the last block of a blockwise prefill; its queries are the observation window, at most the block)."""
        if self.summary[layer] is not None or self.more_prompt:
            return
        entry = self.layers[layer]
        assert entry is not None
        length = entry.capacity
        keep = max(self.budget, math.floor(length * self.knobs.static_ratio))
        with span("selection"):
            if length > keep:
                source = self.shared_from.get(layer)
                plan = self.static[source] if source is not None else None
                if plan is None:
                    k = self.knobs
                    ratios = (k.window_ratio, k.long_prompt, k.long_window_ratio, k.window_queries)
                    w = min(observation_window(length, *ratios), queries.shape[2])  # blockwise: the last block
                    scores = window_scores(
                        queries[:, :, -w:], entry.keys, query_positions[:, -w:], entry.positions,
                        k.static_heads == "kv", self.options,
                    )  # fmt: skip
                    scores = window_sum(scores, k.static_pool)
                    # each query's probabilities sum to 1: a slot's window score is at most w, pooled k.static_pool
                    # (+1) times; the slack covers fixed-point error
                    plan = static_keep(scores, keep, self.knobs.sink, self.knobs.window, w * (k.static_pool + 1) + 1.0)
                self.static[layer] = plan
                self.layers[layer] = entry = compact(entry, plan)
            self.summary[layer] = ClusterSummary.build(entry.keys, self.knobs.cluster_size, self.knobs.subcluster_size)
            self.reps[layer] = None
            self.clusters[layer].reset()

    def observe(self, layer: int, queries: Value, query_positions: Tensor) -> None:
        """At a decode step: choose the clusters attention reads (or reuse the source layer's choice)."""
        self.selection[layer] = None
        summary, entry = self.summary[layer], self.layers[layer]
        if summary is None or queries.shape[2] != 1 or entry is None or entry.capacity <= self.budget:
            return
        source = self.shared_from.get(layer)
        with span("selection"):
            if source is not None:
                self.selection[layer] = self.selection[source]
                return
            b, hq, _, d = queries.shape
            hkv = entry.keys.shape[1]
            group = queries.reshape(b, hkv, hq // hkv, d)
            k = self.knobs
            scores = None
            if k.similarity != "exact":
                if self.reps[layer] is None:
                    self.reps[layer] = ClusterReps(k.alpha, k.similarity, k.group)
                scores = self.reps[layer].scores(group, summary)
            self.selection[layer] = select(
                group, summary, self.budget, k.alpha, k.ratio1, k.similarity, k.topk, entry.keys, scores, k.group
            )

    def attention_view(self, layer: int) -> PrivateLayerKV:
        entry = self.layers[layer]
        assert entry is not None
        chosen = self.selection[layer]
        if chosen is None:
            return entry
        with span("selection"):
            if chosen.matrix is None:
                return gather_view(entry, chosen, self.knobs.subcluster_size)
            return gather_view(entry, chosen, self.knobs.subcluster_size, self._middle_operand(layer, entry, chosen))

    def _middle_operand(self, layer: int, entry: PrivateLayerKV, chosen: Selection) -> N.GrowingOperand | Value:
        """The gather's right operand, the middle children [B, H, n_child - 2, sub x (Dk + Dv)], append-only: when a
        child fills up, only the new middle child is opened (16 rows), and a fresh operand (everything opened once)
        only when its capacity is used up."""
        sub = self.knobs.subcluster_size
        if not N.GrowingOperand.supported(entry.keys):
            return middle_clusters(entry, chosen.n_child, sub)
        rows = lambda start: middle_clusters(entry, chosen.n_child, sub)[:, :, start:]  # noqa: E731
        return self.clusters[layer].update(chosen.n_child - 2, rows)


def full_attention(
    queries: Value, entry: PrivateLayerKV, query_positions: Tensor, options: PrivateOptions | None = None
) -> Value:
    """Decode attention over the whole cache with the softmax `options` choose (default PrivateOptions()): the
    baseline MPCache is measured against."""
    options = options or PrivateOptions()
    return cached_attention(
        queries, entry.keys, entry.values, query_positions, entry.positions, entry.valid,
        score_range=options.score_range, nonlinear=options.nonlinear,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ measurement
def _measure(lengths: list[int], static_lengths: list[int], seed: int = 0, knobs: dict | None = None) -> list[dict]:
    """Per party: rounds/bytes/seconds of one decode step's attention pieces at each cache length (see the
    module docstring's table), bundled-model shapes; `knobs`: MPCacheKnobs fields (selection's similarity, topk)."""
    import time

    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    g = torch.Generator().manual_seed(seed)
    hkv, hq, d = 4, 8, 32
    rows = []

    def cost(fn, *args):
        before, start = N.counters(), time.perf_counter()
        out = fn(*args)
        spent = {k: int(v - before[k]) for k, v in N.counters().items()}
        return out, {**spent, "s": time.perf_counter() - start}

    def shared(*shape: int, src: int = 0, scale: float = 1.0) -> Value:
        return crypten.cryptensor(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, src=src)

    def choose(entry: PrivateLayerKV, query: Value, summary: ClusterSummary, budget: int) -> PrivateLayerKV:
        k = MPCacheKnobs(**(knobs or {}))
        chosen = select(query, summary, budget, k.alpha, k.ratio1, k.similarity, k.topk)
        return gather_view(entry, chosen, summary.sub)

    for length in lengths:
        keys, values, q = (
            shared(1, hkv, length, d),
            shared(1, hkv, length, d),
            shared(1, hq, 1, d, src=1, scale=d**-0.5),
        )
        entry = PrivateLayerKV(
            keys, values, torch.arange(length).expand(1, hkv, length), torch.ones(1, hkv, length) > 0
        )
        qpos = torch.tensor([[length]])
        summary = ClusterSummary.build(keys[:, :, :-1])
        cost(full_attention, q, entry, qpos)  # warm-up (first-call allocations)
        _, full = cost(full_attention, q, entry, qpos)
        _, update = cost(summary.append, keys[:, :, -1:])  # the key joins the last (partial) child and parent
        query = q.reshape(1, hkv, hq // hkv, d)
        view, sel = cost(choose, entry, query, summary, length // 5)
        _, attend = cost(full_attention, q, view, qpos)
        row = {"length": length, "read": view.capacity, "full": full, "select": sel, "attend": attend}
        row["update"] = update
        row["mpcache"] = {k: sel[k] + attend[k] + update[k] for k in ("rounds", "bytes", "dealer_bytes", "s")}
        rows.append(row)
    for length in static_lengths:
        scores = crypten.cryptensor(torch.rand(1, length, generator=g, dtype=torch.float64), src=0)
        kv = shared(1, hkv, length, 2 * d)
        entry = PrivateLayerKV(kv, kv, torch.arange(length).expand(1, hkv, length), torch.ones(1, hkv, length) > 0)
        # the window's attention votes (default window: 20% of the prompt's last queries), with either softmax
        w = observation_window(length)
        window_q, kpos = shared(1, hq, w, d, src=1, scale=d**-0.5), entry.positions
        qpos = torch.arange(length - w, length).expand(1, w)
        votes = {}
        for nonlinear in ("lut", "poly"):
            options = PrivateOptions(nonlinear=nonlinear)
            _, votes[f"window_{nonlinear}"] = cost(window_scores, window_q, kv[..., :d], qpos, kpos, False, options)
        plan, top = cost(static_keep, scores, length // 2, 16, 16, 2.0)
        _, gather = cost(compact, entry, plan)
        rows.append({"length": length, "window": w, **votes, "top": top, "gather": gather})
    crypten.cfg.communicator.verbose = False
    return rows


def _measure_model(lengths: list[int], steps: int = 2) -> list[dict]:
    """Per party: one whole decode step of the bundled model (4 layers) with the full cache vs PrivateMPCache over
    the same cache of n tokens (shared after a plaintext prefill at party 0, as bench.mpc_decode does; MPCache
    adopts it as its post-eviction cache, budget n / 5). Mean rounds/bytes/seconds per step, and selection's share."""
    from mpcache.model.cache import KVCache
    from mpcache.model.loading import load_bundled
    from mpcache.mpc.arith.accounting import Ledger, summarize
    from mpcache.mpc.nn import decoder
    from mpcache.mpc.nn.layers import greedy_token, one_hot

    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    comm = crypten.communicator.get()
    rank = comm.get_rank()
    model = load_bundled(dtype=torch.float64)[0]
    config = model.config
    share = lambda t: crypten.cryptensor(t, src=0)  # noqa: E731  party 0 owns the model (and, here, the cache)
    pm = decoder.share_model(model, share)
    rows = []
    for n in lengths:
        plain = None
        if rank == 0:
            plain = KVCache(config.n_layer)
            with torch.no_grad():
                model(torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)), plain)
        shapes = [(1, config.n_kv_head, n, config.head_dim)] * config.n_layer
        for method in ("full", "mpcache"):
            cache = decoder.share_cache(plain, config, shapes, share)
            if method == "mpcache":
                cache = PrivateMPCache.adopt(cache, n // 5)
            token = crypten.cryptensor(one_hot(torch.tensor([[1]]), config.vocab_size), src=1, precision=0)
            token = greedy_token(pm(token, cache, last_only=True))  # warm-up step, not counted
            with Ledger(N.counters) as ledger:
                for _ in range(steps):
                    ledger.begin_step("decode")
                    token = greedy_token(pm(token, cache, last_only=True))
                    ledger.end_step()
            mean = {k: sum(st[k] for st in ledger.steps) / steps for k in ("rounds", "bytes", "seconds")}
            ops = {op: {k: v / steps for k, v in row.items()} for op, row in summarize(ledger.steps).items()}
            rows.append({"length": n, "method": method, **mean, "ops": ops})
    crypten.cfg.communicator.verbose = False
    return rows


def main() -> None:
    import argparse

    from mpcache.mpc.transport.local import LocalParties

    parser = argparse.ArgumentParser(description="MPC cost of MPCache's decode-step selection vs full attention")
    parser.add_argument("--lengths", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--static-lengths", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--model-lengths", type=int, nargs="*", default=[], help="bundled model decode steps")
    args = parser.parse_args()
    with LocalParties(setup=N.install, timeout=1800) as parties:
        rows = parties.run(_measure, args.lengths, args.static_lengths)[0]
        model_rows = parties.run(_measure_model, args.model_lengths)[0] if args.model_lengths else []

    def fmt(c: dict) -> str:
        return f"{c['rounds']} r {c['bytes'] / 1e6:.2f} MB {c['s']:.2f} s"

    print("| L | read | full attention | select + gather | update | attend (read) | mpcache total |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "full" in r:
            parts = [r["full"], r["select"], r["update"], r["attend"], r["mpcache"]]
            print(f"| {r['length']} | {r['read']} | " + " | ".join(fmt(c) for c in parts) + " |")
    print("\n| prompt L | window votes, table softmax | window votes, polynomial softmax | static top-(L/2 - 32) "
          "rank + one-hot | gather of keys+values |\n|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        if "top" in r:
            parts = [r["window_lut"], r["window_poly"], r["top"], r["gather"]]
            print(f"| {r['length']} (window {r['window']}) | " + " | ".join(fmt(c) for c in parts) + " |")

    if model_rows:
        print("\n| cached n | method | rounds/step | MB/step | s/step | selection rounds, MB | attention+softmax MB |")
        print("|---|---|---|---|---|---|---|")
        for r in model_rows:
            sel, ops = r["ops"].get("selection", {"rounds": 0, "bytes": 0}), r["ops"]
            attn = sum(ops.get(k, {"bytes": 0})["bytes"] for k in ("attention", "softmax"))
            print(
                f"| {r['length']} | {r['method']} | {r['rounds']:.0f} | {r['bytes'] / 1e6:.2f} | {r['seconds']:.2f} | "
                f"{sel['rounds']:.0f}, {sel['bytes'] / 1e6:.2f} | {attn / 1e6:.2f} |"
            )


if __name__ == "__main__":
    main()
