"""Eval during training: run a (small) suite every N steps on the current weights.

Pruning hook: inside `listening(fn)`, every periodic evaluation calls `fn(step, metrics)` after logging; `fn`
may raise `TrialPruned` to stop the training (a sweep's pruner does, flows/sweep.py). The listener is a
contextvar, so it reaches the train task of a pipeline started in the same thread / Prefect task and nothing
else (a concurrent trial has its own); a training run in a child process (`train.subprocess`) does not see it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from evals.benchmarks import AnyBenchmark
from evals.protocols import EvalProtocol, Generator
from evals.runner import EvalResult, evaluate
from evals.store import ResultStore

LogFn = Callable[[dict[str, float], int], None]
Listener = Callable[[int, dict[str, float]], None]


class TrialPruned(Exception):
    """A listener stopped the training early (e.g. a sweep trial the pruner gave up on)."""

    no_retry = True  # the pipeline's retry condition skips it: a retry would be pruned again


eval_listener: ContextVar[Listener | None] = ContextVar("tuneloop_eval_listener", default=None)


@contextmanager
def listening(fn: Listener | None) -> Iterator[None]:
    """Periodic evaluations run inside call `fn(step, metrics)` (see the module docstring)."""
    token = eval_listener.set(fn)
    try:
        yield
    finally:
        eval_listener.reset(token)


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
        listener = eval_listener.get()
        if listener is not None:  # after logging: a pruned run's last evaluation is in MLflow too
            listener(step, metrics)
        return metrics
