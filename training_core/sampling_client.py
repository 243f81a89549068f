"""SamplingClient: batched KV-cache sampling and prompt logprobs over a base model or an adapter."""

from __future__ import annotations

import weakref
from typing import Any

from training_core.engine import Engine, InputError
from training_core.futures import APIFuture
from training_core.types import ModelInput, SampleResponse, SamplingParams


class SamplingClient:
    def __init__(self, engine: Engine, adapter: str | None, model_path: str | None = None, *, owned: bool = False):
        self._engine, self._adapter, self.model_path = engine, adapter, model_path
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._closed = False
        if owned and adapter is not None:  # snapshot adapters die with their client
            self._finalizer = weakref.finalize(self, lambda: engine.submit(lambda: engine.remove_adapter(adapter)))
            self._finalizer.atexit = False  # at interpreter exit the worker thread may already be gone

    def close(self) -> None:
        """Free this client's own adapter now (a snapshot or a loaded checkpoint); the base model stays."""
        self._closed = True
        if self._finalizer is not None and self._finalizer.detach() is not None:
            eng, name = self._engine, self._adapter
            eng.submit(lambda: eng.remove_adapter(name)).result()  # type: ignore[arg-type]

    # ---- internals ---------------------------------------------------------------------------------
    def _eos_ids(self) -> list[int]:
        tok = self._engine.base.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen = getattr(self._engine.base.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, list):
            ids.update(extra)
        return sorted(ids)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("sampling client is closed: its adapter has been freed")

    def _check_prompt(self, i: int, toks: list[int]) -> None:
        vocab = self._engine.base.vocab_size
        if not toks:
            raise InputError(f"prompt {i} is empty")
        for j, t in enumerate(toks):
            if not 0 <= t < vocab:
                raise InputError(f"prompt {i}: token id {t} at position {j} outside vocab [0, {vocab})")
        if len(toks) > self._engine.base.max_length:
            raise InputError(f"prompt {i}: {len(toks)} tokens exceed the context of {self._engine.base.max_length}")

    def _run_batch(
        self, prompts: list[ModelInput], params: SamplingParams, num_samples: int,
        include_prompt_logprobs: bool, topk_prompt_logprobs: int,
    ) -> list[SampleResponse]:
        from training_core import sampler

        self._check_open()
        toks = [p.to_ints() for p in prompts]
        for i, t in enumerate(toks):
            self._check_prompt(i, t)
        eng = self._engine
        with eng.activate(self._adapter):
            seqs = sampler.sample_batch(eng.model, toks, params, num_samples, eos_token_ids=self._eos_ids(),
                                        tokenizer=eng.base.tokenizer, cache_key=eng.weights_key(self._adapter))
            out = []
            for t, s in zip(toks, seqs, strict=True):
                plp, topk = (None, None)
                if include_prompt_logprobs or topk_prompt_logprobs:
                    plp, topk = sampler.prompt_logprobs(eng.model, t, topk_prompt_logprobs)
                out.append(SampleResponse(sequences=s, prompt_logprobs=plp if include_prompt_logprobs else None,
                                          topk_prompt_logprobs=topk if topk_prompt_logprobs else None))
        return out

    # ---- Tinker API --------------------------------------------------------------------------------
    def sample(
        self, prompt: ModelInput, num_samples: int = 1, sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
    ) -> APIFuture[SampleResponse]:
        params = sampling_params or SamplingParams()
        return self._engine.submit(
            lambda: self._run_batch([prompt], params, num_samples, include_prompt_logprobs, topk_prompt_logprobs)[0]
        )

    async def sample_async(self, *args: Any, **kwargs: Any) -> APIFuture[SampleResponse]:
        return self.sample(*args, **kwargs)

    def sample_batch(
        self, prompts: list[ModelInput], sampling_params: SamplingParams | None = None, num_samples: int = 1
    ) -> APIFuture[list[SampleResponse]]:
        """Extension: many prompts in one batched generation (evaluation throughput)."""
        params = sampling_params or SamplingParams()
        return self._engine.submit(lambda: self._run_batch(prompts, params, num_samples, False, 0))

    async def sample_batch_async(self, *args: Any, **kwargs: Any) -> APIFuture[list[SampleResponse]]:
        return self.sample_batch(*args, **kwargs)

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        def run() -> list[float | None]:
            from training_core import sampler

            self._check_open()
            toks = prompt.to_ints()
            self._check_prompt(0, toks)
            with self._engine.activate(self._adapter):
                return sampler.prompt_logprobs(self._engine.model, toks, 0)[0]

        return self._engine.submit(run)

    async def compute_logprobs_async(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        return self.compute_logprobs(prompt)

    def get_tokenizer(self) -> Any:
        return self._engine.base.tokenizer

    @property
    def base_model(self) -> str:
        return self._engine.base.name
