"""Generated long-context tasks, deterministic by seed, at a chosen length and needle depth.

Every task builds a prompt of about `context_len` tokens (measured with the tokenizer that
will read it) whose answer can only be found by looking back at one or more facts
hidden in a haystack of filler sentences. Tasks:

- passkey: one 5-digit pass key in the haystack (landmark-attention style).
- niah: RULER-style needle-in-a-haystack; `niah` has one needle, `niah_multikey` four
  needles with different keys (three distractors), `niah_multivalue` four values for the
  asked key (all must be returned).
- mqar: multi-query associative recall; key=value pairs scattered, three keys asked.
- vt: variable tracking; a chain VAR A = 12345, VAR B = VAR A, ... with a distractor
  chain; name every variable that holds the value.
- episodic: a multi-topic conversation; asks for a number given in an earlier turn.
- stdlib_docs: one needle (a module's "secret build tag") in real English text: consecutive
  sentences of the docstrings of the Python standard library installed on this machine
  (found with `sysconfig`; the text depends on the Python version, the choice on the seed).

The prompt always ends with the beginning of the answer sentence (`Sample.answer_prefix`),
so a greedy continuation is scored by exact match against `answer`; a chat model reads the
rest of the prompt as a user turn and the prefix as the start of its own
(`mpcache.eval.runner.prompt_text`).
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TokenCounter = Callable[[str], int]

ADJECTIVES = (
    "quiet green small brave old young bright dark warm cold happy tired swift slow tall short "
    "proud calm wild gentle loud clever lazy busy rich poor fresh sweet bitter kind"
).split()
NOUNS = (
    "river forest garden cat dog bird farmer teacher child window table road city village boat "
    "mountain lamp letter song story horse apple cloud stone bridge market house field tree"
).split()
VERBS = "sees follows finds paints builds watches carries visits opens crosses likes passes".split()
PLACES = "near over under beside behind across along around past toward".split()
KEY_ADJECTIVES = (
    "amber azure crimson golden ivory jade lilac maroon olive pearl ruby silver teal violet "
    "copper coral indigo scarlet"
).split()
KEY_NOUNS = (
    "falcon otter walrus lynx heron badger jackal marten ibis gecko puffin tapir beetle koala "
    "mantis raven bison camel"
).split()
TOPICS = (
    "gardening cooking astronomy sailing chess painting hiking music photography baking "
    "cycling fishing poetry pottery chemistry history"
).split()
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

TASKS = ("passkey", "niah", "niah_multikey", "niah_multivalue", "mqar", "vt", "episodic", "stdlib_docs")
Generated = tuple[str, str, str, dict]  # (prompt, answer, answer_prefix, meta): the prompt ends with the prefix


@dataclass
class Sample:
    """One generated prompt with its expected continuation."""

    task: str
    prompt: str
    answer: str
    context_len: int
    depth: float
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)
    answer_prefix: str = ""  # the end of `prompt` that starts the answer sentence

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filler_sentence(rng: random.Random) -> str:
    adj1, adj2 = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
    noun1, noun2 = rng.choice(NOUNS), rng.choice(NOUNS)
    return f"The {adj1} {noun1} {rng.choice(VERBS)} the {adj2} {noun2} {rng.choice(PLACES)} the {rng.choice(NOUNS)}."


def chit_chat_turn(rng: random.Random) -> str:
    return f"User: {filler_sentence(rng)}\nAssistant: I see. {filler_sentence(rng)}\n"


def build_prompt(
    rng: random.Random,
    count: TokenCounter,
    context_len: int,
    header: str,
    items: list[tuple[float, str]],
    question: str,
    filler: Callable[[random.Random], str] = filler_sentence,
    separator: str = " ",
    depth_in_tokens: bool = False,
) -> str:
    """Fill with `filler` sentences so the prompt is about `context_len` tokens and put
    each item at its relative depth (0 = start of the haystack, 1 = end), counted in
    sentences, or in tokens with `depth_in_tokens` (for fillers of uneven length, real text)."""
    fixed = count(header) + count(question) + sum(count(text) + 1 for _, text in items)
    budget = context_len - fixed
    if budget < 0:
        raise ValueError(f"context_len={context_len} is too short for this task (needs > {fixed} tokens)")
    sentences: list[str] = []
    ends = [0]  # tokens before each sentence boundary
    while True:
        sentence = filler(rng)
        # The separator leads, as in the joined text: a subword tokenizer merges " The" into one token.
        cost = count(separator + sentence)
        if ends[-1] + cost > budget:
            break
        sentences.append(sentence)
        ends.append(ends[-1] + cost)
    # Insert from the deepest item so earlier insertions do not shift later indices.
    for depth, text in sorted(items, key=lambda item: -item[0]):
        depth = min(max(depth, 0.0), 1.0)
        if depth_in_tokens:
            slot = min(range(len(ends)), key=lambda i: abs(ends[i] - depth * ends[-1]))
        else:
            slot = round(depth * len(sentences))
        sentences.insert(slot, text)
    return header + separator.join(sentences) + question


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _distinct(rng: random.Random, make: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        value = make()
        if value not in out:
            out.append(value)
    return out


def _other_depths(rng: random.Random, n: int) -> list[float]:
    return [rng.random() for _ in range(n)]


def passkey(rng: random.Random, count: TokenCounter, context_len: int, depth: float) -> Generated:
    key = _number(rng, 5)
    header = "There is a pass key hidden in the text below. Find it and remember it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prefix = "The pass key is "
    question = f"\nWhat is the pass key? {prefix}"
    return build_prompt(rng, count, context_len, header, [(depth, needle)], question), key, prefix, {}


def _magic_key(rng: random.Random) -> str:
    return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"


def niah(
    rng: random.Random, count: TokenCounter, context_len: int, depth: float, keys: int = 1, values: int = 1
) -> Generated:
    names = _distinct(rng, lambda: _magic_key(rng), keys)
    asked = names[0]
    answers = _distinct(rng, lambda: _number(rng, 7), values)
    items = [(depth, f"One of the special magic numbers for {asked} is: {v}.") for v in answers[:1]]
    items += [(d, f"One of the special magic numbers for {asked} is: {v}.") for v, d in
              zip(answers[1:], _other_depths(rng, values - 1))]
    for name, d in zip(names[1:], _other_depths(rng, keys - 1)):
        items.append((d, f"One of the special magic numbers for {name} is: {_number(rng, 7)}."))
    header = "Some special magic numbers are hidden in the text below. Memorize them.\n"
    if values == 1:
        prefix = f"The special magic number for {asked} is: "
        question = f"\nWhat is the special magic number for {asked}? {prefix}"
    else:
        prefix = f"The special magic numbers for {asked} are: "
        question = f"\nWhat are all the special magic numbers for {asked}? {prefix}"
    prompt = build_prompt(rng, count, context_len, header, items, question)
    # Answers are listed in the order they appear in the text; read it off the prompt, since
    # build_prompt may swap needles whose depths round to nearby slots of a short haystack.
    needles = sorted((text for _, text in items[:values]), key=prompt.index)
    answer = ", ".join(text.rsplit(" ", 1)[1].rstrip(".") for text in needles)
    return prompt, answer, prefix, {"key": asked, "keys": names}


def mqar(
    rng: random.Random, count: TokenCounter, context_len: int, depth: float, pairs: int = 8, queries: int = 3
) -> Generated:
    keys = _distinct(rng, lambda: rng.choice(KEY_NOUNS), pairs)
    values = [_number(rng, 3) for _ in keys]
    depths = [depth] + _other_depths(rng, pairs - 1)
    items = [(d, f"Pair: {k}={v}.") for k, v, d in zip(keys, values, depths)]
    asked = [0] + rng.sample(range(1, pairs), queries - 1)
    header = "Remember every pair in the text below.\n"
    prefix = "Answer: " + keys[asked[0]] + "="
    question = "\nQuery: " + " ".join(keys[i] for i in asked) + "\n" + prefix
    answer = " ".join(f"{keys[i]}={values[i]}" for i in asked)[len(keys[asked[0]]) + 1 :]
    prompt = build_prompt(rng, count, context_len, header, items, question)
    return prompt, answer, prefix, {"keys": [keys[i] for i in asked]}


def variable_tracking(
    rng: random.Random, count: TokenCounter, context_len: int, depth: float, hops: int = 4
) -> Generated:
    names = _distinct(rng, lambda: "".join(rng.choice(LETTERS) for _ in range(5)), 2 * (hops + 1))
    chain, decoy = names[: hops + 1], names[hops + 1 :]
    value, decoy_value = _distinct(rng, lambda: _number(rng, 5), 2)
    positions = sorted([depth] + _other_depths(rng, hops))
    decoy_positions = sorted(_other_depths(rng, hops + 1))
    items = [(positions[0], f"VAR {chain[0]} = {value}.")]
    items += [(positions[i], f"VAR {chain[i]} = VAR {chain[i - 1]}.") for i in range(1, hops + 1)]
    items += [(decoy_positions[0], f"VAR {decoy[0]} = {decoy_value}.")]
    items += [(decoy_positions[i], f"VAR {decoy[i]} = VAR {decoy[i - 1]}.") for i in range(1, hops + 1)]
    header = "Memorize and track the chain of variable assignments hidden in the text below.\n"
    prefix = "Answer: the variables are "
    question = f"\nWhich variables are assigned the value {value}? {prefix}"
    prompt = build_prompt(rng, count, context_len, header, items, question)
    return prompt, " ".join(chain), prefix, {"value": value}


def episodic(
    rng: random.Random, count: TokenCounter, context_len: int, depth: float, topics: int = 3
) -> Generated:
    chosen = rng.sample(TOPICS, topics)
    numbers = _distinct(rng, lambda: _number(rng, 4), topics)
    depths = [depth] + _other_depths(rng, topics - 1)
    items = [
        (d, f"User: About {t}: my lucky number is {n}.\nAssistant: Noted, {n} for {t}.\n")
        for t, n, d in zip(chosen, numbers, depths)
    ]
    header = "A long conversation between a user and an assistant.\n"
    prefix = f"Your lucky number for {chosen[0]} is "
    question = f"User: What was my lucky number for {chosen[0]}?\nAssistant: {prefix}"
    prompt = build_prompt(rng, count, context_len, header, items, question, filler=chit_chat_turn, separator="")
    return prompt, numbers[0], prefix, {"topic": chosen[0]}


# ------------------------------------------------------------- real text
STDLIB = Path(sysconfig.get_paths()["stdlib"])
MAX_DOC_SENTENCE = 240  # characters; longer sentences (tables, lists run together) are skipped


def stdlib_modules() -> list[Path]:
    """The standard library's top-level modules on this machine, sorted (private ones skipped)."""
    files = sorted(p for p in STDLIB.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise FileNotFoundError(f"no Python standard library sources in {STDLIB} (needed by the stdlib_docs task)")
    return files


@functools.cache
def docstring_sentences(path: Path) -> tuple[str, ...]:
    """Prose sentences of the module, class and function docstrings of one source file, in
    file order (whitespace collapsed; code examples, non-ASCII text and symbol-heavy lines skipped)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node) or ""
        for paragraph in doc.split("\n\n"):
            if ">>>" in paragraph or "::" in paragraph:
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
                letters = sum(c.isalpha() or c == " " for c in sentence)
                if 20 <= len(sentence) <= MAX_DOC_SENTENCE and sentence.isascii() and letters >= 0.8 * len(sentence):
                    out.append(sentence)
    return tuple(out)


def stdlib_filler(rng: random.Random) -> Callable[[random.Random], str]:
    """A filler that returns consecutive docstring sentences, from a random module onward."""
    files = stdlib_modules()
    first = rng.randrange(len(files))

    def sentences() -> Iterator[str]:
        for i in range(len(files) * 2):  # wraps around once; a prompt never needs that much text
            yield from docstring_sentences(files[(first + i) % len(files)])
        raise ValueError("the standard library's docstrings are too short for this context length")

    stream = sentences()
    return lambda _rng: next(stream)


def stdlib_docs(rng: random.Random, count: TokenCounter, context_len: int, depth: float) -> Generated:
    module = rng.choice(stdlib_modules()).stem
    tag = _number(rng, 6)
    header = (
        "Below are passages from the documentation of the Python standard library. One sentence "
        "gives a secret build tag; find it and remember it.\n"
    )
    needle = f"The secret build tag of the {module} module is {tag}."
    prefix = f"The secret build tag of the {module} module is "
    question = f"\nWhat is the secret build tag of the {module} module? {prefix}"
    filler = stdlib_filler(rng)
    prompt = build_prompt(
        rng, count, context_len, header, [(depth, needle)], question, filler=filler, depth_in_tokens=True
    )
    return prompt, tag, prefix, {"module": module}


GENERATORS: dict[str, Callable[..., Generated]] = {
    "passkey": passkey,
    "niah": niah,
    "niah_multikey": lambda rng, count, n, d: niah(rng, count, n, d, keys=4),
    "niah_multivalue": lambda rng, count, n, d: niah(rng, count, n, d, values=4),
    "mqar": mqar,
    "vt": variable_tracking,
    "episodic": episodic,
    "stdlib_docs": stdlib_docs,
}


def make_sample(
    task: str, context_len: int, seed: int, count: TokenCounter, depth: float | None = None, reserve: int = 0
) -> Sample:
    """One sample of `task`; the needle depth is drawn from the seed unless given. `reserve`
    tokens of the length are left for what the caller wraps around the prompt (a chat template)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{context_len}:{seed}")
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    prompt, answer, prefix, meta = GENERATORS[task](rng, count, context_len - reserve, depth)
    if not prompt.endswith(prefix):
        raise AssertionError(f"{task}: the prompt must end with its answer prefix {prefix!r}")
    return Sample(task, prompt, answer, context_len, depth, seed, meta, prefix)


def make_samples(
    task: str, context_len: int, n: int, count: TokenCounter, seed: int = 0, reserve: int = 0
) -> list[Sample]:
    """`n` samples with needle depths spread evenly over [0, 1] (so short runs cover all depths)."""
    return [
        make_sample(task, context_len, seed * 100_003 + i, count, depth=(i + 0.5) / n, reserve=reserve)
        for i in range(n)
    ]


def exact_match(prediction: str, answer: str) -> bool:
    """True when the continuation starts with the whole answer, not a longer word or number
    (the model may keep talking after it)."""
    prediction, answer = prediction.lstrip(), answer.strip()
    if not prediction.startswith(answer):
        return False
    rest = prediction[len(answer) :]
    return not rest or not rest[0].isalnum()
