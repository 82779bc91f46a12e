"""Model configuration shared by the GPT-2 and Llama families.

One dataclass describes every supported architecture; the loader maps Hugging Face
`config.json` files onto it (see `mpcache.model.loading`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    `family` decides the block layout: "gpt2" (learned positions, LayerNorm, GeLU,
    fused biased projections) or "llama" (RoPE, RMSNorm, SwiGLU, grouped-query
    attention; Mistral and Qwen2 are Llama variants with a sliding window or q/k/v
    biases).
    """

    family: Literal["gpt2", "llama"] = "llama"
    vocab_size: int = 264
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int = 8
    d_model: int = 256
    d_ff: int = 1024
    head_dim: int | None = None
    max_position: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    activation: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    architecture: str = "MpcacheForCausalLM"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"unknown model family {self.family!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_head // self.n_kv_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def num_parameters(self) -> int:
        """Parameter count without building the module (tied embeddings counted once)."""
        d, hd, gpt2 = self.d_model, self.head_dim, self.family == "gpt2"
        assert hd is not None
        qkv = hd * (self.n_head + 2 * self.n_kv_head)
        attn = d * qkv + self.n_head * hd * d + qkv * self.qkv_bias + d * self.out_bias
        mlp = (2 if gpt2 else 3) * d * self.d_ff
        if gpt2 or self.mlp_bias:  # GPT-2's MLP is always biased
            mlp += (1 if gpt2 else 2) * self.d_ff + d
        norm = 2 * d if gpt2 else d  # LayerNorm has a bias, RMSNorm does not
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = self.max_position * d if gpt2 else 0
        return self.n_layer * (attn + mlp + 2 * norm) + emb + pos + norm
