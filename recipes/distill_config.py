"""The distillation recipe's typed config (YAML-loadable, `a.b=value` overridable, logged in full).

Same conventions as `flows.sft_config` (pydantic dataclasses, unknown keys and out-of-range values refused,
every field described for `tuneloop config distill --describe`); `model` (the student) and `eval` reuse its
`ModelConfig` and `EvalConfig`. Trade-off: the optimizer fields repeat SFT's `TrainConfig` names (so
`recipes.sft.lr_at` applies unchanged) rather than nesting it, since SFT's batch/eval knobs mean other
things here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from flows.sft_config import EvalConfig, ModelConfig

_CFG = ConfigDict(extra="forbid", validate_assignment=True)
AUTO = "auto"


@dataclass(config=_CFG)
class ReferenceConfig:
    """The built-in teacher/student pair `teacher=auto` / `init_from=auto` use: made by short cached SFT runs."""

    teacher_steps: int = Field(150, ge=1, description="SFT steps of the reference teacher (tiny, rank 32)")
    student_steps: int = Field(60, ge=0, description="SFT steps of the barely trained reference student "
                               "(0 = the untrained base)")
    student_rank: int = Field(16, ge=1, description="LoRA rank of the reference student (smaller than the "
                              "teacher's 32)")
    n_train: int = Field(2000, ge=1, description="generated SFT rows of the reference runs")
    cache_dir: str = Field("", description="where the reference checkpoints are cached ('' = "
                           "$TUNELOOP_CACHE/distill)")


@dataclass(config=_CFG)
class PromptConfig:
    source: str = Field("", description="prompts: '' = the generated task below, builtin:NAME, or a dataset "
                        "({\"prompt\": ...} / {\"messages\": [...]} rows; a chat file's prompts are used): "
                        "JSONL, JSON, Parquet, CSV, an Arrow dir, a dataset dir, org/name[:split] or s3://")
    columns: dict[str, str] = Field(default_factory=dict, description="map our field names to the source's "
                                    "columns, e.g. data.columns.prompt=question or data.columns.messages=conversation")
    task: str = Field("reverse", min_length=1, description="generated task (data.generators.TASKS): training "
                      "prompts and the held-out skill benchmark")
    task_kwargs: dict = Field(default_factory=lambda: {"length": 4}, description="arguments of the generator")
    n_prompts: int = Field(1000, ge=1, description="training prompts")
    seed: int = Field(0, ge=0, description="seed of prompt generation and order")
    renderer: Literal["chat_template", "role_colon"] = Field("chat_template", description="messages -> tokens")
    max_length: int = Field(128, ge=2, description="max tokens of prompt + completion")


@dataclass(config=_CFG)
class DistillAlgoConfig:
    prompts_per_step: int = Field(8, ge=1, description="prompts per update")
    group_size: int = Field(4, ge=1, description="completions per prompt (student samples on-policy; teacher "
                            "samples off-policy)")
    max_tokens: int = Field(12, ge=1, description="max completion tokens")
    temperature: float = Field(1.0, gt=0.0, description="student sampling temperature (on-policy; 1 keeps the "
                               "sampler's logprobs the student's)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="student nucleus sampling mass (on-policy; < 1 keeps "
                         "junk tokens out of the student's samples, a bias traded for variance)")
    teacher_temperature: float = Field(1.0, ge=0.0, description="teacher sampling temperature (off-policy "
                                       "data; 0 = greedy)")
    kl_coef: float = Field(1.0, gt=0.0, description="on-policy: advantage = -kl_coef * (log p_student - "
                           "log p_teacher) per token")
    kl_baseline: bool = Field(True, description="on-policy: subtract the batch's mean per-token KL from the "
                              "advantages (variance reduction; the expected gradient is unchanged)")
    kl_discount: float = Field(0.0, ge=0.0, lt=1.0, description="on-policy: discount of future per-token KL "
                               "summed into each advantage (0 = per-token only)")


@dataclass(config=_CFG)
class DistillTrainConfig:
    steps: int = Field(120, ge=1, description="updates (optimizer steps)")
    max_student_tokens: int = Field(0, ge=0, description="stop once this many completion tokens were trained "
                                    "on (0 = no budget): compares modes at equal student tokens")
    learning_rate: float = Field(1e-3, gt=0.0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(5, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of the peak")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip_norm: float = Field(1.0, ge=0.0, description="gradient norm clip (0 = off)")
    save_every: int = Field(20, ge=1, description="write a resumable checkpoint every N steps")


@dataclass(config=_CFG)
class DistillConfig:
    name: str = Field("distill", min_length=1, description="recipe name: default run name NAME-YYYYMMDD-HHMMSS")
    mode: Literal["on_policy", "off_policy"] = Field(
        "on_policy", description="on_policy: the student samples, the teacher scores each token (reverse KL); "
        "off_policy: the teacher writes completions, the student is fine-tuned on them")
    teacher: str = Field(AUTO, min_length=1, description="teacher: a preset, a HF model dir, or a tuneloop "
                         "checkpoint (path, file://, s3://); auto = the reference teacher (cached SFT run)")
    init_from: str = Field(AUTO, description="student start: a checkpoint; auto = the reference student; "
                           "'' = a fresh adapter on model.base_model")
    run_root: str = Field(".tuneloop/runs", min_length=1, description="local working dir of runs")
    storage_uri: str = Field("", description="where finished checkpoints go ('' = run_root)")
    tracking_uri: str = Field("", description="MLflow tracking URI ('' = the default store)")
    experiment: str = Field("tuneloop", min_length=1, description="MLflow experiment")
    registry_model: str = Field("tuneloop-distill", description="MLflow registered model ('' = do not register)")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(rank=16, lora_alpha=32.0),
                               description="the student: base model and LoRA adapter")
    data: PromptConfig = Field(default_factory=PromptConfig, description="prompts and the skill benchmark")
    distill: DistillAlgoConfig = Field(default_factory=DistillAlgoConfig, description="the distillation step")
    train: DistillTrainConfig = Field(default_factory=DistillTrainConfig, description="optimization")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="the auto teacher/student")
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(guards=[]), description="evaluation and gate")
