"""Multi-turn tool use: the policy calls a calculator, reads its result, then answers.

Protocol (documented to the model by the SFT warm-up rows, `sft_rows`, and optionally a system prompt):

    user:      What is 37*12?
    assistant: CALC: 37*12          <- a line `CALC: <expr>`; + - * / // % ( ) and integers
    tool:      RESULT: 444          <- the env's answer (`RESULT: error` for a bad expression)
    assistant: Answer: 444          <- a line `Answer: <value>` ends the episode

Reward: 1 only for a right final answer (with or without the tool), 0 otherwise. A reply with neither a
`CALC:` nor an `Answer:` line, or running out of `max_turns`, is `unparseable` (FailureRewards.unparseable,
counted). The calculator never raises into the run: bad expressions give `RESULT: error`, and expressions
are evaluated by a small AST walker (no `eval`), with operand sizes capped.

Problems: two operands of `digits` digits and an operator in `ops`; train and held-out problems are
disjoint by a salted content hash of the question (`data.generators.split_of`), as the generated tasks.
Metrics per episode: correct, tool_calls, tool_errors, turns, unparseable.
"""

from __future__ import annotations

import ast
import operator
import random
import re
import warnings
from collections.abc import Callable
from typing import Any

from envs.base import Env, EnvGroupBuilder, FailureRewards, Message, StepResult

CALC_RE = re.compile(r"^\s*CALC:\s*(.+?)\s*$", re.MULTILINE)
ANSWER_RE = re.compile(r"Answer:[ \t]*([^\n]*)")
TOOL_ROLE = "tool"
SYSTEM_PROMPT = ("You can use a calculator: write `CALC: <expression>` on its own line and you will get "
                 "`RESULT: <value>`. Then reply `Answer: <value>`.")
_OPS: dict[type, Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                                ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
                                                ast.Div: operator.truediv, ast.Mod: operator.mod}
_MAX_ABS = 10**12  # larger intermediate values are refused (no exponent blow-ups)


def calculate(expr: str) -> str:
    """The tool: integer arithmetic on a safe AST subset; 'error' for anything else."""

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            v = _OPS[type(node.op)](ev(node.left), ev(node.right))
            if abs(v) > _MAX_ABS:
                raise ValueError("too large")
            return v
        raise ValueError(f"unsupported {type(node).__name__}")

    try:
        if len(expr) > 64:
            raise ValueError("too long")
        with warnings.catch_warnings():  # e.g. "12a": a SyntaxWarning per bad model output is noise
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr.strip(), mode="eval")
        v = ev(tree)
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError, RecursionError):
        return "error"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.6g}"
    return str(v)


def parse_answer(text: str) -> str | None:
    m = ANSWER_RE.search(text)
    return None if m is None else m.group(1).strip().rstrip(".").strip()


class ToolCalcEnv(Env):
    """One episode: answer `question` (reference `answer`), optionally through `CALC:` calls."""

    def __init__(self, question: str, answer: str, max_turns: int = 3, failure: FailureRewards | None = None,
                 system_prompt: str | None = None) -> None:
        self.question, self.answer, self.max_turns = question, answer, max_turns
        self.failure = failure or FailureRewards()
        self.system_prompt = system_prompt
        self.turns = self.tool_calls = self.tool_errors = 0
        self._done = False

    def initial_observation(self) -> list[Message]:
        sys = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*sys, {"role": "user", "content": self.question}]

    def _end(self, reward: float, correct: bool, unparseable: bool, got: str | None) -> StepResult:
        self._done = True
        m = {"correct": float(correct), "tool_calls": float(self.tool_calls), "tool_errors": float(self.tool_errors),
             "turns": float(self.turns)}
        if unparseable:
            m["unparseable"] = 1.0
        return StepResult(reward, True, metrics=m, logs={"reference": self.answer, "extracted": got})

    def step(self, message: Message) -> StepResult:
        if self._done:
            raise RuntimeError("ToolCalcEnv is single-use: step() after the episode ended")
        self.turns += 1
        text = message.get("content", "")
        got = parse_answer(text)
        call = CALC_RE.search(text)
        # an answer before any call line ends the episode; a call line first goes to the tool
        if got is not None and (call is None or text.find("Answer:") < call.start()):
            ok = got == self.answer
            return self._end(1.0 if ok else 0.0, ok, False, got)
        if call is None:
            return self._end(self.failure.unparseable, False, True, None)
        if self.turns >= self.max_turns:  # no turn left to read the result and answer
            return self._end(self.failure.unparseable, False, True, None)
        result = calculate(call.group(1))
        self.tool_calls += 1
        self.tool_errors += result == "error"
        return StepResult(0.0, False, [{"role": TOOL_ROLE, "content": f"RESULT: {result}"}],
                          logs={"call": call.group(1), "result": result})


def _problem(rng: random.Random, digits: int, ops: str) -> tuple[str, str]:
    a, b = rng.randint(10 ** (digits - 1), 10**digits - 1), rng.randint(10 ** (digits - 1), 10**digits - 1)
    op = rng.choice(ops)
    return f"What is {a}{op}{b}?", calculate(f"{a}{op}{b}")


def problems(n: int, seed: int, split: str, digits: int = 2, ops: str = "*") -> list[tuple[str, str]]:
    """`n` distinct (question, answer) pairs of the `split` ('train' or 'eval'), deterministic."""
    from data.generators import split_of

    rng = random.Random(f"tool_calc/{seed}/{split}/{digits}/{ops}")
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 + 50 * n:
            raise ValueError(f"tool_calc: only {len(out)} distinct {split} problems for digits={digits}, ops={ops!r}")
        q, a = _problem(rng, digits, ops)
        if q in seen or split_of("tool_calc", q) != split:
            continue
        seen.add(q)
        out.append((q, a))
    return out


def sft_rows(n: int, seed: int = 0, digits: int = 2, ops: str = "*",
             system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Demonstrations of the protocol (train split only) for a warm-up; train on all assistant messages."""
    from data.generators import record_id

    rows = []
    for q, a in problems(n, seed, "train", digits, ops):
        sys = [{"role": "system", "content": system_prompt}] if system_prompt else []
        expr = q.removeprefix("What is ").removesuffix("?")
        msgs = [*sys, {"role": "user", "content": q}, {"role": "assistant", "content": f"CALC: {expr}"},
                {"role": TOOL_ROLE, "content": f"RESULT: {a}"}, {"role": "assistant", "content": f"Answer: {a}"}]
        rows.append({"id": record_id(msgs, a), "messages": msgs, "answer": a})
    return rows


class ToolCalcDataset:
    single_turn = False

    def __init__(self, n_train: int = 4000, n_eval: int = 200, seed: int = 0, digits: int = 2, ops: str = "*",
                 max_turns: int = 3, failure: FailureRewards | None = None, system_prompt: str | None = None) -> None:
        self.n_train, self.n_eval, self.seed, self.digits, self.ops = n_train, n_eval, seed, digits, ops
        self.max_turns, self.failure, self.system_prompt = max_turns, failure or FailureRewards(), system_prompt
        self.name = "tool_calc"
        self._train: list[tuple[str, str]] | None = None

    def _builder(self, q: str, a: str) -> EnvGroupBuilder:
        from data.generators import record_id

        return EnvGroupBuilder(lambda: ToolCalcEnv(q, a, self.max_turns, self.failure, self.system_prompt),
                               problem_id=record_id([{"role": "user", "content": q}], a), tags={"task": "tool_calc"})

    def batch(self, iteration: int, groups_per_batch: int) -> list[EnvGroupBuilder]:
        from recipes.sft import batch_indices

        if self._train is None:
            self._train = problems(self.n_train, self.seed, "train", self.digits, self.ops)
        idx = batch_indices(iteration, groups_per_batch, len(self._train), self.seed)
        return [self._builder(*self._train[i]) for i in idx]

    def eval_builders(self, n: int) -> list[EnvGroupBuilder]:
        return [self._builder(q, a) for q, a in problems(n, self.seed, "eval", self.digits, self.ops)]
