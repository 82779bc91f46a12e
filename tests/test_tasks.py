"""Task generators: deterministic, the right length, needles where asked, answers recoverable."""

from __future__ import annotations

import random
import re

import pytest

from mpcache.eval.oracle import oracle_answer
from mpcache.eval.tasks import (
    ADJECTIVES,
    MAX_DOC_SENTENCE,
    NOUNS,
    PLACES,
    TASKS,
    VERBS,
    docstring_sentences,
    exact_match,
    filler_sentence,
    make_sample,
    make_samples,
    stdlib_modules,
)
from mpcache.model import ByteTokenizer

TOK = ByteTokenizer()


def count(text: str) -> int:
    return len(TOK.encode(text, add_bos=False))


def longest(words: list[str]) -> int:
    return max(map(len, words))


# Upper bound on one filler unit in bytes: build_prompt stops when the next unit does not fit,
# so a prompt can fall short of context_len by at most one unit (+1 per item for "" separators).
A, N = longest(ADJECTIVES), longest(NOUNS)
MAX_SENTENCE = len("The  the  the .") + 2 * A + 3 * N + longest(VERBS) + longest(PLACES) + 3
MAX_TURN = len("User: \nAssistant: I see. \n") + 2 * MAX_SENTENCE
ITEMS = {"passkey": 1, "niah": 1, "niah_multikey": 4, "niah_multivalue": 4, "mqar": 8, "vt": 10, "episodic": 3,
         "stdlib_docs": 1}  # fmt: skip
UNITS = {"episodic": MAX_TURN, "stdlib_docs": MAX_DOC_SENTENCE + 1}


def test_filler_bound_is_an_upper_bound() -> None:
    rng = random.Random(0)
    assert max(len(filler_sentence(rng)) for _ in range(5000)) <= MAX_SENTENCE


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_by_seed(task: str) -> None:
    a, b = make_sample(task, 1024, 7, count), make_sample(task, 1024, 7, count)
    assert a == b
    c = make_sample(task, 1024, 8, count)
    assert c.prompt != a.prompt and c.answer != a.answer
    first, second = make_samples(task, 1024, 4, count, seed=3), make_samples(task, 1024, 4, count, seed=3)
    assert first == second
    assert [s.depth for s in first] == [0.125, 0.375, 0.625, 0.875]
    assert len({s.prompt for s in first}) == 4
    assert make_samples(task, 1024, 4, count, seed=4)[0].prompt != first[0].prompt


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [512, 1024, 2048, 4096])
def test_prompt_length_just_below_context_len(task: str, length: int) -> None:
    unit = UNITS.get(task, MAX_SENTENCE)
    for seed in range(5):
        n = count(make_sample(task, length, seed, count).prompt)
        assert n <= length
        assert length - n <= max(unit + ITEMS[task], 0.03 * length), (task, length, seed, n)


def test_prompt_length_with_a_subword_tokenizer() -> None:
    """Counting with a BPE tokenizer (merges across sentence boundaries) never overshoots."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(0)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([filler_sentence(rng) for _ in range(2000)], trainer)
    bpe_count = lambda text: len(bpe.encode(text).ids)
    for task in TASKS:
        sample = make_sample(task, 1024, 0, bpe_count)
        assert 0.85 * 1024 <= bpe_count(sample.prompt) <= 1024, task
        assert count(sample.prompt) > 1024  # a BPE token is longer than a byte, so the text is longer


# Text that must land at the requested depth (one match of it must be close to `depth`).
NEEDLES = {
    "passkey": lambda s: r"The pass key is",
    "niah": lambda s: rf"magic numbers for {s.meta['key']} is",
    "niah_multikey": lambda s: rf"magic numbers for {s.meta['key']} is",
    "niah_multivalue": lambda s: rf"magic numbers for {s.meta['key']} is",
    "mqar": lambda s: rf"Pair: {s.meta['keys'][0]}=",
    "vt": lambda s: r"VAR \w+ = ",
    "episodic": lambda s: rf"User: About {s.meta['topic']}:",
    "stdlib_docs": lambda s: rf"The secret build tag of the {s.meta['module']} module is \d",
}


@pytest.mark.parametrize("task", TASKS)
def test_depth_controls_where_the_needle_lands(task: str) -> None:
    for depth in (0.0, 0.3, 0.5, 0.8, 1.0):
        for seed in range(3):
            sample = make_sample(task, 4096, seed, count, depth=depth)
            prompt = sample.prompt
            start = prompt.index("\n") + 1  # after the header line
            end = prompt.rindex("User:") if task == "episodic" else prompt.rindex("\n", 0, len(prompt) - 2)
            if task == "mqar":
                end = prompt.rindex("\nQuery")
            found = [(m.start() - start) / (end - start) for m in re.finditer(NEEDLES[task](sample), prompt[:end])]
            assert found, (task, depth)
            assert min(abs(f - depth) for f in found) < 0.06, (task, depth, seed, found)


@pytest.mark.parametrize("task", TASKS)
def test_answer_occurs_in_prompt(task: str) -> None:
    for seed in range(5):
        sample = make_sample(task, 1024, seed, count)
        prompt, answer = sample.prompt, sample.answer
        if task == "niah_multivalue":
            values = answer.split(", ")
            assert len(values) == 4 and all(f"{sample.meta['key']} is: {v}." in prompt for v in values)
            positions = [prompt.index(f"is: {v}.") for v in values]
            assert positions == sorted(positions), "values must be listed in text order"
        elif task == "mqar":
            full = f"{sample.meta['keys'][0]}={answer}"
            pairs = full.split()
            assert [p.split("=")[0] for p in pairs] == sample.meta["keys"]
            assert all(f"Pair: {p}." in prompt for p in pairs)
        elif task == "vt":
            names = answer.split()
            assert len(names) == 5
            assert f"VAR {names[0]} = {sample.meta['value']}." in prompt
            assert all(f"VAR {b} = VAR {a}." in prompt for a, b in zip(names, names[1:]))
        else:
            assert answer in prompt and re.fullmatch(r"\d+", answer)
        assert not prompt.rstrip().endswith(answer)  # the prompt asks; it does not answer


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [512, 2048])
def test_oracle_parser_recovers_every_answer(task: str, length: int) -> None:
    for seed in range(8):
        sample = make_sample(task, length, seed, count)
        assert oracle_answer(task, sample.prompt) == sample.answer
        assert exact_match(sample.answer + "\nThe", sample.answer)


def test_stdlib_docs_haystack_is_real_docstring_text() -> None:
    """Between the header and the question, everything but the needle is consecutive sentences
    of the standard library's docstrings."""
    sample = make_sample("stdlib_docs", 4096, 5, count)
    header, rest = sample.prompt.split("\n", 1)
    body = rest.rsplit("\nWhat is the secret build tag", 1)[0]
    needle = f"The secret build tag of the {sample.meta['module']} module is {sample.answer}."
    assert body.count(needle) == 1 and sample.prompt.endswith(sample.answer_prefix)
    haystack = body.replace(needle, "").split(" ")
    corpus = " ".join(s for path in stdlib_modules() for s in docstring_sentences(path))
    window = " ".join(w for w in haystack if w)
    assert len(window) > 2000 and window[:300] in corpus and window[-300:] in corpus
    assert sample.meta["module"] in {p.stem for p in stdlib_modules()}


@pytest.mark.parametrize("task", TASKS)
def test_answer_prefix_ends_the_prompt(task: str) -> None:
    sample = make_sample(task, 512, 0, count)
    assert sample.answer_prefix.strip() and sample.prompt.endswith(sample.answer_prefix)
    assert sample.answer_prefix not in sample.prompt[: -len(sample.answer_prefix)].split("\n")[0]


def test_reserve_leaves_room() -> None:
    full, reserved = make_sample("passkey", 1024, 0, count), make_sample("passkey", 1024, 0, count, reserve=100)
    assert count(full.prompt) - 110 <= count(reserved.prompt) <= 1024 - 100
    assert reserved.context_len == 1024


def test_oracle_is_not_fooled_by_a_changed_prompt() -> None:
    sample = make_sample("passkey", 512, 0, count)
    with pytest.raises(ValueError, match="pass key"):
        oracle_answer("passkey", sample.prompt.replace(sample.answer, "11111", 1))
    with pytest.raises(ValueError, match="no oracle"):
        oracle_answer("nope", sample.prompt)


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("12345", "12345", True),
        ("  12345", "12345", True),  # leading spaces are ignored
        ("12345.\nThe quiet", "12345", True),  # the model may keep talking after the answer
        ("12345 and more", " 12345 ", True),
        ("123456", "12345", False),  # a longer number is wrong
        ("12345abc", "12345", False),
        ("1234", "12345", False),
        ("", "12345", False),
        ("x12345", "12345", False),
        ("ABCDE FGHIJ", "ABCDE FGHIJ KLMNO", False),  # a partial list is wrong
        ("ABCDE FGHIJ KLMNO, done", "ABCDE FGHIJ KLMNO", True),
    ],
)
def test_exact_match(prediction: str, answer: str, expected: bool) -> None:
    assert exact_match(prediction, answer) is expected


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'.*passkey"):
        make_sample("nope", 512, 0, count)
    for depth in (-0.1, 1.5):
        with pytest.raises(ValueError, match="depth must be in"):
            make_sample("passkey", 512, 0, count, depth=depth)
    for task in TASKS:
        with pytest.raises(ValueError, match="too short"):
            make_sample(task, 64, 0, count)
