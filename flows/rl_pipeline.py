"""The RL pipeline as a Prefect flow: start weights -> RL iterations -> checkpoint -> evaluate -> compare -> track.

Features: the RL loop of recipes/rl.py (GRPO-style group baselines, sampler logprobs, optional KL to the start,
optional one-step-off-policy overlap) with resumable iteration checkpoints (a retried task repeats no update);
the start is `init_from` (e.g. an SFT run's checkpoint), else a short SFT warm-up trained in this run, else the
base model, and the verdict is always against that start (RL must beat where it started, not the base); eval =
the env's held-out problems (generated, or `env.eval_file`; training problems from `env.train_file`, any format of
tasks.data_io, validated in the pre-flight check) greedy (pass@1, the gated target) + the same problems sampled at the training
temperature (`target_sampled`: mean correctness over `PASS_K` samples, pass@k in the report) + the guards.
Per-iteration metrics go to MLflow, rollout transcripts (JSONL per iteration) are artifacts. Everything after
training is flows/common.finish_run, shared with the SFT flow. Trade-off: the evaluation is single-process and
greedy pass@1 is the only gated number.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import PipelineResult, finish_run, open_run
from infra import tracking
from infra.config import from_dict
from recipes.common import adopt_init_from
from recipes.rl_config import RLConfig
from tasks.evaluate import guard_benchmarks
from tasks.train_stage import rl_start_task, rl_train_task

PASS_K = 4  # samples per held-out problem at the training temperature (pass@1..4 in the report)


def check_rl_run(cfg: RLConfig, run_name: str) -> bool:
    """Every input before anything is written (bad input: PreflightError, exit 2); True: the run resumes."""
    from envs.registry import build_dataset
    from evals.builtin import BUILTIN
    from flows.preflight import PreflightError, check_checkpoint, check_model, check_run_name
    from tasks.evaluate import unknown_guards

    resumes = check_run_name(cfg, run_name)  # type: ignore[arg-type]  # uses run_root only
    check_model(cfg.model.base_model)
    if cfg.init_from:
        check_checkpoint(cfg.init_from)
    try:
        ds = build_dataset(cfg.env)
    except (KeyError, ValueError, TypeError) as e:
        raise PreflightError(f"env.name={cfg.env.name}: {e}") from None
    check_problem_files(cfg, ds)
    if not cfg.init_from and cfg.warmup.steps > 0 and cfg.env.name not in ("arithmetic", "tool_calc"):
        raise PreflightError(f"env.name={cfg.env.name}: no SFT warm-up data for this env; set init_from "
                             f"(e.g. an SFT checkpoint) or warmup.steps=0")
    if unknown := unknown_guards(list(cfg.eval.guards)):
        raise PreflightError(f"eval.guards={list(cfg.eval.guards)}: unknown {unknown}; known: {sorted(BUILTIN)} "
                             f"and the real benchmarks (evals/BENCHMARKS.md)")
    if ds.single_turn is False and cfg.env.max_turns < 2:
        raise PreflightError(f"env.max_turns={cfg.env.max_turns}: the multi-turn env {cfg.env.name} needs >= 2")
    return resumes


def check_problem_files(cfg: RLConfig, ds: Any) -> None:
    """env.train_file / env.eval_file: every row validated (errors name file, line / row and field) and no
    held-out question also a training one."""
    from flows.preflight import PreflightError

    e = cfg.env
    if not (e.train_file or e.eval_file):
        return
    if e.name != "arithmetic":
        raise PreflightError(f"env.train_file / env.eval_file: problem files feed the arithmetic env, not "
                             f"env.name={e.name}")
    train, held = ds.train_rows, ds.eval_rows(cfg.eval.n_examples)  # BadInputError naming the bad row
    seen = {r["messages"][0]["content"] for r in train}
    if leak := [r["messages"][0]["content"] for r in held if r["messages"][0]["content"] in seen]:
        raise PreflightError(f"{e.eval_file or 'the generated eval problems'}: {len(leak)} held-out question(s) "
                             f"are also training problems ({e.train_file or 'generated'}), e.g. {leak[0]!r}")


def _episode_eval(cfg: RLConfig) -> Any:
    """Held-out episodes through the env (multi-turn: the target itself; always: the sampled pass@k row)."""
    from recipes.rl_eval import eval_episodes
    from training_core import ServiceClient

    def run(checkpoint: str | None, name: str, results_dir: str) -> Any:
        from evals.runner import EvalResult

        svc = ServiceClient(compute_dtype=cfg.model.compute_dtype)
        sampler = (svc.create_sampling_client(model_path=checkpoint) if checkpoint
                   else svc.create_sampling_client(base_model=cfg.model.base_model))
        out = EvalResult(name)
        n = cfg.eval.n_examples
        if not _single_turn(cfg):
            out.benchmarks.update(eval_episodes(cfg, sampler, name, n=n, temperature=0.0).benchmarks)
        out.benchmarks.update(eval_episodes(cfg, sampler, name, n=n, temperature=cfg.rl.temperature,
                                            num_samples=PASS_K, seed=cfg.eval.seed, name="target_sampled").benchmarks)
        return out

    return run


def _single_turn(cfg: RLConfig) -> bool:
    from envs.registry import build_dataset

    return bool(build_dataset(cfg.env).single_turn)


@flow(name="rl-pipeline", log_prints=True)
def rl_pipeline(config: dict[str, Any], run_name: str | None = None, checked: bool = False) -> PipelineResult:
    """`checked`: the caller already ran check_rl_run (the CLI does, before the flow starts)."""
    cfg = from_dict(RLConfig, config)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with open_run(cfg, run_name, "rl", check=None if checked else (lambda: check_rl_run(cfg, run_name)),
                  adopt=lambda d: bool(adopt_init_from(cfg, d))) as rc:
        start = rl_start_task(rc.cfgd, str(rc.run_dir))
        with tracking.run("train", nested=True, key="train") as tr:
            tracking.log_params({"start_checkpoint": start or f"base:{cfg.model.base_model}"})
            train = rl_train_task(rc.cfgd, str(rc.run_dir), tr.info.run_id)
            tracking.log_artifact(train.metrics_path)
            rollouts = Path(rc.run_dir) / "rollouts"
            if rollouts.is_dir():
                tracking.log_artifact(rollouts, "rollouts")
        from recipes.rl_eval import eval_benchmark

        benches = [eval_benchmark(cfg, cfg.eval.n_examples)] if _single_turn(cfg) else []
        return finish_run(rc, checkpoint=train.checkpoint, benchmarks=[*benches, *guard_benchmarks(cfg)],
                          curve=train.loss_history, curve_name="mean reward", extra_eval=_episode_eval(cfg),
                          start_checkpoint=start)
