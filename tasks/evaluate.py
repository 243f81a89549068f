"""Stage 4: evaluate the base model and a checkpoint on the same examples, sampled by training_core."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from evals.benchmarks import Benchmark, Example
from evals.graders import make_grader
from evals.protocols import EvalProtocol
from evals.runner import EvalResult
from training_core import ServiceClient
from training_core.textgen import SamplingGenerator

log = logging.getLogger(__name__)
# Matches the generators' fixed answer format ("Answer: 432"); user data can pick any grader.
DEFAULT_GRADER = {"type": "regex", "pattern": r"Answer:[ \t]*([^\n]*?)\.?[ \t]*$"}


def target_benchmark(eval_path: str, n: int, name: str = "target") -> Benchmark:
    rows = [json.loads(x) for x in Path(eval_path).read_text().splitlines() if x.strip()][:n]
    examples = [Example.make(r["messages"][:-1], r["answer"], {"row_id": r["id"]}) for r in rows]
    return Benchmark(name, examples, make_grader(DEFAULT_GRADER), description="held-out split of the training task")


def guard_benchmarks(cfg: Any) -> list[Any]:
    """The configured guards: built-ins (generated) and real benchmarks by name (evals/benchmarks_real: e.g.
    arc_easy, hellaswag by log-likelihood, a seeded stratified subset of `guard_examples`); `builtin:NAME`
    picks the built-in where both exist (ifeval)."""
    from evals.benchmarks_real.run import resolve_benchmark

    n = cfg.eval.guard_examples
    return [resolve_benchmark(name, n=n, seed=cfg.eval.seed, limit=n) for name in cfg.eval.guards]


def renderer_of(cfg: Any) -> str:
    """The renderer of any recipe's config: `.data.renderer` (SFT), `.env.renderer` (RL) or `.renderer`."""
    for section in ("data", "env"):
        r = getattr(getattr(cfg, section, None), "renderer", None)
        if r:
            return str(r)
    return str(cfg.renderer)


def unknown_guards(guards: list[str]) -> list[str]:
    """Guard names that are neither a built-in nor a real benchmark (pre-flight refuses them)."""
    from evals.benchmarks_real.loaders import REAL_BENCHMARKS
    from evals.builtin import BUILTIN

    return [g for g in guards if g.removeprefix("builtin:") not in BUILTIN and g not in REAL_BENCHMARKS]


def guard_names(guards: list[str]) -> list[str]:
    """The benchmark names the guards' results carry (`builtin:ifeval` -> `ifeval`)."""
    return [g.removeprefix("builtin:") for g in guards]


def eval_protocol(cfg: Any) -> EvalProtocol:
    e = cfg.eval
    return EvalProtocol(renderer=renderer_of(cfg), max_tokens=e.max_tokens, temperature=e.temperature,
                        top_p=e.top_p, seed=e.seed)


def make_generator(service: ServiceClient, base_model: str, checkpoint: str | None, name: str,
                   renderer: str, batch_size: int) -> SamplingGenerator:
    client = (service.create_sampling_client(model_path=checkpoint) if checkpoint
              else service.create_sampling_client(base_model=base_model))
    return SamplingGenerator(client, name, renderer=renderer, batch_size=batch_size)


def evaluate_model(cfg: Any, benchmarks: list[Any], checkpoint: str | None, name: str,
                   results_dir: str | Path, service: ServiceClient | None = None) -> EvalResult:
    service = service or ServiceClient(compute_dtype=cfg.model.compute_dtype)
    gen = make_generator(service, cfg.model.base_model, checkpoint, name, renderer_of(cfg), cfg.eval.batch_size)
    from tqdm.auto import tqdm

    from evals.benchmarks_real.run import evaluate_suite

    bars: dict[str, Any] = {}

    def progress(bench: str, done: int, total: int) -> None:
        # initial=done: results already stored (or the first batch) are not counted as instant progress,
        # which showed rates of millions of it/s
        bar = bars.get(bench) or bars.setdefault(bench, tqdm(total=total, initial=done, desc=f"eval {name}/{bench}",
                                                             dynamic_ncols=True))
        bar.update(done - bar.n)

    # evaluate_suite = evals.runner.evaluate + log-likelihood multiple choice (real MC guards), one store
    res = evaluate_suite(gen, benchmarks, eval_protocol(cfg), results_dir, checkpoint=name,
                         batch_size=cfg.eval.batch_size, progress=progress)
    for b in bars.values():
        b.close()
    return res
