"""A deterministic fake Generator for tests and demos of the eval layer (the model is not under test).

`OracleGenerator` knows the right answer of every example it was given and answers correctly when a
hash of (salt, prompt, sample index) falls below `accuracy[benchmark]`. With a shared salt, raising the
accuracy only fixes items (monotone), so "better checkpoint" scenarios are exact and reproducible.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from evals.benchmarks import AnyBenchmark, Benchmark
from evals.ifeval import _words
from evals.protocols import EvalProtocol, Messages


def _unit(*parts: object) -> float:
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _right_answer(bench: Benchmark, target: Any, meta: Mapping[str, Any]) -> str:
    kind = bench.grader.kind
    if kind == "ifeval":
        return _ifeval_answer(meta["constraints"])
    if kind == "choice":
        return f"The answer is {target}."
    if kind == "numeric":
        return f"Let me compute.\n#### {target}"
    return str(target[0] if isinstance(target, list) else target)


def _ifeval_answer(constraints: Sequence[Mapping[str, Any]]) -> str:
    """An answer that satisfies every constraint (the generator only draws compatible ones)."""
    by = {c["type"]: c for c in constraints}
    words = [w for c in constraints if c["type"] == "include_keywords" for w in c["words"]]
    pre = str(by["start_with"]["phrase"]) if "start_with" in by else ""
    post = str(by["end_with"]["phrase"]) if "end_with" in by else ""
    n_bullets = int(by["num_bullets"]["n"]) if "num_bullets" in by else 0
    fixed = len(words) + len(_words(pre)) + len(_words(post)) + 2 * n_bullets + (1 if "json" in by else 0)
    lo = int(by["min_words"]["n"]) if "min_words" in by else 0
    hi = int(by["max_words"]["n"]) if "max_words" in by else 10**9
    k = max(1, min(max(lo, 12), hi) - fixed)
    filler = ("here is a calm note about the topic with plain words only and nothing more to say today "
              "since brevity helps").split()[:k]
    body = " ".join(filler + words)
    if n_bullets:
        body = "\n".join(f"* point {i} {body if i == 0 else ''}".rstrip() for i in range(n_bullets))
    if "json" in by:
        body = json.dumps({"TEXT" if "uppercase" in by else "text": body})
    if "quoted" in by:
        body = f'"{body}"'
    text = ("\n" if n_bullets else " ").join(x for x in (pre, body, post) if x)
    return text.upper() if "uppercase" in by else text


class OracleGenerator:
    def __init__(self, name: str, benchmarks: Sequence[AnyBenchmark], accuracy: Mapping[str, float] | float,
                 *, salt: str = "oracle", nll_scale: float = 1.0) -> None:
        self.name = name
        self.salt = salt
        self.nll_scale = nll_scale
        self.accuracy = accuracy
        self.calls: list[int] = []  # prompts per generate call, to check batching
        self._answers: dict[str, tuple[str, str]] = {}
        for b in benchmarks:
            if isinstance(b, Benchmark):
                for ex in b.examples:
                    self._answers[ex.messages[-1]["content"]] = (b.name, _right_answer(b, ex.target, ex.meta))

    def _acc(self, bench: str) -> float:
        return float(self.accuracy if isinstance(self.accuracy, int | float) else self.accuracy.get(bench, 0.0))

    def generate(self, prompts: list[Messages], protocol: EvalProtocol) -> list[list[str]]:
        self.calls.append(len(prompts))
        out = []
        for msgs in prompts:
            key = msgs[-1]["content"]
            bench, right = self._answers.get(key, ("?", "no idea"))
            samples = []
            for s in range(protocol.num_samples):
                u = _unit(self.salt, key, s if protocol.num_samples > 1 else 0, protocol.seed)
                samples.append(right if u < self._acc(bench) else "I am not sure, maybe 1234567, Q.")
            out.append(samples)
        return out

    def nll(self, texts: list[str]) -> list[tuple[float, int]]:
        out = []
        for t in texts:
            toks = max(1, len(t.split()))
            out.append((self.nll_scale * toks * (2.0 + _unit(self.salt, "nll", t)), toks))
        return out
