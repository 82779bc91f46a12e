"""Triton kernels for the plaintext path's hot loops, each beside the torch reference it is tested against.

    from mpcache import kernels
    kernels.available()            # CUDA + triton, or TRITON_INTERPRET=1 set before this import
    kernels.wanted(x)              # the switch: kernels for x? ("auto": CUDA tensors only; see runtime.py)
    with kernels.forced():         # run them wherever they can (tests: CPU tensors under the interpreter)
        ...
    out = kernels.decode_attention(q, entry, positions, index=idx, count=n, use_kernels=True)

One file per family: `decode.py` (decode attention over per-head variable-length caches, slot lists and block
tables, optionally with every slot's probability: `cached_attention`, `visibility`, `attention_probs`,
`decode_attention`, `decode_attention_probs`, `concat_layers`), `compact.py` (`gather_slots`), `merge.py`
(`merge_into`, `merge_kv`), `compressed.py` (MiKV's low-bit store and ThinK's pruned keys inside attention),
`paged.py` (`paged_attention`), `window.py` (`window_attention_sums`, `window_attention_stats`), `scores.py`
(`page_bound`, `approx_similarity`, `token_key_norms`, `channel_scores`). The model and the methods call these
functions; the kernels import nothing from them. Every function computes the torch reference unless called with
`use_kernels=True`, and then runs its Triton kernel only where `runs_on` its tensors (a CUDA device, or the CPU
under the interpreter); callers decide with the switch, `wanted` (runtime.py).

`TRITON_INTERPRET=1` must be in the environment before this package is first imported (mpcache.kernels.runtime).
The interpreter is for correctness tests only (~0.5 ms per program, ~1000x slower than torch); no timing from it
means anything.
"""

from __future__ import annotations

from mpcache.kernels.compact import gather_slots
from mpcache.kernels.decode import (
    attention_probs,
    cached_attention,
    concat_layers,
    decode_attention,
    decode_attention_probs,
    visibility,
)
from mpcache.kernels.merge import merge_into, merge_kv
from mpcache.kernels.runtime import INTERPRET, available, forced, mode, runs_on, set_mode, wanted
from mpcache.kernels.scores import (
    approx_similarity,
    channel_scores,
    cluster_representatives,
    page_bound,
    token_key_norms,
)
from mpcache.kernels.window import window_attention_stats, window_attention_sums

__all__ = [
    "INTERPRET",
    "approx_similarity",
    "attention_probs",
    "available",
    "cached_attention",
    "channel_scores",
    "cluster_representatives",
    "concat_layers",
    "decode_attention",
    "decode_attention_probs",
    "forced",
    "gather_slots",
    "merge_into",
    "merge_kv",
    "mode",
    "page_bound",
    "runs_on",
    "set_mode",
    "token_key_norms",
    "visibility",
    "wanted",
    "window_attention_stats",
    "window_attention_sums",
]
