"""TrainingClient: the Tinker primitives over one LoRA adapter of a shared base model.

Every call is queued on the engine's ordered worker and returns an `APIFuture` at once (Tinker's pattern:
submit `forward_backward` and `optim_step` back to back, prepare the next batch, then collect results).
`*_async` twins are coroutines returning the same futures.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training_core import state as state_io
from training_core.async_twins import AsyncTwins
from training_core.engine import Engine
from training_core.futures import APIFuture
from training_core.sampling_client import SamplingClient
from training_core.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    ModelData,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)

CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def _free_adapter(engine: Engine, adapter: str) -> None:
    engine.submit(lambda: engine.remove_adapter(adapter))  # queued behind the client's pending work


class TrainingClient(AsyncTwins):
    """One LoRA adapter (plus its Adam state) on a shared base model.

    `close()` (or leaving a `with` block, or dropping the last reference) frees the adapter, its gradients and
    Adam moments: a notebook or a retried task that creates clients over and over does not grow the process.
    """

    def __init__(self, engine: Engine, adapter: str, model_id: str, checkpoint_root: Path,
                 user_metadata: dict[str, str] | None = None) -> None:
        self._engine, self._adapter = engine, adapter
        self.model_id = model_id
        self._root = checkpoint_root
        self.user_metadata = dict(user_metadata or {})
        self._closed = False
        self._finalizer = weakref.finalize(self, _free_adapter, engine, adapter)
        self._finalizer.atexit = False  # at interpreter exit the worker thread may already be gone

    def close(self) -> None:
        """Free the adapter and its optimizer state now (waits for the client's queued work first)."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer.detach() is not None:
            eng, name = self._engine, self._adapter
            eng.submit(lambda: eng.remove_adapter(name)).result()

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _live(self) -> str:
        if self._closed:
            raise RuntimeError(f"training client {self.model_id} is closed: its adapter has been freed")
        return self._adapter

    # ---- compute -----------------------------------------------------------------------------------
    def forward(self, data: list[Datum], loss_fn: str = "cross_entropy",
                loss_fn_config: dict[str, float] | None = None) -> APIFuture[ForwardBackwardOutput]:
        adapter = self._live()
        return self._engine.submit(
            lambda: self._engine.forward_backward(adapter, data, loss_fn, loss_fn_config, backward=False)
        )

    def forward_backward(self, data: list[Datum], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict[str, float] | None = None) -> APIFuture[ForwardBackwardOutput]:
        adapter = self._live()
        return self._engine.submit(
            lambda: self._engine.forward_backward(adapter, data, loss_fn, loss_fn_config, backward=True)
        )

    def forward_backward_custom(self, data: list[Datum], loss_fn: CustomLossFn) -> APIFuture[ForwardBackwardOutput]:
        adapter = self._live()
        return self._engine.submit(lambda: self._engine.forward_backward_custom(adapter, data, loss_fn))

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        params = adam_params or AdamParams()
        adapter = self._live()
        return self._engine.submit(lambda: OptimStepResponse(self._engine.optim_step(adapter, params)))

    # ---- state -------------------------------------------------------------------------------------
    def _path(self, segment: str, name: str) -> Path:
        self._live()
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid checkpoint name {name!r}: no '/', not empty, not hidden")
        return self._root / self.model_id / segment / name

    def save_state(self, name: str, ttl_seconds: int | None = None,
                   metadata: dict[str, Any] | None = None) -> APIFuture[SaveWeightsResponse]:
        """Adapter + optimizer moments + step + RNG state, committed atomically."""
        path = self._path("weights", name)
        meta = {"ttl_seconds": ttl_seconds, "user_metadata": self.user_metadata, **(metadata or {})}
        return self._engine.submit(lambda: SaveWeightsResponse(str(state_io.save_adapter_checkpoint(
            self._engine, self._adapter, path, with_optimizer=True, metadata=meta))))

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None
                                 ) -> APIFuture[SaveWeightsForSamplerResponse]:
        path = self._path("sampler_weights", name)
        meta = {"ttl_seconds": ttl_seconds, "user_metadata": self.user_metadata}
        return self._engine.submit(lambda: SaveWeightsForSamplerResponse(str(state_io.save_adapter_checkpoint(
            self._engine, self._adapter, path, with_optimizer=False, metadata=meta))))

    def load_state(self, path: str) -> APIFuture[Any]:
        """Weights only: the optimizer starts fresh and the step counter resets."""
        self._live()
        return self._engine.submit(
            lambda: state_io.load_adapter_checkpoint(self._engine, self._adapter, path, with_optimizer=False))

    def load_state_with_optimizer(self, path: str) -> APIFuture[Any]:
        """Weights + optimizer moments + step + RNG: continues exactly where `save_state` left off."""
        self._live()
        return self._engine.submit(
            lambda: state_io.load_adapter_checkpoint(self._engine, self._adapter, path, with_optimizer=True))

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """Snapshot the current adapter into a new (ephemeral) adapter on the same base; sample from it."""
        if name is not None:
            path = self.save_weights_for_sampler(name).result().path
            return self.create_sampling_client(path)
        self._live()
        eng = self._engine
        snap = eng.new_adapter_name("snap")

        def make() -> None:
            eng.add_adapter(snap, copy.deepcopy(eng.adapters[self._adapter].lora))
            state_io.set_adapter_tensors(eng, snap, state_io.adapter_tensors(eng, self._adapter), "snapshot")

        eng.submit(make).result()
        return SamplingClient(eng, snap, owned=True)

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        from training_core.service_client import load_sampling_adapter

        return load_sampling_adapter(self._engine, model_path)

    # ---- info --------------------------------------------------------------------------------------
    def get_info(self) -> GetInfoResponse:
        self._live()
        base = self._engine.base
        arch = getattr(base.model.config, "model_type", None)
        st = self._engine.adapters[self._adapter]
        return GetInfoResponse(model_id=self.model_id, model_data=ModelData(arch=arch, model_name=base.name,
                               tokenizer_id=base.path), is_lora=True, lora_rank=st.lora.rank, model_name=base.name)

    def get_tokenizer(self) -> Any:
        return self._engine.base.tokenizer

    @property
    def step(self) -> int:
        return self._engine.adapters[self._live()].step

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Name -> tensor of this client's LoRA parameters (read-only views, for tests and export)."""
        return {k: v.detach() for k, v in self._engine.adapters[self._live()].params.items()}
