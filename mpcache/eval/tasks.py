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

The prompt always ends with the beginning of the answer sentence, so a greedy
continuation is scored by exact match against `answer`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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

TASKS = ("passkey", "niah", "niah_multikey", "niah_multivalue", "mqar", "vt", "episodic")


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
) -> str:
    """Fill with `filler` sentences so the prompt is about `context_len` tokens and put
    each item at its relative depth (0 = start of the haystack, 1 = end)."""
    fixed = count(header) + count(question) + sum(count(text) + 1 for _, text in items)
    budget = context_len - fixed
    if budget < 0:
        raise ValueError(f"context_len={context_len} is too short for this task (needs > {fixed} tokens)")
    sentences: list[str] = []
    used = 0
    while True:
        sentence = filler(rng)
        cost = count(sentence + separator)
        if used + cost > budget:
            break
        sentences.append(sentence)
        used += cost
    # Insert from the deepest item so earlier insertions do not shift later indices.
    for depth, text in sorted(items, key=lambda item: -item[0]):
        sentences.insert(round(min(max(depth, 0.0), 1.0) * len(sentences)), text)
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


def passkey(rng: random.Random, count: TokenCounter, context_len: int, depth: float) -> tuple[str, str, dict]:
    key = _number(rng, 5)
    header = "There is a pass key hidden in the text below. Find it and remember it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "\nWhat is the pass key? The pass key is "
    return build_prompt(rng, count, context_len, header, [(depth, needle)], question), key, {}


def _magic_key(rng: random.Random) -> str:
    return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"


def niah(
    rng: random.Random, count: TokenCounter, context_len: int, depth: float, keys: int = 1, values: int = 1
) -> tuple[str, str, dict]:
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
        question = f"\nWhat is the special magic number for {asked}? The special magic number for {asked} is: "
    else:
        question = f"\nWhat are all the special magic numbers for {asked}? The special magic numbers for {asked} are: "
    prompt = build_prompt(rng, count, context_len, header, items, question)
    # Answers are listed in the order they appear in the text; read it off the prompt, since
    # build_prompt may swap needles whose depths round to nearby slots of a short haystack.
    needles = sorted((text for _, text in items[:values]), key=prompt.index)
    answer = ", ".join(text.rsplit(" ", 1)[1].rstrip(".") for text in needles)
    return prompt, answer, {"key": asked, "keys": names}


def mqar(
    rng: random.Random, count: TokenCounter, context_len: int, depth: float, pairs: int = 8, queries: int = 3
) -> tuple[str, str, dict]:
    keys = _distinct(rng, lambda: rng.choice(KEY_NOUNS), pairs)
    values = [_number(rng, 3) for _ in keys]
    depths = [depth] + _other_depths(rng, pairs - 1)
    items = [(d, f"Pair: {k}={v}.") for k, v, d in zip(keys, values, depths)]
    asked = [0] + rng.sample(range(1, pairs), queries - 1)
    header = "Remember every pair in the text below.\n"
    question = "\nQuery: " + " ".join(keys[i] for i in asked) + "\nAnswer: " + keys[asked[0]] + "="
    answer = " ".join(f"{keys[i]}={values[i]}" for i in asked)[len(keys[asked[0]]) + 1 :]
    prompt = build_prompt(rng, count, context_len, header, items, question)
    return prompt, answer, {"keys": [keys[i] for i in asked]}


def variable_tracking(
    rng: random.Random, count: TokenCounter, context_len: int, depth: float, hops: int = 4
) -> tuple[str, str, dict]:
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
    question = f"\nWhich variables are assigned the value {value}? Answer: the variables are "
    prompt = build_prompt(rng, count, context_len, header, items, question)
    return prompt, " ".join(chain), {"value": value}


def episodic(
    rng: random.Random, count: TokenCounter, context_len: int, depth: float, topics: int = 3
) -> tuple[str, str, dict]:
    chosen = rng.sample(TOPICS, topics)
    numbers = _distinct(rng, lambda: _number(rng, 4), topics)
    depths = [depth] + _other_depths(rng, topics - 1)
    items = [
        (d, f"User: About {t}: my lucky number is {n}.\nAssistant: Noted, {n} for {t}.\n")
        for t, n, d in zip(chosen, numbers, depths)
    ]
    header = "A long conversation between a user and an assistant.\n"
    question = f"User: What was my lucky number for {chosen[0]}?\nAssistant: Your lucky number for {chosen[0]} is "
    prompt = build_prompt(rng, count, context_len, header, items, question, filler=chit_chat_turn, separator="")
    return prompt, numbers[0], {"topic": chosen[0]}


GENERATORS: dict[str, Callable[..., tuple[str, str, dict]]] = {
    "passkey": passkey,
    "niah": niah,
    "niah_multikey": lambda rng, count, n, d: niah(rng, count, n, d, keys=4),
    "niah_multivalue": lambda rng, count, n, d: niah(rng, count, n, d, values=4),
    "mqar": mqar,
    "vt": variable_tracking,
    "episodic": episodic,
}


def make_sample(task: str, context_len: int, seed: int, count: TokenCounter, depth: float | None = None) -> Sample:
    """One sample of `task`; the needle depth is drawn from the seed unless given."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{context_len}:{seed}")
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    prompt, answer, meta = GENERATORS[task](rng, count, context_len, depth)
    return Sample(task, prompt, answer, context_len, depth, seed, meta)


def make_samples(task: str, context_len: int, n: int, count: TokenCounter, seed: int = 0) -> list[Sample]:
    """`n` samples with needle depths spread evenly over [0, 1] (so short runs cover all depths)."""
    return [
        make_sample(task, context_len, seed * 100_003 + i, count, depth=(i + 0.5) / n)
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
