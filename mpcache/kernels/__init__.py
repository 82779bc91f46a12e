"""Triton kernels for the plaintext path's hot loops, each beside the torch reference it is tested against.

    from mpcache import kernels
    kernels.available()            # CUDA + triton, or TRITON_INTERPRET=1 set before this import
    kernels.enable(model)          # decode steps of `model` use the Triton decode kernel
    out = kernels.decode_attention(q, entry, positions, index=idx, count=n, use_kernels=True)

One file per family: `decode.py` (attention over per-head variable-length caches: `cached_attention`,
`visibility`, `gather_slots`, `decode_attention`), `window.py` (`attention_probs`, `window_attention_sums`),
`scores.py` (`page_bound`, `approx_similarity`, `token_key_norms`, `channel_scores`). The model and the methods
call these functions; the kernels import nothing from them. Every function computes the torch reference unless
called with `use_kernels=True`, and then runs its Triton kernel only where `runs_on` its tensors (a CUDA device, or
the CPU under the interpreter); the model asks for the decode kernel when `enable`d.

`TRITON_INTERPRET=1` must be in the environment before this package is first imported (mpcache.kernels.runtime).
The interpreter is for correctness tests only (~0.5 ms per program, ~1000x slower than torch); no timing from it
means anything.
"""

from __future__ import annotations

from torch import nn

from mpcache.kernels.decode import cached_attention, decode_attention, gather_slots, visibility
from mpcache.kernels.runtime import INTERPRET, available, runs_on
from mpcache.kernels.scores import (
    approx_similarity,
    channel_scores,
    cluster_representatives,
    page_bound,
    token_key_norms,
)
from mpcache.kernels.window import attention_probs, window_attention_sums


def enable(model: nn.Module, on: bool = True) -> nn.Module:
    """Route the decode steps (one query token) of every attention layer of `model` (the modules with a
    `use_kernels` flag, mpcache.model.transformer.Attention) through `decode_attention`'s Triton kernel where it
    `runs_on`; `on=False` undoes it."""
    for module in model.modules():
        if hasattr(module, "use_kernels"):
            module.use_kernels = on
    return model


__all__ = [
    "INTERPRET",
    "approx_similarity",
    "attention_probs",
    "available",
    "cached_attention",
    "channel_scores",
    "cluster_representatives",
    "decode_attention",
    "enable",
    "gather_slots",
    "page_bound",
    "runs_on",
    "token_key_norms",
    "visibility",
    "window_attention_sums",
]
