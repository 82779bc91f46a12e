"""Private computations a party can run for a client, by name. Both parties run the same job in lock step.

A job takes the client's secret-shared inputs (CrypTen MPCTensors), public parameters (a JSON object) and the
party's context (rank, the model's secret-shared weights), and returns secret-shared outputs; the party sends its
share of each output back to the client. Parameters are validated before any communication, so a bad request fails
identically at both parties without desynchronising them: types, ranges, finite numbers, unknown keys by name, and
numbers that would leave the fixed-point range (refused, never wrapped). What only the client can check (its own
secret input against a job's range) is `client_check`, run by parties/client.py before it shares anything. A job
calls `ctx.checkpoint()` where both parties may stop it together (a cancelled client; parties/party.py). The
private decoder is the job "generate" (mpcache/mpc/nn/decoder.py says who sees what).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

FRACTION_BITS = 16  # CrypTen's fixed-point precision: the inputs' and every product's
ENCODE_LIMIT = 2.0 ** (62 - FRACTION_BITS)  # a value's magnitude must stay below this to be encoded
PRODUCT_LIMIT = 2.0 ** (62 - 2 * FRACTION_BITS)  # |a * b| below this: the product fits before its exact truncation


def no_checkpoint() -> None:
    """Outside a running job there is nothing to stop."""


@dataclass
class JobContext:
    """What a job may use besides its inputs: the party's rank and the model's secret-shared weights by name."""

    rank: int
    weights: dict[str, Any] = field(default_factory=dict)  # name -> crypten MPCTensor
    decoder: Any = None  # mpcache.mpc.nn.layers.PrivateTransformer when the party serves a language model
    caches: dict[str, Any] = field(default_factory=dict)  # private KV caches kept between generate jobs, by name
    report: Any = None  # the last job's public cost report (JSON-able), sent to the client with the job's stats
    checkpoint: Callable[[], None] = no_checkpoint  # both parties stop the job here if either client cancelled


JobFn = Callable[[JobContext, list, dict], list]
JOBS: dict[str, tuple[JobFn, Callable[[dict, list[tuple[int, ...]], JobContext], None]]] = {}
INPUT_BITS: dict[str, int] = {}  # jobs whose inputs use another fixed-point precision than CrypTen's
CLIENT_CHECKS: dict[str, Callable[[torch.Tensor, dict], None]] = {}  # name -> check of the client's own input


def job(
    name: str,
    validate: Callable[[dict, list[tuple[int, ...]], JobContext], None],
    input_bits: int | None = None,
    client_check: Callable[[torch.Tensor, dict], None] | None = None,
):
    """Register `fn(ctx, inputs, params) -> outputs` under `name`; `validate(params, input_shapes, ctx)` raises
    ValueError for a request the job cannot run (it sees only public information: both parties agree on it).
    `input_bits`: the fixed-point precision the inputs must have (default: CrypTen's). `client_check(x, params)`:
    raises ValueError if the client's plaintext input would leave the job's fixed-point range."""

    def register(fn: JobFn) -> JobFn:
        if name in JOBS:
            raise ValueError(f"job {name!r} registered twice")
        JOBS[name] = (fn, validate)
        if input_bits is not None:
            INPUT_BITS[name] = input_bits
        if client_check is not None:
            CLIENT_CHECKS[name] = client_check
        return fn

    return register


def client_check(kind: str, x: torch.Tensor, params: dict) -> None:
    """The client's check of its own input (finite, encodable, the job's range); raises ValueError."""
    bits = INPUT_BITS.get(kind, FRACTION_BITS)
    limit = 2.0 ** (62 - bits)
    if not torch.isfinite(x).all():
        raise ValueError("the input has NaN or infinite values; only finite numbers can be secret-shared")
    if x.numel() and x.abs().max() >= limit:
        raise ValueError(
            f"the input reaches |x| = {x.abs().max().item():.4g}; fixed point with {bits} fractional bits holds "
            f"|x| < 2^{62 - bits} = {limit:.4g}"
        )
    if kind in CLIENT_CHECKS:
        CLIENT_CHECKS[kind](x, params)


def check_weights(weights: dict[str, torch.Tensor]) -> None:
    """A model file's weights must be finite and encodable (raises ValueError naming the tensor)."""
    for name, w in weights.items():
        if not torch.isfinite(w).all() or (w.numel() and w.abs().max() >= ENCODE_LIMIT):
            raise ValueError(f"weight {name} has values that are not finite or beyond |w| < 2^{62 - FRACTION_BITS}")


def check(kind: str, params: Any, shapes: list[tuple[int, ...]], ctx: JobContext) -> None:
    """Raise ValueError unless job `kind` accepts these public parameters and input shapes."""
    if kind not in JOBS:
        raise ValueError(f"unknown job kind {kind!r}; this party runs {sorted(JOBS)}")
    if not isinstance(params, dict):
        raise ValueError(f"job parameters must be a JSON object, got {type(params).__name__}")
    JOBS[kind][1](params, shapes, ctx)


def run(kind: str, ctx: JobContext, inputs: list, params: dict) -> list:
    return JOBS[kind][0](ctx, inputs, params)


# ---------------------------------------------------------------------------------------------------------------
# The private decoder
# ---------------------------------------------------------------------------------------------------------------

MAX_NEW_TOKENS = 256
MAX_KEPT_CACHES = 2  # private KV caches the parties keep between jobs ("keep_cache"): each holds a model's cache
CACHE_NAME_CHARS = 64


def _cache_name(params: dict, key: str) -> str | None:
    name = params.get(key)
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= CACHE_NAME_CHARS):
        raise ValueError(f"{key} must be a name of 1..{CACHE_NAME_CHARS} characters, got {name!r}")
    return name


def check_prefill_block(block: object) -> None:
    """generate's "prefill_block": None (the whole prompt in one pass) or a public int >= 1 (raises ValueError)."""
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
        raise ValueError(f"prefill_block must be an integer >= 1 (prompt tokens per prefill pass), got {block!r}")


def _check_generate(params: dict, shapes: list[tuple[int, ...]], ctx: JobContext) -> None:
    if ctx.decoder is None:
        raise ValueError("generate needs a language model (start party 0 with --model DIR, a checkpoint folder)")
    config = ctx.decoder.config
    known = {"max_new_tokens", "return_logits", "kv_cache", "output", "keep_cache", "resume", "prefill_block"}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"unknown generate parameters {sorted(unknown)}")
    if len(shapes) != 1 or len(shapes[0]) != 3 or shapes[0][0] != 1 or shapes[0][2] != config.vocab_size:
        raise ValueError(f"generate takes one one-hot prompt of shape [1, T, {config.vocab_size}], got {shapes}")
    steps = params.get("max_new_tokens", 16)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {steps!r}")
    if not isinstance(params.get("return_logits", False), bool):
        raise ValueError("return_logits must be true or false")
    check_prefill_block(params.get("prefill_block"))
    output = params.get("output", "tokens")
    if output not in ("tokens", "logits"):
        raise ValueError(f"output must be 'tokens' or 'logits', got {output!r}")
    if output == "logits" and (steps != 1 or params.get("return_logits", False)):
        raise ValueError("output 'logits' takes max_new_tokens 1 (the client picks each token) and no return_logits")
    keep, resume = _cache_name(params, "keep_cache"), _cache_name(params, "resume")
    if keep is not None and keep not in ctx.caches and len(ctx.caches) >= MAX_KEPT_CACHES and keep != resume:
        raise ValueError(f"the parties keep at most {MAX_KEPT_CACHES} caches ({sorted(ctx.caches)}): resume one")
    seen = 0
    if resume is not None:
        if resume not in ctx.caches:
            raise ValueError(f"no kept cache {resume!r} (kept: {sorted(ctx.caches)})")
        if "kv_cache" in params:
            raise ValueError("a resumed cache keeps its own kv_cache policy: give no kv_cache")
        seen = ctx.caches[resume].seen_tokens
    if not 1 <= shapes[0][1] or seen + shapes[0][1] + steps > config.max_position:
        raise ValueError(
            f"{seen} cached + {shapes[0][1]} input tokens + {steps} new ones exceed {config.max_position} positions"
        )
    from mpcache.mpc.caches import private_cache

    private_cache(config.n_layer, params.get("kv_cache"))  # a malformed spec fails here, before any MPC


@job("generate", _check_generate, input_bits=0)
def generate(ctx: JobContext, inputs: list, params: dict) -> list:
    """Greedy decoding of the client's secret one-hot prompt: returns the secret one-hots of the new tokens
    [1, steps, V] (and, with return_logits, the first step's logits [1, 1, V] for equivalence tests); the cost of
    every step per layer and operation class goes to ctx.report. kv_cache (optional, public): the private KV cache
    policy, e.g. {"method": "mpcache", "budget": 64} (caches.private_cache). prefill_block (optional, public): the
    input goes in passes of that many tokens (decoder.prefill: attention holds block x input scores at a time, so a
    long prompt's memory stays bounded; same logits up to fixed-point rounding); absent or null: one pass.

    The client's own argmax instead of the private one: output "logits" (with max_new_tokens 1) returns the
    shares of the last position's logits [1, 1, V] and skips the private argmax; "keep_cache": NAME keeps the
    private KV cache at the parties after the job, and the next job, "resume": NAME, takes the client's next
    token's one-hot as its input and continues that cache (parties/client.py Client.generate_client_argmax).
    Trade-off: the parties learn nothing more either way (logits and the next token stay secret-shared between
    them), but the client learns every step's whole logit vector instead of one token, which tells it far more
    about the model's weights (logit vectors span the LM head's image: enough to recover the hidden size and the
    head up to a linear map, as shown for production models by Carlini et al., "Stealing Part of a Production
    Language Model", 2024); a model owner who may reveal tokens only keeps the private argmax. What it buys: the
    private argmax's comparisons over the vocabulary (its "selection" cost in the report) and the client's free
    choice of the next token (sampling); what it costs: one client round trip (a job) per token, and a cache held
    at the parties between jobs (at most MAX_KEPT_CACHES; a resumed cache that fails its job is dropped).
    """
    from mpcache.mpc.arith import numerics
    from mpcache.mpc.arith.accounting import Ledger
    from mpcache.mpc.caches import private_cache
    from mpcache.mpc.nn import decoder

    crypten = numerics.crypten
    resume, keep = params.get("resume"), params.get("keep_cache")
    if resume is not None:
        cache = ctx.caches.pop(resume)  # dropped unless this job succeeds and keeps it again
    else:
        cache = private_cache(ctx.decoder.config.n_layer, params.get("kv_cache"))
    block = params.get("prefill_block")
    with Ledger(numerics.counters) as ledger:
        if params.get("output", "tokens") == "logits":
            out = [decoder.next_logits(ctx.decoder, inputs[0], cache, ledger, block)]
        else:
            steps = params.get("max_new_tokens", 16)
            tokens, logits = decoder.generate(
                ctx.decoder, inputs[0], steps, cache=cache, ledger=ledger, on_step=ctx.checkpoint, prefill_block=block
            )
            out = [crypten.cat(tokens, dim=1)] + ([logits] if params.get("return_logits", False) else [])
    ctx.report = {"steps": ledger.steps}
    if keep is not None:
        ctx.caches[keep] = cache
    return out


# ---------------------------------------------------------------------------------------------------------------
# Demo jobs (until the private decoder lands): they exercise every tuple kind the dealer serves.
# ---------------------------------------------------------------------------------------------------------------


def _one_input(shapes: list[tuple[int, ...]], kind: str) -> tuple[int, ...]:
    if len(shapes) != 1:
        raise ValueError(f"{kind} takes exactly one input, got {len(shapes)}")
    if math.prod(shapes[0]) == 0 or math.prod(shapes[0]) > 1 << 20:
        raise ValueError(f"{kind} input of shape {shapes[0]} must have 1..2^20 elements")
    return shapes[0]


def _check_poly(params: dict, shapes: list[tuple[int, ...]], ctx: JobContext) -> None:
    _one_input(shapes, "poly")
    if set(params) - {"coeffs"}:
        raise ValueError(f"unknown poly parameters {sorted(set(params) - {'coeffs'})}")
    coeffs = params.get("coeffs")
    if not isinstance(coeffs, list) or not 1 <= len(coeffs) <= 16:
        raise ValueError("poly needs params {'coeffs': [c0, c1, ...]} with 1..16 numbers")
    for i, c in enumerate(coeffs):
        if not isinstance(c, int | float) or isinstance(c, bool) or not math.isfinite(c):
            raise ValueError(f"poly coefficient coeffs[{i}] must be a finite number, got {c!r}")
        if abs(c) >= ENCODE_LIMIT:
            raise ValueError(
                f"poly coefficient coeffs[{i}] = {c:g} is beyond the fixed-point range (|c| < 2^{62 - FRACTION_BITS})"
            )


def _client_check_poly(x: torch.Tensor, params: dict) -> None:
    """Horner's intermediate values on the client's own input: every product and sum must fit the fixed point."""
    coeffs = params.get("coeffs") or [0.0]
    acc = torch.full_like(x, float(coeffs[-1]), dtype=torch.float64)
    for c in reversed(coeffs[:-1]):
        product = acc * x
        if product.numel() and product.abs().max() >= PRODUCT_LIMIT:
            raise ValueError(
                f"poly would leave the fixed-point range: a Horner product reaches {product.abs().max().item():.4g}, "
                f"and products must stay below 2^{62 - 2 * FRACTION_BITS} = {PRODUCT_LIMIT:.4g} with "
                f"{FRACTION_BITS} fractional bits (it would wrap around); scale the input or the coefficients down"
            )
        acc = product + float(c)


@job("poly", _check_poly, client_check=_client_check_poly)
def poly(ctx: JobContext, inputs: list, params: dict) -> list:
    """Elementwise c0 + c1 x + ... + cn x^n of a secret x with public coefficients (Horner: n Beaver products, a
    checkpoint after each)."""
    (x,) = inputs
    coeffs = params["coeffs"]
    acc = x * 0 + float(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        ctx.checkpoint()
        acc = acc * x + float(c)
    return [acc]


def _check_linear_relu(params: dict, shapes: list[tuple[int, ...]], ctx: JobContext) -> None:
    shape = _one_input(shapes, "linear_relu")
    if "weight" not in ctx.weights or "bias" not in ctx.weights:
        raise ValueError("linear_relu needs a model with 'weight' and 'bias' (start party 0 with --model)")
    d_in = ctx.weights["weight"].size(0)
    if shape[-1] != d_in:
        raise ValueError(f"linear_relu input has last dimension {shape[-1]}, the model's weight expects {d_in}")
    if params:
        raise ValueError(f"linear_relu takes no parameters, got {sorted(params)}")


@job("linear_relu", _check_linear_relu)
def linear_relu(ctx: JobContext, inputs: list, params: dict) -> list:
    """relu(x @ W + b) with the client's secret x and the model owner's secret W, b (matmul, comparison, B2A)."""
    (x,) = inputs
    return [(x.matmul(ctx.weights["weight"]) + ctx.weights["bias"]).relu()]


def demo_model(d_in: int = 8, d_out: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """The demo model file's contents (a real weight file; the private decoder will load real checkpoints)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in),
        "bias": 0.1 * torch.randn(d_out, generator=g),
    }
