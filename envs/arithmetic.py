"""Single-turn problem envs over the generated tasks of `data.generators` (reverse, addition, sort_letters...).

- The answer format is the generators' `Answer: <answer>` line: `check_format` = an `Answer:` line is
  present, `check_answer` = exact match of the extracted answer (`data.generators.score`), so the SFT
  warm-up data, RL rewards and the eval grader share one definition.
- Train and held-out problems come from the generators' content-hash split (`split_of`): no training
  problem is ever an eval problem, whatever the seeds and sizes.
- `batch(i)` draws groups with `recipes.sft.batch_indices` (epoch-wise seeded permutations): a pure
  function of (seed, i), so a resumed run sees the problems of an uninterrupted one.
- `eval_benchmark(n)` turns the held-out problems into an `evals.benchmarks.Benchmark` graded by the same
  check (`EnvAnswerGrader`), so `evals.runner.evaluate` and `evals.compare.compare` work unchanged.

Trade-off: a problem set is materialised up front (`n_train` rows, cheap for these generators) instead of
streaming fresh problems; with n_train large enough an epoch is never repeated in a short run.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

from envs.base import EnvGroupBuilder, FailureRewards, ProblemEnv
from evals.benchmarks import Benchmark, Example
from evals.graders import Grade, Grader, register_grader


def _batch_indices(iteration: int, size: int, n: int, seed: int) -> list[int]:
    from recipes.sft import batch_indices  # the SFT recipe's seeded epoch permutations

    return batch_indices(iteration, size, n, seed)


class GeneratedProblemEnv(ProblemEnv):
    def __init__(self, question: str, answer: str, failure: FailureRewards | None = None,
                 system_prompt: str | None = None) -> None:
        super().__init__(failure, system_prompt)
        self.question, self.answer = question, answer

    def get_question(self) -> str:
        return self.question

    @property
    def reference_answer(self) -> str:
        return self.answer

    def check_answer(self, text: str) -> bool:
        from data.generators import score

        return score(text, self.answer) == 1.0

    def check_format(self, text: str) -> bool:
        from data.generators import extract_answer

        return extract_answer(text) is not None


@register_grader
class EnvAnswerGrader(Grader):
    """The generated tasks' check as an evals grader: `Answer: X` extracted, exact match with the target."""

    kind = "env_answer"

    def grade(self, output: str, target: Any, meta: Mapping[str, Any]) -> Grade:
        from data.generators import extract_answer, score

        return Grade(extract_answer(output), score(output, str(target)))


class GeneratedTaskDataset:
    """Groups of `GeneratedProblemEnv` for one `data.generators` task."""

    single_turn = True

    def __init__(self, task: str, task_kwargs: dict[str, Any] | None = None, n_train: int = 4000,
                 n_eval: int = 200, seed: int = 0, failure: FailureRewards | None = None,
                 system_prompt: str | None = None) -> None:
        self.task, self.task_kwargs = task, dict(task_kwargs or {})
        self.n_train, self.n_eval, self.seed = n_train, n_eval, seed
        self.failure, self.system_prompt = failure or FailureRewards(), system_prompt
        self.name = task

    @cached_property
    def train_rows(self) -> list[dict[str, Any]]:
        from data.generators import generate

        return list(generate(self.task, self.n_train, self.seed, "train", **self.task_kwargs))

    def eval_rows(self, n: int) -> list[dict[str, Any]]:
        from data.generators import generate

        return list(generate(self.task, n, self.seed, "eval", **self.task_kwargs))

    def _builder(self, row: dict[str, Any]) -> EnvGroupBuilder:
        q, a = row["messages"][0]["content"], row["answer"]
        return EnvGroupBuilder(lambda: GeneratedProblemEnv(q, a, self.failure, self.system_prompt),
                               problem_id=row["id"], tags={"task": self.task})

    def batch(self, iteration: int, groups_per_batch: int) -> list[EnvGroupBuilder]:
        rows = self.train_rows
        return [self._builder(rows[i]) for i in _batch_indices(iteration, groups_per_batch, len(rows), self.seed)]

    def eval_builders(self, n: int) -> list[EnvGroupBuilder]:
        return [self._builder(r) for r in self.eval_rows(n)]

    def eval_benchmark(self, n: int, name: str = "target") -> Benchmark:
        sys = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        examples = [Example.make([*sys, r["messages"][0]], r["answer"], {"row_id": r["id"]}) for r in self.eval_rows(n)]
        return Benchmark(name, examples, EnvAnswerGrader(), description=f"held-out {self.task} problems (env check)")
