"""Entry points of the DeepSpeed backend: a factory, a ServiceClient look-alike, and a backend switch."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from training_core import state as state_io
from training_core.distributed import protocol as P
from training_core.distributed.client import DistributedTrainingClient
from training_core.distributed.controller import WorkerPool
from training_core.types import LoraConfig

DEFAULT_TIMEOUT_S = 600.0


def _default_root() -> Path:
    from training_core.service_client import default_checkpoint_root

    return default_checkpoint_root()


def create_distributed_training_client(
    base_model: str,
    *,
    world_size: int = 2,
    zero_stage: int = 2,
    lora: LoraConfig | None = None,
    checkpoint_root: str | Path | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    pool: WorkerPool | None = None,
    compute_dtype: str = "float32",
    ds_config_overrides: dict[str, Any] | None = None,
    zero3_init: bool = True,
    startup_timeout_s: float = 300.0,
    user_metadata: dict[str, str] | None = None,
    model_id: str | None = None,
    model_config: dict[str, Any] | None = None,
) -> DistributedTrainingClient:
    """A training client whose work runs on `world_size` DeepSpeed ranks (ZeRO `zero_stage`).

    `lora=None` is full fine-tuning. Without `pool`, the client starts its own ranks and stops them on
    `close()`; with `pool`, it opens a session on those ranks (several clients can share one pool).
    `timeout_s` bounds every call: a rank that hangs longer, or dies, fails the call and all ranks are killed.
    `model_config` (benchmarks): random-init this HF config dict (with "model_type") instead of loading the
    weights of `base_model`, whose tokenizer is still used.
    """
    from training_core.model_loading import resolve

    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage!r}")
    if lora is not None and lora.rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {lora.rank}")
    ds_config = P.build_ds_config(zero_stage, ds_config_overrides)
    model_path = resolve(base_model)  # build a preset here, once, not in N racing ranks
    owns = pool is None
    if pool is None:
        pool = WorkerPool(world_size, timeout_s=timeout_s, startup_timeout_s=startup_timeout_s)
    elif pool.world_size != world_size:
        raise ValueError(f"pool has {pool.world_size} ranks, world_size={world_size} was asked for")
    sid = pool.new_sid()
    args = {
        "model_path": model_path,
        "zero_stage": zero_stage,
        "lora": asdict(lora) if lora is not None else None,
        "compute_dtype": compute_dtype,
        "ds_config": ds_config,
        "zero3_init": zero3_init,
        "model_config": model_config,
    }
    try:
        info = pool.submit(
            lambda: pool.call("init_session", sid, args, max(timeout_s, startup_timeout_s))
        ).result()[0]
    except BaseException:
        if owns:
            pool.close()
        raise
    mid = model_id or f"ds-{uuid.uuid4().hex[:8]}-train-{sid}"  # a directory name: no ":"
    return DistributedTrainingClient(
        pool,
        sid,
        info,
        base_model=base_model,
        model_path=model_path,
        lora=lora,
        zero_stage=zero_stage,
        checkpoint_root=Path(checkpoint_root or _default_root()),
        model_id=mid,
        owns_pool=owns,
        user_metadata=user_metadata,
    )


class DistributedServiceClient:
    """`ServiceClient`'s creation methods over one shared pool of DeepSpeed ranks (started on first use)."""

    def __init__(
        self,
        checkpoint_root: str | Path | None = None,
        *,
        world_size: int = 2,
        zero_stage: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        compute_dtype: str = "float32",
        ds_config_overrides: dict[str, Any] | None = None,
        startup_timeout_s: float = 300.0,
        session_id: str | None = None,
    ) -> None:
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else _default_root()
        self.world_size, self.zero_stage, self.timeout_s = world_size, zero_stage, timeout_s
        self.compute_dtype, self.ds_config_overrides = compute_dtype, ds_config_overrides
        self.startup_timeout_s = startup_timeout_s
        self.session_id = session_id or f"ds-sess-{uuid.uuid4().hex[:8]}"
        self._pool: WorkerPool | None = None
        self._n = 0

    def _get_pool(self) -> WorkerPool:
        if self._pool is None or self._pool.closed:  # a failed pool is replaced: the retry path
            self._pool = WorkerPool(
                self.world_size, timeout_s=self.timeout_s, startup_timeout_s=self.startup_timeout_s
            )
        return self._pool

    def _create(
        self, base_model: str, lora: LoraConfig | None, user_metadata: dict[str, str] | None
    ) -> DistributedTrainingClient:
        model_id = f"{self.session_id}-train-{self._n}"  # a directory name: no ":" (Windows, S3 tools, scp)
        self._n += 1
        return create_distributed_training_client(
            base_model,
            world_size=self.world_size,
            zero_stage=self.zero_stage,
            lora=lora,
            checkpoint_root=self.checkpoint_root,
            timeout_s=self.timeout_s,
            pool=self._get_pool(),
            compute_dtype=self.compute_dtype,
            ds_config_overrides=self.ds_config_overrides,
            startup_timeout_s=self.startup_timeout_s,
            user_metadata=user_metadata,
            model_id=model_id,
        )

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        lora_alpha: float | None = None,
    ) -> DistributedTrainingClient:
        lora = LoraConfig(
            rank=rank,
            alpha=lora_alpha,
            seed=seed,
            train_attn=train_attn,
            train_mlp=train_mlp,
            train_unembed=train_unembed,
        )
        return self._create(base_model, lora, user_metadata)

    def create_full_training_client(
        self, base_model: str, user_metadata: dict[str, str] | None = None
    ) -> DistributedTrainingClient:
        return self._create(base_model, None, user_metadata)

    def _from_state(self, path: str, with_optimizer: bool) -> DistributedTrainingClient:
        trainer = state_io.read_trainer_state(path)
        lora = LoraConfig(**trainer["lora"]) if trainer.get("lora") is not None else None
        tc = self._create(trainer["base_model"], lora, None)
        (tc.load_state_with_optimizer(path) if with_optimizer else tc.load_state(path)).result()
        return tc

    def create_training_client_from_state(self, path: str) -> DistributedTrainingClient:
        return self._from_state(path, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(self, path: str) -> DistributedTrainingClient:
        return self._from_state(path, with_optimizer=True)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> Any:
        """Sampling runs in this process on the single-process engine."""
        from training_core.service_client import ServiceClient

        sc = ServiceClient(checkpoint_root=self.checkpoint_root, compute_dtype=self.compute_dtype)
        if model_path is not None and state_io.read_trainer_state(model_path).get("full_finetune"):
            return sc.create_sampling_client(base_model=model_path)
        return sc.create_sampling_client(model_path=model_path, base_model=base_model)

    def get_server_capabilities(self) -> dict[str, Any]:
        from training_core.service_client import ServiceClient

        return ServiceClient(checkpoint_root=self.checkpoint_root).get_server_capabilities()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> DistributedServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_service_client(
    backend: str = "local",
    *,
    checkpoint_root: str | Path | None = None,
    compute_dtype: str = "float32",
    world_size: int = 2,
    zero_stage: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    session_id: str | None = None,
) -> Any:
    """`model.backend` switch for pipelines: "local" -> ServiceClient, "deepspeed" -> DistributedServiceClient.

    Both have the same creation methods; call `close()` on the result when done if it has one.
    """
    if backend == "local":
        from training_core.service_client import ServiceClient

        return ServiceClient(checkpoint_root=checkpoint_root, compute_dtype=compute_dtype, session_id=session_id)
    if backend == "deepspeed":
        return DistributedServiceClient(
            checkpoint_root,
            world_size=world_size,
            zero_stage=zero_stage,
            timeout_s=timeout_s,
            compute_dtype=compute_dtype,
            session_id=session_id,
        )
    raise ValueError(f"model.backend must be 'local' or 'deepspeed', got {backend!r}")
