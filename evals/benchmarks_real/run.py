"""Running suites that mix built-in, generative real and log-likelihood benchmarks; the CLI hooks.

`evaluate_suite` is `evals.runner.evaluate` plus log-likelihood multiple choice: generative and
perplexity benchmarks go through the existing runner unchanged, `LoglikMCBenchmark`s through
`evaluate_mc`, and all results land in one EvalResult and the same ResultStore layout, so
`tuneloop compare` pairs them like any other benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evals.benchmarks import AnyBenchmark
from evals.benchmarks_real.loaders import REAL_BENCHMARKS, real_benchmark
from evals.benchmarks_real.loglik import HFLoglikScorer, LoglikMCBenchmark, LoglikScorer, evaluate_mc
from evals.protocols import EvalProtocol, Generator
from evals.runner import EvalResult, evaluate
from evals.store import ResultStore

BUILTIN_PREFIX = "builtin:"


def is_real_benchmark(name: str) -> bool:
    return name in REAL_BENCHMARKS


def resolve_benchmark(name: str, *, n: int = 100, seed: int = 0, limit: int | None = None) -> Any:
    """A `--benchmarks` entry: a real benchmark by name (`limit` examples, all when None), else a built-in
    (`n` examples). `builtin:NAME` forces the built-in where both exist (the generated `ifeval`)."""
    from evals.builtin import builtin_benchmark

    if name.startswith(BUILTIN_PREFIX):
        return builtin_benchmark(name[len(BUILTIN_PREFIX):], n, seed)
    if name in REAL_BENCHMARKS:
        return real_benchmark(name, limit, seed)
    return builtin_benchmark(name, n, seed)


def scorer_for(generator: Generator) -> LoglikScorer:
    """The log-likelihood scorer for a generator: itself if it already is one, else its training_core client."""
    if hasattr(generator, "choice_logprobs"):
        return generator  # type: ignore[return-value]
    return HFLoglikScorer.from_generator(generator)


def evaluate_suite(generator: Generator | None, benchmarks: Sequence[Any], protocol: EvalProtocol,
                   store: ResultStore | str | Path | None = None, *, checkpoint: str | None = None,
                   batch_size: int = 64, progress: Callable[[str, int, int], None] | None = None,
                   scorer: LoglikScorer | None = None) -> EvalResult:
    """Evaluate a mixed list of benchmarks; the order of `benchmarks` is kept in the result."""
    st = ResultStore(store) if isinstance(store, str | Path) else store
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate benchmark names: {names}")
    mc = [b for b in benchmarks if isinstance(b, LoglikMCBenchmark)]
    other: list[AnyBenchmark] = [b for b in benchmarks if not isinstance(b, LoglikMCBenchmark)]
    if generator is None and (other or scorer is None):
        raise ValueError("a generator is needed for generative benchmarks (and for log-likelihood without a scorer)")
    ckpt = checkpoint or (generator.name if generator is not None else scorer.name)  # type: ignore[union-attr]
    parts = EvalResult(ckpt)
    if other:
        assert generator is not None
        parts = evaluate(generator, other, protocol, st, checkpoint=ckpt, batch_size=batch_size, progress=progress)
    if mc:
        sc = scorer or scorer_for(generator)  # type: ignore[arg-type]
        for b in mc:
            parts.benchmarks[b.name] = evaluate_mc(sc, b, st, checkpoint=ckpt, progress=progress)
    return EvalResult(ckpt, {n: parts.benchmarks[n] for n in names})


def cli_suite(names: list[str] | None, *, n: int = 100, seed: int = 0, limit: int | None = None) -> Any:
    """The Suite for `tuneloop eval/compare --benchmarks a,b --limit N`: no names gives the built-in default suite."""
    from evals.suite import Suite, default_suite

    if not names:
        return default_suite(None, n=n, seed=seed)
    return Suite(EvalProtocol(), [resolve_benchmark(x, n=n, seed=seed, limit=limit) for x in names])
