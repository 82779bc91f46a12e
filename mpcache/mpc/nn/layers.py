"""Private layers of the GPT-2 and Llama families, mirroring mpcache/model/transformer.py top to bottom.

Every layer is written once against the operations of mpcache.mpc.arith.numerics, so it runs on CrypTen MPCTensors
(the private model) or on float tensors (the simulator: the same approximations in floating point). Weights
become private through a `share` function (server-side plaintext -> MPCTensor); the identity gives the
simulator. Tokens enter as one-hot rows the client shares as 0/1 bits, and greedy decoding returns the next
token as a secret one-hot, so the embedding lookup of the next step is again a product with a secret one-hot.

Differences from the plaintext math (all deliberate, all tested):
* 1/sqrt(head_dim) is folded into the query projection when the model is shared (exact in floats, free in MPC).
* Normalisation uses numerics.inv_sqrt on a public range `norm_range` of mean(x^2) + eps (RMSNorm) or
  var + eps (LayerNorm), applied to the sum of squares (sqrt(d) is folded into the norm weight).
* GeLU of every flavour uses the erf form (within 5e-4 of the tanh forms).
* Attention's softmax subtracts the row max unless a public `score_bound` is given, and its exp has no
  comparison (numerics.exp_range) for visible scores within `score_range` (64; safe to 150) of the max.
* The private KV cache appends new tokens after every head's slots; per-head lengths live in the public
  `valid` mask, exactly as the plaintext cache's padding does. Its keys and values are opened once per row
  against dealer masks (`KVOperands`, numerics.GrowingOperand), so a decode step's attention products open the
  query, the probabilities and the new row, not the whole cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mpcache.kernels import visibility
from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Transformer, rope_inverse_frequencies
from mpcache.mpc.arith import lut as LUT
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.arith.accounting import layer, span
from mpcache.mpc.arith.append_only import AppendOnlyOperand
from mpcache.mpc.arith.numerics import Value

Share = Callable[[Tensor], Value]  # server-side plaintext tensor -> private value (identity: simulator)
NONLINEAR = ("lut", "poly")
SCORE_RANGE = 64.0  # default spread of visible attention scores below the row max (numerics.softmax score_range)


@dataclass(frozen=True)
class PrivateOptions:
    """Public numeric choices of the private model."""

    # domain of mean(x^2) + eps (var + eps): SmolLM2-135M reaches 0.007 (layer 0) to 1.09e6 (layers 12-28: its massive
    # activation, one residual channel near 2.5e4), `python -m mpcache.mpc.nn.ranges`; the range costs comparisons
    # per norm row only (one comparison per octave of 4 with tables, one per quarter octave with the ladder)
    norm_range: tuple[float, float] = (2.0**-10, 2.0**24)
    # Attention softmax (numerics.softmax). score_bound: a public bound on the attention scores, one number or one
    # per layer (`mpcache.mpc.arith.score_bounds` calibrates them), to skip the row max; None subtracts the max (the
    # accurate default: a bound loose by b costs a factor e^b in precision, see bench.softmax_modes).
    # score_range: how far below the max (or bound) visible scores may lie; a number (at most 150) selects the
    # comparison-free exp (numerics.exp_range), None the exp clipped by a comparison (numerics.exp_neg); both with
    # nonlinear="poly" only (the table exp clips by a comparison on its own).
    score_bound: float | tuple[float, ...] | None = None
    score_range: float | None = SCORE_RANGE
    # Secret comparisons (numerics.less_than, arith/compare.py): "fss" = one round from dealer DCF keys on the
    # bit width each call site declares; "crypten" = CrypTen's 64-bit A2B adder (~8 rounds), kept for comparison.
    comparisons: str = "fss"
    # Smooth nonlinearities: "lut" = dealer DPF lookup tables (arith/lut.py: the softmax's exp, SiLU, GeLU, and per
    # row the norms' inverse square root and the softmax's reciprocal of the row sum from the octave and one 16-bit
    # table; one lookup round each, needs FSS keys); "poly" = the polynomial / Newton numerics (numerics.exp_range
    # or exp_neg, numerics.silu / gelu, ladder + Newton per row). None: "lut" with FSS comparisons, "poly" with
    # CrypTen's.
    nonlinear: str | None = None

    def __post_init__(self) -> None:
        N.compare.check_mode(self.comparisons)
        if self.nonlinear is None:
            object.__setattr__(self, "nonlinear", "lut" if self.comparisons == "fss" else "poly")
        if self.nonlinear not in NONLINEAR:
            raise ValueError(f"nonlinear must be one of {NONLINEAR}, got {self.nonlinear!r}")
        if self.nonlinear == "lut" and self.comparisons != "fss":
            raise ValueError("nonlinear='lut' needs comparisons='fss' (both come from dealer FSS keys)")

    def layer_bound(self, layer: int) -> float | None:
        """The score bound of block `layer` (None: subtract the row max)."""
        if self.score_bound is None or isinstance(self.score_bound, (int, float)):
            return self.score_bound
        if not 0 <= layer < len(self.score_bound):
            raise ValueError(f"score_bound holds {len(self.score_bound)} per-layer bounds, no bound for layer {layer}")
        return float(self.score_bound[layer])


def one_hot(ids: Tensor, vocab_size: int) -> Tensor:
    """Client side: token ids [B, T] -> float one-hot rows [B, T, V] (share them with precision 0)."""
    if ids.dim() != 2:
        raise ValueError(f"token ids must be [batch, time], got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    return torch.nn.functional.one_hot(ids, vocab_size).double()


class Linear:
    """y = x @ W^T + b with W stored transposed; several nn.Linear fuse into one product along the output.
    A private weight is opened once against a fixed dealer mask (numerics.FixedOperand), so each product sends
    only the masked input."""

    def __init__(self, weight_t: Value | N.FixedOperand | N.TransposedOperand, bias: Value | None) -> None:
        self.weight_t, self.bias = weight_t, bias

    @classmethod
    def from_plain(cls, linears: list[nn.Linear], share: Share, scales: list[float] | None = None) -> Linear:
        scales = scales or [1.0] * len(linears)
        w = torch.cat([lin.weight.detach().double() * s for lin, s in zip(linears, scales)]).T.contiguous()
        biases = [lin.bias for lin in linears]
        if all(b is None for b in biases):
            return cls(N.fixed(share(w)), None)
        b = torch.cat(
            [(lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias.detach()).double() * s
             for lin, s in zip(linears, scales)]
        )  # fmt: skip
        return cls(N.fixed(share(w)), share(b))

    def __call__(self, x: Value) -> Value:
        with span("linear"):
            y = N.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class Embedding:
    """Lookup as a product with a secret one-hot (no index is revealed)."""

    def __init__(self, table: Value | N.FixedOperand) -> None:
        self.table = table

    def __call__(self, tokens: Value) -> Value:
        with span("linear"):
            return N.matmul(tokens, self.table)


class RMSNorm:
    """w * x / sqrt(mean(x^2) + eps), computed as (sqrt(d) w) * x / sqrt(sum(x^2) + d eps) with the sum of
    squares kept to 16 significant bits (see `_normalise`); sqrt(d) is folded into the weight when shared."""

    def __init__(self, weight_sqrt_d: Value, eps: float, options: PrivateOptions) -> None:
        self.weight, self.eps, self.options = weight_sqrt_d, eps, options

    def __call__(self, x: Value) -> Value:
        with span("norm"):
            return _normalise(x, self.weight, self.eps, self.options)


class LayerNorm:
    """w * (x - mean) / sqrt(var + eps) + b, normalised as in RMSNorm (sqrt(d) folded into w)."""

    def __init__(self, weight_sqrt_d: Value, bias: Value, eps: float, options: PrivateOptions) -> None:
        self.weight, self.bias, self.eps, self.options = weight_sqrt_d, bias, eps, options

    def __call__(self, x: Value) -> Value:
        with span("norm"):
            c = x - N.divide(x.sum(-1, keepdim=True), x.shape[-1])
            return _normalise(c, self.weight, self.eps, self.options) + self.bias


def norm_shifts(d: int, norm_range: tuple[float, float]) -> tuple[int, int]:
    """(k, c) of `_normalise` for width d: squares kept 2^k larger, 1 / sqrt(sum) returned 2^c larger."""
    lo, hi = (d * v for v in norm_range)
    k = min(16, max(0, 2 * math.ceil(-math.log2(lo) / 2)))  # lo 2^k >= 1
    c = min(math.ceil(math.log2(hi) / 2), 14 + math.floor(math.log2(lo) / 2))
    if c + k // 2 < 0:
        raise ValueError(f"norm_range {norm_range} is too wide for d={d}")
    return k, c


def _normalise(x: Value, weight_sqrt_d: Value, eps: float, options: PrivateOptions) -> Value:
    """x * weight_sqrt_d / sqrt(sum(x^2) + d eps), for mean(x^2) + eps within options.norm_range = (lo, hi).

    x^2 and x * w come from one product round, kept 2^k times larger (k even) so the sum of squares holds 16
    significant bits even at the low end; inv_sqrt returns 2^c / sqrt(sum) with the smallest c that keeps it
    at least 1 on the range (16 significant bits), capped so 2^c / sqrt(d lo) stays below 2^15. The final
    product stays below 2^30 while |w| sqrt(d) 2^(k + c) does.
    """
    d = x.shape[-1]
    lo, hi = (d * v for v in options.norm_range)
    k, c = norm_shifts(d, options.norm_range)
    sq, xw = N.mul(N.stack([x, x]), N.stack([x, weight_sqrt_d.expand(x.shape)]), shift=-k)
    total = sq.sum(-1, keepdim=True) + d * eps * 2**k
    if options.nonlinear == "lut":  # octave + one table lookup (arith/lut.py), no Newton
        r = LUT.inv_sqrt(total, lo * 2**k, hi * 2**k, scale_bits=c + k // 2)
    else:
        r = N.inv_sqrt(total, lo * 2**k, hi * 2**k, scale_bits=c + k // 2, steps_per_octave=4, iterations=2)
    return N.mul(xw, r, shift=c + k)  # (x w 2^k) (2^c / sqrt(sum)) / 2^(c + k)


def make_norm(module: nn.Module, share: Share, options: PrivateOptions) -> RMSNorm | LayerNorm:
    weight = share(module.weight.detach().double() * module.weight.shape[0] ** 0.5)
    if isinstance(module, nn.LayerNorm):
        return LayerNorm(weight, share(module.bias.detach().double()), module.eps, options)
    return RMSNorm(weight, module.eps, options)


def activation(x: Value, name: str, nonlinear: str = "poly") -> Value:
    table = nonlinear == "lut"
    if name == "silu":
        return LUT.silu(x) if table else N.silu(x)
    if name in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return LUT.gelu(x) if table else N.gelu(x)
    if name == "relu":
        return N.relu(x)
    raise NotImplementedError(f"activation {name!r} is not supported")


def rope_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """Public cos/sin [B, 1, T, D] of `positions` [B, T], as apply_rope computes them (rotate-half layout)."""
    freqs = positions[:, None, :, None].double() * inv_freq.double()
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def apply_rope(x: Value, positions: Tensor, inv_freq: Tensor) -> Value:
    """x * cos + rotate_half(x) * sin on shares: the rotation is local, the public products share one
    truncation."""
    cos, sin = rope_tables(positions, inv_freq)
    half = x.shape[-1] // 2
    rotated = N.cat([-x[..., half:], x[..., :half]], dim=-1)
    with span("rope"):
        return N.combine(N.stack([x, rotated]), torch.stack([cos, sin]))


def attention_softmax(
    scores: Value, visible: Tensor, bound: float | None, score_range: float | None, nonlinear: str
) -> Value:
    """The attention softmax PrivateOptions choose: the tables ("lut": lut.softmax, which clips by itself and
    ignores `score_range`) or the polynomial one ("poly": numerics.softmax)."""
    if nonlinear == "lut":
        return LUT.softmax(scores, visible, bound)
    return N.softmax(scores, visible, bound, score_range)


def cached_attention(
    queries: Value,
    keys: Value,
    values: Value,
    query_positions: Tensor,
    key_positions: Tensor,
    key_valid: Tensor,
    sliding_window: int | None = None,
    score_bound: float | None = None,
    operands: KVOperands | None = None,
    return_probs: bool = False,
    score_range: float | None = SCORE_RANGE,
    nonlinear: str = "poly",
) -> Value | tuple[Value, Value]:
    """Attention of pre-scaled queries [B, Hq, T, D] over private caches [B, Hkv, L, D] (public positions).
    Rows that see nothing output zeros. `operands`, when given, must hold exactly these keys and values
    (`PrivateKVCache.kv_operands`): the products then open only the queries, the probabilities and the rows not
    opened before; otherwise both products are plain Beaver (the whole cache is opened). With `return_probs`, also
    the softmax probabilities [B, Hkv, G, T, L] (what H2O-style scores accumulate)."""
    b, hq, t, d = queries.shape
    hkv, length = keys.shape[1], keys.shape[2]
    g = hq // hkv
    q = queries.reshape(b, hkv, g, t, d)
    if operands is not None and operands.length != length:
        raise ValueError(f"operands hold {operands.length} rows, the cache {length}")
    with span("attention"):
        if operands is None:
            scores = N.matmul(q, keys.unsqueeze(2).transpose(-1, -2))  # [B, Hkv, G, T, L]
        else:
            scores = N.matmul(q.reshape(b, hkv, g * t, d), operands.keys).reshape(b, hkv, g, t, length)
    visible = visibility(query_positions, key_positions, key_valid, sliding_window)
    with span("softmax"):
        probs = attention_softmax(scores, visible, score_bound, score_range, nonlinear)
    with span("attention"):
        if operands is None:
            out = N.matmul(probs, values.unsqueeze(2))
        else:
            out = N.matmul(probs.reshape(b, hkv, g * t, length), operands.values)
    out = out.reshape(b, hq, t, values.shape[-1])
    return (out, probs) if return_probs else out


class KVOperands:
    """One cache layer's keys (as K^T [B, H, Dk, L], growing along the last dim) and values ([B, H, L, Dv], growing
    along dim -2), each an append-only operand (arith.append_only): each row is opened once against its own dealer
    mask row; past the capacity (`numerics.growing_capacity`: n + max(64, n // 2) rows for n cached ones) both start
    fresh together. An entry that is not an append of the cached one (compaction, a gathered view) never reaches
    these operands: the cache hands them on only through `update`, so a mask row never pads two values."""

    def __init__(self) -> None:
        self._keys, self._values = AppendOnlyOperand(-1), AppendOnlyOperand(-2)

    @property
    def keys(self) -> N.GrowingOperand:
        assert self._keys.operand is not None, "update the operands first"
        return self._keys.operand

    @property
    def values(self) -> N.GrowingOperand:
        assert self._values.operand is not None, "update the operands first"
        return self._values.operand

    @property
    def length(self) -> int:
        return self._values.length

    def update(self, entry: PrivateLayerKV) -> None:
        """Hold the entry's rows: its rows past `length` are staged (opened with the next product) when the entry
        extends the rows held within the capacity, otherwise fresh operands take the whole entry."""
        n = entry.capacity
        self._keys.update(n, lambda start: entry.keys[:, :, start:].transpose(-1, -2))
        self._values.update(n, lambda start: entry.values[:, :, start:])

    def flush(self) -> None:
        """Open the staged rows of keys and values now, in one round."""
        N.GrowingOperand.flush_all([self.keys, self.values])


@dataclass
class PrivateLayerKV:
    """One layer's private cache: slot j of head (b, h) holds the token at positions[b, h, j] if valid."""

    keys: Value  # [B, H, L, Dk]
    values: Value  # [B, H, L, Dv]
    positions: Tensor  # [B, H, L] int64, public
    valid: Tensor  # [B, H, L] bool, public
    # keys/values opened once per row (PrivateKVCache.kv_operands); handed on by `update` only: any other new
    # entry (compaction, a gathered view) starts without, so a stale operand is never used
    operands: KVOperands | None = field(default=None, repr=False, compare=False)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


class PrivateKVCache:
    """Secret-shared keys/values with public positions and validity, the private twin of model.cache.KVCache
    (same hooks; eviction policies subclass it)."""

    wants_probs = False  # True: Attention passes each step's attention probabilities to observe_probs
    more_prompt = False  # True while a blockwise prefill has prompt blocks left (decoder.prefill)
    # the numeric options of the model that runs this cache (PrivateTransformer sets them at each call): hooks that
    # compute (MPCache's static eviction softmax) use the model's nonlinearities
    options: PrivateOptions = PrivateOptions()

    def __init__(self, n_layer: int) -> None:
        self.layers: list[PrivateLayerKV | None] = [None] * n_layer
        self.seen_tokens = 0

    def update(self, layer: int, keys: Value, values: Value, positions: Tensor, valid: Tensor) -> PrivateLayerKV:
        """Append T tokens (keys/values [B, H, T, D], positions/valid [B, T]) after every head's slots."""
        b, h, t, _ = keys.shape
        pos = positions[:, None, :].expand(b, h, t)
        ok = valid[:, None, :].expand(b, h, t)
        entry = self.layers[layer]
        if entry is None:
            entry = PrivateLayerKV(keys, values, pos.clone(), ok.clone())
        else:
            entry = PrivateLayerKV(
                N.cat([entry.keys, keys], dim=2),
                N.cat([entry.values, values], dim=2),
                torch.cat([entry.positions, pos], dim=2),
                torch.cat([entry.valid, ok], dim=2),
                entry.operands,  # the old rows stay a prefix: the operands stage the new ones when next used
            )
        self.layers[layer] = entry
        return entry

    def kv_operands(self, layer: int, entry: PrivateLayerKV) -> KVOperands | None:
        """The masked-once keys/values of `entry` (made lazily, and afresh once their capacity is used up) when
        `entry` is this layer's stored cache; None for any other view (a gathered subset) and for a tuple
        provider without weight-stationary tuples."""
        if entry is not self.layers[layer] or not N.GrowingOperand.supported(entry.keys):
            return None
        if entry.operands is None:
            entry.operands = KVOperands()
        entry.operands.update(entry)
        return entry.operands

    OPEN_BATCH_BYTES = 64 << 20  # one opening message stays far below the transport's max_message_bytes

    def open_operands(self) -> None:
        """Open every stored layer's keys and values against fresh masks now (a private prefill's attention does
        this on the way), so the next decode step opens only its new rows: one round per OPEN_BATCH_BYTES of
        shares (one round for short caches; SmolLM2's 30 layers x 4096 tokens would be a 377 MB message)."""
        batch, size = [], 0
        for i, entry in enumerate(self.layers):
            ops = None if entry is None else self.kv_operands(i, entry)
            if ops is None:
                continue
            batch += [ops.keys, ops.values]
            size += 16 * entry.keys.shape.numel()  # keys and values, 8 bytes a share
            if size >= self.OPEN_BATCH_BYTES:
                N.GrowingOperand.flush_all(batch)
                batch, size = [], 0
        N.GrowingOperand.flush_all(batch)

    def keep(self, layer: int, index: Tensor, count: Tensor | None = None) -> None:
        """Keep slots `index` [B, H, K] (public) of every head, the first `count[b, h]` of each row when given:
        a local gather of the shares."""
        entry = self.layers[layer]
        if entry is None:
            raise ValueError(f"layer {layer} has no cache to compact")
        b, h, length = entry.valid.shape
        if index.dim() != 3 or index.shape[:2] != (b, h) or bool(((index < 0) | (index >= length)).any()):
            raise ValueError(f"index must be [{b}, {h}, K] with slots in [0, {length}), got {tuple(index.shape)}")
        k = index.shape[2]
        in_use = torch.ones(b, h, k, dtype=torch.bool)
        if count is not None:
            if count.shape != (b, h) or bool(((count < 0) | (count > k)).any()):
                raise ValueError(f"count must be [{b}, {h}] with values in [0, {k}]")
            in_use = torch.arange(k)[None, None, :] < count[:, :, None]
        gather = index[..., None]
        self.layers[layer] = PrivateLayerKV(
            entry.keys.gather(2, gather.expand(-1, -1, -1, entry.keys.shape[-1])),
            entry.values.gather(2, gather.expand(-1, -1, -1, entry.values.shape[-1])),
            entry.positions.gather(2, index),
            entry.valid.gather(2, index) & in_use,
        )

    # Hooks, called as in the plaintext Attention: observe_hidden -> update -> observe -> attention_view ->
    # after_attention. All no-ops here; private eviction policies override them.
    def observe_hidden(self, layer: int, hidden: Value) -> None:
        """The attention block's private normalised input [B, T, d_model], before the projections."""

    def observe(self, layer: int, queries: Value, query_positions: Tensor) -> None:
        """This step's private queries [B, Hq, T, D] (after RoPE, pre-scaled by 1/sqrt(D)), after the step's
        keys were stored and before attention reads the cache."""

    def attention_view(self, layer: int) -> PrivateLayerKV:
        """The slots attention reads for this step (the whole layer here)."""
        entry = self.layers[layer]
        assert entry is not None
        return entry

    def observe_probs(self, layer: int, probs: Value) -> None:
        """This step's private attention probabilities [B, Hkv, G, T, L] over attention_view's slots, called
        before after_attention when `wants_probs`."""

    def after_attention(self, layer: int, queries: Value, query_positions: Tensor) -> None:
        """Called after attention read the cache for this step."""

    def tokens_per_head(self, layer: int) -> Tensor:
        entry = self.layers[layer]
        return torch.zeros(0, dtype=torch.long) if entry is None else entry.valid.sum(-1)


class Attention:
    def __init__(self, config: ModelConfig, layer: int, qkv: Linear, o_proj: Linear, options: PrivateOptions):
        self.config, self.layer, self.qkv, self.o_proj, self.options = config, layer, qkv, o_proj, options
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.inv_freq = rope_inverse_frequencies(config) if config.family == "llama" else None

    @classmethod
    def from_plain(cls, attn: nn.Module, share: Share, options: PrivateOptions) -> Attention:
        scale = attn.head_dim**-0.5  # folded into the query projection
        qkv = Linear.from_plain([attn.q_proj, attn.k_proj, attn.v_proj], share, [scale, 1.0, 1.0])
        return cls(attn.config, attn.layer, qkv, Linear.from_plain([attn.o_proj], share), options)

    def __call__(self, x: Value, positions: Tensor, valid: Tensor, cache: PrivateKVCache) -> Value:
        b, t, _ = x.shape
        hd, nq, nkv = self.head_dim, self.n_head, self.n_kv_head
        qkv = self.qkv(x)
        q = qkv[..., : nq * hd].reshape(b, t, nq, hd).transpose(1, 2)
        k = qkv[..., nq * hd : (nq + nkv) * hd].reshape(b, t, nkv, hd).transpose(1, 2)
        v = qkv[..., (nq + nkv) * hd :].reshape(b, t, nkv, hd).transpose(1, 2)
        if self.inv_freq is not None:
            q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
        cache.observe_hidden(self.layer, x)
        cache.update(self.layer, k, v, positions, valid)
        cache.observe(self.layer, q, positions)
        entry = cache.attention_view(self.layer)  # observe may have compacted the layer or picked a subset
        out = cached_attention(
            q, entry.keys, entry.values, positions, entry.positions, entry.valid,
            self.config.sliding_window, self.options.layer_bound(self.layer), cache.kv_operands(self.layer, entry),
            return_probs=cache.wants_probs, score_range=self.options.score_range, nonlinear=self.options.nonlinear,
        )  # fmt: skip
        if cache.wants_probs:
            out, probs = out
            cache.observe_probs(self.layer, probs)
        cache.after_attention(self.layer, q, positions)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP:
    """Llama: down(act(gate(x)) * up(x)) with gate and up fused into one product; GPT-2: down(act(up(x)))."""

    def __init__(self, family: str, up: Linear, down: Linear, activation_name: str, nonlinear: str = "poly") -> None:
        self.family, self.up, self.down, self.activation = family, up, down, activation_name
        self.nonlinear = nonlinear

    @classmethod
    def from_plain(cls, mlp: nn.Module, share: Share, options: PrivateOptions | None = None) -> MLP:
        ups = [mlp.gate_proj, mlp.up_proj] if mlp.family == "llama" else [mlp.up_proj]
        nonlinear = (options or PrivateOptions()).nonlinear
        up, down = Linear.from_plain(ups, share), Linear.from_plain([mlp.down_proj], share)
        return cls(mlp.family, up, down, mlp.activation, nonlinear)

    def __call__(self, x: Value) -> Value:
        h = self.up(x)
        with span("activation"):
            if self.family == "llama":
                d_ff = h.shape[-1] // 2
                h = N.mul(activation(h[..., :d_ff], self.activation, self.nonlinear), h[..., d_ff:])
            else:
                h = activation(h, self.activation, self.nonlinear)
        return self.down(h)


class Block:
    def __init__(self, attn_norm, attn: Attention, mlp_norm, mlp: MLP) -> None:
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def __call__(self, x: Value, positions: Tensor, valid: Tensor, cache: PrivateKVCache) -> Value:
        x = x + self.attn(self.attn_norm(x), positions, valid, cache)
        return x + self.mlp(self.mlp_norm(x))


class PrivateTransformer:
    """Maps secret one-hot tokens [B, T, V] to secret logits [B, T, V] through a private KV cache."""

    def __init__(self, config: ModelConfig, tok_emb, pos_emb, blocks, norm, lm_head, options) -> None:
        self.config, self.tok_emb, self.pos_emb, self.blocks = config, tok_emb, pos_emb, blocks
        self.norm, self.lm_head, self.options = norm, lm_head, options

    @classmethod
    def from_plain(
        cls, model: Transformer, share: Share, options: PrivateOptions | None = None, consume: bool = False
    ) -> PrivateTransformer:
        """Share a plaintext model's weights (server side). share=lambda t: t gives the float simulator.

        Weights are shared one tensor at a time in float64 (a layer's fused projection at most: no float64 copy
        of the whole model), the largest first (the embedding table: the peak while little else is held), and a
        tied LM head reads the embedding's operand transposed (one sharing, one opening, one mask). At a party
        that does not own the model, `model` may be `decoder.architecture_only` (meta tensors: shapes only) with
        `share` = numerics.share_owned. consume=True: each plaintext module's weights become meta tensors once
        shared (the owner's float copy goes as its shares come: a deployment's party 0 keeps no plaintext model)."""
        options = options or PrivateOptions()

        def done(*modules: nn.Module) -> None:
            if consume:
                for module in modules:
                    module.to("meta")

        table = N.fixed(share(model.tok_emb.weight.detach().double()))
        if model.config.tie_embeddings:
            lm_head = Linear(N.transposed(table), None)
        else:
            lm_head = Linear.from_plain([model.lm_head], share)
        done(model.tok_emb, model.lm_head)
        pos_emb = None
        if model.config.family == "gpt2":
            pos_emb = share(model.pos_emb.weight.detach().double())
            done(model.pos_emb)
        blocks = []
        for blk in model.blocks:
            blocks.append(Block(
                make_norm(blk.attn_norm, share, options),
                Attention.from_plain(blk.attn, share, options),
                make_norm(blk.mlp_norm, share, options),
                MLP.from_plain(blk.mlp, share, options),
            ))  # fmt: skip
            done(blk)
        norm = make_norm(model.norm, share, options)
        done(model.norm)
        return cls(model.config, Embedding(table), pos_emb, blocks, norm, lm_head, options)

    def __call__(
        self,
        tokens: Value,
        cache: PrivateKVCache,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Value:
        """Logits for one-hot `tokens` [B, T, V]; positions / attention_mask / last_only as Transformer.forward."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.config.vocab_size:
            raise ValueError(
                f"tokens must be one-hot [batch, time, {self.config.vocab_size}], got {tuple(tokens.shape)}"
            )
        b, t, _ = tokens.shape
        if positions is None:
            positions = torch.arange(cache.seen_tokens, cache.seen_tokens + t).expand(b, t)
        valid = torch.ones(b, t, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        cache.options = self.options
        with N.comparisons(self.options.comparisons):  # the cache's hooks (eviction) run inside too
            with layer("embed"):
                x = self.tok_emb(tokens)
            if self.pos_emb is not None:
                if int(positions.max()) >= self.config.max_position:
                    raise ValueError(f"position {int(positions.max())} exceeds max_position {self.config.max_position}")
                x = x + self.pos_emb[positions]
            for i, block in enumerate(self.blocks):
                with layer(i):
                    x = block(x, positions, valid, cache)
            cache.seen_tokens = int(positions.max()) + 1
            if last_only:
                x = x[:, -1:]
            with layer("head"):
                return self.lm_head(self.norm(x))


def greedy_token(logits: Value, options: PrivateOptions | None = None) -> Value:
    """Secret one-hot of the argmax of the last position's logits [B, T, V] -> [B, 1, V] (first index on ties);
    it feeds the next step's embedding directly, so the token is revealed to no one until the client opens it.
    Logits |l| < 2^14, so their differences stay within numerics.VALUE_BOUND; `options`: the model's (its
    comparison protocol; default: the active one)."""
    mode = N.compare.mode() if options is None else options.comparisons
    with layer("head"), span("selection"), N.comparisons(mode):
        return N.argmax(logits[:, -1:], N.VALUE_BOUND)
