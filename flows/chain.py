"""`tuneloop run sft-then-rl`: the usual post-training recipe as one command: the SFT pipeline, then the RL
pipeline starting from the SFT run's checkpoint (each with its own verdict, MLflow run and registry entry; the
RL verdict is against the SFT checkpoint it started from).

Config: `sft:` (flows.sft_config.PipelineConfig) and `rl:` (recipes.rl_config.RLConfig) sections; `rl.init_from`
is set to the SFT run's checkpoint. The defaults are a short SFT (125 steps on `reverse` with the default replay: held-out
pass@1 ~0.2, so RL has something to learn), then the RL defaults with 80 iterations and no warm-up
of their own. Run names: NAME-sft and NAME-rl; re-running the same --run-name resumes whichever part is unfinished (a finished SFT part is reused).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.chain_config import ChainConfig
from flows.common import PipelineResult


def check_chain_run(cfg: ChainConfig, run_name: str) -> bool:
    """Both parts' inputs before anything is written; the RL part's init_from is the SFT output (not yet there)."""
    from dataclasses import replace

    from flows.preflight import check_run_name, check_sft_run
    from flows.rl_pipeline import check_rl_run

    sft_name, rl_name = f"{run_name}-sft", f"{run_name}-rl"
    sft_done = (Path(cfg.sft.run_root) / sft_name / "summary.json").exists()
    resumes = False
    if not sft_done:
        resumes, _ = check_sft_run(cfg.sft, sft_name)
    else:
        check_run_name(cfg.sft, rl_name)  # the name itself stays valid
    rl = replace(cfg.rl, init_from="")
    return check_rl_run(rl, rl_name) or resumes or sft_done


@flow(name="sft-then-rl", log_prints=True)
def sft_then_rl(config: dict[str, Any], run_name: str | None = None, checked: bool = False
                ) -> tuple[PipelineResult, PipelineResult]:
    from flows.rl_pipeline import rl_pipeline
    from flows.sft_pipeline import sft_pipeline
    from infra.config import from_dict, to_dict

    cfg = from_dict(ChainConfig, config)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not checked:
        check_chain_run(cfg, run_name)
    sft_summary = Path(cfg.sft.run_root) / f"{run_name}-sft" / "summary.json"
    if sft_summary.exists():  # a rerun after the RL part failed: the finished SFT part is reused, not refused
        sft_res = PipelineResult(**{**json.loads(sft_summary.read_text())})
        sft_res.diff_ci = tuple(sft_res.diff_ci)  # type: ignore[assignment]
    else:
        sft_res = sft_pipeline(to_dict(cfg.sft), run_name=f"{run_name}-sft", checked=True)
    rl_cfg = to_dict(cfg.rl)
    rl_cfg["init_from"] = sft_res.local_checkpoint
    rl_res = rl_pipeline(rl_cfg, run_name=f"{run_name}-rl", checked=True)
    return sft_res, rl_res
