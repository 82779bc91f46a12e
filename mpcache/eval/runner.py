"""Accuracy of a KV-cache method on the generated tasks: greedy decoding scored by exact match.

    model, tokenizer = load_model()                         # the bundled model
    rows = evaluate(model, tokenizer, "snapkv", budget=128, tasks=["passkey"], lengths=[1024], samples=10)

One row per (task, context_len): accuracy plus what the cache held after generation,
averaged over the samples: `cache_tokens` (valid slots per layer and KV head of the main
store; a method that moves tokens to a side store, like ThinK's pruned keys or MiKV's
low-precision tokens, holds more), `cache_bytes` (those slots' keys and values plus the
method's side stores) and `full_cache_bytes` (what a full cache would hold). Samples of
one (task, length) have nearly equal prompt lengths, so they are decoded in left-padded
batches; tests check that batching changes no method's output. A side store is shared
evenly by a batch's rows and may be padded to its longest row, so use batch_size=1 for
exact per-sample bytes of such methods."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from mpcache.eval.tasks import TASKS, Sample, exact_match, make_samples
from mpcache.generate import CacheFactory, stream_generate
from mpcache.methods import make_policy
from mpcache.methods.base import Budget, check_budget, resolve_budget
from mpcache.model.cache import KVCache
from mpcache.model.tokenizer import Tokenizer
from mpcache.model.transformer import Transformer

GenerateFn = Callable[..., Iterator[Tensor]]  # the signature of `mpcache.generate.stream_generate`

ANSWER_MARGIN = 3  # extra decoding steps after the answer's length, so "123456" is not cut to "12345"
SCORES_BYTES = 1 << 30  # cap on one prefill's attention scores (B x heads x T x T floats): bounds the batch


# ------------------------------------------------------------------- budgets
def parse_budget(text: str) -> Budget:
    """'128' -> 128 tokens per KV head, '0.25' -> a quarter of the prompt."""
    text = text.strip()
    try:
        value: Budget = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"budget {text!r} is neither an integer token count nor a ratio in (0, 1)") from None
    check_budget(value)
    return value


def budget_tokens(budget: Budget, prompt_tokens: int) -> int:
    """Tokens per KV head a method keeps for a prompt of `prompt_tokens` tokens."""
    check_budget(budget)
    return int(resolve_budget(budget, torch.tensor([prompt_tokens]))[0])


def resolve_policy(method: str, budget: Budget | None, **kwargs: Any) -> CacheFactory | None:
    """The cache factory of a KV method by name; "full" keeps every token (no policy)."""
    if method == "full":
        if kwargs:
            raise ValueError(f"method 'full' takes no options, got {sorted(kwargs)}")
        return None
    if budget is None:
        raise ValueError(f"method {method!r} needs a budget (tokens per KV head or a ratio of the prompt)")
    return make_policy(method, budget, **kwargs)


# ------------------------------------------------------------------ measuring
def row_cache_sizes(cache: KVCache) -> tuple[Tensor, Tensor]:
    """Per batch row: mean tokens held per (layer, KV head), and bytes the cache holds.

    Bytes count the valid key/value slots (so left padding and the spare capacity a
    growing cache allocates do not inflate a row), plus whatever a method stores beside
    them (quantized or channel-pruned copies, page metadata: what its `memory_bytes` adds
    to the plain cache's), shared evenly by the rows of a batch."""
    tokens, nbytes, heads = 0, 0, 0
    for entry in cache.layers:
        if entry is None:
            continue
        held = entry.valid.sum(-1)  # [B, H]
        slot = entry.keys.shape[-1] * entry.keys.element_size() + entry.values.shape[-1] * entry.values.element_size()
        tokens = tokens + held.sum(-1)
        nbytes = nbytes + held.sum(-1) * slot
        heads += held.shape[1]
    if not isinstance(tokens, Tensor) or not isinstance(nbytes, Tensor):
        raise ValueError("the cache holds no layers; was it used for generation?")
    extra = cache.memory_bytes() - KVCache.memory_bytes(cache)
    return tokens.double() / heads, nbytes.double() + extra / len(nbytes)


def full_cache_bytes(model: Transformer, tokens: int) -> int:
    """Bytes of keys and values a full cache holds for `tokens` tokens."""
    config = model.config
    assert config.head_dim is not None
    element = next(model.parameters()).element_size()
    return tokens * config.n_layer * config.n_kv_head * 2 * config.head_dim * element


@dataclass
class SampleResult:
    """One decoded sample (cache figures are None when the generate function built no cache)."""

    sample: Sample
    generated: list[int]
    prediction: str
    correct: bool
    prompt_tokens: int
    budget_tokens: int | None
    cache_tokens: float | None
    cache_bytes: int | None
    full_cache_bytes: int


def recording_factory(policy: CacheFactory | None) -> tuple[CacheFactory, list[KVCache]]:
    """A factory building caches like `policy` (a full cache when None) that keeps each one,
    so its size can be read after generation."""
    caches: list[KVCache] = []

    def factory(model: Transformer) -> KVCache:
        cache = policy(model) if policy is not None else KVCache(model.config.n_layer)
        caches.append(cache)
        return cache

    return factory, caches


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor | None]:
    """input_ids [B, T] with rows right-aligned, and the attention mask (None without padding)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, None if bool(mask.all()) else mask


def evaluate_samples(
    model: Transformer,
    tokenizer: Tokenizer,
    samples: Sequence[Sample],
    method: str = "full",
    budget: Budget | None = None,
    batch_size: int = 8,
    margin: int = ANSWER_MARGIN,
    generate_fn: GenerateFn = stream_generate,
    method_kwargs: dict[str, Any] | None = None,
    progress: tqdm | None = None,
) -> list[SampleResult]:
    """Greedy-decode every sample with `method` at `budget` and score it by exact match.

    `generate_fn` has the signature of `stream_generate` (tests pass an oracle here)."""
    if method == "full":
        budget = None
    else:
        check_budget(budget)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    prompts = [tokenizer.encode(s.prompt) for s in samples]
    answers = [tokenizer.encode(s.answer, add_bos=False) for s in samples]
    budgets = [None if budget is None else budget_tokens(budget, len(p)) for p in prompts]
    pad_id = next(i for i in (getattr(tokenizer, "pad_id", None), tokenizer.eos_id, 0) if i is not None)
    results: list[SampleResult] = []
    longest = max(map(len, prompts), default=1)
    rows_fit = max(1, SCORES_BYTES // (4 * model.config.n_head * longest * longest))
    size = min(batch_size, rows_fit)
    policy = resolve_policy(method, budget, **(method_kwargs or {}))  # resolves a ratio per row, from its prompt
    for first in range(0, len(samples), size):
        batch = list(range(first, min(first + size, len(samples))))
        factory, caches = recording_factory(policy)
        input_ids, mask = pad_left([prompts[i] for i in batch], pad_id)
        max_new = max(len(answers[i]) for i in batch) + margin
        steps = list(
            generate_fn(model, input_ids, max_new, policy=factory, eos_id=tokenizer.eos_id, attention_mask=mask)
        )
        generated = torch.stack(steps, dim=1) if steps else input_ids.new_zeros(len(batch), 0)
        sizes = row_cache_sizes(caches[-1]) if caches else None
        for row, i in enumerate(batch):
            tokens = generated[row].tolist()
            prediction = tokenizer.decode(tokens)
            results.append(
                SampleResult(
                    sample=samples[i],
                    generated=tokens,
                    prediction=prediction,
                    correct=exact_match(prediction, samples[i].answer),
                    prompt_tokens=len(prompts[i]),
                    budget_tokens=budgets[i],
                    cache_tokens=None if sizes is None else float(sizes[0][row]),
                    cache_bytes=None if sizes is None else round(float(sizes[1][row])),
                    # The last generated token is never fed back, so it is not cached.
                    full_cache_bytes=full_cache_bytes(model, len(prompts[i]) + max(len(steps) - 1, 0)),
                )
            )
        if progress is not None:
            progress.update(len(batch))
    return results


def _mean(values: list[Any]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    method: str = "full",
    budget: Budget | None = None,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (512, 1024, 2048),
    samples: int = 10,
    seed: int = 0,
    batch_size: int = 8,
    margin: int = ANSWER_MARGIN,
    generate_fn: GenerateFn = stream_generate,
    method_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rows {method, task, context_len, budget, accuracy, samples, seconds, cache_tokens,
    cache_bytes, full_cache_bytes} for every (task, length); "full" ignores the budget."""
    if method == "full":
        budget = None
    else:
        check_budget(budget)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    resolve_policy(method, budget, **(method_kwargs or {}))  # fail fast on a bad name or option
    count = lambda text: len(tokenizer.encode(text, add_bos=False))
    label = method if budget is None else f"{method}@{budget}"
    bar = tqdm(total=len(tasks) * len(lengths) * samples, desc=label, unit="sample", disable=not progress)
    rows = []
    for task in tasks:
        for length in lengths:
            bar.set_postfix(task=task, len=length)
            group = make_samples(task, length, samples, count, seed=seed)
            start = time.perf_counter()
            results = evaluate_samples(
                model, tokenizer, group, method, budget, batch_size, margin, generate_fn, method_kwargs, bar
            )
            rows.append(
                {
                    "method": method,
                    "task": task,
                    "context_len": length,
                    "budget": budget,
                    "accuracy": sum(r.correct for r in results) / len(results),
                    "samples": len(results),
                    "seconds": round(time.perf_counter() - start, 3),
                    "cache_tokens": _mean([r.cache_tokens for r in results]),
                    "cache_bytes": _mean([r.cache_bytes for r in results]),
                    "full_cache_bytes": _mean([r.full_cache_bytes for r in results]),
                }
            )
    bar.close()
    return rows


# ------------------------------------------------------------------- loading
def load_model(name: str | Path | None = None) -> tuple[Transformer, Tokenizer]:
    """The bundled model (None), a model by name ("bundled", "smollm2"), a checkpoint folder or a
    .gguf file, with its tokenizer (`mpcache.model.load_model`)."""
    from mpcache.model.loading import load_model as load

    return load("bundled" if name is None else name)
