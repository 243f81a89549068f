"""Shared helpers of the `tuneloop serve` tests: a server subprocess on 127.0.0.1, API keys, a real
PostgreSQL server started by the test.

Every wait polls with a deadline; callers stop what they start in a fixture finalizer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.health import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts (`tinker`, `tuneloop`)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_key(keys: Path, name: str) -> str:
    """A fresh API key (the secret) stored, hashed, in `keys`."""
    from service.keys import create_key

    return create_key(keys, name)[0]


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a server or client subprocess: offline, one intra-op thread, unbuffered."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", "TINKER_TELEMETRY": "0", "OMP_NUM_THREADS": "1", **extra}


class Server:
    """`python -m service` on a free port; `start` again after `kill9` restarts it on the same state."""

    def __init__(self, state: Path, keys: Path, db_url: str | None = None, extra_args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None) -> None:
        self.state, self.keys, self.db_url, self.port = state, keys, db_url, free_port()
        self.extra_args, self.extra_env = list(extra_args), dict(extra_env or {})
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state / "server.log"

    def start(self, timeout: float = 180.0) -> None:
        # one intra-op thread: on a shared, oversubscribed CPU torch's OpenMP threads spin-wait for each
        # other and a tiny step takes 10-20x longer (measured: forward 1.5 s -> 0.09 s at load 11 on 2 cores)
        cmd = [sys.executable, "-m", "service", "--port", str(self.port), "--state-dir", str(self.state),
               "--keys", str(self.keys), "--log-level", "warning", "--max-body-mb", "4", "--torch-threads", "1"]
        if self.db_url:
            cmd += ["--db", self.db_url]
        cmd += self.extra_args
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=offline_env(**self.extra_env), stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.proc, timeout, lambda: self.log.read_text()[-3000:])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)


def postgres_bin_dir() -> Path:
    """/usr/lib/postgresql/<newest>/bin (Debian's `postgresql` package; `make sysdeps` installs it)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run `make sysdeps` (Debian package postgresql)")
    return found[-1].parent


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1:<free port>, data dir under a temp dir.

    PostgreSQL refuses to run as root: as root, initdb/postgres run as the `postgres` user (created by the
    Debian package), on a data dir that user owns. Trust auth, listening on loopback only.
    """

    def __init__(self) -> None:
        self.bin = postgres_bin_dir()
        self.port = free_port()
        # not under pytest's tmp dir: that one is private to root (0700) and the postgres user must enter it
        self.root = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
        self.data, self.sock = self.root / "data", self.root / "sock"
        self.log = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: dict[str, str] = {}
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o755)
            for d in (self.data, self.sock):
                d.mkdir(mode=0o700)
                os.chown(d, user.pw_uid, user.pw_gid)
            self.log.touch()
            os.chown(self.log, user.pw_uid, user.pw_gid)
            self._user = {"user": "postgres", "group": "postgres"}  # setuid in the child: signals reach it
        else:
            self.sock.mkdir()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        init = subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                               "--no-sync", "-E", "UTF8", "--locale=C"], capture_output=True, text=True, env=env,
                              cwd=self.root, timeout=120, **self._user)  # type: ignore[call-overload]
        assert init.returncode == 0, init.stdout + init.stderr
        with open(self.log, "ab") as log:
            # fsync off, no sync commit: a throwaway server; durability across *our* server's kill -9 is the
            # database server's (it stays up), not the disk's
            self.proc = subprocess.Popen(  # type: ignore[call-overload]
                [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", str(self.sock), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                **self._user)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"postgres exited: {self.log.read_text()[-3000:]}"
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                                    "-U", "postgres"], capture_output=True, env=env)
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"postgres not ready after {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # "fast" shutdown
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
