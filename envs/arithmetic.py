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

- Problem files (`env.train_file` / `env.eval_file`, issue 16): rows `{"question", "answer"}` (optional `id`)
  in any format `tasks.data_io.load_rows` reads (JSONL, JSON, Parquet, CSV, Arrow dir, s3://, hub id), columns
  mapped with `env.columns.question=problem`; each answer is checked by this env's own grader (`Answer: X`
  must score 1 against it: one line, no trailing dot) and duplicate questions are refused, the error naming
  file, line / row and field. A problem from a file gets the id a generated one with the same question and
  answer has (`data.generators.make_record`), unless the file gives its own `id`.

Trade-offs: a problem set is materialised up front (`n_train` rows, cheap for these generators) instead of
streaming fresh problems; with n_train large enough an epoch is never repeated in a short run. A problem
file is read whole into a list (RL problem sets are thousands of rows, not millions). A CSV's numeric
answer column arrives as int (leading zeros lost): use JSONL or Parquet for such answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property, lru_cache
from pathlib import Path
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


def problem_validator() -> Any:
    """`validate_fn` of a problem file: question and answer present, non-blank strings (an int answer, as CSV
    gives, is read as its decimal text), the answer gradable by the env's own check, no repeated question."""
    from data.generators import score
    from tasks.data_io import fields_validator
    from tasks.prepare_data import DataValidationError

    base = fields_validator({"question": str, "answer": (str, int)})
    seen: dict[str, str] = {}

    def check(row: dict[str, Any], where: str) -> dict[str, Any]:
        row = base(row, where)
        if isinstance(row["answer"], bool):
            raise DataValidationError(f"{where}: field 'answer': expected str, got bool")
        ans = str(row["answer"])
        if "\n" in ans or score(f"Answer: {ans}", ans) != 1.0:
            raise DataValidationError(f"{where}: field 'answer': {ans!r} can never be graded right: the env "
                                      f"extracts one `Answer: X` line (stripped, trailing dots dropped)")
        if "id" in row and not isinstance(row["id"], str | int):
            raise DataValidationError(f"{where}: field 'id': expected str, got {type(row['id']).__name__}")
        q = row["question"]
        if q in seen:
            raise DataValidationError(f"{where}: field 'question': duplicate of {seen[q]}")
        seen[q] = where
        return row

    return check


def load_problems(spec: str, columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Problem rows of a file / dir / s3:// / hub id as generator records `{id, messages, answer}`; every row
    validated first (errors name file, line or row, and field)."""
    p = Path(spec.removeprefix("file://")).expanduser()
    if p.is_file():  # re-read only when the file changed (the flow builds the env dataset several times)
        st = p.stat()
        return list(_load_problems_cached(spec, tuple(sorted((columns or {}).items())), st.st_mtime_ns, st.st_size))
    return _load_problems(spec, columns)


@lru_cache(maxsize=16)
def _load_problems_cached(spec: str, columns: tuple[tuple[str, str], ...], mtime_ns: int, size: int
                          ) -> tuple[dict[str, Any], ...]:
    return tuple(_load_problems(spec, dict(columns)))


def _load_problems(spec: str, columns: dict[str, str] | None) -> list[dict[str, Any]]:
    from data.generators import make_record
    from tasks.data_io import load_rows

    ds = load_rows(spec, columns or None, problem_validator(), normalize=False)
    out = []
    for row in ds:
        rec = make_record(row["question"], str(row["answer"]))
        if row.get("id") is not None:
            rec["id"] = str(row["id"])
        out.append(rec)
    return out


def write_problems(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Generator records (or problem rows) as a JSONL problem file `{"id", "question", "answer"}` per line."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": r["id"], "question": r["question"] if "question" in r else r["messages"][0]["content"],
                         "answer": r["answer"]}, ensure_ascii=False) + "\n" for r in rows]
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(p)
    return p


class GeneratedTaskDataset:
    """Groups of `GeneratedProblemEnv` for one `data.generators` task, or for problem files."""

    single_turn = True

    def __init__(self, task: str, task_kwargs: dict[str, Any] | None = None, n_train: int = 4000,
                 n_eval: int = 200, seed: int = 0, failure: FailureRewards | None = None,
                 system_prompt: str | None = None, train_file: str = "", eval_file: str = "",
                 columns: dict[str, str] | None = None) -> None:
        self.task, self.task_kwargs = task, dict(task_kwargs or {})
        self.n_train, self.n_eval, self.seed = n_train, n_eval, seed
        self.failure, self.system_prompt = failure or FailureRewards(), system_prompt
        self.train_file, self.eval_file, self.columns = train_file, eval_file, dict(columns or {})
        self.name = task

    @cached_property
    def train_rows(self) -> list[dict[str, Any]]:
        if self.train_file:
            return load_problems(self.train_file, self.columns)
        from data.generators import generate

        return list(generate(self.task, self.n_train, self.seed, "train", **self.task_kwargs))

    def eval_rows(self, n: int) -> list[dict[str, Any]]:
        """The first `n` held-out problems (all of an eval file's when it has fewer)."""
        if self.eval_file:
            return load_problems(self.eval_file, self.columns)[:n]
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
