"""A decoder-only transformer for the GPT-2 and Llama families, top to bottom.

Plain tensors, no framework: embeddings -> blocks (norm, attention, norm, MLP) -> norm ->
LM head. Attention reads a `KVCache` whose heads may hold different token sets, so every
cached key carries its original position; RoPE is applied with explicit position ids
before a key is stored, which keeps positions intact when tokens are evicted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpcache.kernels import decode_attention, wanted
from mpcache.model.cache import KVCache
from mpcache.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(config: ModelConfig) -> Tensor:
    """RoPE inverse frequencies, with Llama-3 and linear scaling as in Hugging Face.

    Computed in float32 exactly as Hugging Face does, so loaded checkpoints give bit-identical
    rotations (float64 here would differ by an ulp, ~1e-5 in the logits)."""
    dim = config.head_dim
    assert dim is not None
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [B, 1, T, D] of the angles of `positions` [B, T] (rotate-half layout);
    computed once per forward and shared by every layer's queries and keys."""
    freqs = positions[:, None, :, None].float() * inv_freq.to(positions.device)  # [B, 1, T, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1).to(dtype), torch.cat([sin, sin], -1).to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D] rotated by precomputed `rope_cos_sin` angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def apply_rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate x [B, H, T, D] by the angles of `positions` [B, T] (rotate-half layout)."""
    return rotate(x, *rope_cos_sin(positions, inv_freq.to(x.device), x.dtype))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        hd = config.head_dim
        assert hd is not None
        self.config, self.layer = config, layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, hd
        self.q_proj = nn.Linear(config.d_model, config.n_head * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * hd, config.d_model, bias=config.out_bias)
        if config.family == "llama":
            self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        valid: Tensor,
        cache: KVCache | None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """`rope`: this forward's (cos, sin) from `rope_cos_sin` (computed here when None)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.config.family == "llama":
            cos, sin = rope if rope is not None else rope_cos_sin(positions, self.inv_freq, q.dtype)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None and self.config.sliding_window is None and bool(valid.all()):
            # Fast path (training, plain scoring): causal attention over this chunk only.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        else:
            if cache is None:
                cache = KVCache(self.config.n_layer)
            cache.observe_hidden(self.layer, x)
            cache.update(self.layer, k, v, positions, valid)
            cache.observe(self.layer, q, positions)
            out = cache.attend(self.layer, q, positions, self.config.sliding_window)  # a paged store attends itself
            if out is None:
                entry = cache.attention_view(self.layer)  # observe may have compacted the layer or picked a subset
                # decode steps through the Triton kernel where the switch wants it (mpcache.kernels.runtime)
                out = decode_attention(q, entry, positions, self.config.sliding_window, use_kernels=wanted(q))
            cache.after_attention(self.layer, q, positions)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.family = config.family
        if config.family == "llama":
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
            self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
            self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)
        else:
            self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=True)
            self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=True)
        self.activation = config.activation

    def forward(self, x: Tensor) -> Tensor:
        if self.family == "llama":
            return self.down_proj(activation(self.gate_proj(x), self.activation) * self.up_proj(x))
        return self.down_proj(activation(self.up_proj(x), self.activation))


def activation(x: Tensor, name: str) -> Tensor:
    if name == "silu":
        return F.silu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    raise NotImplementedError(f"activation {name!r} is not supported")


def make_norm(config: ModelConfig) -> nn.Module:
    if config.family == "llama":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        valid: Tensor,
        cache: KVCache | None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, valid, cache, rope)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Maps input_ids [B, T] to logits [B, T, V], optionally through a KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.family == "gpt2":
            self.pos_emb = nn.Embedding(config.max_position, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(
        self,
        input_ids: Tensor,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits for `input_ids` [B, T].

        positions: [B, T] token positions (default: continue after the cache's tokens).
        attention_mask: [B, T], 0 marks padding that no query may attend to.
        last_only: return logits for the last position only ([B, 1, V]), as decoding needs.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, time] tensor, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if bool(((input_ids < 0) | (input_ids >= self.config.vocab_size)).any()):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size})")
        b, t = input_ids.shape
        for name, given in (("positions", positions), ("attention_mask", attention_mask)):
            if given is not None and given.shape != (b, t):
                raise ValueError(f"{name} must be [batch={b}, time={t}] like input_ids, got {tuple(given.shape)}")
        if positions is None:
            start = cache.seen_tokens if cache is not None else 0
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        valid = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        if attention_mask is not None:
            valid = attention_mask.bool()
        x = self.tok_emb(input_ids)
        if self.config.family == "gpt2":
            if int(positions.max()) >= self.config.max_position:
                raise ValueError(f"position {int(positions.max())} exceeds max_position {self.config.max_position}")
            x = x + self.pos_emb(positions)
        rope = None
        if self.config.family == "llama" and self.blocks:
            rope = rope_cos_sin(positions, self.blocks[0].attn.inv_freq, x.dtype)
        for block in self.blocks:
            x = block(x, positions, valid, cache, rope)
        if cache is not None:
            cache.seen_tokens = int(positions.max()) + 1
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
