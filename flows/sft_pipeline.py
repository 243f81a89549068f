"""The SFT pipeline as a Prefect flow: prepare data -> train -> checkpoint -> evaluate -> compare -> track.

Features: cached + validated data prep; LoRA SFT through training_core with atomic resumable checkpoints (a
retried train task resumes, never repeating an optimizer step); finished checkpoints committed to storage
(`file://` or `s3://`); base vs trained on the same eval examples; a paired verdict with a bootstrap CI; the
full config, per-step metrics, results and verdict in MLflow. Trade-off: training runs in the flow's process
(the engine is in-process); multi-process training goes through the DeepSpeed backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.sft_config import PipelineConfig
from infra import tracking
from infra.config import from_dict, to_dict
from tasks.evaluate import evaluate_model, guard_benchmarks, target_benchmark
from tasks.prepare_data import DatasetInfo, prepare_dataset, resolve_replay
from tasks.train import TrainResult, adopt_init_from, train_sft

log = logging.getLogger(__name__)


class RunExistsError(RuntimeError):
    pass


@dataclass
class PipelineResult:
    run_name: str
    run_dir: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_uri: str
    local_checkpoint: str
    base_score: float
    tuned_score: float
    diff: float
    diff_ci: tuple[float, float]
    p_value: float
    verdict: str
    gate_passed: bool
    verdict_table: str
    report_path: str
    model_version: str
    promoted: bool
    train_loss_first: float
    train_loss_last: float
    eval_loss_before: float | None
    eval_loss_after: float | None
    seconds: float
    compared_against: str = "base"  # the gate's baseline A: "base" or "champion v<N>"
    champion_score: float | None = None  # the champion's target score when it was A


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # outside a flow run (task.fn in unit tests)
        return log


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: bad input (infra.config.BadInputError) fails the same way every time."""
    from infra.config import BadInputError

    return not isinstance(getattr(state, "data", None), BadInputError)


@task(name="prepare-data", retries=1, retry_delay_seconds=0, retry_condition_fn=_retry_unless_bad_input)
def prepare_data_task(cfg: dict[str, Any], cache_root: str) -> DatasetInfo:
    c = from_dict(PipelineConfig, cfg)
    info = prepare_dataset(resolve_replay(c.data, c.model.base_model), cache_root)
    _logger().info("data: %d train / %d eval rows (%s, cache %s)", info.n_train, info.n_eval, info.dir,
                   "hit" if info.cached else "miss")
    return info


@task(name="data-quality", retries=0)
def data_quality_task(cfg: dict[str, Any], ds: DatasetInfo, out_dir: str) -> dict[str, Any]:
    """Blocking problems (empty / unweighted examples, eval contamination, ...) stop the pipeline here."""
    from transformers import AutoTokenizer

    from evals.data_quality import DataQualityConfig, check_training_data
    from tasks.train import read_rows
    from training_core.model_loading import resolve
    from training_core.renderers import TrainOnWhat, get_renderer

    c = from_dict(PipelineConfig, cfg)
    tok = AutoTokenizer.from_pretrained(resolve(c.model.base_model))
    renderer = get_renderer(c.data.renderer, tok)
    rows = read_rows(ds.train_path)
    evals = {"target": [json.dumps(r["messages"][:-1]) for r in read_rows(ds.eval_path)]}
    rep = check_training_data([r["messages"] for r in rows], tok,
                              lambda m: renderer.build_supervised_example(m, TrainOnWhat(c.data.train_on_what)),
                              out_dir, eval_sets=evals, config=DataQualityConfig(max_tokens=c.data.max_length))
    summary = {"problems": [p.message for p in rep.problems], "stats": rep.stats}
    _logger().info("data quality: %d problem(s); report in %s", len(rep.problems), out_dir)
    return summary


@task(name="train", retries=2, retry_delay_seconds=0, retry_condition_fn=_retry_unless_bad_input)
def train_task(cfg: dict[str, Any], ds: DatasetInfo, run_dir: str, mlflow_run_id: str) -> TrainResult:
    c = from_dict(PipelineConfig, cfg)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(metrics, step=step, run_id=mlflow_run_id)

    periodic = None
    if c.train.eval_every > 0:
        from evals.periodic import PeriodicEvaluator
        from tasks.evaluate import eval_protocol
        from training_core.textgen import SamplingGenerator

        bench = target_benchmark(ds.eval_path, c.train.eval_every_examples, name="target")
        evaluator = PeriodicEvaluator([bench], c.train.eval_every, eval_protocol(c),
                                      store=Path(run_dir) / "eval_during_training", batch_size=c.eval.batch_size,
                                      log_fn=lambda m, s: tracking.log_metrics(m, step=s, run_id=mlflow_run_id))

        def periodic(step: int, tc: Any) -> None:
            gen = SamplingGenerator(tc.save_weights_and_get_sampling_client(), f"step-{step}",
                                    renderer=c.data.renderer, batch_size=c.eval.batch_size)
            m = evaluator.maybe_run(step, gen)
            if m:
                _logger().info("eval at step %d: %s", step, {k: round(v, 3) for k, v in m.items()})

    if c.train.subprocess:
        res = _train_in_subprocess(cfg, ds, run_dir, mlflow_run_id, c.train.timeout_s)
    else:
        res = train_sft(c, ds.train_path, ds.eval_path, run_dir, on_step=on_step, periodic=periodic)
    _logger().info("train: %d steps (resumed from %d), loss %.3f -> %.3f, eval loss %.3f -> %.3f",
                   res.steps, res.resumed_from, res.losses[0][1] if res.losses else float("nan"),
                   res.losses[-1][1] if res.losses else float("nan"), res.eval_loss_before or float("nan"),
                   res.eval_loss_after or float("nan"))
    return res


def _train_in_subprocess(cfg: dict[str, Any], ds: DatasetInfo, run_dir: str, run_id: str, timeout_s: int
                         ) -> TrainResult:
    import subprocess
    import sys

    rd = Path(run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    cfg_path, result_path = rd / "train_config.json", rd / "train_result.json"
    cfg_path.write_text(json.dumps(cfg))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tasks.train_worker", str(cfg_path), ds.train_path, ds.eval_path, str(rd),
           str(result_path), run_id]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout_s or None)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"training process exceeded train.timeout_s={timeout_s}s and was killed") from e
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"training process exited with code {proc.returncode}; a retry resumes from the last "
                           f"committed checkpoint in {rd / 'checkpoints'}")
    raw = json.loads(result_path.read_text())
    raw["losses"] = [tuple(x) for x in raw["losses"]]
    raw["loss_history"] = [tuple(x) for x in raw.get("loss_history", [])]
    return TrainResult(**raw)


@task(name="store-checkpoint", retries=3, retry_delay_seconds=1)
def store_checkpoint_task(local_checkpoint: str, storage_uri: str, key: str) -> str:
    from infra.checkpoint_store import upload_committed_dir
    from infra.storage import open_storage

    st = open_storage(storage_uri)
    upload_committed_dir(st, local_checkpoint, key)
    uri = st.uri(key)
    _logger().info("checkpoint committed at %s", uri)
    return uri


@task(name="evaluate", retries=1, retry_delay_seconds=0, retry_condition_fn=_retry_unless_bad_input)
def evaluate_task(cfg: dict[str, Any], eval_path: str, checkpoint: str | None, name: str, results_dir: str) -> Any:
    c = from_dict(PipelineConfig, cfg)
    benches = [target_benchmark(eval_path, c.eval.n_examples), *guard_benchmarks(c)]
    res = evaluate_model(c, benches, checkpoint, name, results_dir)
    _logger().info("eval %s: %s", name, {k: round(v, 4) for k, v in res.means().items()})
    return res


@task(name="compare")
def compare_task(cfg: dict[str, Any], baseline: Any, tuned: Any, base: Any = None) -> Any:
    """Gate `tuned` against `baseline` (the champion when there is one, else the base model); `base`, when
    given besides a champion, is only an info row."""
    from evals.compare import GatePolicy, compare

    c = from_dict(PipelineConfig, cfg)
    pol = GatePolicy(targets=["target"], guards=list(c.eval.guards), guard_margin=c.eval.guard_margin,
                     guard_margins=dict(c.eval.guard_margins),
                     min_effect=c.eval.min_effect, confidence=c.eval.confidence,
                     n_bootstrap=c.eval.bootstrap_resamples, seed=c.eval.seed)
    return compare(baseline, tuned, pol, info_baselines=[base] if base is not None else [])


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
                  gated_against: str | None = None) -> tuple[str, bool]:
    """Register the checkpoint as a model version with its verdict; `champion` moves only if the gate passed
    against the champion version `gated_against` (None: there was no champion) and that is still champion."""
    if not model:
        return "", False
    from infra import registry

    version = registry.register_checkpoint(run_id, ckpt_uri, model, {"pipeline": "sft"}, tracking_uri=tracking_uri)
    registry.set_verdict_tags(model, version, verdict, tracking_uri=tracking_uri)
    promoted = registry.promote_if_passed(model, version, bool(verdict["gate_passed"]), tracking_uri=tracking_uri,
                                          gated_against=gated_against)
    _logger().info("registered %s version %s (%s)", model, version,
                   "promoted to champion" if promoted else "champion unchanged")
    return version, promoted


def run_paths(cfg: PipelineConfig, run_name: str) -> Path:
    return Path(cfg.run_root) / run_name


@flow(name="sft-pipeline", log_prints=True)
def sft_pipeline(config: dict[str, Any], run_name: str | None = None, checked: bool = False) -> PipelineResult:
    """`checked`: the caller already ran flows.preflight.check_sft_run (the CLI does, before the flow starts)."""
    t0 = time.time()
    cfg = from_dict(PipelineConfig, config)
    cfgd = to_dict(cfg)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = run_paths(cfg, run_name)
    if (run_dir / "summary.json").exists():
        raise RunExistsError(f"run {run_dir} already finished; refusing to overwrite it (pick another run name)")
    if not checked:  # before the run dir, the MLflow run or a cache entry exists
        from flows.preflight import check_sft_run

        check_sft_run(cfg, run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.setup(cfg.tracking_uri, cfg.experiment)
    if adopt_init_from(cfg, run_dir):  # training from init_from uses its model/LoRA shape: log the effective ones
        cfgd = to_dict(cfg)
    # keyed by the run directory: re-running a killed run continues its MLflow runs instead of starting new ones
    run_key = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    with tracking.run(run_name, tags={"pipeline": "sft", "base_model": cfg.model.base_model,
                                      "tuneloop.run_dir": str(run_dir.resolve())}, key=run_key) as parent:
        tracking.log_params(cfgd)
        tracking.log_dict(cfgd, "config.json")
        ds = prepare_data_task(cfgd, str(Path(cfg.run_root).parent / "cache"))
        dq_dir = run_dir / "data_quality"
        dq = data_quality_task(cfgd, ds, str(dq_dir))
        tracking.log_artifact(dq_dir, "data_quality")
        tracking.log_metrics({"data_quality_problems": float(len(dq["problems"]))})
        with tracking.run("train", nested=True, key="train") as tr:
            tracking.log_params({"dataset_hash": ds.hash, "n_train": ds.n_train})
            train = train_task(cfgd, ds, str(run_dir), tr.info.run_id)
            tracking.log_metrics({"eval_loss_before": train.eval_loss_before or 0.0,
                                  "eval_loss_after": train.eval_loss_after or 0.0})
            tracking.log_artifact(train.metrics_path)
        storage_uri = cfg.storage_uri or f"file://{Path(cfg.run_root).resolve()}"
        ckpt_uri = store_checkpoint_task(train.checkpoint, storage_uri, f"{run_name}/checkpoints/final")
        results_dir = str(run_dir / "eval")
        # The gate's baseline A is the champion when one exists (a retrain from it, or a fresh run, must beat
        # the best model so far, not just the base); the base then stays an info row.
        champ = champion_task(cfg.registry_model, uri)
        with tracking.run("evaluate", nested=True, key="evaluate"):
            base_res = evaluate_task(cfgd, ds.eval_path, None, "base", results_dir)
            champ_res = None
            if champ is not None:
                from tasks.train import _local_checkpoint

                # a retrain already staged the champion it started from in run_dir/init
                dest = run_dir / ("init" if cfg.init_from == champ[1] else "champion")
                champ_res = evaluate_task(cfgd, ds.eval_path, _local_checkpoint(champ[1], dest), "champion",
                                          results_dir)
                tracking.log_metrics({f"champion_{k}": v for k, v in champ_res.means().items()})
            tuned_res = evaluate_task(cfgd, ds.eval_path, train.checkpoint, "trained", results_dir)
            tracking.log_metrics({f"base_{k}": v for k, v in base_res.means().items()})
            tracking.log_metrics({f"trained_{k}": v for k, v in tuned_res.means().items()})
            tracking.log_artifact(results_dir, "eval")
        report = compare_task(cfgd, champ_res or base_res, tuned_res, base_res if champ_res else None)
        from evals.compare import format_verdict_table

        against = f"champion v{champ[0]}" if champ else "base"
        table = format_verdict_table(report)
        tgt = report.by_name()["target"]
        verdict = {"improved": "improved", "regressed": "regressed"}.get(tgt.verdict, "no significant change")
        tracking.log_metrics({"diff": tgt.diff, "diff_ci_low": tgt.diff_ci[0], "diff_ci_high": tgt.diff_ci[1],
                              "p_value": tgt.p_value, "gate_passed": float(report.gate.passed)})
        import mlflow

        mlflow.set_tags({"verdict": verdict, "gate": "passed" if report.gate.passed else "failed",
                         "checkpoint_uri": ckpt_uri, "compared_against": against})
        tracking.log_dict(report.to_dict(include_flips=True), "comparison.json")
        version, promoted = register_task(cfg.registry_model, parent.info.run_id, ckpt_uri, uri, {
            "verdict": verdict, "gate_passed": report.gate.passed, "diff": round(tgt.diff, 6),
            "diff_ci": [round(tgt.diff_ci[0], 6), round(tgt.diff_ci[1], 6)], "p_value": tgt.p_value,
            "gate_failures": report.gate.failures, "run_name": run_name, "compared_against": against,
        }, gated_against=champ[0] if champ else None)
        from evals.report import write_report

        report_path = write_report(run_dir / "report", report=report,
                                   results=[r for r in (base_res, champ_res, tuned_res) if r is not None],
                                   loss_curves={"train loss": train.loss_history})
        tracking.log_artifact(run_dir / "report", "report")
        result = PipelineResult(
            run_name=run_name, run_dir=str(run_dir), mlflow_run_id=parent.info.run_id, tracking_uri=uri,
            checkpoint_uri=ckpt_uri, local_checkpoint=train.checkpoint, base_score=base_res.means()["target"],
            tuned_score=tgt.mean_b, diff=tgt.diff, diff_ci=tuple(tgt.diff_ci), p_value=tgt.p_value,
            verdict=verdict, gate_passed=report.gate.passed, verdict_table=table, report_path=str(report_path),
            model_version=version, promoted=promoted,
            # the whole run's curve: after a resume, train.losses starts at the resume point
            train_loss_first=train.loss_history[0][1] if train.loss_history else float("nan"),
            train_loss_last=train.loss_history[-1][1] if train.loss_history else float("nan"),
            eval_loss_before=train.eval_loss_before, eval_loss_after=train.eval_loss_after,
            seconds=time.time() - t0, compared_against=against, champion_score=tgt.mean_a if champ else None,
        )
        summary = asdict(result)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        tracking.log_dict(summary, "summary.json")
    return result


def format_summary(r: PipelineResult) -> str:
    lo, hi = r.diff_ci
    champion = [] if r.champion_score is None else [(f"{r.compared_against} score", f"{r.champion_score:.3f}")]
    rows = [
        ("base score", f"{r.base_score:.3f}"),
        *champion,
        ("trained score", f"{r.tuned_score:.3f}"),
        (f"diff vs {r.compared_against} (95% CI)", f"{r.diff:+.3f}  [{lo:+.3f}, {hi:+.3f}]"),
        ("p-value", f"{r.p_value:.3g}"),
        ("verdict", r.verdict.upper()),
        ("train loss", f"{r.train_loss_first:.3f} -> {r.train_loss_last:.3f}"),
        ("eval loss", f"{(r.eval_loss_before or 0):.3f} -> {(r.eval_loss_after or 0):.3f}"),
        ("checkpoint", r.checkpoint_uri),
        ("report", r.report_path),
        ("MLflow run", r.mlflow_run_id),
        ("model version", f"{r.model_version} ({'champion' if r.promoted else 'not promoted'})"),
        ("open the UI", tracking.ui_command(r.tracking_uri)),
        ("wall time", f"{r.seconds:.0f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(w)} | {v}" for k, v in rows), line])
