"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks + a rolling recent window.

Keeps the first `sink` tokens and the most recent budget - sink tokens of every head,
after the prompt and after every decode step, regardless of content. Unlike the
original (which re-indexes positions inside the cache), kept keys keep their original
positions, as kvpress's StreamingLLMPress does: RoPE was applied before storing them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mpcache.methods.base import Budget, PolicyCache


class StreamingLLM(PolicyCache):
    name: ClassVar[str] = "streamingllm"
    default_decode_interval: ClassVar[int] = 1

    def __init__(self, n_layer: int, budget: Budget, *, sink: int = 4, **common) -> None:
        super().__init__(n_layer, budget, sink=sink, **common)

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        entry = self.layers[layer]
        assert entry is not None
        return torch.zeros(entry.valid.shape, device=entry.keys.device)  # only protection decides

    def protection(self, layer: int, budget: Tensor) -> tuple[int | Tensor, int | Tensor]:
        return self.sink, (budget - self.sink).clamp(min=0)
