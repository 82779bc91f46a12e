"""KV-cache methods for the plaintext path, by command-line name.

    factory = make_policy("snapkv", 256)          # 256 tokens per KV head
    factory = make_policy("h2o", 0.2, recent_ratio=0.5)   # 20% of the prompt
    tokens = generate(model, ids, 32, policy=factory)

Each method is one small file; the interface they share is `mpcache.methods.base`.
"""

from __future__ import annotations

import dataclasses
import inspect

from mpcache.generate import CacheFactory
from mpcache.methods.attention_gate import AttentionGate
from mpcache.methods.base import Budget, PolicyCache, check_budget
from mpcache.methods.cake import CAKE
from mpcache.methods.compresskv import CompressKV
from mpcache.methods.d2o import D2O
from mpcache.methods.elastic_cache import ElasticCache
from mpcache.methods.ems import EMS
from mpcache.methods.epicache import EpiCache
from mpcache.methods.full import FullCache
from mpcache.methods.h2o import H2O
from mpcache.methods.kvmerger import KVMerger
from mpcache.methods.lazyeviction import LazyEviction
from mpcache.methods.locret import Locret
from mpcache.methods.mikv import MiKV
from mpcache.methods.mpcache import MPCache
from mpcache.methods.quest import Quest
from mpcache.methods.snapkv import SnapKV
from mpcache.methods.streamingllm import StreamingLLM
from mpcache.methods.think import ThinK
from mpcache.methods.tova import TOVA

_CLASSES: tuple[type[PolicyCache], ...] = (
    FullCache,
    StreamingLLM,
    H2O,
    SnapKV,
    TOVA,
    Quest,
    ThinK,
    MiKV,
    MPCache,
    CAKE,
    KVMerger,
    ElasticCache,
    D2O,
    CompressKV,
    LazyEviction,
    Locret,
    EMS,
    AttentionGate,
    EpiCache,
)
METHODS: dict[str, type[PolicyCache]] = {cls.name: cls for cls in _CLASSES}

# Command-line names still to be implemented (issue 5, part 2).
PLANNED: tuple[str, ...] = ()


def make_policy(name: str, budget: Budget | None = None, **kwargs) -> CacheFactory:
    """A factory building a fresh `name` cache per request (what `generate(policy=...)` takes).

    budget: tokens per KV head (int >= 1) or a ratio in (0, 1) of the prompt length; only
    "full" may omit it. kwargs: the method's knobs (see its class); unknown names and bad
    values raise here, before any request runs.
    """
    if name not in METHODS:
        if name in PLANNED:
            raise NotImplementedError(f"KV-cache method {name!r} is not implemented yet")
        raise ValueError(f"unknown KV-cache method {name!r}; known: {', '.join(METHODS)}")
    cls = METHODS[name]
    if cls.needs_budget:
        check_budget(budget)
    _check_knobs(cls, kwargs)
    # A throwaway instance, so bad option values fail now rather than mid-evaluation (the layer
    # count is only known per model; the factory checks layer_weights against it).
    cls(len(kwargs.get("layer_weights") or [0]), budget, **kwargs)

    def factory(model) -> PolicyCache:
        return cls.from_model(model, budget, **kwargs)

    return factory


def _check_knobs(cls: type[PolicyCache], kwargs: dict) -> None:
    """Reject option names no class in the method's hierarchy accepts."""
    accepted: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(vars(klass)["__init__"]).parameters.values()
            accepted |= {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if "Knobs" in vars(klass):  # a dataclass of options the constructor takes through **options
            accepted |= {f.name for f in dataclasses.fields(vars(klass)["Knobs"])}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"{cls.name} does not take option(s) {unknown}; it takes {sorted(accepted)}")


__all__ = ["METHODS", "PLANNED", "Budget", "PolicyCache", "make_policy"]
