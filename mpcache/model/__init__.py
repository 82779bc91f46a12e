"""Plaintext decoder-only transformer, its KV cache, tokenizers and checkpoint loading."""

from mpcache.model.cache import KVCache, LayerKV
from mpcache.model.config import ModelConfig
from mpcache.model.loading import from_pretrained, load_bundled, load_tokenizer
from mpcache.model.tokenizer import ByteTokenizer, HFTokenizer
from mpcache.model.transformer import Transformer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "KVCache",
    "LayerKV",
    "ModelConfig",
    "Transformer",
    "from_pretrained",
    "load_bundled",
    "load_tokenizer",
]
