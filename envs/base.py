"""RL environment protocols: single-turn problems, multi-turn message envs, group builders, datasets.

In the spirit of tinker-cookbook's `ProblemEnv` / `MessageEnv` (read to learn, not copied):

- `Env` is a multi-turn, message-level environment: `initial_observation()` gives the chat messages the
  policy answers; `step(assistant_message)` returns a `StepResult` (reward, done, the next messages to
  append, metrics, logs). Envs are single-use: one episode each.
- `ProblemEnv` is the single-turn case: a question, a reference answer, `check_answer(text)` and
  `check_format(text)`; its one step ends the episode with reward 1 for a right answer, 0 for a wrong
  one, and `FailureRewards.unparseable` when the format check fails (counted as `unparseable`).
- `EnvGroupBuilder` builds the `group_size` envs of one group from the same problem, so every rollout of a
  group starts from the same state (GRPO's group baseline needs that).
- `RLDataset` yields the builders of iteration `i` as a pure function of (seed, i): a resumed run gets the
  same problems as an uninterrupted one; `eval_builders(n)` gives held-out problems disjoint from training.
- `FailureRewards`: the rewards of context overflow, unparseable answers and env exceptions (default 0). The
  rollout code (recipes/rl.py) applies them and counts each; a failing env never crashes a run.

Trade-off: message-level (not token-level) envs keep envs tokenizer-free and let one env serve training and
evaluation of any model; the rollout code owns rendering and re-renders the transcript each turn, so an
episode trains as one token stream only when each re-rendered prompt extends the previous turn's tokens
(recipes.rl.episode_datums; otherwise one datum per turn).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]


@dataclass
class StepResult:
    reward: float
    done: bool
    next_messages: list[Message] = field(default_factory=list)  # appended to the transcript when not done
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. correct, format_ok, tool_calls
    logs: dict[str, Any] = field(default_factory=dict)  # free-form, written to the rollout transcripts


@dataclass(frozen=True)
class FailureRewards:
    """Rewards given instead of crashing; each occurrence is counted in the iteration's metrics."""

    overflow: float = 0.0  # the prompt plus max_tokens no longer fits the context
    unparseable: float = 0.0  # no answer in the expected format
    error: float = 0.0  # the env raised


class Env(ABC):
    """A single-use, multi-turn environment over chat messages."""

    @abstractmethod
    def initial_observation(self) -> list[Message]:
        """The messages the policy answers first (system/user turns)."""

    @abstractmethod
    def step(self, message: Message) -> StepResult:
        """Consume the policy's assistant message; reward, done and the messages to append."""


class ProblemEnv(Env):
    """A single-turn problem: one answer, graded by `check_answer` (reward 1/0) and `check_format`."""

    def __init__(self, failure: FailureRewards | None = None, system_prompt: str | None = None) -> None:
        self.failure = failure or FailureRewards()
        self.system_prompt = system_prompt
        self._done = False

    @abstractmethod
    def get_question(self) -> str: ...

    @property
    @abstractmethod
    def reference_answer(self) -> str: ...

    @abstractmethod
    def check_answer(self, text: str) -> bool: ...

    @abstractmethod
    def check_format(self, text: str) -> bool: ...

    def initial_observation(self) -> list[Message]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*msgs, {"role": "user", "content": self.get_question()}]

    def step(self, message: Message) -> StepResult:
        if self._done:
            raise RuntimeError("ProblemEnv is single-use: step() after the episode ended")
        self._done = True
        text = message.get("content", "")
        fmt = self.check_format(text)
        if not fmt:
            return StepResult(self.failure.unparseable, True, metrics={"correct": 0.0, "format_ok": 0.0,
                                                                        "unparseable": 1.0},
                              logs={"reference": self.reference_answer})
        correct = self.check_answer(text)
        return StepResult(float(correct), True, metrics={"correct": float(correct), "format_ok": 1.0},
                          logs={"reference": self.reference_answer})


@dataclass
class EnvGroupBuilder:
    """Makes the `n` envs of one group, all from the same problem (`make` is called once per env)."""

    make: Callable[[], Env]
    problem_id: str
    tags: dict[str, str] = field(default_factory=dict)

    def make_envs(self, n: int) -> list[Env]:
        return [self.make() for _ in range(n)]


@runtime_checkable
class RLDataset(Protocol):
    """Deterministic source of groups: `batch(i)` depends only on (seed, i); eval problems are held out."""

    name: str
    single_turn: bool

    def batch(self, iteration: int, groups_per_batch: int) -> list[EnvGroupBuilder]: ...

    def eval_builders(self, n: int) -> list[EnvGroupBuilder]: ...
