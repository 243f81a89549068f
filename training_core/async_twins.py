"""The `*_async` twins of the training primitives, shared by every training client (local and DeepSpeed).

Each twin is a coroutine that submits the sync call and returns its `APIFuture` (Tinker's semantics: awaiting
the twin means "submitted", awaiting the future means "done"). A client only implements the sync calls.
"""

from __future__ import annotations

from typing import Any

from training_core.futures import APIFuture


class AsyncTwins:
    """Mixin: `forward_async`, `forward_backward_async`, ... over the class's own sync primitives."""

    forward: Any
    forward_backward: Any
    forward_backward_custom: Any
    optim_step: Any
    save_state: Any
    save_weights_for_sampler: Any
    load_state: Any
    load_state_with_optimizer: Any
    save_weights_and_get_sampling_client: Any

    async def forward_async(self, *a: Any, **k: Any) -> APIFuture[Any]:
        return self.forward(*a, **k)

    async def forward_backward_async(self, *a: Any, **k: Any) -> APIFuture[Any]:
        return self.forward_backward(*a, **k)

    async def forward_backward_custom_async(self, *a: Any, **k: Any) -> APIFuture[Any]:
        return self.forward_backward_custom(*a, **k)

    async def optim_step_async(self, *a: Any, **k: Any) -> APIFuture[Any]:
        return self.optim_step(*a, **k)

    async def save_state_async(self, *a: Any, **k: Any) -> APIFuture[Any]:
        return self.save_state(*a, **k)

    async def save_weights_for_sampler_async(self, *a: Any, **k: Any) -> APIFuture[Any]:
        return self.save_weights_for_sampler(*a, **k)

    async def load_state_async(self, path: str) -> APIFuture[Any]:
        return self.load_state(path)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[Any]:
        return self.load_state_with_optimizer(path)

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None) -> Any:
        return self.save_weights_and_get_sampling_client(name)
