"""`tuneloop serve --backend deepspeed`: a run's training requests execute on N DeepSpeed ZeRO ranks.

Each run is one `DistributedTrainingClient` (a session on the ranks of one shared pool, opened through a
`DistributedServiceClient`). `DeepSpeedEngine` gives the service the subset of the engine's surface that the
training endpoints use (submit, adapters, validate, forward_backward, optim_step, checkpoints), so the
endpoints, futures and per-run seq_id ordering stay the same code as with the local backend.

Checkpoints are written by rank 0 into a scratch directory next to the storage root, then moved into place
and committed as usual. Sampling runs in the server process on the single-process engine, which loads the
saved sampler weights (an ephemeral sampler from `save_weights_and_get_sampling_client` too).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import shutil
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from training_core import state as state_io
from training_core.distributed import DistributedServiceClient, DistributedTrainingClient
from training_core.engine import Engine
from training_core.types import AdamParams, Datum, ForwardBackwardOutput, LoraConfig


class DeepSpeedEngine:
    """The training side of one base model: runs (adapters) are sessions on the shared DeepSpeed ranks.

    Jobs run in FIFO order on one thread of this object (they block on the ranks' futures), like the
    engine's worker; the pool's own command queue orders the ranks' work across runs.
    """

    def __init__(self, backend: DeepSpeedBackend, base_model: str) -> None:
        self._backend, self.base_model = backend, base_model
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tuneloop-serve-ds")
        self.runs: dict[str, DistributedTrainingClient] = {}
        self._names = itertools.count()
        # filled from the first run's rank info: vocab_size/max_length (validate), arch and path (get_info)
        self.base: Any = None

    def submit(self, fn: Any) -> concurrent.futures.Future[Any]:
        return self._worker.submit(fn)

    def new_adapter_name(self, prefix: str = "lora") -> str:
        return f"{prefix}-ds-{next(self._names)}"

    def add_adapter(self, name: str, lora: LoraConfig) -> None:
        tc = self._backend.service.create_lora_training_client(
            self.base_model, rank=lora.rank, seed=lora.seed, train_mlp=lora.train_mlp, train_attn=lora.train_attn,
            train_unembed=lora.train_unembed, lora_alpha=lora.alpha)
        self.runs[name] = tc
        if self.base is None:
            info = tc._info  # noqa: SLF001  # the ranks' model facts, as the client's own validation uses
            self.base = SimpleNamespace(vocab_size=info["vocab_size"], max_length=info["max_length"],
                                        path=tc.model_path, model=SimpleNamespace(
                                            config=SimpleNamespace(model_type=info.get("arch"))))

    def remove_adapter(self, name: str) -> None:
        tc = self.runs.pop(name, None)
        if tc is not None:
            tc.close()  # frees the session on the ranks; the pool stays up

    def validate(self, data: list[Datum], loss_fn: str | None) -> None:
        Engine.validate(self, data, loss_fn)  # type: ignore[arg-type]  # reads only self.base's limits

    def forward_backward(self, adapter: str, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None,
                         backward: bool = True) -> ForwardBackwardOutput:
        tc = self.runs[adapter]
        call = tc.forward_backward if backward else tc.forward
        return call(data, loss_fn, loss_fn_config).result()

    def optim_step(self, adapter: str, adam: AdamParams) -> dict[str, float]:
        return dict(self.runs[adapter].optim_step(adam).result().metrics)

    # ---- checkpoints (hooks of service.training) --------------------------------------------------------
    def save_checkpoint(self, adapter: str, path: Path, *, with_optimizer: bool, metadata: dict[str, Any]) -> Path:
        """Rank 0 writes into the scratch root (atomically, manifest last); then it moves to `path`."""
        tc = self.runs[adapter]
        name = f"serve-{uuid.uuid4().hex[:12]}"
        if with_optimizer:
            written = tc.save_state(name, metadata=metadata).result().path
        else:
            written = tc.save_weights_for_sampler(name, ttl_seconds=metadata.get("ttl_seconds")).result().path
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(written, path)
        return path

    def load_checkpoint(self, adapter: str, path: Path, *, with_optimizer: bool) -> int:
        tc = self.runs[adapter]
        fut = tc.load_state_with_optimizer(str(path)) if with_optimizer else tc.load_state(str(path))
        return int(fut.result())

    def snapshot_for_sampler(self, adapter: str) -> tuple[Engine, str]:
        """An ephemeral sampler: the run's current weights in a new adapter of the local engine."""
        from training_core.engine import get_engine

        tmp = self._backend.scratch / f"snapshot-{uuid.uuid4().hex[:12]}"
        self.save_checkpoint(adapter, tmp, with_optimizer=False, metadata={})
        local = get_engine(self.base_model, self._backend.compute_dtype, self._backend.compute_dtype)
        name = local.new_adapter_name("snap")

        def load() -> None:
            local.add_adapter(name, state_io.lora_config_from_checkpoint(tmp))
            state_io.load_adapter_checkpoint(local, name, tmp, with_optimizer=False)

        try:
            local.submit(load).result()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local, name

    def close(self) -> None:
        """Drop queued jobs; a running one fails when the ranks stop (the pool's close, next)."""
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.runs.clear()


class DeepSpeedBackend:
    """One pool of `world_size` ranks for the server; a `DeepSpeedEngine` per base model on it."""

    def __init__(self, scratch: Path, *, world_size: int, zero_stage: int, compute_dtype: str = "float32") -> None:
        if world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {world_size}")
        if zero_stage not in (2, 3):
            raise ValueError(f"--zero-stage must be 2 or 3, got {zero_stage}")
        self.scratch, self.compute_dtype = scratch, compute_dtype
        scratch.mkdir(parents=True, exist_ok=True)
        self.service = DistributedServiceClient(scratch, world_size=world_size, zero_stage=zero_stage,
                                                compute_dtype=compute_dtype)
        self._engines: dict[str, DeepSpeedEngine] = {}
        self._lock = threading.Lock()

    def engine_for(self, base_model: str) -> DeepSpeedEngine:
        from training_core.model_loading import resolve

        with self._lock:
            if base_model not in self._engines:
                resolve(base_model)  # an unknown base model fails here, as a user error
                self._engines[base_model] = DeepSpeedEngine(self, base_model)
            return self._engines[base_model]

    def close(self) -> None:
        """Stop the ranks (every run's session with them); bounded by the pool's close timeout."""
        with self._lock:
            for eng in self._engines.values():
                eng.close()
            self._engines.clear()
        self.service.close()
