"""TOVA, Token Omission Via Attention (Oren et al., arXiv 2401.06104).

After the prompt and after every decode step, keep the tokens with the highest attention
from the step's LAST query, averaged over all query heads of the layer; every KV head of
the layer keeps the same set. No sink or recent window is forced; once full, exactly one
token is dropped per decode step.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from mpcache.methods.base import PolicyCache


class TOVA(PolicyCache):
    name: ClassVar[str] = "tova"
    default_decode_interval: ClassVar[int] = 1
    keeps_probs: ClassVar[bool] = True  # decode steps read the step's attention

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        last = self.attention_received(layer, queries, query_positions, last=1)  # [B, Hkv, G, L]
        shared = last.mean((1, 2))  # one score per slot for the whole layer
        return shared[:, None, :].expand(-1, last.shape[1], -1)
