"""Accuracy of a KV-cache method on the generated tasks: greedy decoding scored by exact match.

    model, tokenizer = load_model()                         # the bundled model
    rows = evaluate(model, tokenizer, "snapkv", budget=128, tasks=["passkey"], lengths=[1024], samples=10)
    rows = evaluate_many(model, tokenizer, [MethodSpec("full"), MethodSpec("h2o", 0.1)], tasks=["niah"])

`evaluate_many` prefills each batch of prompts once and replays that prefill into every
method that can start from it (`mpcache.methods.shared_prefill`), so N methods cost one
prefill plus N decodes instead of N prefills.

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
from mpcache.generate import CacheFactory, continue_generation, prompt_positions, stream_generate
from mpcache.methods import make_policy
from mpcache.methods.base import Budget, check_budget, resolve_budget
from mpcache.methods.shared_prefill import (
    PrefillStore,
    needs_hidden,
    record_prefill,
    replay_prefill,
    shares_prefill,
)
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


# ------------------------------------------------------------------- prompts
def prompt_text(tokenizer: Tokenizer, sample: Sample) -> str:
    """The text the model reads. With a chat template (an instruction-tuned model) the prompt
    up to its answer prefix is the user's turn and the prefix opens the assistant's turn, so
    the model answers as it was trained to; otherwise the prompt as generated."""
    if getattr(tokenizer, "chat_template", None) is None:
        return sample.prompt
    body = sample.prompt[: len(sample.prompt) - len(sample.answer_prefix)].strip()
    return tokenizer.apply_chat_template([{"role": "user", "content": body}]) + sample.answer_prefix


def prompt_overhead(tokenizer: Tokenizer) -> int:
    """Tokens a chat template adds around a task prompt, which the task generators leave room
    for so the model reads about `context_len` tokens in all (0 without a template: prompts
    for the bundled model stay as they always were)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return 0
    empty = Sample(task="", prompt="", answer="", context_len=0, depth=0.0, seed=0)
    return len(tokenizer.encode(prompt_text(tokenizer, empty)))


def task_samples(
    tokenizer: Tokenizer, task: str, length: int, samples: int, seed: int = 0
) -> list[Sample]:
    """`samples` samples of `task` whose prompts, as the model reads them, are about `length`
    tokens of this tokenizer."""
    count = lambda text: len(tokenizer.encode(text, add_bos=False))
    return make_samples(task, length, samples, count, seed=seed, reserve=prompt_overhead(tokenizer))


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


@dataclass(frozen=True)
class MethodSpec:
    """One method to evaluate: a name, a budget (None for "full") and the method's options."""

    method: str
    budget: Budget | None = None
    options: dict[str, Any] | None = None

    def checked(self) -> MethodSpec:
        """This spec with "full"'s budget dropped; raises on a bad name, budget or option."""
        spec = MethodSpec(self.method, None, self.options) if self.method == "full" else self
        if spec.method != "full":
            check_budget(spec.budget)
        spec.policy()
        return spec

    def policy(self) -> CacheFactory | None:
        return resolve_policy(self.method, self.budget, **(self.options or {}))

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget}"


@dataclass
class Batch:
    """Rows `index` of a sample list, left-padded, and how many tokens to decode for them."""

    index: list[int]
    input_ids: Tensor
    mask: Tensor | None
    max_new: int


def make_batches(
    model: Transformer, tokenizer: Tokenizer, samples: Sequence[Sample], batch_size: int, margin: int
) -> tuple[list[list[int]], list[Batch]]:
    """Every sample's prompt ids and the batches they are decoded in (at most `batch_size` rows,
    fewer when one prefill's attention scores would exceed SCORES_BYTES)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    prompts = [tokenizer.encode(prompt_text(tokenizer, s)) for s in samples]
    answers = [tokenizer.encode(s.answer, add_bos=False) for s in samples]
    pad_id = next(i for i in (getattr(tokenizer, "pad_id", None), tokenizer.eos_id, 0) if i is not None)
    longest = max(map(len, prompts), default=1)
    rows_fit = max(1, SCORES_BYTES // (4 * model.config.n_head * longest * longest))
    size = min(batch_size, rows_fit)
    batches = []
    for first in range(0, len(samples), size):
        index = list(range(first, min(first + size, len(samples))))
        input_ids, mask = pad_left([prompts[i] for i in index], pad_id)
        batches.append(Batch(index, input_ids, mask, max(len(answers[i]) for i in index) + margin))
    return prompts, batches


def score_batch(
    model: Transformer,
    tokenizer: Tokenizer,
    samples: Sequence[Sample],
    prompts: list[list[int]],
    batch: Batch,
    steps: list[Tensor],
    cache: KVCache | None,
    budget: Budget | None,
) -> list[SampleResult]:
    """Decode and score one batch's generated tokens; read the cache's size after generation."""
    generated = torch.stack(steps, dim=1) if steps else batch.input_ids.new_zeros(len(batch.index), 0)
    sizes = row_cache_sizes(cache) if cache is not None else None
    results = []
    for row, i in enumerate(batch.index):
        tokens = generated[row].tolist()
        if tokenizer.eos_id in tokens:  # the answer ends at EOS (a batch's finished rows repeat it)
            tokens = tokens[: tokens.index(tokenizer.eos_id) + 1]
        prediction = tokenizer.decode(tokens)
        results.append(
            SampleResult(
                sample=samples[i],
                generated=tokens,
                prediction=prediction,
                correct=exact_match(prediction, samples[i].answer),
                prompt_tokens=len(prompts[i]),
                budget_tokens=None if budget is None else budget_tokens(budget, len(prompts[i])),
                cache_tokens=None if sizes is None else float(sizes[0][row]),
                cache_bytes=None if sizes is None else round(float(sizes[1][row])),
                # The last generated token is never fed back, so it is not cached.
                full_cache_bytes=full_cache_bytes(model, len(prompts[i]) + max(len(steps) - 1, 0)),
            )
        )
    return results


@dataclass
class Evaluated:
    """What `evaluate_many_samples` returns per spec: results, own seconds, whether it shared."""

    results: list[SampleResult]
    seconds: float
    shared: bool


def evaluate_many_samples(
    model: Transformer,
    tokenizer: Tokenizer,
    samples: Sequence[Sample],
    specs: Sequence[MethodSpec],
    batch_size: int = 8,
    margin: int = ANSWER_MARGIN,
    generate_fn: GenerateFn = stream_generate,
    share_prefill: bool = True,
    progress: tqdm | None = None,
    prefill_store: PrefillStore | None = None,
) -> tuple[list[Evaluated], float]:
    """Greedy-decode every sample with every spec and score it by exact match.

    With `share_prefill`, each batch's prompt is prefilled once (`PrefillRecord`) and every
    spec whose cache `shares_prefill` (when two or more do) starts from a replay of it; the
    others (and every spec when a custom `generate_fn` stands in for `stream_generate`, as
    tests' oracles do) prefill themselves. `prefill_store`: shared prefills are read from / written to this disk
    store (then even one spec replays). Returns per spec its results and own seconds (replay + decode, or its own
    prefill + decode), and the seconds of the shared prefills (or of loading them)."""
    specs = [spec.checked() for spec in specs]
    policies = [spec.policy() for spec in specs]
    caches = [policy(model) if policy is not None else KVCache(model.config.n_layer) for policy in policies]
    sharing = [share_prefill and generate_fn is stream_generate and shares_prefill(c) for c in caches]
    if sum(sharing) < 2 and prefill_store is None:  # nothing to share: every spec prefills itself
        sharing = [False] * len(specs)
    keep_hidden = any(needs_hidden(c) for c, shared in zip(caches, sharing) if shared)
    del caches
    prompts, batches = make_batches(model, tokenizer, samples, batch_size, margin)
    out = [Evaluated([], 0.0, shared) for shared in sharing]
    prefill_seconds = 0.0
    for batch in batches:
        record = logits = next_position = None
        if any(sharing):
            start = time.perf_counter()
            _, next_position = prompt_positions(batch.input_ids, batch.mask)
            if prefill_store is not None:
                record, logits = prefill_store.get(model, batch.input_ids, batch.mask, keep_hidden)
            else:
                record, logits = record_prefill(model, batch.input_ids, batch.mask, keep_hidden)
            prefill_seconds += time.perf_counter() - start
        for spec, policy, done in zip(specs, policies, out):
            start = time.perf_counter()
            factory, built = recording_factory(policy)
            if done.shared:
                assert record is not None and logits is not None and next_position is not None
                cache = factory(model)
                replay_prefill(cache, record)
                steps = list(continue_generation(model, cache, logits, next_position, batch.max_new,
                                                 eos_id=tokenizer.eos_id))  # fmt: skip
            else:
                steps = list(generate_fn(model, batch.input_ids, batch.max_new, policy=factory,
                                         eos_id=tokenizer.eos_id, attention_mask=batch.mask))  # fmt: skip
            cache = built[-1] if built else None
            done.results += score_batch(model, tokenizer, samples, prompts, batch, steps, cache, spec.budget)
            done.seconds += time.perf_counter() - start
            if progress is not None:
                progress.update(len(batch.index))
    return out, prefill_seconds


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
    spec = MethodSpec(method, budget, method_kwargs)
    (done,), _ = evaluate_many_samples(
        model, tokenizer, samples, [spec], batch_size, margin, generate_fn, share_prefill=False, progress=progress
    )
    return done.results


def _mean(values: list[Any]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def evaluate_many(
    model: Transformer,
    tokenizer: Tokenizer,
    specs: Sequence[MethodSpec],
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (512, 1024, 2048),
    samples: int = 10,
    seed: int = 0,
    batch_size: int = 8,
    margin: int = ANSWER_MARGIN,
    generate_fn: GenerateFn = stream_generate,
    share_prefill: bool = True,
    progress: bool = True,
    prefill_store: PrefillStore | None = None,
) -> list[dict[str, Any]]:
    """Rows {method, task, context_len, budget, accuracy, samples, seconds, shared_prefill_seconds,
    cache_tokens, cache_bytes, full_cache_bytes} for every spec (outer), task and length, all
    specs decoding the same samples. `seconds` is the spec's own time; a spec that started from
    the shared prefill also lists the time of that prefill (once for all specs sharing it)."""
    specs = [spec.checked() for spec in specs]  # fail fast on a bad name or option
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    label = specs[0].label if len(specs) == 1 else f"{len(specs)} methods"
    total = len(specs) * len(tasks) * len(lengths) * samples
    bar = tqdm(total=total, desc=label, unit="sample", disable=not progress)
    rows: list[list[dict[str, Any]]] = [[] for _ in specs]
    for task in tasks:
        for length in lengths:
            bar.set_postfix(task=task, len=length)
            group = task_samples(tokenizer, task, length, samples, seed=seed)
            done, prefill = evaluate_many_samples(
                model, tokenizer, group, specs, batch_size, margin, generate_fn, share_prefill, bar, prefill_store
            )
            for spec, evaluated, mine in zip(specs, done, rows):
                results = evaluated.results
                mine.append(
                    {
                        "method": spec.method,
                        "task": task,
                        "context_len": length,
                        "budget": spec.budget,
                        "accuracy": sum(r.correct for r in results) / len(results),
                        "samples": len(results),
                        "seconds": round(evaluated.seconds, 3),
                        "shared_prefill_seconds": round(prefill, 3) if evaluated.shared else None,
                        "cache_tokens": _mean([r.cache_tokens for r in results]),
                        "cache_bytes": _mean([r.cache_bytes for r in results]),
                        "full_cache_bytes": _mean([r.full_cache_bytes for r in results]),
                    }
                )
    bar.close()
    return [row for mine in rows for row in mine]


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
    """`evaluate_many` for one method (its own prefill); "full" ignores the budget."""
    spec = MethodSpec(method, budget, method_kwargs)
    return evaluate_many(
        model, tokenizer, [spec], tasks, lengths, samples, seed, batch_size, margin, generate_fn, False, progress
    )


# ------------------------------------------------------------------- loading
def load_model(name: str | Path | None = None) -> tuple[Transformer, Tokenizer]:
    """The bundled model (None), a model by name ("bundled", "smollm2"), a checkpoint folder or a
    .gguf file, with its tokenizer (`mpcache.model.load_model`)."""
    from mpcache.model.loading import load_model as load

    return load("bundled" if name is None else name)
