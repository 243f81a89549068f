"""Tinker-compatible data types.

Names, fields and defaults follow the `tinker` SDK's `tinker.types` so a cookbook-style script ports by
changing its import. Plain dataclasses: no pydantic on the hot path, and every object is serializable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

Dtype = Literal["int64", "float32"]
StopReason = Literal["stop", "length"]

# Keys whose plain-list values are typed by name, as the SDK does (tinker/types/datum.py).
_KEY_TO_DTYPE: dict[str, Dtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
    "segment_ids": "int64",  # optional: packed rows (training_core.engine), one sequence per run of equal ids
}


@dataclass
class TensorData:
    """A dense tensor on the wire: flat data + dtype + shape."""

    data: list[int] | list[float]
    dtype: Dtype
    shape: list[int] | None = None

    @classmethod
    def from_torch(cls, t: torch.Tensor) -> TensorData:
        dtype: Dtype = "int64" if not t.is_floating_point() else "float32"
        t = t.detach().cpu().to(torch.int64 if dtype == "int64" else torch.float32)
        return cls(data=t.reshape(-1).tolist(), dtype=dtype, shape=list(t.shape))

    @classmethod
    def from_numpy(cls, a: np.ndarray) -> TensorData:
        return cls.from_torch(torch.from_numpy(np.ascontiguousarray(a)))

    def to_torch(self) -> torch.Tensor:
        t = torch.tensor(self.data, dtype=torch.int64 if self.dtype == "int64" else torch.float32)
        return t.reshape(self.shape) if self.shape is not None else t

    def to_numpy(self) -> np.ndarray:
        return self.to_torch().numpy()

    def tolist(self) -> list[Any]:
        return self.to_torch().tolist()


def to_tensor_data(key: str, value: Any) -> TensorData:
    """Coerce a loss_fn_inputs value (TensorData, torch, numpy, list) to TensorData."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, torch.Tensor):
        return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, list | tuple):
        dtype = _KEY_TO_DTYPE.get(key)
        if dtype is None:
            dtype = "int64" if all(isinstance(v, int) for v in value) else "float32"
        return TensorData.from_torch(
            torch.tensor(list(value), dtype=torch.int64 if dtype == "int64" else torch.float32)
        )
    raise TypeError(f"loss_fn_inputs[{key!r}]: unsupported type {type(value).__name__}")


@dataclass
class EncodedTextChunk:
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class ModelInput:
    """A model input: a list of chunks (text only here), concatenated in order."""

    chunks: list[EncodedTextChunk] = field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        out: list[int] = []
        for c in self.chunks:
            out.extend(c.tokens)
        return out

    @property
    def length(self) -> int:
        return sum(c.length for c in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[int(token)]))


@dataclass
class Datum:
    """One training example: model_input[i] predicts loss_fn_inputs[...][i]."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_fn_inputs = {k: to_tensor_data(k, v) for k, v in self.loss_fn_inputs.items()}


@dataclass
class AdamParams:
    """AdamW with decoupled weight decay; grad_clip_norm 0 means no clipping (tinker semantics)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float | None = None  # None: alpha = rank (scaling 1)
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True  # Tinker's default


@dataclass
class ForwardBackwardOutput:
    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


@dataclass
class OptimStepResponse:
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SampledSequence:
    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None


@dataclass
class SampleResponse:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    type: Literal["sample"] = "sample"


@dataclass
class SaveWeightsResponse:
    path: str
    type: Literal["save_weights"] = "save_weights"


@dataclass
class SaveWeightsForSamplerResponse:
    path: str
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


@dataclass
class LoadWeightsResponse:
    path: str | None = None
    type: Literal["load_weights"] = "load_weights"


@dataclass
class ModelData:
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


@dataclass
class GetInfoResponse:
    model_id: str
    model_data: ModelData
    is_lora: bool = True
    lora_rank: int | None = None
    model_name: str | None = None
    type: Literal["get_info"] = "get_info"


LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]
