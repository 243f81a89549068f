"""Stages 3-6, shared by every recipe: store the checkpoint, evaluate, compare + gate, find the champion,
register (and promote) as Prefect tasks.

Recipe-agnostic: a config here is any pipeline config with `.model` (flows.sft_config.ModelConfig), `.eval`
(EvalConfig) and a renderer (`.data.renderer` or `.renderer`); the benchmarks come from the recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.base import retry_unless_bad_input, run_logger

# (checkpoint or None for the starting model, name, results_dir) -> evals.runner.EvalResult
EvalFn = Callable[[str | None, str, str], Any]


@task(name="store-checkpoint", retries=3, retry_delay_seconds=1)
def store_checkpoint_task(local_checkpoint: str, storage_uri: str, key: str) -> str:
    from infra.checkpoint_store import upload_committed_dir
    from infra.storage import open_storage

    st = open_storage(storage_uri)
    upload_committed_dir(st, local_checkpoint, key)
    uri = st.uri(key)
    run_logger().info("checkpoint committed at %s", uri)
    return uri


@task(name="evaluate", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
def evaluate_task(cfg: Any, benchmarks: Sequence[Any], checkpoint: str | None, name: str, results_dir: str,
                  extra: EvalFn | None = None) -> Any:
    """`benchmarks` through the sampler (evals.runner), plus `extra` (e.g. multi-turn env episodes) merged in;
    per-example results of both are stored in `results_dir` (a retried task resumes; a sweep's leaderboard and
    `tuneloop compare` read every benchmark from there)."""
    from evals.store import store_result
    from tasks.evaluate import evaluate_model

    res = evaluate_model(cfg, list(benchmarks), checkpoint, name, results_dir)
    if extra is not None:
        more = extra(checkpoint, name, results_dir)
        store_result(results_dir, name, more)
        res.benchmarks.update(more.benchmarks)
    run_logger().info("eval %s: %s", name, {k: round(v, 4) for k, v in res.means().items()})
    return res


def gate_policy(cfg: Any, targets: Sequence[str] = ("target",)) -> Any:
    from evals.compare import GatePolicy
    from tasks.evaluate import guard_names

    e = cfg.eval
    return GatePolicy(targets=list(targets), guards=guard_names(list(e.guards)), guard_margin=e.guard_margin,
                      guard_margins=dict(e.guard_margins), min_effect=e.min_effect, confidence=e.confidence,
                      n_bootstrap=e.bootstrap_resamples, seed=e.seed)


@task(name="compare", cache_policy=NO_CACHE)
def compare_task(cfg: Any, baseline: Any, tuned: Any, base: Any = None, targets: Sequence[str] = ("target",)) -> Any:
    """Gate `tuned` against `baseline` (the champion when there is one, else the starting model); `base`, when
    given besides a champion, is only an info row."""
    from evals.compare import compare

    return compare(baseline, tuned, gate_policy(cfg, targets), info_baselines=[base] if base is not None else [])


@task(name="find-champion", retries=2, retry_delay_seconds=1)
def champion_task(model: str, tracking_uri: str) -> tuple[str, str] | None:
    """(version, checkpoint URI) of the registered champion, or None (no registry model or no champion yet).

    A candidate that beats the base but not the champion must not replace the champion: when one exists it
    is the gate's baseline. Errors propagate: gating against the base by mistake would promote regressions.
    """
    if not model:
        return None
    from infra import registry

    return registry.get_champion(model, tracking_uri=tracking_uri)


@task(name="register", retries=2, retry_delay_seconds=1)
def register_task(model: str, run_id: str, ckpt_uri: str, tracking_uri: str, verdict: dict[str, Any],
                  gated_against: str | None = None, pipeline: str = "sft") -> tuple[str, bool]:
    """Register the checkpoint as a model version with its verdict; `champion` moves only if the gate passed
    against the champion version `gated_against` (None: there was no champion) and that is still champion."""
    if not model:
        return "", False
    from infra import registry

    version = registry.register_checkpoint(run_id, ckpt_uri, model, {"pipeline": pipeline}, tracking_uri=tracking_uri)
    registry.set_verdict_tags(model, version, verdict, tracking_uri=tracking_uri)
    promoted = registry.promote_if_passed(model, version, bool(verdict["gate_passed"]), tracking_uri=tracking_uri,
                                          gated_against=gated_against)
    run_logger().info("registered %s version %s (%s)", model, version,
                      "promoted to champion" if promoted else "champion unchanged")
    return version, promoted
