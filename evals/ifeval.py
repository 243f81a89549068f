"""IFEval-style instruction following: prompts with constraints that code can verify.

Each example's meta holds a list of constraints ({"type": ..., params}); the grader scores 1 only
when every constraint holds (IFEval's strict prompt-level accuracy) and lists the failed ones.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping
from typing import Any

from evals.graders import Grade, Grader, register_grader


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w+\b", text)


def _strip_fences(text: str) -> str:
    t = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", t, flags=re.DOTALL)
    return m.group(1) if m else t


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_fences(text))
    except ValueError:
        return False
    return True


def _bullets(text: str) -> int:
    return sum(1 for line in text.splitlines() if re.match(r"^\s*[*-]\s+\S", line))


# type -> (checker(output, params) -> bool, description(params) -> str)
CONSTRAINTS: dict[str, tuple[Callable[[str, Mapping[str, Any]], bool], Callable[[Mapping[str, Any]], str]]] = {
    "lowercase": (
        lambda o, p: bool(re.search(r"[a-zA-Z]", o)) and o == o.lower(),
        lambda p: "Your entire response must be in lowercase letters; no capital letters are allowed.",
    ),
    "uppercase": (
        lambda o, p: bool(re.search(r"[a-zA-Z]", o)) and o == o.upper(),
        lambda p: "Your entire response must be in English capital letters only.",
    ),
    "max_words": (
        lambda o, p: len(_words(o)) <= int(p["n"]),
        lambda p: f"Answer with at most {p['n']} words.",
    ),
    "min_words": (
        lambda o, p: len(_words(o)) >= int(p["n"]),
        lambda p: f"Answer with at least {p['n']} words.",
    ),
    "no_commas": (
        lambda o, p: "," not in o,
        lambda p: "Do not use any commas in your response.",
    ),
    "include_keywords": (
        lambda o, p: all(re.search(rf"\b{re.escape(w)}\b", o, re.IGNORECASE) for w in p["words"]),
        lambda p: "Include the keywords " + ", ".join(repr(w) for w in p["words"]) + " in your response.",
    ),
    "exclude_keywords": (
        lambda o, p: not any(re.search(rf"\b{re.escape(w)}\b", o, re.IGNORECASE) for w in p["words"]),
        lambda p: "Do not include the words " + ", ".join(repr(w) for w in p["words"]) + " in your response.",
    ),
    "end_with": (
        lambda o, p: o.rstrip().endswith(str(p["phrase"])),
        lambda p: f"Finish your response with this exact phrase: {p['phrase']}",
    ),
    "start_with": (
        lambda o, p: o.lstrip().startswith(str(p["phrase"])),
        lambda p: f"Start your response with this exact phrase: {p['phrase']}",
    ),
    "num_bullets": (
        lambda o, p: _bullets(o) == int(p["n"]),
        lambda p: f"Your answer must contain exactly {p['n']} bullet points, using markdown bullets such as: * item.",
    ),
    "json": (
        lambda o, p: _is_json(o),
        lambda p: "Wrap your entire output in JSON format; the whole response must be valid JSON.",
    ),
    "quoted": (
        lambda o, p: len(o.strip()) >= 2 and o.strip().startswith('"') and o.strip().endswith('"'),
        lambda p: "Wrap your entire response with double quotation marks.",
    ),
}


def check_constraint(output: str, constraint: Mapping[str, Any]) -> bool:
    kind = constraint.get("type")
    if kind not in CONSTRAINTS:
        raise ValueError(f"unknown IFEval constraint type {kind!r}; known: {sorted(CONSTRAINTS)}")
    return CONSTRAINTS[kind][0](output, constraint)


def describe_constraint(constraint: Mapping[str, Any]) -> str:
    return CONSTRAINTS[constraint["type"]][1](constraint)


@register_grader
class IFEvalGrader(Grader):
    kind = "ifeval"

    def check_target(self, target: Any, meta: Mapping[str, Any]) -> str | None:
        cons = meta.get("constraints")
        if not isinstance(cons, list) or not cons:
            return "constraints: need a non-empty list of {'type': ...} objects"
        for i, c in enumerate(cons):
            if not isinstance(c, dict) or c.get("type") not in CONSTRAINTS:
                return f"constraints[{i}]: unknown type {c!r}; known: {sorted(CONSTRAINTS)}"
        return None

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        failed = [c["type"] for c in meta["constraints"] if not check_constraint(output, c)]
        return Grade("ok" if not failed else "failed:" + ",".join(failed), float(not failed))


_TOPICS = [
    "the moon", "a rainy day", "learning to cook", "the ocean", "city bicycles", "a library", "winter",
    "a garden", "trains", "coffee", "mountains", "a friendly dog", "the history of maps", "bread baking",
    "music practice", "recycling", "a lighthouse", "birds in spring", "board games", "the night sky",
]
_KEYWORDS = ["river", "blue", "quiet", "window", "seven", "paper", "light", "stone", "green", "journey"]
_TASKS = ["Write a short note about {t}.", "Describe {t} briefly.", "Give a few tips related to {t}.",
          "Write a tiny story involving {t}."]


def _random_constraint(rng: random.Random, kind: str) -> dict[str, Any]:
    if kind in ("max_words",):
        return {"type": kind, "n": rng.choice([20, 30, 50])}
    if kind == "min_words":
        return {"type": kind, "n": rng.choice([5, 10, 15])}
    if kind in ("include_keywords", "exclude_keywords"):
        # Disjoint pools so an include and an exclude constraint never contradict each other.
        pool = _KEYWORDS[:5] if kind == "include_keywords" else _KEYWORDS[5:]
        return {"type": kind, "words": rng.sample(pool, 2)}
    if kind == "end_with":
        return {"type": kind, "phrase": rng.choice(["Is there anything else I can help with?", "The end."])}
    if kind == "start_with":
        return {"type": kind, "phrase": rng.choice(["Sure.", "Here it is:"])}
    if kind == "num_bullets":
        return {"type": kind, "n": rng.choice([2, 3, 4])}
    return {"type": kind}


# Pairs that cannot both hold are never drawn together.
_CONFLICTS = {frozenset({"lowercase", "uppercase"}), frozenset({"json", "num_bullets"}),
              frozenset({"quoted", "json"}), frozenset({"quoted", "num_bullets"}), frozenset({"quoted", "start_with"}), frozenset({"quoted", "end_with"}),
              frozenset({"json", "start_with"}), frozenset({"json", "end_with"}),
              frozenset({"uppercase", "start_with"}), frozenset({"uppercase", "end_with"}),
              frozenset({"lowercase", "start_with"}), frozenset({"lowercase", "end_with"})}


def generate_ifeval_rows(n: int, seed: int = 0, max_constraints: int = 2) -> list[dict[str, Any]]:
    """Deterministic IFEval-style rows: {'prompt', 'target': None, 'meta': {'constraints': [...]}}."""
    rng = random.Random(f"ifeval-{seed}")
    kinds = sorted(CONSTRAINTS)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise ValueError(f"ifeval generator: could only make {len(rows)} distinct rows, asked for {n}")
        picked: list[str] = []
        want = rng.randint(1, max_constraints)
        for k in rng.sample(kinds, len(kinds)):
            if len(picked) >= want:
                break
            if all(frozenset({k, q}) not in _CONFLICTS for q in picked):
                picked.append(k)
        cons = [_random_constraint(rng, k) for k in picked]
        task = rng.choice(_TASKS).format(t=rng.choice(_TOPICS))
        prompt = task + " " + " ".join(describe_constraint(c) for c in cons)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "target": None, "meta": {"constraints": cons}})
    return rows
