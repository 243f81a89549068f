"""The distillation pipeline as a Prefect flow: teacher + student start -> distill -> evaluate -> compare -> track.

Features: teacher and student resolved and checked for a shared tokenizer before training (`auto`: the cached
reference pair, built offline by two short SFT runs); on- or off-policy distillation (recipes/distill.py) with
resumable checkpoints; the student before vs after on the teacher's skill (held-out problems graded by code),
paired verdict with CI, gate, registry; the teacher's own score on the same examples and the share of the
teacher-student gap closed, in MLflow (`teacher_target`, `gap_closed`) and the summary. Everything after
training is flows/common.finish_run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import PipelineResult, finish_run, open_run
from infra import tracking
from infra.config import from_dict
from recipes.distill_config import AUTO, DistillConfig
from tasks.evaluate import guard_benchmarks
from tasks.train_stage import distill_models_task, distill_train_task


def check_distill_run(cfg: DistillConfig, run_name: str) -> bool:
    from flows.preflight import PreflightError, check_model, check_model_or_checkpoint, check_run_name
    from tasks.evaluate import unknown_guards

    resumes = check_run_name(cfg, run_name)  # type: ignore[arg-type]  # uses run_root only
    check_model(cfg.model.base_model)
    for what, spec in (("teacher", cfg.teacher), ("init_from", cfg.init_from)):
        if spec and spec != AUTO and "://" not in spec:
            try:
                check_model_or_checkpoint(spec)
            except PreflightError as e:
                raise PreflightError(f"{what}={spec}: {e}") from None
    if cfg.data.source and not cfg.data.source.startswith("builtin:"):
        from recipes.prompt_data import load_prompts

        load_prompts(cfg.data.source, seed=cfg.data.seed, columns=cfg.data.columns)  # every row: errors name file, line and field
    if unknown := unknown_guards(list(cfg.eval.guards)):
        raise PreflightError(f"eval.guards={list(cfg.eval.guards)}: unknown {unknown}")
    return resumes


@flow(name="distill-pipeline", log_prints=True)
def distill_pipeline(config: dict[str, Any], run_name: str | None = None, checked: bool = False
                     ) -> PipelineResult:
    from recipes.distill import adopt_student_values, gap_closed, skill_benchmark
    from tasks.gate_stage import evaluate_task

    cfg = from_dict(DistillConfig, config)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not checked:
        check_distill_run(cfg, run_name)
    with open_run(cfg, run_name, "distill") as rc:
        teacher, student = distill_models_task(rc.cfgd, str(rc.run_dir))
        adopt_student_values(cfg, student)  # the student's real base and LoRA shape, for the evals below
        with tracking.run("train", nested=True, key="train") as tr:
            tracking.log_params({"teacher": teacher.checkpoint or teacher.base_model,
                                 "student_start": student.checkpoint or student.base_model})
            train = distill_train_task(rc.cfgd, str(rc.run_dir), tr.info.run_id)
            tracking.log_artifact(train.metrics_path)
        bench = skill_benchmark(cfg)
        # the teacher on the same examples: how much of its lead the student closed
        tcfg = cfg if teacher.checkpoint else dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, base_model=teacher.base_model))
        teacher_res = evaluate_task(tcfg, [bench], teacher.checkpoint, "teacher", str(rc.run_dir / "eval"))
        res = finish_run(rc, checkpoint=train.checkpoint, benchmarks=[bench, *guard_benchmarks(cfg)],
                         curve=train.loss_history, curve_name=f"{cfg.mode} loss", start_checkpoint=student.checkpoint)
        t_score = teacher_res.means()["target"]
        res.extras = {"teacher score": round(t_score, 4), "gap closed": round(gap_closed(res.base_score, res.tuned_score,
                                                                                       t_score), 4)}
        tracking.log_metrics({"teacher_target": t_score, "gap_closed": res.extras["gap closed"]})
        summary = Path(res.run_dir) / "summary.json"
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "extras": res.extras}, indent=2))
        return res
