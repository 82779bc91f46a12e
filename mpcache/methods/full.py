"""Full cache: keeps every token (the reference every method is compared against)."""

from __future__ import annotations

from typing import ClassVar

from mpcache.methods.base import PolicyCache


class FullCache(PolicyCache):
    """Never compresses; the budget, if given, is ignored."""

    name: ClassVar[str] = "full"
    needs_budget: ClassVar[bool] = False
    compress_prefill: ClassVar[bool] = False
