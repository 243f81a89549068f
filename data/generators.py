"""Deterministic generators of chat datasets whose answers code can check.

Every record is `{"id": <content hash>, "messages": [user, assistant], "answer": str}`; the assistant turn is
always `"Answer: <answer>"` so a grader only has to parse one format (`extract_answer`, `score`).

Train and eval are disjoint by content: whether a problem belongs to eval is a pure function of its
prompt text (`split_of`, a salted hash), independent of seeds and sizes, so no seed or size choice can
leak an eval problem into a training set.

Learnability, measured with LoRA SFT on the random-init `tiny` preset (r=16, alpha=32, lr 2e-3, batch 32,
train_unembed, ~3 CPU-minutes): `reverse` (4 digits) and `sort_letters` (6 letters) reach 95-100 %
held-out exact match from 0 %; `addition` (2 digits) only ~10 % (it needs a pretrained model such as
the `smollm2-135m` preset, which goes from 0 % to ~65 % in ~50 LoRA steps).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, TypedDict

Split = Literal["train", "eval"]
EVAL_PERCENT = 10  # share of each task's problem space reserved for eval
ANSWER_PREFIX = "Answer: "


class Record(TypedDict):
    id: str
    messages: list[dict[str, str]]
    answer: str


ProblemFn = Callable[..., tuple[str, str]]  # (rng, **kwargs) -> (user prompt, answer)


def _rand_number(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 10**digits - 1)


def addition(rng: random.Random, digits: int = 2) -> tuple[str, str]:
    """'What is 47+385?' -> '432'; operands uniform in [0, 10**digits)."""
    a, b = _rand_number(rng, digits), _rand_number(rng, digits)
    return f"What is {a}+{b}?", str(a + b)


def subtraction(rng: random.Random, digits: int = 2) -> tuple[str, str]:
    a, b = _rand_number(rng, digits), _rand_number(rng, digits)
    return f"What is {a}-{b}?", str(a - b)


def multiplication(rng: random.Random, digits: int = 2) -> tuple[str, str]:
    """A `digits`-digit number times a single digit (long multiplication is not learnable in minutes)."""
    a, b = _rand_number(rng, digits), rng.randint(0, 9)
    return f"What is {a}*{b}?", str(a * b)


def reverse_digits(rng: random.Random, length: int = 4) -> tuple[str, str]:
    """'Reverse the digits 4719.' -> '9174' (leading zeros kept: it is a string task)."""
    s = "".join(rng.choice(string.digits) for _ in range(length))
    return f"Reverse the digits {s}.", s[::-1]


def sort_letters(rng: random.Random, length: int = 6, alphabet: str = "abcdefghij") -> tuple[str, str]:
    """'Sort the letters: d b a c' -> 'a b c d' (space-separated so each letter is one token)."""
    letters = [rng.choice(alphabet) for _ in range(length)]
    return f"Sort the letters: {' '.join(letters)}", " ".join(sorted(letters))


def copy_letters(
    rng: random.Random, length: int = 5, alphabet: str = string.ascii_lowercase
) -> tuple[str, str]:
    letters = " ".join(rng.choice(alphabet) for _ in range(length))
    return f"Repeat: {letters}", letters


TASKS: dict[str, ProblemFn] = {
    "addition": addition,
    "subtraction": subtraction,
    "multiplication": multiplication,
    "reverse": reverse_digits,
    "sort_letters": sort_letters,
    "copy": copy_letters,
}


def split_of(task: str, prompt: str) -> Split:
    """'eval' for EVAL_PERCENT % of prompts, by a salted content hash; 'train' otherwise."""
    h = int(hashlib.sha256(f"tuneloop-split/{task}/{prompt}".encode()).hexdigest()[:8], 16)
    return "eval" if h % 100 < EVAL_PERCENT else "train"


def record_id(messages: list[dict[str, str]], answer: str) -> str:
    payload = json.dumps({"messages": messages, "answer": answer}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_record(prompt: str, answer: str) -> Record:
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": ANSWER_PREFIX + answer},
    ]
    return {"id": record_id(messages, answer), "messages": messages, "answer": answer}


def generate(
    task: str, n: int, seed: int, split: Split | None = "train", **task_kwargs: object
) -> list[Record]:
    """`n` distinct problems of `task` from `split` ('train', 'eval' or None for both), seeded.

    Raises ValueError when the task's problem space (for these kwargs) has fewer than `n` such problems.
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    fn = TASKS[task]
    # String seed: Python's str-seeding is stable across runs and platforms (sha512 based).
    rng = random.Random(f"{task}/{seed}/{split}/{json.dumps(task_kwargs, sort_keys=True)}")
    seen: set[str] = set()
    out: list[Record] = []
    misses, max_misses = 0, 1000 + 50 * n
    while len(out) < n:
        prompt, answer = fn(rng, **task_kwargs)
        if prompt in seen or (split is not None and split_of(task, prompt) != split):
            misses += 1
            if misses > max_misses:
                raise ValueError(
                    f"task {task!r} {task_kwargs}: only {len(out)} distinct {split} problems found, asked for {n}"
                )
            continue
        seen.add(prompt)
        out.append(make_record(prompt, answer))
    return out


def train_eval(
    task: str, n_train: int, n_eval: int, seed: int = 0, **task_kwargs: object
) -> tuple[list[Record], list[Record]]:
    """Disjoint train and eval sets; the eval set does not depend on `n_train` (nor vice versa)."""
    return (
        generate(task, n_train, seed, "train", **task_kwargs),
        generate(task, n_eval, seed, "eval", **task_kwargs),
    )


PROSE_PROMPTS = ["Write something.", "Write a few sentences.", "Say something in a sentence or two.",
                 "Continue with some text."]


def prose(n: int, seed: int = 0) -> list[Record]:
    """`n` distinct chat rows whose reply is prose in the style of the `tiny` presets' pretraining corpus.

    Replay data for models built by `training_core.presets` (their tokenizer was trained on such text); it is
    not the held-out-text guard's text (`evals.builtin.heldout_texts` draws from other templates).
    """
    from training_core.tokenizer_build import random_prose

    rng = random.Random(f"prose/{seed}")
    seen: set[str] = set()
    out: list[Record] = []
    while len(out) < n:
        text = random_prose(rng)
        if text in seen:
            continue
        seen.add(text)
        messages = [{"role": "user", "content": rng.choice(PROSE_PROMPTS)}, {"role": "assistant", "content": text}]
        out.append({"id": record_id(messages, text), "messages": messages, "answer": text})
    return out


def extract_answer(completion: str) -> str | None:
    """The text after the first 'Answer:' up to the end of that line, stripped; None if absent."""
    m = re.search(r"Answer:[ \t]*([^\n]*)", completion)
    if m is None:
        return None
    return m.group(1).strip().rstrip(".").strip()


def score(completion: str, answer: str) -> float:
    """1.0 for an exact match of the extracted answer, else 0.0."""
    return 1.0 if extract_answer(completion) == answer.strip() else 0.0


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line (UTF-8), parent dirs created; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    return p


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    out: list[dict] = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: invalid JSON: {e.msg}") from e
    return out
