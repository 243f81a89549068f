"""A built-in, offline preference task whose preferred behaviour is checkable by code.

Task `case`: "Repeat the words river Moon in uppercase." The prompt states an output constraint (upper or
lower case); the chosen reply repeats the words in the stated case ("RIVER MOON"), the rejected reply the same
words in the other case ("river moon"). A pair differs only in whether the constraint is followed, and the
behaviour of any generation is graded by `grade_constraint`: every letter of the reply in the stated case, and
a well-formed reply (1 to 2x the asked number of words: a degenerate run-on does not count).

Features:
- `preference_rows(n, seed, split)`: `{"id", "prompt": [user], "chosen": [assistant], "rejected": [assistant]}`
  rows (the JSONL shape `recipes.preference_data` reads);
- `constraint_benchmark(n, seed)`: an `evals.benchmarks.Benchmark` of held-out prompts graded by the code check
  (a `CallableGrader` on `grade_constraint`, so saved benchmarks reload and a grader edit changes the protocol);
- train / eval disjoint by content: the split is a salted hash (`data.generators.split_of`) of the (words, case)
  combination, so no phrasing or display variant of a held-out prompt is ever trained on.

Trade-off: replies are drawn from a small vocabulary (16 words, 2 per prompt), so that the random-init `tiny`
preset learns the content in a short SFT warm-up and the only open question is the case: the behaviour DPO has
to teach. The words are shown in a random display case of their own, independent of the constraint, so copying
the prompt is right only part of the time.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from data.generators import split_of

CASES = ("uppercase", "lowercase")
TASK = "pref-case"
WORDS = ("yes", "no", "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "water",
         "stone", "fire", "river")
TEMPLATES = ("Repeat the words {w} in {case}.", "Say {w} in {case}.", "Write {w} in {case}.",
             "Reply with {w} in {case}.")


def _row_id(prompt: str, chosen: str, rejected: str) -> str:
    blob = json.dumps([prompt, chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _show(word: str, rng: random.Random) -> str:
    return rng.choice((word, word.upper(), word.capitalize()))


def _problem(rng: random.Random, length: int) -> tuple[str, str, str, str, str]:
    """(prompt, required case, chosen, rejected, split key)."""
    words = [rng.choice(WORDS) for _ in range(length)]
    case = rng.choice(CASES)
    prompt = rng.choice(TEMPLATES).format(w=" ".join(_show(w, rng) for w in words), case=case)
    upper, lower = " ".join(w.upper() for w in words), " ".join(words)
    chosen, rejected = (upper, lower) if case == "uppercase" else (lower, upper)
    return prompt, case, chosen, rejected, f"{' '.join(words)}/{case}"


def _problems(n: int, seed: int, split: str | None, length: int) -> list[tuple[str, str, str, str, str]]:
    rng = random.Random(f"{TASK}/{seed}/{split}/{length}")
    seen: set[str] = set()
    out = []
    misses = 0
    while len(out) < n:
        p = _problem(rng, length)
        if p[0] in seen or (split is not None and split_of(TASK, p[4]) != split):
            misses += 1
            if misses > 1000 + 50 * n:
                raise ValueError(f"task {TASK!r} (length {length}): only {len(out)} distinct {split} prompts")
            continue
        seen.add(p[0])
        out.append(p)
    return out


def preference_rows(n: int, seed: int = 0, split: str | None = "train", length: int = 2) -> list[dict[str, Any]]:
    """`n` distinct preference pairs of the `case` task from `split` ('train', 'eval' or None)."""
    rows = []
    for prompt, _case, chosen, rejected, _key in _problems(n, seed, split, length):
        rows.append({"id": _row_id(prompt, chosen, rejected), "prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def required_case(prompt: str) -> str:
    """The case a prompt of this task asks for ('uppercase' / 'lowercase'); ValueError if none is stated."""
    found = [c for c in CASES if f" in {c}" in prompt]
    if len(found) != 1:
        raise ValueError(f"prompt states no single case constraint: {prompt!r}")
    return found[0]


def follows_constraint(output: str, case: str, n_words: int = 0) -> bool:
    """True when the reply has letters, every one of them in `case`, and (n_words > 0) 1..2*n_words words."""
    letters = [c for c in output if c.isalpha()]
    if not letters or (n_words > 0 and not 1 <= len(output.split()) <= 2 * n_words):
        return False
    return all(c.isupper() for c in letters) if case == "uppercase" else all(c.islower() for c in letters)


def grade_constraint(output: str, example: dict[str, Any]) -> tuple[float, str]:
    """`evals.graders.CallableGrader` entry point: (1.0 if the stated constraint is followed, extracted letters)."""
    case = str(example["target"])
    n_words = int(example.get("meta", {}).get("n_words", 0))
    return float(follows_constraint(output, case, n_words)), "".join(c for c in output if c.isalpha())


GRADER_REF = "data.preferences:grade_constraint"


def constraint_benchmark(n: int = 200, seed: int = 0, name: str = "target", split: str = "eval",
                         length: int = 2, max_tokens: int = 16) -> Any:
    """Held-out prompts of the task, graded by whether the greedy reply follows the stated constraint."""
    from evals.benchmarks import Benchmark, Example
    from evals.graders import make_grader

    examples = [Example.make([{"role": "user", "content": p}], case, {"task": TASK, "n_words": length})
                for p, case, _c, _r, _k in _problems(n, seed, split, length)]
    return Benchmark(name, examples, make_grader(GRADER_REF), max_tokens=max_tokens,
                     description="held-out prompts with a stated output case; score = reply follows it")
