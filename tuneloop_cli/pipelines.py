"""The recipes `tuneloop run` / `tuneloop config` know: one line each (config class, flow, pre-flight check).

Names are import strings so that building the parser (every `tuneloop` call) imports nothing heavy. A flow is
`(config: dict, run_name: str | None, checked: bool) -> flows.common.PipelineResult`; a check is
`(config, run_name) -> bool` (True: the run exists unfinished and will resume) that raises bad input before
anything is written.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    help: str
    config: str
    flow: str
    check: str


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("sft", "SFT: data -> train -> checkpoint -> evaluate -> compare -> track",
           "flows.sft_config:PipelineConfig", "flows.sft_pipeline:sft_pipeline", "flows.preflight:check_sft_run"),
    Recipe("rl", "RL from verifiable rewards (GRPO-style): start -> RL -> evaluate vs the start -> gate -> track",
           "recipes.rl_config:RLConfig", "flows.rl_pipeline:rl_pipeline", "flows.rl_pipeline:check_rl_run"),
    Recipe("sft-then-rl", "the SFT pipeline, then the RL pipeline from its checkpoint (one command)",
           "flows.chain_config:ChainConfig", "flows.chain:sft_then_rl", "flows.chain:check_chain_run"),
    Recipe("dpo", "DPO: preference pairs -> start -> DPO -> evaluate the target behaviour vs the start -> gate",
           "recipes.dpo_config:DPOConfig", "flows.dpo_pipeline:dpo_pipeline", "flows.dpo_pipeline:check_dpo_run"),
    Recipe("distill", "distillation (on-/off-policy): teacher + student -> distill -> student before vs after, "
           "teacher score, gap closed", "recipes.distill_config:DistillConfig",
           "flows.distill_pipeline:distill_pipeline", "flows.distill_pipeline:check_distill_run"),
)}


def load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
