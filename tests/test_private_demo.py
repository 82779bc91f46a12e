"""The private demo's client side without any MPC: what docker-compose's client container can do with a folder that
holds only config.json and the tokenizer (never the weights), and how it refuses bad KV-cache settings."""

from __future__ import annotations

import shutil

import pytest

from mpcache.eval.runner import prompt_overhead, prompt_text
from mpcache.eval.tasks import make_sample
from mpcache.model.loading import BUNDLED_DIR, checkpoint_folder, load_tokenizer
from mpcache.mpc.deploy import private_demo

CLIENT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def client_folder(source, tmp_path):
    """What the compose files mount into the client: config.json and the tokenizer files that exist."""
    for name in CLIENT_FILES:
        if (source / name).exists():
            shutil.copy(source / name, tmp_path / name)
    assert not (tmp_path / "model.safetensors").exists()
    return tmp_path


def test_bundled_prompt_from_a_folder_without_weights(tmp_path):
    prompt = private_demo.make_prompt(str(client_folder(BUNDLED_DIR, tmp_path)), "passkey", 170, 0)
    reference = private_demo.make_prompt("bundled", "passkey", 170, 0)
    assert prompt.ids == reference.ids and len(prompt.ids) == 169  # the shortest pass-key sample
    assert prompt.sample.answer == "20148" and prompt.sample.answer in prompt.tokenizer.decode(prompt.ids)
    assert prompt.config.vocab_size == reference.config.vocab_size


def test_smollm2_prompt_uses_the_chat_template_from_the_tokenizer_files(tmp_path):
    try:
        source = checkpoint_folder("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    prompt = private_demo.make_prompt(str(client_folder(source, tmp_path)), "passkey", 256, 0)
    tokenizer = load_tokenizer(source)  # the whole checkpoint folder, as the plaintext demo reads it
    count = lambda text: len(tokenizer.encode(text, add_bos=False))
    sample = make_sample("passkey", 256, 0, count, reserve=prompt_overhead(tokenizer))
    assert prompt.ids == tokenizer.encode(prompt_text(tokenizer, sample))
    assert prompt.config.vocab_size == 49152 and prompt.config.n_layer == 30
    text = prompt_text(prompt.tokenizer, prompt.sample)
    assert text.startswith("<|im_start|>") and "<|im_start|>assistant" in text  # the chat template
    assert prompt.ids.count(tokenizer.bos_id) == 3  # <|im_start|> opens the system, user and assistant turns
    assert prompt.sample.answer in prompt.tokenizer.decode(prompt.ids) and 200 <= len(prompt.ids) <= 256


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kv-cache", "mpcache"], "needs --budget"),
        (["--kv-cache", "full", "--budget", "64"], "takes no --budget"),
        (["--kv-cache", "mpcache", "--budget", "64", "--knobs", "[1]"], "must be a JSON object"),
        (["--kv-cache", "mpcache", "--budget", "64", "--knobs", "{"], "must be a JSON object"),
        (["--parties", "a:1"], "needs 2 addresses"),
        (["--max-new-tokens", "0"], "must be >= 1"),
        (["--prefill-block", "0"], "prefill_block must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused_before_any_connection(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("MPCACHE_BUDGET", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        private_demo.parse(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MPCACHE_KV_CACHE", "mpcache")
    monkeypatch.setenv("MPCACHE_BUDGET", "32")
    monkeypatch.setenv("MPCACHE_KNOBS", '{"cluster_size": 16}')
    args = private_demo.parse(["--parties", "party0:50702,party1:50712"])
    assert args.spec == {"method": "mpcache", "budget": 32, "knobs": {"cluster_size": 16}}
    assert args.parties == ["party0:50702", "party1:50712"]
    monkeypatch.setenv("MPCACHE_KV_CACHE", "full")
    monkeypatch.setenv("MPCACHE_BUDGET", "")  # compose's `MPCACHE_BUDGET= make compose-demo`
    monkeypatch.setenv("MPCACHE_KNOBS", "")
    assert private_demo.parse([]).spec is None


def test_prefill_block_reaches_the_generate_job(monkeypatch, capsys):
    """--prefill-block (demo and client CLI) becomes the job parameter "prefill_block"; given twice it is refused."""
    from parties import client

    monkeypatch.setenv("MPCACHE_PREFILL_BLOCK", "64")
    assert private_demo.parse([]).prefill_block == 64
    monkeypatch.setenv("MPCACHE_PREFILL_BLOCK", "")
    assert private_demo.parse([]).prefill_block is None
    monkeypatch.delenv("MPCACHE_PREFILL_BLOCK")
    job = ["--job", "generate", "--prompt", "hi"]
    args = client.parse([*job, "--params", '{"max_new_tokens": 2}', "--prefill-block", "16"])
    assert args.params == {"max_new_tokens": 2, "prefill_block": 16}
    for bad, message in (
        (["--params", '{"prefill_block": 8}', "--prefill-block", "8"], "give the prefill block once"),
        (["--prefill-block", "-1"], "prefill_block must be an integer >= 1"),
        (["--params", '{"prefill_block": "8"}'], "prefill_block must be an integer >= 1"),
    ):
        with pytest.raises(SystemExit):
            client.parse([*job, *bad])
        assert message in capsys.readouterr().err
