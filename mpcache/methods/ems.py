"""EMS (Li et al., arXiv 2412.08521): head-wise evict-then-merge by a global-local score.

Score: the attention a token has received from every query so far (global, H2O-style,
biased towards early tokens by the causal mask) plus the attention from the forward's
last `window` queries (local, SnapKV-style, biased towards recent tokens), the local
score first rescaled to the global score's mean over the head's tokens ("mean
alignment"), combined by `combine` ("sum" or "max"). Per KV head, the budget's
best-scored tokens are kept (the newest `window` always) and act as class centres.
The rest is split by the head's sparsity: with a fraction c of the score mass on the
centres, the best round((1 - c) x rest) remaining tokens are "to be merged", the others
are irrelevant and evicted. Each to-be-merged token joins the centre most similar to it,
similarity = cos(keys) x cos(values); one below `min_similarity` goes to the zero class
(dropped) instead. A centre that received tokens becomes their score-weighted average
(keys and values, a convex combination) and adds up their scores. So every head keeps
exactly `budget` slots. Runs after the prompt (and every `decode_interval` decode steps).

No official code exists: the sum combination, the sparsity rule for the number of
to-be-merged tokens, score weights for merging and the 0.5 threshold are this file's
choices for the details the notes mark as unknown (paper budget: 256 per head).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.kernels import merge_kv, wanted
from mpcache.methods.base import Budget, PolicyCache, StepKind, mask_to_index, top_mask


def mean_align(global_score: Tensor, local_score: Tensor, valid: Tensor) -> Tensor:
    """local [B, H, L] rescaled so its mean over each head's valid slots equals global's."""
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean_g = (global_score * valid).sum(-1, keepdim=True) / n
    mean_l = (local_score * valid).sum(-1, keepdim=True) / n
    return local_score * torch.where(mean_l > 0, mean_g / mean_l.clamp(min=1e-30), 0.0)


def evict_then_merge(
    keys: Tensor, values: Tensor, valid: Tensor, weight: Tensor, centre: Tensor, min_similarity: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge the to-be-merged tokens of every head into its centres.

    keys/values [B, H, L, D]; valid, centre [B, H, L] masks; weight [B, H, L] >= 0 (the score).
    The non-centre valid slots are ranked by weight and the best round((1 - c) x count)
    are to be merged, c = the centres' share of the head's weight. Returns new keys and
    values (only centres that received tokens change), `target` [B, H, L] (the centre slot
    each merged token joined, -1 for the zero class, evicted tokens and centres) and the
    to-be-merged mask.
    """
    if not bool(centre.any(-1).all()):
        raise ValueError("every head needs at least one centre to merge into")
    rest = valid & ~centre
    total = (weight * valid).sum(-1)
    captured = torch.where(total > 0, (weight * centre).sum(-1) / total.clamp(min=1e-30), 1.0)
    n_tbm = (rest.sum(-1) * (1.0 - captured)).round().long()
    tbm = top_mask(weight.masked_fill(~rest, float("-inf")), n_tbm)
    t_index, t_count = mask_to_index(tbm)
    c_index, c_count = mask_to_index(centre)

    def gather(x: Tensor, index: Tensor) -> Tensor:
        return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))

    def cosines(x: Tensor) -> Tensor:  # [B, H, T, C] between to-be-merged tokens and centres
        return F.normalize(gather(x, t_index).float(), dim=-1) @ F.normalize(gather(x, c_index).float(), dim=-1).mT

    sim = cosines(keys) * cosines(values)
    real_c = torch.arange(c_index.shape[-1], device=keys.device) < c_count[..., None]  # [B, H, C]
    best, which = sim.masked_fill(~real_c[:, :, None, :], float("-inf")).max(-1)
    real_t = torch.arange(t_index.shape[-1], device=keys.device) < t_count[..., None]
    joins = real_t & (best >= min_similarity)  # the rest of the to-be-merged set is the zero class
    target = torch.full_like(weight, -1, dtype=torch.long)
    target.scatter_(2, t_index, torch.where(joins, c_index.gather(2, which), -1))
    joined = target >= 0
    members = torch.zeros_like(target).scatter_add_(2, target.clamp(min=0), joined.long())
    received = (members > 0) & centre
    slots = torch.arange(weight.shape[-1], device=keys.device).expand_as(target)
    into = torch.where(received, slots, target)  # a centre that received tokens merges into itself too
    share = weight * (into >= 0)
    keys, values = merge_kv(keys, values, into, share, share, use_kernels=wanted(keys))  # float32 sums
    return keys, values, target, tbm


class EMS(PolicyCache):
    """window: local-score queries, also always kept (32, SnapKV's); combine: "sum" or
    "max" of the global and aligned local scores; merge: False gives plain top-k by the
    score; min_similarity: below it a to-be-merged token is dropped (zero class)."""

    name: ClassVar[str] = "ems"
    keeps_probs: ClassVar[bool] = True  # decode steps read the step's attention

    def __init__(
        self,
        n_layer: int,
        budget: Budget,
        *,
        window: int = 32,
        combine: str = "sum",
        merge: bool = True,
        min_similarity: float = 0.5,
        **common,
    ) -> None:
        super().__init__(n_layer, budget, window=window, **common)
        if window < 1:
            raise ValueError(f"window must be >= 1 local query, got {window}")
        if combine not in ("sum", "max"):
            raise ValueError(f"combine must be 'sum' or 'max', got {combine!r}")
        if not -1.0 <= min_similarity <= 1.0:
            raise ValueError(f"min_similarity is a product of cosines, in [-1, 1]; got {min_similarity}")
        self.combine, self.merge, self.min_similarity = combine, merge, min_similarity

    def record(self, layer: int, queries: Tensor, query_positions: Tensor, kind: StepKind) -> None:
        self.slot_state(layer, "global").add_(self.attention_received(layer, queries, query_positions).sum(2))
        local = self.attention_received(layer, queries, query_positions, last=self.window).sum(2)
        self.slot_state(layer, "local").copy_(local)

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        entry = self.layers[layer]
        assert entry is not None
        glob = self.slot_state(layer, "global")
        local = mean_align(glob, self.slot_state(layer, "local"), entry.valid)
        return glob + local if self.combine == "sum" else torch.maximum(glob, local)

    def compress(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        entry = self.layers[layer]
        assert entry is not None
        budget = self.layer_budget(layer)
        if bool((entry.valid.sum(-1) <= budget[:, None]).all()):
            return
        scores = self.score(layer, queries, query_positions)
        index, count = self.select(layer, scores, budget)
        if self.merge:
            in_use = torch.arange(index.shape[-1], device=index.device) < count[..., None]
            centre = torch.zeros_like(entry.valid).scatter_(2, index, in_use) & entry.valid
            weight = scores.masked_fill(~entry.valid, 0.0).clamp(min=0.0)
            entry.keys, entry.values, target, _ = evict_then_merge(
                entry.keys, entry.values, entry.valid, weight, centre, self.min_similarity
            )
            glob = self.slot_state(layer, "global")  # a centre carries its members' attention from now on
            glob.scatter_add_(2, target.clamp(min=0), glob * (target >= 0))
        self.keep(layer, index, count)
