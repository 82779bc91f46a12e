"""Serving many requests from one paged KV block store.

    pool = BlockPool.for_model(model, num_blocks=2048)       # one K and one V tensor per layer
    stats = Engine(model, pool).run([Request(prompt_ids, 32), ...])   # prefix sharing + batching

- `pool`: the preallocated blocks, free list, reference counts, copy-on-write.
- `paged`: block tables (`Sequence`), the paged `KVCache` the model attends through, and
  `paged_policy` (any `mpcache.methods` method on a request's own blocks).
- `radix`: prefix sharing over token blocks, evicting LRU (the vLLM/SGLang baseline) or by
  LSM-GNN's hybrid rule; `tiers`: the victim tier evicted blocks are demoted to (exact or int8).
- `engine`: continuous batching with memory-based admission.
- `batchllm`: BatchLLM's offline-batch scheduler (global prefix groups, decode-heavy first).
- `cachecraft`: Cache-Craft's chunk-cache reuse for RAG prompts (re-rotation + partial recompute).
- `policies/`, `traces`, `predictors`, `simulator`: block eviction policies (LRU, Belady,
  LSM-GNN, the one-bit policies of "Paging with Succinct Predictions") over numpy traces.
"""

from mpcache.serving.engine import Engine, Request, RunStats, Scheduler
from mpcache.serving.paged import PagedKVCache, Sequence, forward, paged_policy
from mpcache.serving.pool import BlockPool, PoolExhausted
from mpcache.serving.radix import PrefixCache
from mpcache.serving.tiers import VictimTier

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
    "VictimTier",
    "forward",
    "paged_policy",
]
