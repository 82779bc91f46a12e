"""Prefix sharing: a radix tree over token blocks, LRU eviction of unreferenced blocks.

Every node is one full block of `block_size` tokens; its key is the block's tokens and its
place in the tree is the whole prefix before it, so a node stands for "these tokens after
exactly that prefix" (the hash chain of vLLM's automatic prefix caching, the radix tree of
SGLang's RadixAttention at block granularity). The tree holds one reference to each
node's block. A new request walks the tree with its prompt and shares every matching
block; in the first block that differs it shares the common leading tokens too, and the
pool copies that block when the request writes its first divergent token.

Eviction (the vLLM/SGLang baseline): blocks only the tree still references are freed
least recently used first, leaves before their parents, so what stays is always a prefix.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from mpcache.serving.pool import BlockPool


class Node:
    __slots__ = ("key", "block", "parent", "children", "last_access", "pinned")

    def __init__(self, key: tuple[int, ...], block: int, parent: Node | None) -> None:
        self.key, self.block, self.parent = key, block, parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.last_access = 0
        self.pinned = 0  # holders that forbid eviction (BatchLLM pins a group's prefix)


class PrefixCache:
    """The radix tree of cached blocks of `pool` (see the module docstring)."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.root = Node((), -1, None)
        self.clock = 0
        self.num_nodes = 0

    def _touch(self, node: Node) -> None:
        self.clock += 1
        node.last_access = self.clock

    def walk(self, tokens: Sequence[int]) -> list[Node]:
        """The nodes of the full blocks of `tokens` that are cached, in order (no references taken)."""
        bs, node, path = self.block_size, self.root, []
        for start in range(0, len(tokens) - bs + 1, bs):
            node = node.children.get(tuple(tokens[start : start + bs]))  # type: ignore[assignment]
            if node is None:
                break
            path.append(node)
        return path

    def match(self, tokens: Sequence[int]) -> tuple[list[int], int]:
        """The longest cached prefix of `tokens`: (its blocks, its length in tokens). The
        caller gets one reference per block. After the last whole matching block, the cached
        child sharing the most leading tokens is shared too (copied on the first write)."""
        path = self.walk(tokens)
        for node in path:
            self._touch(node)
        matched = len(path) * self.block_size
        parent = path[-1] if path else self.root
        rest = tuple(tokens[matched : matched + self.block_size])
        best, common = None, 0
        for key, child in parent.children.items():
            n = _common(key, rest)
            if n > common:
                best, common = child, n
        blocks = [node.block for node in path]
        if best is not None:
            self._touch(best)
            blocks.append(best.block)
            matched += common
        for block in blocks:
            self.pool.incref(block)
        return blocks, matched

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
            self._touch(child)
            node = child
        return added

    def evictable(self) -> int:
        """Cached blocks no request holds (each could be freed by `evict`)."""
        return sum(1 for node in self._nodes() if self._free_to_evict(node, ignore_children=True))

    def evict(self, n: int) -> int:
        """Free up to `n` blocks only the tree references, least recently used leaves first.
        Returns how many were freed."""
        heap = [(node.last_access, id(node), node) for node in self._nodes() if self._free_to_evict(node)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < n:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            self.pool.decref(node.block)
            self.num_nodes -= 1
            freed += 1
            if parent is not self.root and self._free_to_evict(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _free_to_evict(self, node: Node, ignore_children: bool = False) -> bool:
        return (ignore_children or not node.children) and node.pinned == 0 and self.pool.refcount[node.block] == 1

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
            if parent is None or parent.children.get(node.key) is not node or not self._free_to_evict(node):
                if node in path:
                    break
                continue
            del parent.children[node.key]
            self.pool.decref(node.block)
            self.num_nodes -= 1
            freed += 1
        return freed

    def clear(self) -> None:
        """Drop the tree's reference to every cached block (blocks requests still hold live on)."""
        for node in list(self._nodes()):
            self.pool.decref(node.block)
        self.root.children.clear()
        self.num_nodes = 0


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
