"""Greedy and sampled generation with a KV cache, streamed token by token."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from mpcache.model.cache import KVCache
from mpcache.model.transformer import Transformer

# A policy factory builds the cache a request decodes with (eviction methods subclass KVCache).
CacheFactory = Callable[[Transformer], KVCache]


def next_token(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """Pick the next token from logits [B, V]: argmax at temperature 0, else sample."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_generate(
    model: Transformer,
    input_ids: Tensor,
    max_new_tokens: int,
    policy: CacheFactory | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    attention_mask: Tensor | None = None,
) -> Iterator[Tensor]:
    """Yield the next token [B] of every row until `max_new_tokens` or all rows hit EOS.

    input_ids: [B, T]; `attention_mask` [B, T] marks left padding with 0 (positions then
    count real tokens only). `policy` builds the cache (default: keep everything).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, time] tensor, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    model.eval()
    cache = policy(model) if policy is not None else KVCache(model.config.n_layer)
    positions, next_position = prompt_positions(input_ids, attention_mask)
    logits = model(input_ids, cache=cache, positions=positions, attention_mask=attention_mask, last_only=True)
    yield from continue_generation(
        model, cache, logits, next_position, max_new_tokens, temperature, top_k, top_p, seed, eos_id
    )


def prompt_positions(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Positions [B, T] of the prompt tokens (left padding: real tokens count from 0) and the
    next position of every row [B]."""
    b, t = input_ids.shape
    if attention_mask is None:
        return torch.arange(t, device=input_ids.device).expand(b, t), torch.full((b,), t, device=input_ids.device)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0), attention_mask.long().sum(-1)


@torch.no_grad()
def continue_generation(
    model: Transformer,
    cache: KVCache,
    logits: Tensor,
    next_position: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
) -> Iterator[Tensor]:
    """The decode loop of `stream_generate`, from a prefilled `cache`, the prefill's last
    logits [B, 1, V] and each row's next position [B] (`prompt_positions`)."""
    generator = torch.Generator(device=logits.device).manual_seed(seed) if seed is not None else None
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        token = next_token(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished |= token == eos_id
        yield token
        if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
            return
        logits = model(token[:, None], cache=cache, positions=next_position[:, None], last_only=True)
        next_position = next_position + 1


def generate(model: Transformer, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
    """Generated tokens [B, N] (prompt excluded); see `stream_generate` for the options."""
    tokens = list(stream_generate(model, input_ids, max_new_tokens, **kwargs))
    if not tokens:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.stack(tokens, dim=1)
