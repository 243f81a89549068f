"""ServiceClient: the entry point, as in the tinker SDK (`from training_core import ServiceClient, types`)."""

from __future__ import annotations

import logging
import os
import uuid
import weakref
from pathlib import Path
from typing import Any

from training_core import state as state_io
from training_core.engine import Engine, get_engine
from training_core.model_loading import torch_dtype
from training_core.sampling_client import SamplingClient
from training_core.training_client import TrainingClient
from training_core.types import LoraConfig

log = logging.getLogger(__name__)
COMPUTE_DTYPES = ("float32", "bfloat16")


def default_checkpoint_root() -> Path:
    return Path(os.environ.get("TUNELOOP_HOME", ".tuneloop")) / "checkpoints"


def load_sampling_adapter(engine: Engine, model_path: str) -> SamplingClient:
    lora = state_io.lora_config_from_checkpoint(model_path)  # verifies the manifest first
    name = engine.new_adapter_name("sampler")

    def make() -> None:
        engine.add_adapter(name, lora)
        state_io.load_adapter_checkpoint(engine, name, model_path, with_optimizer=False)

    engine.submit(make).result()
    return SamplingClient(engine, name, model_path=model_path, owned=True)


class ServiceClient:
    """Creates training and sampling clients. Models run in this process (one engine per base model).

    Unknown keyword arguments are a TypeError (a misspelt `compute_dtype=` must not silently train in fp32).
    `base_url` / `api_key` are accepted so tinker scripts port unchanged, and ignored: there is no server.
    `close()` frees every adapter the clients created here still hold.
    """

    def __init__(self, checkpoint_root: str | Path | None = None, compute_dtype: str = "float32",
                 load_dtype: str = "float32", *, user_metadata: dict[str, str] | None = None,
                 base_url: str | None = None, api_key: str | None = None, session_id: str | None = None) -> None:
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
        torch_dtype(load_dtype)  # raises ValueError naming the valid ones
        if base_url is not None or api_key is not None:
            log.info("ServiceClient: base_url / api_key ignored: models run in this process")
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else default_checkpoint_root()
        self.compute_dtype, self.load_dtype = compute_dtype, load_dtype
        self.user_metadata = dict(user_metadata or {})
        # a fixed session_id (a pipeline run passes one) keeps every attempt's checkpoints in one directory
        self.session_id = session_id or f"sess-{uuid.uuid4().hex[:8]}"
        self._n = 0
        self._clients: weakref.WeakSet[TrainingClient | SamplingClient] = weakref.WeakSet()

    def close(self) -> None:
        """Free the adapters (and Adam state) of every client this service created that is still open."""
        for c in list(self._clients):
            c.close()
        self._clients.clear()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _engine(self, base_model: str) -> Engine:
        return get_engine(base_model, compute_dtype=self.compute_dtype, load_dtype=self.load_dtype)

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None, train_mlp: bool = True,
        train_attn: bool = True, train_unembed: bool = True, user_metadata: dict[str, str] | None = None,
        lora_alpha: float | None = None,
    ) -> TrainingClient:
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        eng = self._engine(base_model)
        lora = LoraConfig(rank=rank, alpha=lora_alpha, seed=seed, train_attn=train_attn, train_mlp=train_mlp,
                          train_unembed=train_unembed)
        name = eng.new_adapter_name("train")
        eng.submit(lambda: eng.add_adapter(name, lora)).result()
        model_id = f"{self.session_id}-train-{self._n}"  # a directory name: no ":" (Windows, S3 tools, scp)
        self._n += 1
        tc = TrainingClient(eng, name, model_id, self.checkpoint_root, {**self.user_metadata, **(user_metadata or {})})
        self._clients.add(tc)
        return tc

    def _from_state(self, path: str, with_optimizer: bool) -> TrainingClient:
        trainer = state_io.read_trainer_state(path)
        lora = trainer["lora"]
        tc = self.create_lora_training_client(
            trainer["base_model"], rank=lora["rank"], seed=lora.get("seed"), train_mlp=lora["train_mlp"],
            train_attn=lora["train_attn"], train_unembed=lora["train_unembed"], lora_alpha=lora.get("alpha"),
        )
        (tc.load_state_with_optimizer(path) if with_optimizer else tc.load_state(path)).result()
        return tc

    def create_training_client_from_state(self, path: str) -> TrainingClient:
        return self._from_state(path, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(self, path: str) -> TrainingClient:
        return self._from_state(path, with_optimizer=True)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingClient:
        if model_path is not None:
            base = state_io.read_trainer_state(model_path)["base_model"]
            sc = load_sampling_adapter(self._engine(base), model_path)
            self._clients.add(sc)
            return sc
        if base_model is None:
            raise ValueError("create_sampling_client needs model_path or base_model")
        return SamplingClient(self._engine(base_model), None)

    def get_server_capabilities(self) -> dict[str, Any]:
        try:
            from training_core.presets import PRESETS

            names = sorted(PRESETS)
        except ImportError:
            names = []
        return {"supported_models": [{"model_name": n} for n in names]}

    async def create_lora_training_client_async(self, *a: Any, **k: Any) -> TrainingClient:
        return self.create_lora_training_client(*a, **k)

    async def create_sampling_client_async(self, *a: Any, **k: Any) -> SamplingClient:
        return self.create_sampling_client(*a, **k)

    async def create_training_client_from_state_async(self, path: str) -> TrainingClient:
        return self.create_training_client_from_state(path)

    async def create_training_client_from_state_with_optimizer_async(self, path: str) -> TrainingClient:
        return self.create_training_client_from_state_with_optimizer(path)
