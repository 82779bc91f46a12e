"""BatchLLM's scheduling of an offline batch (Zheng et al., arXiv 2412.03594).

The whole batch is known up front, so instead of discovering shared prefixes by chance in
an LRU cache, BatchLLM:

1. finds the common prefixes globally: a trie over all prompts (block granularity here),
   cut at one level by dynamic programming, each cut node a group prefix, maximising the
   tokens shared, sum over groups of (members - 1) * prefix length (best(node) = max of
   cutting here or the best of the children);
2. schedules the requests of a group together, the group's prefix computed once, pinned in
   the prefix cache from its first admission to its last completion, then freed (no LRU;
   leading blocks that a group still to run shares stay cached);
3. puts requests with a larger share of decoding (max_new_tokens / prompt length) first,
   groups ordered by their mean share, so decode-heavy requests overlap the prefills of the
   prefill-heavy ones admitted after them instead of forming a long decode tail;
4. batches by memory: admission is limited by free KV blocks (the engine's rule), not by a
   request count (`max_batch=None`).

The paper's fused prefix-shared attention kernel is not reproduced (the engine's paged
attention reads a shared prefix once per request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpcache.serving.engine import Engine, Request, Scheduler
from mpcache.serving.radix import Node


@dataclass
class _Trie:
    count: int = 0
    children: dict[tuple[int, ...], _Trie] = field(default_factory=dict)


@dataclass
class Group:
    prefix: list[int]  # the shared tokens (whole blocks)
    members: list[Request]
    pinned: list[Node] = field(default_factory=list)
    open: int = 0  # members admitted and not finished yet + members not admitted yet

    @property
    def decode_share(self) -> float:
        return sum(r.max_new_tokens / len(r.prompt) for r in self.members) / len(self.members)


def group_prefixes(prompts: list[list[int]], block_size: int) -> list[tuple[int, list[int]]]:
    """The one-level grouping that maximises shared tokens: for every prompt, (group id,
    shared prefix tokens); prompts sharing nothing get their own group with an empty prefix."""
    root = _Trie()
    for prompt in prompts:
        node = root
        for start in range(0, len(prompt) - block_size + 1, block_size):
            node = node.children.setdefault(tuple(prompt[start : start + block_size]), _Trie())
            node.count += 1

    best: dict[int, tuple[int, bool]] = {}  # id(node) -> (value, cut here)

    def solve(node: _Trie, depth: int) -> int:
        below = sum(solve(child, depth + 1) for child in node.children.values())
        here = (node.count - 1) * depth * block_size if depth else -1
        best[id(node)] = (max(here, below), here > below and here > 0)
        return best[id(node)][0]

    solve(root, 0)
    out: list[tuple[int, list[int]]] = []
    cuts: dict[int, int] = {}
    for prompt in prompts:
        node, depth = root, 0
        while True:
            if best[id(node)][1]:
                gid = cuts.setdefault(id(node), len(cuts))
                out.append((gid, prompt[: depth * block_size]))
                break
            key = tuple(prompt[depth * block_size : (depth + 1) * block_size])
            if len(key) < block_size or key not in node.children:
                out.append((-1, []))
                break
            node, depth = node.children[key], depth + 1
    singles = len(cuts)
    return [(gid if gid >= 0 else singles + i, prefix) for i, (gid, prefix) in enumerate(out)]


class BatchLLM(Scheduler):
    """Global prefix groups, decode-heavy first, pinned group prefixes, memory-based batching."""

    name = "batchllm"

    def __init__(self, block_size: int = 16, max_batch: int | None = None) -> None:
        super().__init__(max_batch)
        self.block_size = block_size
        self.groups: dict[int, Group] = {}
        self._group_of: dict[int, Group] = {}

    def order(self, requests: list[Request]) -> list[Request]:
        assignment = group_prefixes([r.prompt for r in requests], self.block_size)
        self.groups, self._group_of = {}, {}
        for request, (gid, prefix) in zip(requests, assignment):
            group = self.groups.setdefault(gid, Group(prefix, []))
            group.members.append(request)
            self._group_of[id(request)] = group
        for group in self.groups.values():
            group.members.sort(key=lambda r: -r.max_new_tokens / len(r.prompt))
            group.open = len(group.members)
        ordered = sorted(self.groups.values(), key=lambda g: -g.decode_share)
        return [r for group in ordered for r in group.members]

    def admitted(self, request: Request, engine: Engine) -> None:
        group = self._group_of[id(request)]
        if group.prefix and not group.pinned and engine.prefix is not None:
            group.pinned = engine.prefix.pin(group.prefix)

    def finished(self, request: Request, engine: Engine) -> None:
        """After a group's last request: free its prefix blocks, but for the leading blocks a
        group still to run shares (e.g. a system prompt above several few-shot prefixes)."""
        group = self._group_of[id(request)]
        group.open -= 1
        if group.open == 0 and group.pinned and engine.prefix is not None:
            pending = [g.prefix for g in self.groups.values() if g.open]
            shared = max((_common_blocks(group.prefix, p, self.block_size) for p in pending), default=0)
            engine.prefix.unpin(group.pinned)
            engine.prefix.drop(group.pinned[shared:])
            group.pinned = []


def _common_blocks(a: list[int], b: list[int], block_size: int) -> int:
    n = 0
    while (n + 1) * block_size <= min(len(a), len(b)):
        part = slice(n * block_size, (n + 1) * block_size)
        if a[part] != b[part]:
            break
        n += 1
    return n
