"""Synthetic request traces over KV blocks, deterministic by seed, as numpy arrays.

A trace is what a block store sees: request r reads blocks `blocks[starts[r]:starts[r+1]]`
in order. A block id stands for "these 16 tokens after exactly this prefix" (the radix
tree's node), so two requests share an id only where they share the whole prefix up to
and including that block (prefix keying, vLLM/SGLang). The RAG workload can instead key
chunk blocks by chunk content alone (chunk keying, Cache-Craft: a chunk's KV is reused at
any position after re-rotation and a partial recompute).

Workloads:
- `shared_prompts`: a system prompt drawn Zipf from a few, a few-shot prefix drawn Zipf
  from many (its blocks depend on the system prompt before it), then new user tokens.
- `rag`: a system prompt, k distinct chunks drawn Zipf from a corpus in random order, a
  new question.
- `multiturn`: interleaved conversations; every turn re-reads the system prompt and the
  whole history, adds a new user message, and writes the reply's blocks (read again by
  the next turn).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SYSTEM, SHARED, HISTORY, UNIQUE = 0, 1, 2, 3  # what a block holds (a feature for predictors)
KIND_NAMES = ("system", "shared", "history", "unique")


@dataclass
class Trace:
    """Block accesses of a request stream (see the module docstring)."""

    name: str
    blocks: np.ndarray  # int64 [A] block id of every access
    starts: np.ndarray  # int64 [R + 1] offsets of the requests
    kinds: np.ndarray  # int8 [A] SYSTEM / SHARED / HISTORY / UNIQUE
    block_size: int = 16
    _next: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.blocks.ndim != 1 or self.kinds.shape != self.blocks.shape:
            raise ValueError("blocks and kinds must be 1-D arrays of the same length")
        if self.starts.ndim != 1 or self.starts[0] != 0 or self.starts[-1] != len(self.blocks):
            raise ValueError("starts must run from 0 to the number of accesses")
        if np.any(np.diff(self.starts) < 0):
            raise ValueError("starts must be non-decreasing")

    @property
    def num_requests(self) -> int:
        return len(self.starts) - 1

    @property
    def num_accesses(self) -> int:
        return len(self.blocks)

    def next_use(self) -> np.ndarray:
        """Index of the next access of the same block, or `num_accesses` if none (cached)."""
        if self._next is None:
            self._next = next_use(self.blocks)
        return self._next

    def requests_of(self) -> np.ndarray:
        """Request index of every access [A]."""
        return np.repeat(np.arange(self.num_requests), np.diff(self.starts))

    def head(self, n_requests: int) -> Trace:
        """The first `n_requests` requests."""
        end = int(self.starts[n_requests])
        return Trace(self.name, self.blocks[:end], self.starts[: n_requests + 1], self.kinds[:end], self.block_size)


def next_use(blocks: np.ndarray) -> np.ndarray:
    """For every position, the next position holding the same value (len(blocks) if none)."""
    n = len(blocks)
    order = np.argsort(blocks, kind="stable")
    out = np.full(n, n, dtype=np.int64)
    same = blocks[order[1:]] == blocks[order[:-1]]
    out[order[:-1][same]] = order[1:][same]
    return out


def previous_use(blocks: np.ndarray) -> np.ndarray:
    """For every position, the previous position holding the same value (-1 if none)."""
    n = len(blocks)
    order = np.argsort(blocks, kind="stable")
    out = np.full(n, -1, dtype=np.int64)
    same = blocks[order[1:]] == blocks[order[:-1]]
    out[order[1:][same]] = order[:-1][same]
    return out


def zipf_choice(rng: np.random.Generator, n: int, alpha: float, size: int | tuple) -> np.ndarray:
    """Indices in [0, n) drawn with probability proportional to 1 / (rank + 1)^alpha."""
    p = 1.0 / np.arange(1, n + 1) ** alpha
    return rng.choice(n, size=size, p=p / p.sum())


def _concat(parts: list[tuple[np.ndarray, np.ndarray]], lengths: np.ndarray, name: str) -> Trace:
    """Interleave per-request segments: parts[i] = (ids [R, L_i] padded, kinds) with lengths[:, i] used."""
    total = lengths.sum(1)
    starts = np.zeros(len(total) + 1, dtype=np.int64)
    np.cumsum(total, out=starts[1:])
    blocks = np.empty(starts[-1], dtype=np.int64)
    kinds = np.empty(starts[-1], dtype=np.int8)
    offset = starts[:-1].copy()
    for (ids, kind), used in zip(parts, lengths.T):
        width = ids.shape[1]
        mask = np.arange(width)[None, :] < used[:, None]
        dest = (offset[:, None] + np.arange(width)[None, :])[mask]
        blocks[dest] = ids[mask]
        kinds[dest] = kind if np.isscalar(kind) else kind[mask]
        offset += used
    return Trace(name, blocks, starts, kinds)


def shared_prompts(
    n_requests: int,
    seed: int = 0,
    n_system: int = 4,
    system_blocks: int = 16,
    n_fewshot: int = 512,
    fewshot_blocks: int = 8,
    zipf: float = 1.0,
    user_blocks: tuple[int, int] = (1, 6),
) -> Trace:
    """System prompt (Zipf over `n_system`) + few-shot prefix (Zipf over `n_fewshot`) + new user blocks."""
    rng = np.random.default_rng(seed)
    system = zipf_choice(rng, n_system, zipf, n_requests)
    fewshot = zipf_choice(rng, n_fewshot, zipf, n_requests)
    users = rng.integers(user_blocks[0], user_blocks[1] + 1, n_requests)
    sys_ids = system[:, None] * system_blocks + np.arange(system_blocks)
    base = n_system * system_blocks
    pair = system * n_fewshot + fewshot  # a few-shot block's id depends on the system prompt before it
    shot_ids = base + pair[:, None] * fewshot_blocks + np.arange(fewshot_blocks)
    base += n_system * n_fewshot * fewshot_blocks
    first = base + np.concatenate([[0], np.cumsum(users)[:-1]])
    user_ids = first[:, None] + np.arange(user_blocks[1])
    lengths = np.stack([np.full(n_requests, system_blocks), np.full(n_requests, fewshot_blocks), users], 1)
    return _concat([(sys_ids, SYSTEM), (shot_ids, SHARED), (user_ids, UNIQUE)], lengths, "shared")


def rag(
    n_requests: int,
    seed: int = 0,
    n_chunks: int = 2000,
    k: int = 4,
    chunk_blocks: int = 4,
    zipf: float = 0.9,
    system_blocks: int = 8,
    question_blocks: int = 1,
    keying: str = "prefix",
) -> Trace:
    """System prompt + `k` distinct chunks (Zipf, random order) + a new question. keying:
    "prefix" (a chunk block is reused only after the same chunks in the same order) or
    "chunk" (by content, at any position: Cache-Craft)."""
    if keying not in ("prefix", "chunk"):
        raise ValueError(f"keying must be 'prefix' or 'chunk', got {keying!r}")
    rng = np.random.default_rng(seed)
    if k > n_chunks:
        raise ValueError(f"k={k} distinct chunks need a corpus of at least k, got {n_chunks}")
    candidates = zipf_choice(rng, n_chunks, zipf, (n_requests, 4 * k))
    picks = np.empty((n_requests, k), dtype=np.int64)
    for r in range(n_requests):  # the first k distinct draws: popular chunks come more often
        chosen = list(dict.fromkeys(candidates[r].tolist()))[:k]
        while len(chosen) < k:
            c = int(rng.integers(n_chunks))
            if c not in chosen:
                chosen.append(c)
        picks[r] = rng.permutation(chosen)
    sys_ids = np.broadcast_to(np.arange(system_blocks), (n_requests, system_blocks))
    base = system_blocks
    if keying == "chunk":
        chunk_ids = base + (picks[:, :, None] * chunk_blocks + np.arange(chunk_blocks)).reshape(n_requests, -1)
        base += n_chunks * chunk_blocks
    else:  # one id per distinct ordered chunk prefix
        prefixes: dict[tuple[int, ...], int] = {}
        slots = np.empty((n_requests, k), dtype=np.int64)
        for r in range(n_requests):
            for i in range(k):
                slots[r, i] = prefixes.setdefault(tuple(picks[r, : i + 1]), len(prefixes))
        chunk_ids = base + (slots[:, :, None] * chunk_blocks + np.arange(chunk_blocks)).reshape(n_requests, -1)
        base += len(prefixes) * chunk_blocks
    question_ids = base + np.arange(n_requests)[:, None] * question_blocks + np.arange(question_blocks)
    lengths = np.tile([system_blocks, k * chunk_blocks, question_blocks], (n_requests, 1))
    parts = [(np.ascontiguousarray(sys_ids), SYSTEM), (chunk_ids, SHARED), (question_ids, UNIQUE)]
    return _concat(parts, lengths, f"rag-{keying}")


def multiturn(
    n_requests: int,
    seed: int = 0,
    active: int = 64,
    turns: tuple[int, int] = (2, 10),
    user_blocks: tuple[int, int] = (1, 3),
    reply_blocks: tuple[int, int] = (1, 4),
    system_blocks: int = 8,
) -> Trace:
    """`active` conversations at a time, a random one speaks next; a finished conversation
    is replaced by a new one. A turn reads system + history + its new user blocks, then
    writes its reply blocks (history for the next turn)."""
    rng = np.random.default_rng(seed)
    next_id = system_blocks
    convs: list[list] = []  # [history ids, turns left]

    def new_conv() -> list:
        return [[], int(rng.integers(turns[0], turns[1] + 1))]

    convs = [new_conv() for _ in range(active)]
    blocks: list[np.ndarray] = []
    kinds: list[np.ndarray] = []
    starts = [0]
    speakers = rng.integers(0, active, n_requests)
    users = rng.integers(user_blocks[0], user_blocks[1] + 1, n_requests)
    replies = rng.integers(reply_blocks[0], reply_blocks[1] + 1, n_requests)
    system = np.arange(system_blocks)
    for r in range(n_requests):
        conv = convs[speakers[r]]
        history = conv[0]
        new = np.arange(next_id, next_id + users[r] + replies[r])
        next_id += len(new)
        ids = np.concatenate([system, np.asarray(history, dtype=np.int64), new])
        kinds.append(np.repeat(np.array([SYSTEM, HISTORY, UNIQUE], np.int8), [system_blocks, len(history), len(new)]))
        blocks.append(ids)
        starts.append(starts[-1] + len(ids))
        history.extend(new.tolist())
        conv[1] -= 1
        if conv[1] == 0:
            convs[speakers[r]] = new_conv()
    return Trace("multiturn", np.concatenate(blocks), np.asarray(starts, dtype=np.int64), np.concatenate(kinds))


WORKLOADS = {"shared": shared_prompts, "rag": rag, "multiturn": multiturn}
