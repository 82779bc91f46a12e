"""Cache-Craft: reusing the KV of retrieved RAG chunks at other positions (Agarwal et al.,
SIGMOD 2025, arXiv 2502.15734), with a partial recomputation to restore the context.

A RAG prompt is a header, k retrieved chunks and a question. Prefix caching reuses only
the longest common prefix, so a chunk seen before at another place or after other chunks
is computed again. Cache-Craft keeps every chunk's KV as computed the first time
(a "chunk-cache", with the ids of the chunks that preceded it and its start position) in
a store of pool blocks, and for a new prompt:

1. re-rotates each reused chunk's keys from its old positions to the new ones (RoPE is a
   rotation, R(p + delta) = R(delta) R(p): exact up to rounding),
2. ranks the chunk's tokens by how much they depended on their old context. The signal
   (Cache-Craft's inter-attention, recorded when the chunk-cache was made, so nothing is
   measured at reuse time): the share of each token's attention, averaged over layers and
   query heads, that went to the tokens of the chunks before it. A chunk's CCI (cache
   context impact) is the mean share; with beta = Jaccard overlap of its old and new
   preceding chunks and gamma = the fraction of their common pairs now in the other
   order, its damage is max(CCI, store mean CCI when it was made without context) *
   (1 - beta (1 - gamma)),
3. recomputes `fraction` of the reused chunk tokens, split over the chunks by damage x
   length and taken in each chunk by rank, together with the question and any new chunk,
   in one forward at their positions over the assembled cache (they attend to the reused
   KV; reused tokens are not recomputed). fraction = 1 recomputes every chunk token; with
   `reuse_header=False` the forward is then exactly full recomputation.

The header is shared by every prompt at the same positions: it is reused as a prefix
(prefix caching, exact up to rounding). The store evicts whole chunk-caches by reuse
frequency x recency (uses divided by the requests since the last use) when it runs out of
blocks. RoPE models only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mpcache.kernels.paged import gather_blocks, masked_attention
from mpcache.model.cache import KVCache
from mpcache.model.transformer import Transformer, apply_rope
from mpcache.serving.pool import BlockPool


@dataclass
class ChunkCache:
    """One chunk's KV as computed after `context` (chunk keys), starting at `start`."""

    context: tuple
    start: int
    blocks: list[int]
    length: int
    inter: Tensor  # [length] share of attention each token gave the chunks before it
    uses: int = 0
    last_use: int = 0

    @property
    def cci(self) -> float:
        return float(self.inter.mean()) if self.length else 0.0


@dataclass
class Prefill:
    """What one prompt cost: tokens run through the model, reused, and the chunk hits."""

    computed: int
    reused: int
    prompt: int
    chunk_hits: int
    chunks: int


def overlap(old: tuple, new: tuple) -> tuple[float, float]:
    """(beta, gamma): Jaccard overlap of two preceding-chunk lists and the fraction of their
    common chunks' pairs whose order differs."""
    a, b = set(old), set(new)
    beta = 1.0 if not a | b else len(a & b) / len(a | b)
    common = [c for c in new if c in a]
    rank = {c: i for i, c in enumerate(old)}
    pairs = [(x, y) for i, x in enumerate(common) for y in common[i + 1 :]]
    gamma = sum(rank[x] > rank[y] for x, y in pairs) / len(pairs) if pairs else 0.0
    return beta, gamma


class ChunkStore:
    """Chunk-caches in pool blocks, at most `capacity` blocks (default: the whole pool)."""

    def __init__(self, pool: BlockPool, capacity: int | None = None) -> None:
        self.pool = pool
        self.capacity = pool.num_blocks if capacity is None else capacity
        self.chunks: dict[tuple, ChunkCache] = {}
        self.header: tuple[tuple, list[int]] | None = None  # (tokens, blocks) of the shared header
        self.clock = 0
        self.evictions = 0

    @property
    def used_blocks(self) -> int:
        return sum(len(c.blocks) for c in self.chunks.values()) + (len(self.header[1]) if self.header else 0)

    def mean_cci(self) -> float:
        with_context = [c.cci for c in self.chunks.values() if c.context]
        return sum(with_context) / len(with_context) if with_context else 0.0

    # ------------------------------------------------------------- storage
    def write(self, keys: list[Tensor], values: list[Tensor]) -> list[int]:
        """Store per-layer [H, n, D] keys/values (positions as computed) in new blocks."""
        n, bs = keys[0].shape[1], self.pool.block_size
        count = -(-n // bs)
        self._make_room(count)
        blocks = [self.pool.allocate() for _ in range(count)]
        for layer, (k, v) in enumerate(zip(keys, values)):
            for i, block in enumerate(blocks):
                part = slice(i * bs, min((i + 1) * bs, n))
                width = part.stop - part.start
                self.pool.keys[layer][block, :, :width] = k[:, part]
                self.pool.values[layer][block, :, :width] = v[:, part]
        return blocks

    def read(self, blocks: list[int], n: int, layer: int) -> tuple[Tensor, Tensor]:
        """Keys, values [H, n, D] of a stored run of `n` tokens."""
        table = torch.tensor([blocks], dtype=torch.long)
        k, v = gather_blocks(self.pool.keys[layer], table)[0], gather_blocks(self.pool.values[layer], table)[0]
        return k[:, :n], v[:, :n]

    def _make_room(self, count: int) -> None:
        if count > self.capacity:
            raise ValueError(f"a chunk of {count} blocks does not fit a store of {self.capacity}")
        while self.chunks and (self.used_blocks + count > self.capacity or self.pool.num_free < count):
            key = min(self.chunks, key=lambda c: self.chunks[c].uses / (1 + self.clock - self.chunks[c].last_use))
            for block in self.chunks.pop(key).blocks:
                self.pool.decref(block)
            self.evictions += 1

    def add(self, key: tuple, chunk: ChunkCache) -> None:
        old = self.chunks.pop(key, None)
        if old is not None:
            for block in old.blocks:
                self.pool.decref(block)
        chunk.last_use = self.clock
        self.chunks[key] = chunk


class DenseCache(KVCache):
    """A request's own dense cache that attends with `masked_attention` (one matmul per KV
    head: the fused 5-D attention of `cached_attention` is slow on CPU); same math."""

    def attend(self, layer: int, queries: Tensor, query_positions: Tensor, sliding_window: int | None) -> Tensor:
        e = self.layers[layer]
        assert e is not None
        return masked_attention(queries, [(e.keys, e.values, e.positions, e.valid)], query_positions, sliding_window)


class _Recorder(DenseCache):
    """A cache that records, for the tokens of new chunks, the share of their attention that
    goes to the chunks before them (Cache-Craft's inter-attention), summed over layers."""

    def __init__(self, n_layer: int, spans: list[tuple[int, int]], header: int) -> None:
        super().__init__(n_layer)
        self.spans, self.header = spans, header  # new chunks' [start, end) positions
        self.inter: dict[int, Tensor] = {}

    def after_attention(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        if not self.spans:
            return
        entry = self.layers[layer]
        assert entry is not None
        for start, end in self.spans:
            pick = ((query_positions[0] >= start) & (query_positions[0] < end)).nonzero().squeeze(1)
            before = ((entry.positions >= self.header) & (entry.positions < start)).to(entry.keys.dtype)
            # attention "output" with values 1 on the preceding chunks' slots = the share they got
            share = masked_attention(queries[:, :, pick], [(entry.keys, before[..., None], entry.positions,
                                                             entry.valid)], query_positions[:, pick])  # fmt: skip
            self.inter[start] = self.inter.get(start, 0) + share[0, :, :, 0].mean(0)


class CacheCraft:
    """Prefill RAG prompts (header, chunks, question) reusing chunk-caches (module docstring)."""

    def __init__(self, model: Transformer, store: ChunkStore, fraction: float, reuse_header: bool = True) -> None:
        if model.config.family != "llama":
            raise ValueError("chunk reuse re-rotates keys with RoPE: Llama-family models only")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.model, self.store, self.fraction, self.reuse_header = model, store, fraction, reuse_header
        self.n_layer = model.config.n_layer

    def rerotate(self, keys: Tensor, layer: int, delta: int) -> Tensor:
        """Keys [H, n, D] rotated by `delta` positions."""
        if delta == 0:
            return keys
        inv_freq = self.model.blocks[layer].attn.inv_freq
        positions = torch.full((1, keys.shape[1]), delta, dtype=torch.long)
        return apply_rope(keys[None], positions, inv_freq)[0]

    @torch.no_grad()
    def prefill(
        self, header: list[int], chunks: list[list[int]], question: list[int]
    ) -> tuple[KVCache, Tensor, Prefill]:
        """The prompt's KV cache (ready to decode), the last logits [1, 1, V] and the cost."""
        store = self.store
        store.clock += 1
        keys = [tuple(c) for c in chunks]
        starts, pos = [], len(header)
        for c in chunks:
            starts.append(pos)
            pos += len(c)
        total = pos + len(question)
        hits: list[tuple[int, ChunkCache, float]] = []  # (chunk index, cache, damage)
        floor = store.mean_cci()
        for i, key in enumerate(keys):
            cached = store.chunks.get(key)
            if cached is None:
                continue
            beta, gamma = overlap(cached.context, tuple(keys[:i]))
            exact = beta == 1.0 and gamma == 0.0 and cached.start == starts[i]
            cci = cached.cci if cached.context or not keys[:i] else max(cached.cci, floor)
            hits.append((i, cached, 0.0 if exact else cci * (1 - beta * (1 - gamma))))
        recompute = self._allocate(hits)
        # Assemble the reused KV: header (same positions) and the chunks' kept tokens, re-rotated.
        cache = _Recorder(self.n_layer, [(starts[i], starts[i] + len(chunks[i])) for i in range(len(chunks))
                                         if keys[i] not in store.chunks], len(header))  # fmt: skip
        header_hit = self.reuse_header and store.header is not None and store.header[0] == tuple(header)
        kept_positions: list[Tensor] = []
        per_layer: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(self.n_layer)]
        if header_hit:
            assert store.header is not None
            kept_positions.append(torch.arange(len(header)))
            for layer in range(self.n_layer):
                per_layer[layer].append(store.read(store.header[1], len(header), layer))
        for i, cached, _ in hits:
            keep = torch.ones(cached.length, dtype=torch.bool)
            keep[recompute[i]] = False
            kept_positions.append(starts[i] + keep.nonzero().squeeze(1))
            for layer in range(self.n_layer):
                k, v = store.read(cached.blocks, cached.length, layer)
                per_layer[layer].append((self.rerotate(k, layer, starts[i] - cached.start)[:, keep], v[:, keep]))
            cached.uses += 1
            cached.last_use = store.clock
        if kept_positions:
            positions = torch.cat(kept_positions)[None]
            valid = torch.ones_like(positions, dtype=torch.bool)
            for layer in range(self.n_layer):
                k = torch.cat([kv[0] for kv in per_layer[layer]], 1)[None]
                v = torch.cat([kv[1] for kv in per_layer[layer]], 1)[None]
                cache.update(layer, k, v, positions, valid)
        # One forward over everything not reused, in position order.
        prompt = torch.tensor(header + [t for c in chunks for t in c] + question)
        todo = torch.ones(total, dtype=torch.bool)
        if kept_positions:
            todo[torch.cat(kept_positions)] = False
        todo_positions = todo.nonzero().squeeze(1)
        logits = self.model(prompt[todo_positions][None], cache=cache, positions=todo_positions[None], last_only=True)
        cache.seen_tokens = total
        cache.spans = []  # decoding records nothing
        self._store_new(cache, header, chunks, keys, starts, header_hit)
        reused = total - len(todo_positions)
        return cache, logits, Prefill(len(todo_positions), reused, total, len(hits), len(chunks))

    def _allocate(self, hits: list[tuple[int, ChunkCache, float]]) -> dict[int, Tensor]:
        """Tokens to recompute per reused chunk: `fraction` of all reused chunk tokens, split by
        damage x length (capped at the chunk), the highest inter-attention tokens first."""
        out = {i: torch.zeros(0, dtype=torch.long) for i, _, _ in hits}
        budget = round(self.fraction * sum(c.length for _, c, _ in hits))
        weights = {i: d * c.length for i, c, d in hits}
        if self.fraction >= 1.0:
            weights = {i: float(c.length) for i, c, _ in hits}  # everything, whatever the damage
        counts = {i: 0 for i, _, _ in hits}
        room = {i: c.length for i, c, _ in hits}
        while budget > 0:  # water filling: capped chunks hand their share to the others
            open_ = {i: w for i, w in weights.items() if counts[i] < room[i] and w > 0}
            if not open_:
                break
            total = sum(open_.values())
            given = 0
            for i, w in open_.items():
                extra = min(room[i] - counts[i], max(1, round(budget * w / total)))
                extra = min(extra, budget - given)
                counts[i] += extra
                given += extra
            budget -= given
            if given == 0:
                break
        for i, cached, _ in hits:
            n = counts[i]
            tie = torch.linspace(1e-6, 0, cached.length)  # no recorded context: earliest tokens first
            out[i] = torch.topk(cached.inter + tie, n).indices if n else out[i]
        return out

    def _store_new(self, cache: _Recorder, header, chunks, keys, starts, header_hit) -> None:
        """Keep the KV of the header and of chunks seen for the first time (as computed now)."""
        store = self.store
        entry0 = cache.layers[0]
        assert entry0 is not None
        want = [] if header_hit else [(-1, 0, len(header))]
        want += [(i, starts[i], len(chunks[i])) for i in range(len(chunks)) if keys[i] not in store.chunks]
        for i, start, n in want:
            if n == 0:
                continue
            layer_kv = []
            for layer in range(self.n_layer):
                entry = cache.layers[layer]
                assert entry is not None
                pos = entry.positions[0, 0]
                order = torch.argsort(pos)
                order = order[(pos[order] >= start) & (pos[order] < start + n) & entry.valid[0, 0, order]]
                layer_kv.append((entry.keys[0][:, order], entry.values[0][:, order]))
            blocks = store.write([k for k, _ in layer_kv], [v for _, v in layer_kv])
            if i < 0:
                if store.header is not None:
                    for block in store.header[1]:
                        store.pool.decref(block)
                store.header = (tuple(header), blocks)
            else:
                inter = cache.inter.get(start, torch.zeros(n)) / self.n_layer
                store.add(keys[i], ChunkCache(tuple(keys[:i]), start, blocks, n, inter.float()))
