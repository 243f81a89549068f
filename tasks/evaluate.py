"""Stage 4: evaluate the base model and a checkpoint on the same examples, sampled by training_core."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from evals.benchmarks import Benchmark, Example
from evals.graders import make_grader
from evals.protocols import EvalProtocol
from evals.runner import EvalResult, evaluate
from flows.sft_config import PipelineConfig
from training_core import ServiceClient
from training_core.textgen import SamplingGenerator

log = logging.getLogger(__name__)
# Matches the generators' fixed answer format ("Answer: 432"); user data can pick any grader.
DEFAULT_GRADER = {"type": "regex", "pattern": r"Answer:[ \t]*([^\n]*?)\.?[ \t]*$"}


def target_benchmark(eval_path: str, n: int, name: str = "target") -> Benchmark:
    rows = [json.loads(x) for x in Path(eval_path).read_text().splitlines() if x.strip()][:n]
    examples = [Example.make(r["messages"][:-1], r["answer"], {"row_id": r["id"]}) for r in rows]
    return Benchmark(name, examples, make_grader(DEFAULT_GRADER), description="held-out split of the training task")


def guard_benchmarks(cfg: PipelineConfig) -> list[Any]:
    from evals.builtin import builtin_benchmark

    return [builtin_benchmark(name, cfg.eval.guard_examples, seed=cfg.eval.seed) for name in cfg.eval.guards]


def eval_protocol(cfg: PipelineConfig) -> EvalProtocol:
    e = cfg.eval
    return EvalProtocol(renderer=cfg.data.renderer, max_tokens=e.max_tokens, temperature=e.temperature,
                        top_p=e.top_p, seed=e.seed)


def make_generator(service: ServiceClient, base_model: str, checkpoint: str | None, name: str,
                   renderer: str, batch_size: int) -> SamplingGenerator:
    client = (service.create_sampling_client(model_path=checkpoint) if checkpoint
              else service.create_sampling_client(base_model=base_model))
    return SamplingGenerator(client, name, renderer=renderer, batch_size=batch_size)


def evaluate_model(cfg: PipelineConfig, benchmarks: list[Any], checkpoint: str | None, name: str,
                   results_dir: str | Path, service: ServiceClient | None = None) -> EvalResult:
    service = service or ServiceClient(compute_dtype=cfg.model.compute_dtype)
    gen = make_generator(service, cfg.model.base_model, checkpoint, name, cfg.data.renderer, cfg.eval.batch_size)
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def progress(bench: str, done: int, total: int) -> None:
        # initial=done: results already stored (or the first batch) are not counted as instant progress,
        # which showed rates of millions of it/s
        bar = bars.get(bench) or bars.setdefault(bench, tqdm(total=total, initial=done, desc=f"eval {name}/{bench}",
                                                             dynamic_ncols=True))
        bar.update(done - bar.n)

    res = evaluate(gen, benchmarks, eval_protocol(cfg), results_dir, checkpoint=name,
                   batch_size=cfg.eval.batch_size, progress=progress)
    for b in bars.values():
        b.close()
    return res
