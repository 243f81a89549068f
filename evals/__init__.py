"""Evaluation layer: pinned protocols, batched resumable evals, paired statistics, gate, reports.

Entry points the pipeline calls: `evaluate(generator, benchmarks, protocol, store) -> EvalResult`,
`compare(result_a, result_b, gate) -> ComparisonReport`, `format_verdict_table(report) -> str`.
"""

from evals.benchmarks import (
    Benchmark,
    BenchmarkFormatError,
    Example,
    PerplexityBenchmark,
    load_jsonl_benchmark,
)
from evals.compare import ComparisonReport, GatePolicy, GateResult, compare, format_verdict_table
from evals.protocols import EvalProtocol, Generator, ProtocolMismatchError
from evals.runner import BenchmarkResult, EvalResult, evaluate, load_eval_result
from evals.store import ResultStore

__all__ = [
    "Benchmark", "BenchmarkFormatError", "BenchmarkResult", "ComparisonReport", "EvalProtocol", "EvalResult",
    "Example", "GatePolicy", "GateResult", "Generator", "PerplexityBenchmark", "ProtocolMismatchError",
    "ResultStore", "compare", "evaluate", "format_verdict_table", "load_eval_result", "load_jsonl_benchmark",
]
