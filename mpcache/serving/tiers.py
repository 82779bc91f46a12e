"""A second, slower KV tier for blocks the prefix cache evicts (LSM-GNN's victim buffer).

LSM-GNN demotes feature-cache victims that will be reused soon to host memory instead of
dropping them, and copies them back before they are needed. Here the pool's evicted
blocks go to `VictimTier`: `num_blocks` slots of separate tensors (on the CPU, or any
device), holding a block either as it is (`compress=False`: restoring is a byte copy, the
KV is exactly what was computed) or as int8 with one scale per token and head
(`compress=True`: absmax rounding, error <= scale / 2 = max |x| / 254 per element, about a
quarter of float32's bytes), so a CPU-only store still gains memory. A slot is handed out
by `put` and returned by `take` (the block goes back into the pool) or `drop`; when the
tier is full, `put` refuses and the caller drops its least recently demoted entry first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mpcache.serving.pool import BlockPool


class VictimTier:
    """`num_blocks` slots shaped like `pool`'s blocks (see the module docstring)."""

    def __init__(
        self, pool: BlockPool, num_blocks: int, compress: bool = True, device: torch.device | str = "cpu"
    ) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        self.pool, self.num_blocks, self.compress = pool, num_blocks, compress
        k0, v0 = pool.keys[0], pool.values[0]
        store = torch.int8 if compress else k0.dtype

        def alloc(like: Tensor) -> list[Tensor]:
            return [torch.zeros(num_blocks, *like.shape[1:], dtype=store, device=device) for _ in range(pool.n_layer)]

        self.keys, self.values = alloc(k0), alloc(v0)
        self.positions = [torch.zeros(num_blocks, *k0.shape[1:3], dtype=torch.int32, device=device)
                          for _ in range(pool.n_layer)]  # fmt: skip
        scale_shape = (num_blocks, *k0.shape[1:3], 1)
        self.key_scales = [torch.ones(scale_shape, device=device) for _ in range(pool.n_layer)] if compress else []
        self.value_scales = [torch.ones(scale_shape, device=device) for _ in range(pool.n_layer)] if compress else []
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def bytes(self) -> int:
        """Bytes of the tier's K/V storage (and scales), allocated once like the pool's."""
        tensors = self.keys + self.values + self.key_scales + self.value_scales
        return sum(t.numel() * t.element_size() for t in tensors)

    def put(self, block: int) -> int | None:
        """Copy pool block `block` (all layers) into a free slot; None when the tier is full."""
        if not self._free:
            return None
        slot = self._free.pop()
        for layer in range(self.pool.n_layer):
            for src, dst, scales in ((self.pool.keys, self.keys, self.key_scales),
                                     (self.pool.values, self.values, self.value_scales)):  # fmt: skip
                x = src[layer][block]
                if self.compress:
                    scale = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 127.0
                    dst[layer][slot] = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
                    scales[layer][slot] = scale
                else:
                    dst[layer][slot] = x
            self.positions[layer][slot] = self.pool.positions[layer][block]
        return slot

    def take(self, slot: int, block: int) -> None:
        """Write slot `slot` back into pool block `block` (all layers) and free the slot."""
        for layer in range(self.pool.n_layer):
            for src, dst, scales in ((self.keys, self.pool.keys, self.key_scales),
                                     (self.values, self.pool.values, self.value_scales)):  # fmt: skip
                x = src[layer][slot]
                if self.compress:
                    x = x.float() * scales[layer][slot]
                dst[layer][block] = x.to(dst[layer].dtype)
            self.pool.positions[layer][block] = self.positions[layer][slot]
        self.drop(slot)

    def drop(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_blocks:
            raise ValueError(f"slot {slot} is not in use")
        self._free.append(slot)
