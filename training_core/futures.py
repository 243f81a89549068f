"""Futures for the engine's ordered work queue.

`APIFuture` mirrors the tinker SDK's: `.result()` blocks, `await fut` / `await fut.result_async()` wait without
blocking the event loop. Attribute access is forwarded to the result, so `tc.forward_backward(...).metrics` works
for callers that treat the sync call as returning the value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class APIFuture(Generic[T]):
    def __init__(self, fut: concurrent.futures.Future[T]) -> None:
        self._fut = fut

    def result(self, timeout: float | None = None) -> T:
        return self._fut.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self._fut), timeout)

    def done(self) -> bool:
        return self._fut.done()

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self._fut).__await__()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.result(), name)


class OrderedWorker:
    """One thread runs submitted callables strictly in submission order.

    Callers prepare the next batch while the engine computes (Tinker's throughput pattern); ordering makes
    `forward_backward` then `optim_step` submitted back to back behave exactly like sequential calls.
    """

    def __init__(self, name: str) -> None:
        self._q: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> APIFuture[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._q.put((fn, fut))
        return APIFuture(fut)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # surfaced to the caller through the future
                fut.set_exception(e)

    def close(self) -> None:
        self._q.put(None)
