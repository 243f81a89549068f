"""Guard suite against forgetting: items the base model already gets right, plus held-out text perplexity.

A fine-tune that breaks what the base could do shows up as "broken" flips on these items (cluster 5);
selecting them by running the base once and freezing the result on disk keeps the suite stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evals.benchmarks import AnyBenchmark, Benchmark, PerplexityBenchmark, load_benchmark, save_benchmark
from evals.builtin import heldout_text
from evals.protocols import EvalProtocol, Generator
from evals.runner import evaluate
from evals.store import ResultStore


def build_guard_suite(base: Generator, candidates: Sequence[Benchmark], protocol: EvalProtocol, *,
                      max_per_benchmark: int = 100, min_per_benchmark: int = 10,
                      heldout: PerplexityBenchmark | None = None, save_dir: str | Path | None = None,
                      store: ResultStore | str | Path | None = None, batch_size: int = 64) -> list[AnyBenchmark]:
    """Run `base` on the candidates and keep the items it solves (score 1), as `guard_<name>` benchmarks.

    Raises when the base solves fewer than `min_per_benchmark` items of a candidate: a guard that small
    cannot detect forgetting. With `save_dir` the suite is frozen (rows + grader) for later runs.
    """
    result = evaluate(base, list(candidates), protocol, store, checkpoint=f"guard-selection:{base.name}",
                      batch_size=batch_size)
    suite: list[AnyBenchmark] = []
    for bench in candidates:
        scores = result.benchmarks[bench.name].scores()
        kept = [ex for ex in bench.examples if scores[ex.id] >= 1.0][:max_per_benchmark]
        if len(kept) < min_per_benchmark:
            raise ValueError(f"guard suite: base model {base.name!r} solves only {len(kept)} of {len(bench)} "
                             f"items of {bench.name!r} (need >= {min_per_benchmark}); use more candidates "
                             f"or an easier benchmark")
        suite.append(Benchmark(f"guard_{bench.name}", kept, bench.grader, max_tokens=bench.max_tokens,
                               stop=bench.stop, description=f"items of {bench.name} the base model solves"))
    suite.append(heldout if heldout is not None else heldout_text(100, seed=1))
    if save_dir is not None:
        for b in suite:
            save_benchmark(b, save_dir)
    return suite


def load_guard_suite(save_dir: str | Path) -> list[AnyBenchmark]:
    d = Path(save_dir)
    names = sorted(p.stem for p in d.glob("*.json"))
    if not names:
        raise FileNotFoundError(f"{d}: no saved guard benchmarks")
    return [load_benchmark(d, n) for n in names]
