"""Run `train_sft` in its own process (`train.subprocess: true`): a crash or SIGKILL of training cannot take
the orchestrator down, and Prefect's retry of the task resumes from the newest committed checkpoint.

    python -m tasks.train_worker CONFIG_JSON TRAIN_JSONL EVAL_JSONL RUN_DIR RESULT_JSON [MLFLOW_RUN_ID]
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

KILL_ENV = "TUNELOOP_TEST_KILL_AT_STEP"  # fault injection for tests: SIGKILL self once at this step


def main(argv: list[str]) -> int:
    from tuneloop_cli.env import apply_env_defaults

    apply_env_defaults()
    from flows.sft_config import PipelineConfig
    from infra import tracking
    from infra.config import from_dict
    from recipes.sft import train_sft

    cfg_path, train_path, eval_path, run_dir, result_path = argv[:5]
    run_id = argv[5] if len(argv) > 5 else ""
    cfg = from_dict(PipelineConfig, json.loads(Path(cfg_path).read_text()))
    kill_at = int(os.environ.get(KILL_ENV, "0"))
    marker = Path(run_dir) / ".killed-once"

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if run_id:
            tracking.log_metrics(metrics, step=step, run_id=run_id)
        if kill_at and step == kill_at and not marker.exists():
            marker.write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)

    if run_id:
        tracking.setup(cfg.tracking_uri, cfg.experiment)
    res = train_sft(cfg, train_path, eval_path, run_dir, on_step=on_step)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(res)))
    tmp.replace(result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
