"""The KV block pool: one preallocated key tensor and one value tensor per layer.

A block holds `block_size` token slots of every KV head of every layer; its id indexes
all layers' tensors at once, so one block table serves the whole model (as in vLLM). The
pool hands out ids from a free list and counts references: a block shared by several
requests (a common prefix) or held by the prefix cache returns to the free list only when
its last holder lets go. Writers copy a shared block before changing it (`copy_block`,
copy-on-write), so sharing never lets one request see another's tokens.

Memory is the pool's: the tensors are allocated once, at construction, and "KV bytes in
use" is the number of referenced blocks times `block_bytes`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PoolExhausted(RuntimeError):
    """No free block is left (callers evict cached blocks or wait for requests to finish)."""


class BlockPool:
    """`num_blocks` KV blocks of `block_size` slots for `n_layer` layers of `n_kv_head` heads.

    keys[l], values[l]: [num_blocks, n_kv_head, block_size, head_dim] (value_dim for values).
    positions[l]: [num_blocks, n_kv_head, block_size] int32, each slot's token position
    (per layer and head: per-head eviction and chunk reuse move tokens around).
    """

    def __init__(
        self,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("n_layer", n_layer), ("n_kv_head", n_kv_head), ("head_dim", head_dim),
                            ("num_blocks", num_blocks), ("block_size", block_size)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        value_dim = head_dim if value_dim is None else value_dim
        shape = (num_blocks, n_kv_head, block_size)
        self.keys = [torch.zeros(*shape, head_dim, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(*shape, value_dim, dtype=dtype, device=device) for _ in range(n_layer)]
        self.positions = [torch.zeros(shape, dtype=torch.int32, device=device) for _ in range(n_layer)]
        self.n_layer, self.n_kv_head, self.block_size, self.num_blocks = n_layer, n_kv_head, block_size, num_blocks
        self.refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self.peak_used = 0
        self.copies = 0  # copy-on-write block copies made so far

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16) -> BlockPool:
        """A pool shaped for `model` (a `mpcache.model.Transformer`), in its parameters' dtype."""
        config = model.config
        param = next(model.parameters())
        return cls(config.n_layer, config.n_kv_head, config.head_dim, num_blocks, block_size,
                   dtype=param.dtype, device=param.device)  # fmt: skip

    # ------------------------------------------------------------------ ids
    def allocate(self) -> int:
        """A free block with one reference (its contents are stale: the caller writes it)."""
        if not self._free:
            raise PoolExhausted(f"all {self.num_blocks} KV blocks are in use")
        block = self._free.pop()
        self.refcount[block] = 1
        self.peak_used = max(self.peak_used, self.num_blocks - len(self._free))
        return block

    def incref(self, block: int) -> None:
        if self.refcount[block] < 1:
            raise ValueError(f"block {block} is free; only a held block can gain a reference")
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        """Drop one reference; the block returns to the free list at zero."""
        if self.refcount[block] < 1:
            raise ValueError(f"block {block} is already free (double release)")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)

    def copy_block(self, src: int, dst: int, slots: int | None = None) -> None:
        """Copy the first `slots` slots (default all) of block `src` into `dst`, every layer."""
        part = slice(0, self.block_size if slots is None else slots)
        for store in (self.keys, self.values, self.positions):
            for layer in store:
                layer[dst, :, part] = layer[src, :, part]
        self.copies += 1

    def writable(self, block: int, slots: int | None = None) -> int:
        """`block` itself if this holder is its only one, else a private copy (copy-on-write):
        the copy takes this holder's reference, the shared original keeps the others'."""
        if self.refcount[block] == 1:
            return block
        copy = self.allocate()
        self.copy_block(block, copy, slots)
        self.decref(block)
        return copy

    # ---------------------------------------------------------------- sizes
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def block_bytes(self) -> int:
        """Key + value bytes of one block over all layers (positions are metadata, not counted)."""
        per_layer = self.keys[0][0].numel() * self.keys[0].element_size()
        per_layer += self.values[0][0].numel() * self.values[0].element_size()
        return per_layer * self.n_layer

    @property
    def used_bytes(self) -> int:
        return self.num_used * self.block_bytes

    @property
    def peak_bytes(self) -> int:
        return self.peak_used * self.block_bytes

    def reset_peak(self) -> None:
        self.peak_used = self.num_used

    def layer_tensors(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.keys[layer], self.values[layer], self.positions[layer]
