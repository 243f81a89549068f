"""Evaluation of RL environments for the flow: the held-out problems as an evals Benchmark (single-turn envs:
greedy pass@1 through evals.runner) and held-out episodes rolled out through any env, multi-turn included
(an evals.runner.EvalResult the paired compare accepts; pass@k when num_samples > 1)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from envs.base import RLDataset
from recipes.rl import _n_initial, rollout_groups
from recipes.rl_config import RLConfig
from training_core import types


def eval_benchmark(cfg: RLConfig, n: int, name: str = "target") -> Any:
    """Single-turn envs: the held-out problems as an evals Benchmark graded by the env's own check."""
    import dataclasses

    from envs.registry import build_dataset

    ds: RLDataset = build_dataset(cfg.env)
    if not ds.single_turn:
        raise ValueError(f"env {cfg.env.name!r} is multi-turn: evaluate it with eval_episodes")
    bench = ds.eval_benchmark(n, name)  # type: ignore[attr-defined]
    return dataclasses.replace(bench, max_tokens=bench.max_tokens or cfg.env.max_tokens)


def eval_episodes(cfg: RLConfig, sampler: Any, checkpoint: str, n: int | None = None, temperature: float = 0.0,
                  num_samples: int = 1, seed: int = 0, name: str = "target") -> Any:
    """Roll out held-out episodes (any env, multi-turn included) -> an `evals.runner.EvalResult` whose one
    benchmark `name` scores each problem by its mean correctness over `num_samples` episodes
    (`BenchmarkResult.pass_at` gives pass@k); paired with another model's by `evals.compare.compare`."""
    from envs.registry import build_dataset, failure_rewards
    from evals.protocols import EvalProtocol
    from evals.runner import BenchmarkResult, EvalResult
    from evals.store import ExampleRecord
    from training_core.renderers import get_renderer

    ds = build_dataset(cfg.env)
    builders = ds.eval_builders(n or cfg.eval.n_examples)
    renderer = get_renderer(cfg.env.renderer, sampler.get_tokenizer())
    params = types.SamplingParams(max_tokens=cfg.env.max_tokens, temperature=temperature, seed=seed)
    ctx = cfg.env.max_context or sampler._engine.base.max_length  # noqa: SLF001
    groups = rollout_groups(sampler, renderer, builders, num_samples, params, ctx, failure_rewards(cfg.env),
                            max_turns=cfg.env.max_turns + 1)
    proto = EvalProtocol(renderer=cfg.env.renderer, max_tokens=cfg.env.max_tokens, temperature=temperature,
                         seed=seed, num_samples=num_samples, grader=f"env:{ds.name}", grader_version="1",
                         extra={"max_turns": str(cfg.env.max_turns), "system_prompt": cfg.env.system_prompt})
    phash = proto.hash()
    records = {}
    for b, eps in zip(builders, groups, strict=True):
        scores = [ep.metrics.get("correct", 0.0) for ep in eps]
        records[b.problem_id] = ExampleRecord(
            example_id=b.problem_id, benchmark=name, checkpoint=checkpoint, protocol_hash=phash,
            prompt=json.dumps(eps[0].messages[:_n_initial(eps[0])]), output=json.dumps(eps[0].messages[_n_initial(eps[0]):]),
            extracted=str(eps[0].logs[-1].get("extracted")) if eps[0].logs else None, score=sum(scores) / len(scores),
            samples=[json.dumps(ep.messages[_n_initial(ep):]) for ep in eps] if num_samples > 1 else [],
            sample_scores=scores, extra={"reward": [ep.reward for ep in eps], "failure": [ep.failure for ep in eps]})
    dhash = hashlib.sha256(",".join(sorted(records)).encode()).hexdigest()[:16]
    br = BenchmarkResult(name, "generate", checkpoint, proto, phash, dhash, len(records), records)
    return EvalResult(checkpoint, {name: br})
