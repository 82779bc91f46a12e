"""Serving many requests from one paged KV block store.

    pool = BlockPool.for_model(model, num_blocks=2048)       # one K and one V tensor per layer
    stats = Engine(model, pool).run([Request(prompt_ids, 32), ...])   # prefix sharing + batching

- `pool`: the preallocated blocks, free list, reference counts, copy-on-write.
- `paged`: block tables (`Sequence`), the paged `KVCache` the model attends through, and
  `paged_policy` (any `mpcache.methods` method on a request's own blocks).
- `radix`: prefix sharing over token blocks with LRU eviction (the vLLM/SGLang baseline).
- `engine`: continuous batching with memory-based admission.
"""

from mpcache.serving.engine import Engine, Request, RunStats, Scheduler
from mpcache.serving.paged import PagedKVCache, Sequence, forward, paged_policy
from mpcache.serving.pool import BlockPool, PoolExhausted
from mpcache.serving.radix import PrefixCache

__all__ = [
    "BlockPool",
    "Engine",
    "PagedKVCache",
    "PoolExhausted",
    "PrefixCache",
    "Request",
    "RunStats",
    "Scheduler",
    "Sequence",
    "forward",
    "paged_policy",
]
