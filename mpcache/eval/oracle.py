"""Read a task's answer straight off its prompt text, the way a perfect reader would.

The parsers only look at the prompt (never at the generator's hidden state), so they
check that every task is solvable from what the model sees, and they give the runner
an "oracle model" whose score must be 1.0. They are independent re-implementations of
the task rules, written from the prompt format, not from `mpcache.eval.tasks`.
"""

from __future__ import annotations

import re


def _last(pattern: str, text: str) -> re.Match[str]:
    matches = list(re.finditer(pattern, text))
    if not matches:
        raise ValueError(f"prompt does not match {pattern!r}")
    return matches[-1]


def passkey_answer(prompt: str) -> str:
    keys = set(re.findall(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", prompt))
    if len(keys) != 1:
        raise ValueError(f"expected one pass key in the prompt, found {sorted(keys)}")
    return keys.pop()


def niah_answer(prompt: str) -> str:
    """Single- and multi-value NIAH: every number given for the asked key, in text order."""
    asked = _last(r"The special magic numbers? for (\S+) (?:is|are): $", prompt).group(1)
    values = re.findall(rf"One of the special magic numbers for {re.escape(asked)} is: (\d+)\.", prompt)
    if not values:
        raise ValueError(f"no magic number for {asked!r} in the prompt")
    return ", ".join(values)


def mqar_answer(prompt: str) -> str:
    # A chat-formatted prompt reads "...Query: a b c\nassistant\nAnswer: a=" once detokenized.
    queries = _last(r"\nQuery: ([^\n]+)\n(?:assistant\n)?Answer: (\S+)=$", prompt)
    pairs = dict(re.findall(r"Pair: (\w+)=(\d+)\.", prompt))
    asked = queries.group(1).split()
    if asked[0] != queries.group(2):
        raise ValueError("the answer must start with the first queried key")
    return " ".join(f"{key}={pairs[key]}" for key in asked)[len(asked[0]) + 1 :]


def vt_answer(prompt: str) -> str:
    """Follow the chain from the asked value: who is assigned the value, who is assigned that
    variable, and so on (chain order; statements may appear in any order in the text)."""
    value = _last(r"Which variables are assigned the value (\d+)\?", prompt).group(1)
    sources = {name: source for name, source in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", prompt)}
    holders: list[str] = []
    wanted = value
    while True:
        nxt = [name for name, source in sources.items() if source == wanted and name not in holders]
        if not nxt:
            return " ".join(holders)
        if len(nxt) > 1:
            raise ValueError(f"the chain branches at {wanted!r}: {nxt}")
        holders.append(nxt[0])
        wanted = f"VAR {nxt[0]}"


def episodic_answer(prompt: str) -> str:
    topic = _last(r"Your lucky number for (\w+) is $", prompt).group(1)
    numbers = re.findall(rf"User: About {re.escape(topic)}: my lucky number is (\d+)\.", prompt)
    if len(numbers) != 1:
        raise ValueError(f"expected one lucky number for {topic!r}, found {numbers}")
    return numbers[0]


def stdlib_docs_answer(prompt: str) -> str:
    module = _last(r"The secret build tag of the (\S+) module is $", prompt).group(1)
    tags = set(re.findall(rf"The secret build tag of the {re.escape(module)} module is (\d+)\.", prompt))
    if len(tags) != 1:
        raise ValueError(f"expected one build tag for {module!r}, found {sorted(tags)}")
    return tags.pop()


ORACLES = {
    "passkey": passkey_answer,
    "niah": niah_answer,
    "niah_multikey": niah_answer,
    "niah_multivalue": niah_answer,
    "mqar": mqar_answer,
    "vt": vt_answer,
    "episodic": episodic_answer,
    "stdlib_docs": stdlib_docs_answer,
}


def oracle_answer(task: str, prompt: str) -> str:
    """The answer a perfect reader of `prompt` gives for `task`."""
    if task not in ORACLES:
        raise ValueError(f"no oracle for task {task!r}; known: {', '.join(ORACLES)}")
    return ORACLES[task](prompt)
