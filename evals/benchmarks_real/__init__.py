"""Real benchmarks (GSM8K, MATH-500, HumanEval, MBPP, MMLU, ARC, HellaSwag, PIQA, IFEval), loaded offline
from installed packages' files and scored the way the field does. See evals/BENCHMARKS.md.

    from evals.benchmarks_real import real_benchmark, evaluate_suite
    bench = real_benchmark("mmlu", limit=200, seed=0)   # seeded, stratified subset

The data packages are the optional `benchmarks` extra; a missing one raises MissingBenchmarkExtra
naming it. Importing this package imports none of them.
"""

from evals.benchmarks_real._data import MissingBenchmarkExtra, stratified_subset
from evals.benchmarks_real.loaders import REAL_BENCHMARKS, RealBenchmark, real_benchmark
from evals.benchmarks_real.loglik import HFLoglikScorer, LoglikMCBenchmark, evaluate_mc, mc_metrics
from evals.benchmarks_real.run import (
    cli_suite,
    evaluate_suite,
    is_real_benchmark,
    resolve_benchmark,
    scorer_for,
)

__all__ = [
    "REAL_BENCHMARKS", "HFLoglikScorer", "cli_suite", "LoglikMCBenchmark", "MissingBenchmarkExtra", "RealBenchmark",
    "evaluate_mc", "evaluate_suite", "is_real_benchmark", "mc_metrics", "real_benchmark", "resolve_benchmark",
    "scorer_for", "stratified_subset",
]
