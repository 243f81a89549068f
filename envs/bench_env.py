"""Adapter: any code-graded `evals` benchmark (evals/builtin.py, evals/benchmarks_real) as a single-turn env.

- The reward is the benchmark's own grader (`Benchmark.grader.grade(output, target, meta)`): the same code
  scores training rollouts and the evaluation, so RL optimises exactly the metric that is reported.
  `check_answer` is `score >= pass_threshold` (1.0: the grader's full credit); the reward is the score itself
  (graders with partial credit give a shaped reward). `check_format` is "the grader extracted an answer".
- Its examples are split by a salted hash of the example id into train (RL problems) and held-out (eval)
  parts, `eval_percent` % held out, so training never sees an evaluated example. `eval_benchmark` returns
  the held-out part as a `Benchmark` with the original grader, max_tokens and stop strings.
- Perplexity benchmarks (no grader) and graders that need a sandbox are accepted only if they grade text:
  a perplexity benchmark is refused with a clear error.

Trade-off: the split halves small benchmarks' eval sets; pass `eval_percent=100` to hold every example out
(evaluation only) or train on another benchmark and use this one as a guard.
"""

from __future__ import annotations

import hashlib
from typing import Any

from envs.base import EnvGroupBuilder, FailureRewards, ProblemEnv, StepResult
from evals.benchmarks import Benchmark, Example


class BenchmarkProblemEnv(ProblemEnv):
    def __init__(self, bench: Benchmark, example: Example, failure: FailureRewards | None = None,
                 pass_threshold: float = 1.0) -> None:
        super().__init__(failure)
        self.bench, self.example, self.pass_threshold = bench, example, pass_threshold

    def initial_observation(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.example.messages]

    def get_question(self) -> str:
        return self.example.prompt_text()

    @property
    def reference_answer(self) -> str:
        return str(self.example.target)

    def _grade(self, text: str) -> tuple[str | None, float]:
        g = self.bench.grader.grade(text, self.example.target, self.example.meta)
        return g.extracted, g.score

    def check_answer(self, text: str) -> bool:
        return self._grade(text)[1] >= self.pass_threshold

    def check_format(self, text: str) -> bool:
        return self._grade(text)[0] is not None

    def step(self, message: dict[str, str]) -> StepResult:
        if self._done:
            raise RuntimeError("BenchmarkProblemEnv is single-use: step() after the episode ended")
        self._done = True
        extracted, score = self._grade(message.get("content", ""))  # one grading (code graders may be slow)
        logs = {"reference": self.reference_answer, "extracted": extracted}
        if extracted is None and score == 0.0:
            return StepResult(self.failure.unparseable, True, metrics={"correct": 0.0, "unparseable": 1.0}, logs=logs)
        return StepResult(float(score), True, metrics={"correct": float(score >= self.pass_threshold)}, logs=logs)


def is_heldout(example_id: str, bench_name: str, eval_percent: int) -> bool:
    h = int(hashlib.sha256(f"tuneloop-rl-split/{bench_name}/{example_id}".encode()).hexdigest()[:8], 16)
    return h % 100 < eval_percent


class BenchmarkDataset:
    single_turn = True

    def __init__(self, bench: Benchmark, seed: int = 0, eval_percent: int = 50,
                 failure: FailureRewards | None = None, pass_threshold: float = 1.0) -> None:
        if not isinstance(bench, Benchmark) or bench.kind != "generate":
            raise ValueError(f"benchmark {getattr(bench, 'name', bench)!r} is not a graded generation benchmark; "
                             "perplexity benchmarks cannot be RL environments")
        self.bench, self.seed, self.failure, self.pass_threshold = bench, seed, failure or FailureRewards(), pass_threshold
        self.name = f"bench:{bench.name}"
        self.train_examples = [e for e in bench.examples if not is_heldout(e.id, bench.name, eval_percent)]
        self.eval_examples = [e for e in bench.examples if is_heldout(e.id, bench.name, eval_percent)]
        if not self.train_examples or not self.eval_examples:
            raise ValueError(f"benchmark {bench.name!r}: {len(self.train_examples)} train / "
                             f"{len(self.eval_examples)} held-out examples; need both (change eval_percent or n)")
        self.max_tokens = bench.max_tokens
        self.stop = bench.stop

    def _builder(self, ex: Example) -> EnvGroupBuilder:
        return EnvGroupBuilder(lambda: BenchmarkProblemEnv(self.bench, ex, self.failure, self.pass_threshold),
                               problem_id=ex.id, tags={"benchmark": self.bench.name})

    def batch(self, iteration: int, groups_per_batch: int) -> list[EnvGroupBuilder]:
        from recipes.sft import batch_indices

        idx = batch_indices(iteration, groups_per_batch, len(self.train_examples), self.seed)
        return [self._builder(self.train_examples[i]) for i in idx]

    def eval_builders(self, n: int) -> list[EnvGroupBuilder]:
        return [self._builder(e) for e in self.eval_examples[:n]]

    def eval_benchmark(self, n: int, name: str = "target") -> Benchmark:
        return Benchmark(name, self.eval_examples[:n], self.bench.grader, max_tokens=self.bench.max_tokens,
                         stop=self.bench.stop, description=f"held-out part of {self.bench.name}")


def dataset_from_benchmark(name: str, n: int = 200, seed: int = 0, **kwargs: Any) -> BenchmarkDataset:
    """A built-in benchmark by name (evals.builtin.builtin_benchmark) as an RL dataset."""
    from evals.builtin import builtin_benchmark

    bench = builtin_benchmark(name, n, seed=seed)
    return BenchmarkDataset(bench, seed=seed, **kwargs)  # type: ignore[arg-type]
