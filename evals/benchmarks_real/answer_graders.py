"""Answer extraction for generative math: GSM8K's final number and MATH's last \\boxed{} via math-verify."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

from evals.graders import Grade, Grader, parse_number, register_grader

# ---------------------------------------------------------------- GSM8K

_NUM = r"-?[$]?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# The few-shot exemplars end "So the answer is N." (Wei et al. CoT); the data's own gold uses "#### N".
_GSM_MARKERS = [
    re.compile(rf"####\s*({_NUM})"),
    re.compile(rf"[Tt]he (?:final )?answer is[:\s]*\$?\s*({_NUM})"),
    re.compile(rf"\\boxed\{{\s*({_NUM})\s*\}}"),
]
_ANY_NUM = re.compile(rf"(?<![\w.])({_NUM})")


def gsm8k_extract(text: str) -> str | None:
    """lm-eval's gsm8k-cot "strict" answer ("The answer is N" / "#### N"), falling back to its
    "flexible-extract" (the last number in the response). Returned normalised: no $, commas or trailing dot."""
    for marker in _GSM_MARKERS:
        hits = marker.findall(text)
        if hits:
            return _clean_number(hits[-1])
    nums = _ANY_NUM.findall(text)
    return _clean_number(nums[-1]) if nums else None


def _clean_number(s: str) -> str:
    return s.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")


@register_grader
class GSM8KGrader(Grader):
    """Exact numeric match of the final number (1,000 == 1000 == 1000.0; 18 != 18.5)."""

    kind = "gsm8k_final_number"
    version = "1"

    def check_target(self, target: Any, meta: Mapping[str, Any]) -> str | None:
        return None if parse_number(str(target)) is not None else f"{target!r} is not a number"

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        got = gsm8k_extract(output)
        if got is None:
            return Grade(None, 0.0)
        a, b = parse_number(got), parse_number(_clean_number(str(target)))
        return Grade(got, float(a is not None and b is not None and abs(a - b) < 1e-9))


# ---------------------------------------------------------------- MATH


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces; `\\boxed 5` too."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    if text.startswith(" ", i):  # "\boxed 5": the rest of the token
        m = re.match(r"\s+([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the model stopped mid-answer


def _mv_timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only works in the main thread; elsewhere run without one.
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_equal(gold: str, pred: str) -> bool:
    """Equivalence of two LaTeX answers through math-verify (sympy): 0.5 == \\frac{1}{2}, (3,\\frac{\\pi}{2}) ==
    \\left( 3, \\frac{\\pi}{2} \\right), x \\in [2,5) == [2,5)."""
    import math_verify

    t = _mv_timeout()
    g = math_verify.parse(f"\\boxed{{{gold}}}", parsing_timeout=t)
    p = math_verify.parse(f"\\boxed{{{pred}}}", parsing_timeout=t)
    if not g or not p:
        # unparseable on either side: fall back to a whitespace-insensitive string match
        return re.sub(r"\s+", "", gold) == re.sub(r"\s+", "", pred)
    return bool(math_verify.verify(g, p, timeout_seconds=t))


@register_grader
class MathVerifyGrader(Grader):
    """MATH: the last \\boxed{} of the response, equivalent (math-verify) to the last \\boxed{} of the gold solution."""

    kind = "math_verify"
    version = "math-verify-0.9.0/1"

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        got = last_boxed(output)
        if got is None:
            return Grade(None, 0.0)
        try:
            ok = math_equal(str(target), got)
        except ImportError:
            raise  # a missing math-verify must not turn into silent zeros
        except Exception:  # a sympy blow-up on a garbage answer is a wrong answer, not a crashed eval
            ok = False
        return Grade(got, float(ok))
