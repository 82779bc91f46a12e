"""Private KV caches: eviction on secret shares. MPCache (`mpcache`) and the StreamingLLM / H2O baselines
(`baselines`), each the private twin of its plaintext method in mpcache/methods/, and the registry the generate job
(parties/jobs.py) and bench.mpc_decode build them from."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpcache.mpc.nn.layers import PrivateKVCache

# name -> (module, class) of a private KV cache taking (n_layer, budget, **knobs); imported when used (it loads
# CrypTen), so a benchmark's parent process can list the names cheaply
PRIVATE_CACHES = {
    "mpcache": ("mpcache.mpc.caches.mpcache", "PrivateMPCache"),
    "streamingllm": ("mpcache.mpc.caches.baselines", "PrivateStreamingLLM"),
    "h2o": ("mpcache.mpc.caches.baselines", "PrivateH2O"),
}


def private_cache(n_layer: int, spec: dict | None) -> PrivateKVCache:
    """The private KV cache a decode run uses: spec None or {"method": "full"} keeps everything; otherwise
    {"method": name, "budget": tokens per KV head, "knobs": {...}} (public: both parties build the same one).
    Raises ValueError with the reason on any malformed spec."""
    from mpcache.mpc.nn.layers import PrivateKVCache

    if spec is None:
        return PrivateKVCache(n_layer)
    if not isinstance(spec, dict) or set(spec) - {"method", "budget", "knobs"}:
        raise ValueError(f'kv_cache must be {{"method", "budget", "knobs"}}, got {spec!r}')
    method, budget, knobs = spec.get("method", "full"), spec.get("budget"), spec.get("knobs") or {}
    if method == "full":
        if budget is not None or knobs:
            raise ValueError("the full cache takes no budget or knobs")
        return PrivateKVCache(n_layer)
    if method not in PRIVATE_CACHES:
        raise ValueError(f"unknown private KV cache {method!r}; expected full or one of {sorted(PRIVATE_CACHES)}")
    if not isinstance(knobs, dict):
        raise ValueError(f"knobs must be an object, got {knobs!r}")
    module, name = PRIVATE_CACHES[method]
    try:
        return getattr(importlib.import_module(module), name)(n_layer, budget, **knobs)
    except TypeError as error:  # an unknown knob
        raise ValueError(f"{method}: {error}") from None
