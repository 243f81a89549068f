"""What every recipe's pipeline shares after training: store the checkpoint -> evaluate the starting model
(and the champion) and the trained one on the same examples -> paired compare + gate -> MLflow metrics and
tags with stable names -> registry (promotion only through the gate) -> HTML report -> summary.json.

A recipe's flow (flows/sft_pipeline.py, flows/rl_pipeline.py, ...) differs in its data and training stages
only; it calls `open_run` before them and `finish_run` after, so no flow is a copy of another.

MLflow names (stable across recipes, so MLflow's compare view lines runs up): `<who>_<benchmark>` and
`<who>_<benchmark>_ci_low|_ci_high` for who in start/base, champion, trained; `diff_<benchmark>`,
`diff_<benchmark>_ci_low|_ci_high`, `p_<benchmark>`; the target's `diff`, `diff_ci_low`, `diff_ci_high`,
`p_value`, `gate_passed`; tags `verdict`, `verdict_<benchmark>`, `gate`, `pipeline`, `compared_against`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra import tracking
from infra.config import to_dict


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
    compared_against: str = "base"  # the gate's baseline A: "base", "start" or "champion v<N>"
    champion_score: float | None = None  # the champion's target score when it was A
    pipeline: str = "sft"
    curve_name: str = "train loss"  # what train_loss_first/last measure (RL: mean reward)
    extras: dict[str, Any] = field(default_factory=dict)  # recipe-specific lines (distill: teacher score, gap)


@dataclass
class RunContext:
    cfg: Any
    cfgd: dict[str, Any]
    run_name: str
    run_dir: Path
    tracking_uri: str
    parent: Any  # the MLflow parent run
    pipeline: str
    t0: float


def run_paths(cfg: Any, run_name: str) -> Path:
    return Path(cfg.run_root) / run_name


@contextmanager
def open_run(cfg: Any, run_name: str | None, pipeline: str, check: Callable[[], None] | None = None,
             adopt: Callable[[Path], bool] | None = None) -> Iterator[RunContext]:
    """The run dir and the MLflow parent run (keyed by the run dir: a killed run's rerun continues its MLflow
    runs); refuses a finished run. `check` runs before anything is written; `adopt(run_dir)` may change the
    config (e.g. init_from's model shape) before it is logged."""
    t0 = time.time()
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = run_paths(cfg, run_name)
    if (run_dir / "summary.json").exists():
        raise RunExistsError(f"run {run_dir} already finished; refusing to overwrite it (pick another run name)")
    if check is not None:
        check()
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.setup(cfg.tracking_uri, cfg.experiment)
    if adopt is not None:
        adopt(run_dir)
    cfgd = to_dict(cfg)
    run_key = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    with tracking.run(run_name, tags={"pipeline": pipeline, "base_model": cfg.model.base_model,
                                      "tuneloop.run_dir": str(run_dir.resolve())}, key=run_key) as parent:
        tracking.log_params(cfgd)
        tracking.log_dict(cfgd, "config.json")
        yield RunContext(cfg, cfgd, run_name, run_dir, uri, parent, pipeline, t0)


def _bench_metrics(who: str, res: Any, confidence: float, seed: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, b in res.benchmarks.items():
        ci = b.ci(confidence=confidence, seed=seed)
        out[f"{who}_{name}"] = b.mean
        out[f"{who}_{name}_ci_low"], out[f"{who}_{name}_ci_high"] = ci.low, ci.high
    return out


def finish_run(rc: RunContext, *, checkpoint: str, benchmarks: Sequence[Any], curve: list[tuple[int, float]],
               curve_name: str = "train loss", extra_eval: Callable[..., Any] | None = None,
               start_checkpoint: str | None = None, eval_loss: tuple[float | None, float | None] = (None, None),
               targets: Sequence[str] = ("target",)) -> PipelineResult:
    """Everything after training (see the module docstring). `start_checkpoint`: the starting model when it is
    a checkpoint (RL from an SFT run): it is then the baseline, named "start"; None: the base model, "base"."""
    from evals.compare import format_verdict_table
    from evals.report import write_report
    from recipes.common import local_checkpoint
    from tasks.gate_stage import (
        champion_task,
        compare_task,
        evaluate_task,
        register_task,
        store_checkpoint_task,
    )

    cfg, run_dir, run_name = rc.cfg, rc.run_dir, rc.run_name
    storage_uri = cfg.storage_uri or f"file://{Path(cfg.run_root).resolve()}"
    ckpt_uri = store_checkpoint_task(checkpoint, storage_uri, f"{run_name}/checkpoints/final")
    results_dir = str(run_dir / "eval")
    # The gate's baseline A is the champion when one exists (a retrain from it, or a fresh run, must beat
    # the best model so far, not just the start); the start then stays an info row.
    champ = champion_task(cfg.registry_model, rc.tracking_uri)
    start_name = "start" if start_checkpoint else "base"
    conf, seed = cfg.eval.confidence, cfg.eval.seed
    with tracking.run("evaluate", nested=True, key="evaluate"):
        base_res = evaluate_task(cfg, benchmarks, start_checkpoint, start_name, results_dir, extra_eval)
        champ_res = None
        if champ is not None:
            # a retrain already staged the champion it started from in run_dir/init
            dest = run_dir / ("init" if getattr(cfg, "init_from", "") == champ[1] else "champion")
            champ_res = evaluate_task(cfg, benchmarks, local_checkpoint(champ[1], dest), "champion", results_dir,
                                      extra_eval)
        tuned_res = evaluate_task(cfg, benchmarks, checkpoint, "trained", results_dir, extra_eval)
        tracking.log_artifact(results_dir, "eval")
    # on the pipeline's own (top-level) run, so MLflow's compare view lines runs of every recipe up
    for who, res in ((start_name, base_res), ("champion", champ_res), ("trained", tuned_res)):
        if res is not None:
            tracking.log_metrics(_bench_metrics(who, res, conf, seed))
    report = compare_task(cfg, champ_res or base_res, tuned_res, base_res if champ_res else None, list(targets))
    against = f"champion v{champ[0]}" if champ else start_name
    table = format_verdict_table(report)
    tgt = report.by_name()[targets[0]]
    verdict = {"improved": "improved", "regressed": "regressed"}.get(tgt.verdict, "no significant change")
    per_bench: dict[str, float] = {}
    for c in report.comparisons:
        if c.baseline:  # info rows against an extra baseline
            continue
        per_bench.update({f"diff_{c.benchmark}": c.diff, f"diff_{c.benchmark}_ci_low": c.diff_ci[0],
                          f"diff_{c.benchmark}_ci_high": c.diff_ci[1], f"p_{c.benchmark}": c.p_value})
    tracking.log_metrics({"diff": tgt.diff, "diff_ci_low": tgt.diff_ci[0], "diff_ci_high": tgt.diff_ci[1],
                          "p_value": tgt.p_value, "gate_passed": float(report.gate.passed), **per_bench})
    import mlflow

    mlflow.set_tags({"verdict": verdict, "gate": "passed" if report.gate.passed else "failed",
                     "checkpoint_uri": ckpt_uri, "compared_against": against,
                     **{f"verdict_{c.benchmark}": c.verdict for c in report.comparisons if not c.baseline}})
    tracking.log_dict(report.to_dict(include_flips=True), "comparison.json")
    version, promoted = register_task(cfg.registry_model, rc.parent.info.run_id, ckpt_uri, rc.tracking_uri, {
        "verdict": verdict, "gate_passed": report.gate.passed, "diff": round(tgt.diff, 6),
        "diff_ci": [round(tgt.diff_ci[0], 6), round(tgt.diff_ci[1], 6)], "p_value": tgt.p_value,
        "gate_failures": report.gate.failures, "run_name": run_name, "compared_against": against,
    }, gated_against=champ[0] if champ else None, pipeline=rc.pipeline)
    report_path = write_report(run_dir / "report", report=report,
                               results=[r for r in (base_res, champ_res, tuned_res) if r is not None],
                               loss_curves={curve_name: curve})
    tracking.log_artifact(run_dir / "report", "report")
    result = PipelineResult(
        run_name=run_name, run_dir=str(run_dir), mlflow_run_id=rc.parent.info.run_id, tracking_uri=rc.tracking_uri,
        checkpoint_uri=ckpt_uri, local_checkpoint=checkpoint, base_score=base_res.means()[targets[0]],
        tuned_score=tgt.mean_b, diff=tgt.diff, diff_ci=tuple(tgt.diff_ci), p_value=tgt.p_value,
        verdict=verdict, gate_passed=report.gate.passed, verdict_table=table, report_path=str(report_path),
        model_version=version, promoted=promoted,
        train_loss_first=curve[0][1] if curve else float("nan"),
        train_loss_last=curve[-1][1] if curve else float("nan"),
        eval_loss_before=eval_loss[0], eval_loss_after=eval_loss[1],
        seconds=time.time() - rc.t0, compared_against=against, champion_score=tgt.mean_a if champ else None,
        pipeline=rc.pipeline, curve_name=curve_name,
    )
    summary = asdict(result)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    tracking.log_dict(summary, "summary.json")
    return result


def format_summary(r: PipelineResult) -> str:
    lo, hi = r.diff_ci
    start = "start" if r.compared_against == "start" else "base"
    champion = [] if r.champion_score is None else [(f"{r.compared_against} score", f"{r.champion_score:.3f}")]
    eval_loss = [] if r.eval_loss_before is None else [
        ("eval loss", f"{(r.eval_loss_before or 0):.3f} -> {(r.eval_loss_after or 0):.3f}")]
    rows = [
        (f"{start} score", f"{r.base_score:.3f}"),
        *champion,
        ("trained score", f"{r.tuned_score:.3f}"),
        (f"diff vs {r.compared_against} (95% CI)", f"{r.diff:+.3f}  [{lo:+.3f}, {hi:+.3f}]"),
        ("p-value", f"{r.p_value:.3g}"),
        ("verdict", r.verdict.upper()),
        (r.curve_name, f"{r.train_loss_first:.3f} -> {r.train_loss_last:.3f}"),
        *eval_loss,
        *((k, f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in r.extras.items()),
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
