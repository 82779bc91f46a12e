"""Prefix sharing: a radix tree over token blocks; eviction of unreferenced blocks (LRU or
LSM-GNN's hybrid) to nothing or to a victim tier.

Every node is one full block of `block_size` tokens; its key is the block's tokens and its
place in the tree is the whole prefix before it, so a node stands for "these tokens after
exactly that prefix" (the hash chain of vLLM's automatic prefix caching, the radix tree of
SGLang's RadixAttention at block granularity). The tree holds one reference to each
node's block. A new request walks the tree with its prompt and shares every matching
block; in the first block that differs it shares the common leading tokens too, and the
pool copies that block when the request writes its first divergent token.

Eviction: blocks only the tree still references are freed leaves before their parents, so
what stays in the pool is always a prefix, in priority order:

- `weight=0` (the vLLM/SGLang baseline): least recently used first;
- `weight>0`: LSM-GNN's hybrid (`policies/lsm_gnn.py`, the same rule the simulator runs):
  last access + weight * pool blocks * log2(requests the block served, in four levels), and
  blocks on the paths of the `upcoming` prompts (the scheduler's waiting queue) go last.

With a `VictimTier`, victims are demoted there instead of dropped (under LRU every victim, a
plain second LRU tier; under the hybrid those that served >= 2 requests or that an upcoming
prompt needs): the node stays in the tree without a pool block, and a later `match` (or
`prefetch`, ahead of the request) copies it back into a fresh block, so its tokens are not
recomputed. When the tier is full, its least recently demoted entry is
dropped, with the demoted nodes below it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from mpcache.serving.policies.lsm_gnn import LEVEL_OF, importance
from mpcache.serving.pool import BlockPool
from mpcache.serving.tiers import VictimTier


class Node:
    __slots__ = ("key", "block", "parent", "children", "last_access", "pinned", "served", "slot")

    def __init__(self, key: tuple[int, ...], block: int, parent: Node | None) -> None:
        self.key, self.block, self.parent = key, block, parent  # block -1: not in the pool
        self.children: dict[tuple[int, ...], Node] = {}
        self.last_access = 0
        self.pinned = 0  # holders that forbid eviction (BatchLLM pins a group's prefix)
        self.served = 1  # requests whose prompt used this block (the hybrid's static importance)
        self.slot = -1  # its victim-tier slot while demoted


class PrefixCache:
    """The radix tree of cached blocks of `pool` (see the module docstring)."""

    def __init__(self, pool: BlockPool, weight: float = 0.0, tier: VictimTier | None = None) -> None:
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if tier is not None and tier.pool is not pool:
            raise ValueError("the victim tier must be built for this pool")
        self.pool, self.weight, self.tier = pool, weight, tier
        self.block_size = pool.block_size
        self.root = Node((), -1, None)
        self.clock = 0
        self.num_nodes = 0
        self.demoted: OrderedDict[Node, None] = OrderedDict()  # nodes in the tier, least recently demoted first
        self.demotions = self.restores = self.prefetches = 0
        self.upcoming: list[Sequence[int]] = []  # prompts of the requests waiting to run (the look-ahead)

    def _touch(self, node: Node) -> None:
        self.clock += 1
        node.last_access = self.clock

    def walk(self, tokens: Sequence[int]) -> list[Node]:
        """The nodes of the full blocks of `tokens` that are cached (in the pool or demoted), in
        order (no references taken)."""
        return list(self._descend(tokens))

    def _descend(self, tokens: Sequence[int]) -> Iterator[Node]:
        """`walk` one node at a time: each child is looked up after the caller handled its parent."""
        bs, node = self.block_size, self.root
        for start in range(0, len(tokens) - bs + 1, bs):
            node = node.children.get(tuple(tokens[start : start + bs]))  # type: ignore[assignment]
            if node is None:
                return
            yield node

    def match(self, tokens: Sequence[int]) -> tuple[list[int], int]:
        """The longest cached prefix of `tokens`: (its blocks, its length in tokens). The
        caller gets one reference per block; demoted blocks on the way are restored from the
        tier (while the pool has room). After the last whole matching block, the cached
        child sharing the most leading tokens is shared too (copied on the first write)."""
        blocks: list[int] = []
        parent = self.root
        for node in self._descend(tokens):  # restoring one node may evict and forget demoted ones below
            if node.block < 0 and not self._restore(node):
                break
            self.pool.incref(node.block)  # held from here on: restoring the next one cannot evict it
            blocks.append(node.block)
            node.served += 1
            self._touch(node)
            parent = node
        matched = len(blocks) * self.block_size
        rest = tuple(tokens[matched : matched + self.block_size])
        best, common = None, 0
        for key, child in parent.children.items():
            n = _common(key, rest)
            if n > common and child.block >= 0:
                best, common = child, n
        if best is not None:
            self._touch(best)
            self.pool.incref(best.block)
            blocks.append(best.block)
            matched += common
        return blocks, matched

    def prefetch(self, tokens: Sequence[int], room: int) -> int:
        """Restore the demoted blocks of `tokens`' cached prefix ahead of its request, into at
        most `room` free blocks (nothing is evicted for it). Returns how many were restored."""
        done = 0
        for node in self._descend(tokens):
            if node.block < 0:
                if done >= room or self.pool.num_free == 0 or not self._restore(node, evict=False):
                    break
                done += 1
        self.prefetches += done
        return done

    def insert(self, tokens: Sequence[int], blocks: Sequence[int]) -> int:
        """Cache the full blocks of `tokens`, whose KV is in `blocks` (the tree takes its own
        reference). A block already cached under the same prefix is kept as it is. Returns
        the number of new nodes."""
        bs, node, added = self.block_size, self.root, 0
        for i in range(min(len(tokens) // bs, len(blocks))):
            key = tuple(tokens[i * bs : (i + 1) * bs])
            child = node.children.get(key)
            if child is None:
                child = Node(key, blocks[i], node)
                node.children[key] = child
                self.pool.incref(blocks[i])
                self.num_nodes += 1
                added += 1
            elif child.block < 0:  # demoted, and computed again: keep the new block, free the slot
                self._undemote(child)
                child.block = blocks[i]
                self.pool.incref(blocks[i])
            self._touch(child)
            node = child
        return added

    def evictable(self) -> int:
        """Cached blocks no request holds (each could be freed by `evict`)."""
        return sum(1 for node in self._nodes() if self._free_to_evict(node, ignore_children=True))

    def evict(self, n: int, upcoming: Iterable[Sequence[int]] | None = None) -> int:
        """Free up to `n` pool blocks only the tree references, lowest priority first (module
        docstring; `upcoming`: prompts of requests still to run, default `self.upcoming`, which
        the engine keeps up to date). Returns how many were freed."""
        hybrid, capacity = self.weight > 0, self.pool.num_blocks
        upcoming = self.upcoming if upcoming is None else upcoming
        needed = {id(node) for tokens in upcoming for node in self.walk(tokens)} if hybrid else set()

        def key(node: Node) -> tuple:
            bonus = importance(self.weight, capacity, LEVEL_OF[min(node.served, 16)]) if hybrid else 0.0
            return (id(node) in needed, node.last_access + bonus, id(node))

        heap = [(*key(node), node) for node in self._nodes() if self._free_to_evict(node)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < n:
            *_, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            if self.tier is not None and (not hybrid or node.served >= 2 or id(node) in needed):
                self._demote(node)
            else:
                self._forget(node)
            freed += 1
            if parent is not self.root and self._free_to_evict(parent):
                heapq.heappush(heap, (*key(parent), parent))
        return freed

    def _demote(self, node: Node) -> None:
        """Move `node`'s block into the tier (dropping the tier's oldest entries for room)."""
        assert self.tier is not None
        slot = self.tier.put(node.block)
        while slot is None and self.demoted:
            self._forget(next(iter(self.demoted)))
            slot = self.tier.put(node.block)
        if slot is None:  # a tier smaller than one block's worth of anything: drop instead
            self._forget(node)
            return
        self.pool.decref(node.block)
        node.block, node.slot = -1, slot
        self.demoted[node] = None
        self.demotions += 1

    def _restore(self, node: Node, evict: bool = True) -> bool:
        """Bring demoted `node` back into a fresh pool block (evicting one if needed and allowed)."""
        assert self.tier is not None and node.slot >= 0
        del self.demoted[node]  # out of reach of the tier overflow an eviction here may cause
        if self.pool.num_free == 0 and evict:
            self.evict(1)
        if self.pool.num_free == 0:
            self.demoted[node] = None
            return False
        block = self.pool.allocate()  # the tree's reference
        self.tier.take(node.slot, block)
        node.block, node.slot = block, -1
        self.restores += 1
        return True

    def _undemote(self, node: Node) -> None:
        assert self.tier is not None
        self.tier.drop(node.slot)
        del self.demoted[node]
        node.slot = -1

    def _forget(self, node: Node) -> None:
        """Remove `node` and everything below it from the tree, releasing their blocks and slots."""
        parent = node.parent
        assert parent is not None
        del parent.children[node.key]
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n.block >= 0:
                self.pool.decref(n.block)
            if n.slot >= 0:
                self._undemote(n)
            self.num_nodes -= 1

    def _free_to_evict(self, node: Node, ignore_children: bool = False) -> bool:
        """In the pool, held by the tree alone, not pinned, and (unless ignored) no child in the pool."""
        if node.block < 0 or node.pinned or self.pool.refcount[node.block] != 1:
            return False
        return ignore_children or all(child.block < 0 for child in node.children.values())

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def pin(self, tokens: Sequence[int]) -> list[Node]:
        """Forbid evicting the cached full blocks of `tokens` until `unpin`."""
        path = self.walk(tokens)
        for node in path:
            node.pinned += 1
        return path

    def unpin(self, path: Sequence[Node]) -> None:
        """Undo `pin`."""
        for node in path:
            node.pinned -= 1

    def drop(self, path: Sequence[Node]) -> int:
        """Free what only the tree holds of `path` and of everything cached below it (e.g. the
        requests that followed a group prefix), deepest first, stopping at the first node of
        `path` still needed (held, pinned or with children left). Returns how many were freed."""
        if not path:
            return 0
        freed = 0
        stack, order = [path[-1]], []
        while stack:  # the subtree below the path, parents before children
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in list(reversed(order[1:])) + list(reversed(path)):
            parent = node.parent
            if parent is None or parent.children.get(node.key) is not node:
                continue
            if node.block < 0 and node not in path:  # demoted below the path: goes with it
                self._forget(node)
                continue
            if node.children or not self._free_to_evict(node):
                if node in path:
                    break
                continue
            self._forget(node)
            freed += 1
        return freed

    def clear(self) -> None:
        """Drop the tree's reference to every cached block (blocks requests still hold live on)."""
        for node in list(self.root.children.values()):
            self._forget(node)


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
