"""JSON request bodies the SDK sends (tinker 0.38.0), validated with pydantic.

Unknown fields are ignored (newer SDKs add optional ones); a wrong type or a missing required field is a 400
naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LoraConfigReq(Lenient):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateSessionReq(Lenient):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None


class CreateModelReq(Lenient):
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: LoraConfigReq = Field(default_factory=LoraConfigReq)
    user_metadata: dict[str, str] | None = None


class AdamParamsReq(Lenient):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStepReq(Lenient):
    model_id: str
    seq_id: int
    adam_params: AdamParamsReq


class SaveWeightsReq(Lenient):
    model_id: str
    seq_id: int
    path: str
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsForSamplerReq(Lenient):
    model_id: str
    seq_id: int
    path: str | None = None
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None


class LoadWeightsReq(Lenient):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    user_metadata: dict[str, str] | None = None


class CreateSamplingSessionReq(Lenient):
    session_id: str
    sampling_session_seq_id: int
    model_path: str | None = None
    base_model: str | None = None


class PromptReq(Lenient):
    chunks: list[dict[str, Any]]


class SamplingParamsReq(Lenient):
    max_tokens: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[int] | list[str] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)


class AsampleReq(Lenient):
    sampling_session_id: str | None = None
    seq_id: int = Field(ge=0)
    num_samples: int = Field(default=1, ge=1, le=1024)
    prompt: PromptReq
    sampling_params: SamplingParamsReq = Field(default_factory=SamplingParamsReq)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = Field(default=0, ge=0, le=1024)
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
