"""Hyperparameter sweeps whose winner is real, not noise: `tuneloop sweep sft|rl|dpo --config B --space S`.

Features:
- search by Optuna (grid, random, TPE samplers; median pruner on the pipeline's periodic eval), its study in
  Optuna's RDB storage on the project's database (MLflow on PostgreSQL: the same database, schema `optuna`;
  the embedded SQLite default: a `sweeps.db` file next to `mlflow.db`; see sweep_config.default_storage);
- each trial is a full pipeline run (the recipe's own flow, flows/sweep_config.RECIPES) with its own run name
  `<sweep id>-t<NNN>`, checkpoint and MLflow run, a child of the sweep's parent run; trials are Prefect tasks
  of the `sweep` flow, K at a time (ThreadPoolTaskRunner); a failed trial is recorded as failed (its pipeline
  tasks already retried) and the sweep goes on; a pruned one is recorded as pruned;
- selection bias handled: the data is materialised once, its eval rows split into a selection split (every
  trial's eval set: ranking and pruning) and a confirmation split no trial sees; at the end the winner and the
  runner-up are re-scored on the confirmation split, and that comparison (winner vs base, or vs the registry's
  champion) is the gate and the registry's promotion decision;
- a paired leaderboard of the trials (evals/leaderboard.py) and an HTML/PNG report (flows/sweep_report.py);
- resumable: the sweep id derives from recipe + base config + space, so rerunning the command continues the
  study; finished trials are not rerun, a trial left RUNNING by a killed sweep is run again under its own run
  name, so its pipeline resumes from its last checkpoint;
- no repeated work against running the trials by hand: a trial whose baseline is the base model itself gets the
  base's per-example results of an earlier finished trial with the same content key (`_base_key`: same model,
  eval examples and protocol) copied into its eval store, so its pipeline generates nothing for the base; the
  confirmation re-scoring reuses the trials' guard results (the guard examples are not split) and loads the
  base model once for all models (flows/sweep_report.py).

Trade-offs: concurrent trials share one process (the engine is in-process): on a 2-core machine --parallel 2
mostly interleaves. One sweep process at a time per sweep id (a file lock refuses a second one). Pruning needs
`train.eval_every > 0` and an in-process training run (the listener is a contextvar): SFT has that periodic
eval; the RL and DPO loops have none (their per-iteration metrics are training rewards / losses, not held-out
scores), so their trials are never pruned. The recipe-specific parts (split, pre-flight, confirmation
re-scoring, metric) are one `SweepRecipe` line each (flows/sweep_config.RECIPES).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.sweep_config import (
    SweepSpec,
    default_storage,
    load_attr,
    load_space,
    recipe,
    set_dotted,
    sweep_id_for,
    sweep_recipe,
)
from infra import tracking
from infra.config import BadInputError, from_dict, to_dict

SWEEP_TAG, TRIAL_TAG, STATE_TAG = "tuneloop.sweep_id", "tuneloop.trial", "tuneloop.trial_state"


@dataclass
class TrialRecord:
    number: int
    name: str
    run_dir: str
    params: dict[str, Any]
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING
    value: float | None = None
    mlflow_run_id: str = ""
    error: str = ""
    seconds: float = 0.0


@dataclass
class SweepResult:
    sweep_id: str
    sweep_dir: str
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialRecord]
    leaderboard: dict[str, Any]
    leaderboard_table: str
    winner: str
    runner_up: str | None
    winner_selection_score: float
    winner_confirmation_score: float
    winner_confirmation_ci: tuple[float, float]
    runner_up_confirmation_score: float | None
    base_confirmation_score: float
    confirmation_diff: float  # winner minus its gate baseline on the confirmation split
    confirmation_diff_ci: tuple[float, float]
    confirmation_p_value: float
    compared_against: str
    verdict: str
    gate_passed: bool
    model_version: str
    promoted: bool
    report_path: str
    seconds: float
    n_trials_run: int = 0  # trials this invocation ran (a resumed sweep skips the finished ones)
    extra: dict[str, Any] = field(default_factory=dict)


def _suggest(trial: Any, spec: SweepSpec) -> dict[str, Any]:
    out = {}
    for name, p in spec.params.items():
        if p.values is not None:
            out[name] = trial.suggest_categorical(name, p.values)
        elif p.type == "int":
            out[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            out[name] = trial.suggest_float(name, float(p.low), float(p.high), step=p.step, log=p.log)
    return out


def _grid_sampler_class() -> Any:
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler without its end-of-grid `study.stop()`, which only works inside
        `study.optimize`: the sweep uses ask/tell and stops at the grid size itself."""

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return GridSampler


def _GridSampler(*args: Any, **kw: Any) -> Any:  # noqa: N802 (a class, built lazily: optuna is heavy)
    return _grid_sampler_class()(*args, **kw)


def _study(spec: SweepSpec, sweep_id: str, storage: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.sampler == "grid":
        sampler = _GridSampler({k: p.grid_values() for k, p in spec.params.items()}, seed=spec.seed)
    elif spec.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(4, spec.trials))
    pruner = (optuna.pruners.NopPruner() if spec.pruner == "none" else
              optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials,
                                          n_warmup_steps=spec.pruner_warmup_steps))
    return optuna.create_study(study_name=sweep_id, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


@task(name="sweep-trial", retries=0, cache_policy=NO_CACHE)
def trial_task(recipe_name: str, config: dict[str, Any], run_name: str, parent_run_id: str, trial: Any,
               metric: str, steps: int) -> dict[str, Any]:
    """One pipeline run as a child of the sweep's run, reporting its periodic evals to the pruner."""
    from evals.periodic import TrialPruned, listening

    _, pipeline = recipe(recipe_name)
    t0 = time.time()

    def report(step: int, metrics: dict[str, float]) -> None:
        value = metrics.get(f"eval/{metric}")
        if value is None or step >= steps:  # the final eval is done anyway: pruning there saves nothing
            return
        trial.report(value, step)
        if trial.should_prune():
            raise TrialPruned(f"trial {trial.number} pruned at step {step} ({metric} {value:.3f})")

    try:
        with tracking.child_of(parent_run_id), listening(report):
            res = pipeline(config, run_name=run_name)
    except TrialPruned as e:
        return {"state": "PRUNED", "error": str(e), "seconds": time.time() - t0}
    except Exception as e:  # recorded, the sweep goes on (the pipeline's own tasks already retried)
        return {"state": "FAIL", "error": f"{type(e).__name__}: {e}", "seconds": time.time() - t0}
    return {"state": "COMPLETE", "value": res.tuned_score, "mlflow_run_id": res.mlflow_run_id,
            "seconds": time.time() - t0}


_NOT_BASE = ("rank", "lora_alpha", "seed", "train_mlp", "train_attn", "train_unembed")


def _base_key(cfg: dict[str, Any]) -> str | None:
    """Content key of a trial's baseline evaluation when the baseline is the base model itself (no init_from,
    no warm-up): the config without what only shapes training (train / rl sections, LoRA settings: B = 0 at
    init, the adapter does not change the base). Trials with the same key evaluate the same model on the same
    examples under the same protocol, so the first trial's stored results serve the others."""
    if cfg.get("init_from") or cfg.get("warmup", {}).get("steps", 0):
        return None
    c = {k: v for k, v in cfg.items() if k not in ("train", "rl", "name", "registry_model")}
    c["model"] = {k: v for k, v in cfg.get("model", {}).items() if k not in _NOT_BASE}
    return json.dumps(c, sort_keys=True, default=str)


def _steps(cfg: dict[str, Any]) -> int:
    """A trial's last training step (its final eval is not a pruning point): SFT/DPO steps, RL iterations."""
    return int(cfg.get("train", {}).get("steps", 0) or cfg.get("rl", {}).get("iterations", 0))


def _child_run_id(client: Any, exp_id: str, parent_id: str, run_dir: str) -> str:
    runs = client.search_runs([exp_id], f"tags.`{tracking.PARENT_TAG}` = '{parent_id}' and "
                              f"tags.`tuneloop.run_dir` = '{Path(run_dir).resolve()}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else ""


def _parent_run(client: Any, exp_id: str, sweep_id: str, spec: SweepSpec, recipe_name: str) -> str:
    runs = client.search_runs([exp_id], f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`tuneloop.role` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=sweep_id, tags={SWEEP_TAG: sweep_id, "tuneloop.role": "sweep",
                                                            "pipeline": f"sweep-{recipe_name}"})
    flat = tracking.flatten({"sampler": spec.sampler, "pruner": spec.pruner, "metric": spec.metric,
                             "confirmation_fraction": spec.confirmation_fraction, "seed": spec.seed,
                             "space": json.dumps(spec.to_dict()["params"], sort_keys=True)})
    for k, v in flat.items():
        client.log_param(run.info.run_id, k, v[:6000])
    return run.info.run_id


def _manifest(sweep_dir: Path, sweep_id: str, recipe_name: str, spec: SweepSpec, trials: list[TrialRecord],
              extra: dict[str, Any] | None = None) -> None:
    data = {"sweep_id": sweep_id, "recipe": recipe_name, "space": spec.to_dict(),
            "trials": [asdict(t) for t in sorted(trials, key=lambda t: t.number)], **(extra or {})}
    tmp = sweep_dir / "sweep.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(sweep_dir / "sweep.json")


@flow(name="sweep", log_prints=True)
def sweep_flow(recipe_name: str, config: dict[str, Any], space: dict[str, Any], sweep_id: str | None = None,
               ) -> SweepResult:
    """Run (or continue) a sweep; `config` is the recipe's base config as a dict, `space` a space.yaml dict."""
    t0 = time.time()
    import mlflow
    from optuna.trial import Trial, TrialState

    cfg_cls, _ = recipe(recipe_name)
    rcp = sweep_recipe(recipe_name)
    base = from_dict(cfg_cls, config)
    cfgd = to_dict(base)
    spec = load_space(None, **space)
    spec.metric = spec.metric or rcp.metric
    sweep_id = sweep_id or sweep_id_for(recipe_name, cfgd, spec)
    sweep_dir = Path(base.run_root).parent / "sweeps" / sweep_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = (sweep_dir / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BadInputError(f"sweep {sweep_id} is already running in another process ({sweep_dir})") from None
    # the confirmation split is written here but read only after the last trial (finish_sweep); an input the
    # recipe cannot split is refused before the MLflow parent run exists
    splits = load_attr(rcp.split)(base, sweep_dir / "data", spec.confirmation_fraction, spec.seed)
    overrides = splits.overrides
    uri = tracking.setup(base.tracking_uri, base.experiment)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp_id = mlflow.get_experiment_by_name(base.experiment).experiment_id
    parent_id = _parent_run(client, exp_id, sweep_id, spec, recipe_name)
    storage = spec.storage or default_storage(uri)
    study = _study(spec, sweep_id, storage)
    budget = min(spec.trials, spec.grid_size()) if spec.sampler == "grid" else spec.trials

    def trial_config(params: dict[str, Any]) -> dict[str, Any]:
        c = json.loads(json.dumps(cfgd))
        for k, v in {**overrides, **params}.items():
            set_dotted(c, k, v)
        return to_dict(from_dict(cfg_cls, c, where=f"sweep {sweep_id} trial config"))

    records: dict[int, TrialRecord] = {}
    for ft in study.trials:
        name = ft.user_attrs.get("run_name", f"{sweep_id}-t{ft.number:03d}")
        records[ft.number] = TrialRecord(ft.number, name, str(Path(base.run_root) / name), dict(ft.params),
                                         ft.state.name, ft.value, ft.user_attrs.get("mlflow_run_id", ""),
                                         ft.user_attrs.get("error", ""))
    # a trial a killed sweep left RUNNING is run again under its run name: its pipeline resumes its checkpoint
    resume = [Trial(study, ft._trial_id) for ft in study.trials if ft.state == TrialState.RUNNING]
    # the shared inputs (data, base model) are checked once before any trial: a bad one refuses the sweep;
    # each trial's pipeline still checks its own config (a trial-specific problem fails that trial only)
    load_attr(rcp.preflight)(from_dict(cfg_cls, trial_config({})), f"{sweep_id}-preflight")
    from evals.store import ResultStore
    from flows.sweep_report import reuse_results

    def base_dir(rec: TrialRecord) -> Path:
        return ResultStore(Path(rec.run_dir) / "eval").checkpoint_dir("base")

    # baseline results of finished trials by content key (see _base_key): later trials reuse, not regenerate
    base_results = {k: base_dir(r) for r in records.values() if r.state == "COMPLETE"
                    if (k := _base_key(trial_config(r.params))) is not None}
    pending: dict[Any, tuple[Any, Any, TrialRecord]] = {}
    n_run = 0
    while True:
        while len(pending) < spec.parallel and (resume or len(study.trials) < budget):
            trial = resume.pop(0) if resume else study.ask()
            params = _suggest(trial, spec)
            name = f"{sweep_id}-t{trial.number:03d}"
            trial.set_user_attr("run_name", name)
            cfg_t = trial_config(params)
            rec = TrialRecord(trial.number, name, str(Path(base.run_root) / name), params, "RUNNING")
            records[trial.number] = rec
            if (src := base_results.get(_base_key(cfg_t) or "")) is not None:
                reuse_results(src, Path(rec.run_dir) / "eval", "base")
            _manifest(sweep_dir, sweep_id, recipe_name, spec, list(records.values()))
            fut = trial_task.submit(recipe_name, cfg_t, name, parent_id, trial, spec.metric, _steps(cfg_t))
            pending[fut.wrapped_future] = (fut, trial, rec)
        if not pending:
            break
        done, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
        for f in done:
            fut, trial, rec = pending.pop(f)
            out = fut.result()
            rec.state, rec.error, rec.seconds = out["state"], out.get("error", ""), out["seconds"]
            rec.mlflow_run_id = out.get("mlflow_run_id") or _child_run_id(client, exp_id, parent_id, rec.run_dir)
            if not rec.mlflow_run_id:  # failed before its pipeline opened a run (e.g. its pre-flight check)
                run = client.create_run(exp_id, run_name=rec.name, tags={
                    tracking.PARENT_TAG: parent_id, "tuneloop.run_dir": str(Path(rec.run_dir).resolve()),
                    "error": rec.error[:5000]})
                client.set_terminated(run.info.run_id, "FAILED")
                rec.mlflow_run_id = run.info.run_id
            from mlflow.entities import RunTag

            client.log_batch(rec.mlflow_run_id, tags=[RunTag(SWEEP_TAG, sweep_id), RunTag(TRIAL_TAG, str(rec.number)),
                                                      RunTag(STATE_TAG, rec.state)])
            for k, v in (("mlflow_run_id", rec.mlflow_run_id), ("error", rec.error)):
                trial.set_user_attr(k, v)  # before tell: a finished trial cannot be updated
            if rec.state == "COMPLETE":
                rec.value = out["value"]
                if (bk := _base_key(trial_config(rec.params))) is not None:
                    base_results.setdefault(bk, base_dir(rec))
                study.tell(trial, rec.value)
            else:
                study.tell(trial, state=TrialState.PRUNED if rec.state == "PRUNED" else TrialState.FAIL)
            client.log_metric(parent_id, "trials_finished", float(sum(r.state != "RUNNING" for r in records.values())))
            n_run += 1
            _manifest(sweep_dir, sweep_id, recipe_name, spec, list(records.values()))
            print(f"trial {rec.number} {rec.state}: {rec.params} -> "
                  f"{'-' if rec.value is None else f'{rec.value:.3f}'} ({rec.seconds:.0f} s) {rec.error}")
    trials = sorted(records.values(), key=lambda t: t.number)
    t_end = time.time()
    from flows.sweep_report import finish_sweep

    result = finish_sweep(base, cfg_cls, trial_config, spec, sweep_id, sweep_dir, splits, trials, client, parent_id,
                          uri, t0, rescore=load_attr(rcp.rescore))
    result.n_trials_run = n_run
    result.extra["seconds_end"] = time.time() - t_end  # leaderboard + confirmation + registry + report
    _manifest(sweep_dir, sweep_id, recipe_name, spec, trials, {"result": asdict(result)})
    client.set_terminated(parent_id, "FINISHED")
    with contextlib.suppress(OSError):
        lock.close()
    return result


def run_sweep(recipe_name: str, config: dict[str, Any], space: dict[str, Any], sweep_id: str | None = None
              ) -> SweepResult:
    """The sweep flow with its concurrency (the task runner is fixed per flow call)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    k = load_space(None, **space).parallel
    return sweep_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=k))(recipe_name, config, space,
                                                                                   sweep_id)


def format_sweep_summary(r: SweepResult) -> str:
    lo, hi = r.winner_confirmation_ci
    clo, chi = r.confirmation_diff_ci
    states = {s: sum(t.state == s for t in r.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    rows = [
        ("sweep", f"{r.sweep_id} ({', '.join(f'{v} {k.lower()}' for k, v in states.items())})"),
        ("winner", r.winner),
        ("winner: selection score", f"{r.winner_selection_score:.3f}"),
        ("winner: confirmation score", f"{r.winner_confirmation_score:.3f}  [{lo:.3f}, {hi:.3f}]"),
        ("runner-up: confirmation", "-" if r.runner_up_confirmation_score is None
         else f"{r.runner_up_confirmation_score:.3f} ({r.runner_up})"),
        (f"confirmation: winner - {r.compared_against}", f"{r.confirmation_diff:+.3f}  [{clo:+.3f}, {chi:+.3f}]"
         f"  p={r.confirmation_p_value:.3g}"),
        ("verdict (confirmation split)", r.verdict.upper()),
        ("model version", f"{r.model_version or '-'} ({'champion' if r.promoted else 'not promoted'})"),
        ("report", r.report_path),
        ("MLflow parent run", r.parent_run_id),
        ("wall time", f"{r.seconds:.0f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)} | {v}" for k, v in rows)
