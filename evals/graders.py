"""Graders: turn a model output into (extracted answer, score).

Every grader has a `name` (with its parameters) and a `version`; both go into the EvalProtocol, so a
grader bug fix (bump the version) makes old and new scores incomparable instead of silently mixed.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Grade:
    extracted: str | None
    score: float


class Grader:
    kind: str = "base"
    version: str = "1"

    def params(self) -> dict[str, Any]:
        return {}

    @property
    def name(self) -> str:
        p = self.params()
        if not p:
            return self.kind
        inner = ",".join(f"{k}={p[k]!r}" for k in sorted(p))
        return f"{self.kind}({inner})"

    def spec(self) -> dict[str, Any]:
        """A dict `make_grader` turns back into an equal grader (for saved benchmarks)."""
        return {"type": self.kind, **self.params()}

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        raise NotImplementedError

    def check_target(self, target: Any, meta: Mapping[str, Any]) -> str | None:
        """Return an error message when a row's target/meta cannot be graded, else None."""
        return None if target is not None else "missing (this grader needs a target)"


# ---------------------------------------------------------------- text helpers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(s: str) -> str:
    """SQuAD-style normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUM_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?:\s*/\s*(?:\d+))?")
# Explicit answer markers, tried before "last number in the text".
_MARKERS = [
    re.compile(r"####\s*([^\n]*)"),
    re.compile(r"\\boxed\{([^}]*)\}"),
    re.compile(r"answer\s*(?:is|:|=)\s*([^\n]*)", re.IGNORECASE),
]


def parse_number(s: str) -> float | None:
    s = s.strip().replace("$", "").replace(" ", "")
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = parse_number(num), parse_number(den)
        return None if a is None or b in (None, 0.0) else a / b  # type: ignore[operator]
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def extract_number(text: str) -> str | None:
    """The answer number: after '####', in \\boxed{}, after 'answer is', else the last number."""
    for marker in _MARKERS:
        for m in reversed(list(marker.finditer(text))):
            nums = _NUM_RE.findall(m.group(1).replace("$", ""))
            if nums:
                return nums[0].replace(" ", "")
    nums = _NUM_RE.findall(text.replace("$", ""))
    return nums[-1].replace(" ", "") if nums else None


def extract_choice(text: str, n_choices: int) -> str | None:
    """A choice letter (A, B, ...): after 'answer', at the start, in '(X)', else the last lone letter."""
    letters = string.ascii_uppercase[:n_choices]
    cls = f"[{letters}]"
    patterns = [
        rf"answer\s*(?:is|:)?\s*\(?({cls})\)?(?![A-Za-z])",
        rf"^\s*\(?({cls})\)?(?:[.):\s]|$)",
        rf"\(({cls})\)",
    ]
    for pat in patterns:
        m = re.search(pat, text, flags=re.IGNORECASE if pat.startswith("answer") else 0)
        if m:
            return m.group(1).upper()
    lone = re.findall(rf"(?<![A-Za-z])({cls})(?![A-Za-z])", text)
    return lone[-1] if lone else None


# ---------------------------------------------------------------- graders


class ExactGrader(Grader):
    kind = "exact"

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        got = output.strip()
        return Grade(got, float(got == str(target).strip()))


class NormalizedGrader(Grader):
    kind = "normalized"

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        got = normalize_text(output)
        targets = target if isinstance(target, list) else [target]
        return Grade(got, float(any(got == normalize_text(str(t)) for t in targets)))


class NumericGrader(Grader):
    kind = "numeric"

    def __init__(self, abs_tol: float = 1e-6, rel_tol: float = 0.0) -> None:
        self.abs_tol, self.rel_tol = float(abs_tol), float(rel_tol)

    def params(self) -> dict[str, Any]:
        return {"abs_tol": self.abs_tol, "rel_tol": self.rel_tol}

    def check_target(self, target: Any, meta: Mapping[str, Any]) -> str | None:
        if target is None:
            return "missing (numeric grader needs a number)"
        if isinstance(target, bool) or parse_number(str(target)) is None:
            return f"{target!r} is not a number"
        return None

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        got = extract_number(output)
        want = parse_number(str(target))
        if got is None or want is None:
            return Grade(got, 0.0)
        value = parse_number(got)
        if value is None or not math.isfinite(value):
            return Grade(got, 0.0)
        ok = abs(value - want) <= max(self.abs_tol, self.rel_tol * abs(want))
        return Grade(got, float(ok))


class RegexGrader(Grader):
    """With `pattern`: extract group 1 (or the match) and compare with the target.
    Without: the row's target is itself a regex the output must match (re.search)."""

    kind = "regex"

    def __init__(self, pattern: str | None = None, ignore_case: bool = False) -> None:
        self.pattern, self.ignore_case = pattern, bool(ignore_case)
        flags = re.IGNORECASE if ignore_case else 0
        self._re = re.compile(pattern, flags) if pattern else None

    def params(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "ignore_case": self.ignore_case}

    def check_target(self, target: Any, meta: Mapping[str, Any]) -> str | None:
        if target is None:
            return None if self._re is not None else "missing (regex grader without pattern needs a target regex)"
        if self._re is None:
            try:
                re.compile(str(target))
            except re.error as e:
                return f"invalid regex {target!r}: {e}"
        return None

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        flags = re.IGNORECASE if self.ignore_case else 0
        if self._re is None:
            m = re.search(str(target), output, flags)
            return Grade(m.group(0) if m else None, float(m is not None))
        m = self._re.search(output)
        if m is None:
            return Grade(None, 0.0)
        got = m.group(1) if m.groups() else m.group(0)
        if target is None:
            return Grade(got, 1.0)
        same = got.strip().lower() == str(target).strip().lower() if self.ignore_case else got.strip() == str(target).strip()
        return Grade(got, float(same))


class ChoiceGrader(Grader):
    """Multiple choice: meta['choices'] lists the options; target is a letter, an index or the option text."""

    kind = "choice"

    def check_target(self, target: Any, meta: Mapping[str, Any]) -> str | None:
        choices = meta.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            return "choices: need a list of at least 2 options"
        if len(choices) > 26:
            return "choices: at most 26 options"
        try:
            self.target_letter(target, choices)
        except ValueError as e:
            return str(e)
        return None

    @staticmethod
    def target_letter(target: Any, choices: list[Any]) -> str:
        letters = string.ascii_uppercase[: len(choices)]
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices):
            return letters[target]
        if isinstance(target, str):
            t = target.strip()
            if len(t) == 1 and t.upper() in letters:
                return t.upper()
            if t in [str(c) for c in choices]:
                return letters[[str(c) for c in choices].index(t)]
        raise ValueError(f"{target!r} is neither a letter in {letters}, an index nor one of the choices")

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        choices = list(meta["choices"])
        got = extract_choice(output, len(choices))
        return Grade(got, float(got == self.target_letter(target, choices)))


class ContainsGrader(Grader):
    kind = "contains"

    def __init__(self, mode: str = "all", case_sensitive: bool = False) -> None:
        if mode not in ("all", "any"):
            raise ValueError(f"contains grader: mode must be 'all' or 'any', got {mode!r}")
        self.mode, self.case_sensitive = mode, bool(case_sensitive)

    def params(self) -> dict[str, Any]:
        return {"mode": self.mode, "case_sensitive": self.case_sensitive}

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        needles = [str(t) for t in (target if isinstance(target, list) else [target])]
        hay = output if self.case_sensitive else output.lower()
        hits = [n for n in needles if (n if self.case_sensitive else n.lower()) in hay]
        ok = len(hits) == len(needles) if self.mode == "all" else bool(hits)
        return Grade(";".join(hits) if hits else None, float(ok))


class CallableGrader(Grader):
    """`module:function` called as fn(output, example_dict) -> float | bool | (score, extracted).

    Its version is the hash of the function's source, so editing the grader changes the protocol.
    """

    kind = "callable"

    def __init__(self, ref: str, version: str | None = None) -> None:
        self.ref = ref
        self.fn = load_callable(ref)
        if version is None:
            try:
                src = inspect.getsource(self.fn)
            except (OSError, TypeError):
                src = ref
            version = "src-" + hashlib.sha256(src.encode()).hexdigest()[:12]
        self.version = version

    def params(self) -> dict[str, Any]:
        return {"ref": self.ref}

    def check_target(self, target: Any, meta: Mapping[str, Any]) -> str | None:
        return None

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        res = self.fn(output, {"target": target, "meta": dict(meta)})
        if isinstance(res, tuple):
            score, extracted = res
            return Grade(None if extracted is None else str(extracted), float(score))
        return Grade(None, float(res))


def load_callable(ref: str) -> Callable[..., Any]:
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"callable grader: expected 'module:function', got {ref!r}")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"callable grader {ref!r}: cannot import module {mod_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"callable grader {ref!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"callable grader {ref!r}: {attr!r} is not callable")
    return obj  # type: ignore[no-any-return]


GRADERS: dict[str, type[Grader]] = {
    g.kind: g
    for g in (ExactGrader, NormalizedGrader, NumericGrader, RegexGrader, ChoiceGrader, ContainsGrader, CallableGrader)
}


def register_grader(cls: type[Grader]) -> type[Grader]:
    GRADERS[cls.kind] = cls
    return cls


def make_grader(spec: str | Mapping[str, Any] | Grader) -> Grader:
    """'numeric' | {'type': 'numeric', 'abs_tol': 0.01} | 'pkg.mod:fn' (callable) | a Grader."""
    if isinstance(spec, Grader):
        return spec
    if isinstance(spec, str):
        if ":" in spec and spec.split(":", 1)[0] not in GRADERS:
            return CallableGrader(spec)
        spec = {"type": spec}
    kwargs = dict(spec)
    kind = kwargs.pop("type", None)
    if kind == "ifeval" and kind not in GRADERS:
        import evals.ifeval  # noqa: F401  (registers the IFEval grader; lazy to avoid an import cycle)
    if kind not in GRADERS:
        raise ValueError(f"unknown grader type {kind!r}; known: {sorted(GRADERS)}")
    try:
        return GRADERS[kind](**kwargs)
    except TypeError as e:
        raise ValueError(f"grader {kind!r}: bad parameters {kwargs}: {e}") from e
