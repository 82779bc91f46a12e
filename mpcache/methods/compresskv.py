"""CompressKV (Lin et al., arXiv 2508.02401): SnapKV voting by semantic retrieval heads, error-aware layer budgets.

Once, after the prompt (official code, methods-part2.md 3.2-3.4):

- Only a few query heads per layer vote: the `first_k` (4) best *semantic retrieval heads*
  (SRHs) of the layer. Each sums its attention from the prompt's last `window` (8) queries
  per key, the votes are average-pooled (kernel 5) and averaged over the SRHs, and the layer
  keeps its top B_l - window older tokens plus the window. One index set per layer: every KV
  head keeps the same tokens. Decode tokens are appended; nothing is evicted later.
- B_l follows each layer's measured eviction error e_l (L1-normalised): of the n_layer x budget
  total per KV head, every layer gets `min_layer` (32) plus its share of the rest in proportion
  to e_l, at most `max_factor` (3) x budget (`split_bounded`; the code rounds, clips and repairs
  one token at a time, which lands on the same kind of exact, capped, error-ordered split).

Both inputs are offline profiles of the model, made here by `retrieval_head_scores` (needle
probes, e.g. the pass-key prompts of `needle_probes`: at every decoding step whose token is
part of the needle, each head's attention mass on the needle span counts, over probes whose
output recalls at least half the needle) and
`layer_eviction_errors` (relative Frobenius error of each layer's attention output over a
prompt with the SRH-compressed instead of the full cache, at a tiny budget). Pass them as
`heads` (per layer, query heads best first, e.g. `rank_heads(scores)`) and `layer_errors`.
Without `heads` every query head votes (SnapKV with head-averaged, layer-shared votes);
without `layer_errors` every layer gets the budget. A prompt within the budget is kept whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import attention_probs, cached_attention
from mpcache.methods.base import Budget, PolicyCache, pool_scores, recency_rank, split_bounded
from mpcache.model.cache import KVCache
from mpcache.model.tokenizer import Tokenizer
from mpcache.model.transformer import Transformer


def error_aware_budgets(errors: Tensor, budget: Tensor, low: int, max_factor: float) -> Tensor:
    """Tokens per KV head [B, L] for layer errors [L] (or [B, L]) and per-head budgets [B]:
    min(low, budget) each plus the rest of L x budget in proportion to the errors, each at most
    max_factor x budget; rows sum to L x budget exactly."""
    n_layer = errors.shape[-1]
    floor = torch.clamp(budget, max=low)[:, None]
    cap = (budget.double() * max_factor).floor().long().clamp(min=1)[:, None] - floor
    weights = errors.double().to(budget.device).expand(budget.shape[0], n_layer)
    return floor + split_bounded(n_layer * (budget - floor[:, 0]), weights, cap.expand(-1, n_layer))


def rank_heads(scores: Tensor) -> list[list[int]]:
    """Per layer, the query heads ordered from the highest SRH score down ([L, H] -> L lists)."""
    return torch.argsort(scores, dim=-1, descending=True, stable=True).tolist()


class CompressKV(PolicyCache):
    """window: observation queries, always kept (8); kernel: pooling width (5); first_k: SRHs per
    layer that vote (4); heads: per layer, query heads ranked best first (None: all heads vote);
    layer_errors: per-layer eviction errors (None: uniform budgets); min_layer / max_factor: a
    layer's budget bounds, min_layer tokens and max_factor x budget (32 / 3)."""

    name: ClassVar[str] = "compresskv"

    def __init__(
        self,
        n_layer: int,
        budget: Budget,
        *,
        window: int = 8,
        kernel: int = 5,
        first_k: int = 4,
        heads: Sequence[Sequence[int]] | None = None,
        layer_errors: Sequence[float] | None = None,
        min_layer: int = 32,
        max_factor: float = 3.0,
        **common,
    ) -> None:
        super().__init__(n_layer, budget, window=window, **common)
        if window < 1:
            raise ValueError(f"window must be >= 1 observation query, got {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd int, got {kernel}")
        if not isinstance(first_k, int) or first_k < 1:
            raise ValueError(f"first_k must be an int >= 1, got {first_k!r}")
        if not isinstance(min_layer, int) or min_layer < 1 or not max_factor >= 1.0:
            raise ValueError(f"min_layer must be an int >= 1 and max_factor >= 1, got {min_layer}, {max_factor}")
        if heads is not None:
            for ranked in heads:
                if len(ranked) == 0 or len(set(ranked)) != len(ranked) or any(int(h) < 0 for h in ranked):
                    raise ValueError(f"heads must list distinct query head indices per layer, got {list(ranked)}")
        if layer_errors is not None and any(not e >= 0 for e in layer_errors):
            raise ValueError(f"layer_errors must be >= 0, got {list(layer_errors)}")
        self.kernel, self.first_k, self.min_layer, self.max_factor = kernel, first_k, min_layer, max_factor
        self.heads = None if heads is None else [[int(h) for h in ranked] for ranked in heads]
        self.layer_errors = None if layer_errors is None else torch.tensor(list(layer_errors), dtype=torch.float64)

    @classmethod
    def from_model(cls, model: Transformer, budget: Budget | None, **kwargs) -> CompressKV:
        cache = super().from_model(model, budget, **kwargs)
        assert isinstance(cache, CompressKV)
        n_layer, n_head = model.config.n_layer, model.config.n_head
        if cache.heads is not None and (len(cache.heads) != n_layer or max(max(r) for r in cache.heads) >= n_head):
            raise ValueError(f"heads must rank query heads [0, {n_head}) for each of the {n_layer} layers")
        if cache.layer_errors is not None and len(cache.layer_errors) != n_layer:
            raise ValueError(f"layer_errors needs {n_layer} values, got {len(cache.layer_errors)}")
        return cache

    def layer_budget(self, layer: int) -> Tensor:
        assert self.budget_tokens is not None and self.prompt_lengths is not None
        if self.layer_errors is None:
            return self.budget_tokens
        budgets = error_aware_budgets(self.layer_errors, self.budget_tokens, self.min_layer, self.max_factor)
        return torch.where(self.prompt_lengths <= self.budget_tokens, self.budget_tokens, budgets[:, layer])

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        entry = self.layers[layer]
        assert entry is not None
        w = min(self.window, queries.shape[2])
        vote = self.attention_received(layer, queries, query_positions, last=w).flatten(1, 2)  # [B, Hq, L]
        if self.heads is not None:
            vote = vote[:, self.heads[layer][: self.first_k]]
        older = recency_rank(entry.valid[:, :1]) >= w  # slots are shared by the KV heads at the prompt
        vote = pool_scores(vote.masked_fill(~older, 0.0), self.kernel, "avg").mean(1, keepdim=True)
        return vote.expand(-1, entry.keys.shape[1], -1)


# ------------------------------------------------------------------------ offline profiles
Probe = tuple[Tensor, int, int]  # prompt ids [T], needle start, needle end (token positions)


class _Trace(KVCache):
    """Records each forward's queries, and the last query's attention mass on a slot range."""

    def __init__(self, n_layer: int, span: tuple[int, int] | None = None) -> None:
        super().__init__(n_layer)
        self.span = span
        self.queries: list[tuple[Tensor, Tensor] | None] = [None] * n_layer
        self.mass: list[list[Tensor]] = [[] for _ in range(n_layer)]  # per forward: [B, Hq]

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        self.queries[layer] = (queries, query_positions)
        if self.span is not None:
            entry = self.layers[layer]
            assert entry is not None
            p = attention_probs(queries[:, :, -1:], entry.keys, query_positions[:, -1:], entry.positions, entry.valid)
            on = (entry.positions >= self.span[0]) & (entry.positions < self.span[1])  # [B, Hkv, L]
            self.mass[layer].append((p[:, :, :, 0] * on[:, :, None]).sum(-1).flatten(1))


@torch.no_grad()
def retrieval_head_scores(
    model: Transformer, probes: Sequence[Probe], steps: int = 50, min_recall: float = 0.5
) -> Tensor:
    """CompressKV's semantic-retrieval-head score per (layer, query head) [L, H].

    probes: (prompt ids [T], needle start, needle end) with the needle at positions
    [start, end). The model decodes `steps` tokens greedily; at every step whose token occurs
    in the needle, each head adds its attention mass on the whole needle span. Probes whose
    output contains under `min_recall` of the needle's distinct tokens are dropped (the
    official ROUGE-1 recall > 50 filter); the score is the mean over the kept probes."""
    from mpcache.generate import stream_generate  # generate imports the model package only

    cfg = model.config
    total, kept = torch.zeros(cfg.n_layer, cfg.n_head, dtype=torch.float64), 0
    for ids, start, end in probes:
        if not 0 <= start < end <= ids.shape[-1]:
            raise ValueError(f"needle span [{start}, {end}) is not inside a prompt of {ids.shape[-1]} tokens")
        trace = _Trace(cfg.n_layer, (start, end))
        tokens = [int(t) for t in stream_generate(model, ids.view(1, -1), steps, policy=lambda m, t=trace: t)]
        needle = set(ids.view(-1)[start:end].tolist())
        if len(needle & set(tokens)) < min_recall * len(needle):
            continue
        kept += 1
        for step, token in enumerate(tokens):  # forward `step` chose token `step`
            if token in needle:
                total += torch.stack([trace.mass[layer][step][0] for layer in range(cfg.n_layer)]).double()
    return total / max(kept, 1)


def needle_probes(tokenizer: Tokenizer, n: int = 10, context_len: int = 1000, seed: int = 0) -> list[Probe]:
    """`n` pass-key prompts (`mpcache.eval.tasks`, depths spread evenly) as probes for
    `retrieval_head_scores`; the needle is the key where the haystack first states it, so the
    recall filter asks for the key itself (the answer is only the key, not the needle sentence).
    Token offsets come from encoding the text before them, exact for a byte tokenizer (a BPE
    may merge a token across the boundary)."""
    from mpcache.eval.tasks import make_samples  # eval imports the methods package

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_bos=False))

    probes = []
    for sample in make_samples("passkey", context_len, n, count, seed):
        first = sample.prompt.index(sample.answer)
        ids = torch.tensor(tokenizer.encode(sample.prompt))
        start = len(tokenizer.encode(sample.prompt[:first]))
        end = len(tokenizer.encode(sample.prompt[: first + len(sample.answer)]))
        probes.append((ids, start, end))
    return probes


@torch.no_grad()
def layer_eviction_errors(
    model: Transformer,
    prompts: Sequence[Tensor],
    heads: Sequence[Sequence[int]] | None = None,
    budget: int = 32,
    **knobs,
) -> Tensor:
    """Per-layer eviction error [L], L1-normalised: summed over `prompts`, the relative Frobenius
    error ||O_comp - O_full|| / (||O_full|| + 1e-5) of each layer's attention output (after the
    output projection) over the whole prompt, when it reads the CompressKV-compressed cache at
    `budget` tokens (official profiling budget 32) instead of the full one. knobs: CompressKV's."""
    cfg = model.config
    errors = torch.zeros(cfg.n_layer, dtype=torch.float64)
    for ids in prompts:
        ids = ids.view(1, -1)
        trace = _Trace(cfg.n_layer)
        model(ids, cache=trace)
        policy = CompressKV.from_model(model, budget, heads=heads, **knobs)
        model(ids, cache=policy)
        for layer in range(cfg.n_layer):
            full, small = trace.layers[layer], policy.layers[layer]
            q, qpos = trace.queries[layer]  # type: ignore[misc]
            attn = model.blocks[layer].attn
            outs = []
            for kv in (full, small):
                assert kv is not None
                o = cached_attention(q, kv.keys, kv.values, qpos, kv.positions, kv.valid, cfg.sliding_window)
                outs.append(attn.o_proj(o.transpose(1, 2).flatten(2)).double())
            errors[layer] += ((outs[1] - outs[0]).norm() / (outs[0].norm() + 1e-5)).item()
    return errors / errors.sum().clamp(min=1e-30)
