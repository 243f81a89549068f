"""The RL recipe's typed config (pydantic dataclasses like flows/sft_config.py: checked types and ranges,
unknown keys refused, YAML-loadable and `a.b=value` overridable by the same loader).

Sections: `model` and `eval` are the SFT pipeline's own classes (one vocabulary for both pipelines); `env`
picks the environment and the failure rewards; `rl` the GRPO-style loop; `warmup` an optional short SFT
warm-up run before RL when no `init_from` is given (the default: RL cannot learn what the policy never
samples, and the random-init `tiny` preset samples nothing right).

Defaults (measured, see recipes/README_rl.md): `tiny`, 80 SFT warm-up steps on `reverse` (4 digits; held-out
greedy pass@1 ~0.2), then 40 RL iterations with groups of 8 on 32 problems each (lr 5e-5).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from flows.sft_config import EvalConfig, ModelConfig

_CFG = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(config=_CFG)
class EnvConfig:
    name: str = Field("arithmetic", min_length=1, description="environment (envs.registry.ENVS): arithmetic "
                      "(a data.generators task), tool_calc (multi-turn calculator), bench:<builtin benchmark>")
    task: str = Field("reverse", min_length=1, description="arithmetic env: the data.generators task")
    task_kwargs: dict = Field(default_factory=lambda: {"length": 4}, description="arguments of the generator "
                              "(tool_calc: digits, ops)")
    n_train: int = Field(4000, ge=1, description="training problems (iteration i draws from a seeded permutation)")
    n_eval: int = Field(400, ge=1, description="held-out problems (disjoint from training by content hash)")
    seed: int = Field(0, ge=0, description="seed of problem generation and of the problem order")
    train_file: str = Field("", description="arithmetic env: training problems {question, answer} (JSONL, "
                            "Parquet, CSV, Arrow dir, s3://, hub id; '' = generated from env.task)")
    eval_file: str = Field("", description="arithmetic env: held-out problems, same format ('' = generated); "
                           "eval.n_examples caps how many are used")
    columns: dict[str, str] = Field(default_factory=dict, description="map our problem fields to your columns, "
                                    "e.g. env.columns.question=problem")
    renderer: Literal["chat_template", "role_colon"] = Field("chat_template", description="messages -> tokens")
    system_prompt: str = Field("", description="system message of every episode ('' = none)")
    max_tokens: int = Field(12, ge=1, description="max sampled tokens per assistant turn")
    max_turns: int = Field(3, ge=1, description="multi-turn envs: assistant turns per episode")
    max_context: int = Field(0, ge=0, description="tokens of prompt + max_tokens allowed (0 = the model's "
                             "context); beyond it the episode ends with overflow_reward")
    overflow_reward: float = Field(0.0, description="reward of an episode that overflows the context")
    unparseable_reward: float = Field(0.0, description="reward of an answer not in the expected format")
    error_reward: float = Field(0.0, description="reward of an episode whose env raised")
    eval_percent: int = Field(50, ge=1, le=99, description="bench:<name> envs: share of examples held out")


@dataclass(config=_CFG)
class RLTrainConfig:
    iterations: int = Field(40, ge=1, description="RL iterations (one sampling round + updates each)")
    group_size: int = Field(8, ge=2, description="rollouts per problem (the group baseline)")
    groups_per_batch: int = Field(32, ge=1, description="problems per iteration")
    learning_rate: float = Field(5e-5, gt=0.0, description="AdamW learning rate (losses are token sums; Adam steps are ~lr per weight whatever the signal, so RL needs ~40x less than SFT)")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    grad_clip_norm: float = Field(1.0, ge=0.0, description="gradient norm clip (0 = off)")
    loss_fn: Literal["importance_sampling", "ppo", "cispo", "dro"] = Field(
        "importance_sampling", description="policy loss (training_core.losses)")
    loss_fn_config: dict[str, float] = Field(default_factory=dict, description="loss options (ppo/cispo clip "
                                             "thresholds, dro beta)")
    num_substeps: int = Field(1, ge=1, description="forward_backward + optim_step minibatches per iteration")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of rollouts")
    normalize_std: bool = Field(False, description="divide advantages by the group's reward std")
    kl_coef: float = Field(0.0, ge=0.0, description="KL penalty vs the starting weights (0 = off; k1 "
                           "estimator folded into per-token advantages)")
    kl_metric: bool = Field(True, description="log the KL to the starting weights even when kl_coef is 0 "
                            "(one extra forward per iteration)")
    overlap: bool = Field(False, description="sample iteration i+1 with the weights before update i (one step "
                          "off-policy, corrected by the importance ratio)")
    save_every: int = Field(10, ge=1, description="write a resumable checkpoint every N iterations")
    seed: int = Field(0, ge=0, description="seed of the rollouts' sampling (per iteration: (seed, i))")
    rollout_log_groups: int = Field(16, ge=0, description="groups per iteration written to rollouts/*.jsonl")


@dataclass(config=_CFG)
class WarmupConfig:
    steps: int = Field(80, ge=0, description="SFT warm-up steps before RL when init_from is empty (0 = start "
                       "from the base model)")
    batch_size: int = Field(32, ge=1, description="warm-up examples per step")
    learning_rate: float = Field(2e-3, gt=0.0, description="warm-up peak learning rate")
    warmup_steps: int = Field(10, ge=0, description="warm-up's own linear lr warmup steps")


def _default_model() -> ModelConfig:
    return ModelConfig(rank=16, lora_alpha=32.0)


def _default_eval() -> EvalConfig:
    return EvalConfig(max_tokens=12, n_examples=400)


@dataclass(config=_CFG)
class RLConfig:
    name: str = Field("rl", min_length=1, description="recipe name: the default run name is NAME-YYYYMMDD-HHMMSS")
    run_root: str = Field(".tuneloop/runs", min_length=1, description="local working dir of runs")
    storage_uri: str = Field("", description="where finished checkpoints go ('' = run_root)")
    tracking_uri: str = Field("", description="MLflow tracking URI ('' = default)")
    experiment: str = Field("tuneloop", min_length=1, description="MLflow experiment")
    registry_model: str = Field("tuneloop-rl", description="MLflow registered model ('' = do not register)")
    init_from: str = Field("", description="start from this checkpoint (e.g. an SFT run's) instead of the "
                           "base model or the warm-up")
    model: ModelConfig = Field(default_factory=_default_model, description="base model and LoRA adapter")
    env: EnvConfig = Field(default_factory=EnvConfig, description="environment and failure rewards")
    rl: RLTrainConfig = Field(default_factory=RLTrainConfig, description="the RL loop")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig, description="SFT warm-up before RL")
    eval: EvalConfig = Field(default_factory=_default_eval, description="evaluation and the gate")
