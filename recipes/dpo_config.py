"""The DPO recipe's typed config (YAML-loadable, `a.b=value` overridable), in the style of flows.sft_config.

Reuses the SFT pipeline's `ModelConfig` (base model + LoRA) and `EvalConfig` (sampling, bootstrap, gate), so
both recipes read the same knobs the same way. Pydantic dataclasses: types and ranges are checked when the
config is built, unknown keys are errors.

Defaults (measured, see recipes/README_dpo.md): the random-init `tiny` preset, a short SFT warm-up on a 50/50
mix of chosen and rejected replies (an SFT model that follows the stated constraint about half of the time),
then DPO from that warm-up checkpoint, which is also the frozen reference.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from flows.sft_config import EvalConfig, ModelConfig

_CFG = ConfigDict(extra="forbid", validate_assignment=True)  # as flows.sft_config: typos are errors


@dataclass(config=_CFG)
class PrefDataConfig:
    task: Literal["case"] = Field("case", description="built-in preference task (data.preferences), used when "
                                  "train_file is empty")
    task_kwargs: dict = Field(default_factory=lambda: {"length": 2}, description="arguments of the task")
    n_train: int = Field(512, ge=1, description="generated training pairs")
    n_eval: int = Field(200, ge=1, description="generated held-out pairs (preference accuracy)")
    seed: int = Field(0, ge=0, description="seed of generation")
    train_file: str = Field("", description="preference data ({\"prompt\", \"chosen\", \"rejected\"} per row, "
                            "messages or strings): JSONL, JSON, Parquet, CSV, an Arrow dir, a dataset dir, "
                            "org/name[:split] or s3://; '' = generated")
    eval_file: str = Field("", description="held-out preference data, any of those formats (needed with "
                           "train_file)")
    columns: dict[str, str] = Field(default_factory=dict, description="map our field names to your columns, "
                                    "e.g. data.columns.prompt=question, data.columns.chosen=good, "
                                    "data.columns.rejected=bad")
    renderer: Literal["chat_template", "role_colon"] = Field("chat_template", description="how messages become "
                                                            "tokens")
    max_length: int = Field(128, ge=2, description="max tokens of prompt + reply")
    truncate: bool = Field(False, description="cut over-long pairs (keep the start, as TRL does) instead of "
                           "refusing them; either way the data-quality stats count them")


@dataclass(config=_CFG)
class WarmupConfig:
    """A short SFT stage before DPO (used when init_from is empty and steps > 0)."""

    steps: int = Field(60, ge=0, description="SFT warm-up steps before DPO (0 = DPO from the base / init_from)")
    batch_size: int = Field(16, ge=1, description="examples per warm-up step")
    learning_rate: float = Field(2e-3, gt=0.0, description="warm-up learning rate (constant, AdamW)")
    chosen_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of warm-up replies taken from "
                                   "`chosen` (the rest from `rejected`): 0.5 = a policy indifferent to the "
                                   "preference")


@dataclass(config=_CFG)
class DPOTrainConfig:
    steps: int = Field(80, ge=1, description="DPO optimizer steps")
    batch_size: int = Field(16, ge=1, description="preference pairs per step")
    learning_rate: float = Field(1e-3, gt=0.0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(5, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of the peak (linear decay)")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip_norm: float = Field(1.0, ge=0.0, description="gradient norm clip (0 = off)")
    save_every: int = Field(20, ge=1, description="write a resumable checkpoint every N steps")
    beta: float = Field(0.1, gt=0.0, description="DPO beta: strength of the KL anchor to the reference")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="conservative DPO: assumed share of flipped "
                                   "preference labels")
    sft_weight: float = Field(0.2, ge=0.0, description="RPO-style weight of an SFT term (mean NLL per chosen "
                              "token) added to the DPO loss")
    ref_batch_size: int = Field(64, ge=1, description="pairs per forward when computing reference logprobs")


@dataclass(config=_CFG)
class DPOConfig:
    name: str = Field("dpo", min_length=1, description="recipe name: the default run name is NAME-YYYYMMDD-HHMMSS")
    run_root: str = Field(".tuneloop/runs", min_length=1, description="local working dir of runs")
    cache_root: str = Field(".tuneloop/cache", min_length=1, description="prepared datasets + reference logprobs")
    storage_uri: str = Field("", description="where finished checkpoints go: file://... or s3://bucket/prefix "
                             "('' = run_root)")
    tracking_uri: str = Field("", description="MLflow tracking URI ('' = sqlite:///.tuneloop/mlflow.db or "
                              "$MLFLOW_TRACKING_URI)")
    experiment: str = Field("tuneloop", min_length=1, description="MLflow experiment")
    registry_model: str = Field("tuneloop-dpo", description="MLflow registered model ('' = do not register)")
    init_from: str = Field("", description="start from this checkpoint (e.g. an SFT run's output) instead of a "
                           "fresh adapter; it is also the frozen reference")
    model: ModelConfig = Field(default_factory=ModelConfig, description="base model and LoRA adapter")
    data: PrefDataConfig = Field(default_factory=PrefDataConfig, description="preference data")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig, description="SFT warm-up before DPO")
    train: DPOTrainConfig = Field(default_factory=DPOTrainConfig, description="DPO optimization")
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(max_tokens=16),
                             description="evaluation and the gate")
