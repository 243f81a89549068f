"""DistributedTrainingClient: the TrainingClient surface, executed by N DeepSpeed ZeRO ranks.

The batch of every call is split into contiguous per-rank shards; each rank sums its tokens' loss and
DeepSpeed reduces the gradients, so the step equals the single-process one on the whole batch (up to fp32
summation order). Logprobs come back in datum order and `loss:sum` is the sum over ranks.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file

from training_core import losses
from training_core import state as state_io
from training_core.async_twins import AsyncTwins
from training_core.checkpoint import CheckpointExistsError
from training_core.distributed import protocol as P
from training_core.distributed.controller import WorkerPool
from training_core.engine import Engine, InputError
from training_core.futures import APIFuture
from training_core.sampling_client import SamplingClient
from training_core.training_client import CustomLossFn
from training_core.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoraConfig,
    ModelData,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)


class DistributedTrainingClient(AsyncTwins):
    def __init__(
        self,
        pool: WorkerPool,
        sid: int,
        info: dict[str, Any],
        *,
        base_model: str,
        model_path: str,
        lora: LoraConfig | None,
        zero_stage: int,
        checkpoint_root: Path,
        model_id: str,
        owns_pool: bool,
        user_metadata: dict[str, str] | None = None,
    ) -> None:
        self._pool, self._sid, self._info = pool, sid, info
        self.base_model, self.model_path, self.lora, self.zero_stage = (
            base_model,
            model_path,
            lora,
            zero_stage,
        )
        self._root, self.model_id, self._owns_pool = Path(checkpoint_root), model_id, owns_pool
        self.user_metadata = dict(user_metadata or {})
        self._step = 0
        self._closed = False
        self._tokenizer: Any = None
        self._limits = SimpleNamespace(
            base=SimpleNamespace(vocab_size=info["vocab_size"], max_length=info["max_length"])
        )

    @property
    def world_size(self) -> int:
        return self._pool.world_size

    # ---- plumbing ------------------------------------------------------------------------------------
    def _submit(self, fn: Any) -> APIFuture[Any]:
        if self._closed or self._pool.closed:
            why = self._pool.failed or "the client is closed"
            raise P.DistributedWorkerError(f"DistributedTrainingClient {self.model_id} is unusable: {why}")
        return self._pool.submit(fn)

    def _validate(self, data: list[Datum], loss_fn: str | None) -> None:
        Engine.validate(self._limits, data, loss_fn)  # type: ignore[arg-type]  # the engine's own checks

    def _shards(self, data: list[Any]) -> list[tuple[list[Any], bool]]:
        return P.shard_batch(data, self.world_size)

    # ---- compute -------------------------------------------------------------------------------------
    def _forward(
        self, data: list[Datum], loss_fn: str, cfg: dict[str, float] | None, backward: bool
    ) -> ForwardBackwardOutput:
        losses.check_loss_fn(loss_fn, cfg)
        self._validate(data, loss_fn)
        # mixed / non-finite loss inputs fail here, for the whole batch: a rank raising alone would leave the
        # others waiting in the backward's collectives until the timeout
        Engine.flat_inputs(data)
        args = [
            {"data": d, "stand_in": s, "loss_fn": loss_fn, "loss_fn_config": cfg, "backward": backward}
            for d, s in self._shards(data)
        ]
        res = self._pool.call("forward", self._sid, args)
        lps = [lp for r in res for lp in r["logprobs"]]
        return Engine._output(lps, {"loss:sum": float(sum(r["loss"] for r in res))})

    def forward(
        self,
        data: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._submit(lambda: self._forward(data, loss_fn, loss_fn_config, backward=False))

    def forward_backward(
        self,
        data: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._submit(lambda: self._forward(data, loss_fn, loss_fn_config, backward=True))

    def _custom(self, data: list[Datum], fn: CustomLossFn) -> ForwardBackwardOutput:
        """Two passes (as Tinker): logprobs, the user's loss and dL/dlogprob here, then sum(lp * dL/dlp) on ranks."""
        self._validate(data, None)
        first = self._forward(data, "cross_entropy", None, backward=False)
        lps = [o["logprobs"].to_torch().reshape(-1).requires_grad_(True) for o in first.loss_fn_outputs]
        loss, metrics = fn(data, lps)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise InputError(
                "forward_backward_custom: the loss function must return (scalar tensor, metrics dict)"
            )
        loss.backward()
        grads = [lp.grad.detach() if lp.grad is not None else torch.zeros_like(lp) for lp in lps]
        args = []
        for (d, stand_in), (g, _) in zip(self._shards(data), self._shards(grads), strict=True):
            args.append({"data": d, "stand_in": stand_in, "grads": g, "backward": True})
        self._pool.call("backward_linear", self._sid, args)
        out = {f"{k}" if ":" in k else f"{k}:sum": float(v) for k, v in (metrics or {}).items()}
        out["loss:sum"] = float(loss.detach())
        return ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord", loss_fn_outputs=first.loss_fn_outputs, metrics=out
        )

    def forward_backward_custom(
        self, data: list[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._submit(lambda: self._custom(data, loss_fn))

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        params = adam_params or AdamParams()

        def run() -> OptimStepResponse:
            metrics = self._pool.call("optim_step", self._sid, {"adam": asdict(params)})[0]
            self._step = int(metrics["step:max"])
            return OptimStepResponse(metrics)

        return self._submit(run)

    # ---- state ---------------------------------------------------------------------------------------
    def _path(self, segment: str, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid checkpoint name {name!r}: no '/', not empty, not hidden")
        return self._root / self.model_id / segment / name

    def _save(self, path: Path, kind: str, metadata: dict[str, Any]) -> str:
        if path.exists():
            raise CheckpointExistsError(
                f"checkpoint {path} already exists; refusing to overwrite a finished checkpoint"
            )
        trainer = {
            "base_model": self.base_model,
            "lora": asdict(self.lora) if self.lora is not None else None,
            "backend": "deepspeed",
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
        }
        args: dict[str, Any] = {"path": str(path), "kind": kind, "trainer": trainer, "metadata": metadata}
        if kind == "state":
            args["rng_tensors"], args["rng_json"] = (
                state_io.rng_snapshot()
            )  # the caller's RNG, as the engine does
        out = self._pool.call("save", self._sid, args)[0]
        if "error" in out:
            raise P.DistributedCallError(f"writing checkpoint {path} failed on rank 0: {out['error']}")
        return str(out["path"])

    def save_state(
        self, name: str, ttl_seconds: int | None = None, metadata: dict[str, Any] | None = None
    ) -> APIFuture[SaveWeightsResponse]:
        """Weights + optimizer moments + step + RNG, gathered from all shards, committed atomically by rank 0."""
        path = self._path("weights", name)
        meta = {"ttl_seconds": ttl_seconds, "user_metadata": self.user_metadata, **(metadata or {})}
        return self._submit(lambda: SaveWeightsResponse(self._save(path, "state", meta)))

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        path = self._path("sampler_weights", name)
        meta = {"ttl_seconds": ttl_seconds, "user_metadata": self.user_metadata}
        return self._submit(lambda: SaveWeightsForSamplerResponse(self._save(path, "sampler", meta)))

    def _load(self, path: str, with_optimizer: bool) -> int:
        trainer = state_io.read_trainer_state(path)  # verifies every file's sha256 first
        step = int(
            self._pool.call("load", self._sid, {"path": str(path), "with_optimizer": with_optimizer})[0]
        )
        if with_optimizer:
            state_io.rng_restore(load_file(str(Path(path) / state_io.RNG)), trainer["rng"])
        self._step = step
        return step

    def load_state(self, path: str) -> APIFuture[Any]:
        """Weights only: the optimizer starts fresh and the step counter resets."""
        return self._submit(lambda: self._load(path, with_optimizer=False))

    def load_state_with_optimizer(self, path: str) -> APIFuture[Any]:
        """Weights + optimizer moments + step + RNG, from a checkpoint of any world size or backend."""
        return self._submit(lambda: self._load(path, with_optimizer=True))

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        """Sample in this process with the single-process engine (LoRA adapter or full HF model dir)."""
        from training_core.service_client import ServiceClient

        sc = ServiceClient(checkpoint_root=self._root)
        if state_io.read_trainer_state(model_path).get("full_finetune"):
            return sc.create_sampling_client(base_model=model_path)
        return sc.create_sampling_client(model_path=model_path)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        path = self.save_weights_for_sampler(name or f"snapshot-{uuid.uuid4().hex[:8]}").result().path
        return self.create_sampling_client(path)

    # ---- info ----------------------------------------------------------------------------------------
    def get_info(self) -> GetInfoResponse:
        rank = self.lora.rank if self.lora is not None else None
        return GetInfoResponse(
            model_id=self.model_id,
            model_data=ModelData(
                arch=self._info.get("arch"), model_name=self.base_model, tokenizer_id=self.model_path
            ),
            is_lora=self.lora is not None,
            lora_rank=rank,
            model_name=self.base_model,
        )

    def get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.model_path)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    @property
    def step(self) -> int:
        return self._step

    @property
    def param_names(self) -> list[str]:
        return list(self._info["param_names"])

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Checkpoint key -> full fp32 tensor, gathered from the shards (PEFT canonical keys for LoRA)."""
        return self._submit(lambda: self._pool.call("get_params", self._sid, {})[0]).result()

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Gathered Adam moments in the checkpoint layout (`{i}.exp_avg`, ...); empty before the first step."""
        return self._submit(lambda: self._pool.call("get_optimizer", self._sid, {})[0]).result()

    def memory_stats(self) -> list[dict[str, float]]:
        """Per rank: peak and current RSS (MiB) and the element counts of the ZeRO partitions it holds."""
        return self._submit(lambda: self._pool.call("stats", self._sid, {})).result()

    def close(self) -> None:
        """Free this session on the ranks; stop the ranks too if this client started them."""
        if self._closed:
            return
        if not self._pool.closed:
            with contextlib.suppress(Exception):
                self._pool.submit(lambda: self._pool.call("close_session", self._sid, {}, 60)).result()
        self._closed = True
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> DistributedTrainingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
