"""The SFT pipeline's one typed config (YAML-loadable, `a.b=value` overridable, logged in full).

Pydantic dataclasses: every value is checked by type and range when the config is built (a negative step
count, a fractional batch size or a zero learning rate is refused before anything runs), unknown keys are
errors (`extra="forbid"`: a typo must not fall back to a default), and they stay real dataclasses, so
`dataclasses.asdict` / `dataclasses.replace` keep working for every caller. The `description` of each field
is what `tuneloop config sft --describe` prints.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

# strict=False keeps the usual lax coercions ("5" -> 5 for an int) but never truncates 2.5 to 2 and never
# turns a YAML null or boolean into a string (pydantic refuses both).
_CFG = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(config=_CFG)
class ModelConfig:
    base_model: str = Field("tiny", min_length=1, description="preset name (tiny, tiny-30m, smollm2-135m), "
                            "local Hugging Face model directory, or hub id (needs network)")
    rank: int = Field(32, ge=1, description="LoRA rank")
    lora_alpha: float | None = Field(64.0, gt=0, description="LoRA alpha; null: alpha = rank")
    train_attn: bool = Field(True, description="adapt the attention projections")
    train_mlp: bool = Field(True, description="adapt the MLP projections")
    train_unembed: bool = Field(False, description="adapt the output embedding (lm_head)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="training compute dtype (bfloat16: autocast)")
    seed: int = Field(0, ge=0, description="seed of the adapter init and of the batch order")
    backend: Literal["local", "deepspeed"] = Field(
        "local", description="local: in-process engine; deepspeed: ZeRO ranks owned by the engine")
    world_size: int = Field(2, ge=1, description="deepspeed only: number of ranks")
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed only: ZeRO stage (2 or 3)")
    ds_timeout_s: float = Field(600.0, gt=0, description="deepspeed only: a rank silent this long fails the "
                                "task (a retry resumes)")


@dataclass(config=_CFG)
class DataConfig:
    task: str = Field("reverse", min_length=1, description="built-in generator (data.generators.TASKS), used "
                      "when train_file is empty")
    task_kwargs: dict = Field(default_factory=lambda: {"length": 4}, description="arguments of the generator")
    n_train: int = Field(4000, ge=1, description="generated training rows")
    n_eval: int = Field(200, ge=1, description="generated held-out eval rows")
    seed: int = Field(0, ge=0, description="seed of generation, replay sampling and mixing")
    train_file: str = Field("", description="your chat JSONL ({\"messages\": [...], \"answer\": ...} per line); "
                            "'' = generated")
    eval_file: str = Field("", description="held-out chat JSONL with an 'answer' per row (needed with train_file)")
    # General-data replay is the usual remedy against forgetting; the held-out-text guard measures it.
    replay: str = Field("auto", description="general-data replay mixed into training: auto = the base's own "
                        "pretraining-style text for tuneloop's random-init presets, else none; '' = none; "
                        "or a chat JSONL path")
    replay_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="share of replay rows in the final "
                                   "training set, in [0, 1)")
    renderer: Literal["chat_template", "role_colon"] = Field(
        "chat_template", description="how messages become tokens")
    train_on_what: Literal["last_assistant_message", "all_assistant_messages", "all_messages"] = Field(
        "last_assistant_message", description="which tokens carry loss weight")
    max_length: int = Field(128, ge=2, description="max tokens of one rendered example; longer rows are "
                            "refused (truncation would drop the end-of-turn token)")
    columns: dict[str, str] = Field(default_factory=dict, description="map our field names to your columns, "
                                    "e.g. data.columns.messages=conversation (ShareGPT from/value turns are "
                                    "converted); train/eval/replay files may be JSONL, JSON, Parquet, CSV, an "
                                    "Arrow dir, a dataset dir, org/name[:split] or s3://")
    num_proc: int = Field(1, ge=1, description="processes that render and tokenize the dataset (datasets.map)")
    packing: bool = Field(False, description="pack each step's examples into rows of max_length tokens (each "
                          "sequence attends only to itself, positions from 0): same loss, fewer forward rows")


@dataclass(config=_CFG)
class TrainConfig:
    steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="examples per step")
    learning_rate: float = Field(2e-3, gt=0.0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(30, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of the peak (linear decay)")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip_norm: float = Field(1.0, ge=0.0, description="gradient norm clip (0 = off)")
    save_every: int = Field(50, ge=1, description="write a resumable checkpoint every N steps")
    eval_loss_examples: int = Field(64, ge=1, description="eval rows for the eval loss before/after training")
    subprocess: bool = Field(False, description="train in a child process (crash isolation; a retry resumes "
                             "from a checkpoint)")
    timeout_s: int = Field(0, ge=0, description="kill a subprocess run that exceeds this (0 = no limit)")
    eval_every: int = Field(0, ge=0, description="run the target benchmark on the current weights every N steps "
                            "(0 = off)")
    eval_every_examples: int = Field(50, ge=1, description="examples of each periodic evaluation")


@dataclass(config=_CFG)
class EvalConfig:
    max_tokens: int = Field(10, ge=1, description="max generated tokens per answer")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int = Field(0, ge=0, description="sampling and bootstrap seed")
    n_examples: int = Field(200, ge=1, description="held-out target examples evaluated")
    batch_size: int = Field(100, ge=1, description="prompts per generation batch")
    bootstrap_resamples: int = Field(2000, ge=100, description="bootstrap resamples of the paired CI")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="confidence level of the CIs")
    min_effect: float = Field(0.05, ge=0.0, description="smallest target improvement that counts")
    guard_margin: float = Field(0.05, ge=0.0, description="default non-inferiority margin of a guard")
    guards: list[str] = Field(default_factory=lambda: ["heldout_text"], description="built-in guard benchmarks")
    guard_examples: int = Field(100, ge=1, description="examples per guard benchmark")
    # held-out text is scored in log-likelihood per token (nats), hence its own margin
    guard_margins: dict[str, float] = Field(default_factory=lambda: {"heldout_text": 0.5},
                                            description="per-guard non-inferiority margins")


@dataclass(config=_CFG)
class PipelineConfig:
    name: str = Field("sft", min_length=1, description="recipe name: the default run name is NAME-YYYYMMDD-HHMMSS")
    run_root: str = Field(".tuneloop/runs", min_length=1, description="local working dir of runs")
    storage_uri: str = Field("", description="where finished checkpoints go: file://... or s3://bucket/prefix "
                             "('' = run_root)")
    tracking_uri: str = Field("", description="MLflow tracking URI ('' = sqlite:///.tuneloop/mlflow.db or "
                              "$MLFLOW_TRACKING_URI)")
    experiment: str = Field("tuneloop", min_length=1, description="MLflow experiment")
    registry_model: str = Field("tuneloop-sft", description="MLflow registered model ('' = do not register)")
    init_from: str = Field("", description="start training from this checkpoint (path, file:// or s3://; e.g. "
                           "the champion) instead of a fresh adapter")
    model: ModelConfig = Field(default_factory=ModelConfig, description="base model and LoRA adapter")
    data: DataConfig = Field(default_factory=DataConfig, description="training and eval data")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimization")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation and the gate")
