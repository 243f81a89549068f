"""Built-in offline benchmarks: deterministic generators, no downloads.

Same (name, n, seed) -> the same examples and ids on every machine (seeded `random.Random` with string
seeds, which hash deterministically, unlike `hash()`).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from typing import Any

from evals.benchmarks import AnyBenchmark, Benchmark, Example, PerplexityBenchmark, render_choices
from evals.graders import ChoiceGrader, NumericGrader
from evals.ifeval import IFEvalGrader, generate_ifeval_rows

RowFn = Callable[[random.Random], tuple[str, Any, dict[str, Any]]]


def _distinct(n: int, rng: random.Random, make: RowFn, what: str) -> list[Example]:
    out: list[Example] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 100:
            raise ValueError(f"{what}: could only generate {len(out)} distinct examples, asked for {n}")
        prompt, target, meta = make(rng)
        ex = Example.make([{"role": "user", "content": prompt}], target, meta)
        if ex.id not in seen:
            seen.add(ex.id)
            out.append(ex)
    return out


# ---------------------------------------------------------------- arithmetic


def _arith_row(rng: random.Random) -> tuple[str, Any, dict[str, Any]]:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
    else:
        a, b = rng.randint(1, 999), rng.randint(1, 999)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}? Reply with the number only.", value, {"op": op}


def arithmetic(n: int = 100, seed: int = 0) -> Benchmark:
    """+ - * questions from `data.generators`' eval split (disjoint by construction from its train split,
    so training on the project's arithmetic data cannot contaminate this benchmark); own generator otherwise."""
    try:
        from data import generators as dg
    except ImportError:
        ex = _distinct(n, random.Random(f"arithmetic-{seed}"), _arith_row, "arithmetic")
        return Benchmark("arithmetic", ex, NumericGrader(), max_tokens=16, description="integer + - * questions")
    tasks = ["addition", "subtraction", "multiplication"]
    ex = []
    for i, task in enumerate(tasks):
        k = n // 3 + (1 if i < n % 3 else 0)
        for r in dg.generate(task, k, seed, split="eval") if k else []:
            ex.append(Example.make(r["messages"][:1], int(r["answer"]), {"op": task}))
    ex.sort(key=lambda e: e.id)  # interleave the three tasks deterministically
    return Benchmark("arithmetic", ex, NumericGrader(), max_tokens=16,
                     description="integer + - * questions (data.generators eval split)")


# ---------------------------------------------------------------- GSM-style word problems

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam",
          "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara"]
_ITEMS = ["apples", "stickers", "marbles", "pencils", "cookies", "stamps", "shells", "cards"]


def _gsm_row(rng: random.Random) -> tuple[str, Any, dict[str, Any]]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    t = rng.randrange(8)
    if t == 0:
        a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
        q = f"{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack. How many {item} does {name} have now?"
        ans = a + b * c
    elif t == 1:
        p, k = rng.randint(2, 15), rng.randint(2, 8)
        bill = rng.choice([b for b in (20, 50, 100, 200) if b > p * k] or [500])
        q = (f"A shop sells {item} for ${p} each. {name} buys {k} of them and pays with a ${bill} bill. "
             f"How many dollars of change does {name} get?")
        ans = bill - p * k
    elif t == 2:
        a, d, b, e = rng.randint(5, 40), rng.randint(2, 7), rng.randint(5, 40), rng.randint(2, 7)
        q = (f"{name} reads {a} pages a day for {d} days, then {b} pages a day for {e} days. "
             f"How many pages does {name} read in total?")
        ans = a * d + b * e
    elif t == 3:
        b, k = rng.randint(2, 9), rng.randint(2, 6)
        a = b * k + rng.randint(1, 30)
        q = f"{name} had {a} {item} and gave {b} to each of {k} friends. How many {item} does {name} have left?"
        ans = a - b * k
    elif t == 4:
        s, h, s2, h2 = rng.randint(30, 120), rng.randint(1, 5), rng.randint(30, 120), rng.randint(1, 5)
        q = (f"A train travels at {s} km per hour for {h} hours and then at {s2} km per hour for {h2} hours. "
             f"How many kilometres does it travel in total?")
        ans = s * h + s2 * h2
    elif t == 5:
        w, h, k = rng.randint(8, 30), rng.randint(5, 40), rng.randint(2, 6)
        q = f"{name} earns ${w} per hour and works {h} hours each week. How many dollars does {name} earn in {k} weeks?"
        ans = w * h * k
    elif t == 6:
        a, m = rng.randint(4, 24), rng.randint(20, 300)
        q = f"A box holds {a} {item}. How many boxes are needed to pack {m} {item}?"
        ans = math.ceil(m / a)
    else:
        k, each, b = rng.randint(2, 6), rng.randint(2, 9), rng.randint(3, 12)
        eaten = rng.randint(1, 9)
        trays = max(2, (k * each + eaten + b - 1) // b)
        eaten = trays * b - k * each  # make the split exact
        q = (f"{name} bakes {trays} trays of cookies with {b} cookies on each tray, eats {eaten} of them and "
             f"shares the rest equally among {k} friends. How many cookies does each friend get?")
        ans = each
    prompt = q + "\nThink step by step, then give the final answer as a number after '####'."
    return prompt, ans, {"template": t}


def gsm(n: int = 100, seed: int = 0) -> Benchmark:
    ex = _distinct(n, random.Random(f"gsm-{seed}"), _gsm_row, "gsm")
    return Benchmark("gsm", ex, NumericGrader(), max_tokens=256, description="GSM-style multi-step word problems")


# ---------------------------------------------------------------- multiple choice

_WORDS = ["anchor", "banana", "candle", "dolphin", "engine", "feather", "guitar", "harbor", "island", "jacket",
          "kettle", "lemon", "marble", "needle", "orange", "pepper", "quartz", "rocket", "saddle", "tunnel"]


def _mc_row(rng: random.Random) -> tuple[str, Any, dict[str, Any]]:
    t = rng.randrange(4)
    if t == 0:
        nums = rng.sample(range(10, 1000), 4)
        q, right, wrong = "Which of these numbers is the largest?", max(nums), [x for x in nums if x != max(nums)]
    elif t == 1:
        a, b = rng.randint(3, 20), rng.randint(3, 20)
        right = a * b
        wrong = rng.sample(sorted({right + d for d in (-b, b, -a, a, 1, -1, 10, -10)} - {right}), 3)
        q = f"What is {a} times {b}?"
    elif t == 2:
        words = rng.sample(_WORDS, 4)
        right = min(words)
        q, wrong = "Which word comes first in alphabetical order?", [w for w in words if w != right]
    else:
        right = rng.randrange(2, 200, 2)
        wrong = rng.sample(range(1, 200, 2), 3)
        q = "Which of these numbers is even?"
    options = [right, *wrong]
    rng.shuffle(options)
    letter = string.ascii_uppercase[options.index(right)]
    return render_choices(q, options), letter, {"choices": [str(o) for o in options]}


def multiple_choice(n: int = 100, seed: int = 0) -> Benchmark:
    ex = _distinct(n, random.Random(f"mc-{seed}"), _mc_row, "mc")
    return Benchmark("mc", ex, ChoiceGrader(), max_tokens=16, description="4-way multiple choice, letter answer")


# ---------------------------------------------------------------- instruction following


def ifeval(n: int = 100, seed: int = 0) -> Benchmark:
    rows = generate_ifeval_rows(n, seed)
    ex = [Example.make([{"role": "user", "content": r["prompt"]}], None, r["meta"]) for r in rows]
    return Benchmark("ifeval", ex, IFEvalGrader(), max_tokens=256, description="verifiable instruction following")


# ---------------------------------------------------------------- held-out text (perplexity guard)

_SUBJ = ["The old farmer", "A small child", "The teacher", "Our neighbour", "The captain", "A quiet student",
         "The baker", "My sister", "The doctor", "A tired traveller"]
_VERB = ["carried", "painted", "found", "repaired", "borrowed", "described", "cleaned", "opened", "counted", "sold"]
_OBJ = ["a wooden box", "the red door", "an old map", "three baskets", "the broken clock", "a letter",
        "the garden gate", "a blue kite", "the heavy table", "a book of songs"]
_TAIL = ["before sunrise.", "after the storm.", "near the river.", "in the morning.", "for the whole village.",
         "without saying a word.", "with great care.", "on a cold evening.", "while it rained.", "at the market."]


def heldout_texts(n: int = 100, seed: int = 0, sentences: int = 3) -> list[str]:
    rng = random.Random(f"heldout-{seed}")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        text = " ".join(f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_TAIL)}"
                        for _ in range(sentences))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def heldout_text(n: int = 100, seed: int = 0) -> PerplexityBenchmark:
    return PerplexityBenchmark.from_texts("heldout_text", heldout_texts(n, seed), "held-out text for perplexity")


BUILTIN: dict[str, Callable[[int, int], AnyBenchmark]] = {
    "arithmetic": arithmetic,
    "gsm": gsm,
    "mc": multiple_choice,
    "ifeval": ifeval,
    "heldout_text": heldout_text,
}


def builtin_benchmark(name: str, n: int = 100, seed: int = 0) -> AnyBenchmark:
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in benchmark {name!r}; known: {sorted(BUILTIN)}")
    return BUILTIN[name](n, seed)
