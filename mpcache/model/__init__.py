"""Plaintext decoder-only transformer, its KV cache, tokenizers and checkpoint loading."""

from mpcache.model.cache import KVCache, LayerKV
from mpcache.model.config import ModelConfig
from mpcache.model.loading import (
    MODEL_NAMES,
    checkpoint_folder,
    from_pretrained,
    load_bundled,
    load_model,
    load_tokenizer,
)
from mpcache.model.tokenizer import ByteTokenizer, HFTokenizer
from mpcache.model.transformer import Transformer

__all__ = [
    "MODEL_NAMES",
    "ByteTokenizer",
    "HFTokenizer",
    "KVCache",
    "LayerKV",
    "ModelConfig",
    "Transformer",
    "checkpoint_folder",
    "from_pretrained",
    "load_bundled",
    "load_model",
    "load_tokenizer",
]
