"""The SFT pipeline's one typed config (YAML-loadable, `a.b=value` overridable, logged in full)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    base_model: str = "tiny"  # preset name, local HF dir or hub id
    rank: int = 32
    lora_alpha: float | None = 64.0  # None: alpha = rank
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = False
    compute_dtype: str = "float32"  # or bfloat16 (autocast)
    seed: int = 0
    backend: str = "local"  # "local" (in-process engine) | "deepspeed" (ZeRO ranks owned by the engine)
    world_size: int = 2  # deepspeed only
    zero_stage: int = 2  # deepspeed only: 2 or 3
    ds_timeout_s: float = 600.0  # deepspeed only: a rank silent this long fails the task (retry resumes)


@dataclass
class DataConfig:
    task: str = "reverse"  # a built-in generator (data.generators.TASKS), used when train_file is empty
    task_kwargs: dict = field(default_factory=lambda: {"length": 4})
    n_train: int = 4000
    n_eval: int = 200
    seed: int = 0
    train_file: str = ""  # your own chat JSONL ({"messages": [...], "answer": ...} per line)
    eval_file: str = ""
    # General-data replay mixed into training (the usual remedy against forgetting; the held-out-text guard
    # measures it): "auto" = the base model's own pretraining-style text when tuneloop knows it (its
    # random-init presets: the prose their tokenizer was trained on), else none; "" = none; or a chat JSONL.
    replay: str = "auto"
    replay_fraction: float = 0.25  # share of the final training set
    renderer: str = "chat_template"
    train_on_what: str = "last_assistant_message"
    max_length: int = 128


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    save_every: int = 50
    eval_loss_examples: int = 64
    subprocess: bool = False  # train in a child process (crash isolation; retries resume from a checkpoint)
    timeout_s: int = 0  # kill a subprocess run that exceeds this (0 = no limit)
    eval_every: int = 0  # run the target benchmark on the current weights every N steps (0 = off)
    eval_every_examples: int = 50


@dataclass
class EvalConfig:
    max_tokens: int = 10
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    n_examples: int = 200
    batch_size: int = 100
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    min_effect: float = 0.05
    guard_margin: float = 0.05
    guards: list[str] = field(default_factory=lambda: ["heldout_text"])  # built-in guard benchmarks
    guard_examples: int = 100
    # per-guard non-inferiority margins; held-out text is scored in log-likelihood per token (nats)
    guard_margins: dict = field(default_factory=lambda: {"heldout_text": 0.5})


@dataclass
class PipelineConfig:
    name: str = "demo"
    run_root: str = ".tuneloop/runs"  # local working dir of runs
    storage_uri: str = ""  # where finished checkpoints go: file://... or s3://bucket/prefix ("" = run_root)
    tracking_uri: str = ""  # MLflow; "" = sqlite:///.tuneloop/mlflow.db
    experiment: str = "tuneloop"
    registry_model: str = "tuneloop-sft"  # MLflow registered model; "" = do not register
    init_from: str = ""  # start training from this checkpoint (e.g. the champion) instead of a fresh adapter
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
