"""mpcache's loader and model against Hugging Face transformers on small random checkpoints.

Each case builds a random model with `transformers`, saves it to disk in one of the formats
real checkpoints use, loads it with `mpcache.model.from_pretrained` and checks fp32 logits
(1e-4) and 32 greedy tokens against transformers itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mpcache.generate import generate
from mpcache.model import (
    ByteTokenizer,
    HFTokenizer,
    ModelConfig,
    Transformer,
    from_pretrained,
    load_bundled,
    load_tokenizer,
)
from mpcache.model.loading import BUNDLED_DIR

transformers = pytest.importorskip("transformers")

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_SIZE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def gpt2(**kw) -> object:
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **SMALL, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def llama(**kw) -> object:
    cfg = transformers.LlamaConfig(**LLAMA_SIZE, **{"num_key_value_heads": 2, **SMALL, **kw})
    return transformers.LlamaForCausalLM(cfg)


def mistral(**kw) -> object:
    cfg = transformers.MistralConfig(**LLAMA_SIZE, num_key_value_heads=2, **SMALL, **kw)
    return transformers.MistralForCausalLM(cfg)


def qwen2(**kw) -> object:
    cfg = transformers.Qwen2Config(**LLAMA_SIZE, num_key_value_heads=1, **SMALL, **kw)
    return transformers.Qwen2ForCausalLM(cfg)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# (id, model factory, save format)
CASES: list[tuple[str, Callable[[], object], str]] = [
    ("gpt2", lambda: gpt2(), "safetensors"),
    ("gpt2-untied-bin", lambda: gpt2(tie_word_embeddings=False), "bin"),
    ("llama-gqa", lambda: llama(), "safetensors"),
    ("llama-llama3-rope-sharded", lambda: llama(rope_parameters=LLAMA3_ROPE), "sharded"),
    (
        "llama-linear-rope-biases-headdim-bin-sharded",
        lambda: llama(
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
            attention_bias=True,
            mlp_bias=True,
            head_dim=24,
        ),
        "sharded_bin",
    ),
    ("llama-tied", lambda: llama(tie_word_embeddings=True, num_key_value_heads=4), "safetensors"),
    ("mistral-window8", lambda: mistral(sliding_window=8), "safetensors"),
    ("qwen2-tied", lambda: qwen2(tie_word_embeddings=True), "safetensors"),
    ("qwen2-sliding", lambda: qwen2(use_sliding_window=True, sliding_window=6, max_window_layers=0), "safetensors"),
]


def save(model: object, path: Path, fmt: str) -> None:
    """Write `model` the way a Hugging Face checkpoint on disk looks.

    transformers 5 dropped `safe_serialization=False`, so the `.bin` formats are written as
    older versions did: `torch.save` of the state dict, sharded with an index file."""
    if fmt == "safetensors":
        model.save_pretrained(path)
    elif fmt == "sharded":
        model.save_pretrained(path, max_shard_size="40KB")
        assert (path / "model.safetensors.index.json").exists()
        assert len(list(path.glob("model-*.safetensors"))) > 1
    else:
        model.config.architectures = [type(model).__name__]  # save_pretrained sets this for real checkpoints
        model.config.save_pretrained(path)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if fmt == "bin":
            torch.save(state, path / "pytorch_model.bin")
        else:
            keys = sorted(state)
            shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
            weight_map = {}
            for name, names in shards.items():
                torch.save({k: state[k] for k in names}, path / name)
                weight_map.update(dict.fromkeys(names, name))
            (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def pair(request, tmp_path: Path) -> tuple[object, Transformer]:
    _, factory, fmt = request.param
    torch.manual_seed(0)
    hf = factory().eval()
    save(hf, tmp_path, fmt)
    return hf, from_pretrained(tmp_path)


def test_logits_match(pair) -> None:
    hf, ours = pair
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (expected.std() > 0.1).item()  # random init is large enough for the comparison to mean something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match(pair) -> None:
    hf, ours = pair
    hf.generation_config.eos_token_id = None  # random weights may emit EOS; compare all 32 steps
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)[:, 12:]
    got = generate(ours, ids, max_new_tokens=32)
    assert expected.shape == (1, 32)
    assert got.tolist() == expected.tolist()


def test_config_mapping(tmp_path: Path) -> None:
    """The knobs that change the computation land in ModelConfig."""
    save(qwen2(use_sliding_window=True, sliding_window=6, max_window_layers=0), tmp_path / "q", "safetensors")
    save(llama(rope_parameters=LLAMA3_ROPE, attention_bias=True, head_dim=24), tmp_path / "l", "safetensors")
    save(gpt2(), tmp_path / "g", "safetensors")
    q, lm, g = (from_pretrained(tmp_path / n).config for n in "qlg")
    assert (q.family, q.n_kv_head, q.qkv_bias, q.out_bias, q.sliding_window) == ("llama", 1, True, False, 6)
    assert (lm.head_dim, lm.qkv_bias, lm.out_bias, lm.rope_theta) == (24, True, True, 500000.0)
    assert lm.rope_scaling is not None and lm.rope_scaling["rope_type"] == "llama3"
    assert (g.family, g.tie_embeddings, g.activation, g.d_ff, g.max_position) == ("gpt2", True, "gelu_new", 256, 128)


def test_rope_scaling_changes_logits(tmp_path: Path) -> None:
    """Guards the llama3 case above: with short positions the scaling must still matter."""
    torch.manual_seed(0)
    hf = llama(rope_parameters=LLAMA3_ROPE)
    save(hf, tmp_path, "safetensors")
    ours = from_pretrained(tmp_path)
    plain = Transformer(ModelConfig(**{**ours.config.to_dict(), "rope_scaling": None}))
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(3, VOCAB, (1, 40))
    with torch.no_grad():
        assert (ours(ids) - plain(ids)).abs().max() > 1e-3


def test_v4_style_rope_config(tmp_path: Path) -> None:
    """Checkpoints written by transformers 4 keep `rope_theta` and `rope_scaling` at top level."""
    torch.manual_seed(0)
    hf = llama(rope_parameters=LLAMA3_ROPE).eval()
    save(hf, tmp_path, "safetensors")
    raw = json.loads((tmp_path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = {**params, "type": params.pop("rope_type")}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ids = torch.randint(3, VOCAB, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path)(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_legacy_tensor_layouts(tmp_path: Path) -> None:
    """The original GPT-2 files have no `transformer.` prefix and store the causal-mask buffers;
    older Llama files store rotary inv_freq buffers. Both load, and the extras are ignored."""
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 16))
    for name, hf in (("g", gpt2()), ("l", llama())):
        hf.eval()
        hf.config.architectures = [type(hf).__name__]
        hf.config.save_pretrained(tmp_path / name)
        state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
        if name == "g":
            del state["lm_head.weight"]  # tied: GPT-2's files hold only wte
        for layer in range(2):
            if name == "g":
                state[f"h.{layer}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
                state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
            else:
                state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        save_file(state, str(tmp_path / name / "model.safetensors"))
        with torch.no_grad():
            torch.testing.assert_close(from_pretrained(tmp_path / name)(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_dtype_and_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save(llama(), tmp_path, "safetensors")
    model = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.blocks[0].attn.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32, as in HF
    assert not model.training
    with pytest.raises(TypeError, match="dtype"):
        from_pretrained(tmp_path, dtype=torch.int64)


# ------------------------------------------------------------------ tokenizer
def test_tokenizer_json_round_trip(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        ["the passkey is 12345. remember it.", "the grass is green; the sky is blue."] * 20, trainer
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))

    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.bos_id, loaded.eos_id) == (1, 2)
    text = "The passkey is 98765, naïve café — remember it!"
    ids = loaded.encode(text)
    assert ids[0] == 1 and 1 not in ids[1:]
    assert len(ids) < len(text.encode()) + 1  # merges were applied
    assert loaded.decode(ids) == text
    assert loaded.encode(text, add_bos=False) == ids[1:]
    assert loaded.decode([*ids, 2]) == text  # special tokens dropped


def test_tokenizer_missing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- mpcache format
def tiny_mpcache(path: Path) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=264, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48)
    model = Transformer(config)
    path.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    config.save(path / "config.json")
    return model


def test_mpcache_format(tmp_path: Path) -> None:
    model = tiny_mpcache(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = torch.randint(0, 264, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    bundled, tok = load_bundled(tmp_path)
    assert isinstance(tok, ByteTokenizer) and isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with torch.no_grad():
        assert torch.equal(bundled(ids), model(ids))


@pytest.mark.skipif(not (BUNDLED_DIR / "model.safetensors").exists(), reason="bundled model not trained yet")
def test_real_bundled_model() -> None:
    model, tok = load_bundled()
    assert model.config.family == "llama" and model.config.vocab_size >= tok.vocab_size
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    ids = torch.tensor([tok.encode("The grass is green.")])
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and bool(logits.isfinite().all())


def test_load_bundled_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mpcache.train"):
        load_bundled(tmp_path)


# --------------------------------------------------------------------- errors
def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "vocab_size": 10}))
    with pytest.raises(ValueError, match=r"architecture 'FalconForCausalLM' is not supported; supported: GPT2"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "vocab_size": 10}))
    with pytest.raises(ValueError, match=r"names no architecture \(model_type='falcon'\)"):
        from_pretrained(tmp_path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    torch.manual_seed(0)
    llama().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        from_pretrained(tmp_path)


def test_missing_shard(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save(llama(), tmp_path, "sharded")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00001"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "factory, edit, message",
    [
        (gpt2, {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        (gpt2, {"activation_function": "swish_beta"}, "activation 'swish_beta'"),
        (llama, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope type 'yarn'"),
        (llama, {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"needs \['factor'\]"),
        (qwen2, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, "mix of full and sliding"),
        (llama, {"hidden_size": 128}, "checkpoint shape"),
        (llama, {"num_hidden_layers": 3}, r"missing \['blocks.2"),
        (llama, {"num_hidden_layers": 1}, r"unexpected \['blocks.1"),
    ],
)
def test_unsupported_config(tmp_path: Path, factory, edit: dict, message: str) -> None:
    torch.manual_seed(0)
    save(factory(), tmp_path, "safetensors")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("layer_types", None)
    raw.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path)
