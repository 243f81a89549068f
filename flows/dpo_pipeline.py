"""The DPO pipeline as a Prefect flow: start weights -> DPO -> checkpoint -> evaluate -> compare -> track.

Features: preference data validated and cached with its reference logprobs (computed once from the frozen
start); the start is `init_from` (e.g. an SFT run's checkpoint), else a short SFT warm-up, else the base, and
the verdict is against that start; the gated target is the built-in task's behaviour rate of greedy generations
on held-out prompts (code-checked), `heldout_pref` (implicit-reward accuracy on held-out pairs) an info row;
guards as in SFT. Everything after training is flows/common.finish_run. With your own preference files there is
no code check of the behaviour: the held-out preference accuracy is then the target. Trade-off: the local
engine only (`forward_backward_custom`).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows.common import PipelineResult, finish_run, open_run
from infra import tracking
from infra.config import from_dict
from recipes.common import adopt_init_from
from recipes.dpo_config import DPOConfig
from tasks.evaluate import guard_benchmarks
from tasks.train_stage import dpo_train_task


def check_dpo_run(cfg: DPOConfig, run_name: str) -> bool:
    """Every input before anything is written (bad input: exit 2); True: the run resumes."""
    from flows.preflight import PreflightError, check_checkpoint, check_model, check_run_name
    from recipes.preference_data import read_preference_jsonl
    from tasks.evaluate import unknown_guards

    resumes = check_run_name(cfg, run_name)  # type: ignore[arg-type]  # uses run_root only
    check_model(cfg.model.base_model)
    if cfg.init_from:
        check_checkpoint(cfg.init_from)
    if cfg.model.backend != "local":
        raise PreflightError("model.backend: DPO runs on the local engine (forward_backward_custom)")
    if bool(cfg.data.train_file) != bool(cfg.data.eval_file):
        raise PreflightError("data.train_file and data.eval_file go together (held-out pairs are needed)")
    for f in (cfg.data.train_file, cfg.data.eval_file):
        if f:
            read_preference_jsonl(f, cfg.data.columns)  # every row: errors name file, line and field
    if unknown := unknown_guards(list(cfg.eval.guards)):
        raise PreflightError(f"eval.guards={list(cfg.eval.guards)}: unknown {unknown}")
    return resumes


def _preference_eval(cfg: DPOConfig, dataset_dir: str, ref_key: str) -> Any:
    """(checkpoint, name, results_dir) -> EvalResult of `heldout_pref` for that model."""

    def run(checkpoint: str | None, name: str, results_dir: str) -> Any:
        import torch

        from recipes.dpo import preference_eval_result, prepare, tokenizer_for
        from recipes.preference_data import load_ref_logprobs
        from training_core import ServiceClient

        ds = prepare(cfg, tokenizer_for(cfg))
        ref = load_ref_logprobs(ds, ref_key)
        if ref is None:
            raise RuntimeError(f"reference logprobs {ref_key} missing from {dataset_dir}")
        svc = ServiceClient(compute_dtype=cfg.model.compute_dtype)
        m = cfg.model
        tc = (svc.create_training_client_from_state(checkpoint) if checkpoint else
              svc.create_lora_training_client(m.base_model, rank=m.rank, seed=m.seed))  # B = 0: the base itself
        try:
            return preference_eval_result(tc, ds, torch.tensor(ref["eval"]), cfg, name, ref_key)
        finally:
            tc.close()
            svc.close()

    return run


@flow(name="dpo-pipeline", log_prints=True)
def dpo_pipeline(config: dict[str, Any], run_name: str | None = None, checked: bool = False) -> PipelineResult:
    from recipes.dpo import behaviour_benchmark

    cfg = from_dict(DPOConfig, config)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with open_run(cfg, run_name, "dpo", check=None if checked else (lambda: check_dpo_run(cfg, run_name)),
                  adopt=lambda d: bool(adopt_init_from(cfg, d))) as rc:
        with tracking.run("train", nested=True, key="train") as tr:
            train = dpo_train_task(rc.cfgd, str(rc.run_dir), tr.info.run_id)
            tracking.log_artifact(train.metrics_path)
        bench = behaviour_benchmark(cfg)
        return finish_run(rc, checkpoint=train.checkpoint, benchmarks=[*([bench] if bench else []),
                                                                         *guard_benchmarks(cfg)],
                          curve=train.loss_history, curve_name="DPO loss",
                          extra_eval=_preference_eval(cfg, train.dataset_dir, train.ref_key),
                          start_checkpoint=train.start_checkpoint,
                          targets=("target",) if bench else ("heldout_pref",))
