"""The controller side: a pool of N worker ranks it launched and owns, and the command channel to them.

Failure policy: a rank that exits, drops its connection or does not answer within `timeout_s` fails the
call with `DistributedWorkerError`; every rank is then SIGKILLed (a survivor would otherwise sit in a
collective waiting for the dead one) and the pool refuses further calls. Nothing here imports DeepSpeed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any

from training_core.distributed import protocol as P
from training_core.futures import APIFuture, OrderedWorker

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
_POLL_S = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerPool:
    """N local worker ranks (`python -m training_core.distributed.worker`) and an ordered command queue."""

    def __init__(
        self,
        world_size: int = 2,
        *,
        timeout_s: float = 600.0,
        startup_timeout_s: float = 300.0,
        threads_per_rank: int | None = None,
        error_grace_s: float = 15.0,
        env: dict[str, str] | None = None,
        launch: bool = True,
        address: tuple[str, int] = ("127.0.0.1", 0),
        authkey: bytes | None = None,
    ) -> None:
        """`launch=False` (multi-node): start no process; wait on `address` for `world_size` ranks that a
        launcher (`deepspeed --hostfile`, torchrun, a Kubernetes Job) started with TUNELOOP_DS_CONTROLLER
        and TUNELOOP_DS_AUTHKEY set. Such ranks cannot be killed from here: on failure the connections are
        closed and the launcher tears the group down."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size, self.timeout_s, self.error_grace_s = (
            world_size,
            float(timeout_s),
            float(error_grace_s),
        )
        self.failed: str | None = None
        self.closed = False
        self.procs: list[subprocess.Popen[bytes]] = []
        self.conns: list[Connection] = []
        self.pids: list[int] = []
        self.remote_pids: dict[int, tuple[str, int]] = {}  # rank -> (host, pid) as the rank reported it
        self._next_sid = 0
        self._lock = threading.Lock()  # one command on the wire at a time
        self._sid_lock = threading.Lock()
        self._queue_closed = False
        self.log_dir = Path(tempfile.mkdtemp(prefix="tuneloop-ds-"))
        self.queue = OrderedWorker("tuneloop-ds-controller")  # one command at a time, in submission order
        self.launch, self.address, self.authkey = launch, address, authkey or secrets.token_bytes(32)
        try:
            self._start(startup_timeout_s, threads_per_rank, env or {})
        except BaseException:
            self.kill()
            raise

    # ---- start-up ------------------------------------------------------------------------------------
    def _rank_env(
        self, rank: int, port: int, addr: tuple[str, int], key: bytes, threads: int, extra: dict[str, str]
    ) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                P.ENV_CONTROLLER: f"{addr[0]}:{addr[1]}",
                P.ENV_AUTHKEY: key.hex(),
                P.ENV_DIE_WITH_PARENT: "1",
                P.ENV_TIMEOUT: str(int(max(self.timeout_s, 60))),
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
            }
        )
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
        env.update(extra)
        return env

    def _start(self, startup_timeout_s: float, threads_per_rank: int | None, extra: dict[str, str]) -> None:
        key = self.authkey
        listener = Listener(self.address, authkey=key)
        addr = listener.address
        self.address = addr  # the bound port, for launchers in attach mode
        port = free_port()
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // self.world_size)
        accepted: list[Connection] = []
        accept_error: list[BaseException] = []

        def accept_all() -> None:
            try:
                for _ in range(self.world_size):
                    accepted.append(listener.accept())
            except BaseException as e:  # listener closed on timeout, or a failed handshake
                accept_error.append(e)

        t = threading.Thread(target=accept_all, name="tuneloop-ds-accept", daemon=True)
        t.start()
        for r in range(self.world_size if self.launch else 0):
            logf = open(self.log_dir / f"rank{r}.log", "wb")  # noqa: SIM115 (owned by the process)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "training_core.distributed.worker"],
                    env=self._rank_env(r, port, addr, key, threads, extra),
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=str(REPO_ROOT),
                )
            )
            logf.close()
        self.pids = [p.pid for p in self.procs]
        deadline = time.monotonic() + startup_timeout_s
        try:
            while len(accepted) < self.world_size:
                self._check_alive("start-up")
                if accept_error:
                    raise P.DistributedWorkerError(f"worker handshake failed: {accept_error[0]!r}")
                if time.monotonic() > deadline:
                    raise P.DistributedWorkerError(
                        f"only {len(accepted)}/{self.world_size} ranks connected within {startup_timeout_s:.0f} s"
                        f"{self._log_tails()}"
                    )
                time.sleep(_POLL_S)
        finally:
            listener.close()
        by_rank: dict[int, Connection] = {}
        for c in accepted:
            hello = self._recv(c, None, deadline, "start-up (hello)")
            by_rank[int(hello["hello"])] = c
            self.remote_pids[int(hello["hello"])] = (str(hello.get("host")), int(hello["pid"]))
        if sorted(by_rank) != list(range(self.world_size)):
            raise P.DistributedWorkerError(
                f"ranks {sorted(by_rank)} connected, expected 0..{self.world_size - 1}"
            )
        self.conns = [by_rank[r] for r in range(self.world_size)]
        for r, c in enumerate(self.conns):  # joining the process group (gloo rendezvous on MASTER_PORT)
            ready = self._recv(c, r, deadline, "start-up (init_distributed)")
            if not ready.get("ready"):
                raise P.DistributedWorkerError(
                    f"rank {r} failed to initialise torch.distributed: "
                    f"{ready.get('error')}\n{ready.get('traceback', '')}"
                )
        log.info(
            "DeepSpeed worker pool up: %d ranks, pids %s, logs in %s",
            self.world_size,
            self.pids,
            self.log_dir,
        )

    # ---- liveness ------------------------------------------------------------------------------------
    def _log_tails(self, ranks: list[int] | None = None, lines: int = 15) -> str:
        out = []
        for r in ranks if ranks is not None else range(len(self.procs)):
            f = self.log_dir / f"rank{r}.log"
            with contextlib.suppress(OSError):
                tail = f.read_bytes().decode(errors="replace").splitlines()[-lines:]
                out.append(f"\n--- rank {r} log ({f}), last {len(tail)} lines ---\n" + "\n".join(tail))
        return "".join(out)

    def _check_alive(self, what: str, grace_s: float = 0.0) -> None:
        """Raise for the first rank process that has exited; `grace_s` waits for an exit that is under way
        (a closed connection usually arrives a moment before the process is reaped)."""
        deadline = time.monotonic() + grace_s
        while grace_s > 0 and all(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for r, p in enumerate(self.procs):
            code = p.poll()
            if code is not None:
                how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                raise P.DistributedWorkerError(
                    f"rank {r} (pid {p.pid}) {how} during {what}{self._log_tails([r])}"
                )

    def _recv(self, c: Connection, rank: int | None, deadline: float, what: str) -> dict[str, Any]:
        while True:
            if c.poll(_POLL_S):
                try:
                    return P.recv(c)
                except (EOFError, OSError, pickle.UnpicklingError) as e:
                    self._check_alive(what, grace_s=2.0)
                    raise P.DistributedWorkerError(
                        f"rank {rank} closed its connection during {what}: {e!r}"
                    ) from e
            self._check_alive(what)
            if time.monotonic() > deadline:
                raise P.DistributedWorkerError(
                    f"rank {rank} did not answer within the timeout during {what} "
                    f"(hung?){self._log_tails([rank] if rank is not None else None)}"
                )

    # ---- commands ------------------------------------------------------------------------------------
    def new_sid(self) -> int:
        with self._sid_lock:
            self._next_sid += 1
            return self._next_sid

    def submit(self, fn: Any) -> APIFuture[Any]:
        return self.queue.submit(fn)

    def call(
        self,
        op: str,
        sid: int | None,
        args: dict[str, Any] | list[dict[str, Any]],
        timeout_s: float | None = None,
    ) -> list[Any]:
        """Send `op` to every rank (a list gives each rank its own args); return the results by rank."""
        with self._lock:
            if self.failed:
                raise P.DistributedWorkerError(
                    f"the worker pool has failed earlier and was shut down: {self.failed}"
                )
            if self.closed:
                raise P.DistributedWorkerError("the worker pool is closed")
            try:
                return self._call(op, sid, args, timeout_s if timeout_s is not None else self.timeout_s)
            except P.DistributedWorkerError as e:
                self.failed = str(e).splitlines()[0]
                self.kill()
                raise

    def _call(
        self, op: str, sid: int | None, args: dict[str, Any] | list[dict[str, Any]], timeout_s: float
    ) -> list[Any]:
        what = f"{op} (session {sid})"
        per_rank = args if isinstance(args, list) else [args] * self.world_size
        for r, c in enumerate(self.conns):
            try:
                P.send(c, {"op": op, "sid": sid, "args": per_rank[r]})
            except (OSError, ValueError) as e:
                self._check_alive(what)
                raise P.DistributedWorkerError(f"cannot send {what} to rank {r}: {e!r}") from e
        replies: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        pending = {c: r for r, c in enumerate(self.conns)}
        while pending:
            ready = wait(list(pending), timeout=_POLL_S)
            for c in ready:
                r = pending.pop(c)  # type: ignore[call-overload]
                try:
                    replies[r] = P.recv(c)  # type: ignore[arg-type]
                except (EOFError, OSError, pickle.UnpicklingError) as e:
                    self._check_alive(what, grace_s=2.0)
                    raise P.DistributedWorkerError(
                        f"rank {r} closed its connection during {what}: {e!r}{self._log_tails([r])}"
                    ) from e
            if not ready:
                self._check_alive(what)
            if pending and any(not x["ok"] for x in replies.values()):
                deadline = min(
                    deadline, time.monotonic() + self.error_grace_s
                )  # peers may be stuck in a collective
            if pending and time.monotonic() > deadline:
                late = sorted(pending.values())
                errs = "".join(f"\nrank {r}: {x['error']}" for r, x in replies.items() if not x["ok"])
                raise P.DistributedWorkerError(
                    f"rank(s) {late} did not answer {what} within "
                    f"{timeout_s:.0f} s (hung?){errs}{self._log_tails(late)}"
                )
        errors = {r: x for r, x in replies.items() if not x["ok"]}
        if errors and len(errors) < self.world_size:  # some ranks went on: their states may now differ
            r, x = next(iter(errors.items()))
            raise P.DistributedWorkerError(
                f"{what} failed on rank(s) {sorted(errors)} only: {x['error']}\n{x.get('traceback', '')}"
            )
        if errors:
            x = errors[0]
            raise P.DistributedCallError(
                f"{what} failed: {x['error']}\n--- rank 0 traceback ---\n{x.get('traceback', '')}"
            )
        return [replies[r]["result"] for r in range(self.world_size)]

    # ---- shutdown ------------------------------------------------------------------------------------
    def kill(self) -> None:
        """SIGKILL every rank this pool started (by pid) and reap them."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.close()
        self.closed = True

    def close(self, timeout_s: float = 15.0) -> None:
        """Ask the ranks to exit; kill what is still there after `timeout_s`."""
        with self._lock:
            if self.closed:  # killed after a failure: only the command thread is left to stop
                self._close_queue()
                return
            if not self.failed:
                with contextlib.suppress(Exception):
                    self._call("shutdown", None, {}, timeout_s)
                deadline = time.monotonic() + timeout_s
                for p in self.procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=max(0.1, deadline - time.monotonic()))
            self.kill()
            self._close_queue()
            if not self.failed:
                shutil.rmtree(self.log_dir, ignore_errors=True)  # kept after a failure, for the post-mortem

    def _close_queue(self) -> None:
        if not self._queue_closed:  # after the commands already queued (they fail fast: the pool is closed)
            self._queue_closed = True
            self.queue.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self.closed:
                self.kill()
