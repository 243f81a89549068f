"""The SFT pipeline as a Prefect flow: prepare data -> train -> checkpoint -> evaluate -> compare -> track.

Features: cached + validated data prep; LoRA SFT (recipes/sft.py) with atomic resumable checkpoints (a retried
train task resumes, never repeating an optimizer step); finished checkpoints committed to storage (`file://`
or `s3://`); base vs trained on the same eval examples; a paired verdict with a bootstrap CI; the full config,
per-step metrics, results and verdict in MLflow. The stages are tasks/ modules shared with the other recipes'
flows; everything after training is flows/common.finish_run. Trade-off: training runs in the flow's process
(the engine is in-process) unless `train.subprocess`; multi-process training goes through the DeepSpeed backend.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import PipelineResult, RunExistsError, finish_run, format_summary, open_run, run_paths
from flows.sft_config import PipelineConfig
from infra import tracking
from infra.config import from_dict
from recipes.common import adopt_init_from
from tasks.data_stage import data_quality_task, prepare_data_task
from tasks.evaluate import guard_benchmarks, target_benchmark
from tasks.train_stage import train_task

__all__ = ["PipelineResult", "RunExistsError", "format_summary", "run_paths", "sft_pipeline"]


@flow(name="sft-pipeline", log_prints=True)
def sft_pipeline(config: dict[str, Any], run_name: str | None = None, checked: bool = False) -> PipelineResult:
    """`checked`: the caller already ran flows.preflight.check_sft_run (the CLI does, before the flow starts)."""
    cfg = from_dict(PipelineConfig, config)

    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def check() -> None:  # before the run dir, the MLflow run or a cache entry exists
        from flows.preflight import check_sft_run

        check_sft_run(cfg, run_name)

    # training from init_from uses its model/LoRA shape: the logged config is the effective one
    with open_run(cfg, run_name, "sft", check=None if checked else check,
                  adopt=lambda d: bool(adopt_init_from(cfg, d))) as rc:
        ds = prepare_data_task(rc.cfgd, str(Path(cfg.run_root).parent / "cache"))
        dq_dir = rc.run_dir / "data_quality"
        dq = data_quality_task(rc.cfgd, ds, str(dq_dir))
        tracking.log_artifact(dq_dir, "data_quality")
        tracking.log_metrics({"data_quality_problems": float(len(dq["problems"]))})
        with tracking.run("train", nested=True, key="train") as tr:
            tracking.log_params({"dataset_hash": ds.hash, "n_train": ds.n_train})
            train = train_task(rc.cfgd, ds, str(rc.run_dir), tr.info.run_id)
            tracking.log_metrics({"eval_loss_before": train.eval_loss_before or 0.0,
                                  "eval_loss_after": train.eval_loss_after or 0.0})
            tracking.log_artifact(train.metrics_path)
        benches = [target_benchmark(ds.eval_path, cfg.eval.n_examples), *guard_benchmarks(cfg)]
        # the whole run's curve: after a resume, train.losses starts at the resume point
        return finish_run(rc, checkpoint=train.checkpoint, benchmarks=benches, curve=train.loss_history,
                          eval_loss=(train.eval_loss_before, train.eval_loss_after))
