"""Waiting for a `tuneloop serve` process to answer (tests, the bench): light, imports only httpx."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float, log_tail: Callable[[], str]) -> None:
    """Poll `url`/api/v1/healthz until it answers 200; fail at once, with the log's tail, if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}: {log_tail()}")
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not up after {timeout}s: {log_tail()}")
