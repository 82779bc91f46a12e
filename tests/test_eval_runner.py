"""Evaluation runner and accuracy CLI on tiny random models (no dependency on the trained checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from bench import accuracy
from mpcache.eval import runner
from mpcache.eval.oracle import oracle_answer
from mpcache.eval.runner import (
    budget_tokens,
    evaluate,
    evaluate_samples,
    load_model,
    pad_left,
    parse_budget,
    resolve_policy,
    row_cache_sizes,
)
from mpcache.eval.tasks import TASKS, make_samples
from mpcache.methods import METHODS
from mpcache.methods.base import check_budget
from mpcache.model import ByteTokenizer, KVCache, ModelConfig, Transformer

TOK = ByteTokenizer()
ROW_FIELDS = {
    "method",
    "task",
    "context_len",
    "budget",
    "accuracy",
    "samples",
    "seconds",
    "shared_prefill_seconds",
    "cache_tokens",
    "cache_bytes",
    "full_cache_bytes",
}


def count(text: str) -> int:
    return len(TOK.encode(text, add_bos=False))


def tiny_model(seed: int = 0, scale: float = 0.6) -> Transformer:
    """A random model whose greedy output depends on the prompt (large weights: no constant output)."""
    torch.manual_seed(seed)
    config = ModelConfig(
        family="llama", vocab_size=264, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_position=4096
    )
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, scale)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def oracle_generate(task: str, wrong: bool = False):
    """A stand-in for stream_generate that reads each row's prompt and answers like a perfect
    model (or a wrong one), checking the runner's left padding on the way."""

    def fake(
        model: Transformer, input_ids: Tensor, max_new_tokens: int, attention_mask: Tensor | None = None, **_: object
    ) -> Iterator[Tensor]:
        rows = []
        for b in range(input_ids.shape[0]):
            mask = torch.ones_like(input_ids[b]) if attention_mask is None else attention_mask[b]
            ids = input_ids[b][mask.bool()]
            assert (input_ids[b][~mask.bool()] == TOK.pad_id).all() and ids[0] == TOK.bos_id
            assert (ids[1:] < 256).all()  # no padding inside the prompt
            answer = oracle_answer(task, TOK.decode(ids.tolist()))
            out = TOK.encode(("9" if wrong else "") + answer + "\nThe quiet cat sees", add_bos=False)
            assert max_new_tokens >= count(answer), "the runner must leave room for the whole answer"
            rows.append(out[:max_new_tokens])
        for step in range(max_new_tokens):
            yield torch.tensor([row[step] for row in rows])

    return fake


# ------------------------------------------------------------------ scoring
@pytest.mark.parametrize("task", TASKS)
def test_oracle_model_scores_one_and_a_wrong_model_zero(model: Transformer, task: str) -> None:
    rows = evaluate(
        model, TOK, "full", tasks=[task], lengths=[512], samples=3, batch_size=2, generate_fn=oracle_generate(task),
        progress=False,
    )  # fmt: skip
    assert len(rows) == 1 and set(rows[0]) == ROW_FIELDS
    assert rows[0]["accuracy"] == 1.0 and rows[0]["samples"] == 3
    assert rows[0]["cache_bytes"] is None  # the fake built no cache, so there is nothing to measure
    wrong = evaluate(
        model, TOK, "full", tasks=[task], lengths=[512], samples=3, batch_size=2,
        generate_fn=oracle_generate(task, wrong=True), progress=False,
    )  # fmt: skip
    assert wrong[0]["accuracy"] == 0.0


def test_oracle_needs_no_margin(model: Transformer) -> None:
    samples = make_samples("mqar", 1024, 3, count)
    results = evaluate_samples(model, TOK, samples, margin=0, batch_size=3, generate_fn=oracle_generate("mqar"))
    assert all(r.correct for r in results)
    assert [r.sample for r in results] == samples


def test_rows_of_a_real_model(model: Transformer) -> None:
    rows = evaluate(model, TOK, "full", tasks=["passkey", "vt"], lengths=[512], samples=2, progress=False)
    assert [(r["task"], r["context_len"], r["budget"]) for r in rows] == [("passkey", 512, None), ("vt", 512, None)]
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert 0.0 <= row["accuracy"] <= 1.0 and row["seconds"] > 0
        # A full cache holds every prompt token and every fed-back generated token.
        assert row["cache_bytes"] == row["full_cache_bytes"] > 0
        assert 450 < row["cache_tokens"] < 530


def test_full_cache_accounting_per_sample(model: Transformer) -> None:
    samples = make_samples("niah", 512, 3, count)
    results = evaluate_samples(model, TOK, samples, batch_size=3)
    steps = len(results[0].generated)
    assert steps == count(samples[0].answer) + 3
    config = model.config
    for r in results:
        assert r.prompt_tokens == count(r.sample.prompt) + 1  # BOS
        assert r.cache_tokens == r.prompt_tokens + steps - 1
        assert r.cache_bytes == r.cache_tokens * config.n_layer * config.n_kv_head * 2 * config.head_dim * 4
        assert r.full_cache_bytes == r.cache_bytes


class CacheWithSideStore(KVCache):
    """Stands for a method that keeps 1000 bytes beside the cache (quantized copies, metadata)."""

    def memory_bytes(self) -> int:
        return super().memory_bytes() + 1000


@pytest.mark.parametrize(("cls", "extra"), [(KVCache, 0), (CacheWithSideStore, 1000)])
def test_cache_sizes_count_valid_slots_and_side_stores(cls: type[KVCache], extra: int) -> None:
    cache = cls(2)
    kv = torch.randn(2, 3, 5, 4)  # batch 2, 3 KV heads, 5 tokens, head_dim 4 (fp32)
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])  # row 0 is left-padded
    for layer in range(2):
        cache.update(layer, kv, kv, torch.arange(5).expand(2, 5), valid)
    cache.update(0, kv[:, :, :1], kv[:, :, :1], torch.full((2, 1), 5), torch.ones(2, 1, dtype=torch.bool))
    layer0 = cache.layers[0]
    assert layer0 is not None and layer0.capacity > 6  # spare capacity must not count
    tokens, nbytes = row_cache_sizes(cache)
    assert tokens.tolist() == [(4 + 3) / 2, (6 + 5) / 2]
    slot = 3 * (4 + 4) * 4  # heads x (key + value dims) x fp32
    assert nbytes.tolist() == [7 * slot + extra / 2, 11 * slot + extra / 2]


def test_batched_equals_one_at_a_time(model: Transformer) -> None:
    samples = make_samples("niah", 512, 4, count)
    single = evaluate_samples(model, TOK, samples, batch_size=1)
    batched = evaluate_samples(model, TOK, samples, batch_size=4)
    assert len({s.prompt_tokens for s in single}) > 1  # the batch really is padded
    assert len({tuple(s.generated) for s in single}) > 1  # the model's output depends on the prompt
    for a, b in zip(single, batched):
        assert a.generated == b.generated
        assert (a.cache_tokens, a.cache_bytes) == (b.cache_tokens, b.cache_bytes)
        assert a.full_cache_bytes == b.full_cache_bytes


def test_batches_fit_in_memory(model: Transformer, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    oracle = oracle_generate("passkey")

    def spy(model: Transformer, input_ids: Tensor, *args: object, **kwargs: object) -> Iterator[Tensor]:
        seen.append(input_ids.shape[0])
        return oracle(model, input_ids, *args, **kwargs)

    samples = make_samples("passkey", 512, 4, count)
    assert all(r.correct for r in evaluate_samples(model, TOK, samples, batch_size=4, generate_fn=spy))
    assert seen == [4]
    seen.clear()
    # Room for the attention scores of two 513-token prompts of this 4-head model.
    monkeypatch.setattr(runner, "SCORES_BYTES", 2 * 4 * 4 * 513 * 513)
    assert all(r.correct for r in evaluate_samples(model, TOK, samples, batch_size=4, generate_fn=spy))
    assert seen == [2, 2]


def test_pad_left() -> None:
    ids, mask = pad_left([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask is not None and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pad_left([[1], [2]], pad_id=9)[1] is None


# ------------------------------------------------------- a real BPE tokenizer + chat template
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from mpcache.model import checkpoint_folder, load_tokenizer

    return load_tokenizer(checkpoint_folder("smollm2"))


def chat_oracle_generate(task: str, tok, wrong: bool = False):
    """A perfect (or wrong) chat model: reads the detokenized prompt, answers, says <|im_end|> and
    then keeps "talking" (the runner must stop at EOS). Checks one BOS per prompt on the way."""

    def fake(model, input_ids: Tensor, max_new_tokens: int, attention_mask=None, eos_id=None, **_) -> Iterator[Tensor]:
        assert eos_id == tok.eos_id
        rows = []
        for b in range(input_ids.shape[0]):
            mask = torch.ones_like(input_ids[b]) if attention_mask is None else attention_mask[b]
            ids = input_ids[b][mask.bool()].tolist()
            assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # the template's <|im_start|>, once
            text = tok.decode(ids)
            assert text.startswith("system\n") and "user\n" in text  # chat-formatted
            answer = oracle_answer(task, text)
            out = tok.encode(("9" if wrong else "") + answer + ".", add_bos=False) + [tok.eos_id]
            rows.append(out + tok.encode(" 4 2 and more", add_bos=False))
        for step in range(max_new_tokens):
            yield torch.tensor([row[min(step, len(row) - 1)] for row in rows])

    return fake


@pytest.mark.parametrize("task", TASKS)
def test_chat_model_with_bpe_tokenizer(model: Transformer, smollm2_tokenizer, task: str) -> None:
    tok = smollm2_tokenizer
    samples = runner.task_samples(tok, task, 1024, 2, seed=1)
    results = evaluate_samples(model, tok, samples, batch_size=2, generate_fn=chat_oracle_generate(task, tok))
    for r in results:
        assert r.correct, (r.prediction, r.sample.answer)
        assert r.prediction.endswith(".") and "4 2" not in r.prediction  # decoding stops reading at EOS
        assert 0.95 * 1024 <= r.prompt_tokens <= 1024  # the prompt as the model reads it, in its tokens
    wrong = evaluate_samples(model, tok, samples, batch_size=2, generate_fn=chat_oracle_generate(task, tok, True))
    assert not any(r.correct for r in wrong)


def test_digits_are_separate_tokens_and_answers_compare_as_text(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    sample = runner.task_samples(tok, "niah", 512, 1)[0]
    text = runner.prompt_text(tok, sample)
    assert text.endswith("<|im_start|>assistant\n" + sample.answer_prefix)
    assert len(tok.encode(sample.answer, add_bos=False)) == len(sample.answer) == 7  # 7 digits, 7 tokens
    wrapping = tok.apply_chat_template([{"role": "user", "content": ""}])
    assert runner.prompt_overhead(tok) == len(tok.encode(wrapping)) > 20  # system turn + user/assistant tags
    assert runner.prompt_overhead(TOK) == 0  # the bundled model's prompts are unchanged
    assert runner.prompt_text(TOK, sample) == sample.prompt  # no chat template: the prompt as generated


# ------------------------------------------------------------------ budgets
@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        (0, ValueError, "at least 1"),
        (-5, ValueError, "at least 1"),
        (0.0, ValueError, r"\(0, 1\)"),
        (-0.5, ValueError, r"\(0, 1\)"),
        (1.0, ValueError, r"\(0, 1\)"),
        (1.5, ValueError, r"\(0, 1\)"),
        (64.0, ValueError, "use an int"),
        (True, TypeError, "budget must be"),
        ("64", TypeError, "budget must be"),
    ],
)
def test_bad_budgets(budget: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        check_budget(budget)  # type: ignore[arg-type]


def test_budget_parsing_and_resolution() -> None:
    assert parse_budget("64") == 64 and isinstance(parse_budget("64"), int)
    assert parse_budget(" 0.25 ") == 0.25
    for text in ("abc", "0", "2.5", "-1", ""):
        with pytest.raises(ValueError):
            parse_budget(text)
    assert budget_tokens(0.25, 1000) == 250
    assert budget_tokens(0.001, 100) == 1  # never zero tokens
    assert budget_tokens(64, 1000) == 64
    with pytest.raises(ValueError):
        budget_tokens(0, 100)


def test_methods_are_checked(model: Transformer) -> None:
    with pytest.raises(ValueError, match="budget is required"):
        evaluate(model, TOK, "snapkv", None, tasks=["passkey"], lengths=[512], samples=1, progress=False)
    with pytest.raises(ValueError, match="no_such_method"):
        evaluate(model, TOK, "no_such_method", 64, tasks=["passkey"], lengths=[512], samples=1, progress=False)
    with pytest.raises(ValueError, match="takes no options"):
        resolve_policy("full", None, window=4)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, TOK, "full", tasks=["nope"], lengths=[512], samples=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_samples(model, TOK, make_samples("passkey", 512, 1, count), batch_size=0)
    assert (
        evaluate(model, TOK, "full", 0.5, tasks=["passkey"], lengths=[512], samples=1, progress=False)[0]["budget"]
        is None
    )  # full ignores budgets


def test_an_eviction_method_shrinks_the_cache(model: Transformer) -> None:
    samples = make_samples("passkey", 512, 2, count)
    full = evaluate_samples(model, TOK, samples, batch_size=2)
    for budget in (64, 0.125):
        kept = evaluate_samples(model, TOK, samples, "streamingllm", budget, batch_size=2)
        for a, b in zip(full, kept):
            assert b.budget_tokens == (64 if budget == 64 else int(0.125 * b.prompt_tokens))
            assert b.cache_bytes is not None and a.cache_bytes is not None
            assert b.cache_bytes < 0.3 * a.cache_bytes and b.full_cache_bytes == a.full_cache_bytes
            assert b.cache_tokens is not None and b.cache_tokens <= b.budget_tokens + len(b.generated)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_batching_is_invisible_to_every_method(model: Transformer, method: str) -> None:
    """Batched evaluation (left padding) must decode what one-at-a-time evaluation decodes;
    a ratio budget resolves to a different token count per row."""
    samples = make_samples("niah", 512, 3, count)
    assert len({count(s.prompt) for s in samples}) == 3  # different lengths: the batch is padded
    single = evaluate_samples(model, TOK, samples, method, 0.2, batch_size=1)
    batched = evaluate_samples(model, TOK, samples, method, 0.2, batch_size=3)
    assert len({r.budget_tokens for r in single}) > 1
    assert [r.generated for r in single] == [r.generated for r in batched]
    assert [r.cache_tokens for r in single] == [r.cache_tokens for r in batched]


# ---------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model saved in mpcache's own checkpoint format."""
    path = tmp_path_factory.mktemp("tiny")
    model = tiny_model(seed=1)
    model.config.save(path / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


def test_load_model_from_a_folder(checkpoint: Path) -> None:
    model, tokenizer = load_model(checkpoint)
    assert isinstance(tokenizer, ByteTokenizer)
    assert torch.equal(model.lm_head.weight, tiny_model(seed=1).lm_head.weight)


def test_cli_writes_json_and_markdown(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json, out_md = tmp_path / "rows.json", tmp_path / "rows.md"
    accuracy.main(
        f"--model {checkpoint} --methods full --tasks passkey,niah --lengths 512 --samples 2 --budgets 64,0.25 "
        f"--json {out_json} --markdown {out_md} --quiet".split()
    )
    rows = json.loads(out_json.read_text())
    assert [(r["method"], r["task"], r["budget"]) for r in rows] == [("full", "passkey", None), ("full", "niah", None)]
    assert all(ROW_FIELDS <= set(r) and r["samples"] == 2 for r in rows)
    text = out_md.read_text()
    summary, detail = text.split("Per length:")
    assert "| method | budget | passkey | niah | mean | KV vs full |" in summary
    assert f"| full | - | {rows[0]['accuracy']:.2f} | {rows[1]['accuracy']:.2f} |" in summary
    assert summary.rstrip().endswith("| 1.00 |")  # a full cache holds all of a full cache
    table = detail.strip().splitlines()
    assert table[0].startswith("| method | task | context | budget | accuracy")
    assert len(table) == 2 + len(rows) and table[2].startswith("| full | passkey | 512 | - |")
    printed = capsys.readouterr().out
    assert "passkey" in printed and "niah" in printed


def test_cli_plot_with_several_budgets(checkpoint: Path, tmp_path: Path) -> None:
    out_png, out_json = tmp_path / "plot.png", tmp_path / "rows.json"
    accuracy.main(
        f"--model {checkpoint} --methods full,streamingllm --tasks passkey --lengths 512 --samples 1 --budgets 32,64 "
        f"--plot {out_png} --json {out_json} --quiet".split()
    )
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out_json.read_text())
    assert [(r["method"], r["budget"]) for r in rows] == [("full", None), ("streamingllm", 32), ("streamingllm", 64)]


def test_plot_draws_every_budget(tmp_path: Path) -> None:
    """The plot itself, from hand-written rows (independent of which methods exist)."""
    rows = [
        {"method": "full", "task": "passkey", "context_len": 512, "budget": None, "accuracy": 1.0},
        {"method": "m", "task": "passkey", "context_len": 512, "budget": 64, "accuracy": 0.5},
        {"method": "m", "task": "passkey", "context_len": 512, "budget": 0.5, "accuracy": 0.75},
        {"method": "m", "task": "niah", "context_len": 512, "budget": 64, "accuracy": 0.0},
    ]
    accuracy.plot(rows, [64, 0.5], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--budgets", "0", "at least 1"), ("--budgets", "1.5", "(0, 1)"), ("--tasks", "nope", "unknown task"),
     ("--lengths", "x", "integers")],
)  # fmt: skip
def test_cli_rejects_bad_arguments(flag: str, value: str, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main([flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no config.json|does not exist"):
        accuracy.main(["--model", str(tmp_path / "missing"), "--quiet"])


@pytest.mark.timeout(120)
def test_cli_runs_as_a_module(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    argv = ["--model", str(checkpoint), "--tasks", "passkey", "--lengths", "512", "--samples", "1", "--json", str(out)]
    done = subprocess.run([sys.executable, "-m", "bench.accuracy", *argv], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())[0]["task"] == "passkey"
