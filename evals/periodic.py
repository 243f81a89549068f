"""Eval during training: run a (small) suite every N steps on the current weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from evals.benchmarks import AnyBenchmark
from evals.protocols import EvalProtocol, Generator
from evals.runner import EvalResult, evaluate
from evals.store import ResultStore

LogFn = Callable[[dict[str, float], int], None]


class PeriodicEvaluator:
    """`maybe_run(step, generator)` evaluates at every `every_n_steps`-th step and returns metrics.

    Metrics are `{"eval/<benchmark>": mean score}` plus `eval/<benchmark>/ci_low|ci_high` and, for
    perplexity benchmarks, `eval/<benchmark>/ppl`. `log_fn(metrics, step)` is called with them
    (e.g. `lambda m, s: mlflow.log_metrics(m, step=s)`). With `store`, per-example results are kept
    under checkpoint name `<run_name>/step-<step>` so any two steps can be compared later.
    """

    def __init__(self, benchmarks: Sequence[AnyBenchmark], every_n_steps: int, protocol: EvalProtocol | None = None,
                 *, store: ResultStore | str | Path | None = None, log_fn: LogFn | None = None,
                 run_name: str = "train", run_at_step_zero: bool = False, batch_size: int = 64) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.benchmarks = list(benchmarks)
        self.every_n_steps = every_n_steps
        self.protocol = protocol or EvalProtocol()
        self.store = ResultStore(store) if isinstance(store, str | Path) else store
        self.log_fn = log_fn
        self.run_name = run_name
        self.run_at_step_zero = run_at_step_zero
        self.batch_size = batch_size
        self.history: dict[int, EvalResult] = {}

    def should_run(self, step: int) -> bool:
        if step == 0:
            return self.run_at_step_zero
        return step % self.every_n_steps == 0

    def maybe_run(self, step: int, generator: Generator) -> dict[str, float] | None:
        if not self.should_run(step):
            return None
        result = evaluate(generator, self.benchmarks, self.protocol, self.store,
                          checkpoint=f"{self.run_name}/step-{step}", batch_size=self.batch_size)
        self.history[step] = result
        metrics: dict[str, float] = {}
        for name, br in result.benchmarks.items():
            s = br.summary()
            metrics[f"eval/{name}"] = float(s["mean"])
            metrics[f"eval/{name}/ci_low"] = float(s["ci_low"])
            metrics[f"eval/{name}/ci_high"] = float(s["ci_high"])
            if "perplexity" in s:
                metrics[f"eval/{name}/ppl"] = float(s["perplexity"])
        if self.log_fn is not None:
            self.log_fn(metrics, step)
        return metrics
