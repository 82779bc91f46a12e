"""The private decoder: prefill and greedy decoding of a secret-shared prompt with secret-shared weights.

Who sees what in plaintext (the deployment in parties/):
* The model owner is party 0: it loads the checkpoint and secret-shares every weight once per session
  (`share_model`); party 1 learns only the architecture (ModelConfig: public, it fixes the protocol's shapes).
* The client one-hot encodes the prompt's token ids and secret-shares the bits (precision 0), so neither party
  sees the prompt; its length and the number of new tokens are public.
* Every step's next token stays a secret one-hot (layers.greedy_token) that feeds the next step's embedding;
  the parties return shares of the generated one-hots and only the client adds them (argmax revealed to it only).
* Public to both parties: sequence length, positions, cache validity, the step count and the dealer's tuples'
  shapes - never values.
The same code runs on float tensors (share = identity): the simulator of the private numerics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mpcache.model.cache import KVCache
from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Transformer
from mpcache.mpc.arith.accounting import Ledger
from mpcache.mpc.arith.numerics import Value
from mpcache.mpc.nn import layers as L

CacheFactory = Callable[[int], L.PrivateKVCache]  # n_layer -> an empty private cache (a method's policy)


def architecture_only(config: ModelConfig) -> Transformer:
    """The model as party 1 knows it: the public architecture, its weights meta tensors (shapes, no memory);
    share it with numerics.share_owned."""
    with torch.device("meta"):
        return Transformer(config).eval()


def share_model(
    model: Transformer, share: L.Share, options: L.PrivateOptions | None = None, consume: bool = False
) -> L.PrivateTransformer:
    """Secret-share the model owner's weights (`share`: plaintext -> MPCTensor from the owner; identity: simulator;
    numerics.share_owned with `architecture_only` at the other party). consume=True empties `model` as it goes."""
    return L.PrivateTransformer.from_plain(model, share, options, consume)


def share_cache(plain: KVCache | None, config: ModelConfig, shapes: list[tuple[int, ...]], share: L.Share):
    """A private cache from the owner's plaintext cache (`plain`, None at the other party; `shapes` = each layer's
    keys shape, public). Used by benchmarks to build long caches quickly: the cached tokens are then known to the
    owner, so this is a cost measurement shortcut, not a private prefill."""
    cache = L.PrivateKVCache(config.n_layer)
    for i, (b, h, n, d) in enumerate(shapes):
        if plain is not None:
            entry = plain.layers[i]
            keys, values = entry.keys[:, :, :n].double(), entry.values[:, :, :n].double()
            positions, valid = entry.positions[:, :, :n], entry.valid[:, :, :n]
        else:
            keys = values = torch.zeros(b, h, n, d, dtype=torch.float64)
            positions, valid = torch.arange(n).expand(b, h, n), torch.ones(b, h, n, dtype=torch.bool)
        cache.layers[i] = L.PrivateLayerKV(share(keys), share(values), positions.clone(), valid.clone())
    cache.seen_tokens = shapes[0][2] if plain is None else plain.seen_tokens
    cache.open_operands()  # keys/values opened once against dealer masks, as a private prefill's attention does
    return cache


def generate(
    model: L.PrivateTransformer,
    tokens: Value,
    steps: int,
    cache: L.PrivateKVCache | None = None,
    ledger: Ledger | None = None,
    on_step: Callable[[], None] | None = None,
    prefill_block: int | None = None,
) -> tuple[list[Value], Value]:
    """Greedy decoding: one-hot prompt [B, T, V] -> (`steps` secret one-hots [B, 1, V], first step's logits [B, 1, V]).

    Step 0 is the prefill (the whole prompt), each later step feeds the previous secret one-hot. With a ledger,
    every step is recorded as "prefill" / "decode" with its per-layer, per-operation costs. `on_step()` runs after
    each step (outside the ledger): a deployment's job checkpoint, where a cancelled job stops at both parties.
    `prefill_block` (public): the prompt goes in blocks of that many tokens (`prefill`), so the prefill's
    attention holds block x prompt scores at a time instead of prompt x prompt.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cache = cache if cache is not None else L.PrivateKVCache(model.config.n_layer)
    out: list[Value] = []
    first_logits = None
    for step in range(steps):
        if ledger is not None:
            ledger.begin_step("prefill" if step == 0 else "decode")
        logits = prefill(model, tokens, cache, prefill_block) if step == 0 else model(tokens, cache, last_only=True)
        tokens = L.greedy_token(logits, model.options)
        if ledger is not None:
            ledger.end_step()
        if first_logits is None:
            first_logits = logits
        out.append(tokens)
        if on_step is not None and step + 1 < steps:
            on_step()
    return out, first_logits


def next_logits(
    model: L.PrivateTransformer,
    tokens: Value,
    cache: L.PrivateKVCache,
    ledger: Ledger | None = None,
    block: int | None = None,
) -> Value:
    """One step without the private argmax: the secret logits [B, 1, V] of the last position after one-hot `tokens`
    [B, T, V] (the prompt, or the client's next token after a kept cache), `block` tokens at a time (`prefill`).
    Recorded as "prefill" on an empty cache, "decode" otherwise. The caller reveals them to the client (job
    generate's output "logits": see parties/jobs.py for what that reveals)."""
    if ledger is not None:
        ledger.begin_step("prefill" if cache.seen_tokens == 0 else "decode")
    logits = prefill(model, tokens, cache, block)
    if ledger is not None:
        ledger.end_step()
    return logits


def prefill(model: L.PrivateTransformer, tokens: Value, cache: L.PrivateKVCache, block: int | None = None) -> Value:
    """The prompt [B, T, V] into the cache, `block` tokens at a time (None: all at once); the last position's logits.

    Each block attends to the cache so far plus itself (causal), so the result equals the one-shot prefill's up
    to fixed-point rounding, and the largest attention matrix is block x T. The block size is public (as T is).
    Caches that evict after the prompt's attention (MPCache's look-once static eviction) see `cache.more_prompt`
    set while blocks remain, and act on the last block (its queries are the observation window's)."""
    if block is not None and block < 1:
        raise ValueError(f"prefill_block must be >= 1, got {block}")
    t = tokens.shape[1]
    if block is None or block >= t:
        return model(tokens, cache, last_only=True)
    logits = None
    for start in range(0, t, block):
        cache.more_prompt = start + block < t
        logits = model(tokens[:, start : start + block], cache, last_only=True)
    cache.more_prompt = False
    return logits


def plain_greedy(model: Transformer, ids: Tensor, steps: int) -> tuple[list[int], Tensor]:
    """The plaintext reference: greedy tokens of batch row 0 and the first step's last-position logits."""
    cache = KVCache(model.config.n_layer)
    out = []
    with torch.no_grad():
        logits = model(ids, cache)[:, -1:]
        first = logits
        for _ in range(steps):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), cache)
    return out, first


def simulate(model: Transformer, ids: Tensor, steps: int) -> tuple[list[int], Tensor]:
    """The float simulator of the private decoder (same approximations, no MPC): greedy tokens, first logits."""
    pm = share_model(model, lambda t: t)
    tokens, logits = generate(pm, L.one_hot(ids, model.config.vocab_size), steps)
    return [int(t[0, -1].argmax()) for t in tokens], logits


def decode_tokens(one_hots: Tensor) -> list[int]:
    """Client side: reconstructed one-hots [..., V] -> token ids (argmax)."""
    return one_hots.reshape(-1, one_hots.shape[-1]).argmax(-1).tolist()
