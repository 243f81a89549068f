"""Stage 2 (training) as Prefect tasks: a recipe's loop run in the flow's process or, for crash isolation, in a
child process; either way a retried task resumes from the run's last committed checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import task

from flows.sft_config import PipelineConfig
from infra import tracking
from infra.config import from_dict
from recipes.common import TrainResult
from recipes.sft import train_sft
from tasks.base import retry_unless_bad_input, run_logger
from tasks.evaluate import target_benchmark
from tasks.prepare_data import DatasetInfo


@task(name="train", retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
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
                run_logger().info("eval at step %d: %s", step, {k: round(v, 3) for k, v in m.items()})

    if c.train.subprocess:
        res = _train_in_subprocess(cfg, ds, run_dir, mlflow_run_id, c.train.timeout_s)
    else:
        res = train_sft(c, ds.train_path, ds.eval_path, run_dir, on_step=on_step, periodic=periodic)
    run_logger().info("train: %d steps (resumed from %d), loss %.3f -> %.3f, eval loss %.3f -> %.3f",
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


@task(name="rl-start", retries=1, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
def rl_start_task(cfg: dict[str, Any], run_dir: str) -> str | None:
    """The weights RL starts from: init_from, else the SFT warm-up (trained here, resumable), else the base."""
    from recipes.rl import start_checkpoint
    from recipes.rl_config import RLConfig

    c = from_dict(RLConfig, cfg)
    path = start_checkpoint(c, run_dir)
    run_logger().info("RL starts from %s", path or f"the base model {c.model.base_model}")
    return path


@task(name="rl-train", retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
def rl_train_task(cfg: dict[str, Any], run_dir: str, mlflow_run_id: str) -> TrainResult:
    """The RL loop (recipes/rl.py); a retry resumes from the last committed iteration checkpoint."""
    from recipes.rl import train_rl
    from recipes.rl_config import RLConfig

    c = from_dict(RLConfig, cfg)

    def on_iter(it: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(metrics, step=it, run_id=mlflow_run_id)

    res = train_rl(c, run_dir, on_iter=on_iter)
    h = res.loss_history
    run_logger().info("rl: %d iterations (resumed from %d), mean reward %.3f -> %.3f", res.steps, res.resumed_from,
                      h[0][1] if h else float("nan"), h[-1][1] if h else float("nan"))
    return res


def _mlflow_logger(run_id: str) -> Any:
    def log(step: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(metrics, step=step, run_id=run_id)

    return log


@task(name="dpo-train", retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
def dpo_train_task(cfg: dict[str, Any], run_dir: str, mlflow_run_id: str) -> Any:
    """The DPO loop (recipes/dpo.py: warm-up or init_from, reference logprobs once, DPO steps); resumable."""
    from recipes.dpo import train_dpo
    from recipes.dpo_config import DPOConfig

    res = train_dpo(from_dict(DPOConfig, cfg), run_dir, on_step=_mlflow_logger(mlflow_run_id))
    h = res.loss_history
    run_logger().info("dpo: %d steps (resumed from %d), loss %.3f -> %.3f, held-out preference accuracy %s -> %s",
                      res.steps, res.resumed_from, h[0][1] if h else float("nan"), h[-1][1] if h else float("nan"),
                      res.heldout_accuracy_before, res.heldout_accuracy_after)
    return res


@task(name="distill-models", retries=1, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
def distill_models_task(cfg: dict[str, Any], run_dir: str) -> tuple[Any, Any]:
    """(teacher, student start) as recipes.distill.ModelRef; `auto` builds the cached reference pair once."""
    from recipes.distill import check_same_tokenizer, resolve_pair
    from recipes.distill_config import DistillConfig

    teacher, student = resolve_pair(from_dict(DistillConfig, cfg), Path(run_dir))
    check_same_tokenizer(teacher, student)
    run_logger().info("teacher %s, student starts from %s", teacher.checkpoint or teacher.base_model,
                      student.checkpoint or student.base_model)
    return teacher, student


@task(name="distill-train", retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
def distill_train_task(cfg: dict[str, Any], run_dir: str, mlflow_run_id: str) -> TrainResult:
    """The distillation loop (recipes/distill.py, on- or off-policy); a retry resumes from its checkpoint."""
    from recipes.distill import train_distill
    from recipes.distill_config import DistillConfig

    c = from_dict(DistillConfig, cfg)
    res = train_distill(c, run_dir, on_iter=_mlflow_logger(mlflow_run_id))
    h = res.loss_history
    run_logger().info("distill (%s): %d steps (resumed from %d), loss %.3f -> %.3f", c.mode, res.steps,
                      res.resumed_from, h[0][1] if h else float("nan"), h[-1][1] if h else float("nan"))
    return res
