"""Requests in the block pool: block tables, a paged `KVCache`, and KV-cache methods on it.

A `Sequence` is one request's KV: a block table (ids into the `BlockPool`, one reference
each) and the slots in use per (layer, KV head). `PagedKVCache` is the `KVCache` the model
runs a batch of sequences with: `update` writes the step's keys and values into the
sequences' blocks and `attend` reads them back through the block tables
(`mpcache.kernels.paged.paged_attention`), so nothing but the pool holds KV.

Copy-on-write: before a forward, `Sequence.reserve` makes every block that the step will
write private. A block shared with another request or with the prefix cache (a common
prefix whose last block is only partly common, or a `fork`) is copied at the first
divergent token; the other holders keep the original.

KV-cache methods (`mpcache.methods`) run on a request's own blocks through `paged_policy`:
the method's class is combined with `PagedKVCache` (it sits where `KVCache` sat below
`PolicyCache`), so during a layer's forward the method sees that layer as the usual padded
`LayerKV`, gathered from the blocks, and its `keep` compacts every head inside the
request's blocks (copying shared ones first) and returns the blocks no layer needs any
more to the pool. Between forwards only the lengths stay (no second copy of the KV).
Methods that merge or quantize evicted tokens work the same way (they edit the gathered
layer before `keep` writes it back); side stores a method keeps itself stay its own.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import ClassVar

import torch
from torch import Tensor

from mpcache.kernels import wanted
from mpcache.kernels.paged import gather_blocks, paged_attention
from mpcache.model.cache import KVCache, LayerKV
from mpcache.model.transformer import Transformer
from mpcache.serving.pool import BlockPool


class Sequence:
    """One request's KV in `pool`: `blocks` (its block table) and `lengths` [n_layer, n_kv_head],
    the slots in use per layer and head; `num_tokens` is the position of the next token.

    blocks: ids the sequence already holds one reference to each (e.g. a cached prefix);
    cached: how many leading slots of them hold valid tokens (positions 0..cached-1).
    """

    def __init__(self, pool: BlockPool, blocks: Seq[int] = (), cached: int = 0) -> None:
        if cached < 0 or cached > len(blocks) * pool.block_size:
            raise ValueError(f"cached={cached} tokens do not fit {len(blocks)} blocks of {pool.block_size}")
        self.pool = pool
        self.blocks = list(blocks)
        self.lengths = torch.full((pool.n_layer, pool.n_kv_head), cached, dtype=torch.long)
        self.num_tokens = cached

    @property
    def max_length(self) -> int:
        return int(self.lengths.max())

    def blocks_for(self, slots: int) -> int:
        return -(-slots // self.pool.block_size)

    def reserve(self, n: int) -> None:
        """Room for `n` more slots on every head: new blocks at the end, and private copies of
        the shared blocks those slots fall into (copy-on-write at the first divergent token)."""
        bs = self.pool.block_size
        first = int(self.lengths.min()) // bs
        needed = self.blocks_for(self.max_length + n)
        for i in range(first, min(needed, len(self.blocks))):
            self.blocks[i] = self.pool.writable(self.blocks[i])
        while len(self.blocks) < needed:
            self.blocks.append(self.pool.allocate())

    def trim(self) -> None:
        """Return the blocks past the longest head of any layer to the pool."""
        needed = self.blocks_for(self.max_length)
        for block in self.blocks[needed:]:
            self.pool.decref(block)
        del self.blocks[needed:]

    def fork(self) -> Sequence:
        """A second sequence sharing every block (parallel sampling); the first write to a
        shared block copies it."""
        other = Sequence(self.pool)
        for block in self.blocks:
            self.pool.incref(block)
        other.blocks = list(self.blocks)
        other.lengths = self.lengths.clone()
        other.num_tokens = self.num_tokens
        return other

    def release(self) -> None:
        """Drop this sequence's references (shared blocks live on with their other holders)."""
        for block in self.blocks:
            self.pool.decref(block)
        self.blocks = []
        self.lengths.zero_()


class PagedKVCache(KVCache):
    """A batch of `Sequence`s as the model's KV cache (see the module docstring).

    Use `forward` (below), or: `positions = cache.prepare(T)`, run the model with those
    positions, then `cache.commit()`. Every row is one whole request: no padding.
    """

    materialize: ClassVar[bool] = False  # True for KV-cache methods: a dense view per layer during its forward

    def __init__(self, n_layer: int, pool: BlockPool | None = None, seqs: Seq[Sequence] = ()) -> None:
        super().__init__(n_layer)
        self.pool: BlockPool | None = None
        self.seqs: list[Sequence] = []
        self._tables: Tensor | None = None
        self._lengths: Tensor | None = None  # [n_layer, B, Hkv] during a forward
        self._step_tokens = 0
        self._pending: list[bool] = []  # layers that have not written this forward's tokens yet
        self._groups: list[tuple[Tensor, int]] | None = None  # rows sharing leading blocks (cascade attention)
        if pool is not None:
            self.attach(pool, seqs)

    def attach(self, pool: BlockPool, seqs: Seq[Sequence]) -> None:
        if pool.n_layer != len(self.layers):
            raise ValueError(f"the pool has {pool.n_layer} layers, the cache {len(self.layers)}")
        if any(s.pool is not pool for s in seqs):
            raise ValueError("every sequence must live in the cache's pool")
        self.pool, self.seqs = pool, list(seqs)

    # ------------------------------------------------------------- forwards
    def prepare(self, n: int) -> Tensor:
        """Reserve `n` slots per sequence; returns the step's token positions [B, n]."""
        if self.pool is None or not self.seqs:
            raise ValueError("attach a pool and at least one sequence before a forward")
        if n < 1:
            raise ValueError(f"a forward needs at least one token, got {n}")
        for seq in self.seqs:
            seq.reserve(n)
        self._step_tokens = n
        self._pending = [True] * len(self.layers)
        self._groups = self._shared_prefixes()
        self._sync_tables()
        self._lengths = torch.stack([s.lengths for s in self.seqs], 1).to(self.pool.keys[0].device)
        start = torch.tensor([s.num_tokens for s in self.seqs], device=self._lengths.device)
        return start[:, None] + torch.arange(n, device=start.device)

    def commit(self) -> None:
        """Write the forward's lengths back to the sequences."""
        assert self._lengths is not None, "commit() follows prepare() and a forward"
        for i, seq in enumerate(self.seqs):
            seq.lengths = self._lengths[:, i].cpu().clone()
            seq.num_tokens += self._step_tokens
            seq.trim()
        self._lengths, self._step_tokens = None, 0

    def _shared_prefixes(self) -> list[tuple[Tensor, int]] | None:
        """Rows whose tables start with the same full blocks, and how many (after `reserve`:
        a partly shared block was already copied)."""
        bs = self.pool.block_size if self.pool is not None else 1
        by_first: dict[int, list[int]] = {}
        for i, seq in enumerate(self.seqs):
            if seq.blocks:
                by_first.setdefault(seq.blocks[0], []).append(i)
        groups = []
        for rows in by_first.values():
            if len(rows) < 2:
                continue
            first = self.seqs[rows[0]].blocks
            limit = min(int(self.seqs[i].lengths.min()) for i in rows) // bs
            common = 0
            while common < limit and all(self.seqs[i].blocks[common] == first[common] for i in rows):
                common += 1
            if common:
                groups.append((torch.tensor(rows), common))
        return groups or None

    def _sync_tables(self) -> None:
        width = max(len(s.blocks) for s in self.seqs)
        tables = torch.zeros(len(self.seqs), max(width, 1), dtype=torch.long)
        for i, seq in enumerate(self.seqs):
            tables[i, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.long)
        assert self.pool is not None
        self._tables = tables.to(self.pool.keys[0].device)

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> LayerKV:
        if self._lengths is None or self._tables is None or self.pool is None:
            raise RuntimeError("PagedKVCache.prepare(n) must run before the forward (it reserves the blocks)")
        b, h, t, d = keys.shape
        if b != len(self.seqs) or h != self.pool.n_kv_head or t != self._step_tokens:
            raise ValueError(
                f"keys {tuple(keys.shape)} do not match the prepared batch: B={len(self.seqs)}, "
                f"Hkv={self.pool.n_kv_head}, T={self._step_tokens}"
            )
        if not bool(valid.all()):
            raise ValueError("the paged store takes whole requests per row: no padding tokens")
        slots = self._lengths[layer][..., None] + torch.arange(t, device=keys.device)  # [B, H, T]
        flat = self._flat_slots(slots)
        k_pool, v_pool, p_pool = self.pool.layer_tensors(layer)
        k_pool.view(-1, d).index_copy_(0, flat, keys.reshape(-1, d).to(k_pool.dtype))
        v_pool.view(-1, values.shape[-1]).index_copy_(0, flat, values.reshape(-1, values.shape[-1]).to(v_pool.dtype))
        p_pool.view(-1).index_copy_(0, flat, positions[:, None, :].expand(b, h, t).reshape(-1).to(p_pool.dtype))
        self._lengths[layer] += t
        self._pending[layer] = False
        if self.materialize:
            self.layers[layer] = self._view(layer)
        return self.layers[layer]  # type: ignore[return-value]  (None unless a method needs the dense view)

    def _flat_slots(self, slots: Tensor) -> Tensor:
        """Row index into a pool tensor viewed as [N * Hkv * bs, ...] of slot `slots[b, h, j]`."""
        assert self.pool is not None and self._tables is not None
        b, h, n = slots.shape
        bs = self.pool.block_size
        block = self._tables.gather(1, (slots // bs).reshape(b, -1)).view(b, h, n)
        head = torch.arange(h, device=slots.device)[None, :, None]
        return ((block * h + head) * bs + slots % bs).reshape(-1)

    def attend(self, layer: int, queries: Tensor, query_positions: Tensor, sliding_window: int | None) -> Tensor | None:
        if self.materialize:
            return None  # a KV-cache method picks what attention reads from its view
        assert self.pool is not None and self._tables is not None and self._lengths is not None
        k_pool, v_pool, p_pool = self.pool.layer_tensors(layer)
        return paged_attention(
            queries, k_pool, v_pool, p_pool, self._tables, self._lengths[layer], query_positions, sliding_window,
            self._groups,
            use_kernels=wanted(queries),  # decode steps through the paged kernel (on CUDA by default)
        )  # fmt: skip

    # ------------------------------------------------ dense views for methods
    def _view(self, layer: int) -> LayerKV:
        """This layer of the batch as a padded `LayerKV`, gathered through the block tables."""
        assert self.pool is not None and self._tables is not None and self._lengths is not None
        k_pool, v_pool, p_pool = self.pool.layer_tensors(layer)
        keys = gather_blocks(k_pool, self._tables)
        lengths = self._lengths[layer].clone()
        valid = torch.arange(keys.shape[2], device=keys.device) < lengths[..., None]
        positions = gather_blocks(p_pool, self._tables).long()
        return LayerKV(keys, gather_blocks(v_pool, self._tables), positions, valid, lengths)

    def keep(self, layer: int, index: Tensor, count: Tensor | None = None) -> None:
        """Keep slots `index` of every head (as `KVCache.keep`), compacted inside the blocks."""
        if not self.materialize or self.layers[layer] is None:
            raise RuntimeError("keep() runs during a KV-cache method's forward (see paged_policy)")
        super().keep(layer, index, count)  # the compact padded layer, checked as for the dense cache
        entry = self.layers[layer]
        assert entry is not None and self.pool is not None and self._lengths is not None
        width = entry.capacity
        for seq in self.seqs:  # the compact slots [0, width) are written: their blocks must be private
            for i in range(seq.blocks_for(width)):
                seq.blocks[i] = self.pool.writable(seq.blocks[i])
        self._sync_tables()
        b, h = entry.lengths.shape
        if width:
            slots = torch.arange(width, device=entry.keys.device).expand(b, h, width)
            flat = self._flat_slots(slots)
            k_pool, v_pool, p_pool = self.pool.layer_tensors(layer)
            k_pool.view(-1, k_pool.shape[-1]).index_copy_(0, flat, entry.keys.reshape(-1, k_pool.shape[-1]))
            v_pool.view(-1, v_pool.shape[-1]).index_copy_(0, flat, entry.values.reshape(-1, v_pool.shape[-1]))
            p_pool.view(-1).index_copy_(0, flat, entry.positions.reshape(-1).to(p_pool.dtype))
        self._lengths[layer] = entry.lengths
        pending = torch.tensor(self._pending, device=entry.lengths.device)[:, None, None] * self._step_tokens
        longest = (self._lengths + pending).amax((0, 2))  # [B]: later layers still write this step's tokens
        for i, seq in enumerate(self.seqs):  # blocks no layer needs any more go back to the pool
            needed = seq.blocks_for(int(longest[i]))
            for block in seq.blocks[needed:]:
                self.pool.decref(block)
            del seq.blocks[needed:]
        self._sync_tables()

    def drop_view(self, layer: int) -> None:
        """After a layer's forward: keep only its lengths (attention re-gathers next step)."""
        entry = self.layers[layer]
        if entry is None:
            return
        b, h = entry.lengths.shape
        empty = entry.keys.new_zeros(()).expand(b, h, 0, entry.keys.shape[-1])
        none = torch.zeros((), dtype=torch.bool, device=entry.keys.device).expand(b, h, 0)
        self.layers[layer] = LayerKV(empty, empty, none.long(), none, entry.lengths)

    # ---------------------------------------------------------------- reports
    def tokens_per_head(self, layer: int) -> Tensor:
        if self._lengths is not None:
            return self._lengths[layer].clone()
        return torch.stack([s.lengths[layer] for s in self.seqs])

    def memory_bytes(self) -> int:
        """Bytes of the distinct blocks this batch holds (a block shared by two rows counts once)."""
        assert self.pool is not None
        return len({block for seq in self.seqs for block in seq.blocks}) * self.pool.block_bytes


@torch.no_grad()
def forward(model: Transformer, cache: PagedKVCache, input_ids: Tensor, last_only: bool = True) -> Tensor:
    """Run `input_ids` [B, T] (each row continuing its sequence) through `model` on the paged
    store; returns the logits ([B, 1, V] with `last_only`)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != len(cache.seqs):
        raise ValueError(f"input_ids must be [B={len(cache.seqs)}, T], got {tuple(input_ids.shape)}")
    positions = cache.prepare(input_ids.shape[1])
    logits = model(input_ids, cache=cache, positions=positions, last_only=last_only)
    cache.commit()
    return logits


_PAGED_CLASSES: dict[type, type] = {}


def paged_policy(name: str, budget=None, **kwargs):
    """A factory (model, pool, seqs) -> cache running KV-cache method `name` (as
    `mpcache.methods.make_policy` takes it) on the sequences' own blocks."""
    from mpcache.methods import METHODS, make_policy

    make_policy(name, budget, **kwargs)  # checks the name, budget and knobs now
    cls = METHODS[name]
    if cls not in _PAGED_CLASSES:

        def after_attention(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
            super(paged, self).after_attention(layer, queries, query_positions)  # the method compresses here
            self.drop_view(layer)

        body = {"materialize": True, "after_attention": after_attention}
        paged = type(f"Paged{cls.__name__}", (cls, PagedKVCache), body)
        _PAGED_CLASSES[cls] = paged
    paged_cls = _PAGED_CLASSES[cls]

    def factory(model: Transformer, pool: BlockPool, seqs: Seq[Sequence]) -> PagedKVCache:
        cache = paged_cls.from_model(model, budget, **kwargs)
        cache.attach(pool, seqs)
        return cache

    return factory
