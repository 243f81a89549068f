"""Local service stack as background processes: SeaweedFS S3, MLflow server/UI, Prefect server, and
`tuneloop serve` (the Tinker API for the tinker SDK and cookbook).

    tuneloop services up [s3|mlflow|prefect|serve ...]  # start (all by default), print the env to use them
    tuneloop services status | down [...]
    python -m infra.services up s3 --env-file F      # for .ci/run: writes TUNELOOP_TEST_S3_* to F
    python -m infra.services down s3

State lives in --state-dir (default $TUNELOOP_SERVICES_DIR or .tuneloop/services): per service a JSON record
(pid, url, log), a log file and its data. Servers bind 127.0.0.1 only, run in their own session (so they
outlive the CLI), and are stopped by PID after checking the PID still runs the expected program.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.config import BadInputError
from infra.s3_server import HOST, SeaweedS3Server, free_ports, pid_alive, pid_cmdline, stop_pid

SERVICES = ("s3", "mlflow", "prefect", "serve")  # serve after s3: it keeps its checkpoints there when s3 runs
DEFAULT_PORTS = {"mlflow": 5000, "prefect": 4200, "serve": 8000}
_QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else 7 huey workers, ~2.4 GB RSS
}


def default_state_dir() -> Path:
    return Path(os.environ.get("TUNELOOP_SERVICES_DIR", ".tuneloop/services")).resolve()


@dataclass
class ServiceRecord:
    name: str
    pid: int
    url: str
    log: str
    cmd_marker: str  # a string the live process's cmdline must contain before we signal it
    started_at: float = field(default_factory=time.time)
    env: dict[str, str] = field(default_factory=dict)  # what a client exports to use it
    health: str = ""  # URL answering 200 when ready ("" = none)

    def wait_ready(self, timeout: float) -> None:
        if self.health:
            try:
                wait_http_ok(self.health, timeout, self.pid, Path(self.log))
            except BaseException:
                self.stop()
                raise

    def stop(self, timeout: float = 20.0) -> bool:
        return stop_pid(self.pid, timeout, expect_in_cmdline=self.cmd_marker)

    def alive(self) -> bool:
        """Running and still our program (a recycled PID does not count)."""
        return pid_alive(self.pid) and self.cmd_marker in pid_cmdline(self.pid)


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name!r} not found next to {sys.executable} or on PATH; install the dev extras"
        )
    return found


def _port(requested: int | None, default: int | None) -> int:
    """The requested port, else the default if free, else any free port."""
    if requested:
        return requested
    if default:
        import socket

        with socket.socket() as s:
            try:
                s.bind((HOST, default))
                return default
            except OSError:
                pass
    return free_ports(1)[0]


def wait_http_ok(url: str, timeout: float, pid: int | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if pid is not None and not pid_alive(pid):
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"server (pid {pid}) exited before {url} answered; log tail:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s ({last})")


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **_QUIET_ENV, **env}, start_new_session=True, close_fds=True,
        )  # fmt: skip


def start_mlflow_server(
    backend_store_uri: str,
    artifacts_dir: str | Path,
    log: str | Path,
    *,
    port: int | None = None,
    timeout: float = 90.0,
    wait: bool = True,
) -> ServiceRecord:
    """`mlflow server` on 127.0.0.1 with one worker and no job-execution workers.

    wait=False returns at once (call rec.wait_ready later) so a caller can overlap the ~10 s start-up."""
    port = _port(port, None)
    url = f"http://{HOST}:{port}"
    cmd = [
        _tool("mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts_dir),
    ]  # fmt: skip
    proc = _spawn(cmd, Path(log), {})
    rec = ServiceRecord(
        "mlflow", proc.pid, url, str(log), "mlflow", env={"MLFLOW_TRACKING_URI": url}, health=f"{url}/health"
    )
    if wait:
        rec.wait_ready(timeout)
    return rec


def start_prefect_server(
    home: str | Path, log: str | Path, *, port: int | None = None, timeout: float = 120.0
) -> ServiceRecord:
    port = _port(port, None)
    url = f"http://{HOST}:{port}/api"
    cmd = [_tool("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    proc = _spawn(cmd, Path(log), {"PREFECT_HOME": str(home)})
    rec = ServiceRecord(
        "prefect", proc.pid, url, str(log), "prefect", env={"PREFECT_API_URL": url}, health=f"{url}/health"
    )
    rec.wait_ready(timeout)
    return rec


def _s3_credentials(d: Path) -> tuple[str, str]:
    """Keys kept across restarts (the data persists, so should the identity); file is 0600."""
    path = d / "credentials.json"
    if path.exists():
        cred = json.loads(path.read_text())
        return cred["access_key"], cred["secret_key"]
    d.mkdir(parents=True, exist_ok=True)
    ak, sk = "tl" + secrets.token_hex(8), secrets.token_hex(20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_key": ak, "secret_key": sk}, f)
    return ak, sk


def start_s3(state: Path, buckets: tuple[str, ...] = ("tuneloop",)) -> ServiceRecord:
    d = state / "s3"
    ak, sk = _s3_credentials(d)
    server = SeaweedS3Server(
        d / "data", access_key=ak, secret_key=sk, buckets=buckets, log_path=state / "s3.log"
    )
    ep = server.start(timeout=60)
    if server.pid is None:
        raise RuntimeError("weed mini did not start")
    return ServiceRecord("s3", server.pid, ep.url, str(state / "s3.log"), "weed", env=ep.aws_env())


def _serve_client_key(d: Path) -> str:
    """The API key `services up serve` mints on first start (stored hashed in the server's keys file; the
    secret kept 0600 beside it, like the S3 credentials) so the printed env works at once."""
    path = d / "client-key.json"
    if path.exists():
        return str(json.loads(path.read_text())["api_key"])
    from service.keys import create_key

    d.mkdir(parents=True, exist_ok=True)
    secret = create_key(d / "keys.json", f"services-{secrets.token_hex(3)}")[0]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api_key": secret}, f)
    return secret


def start_serve(state: Path, *, port: int | None = None, db: str | None = None, storage: str | None = None,
                timeout: float = 120.0) -> ServiceRecord:
    """`tuneloop serve` on 127.0.0.1; checkpoints in the S3 server of the same state dir when that one runs
    (s3://tuneloop/serve), else under STATE/serve; the database is `db` or an SQLite file there."""
    d = (state / "serve").resolve()
    key = _serve_client_key(d)
    env: dict[str, str] = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    s3 = load_record(state, "s3")
    if storage is None and s3 is not None and s3.alive():
        storage = "s3://tuneloop/serve"
    if storage is not None and storage.startswith("s3://") and s3 is not None and s3.alive():
        env.update(s3.env)  # the endpoint and credentials of our S3 server
    port = _port(port, None)
    url = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "service", "--host", HOST, "--port", str(port), "--state-dir", str(d),
           "--keys", str(d / "keys.json")]
    cmd += ["--db", db] if db else []
    cmd += ["--storage", storage] if storage else []
    proc = _spawn(cmd, state / "serve.log", env)
    # the state dir is in the command line: the marker tells this server from any other `python -m service`
    rec = ServiceRecord("serve", proc.pid, url, str(state / "serve.log"), f"--state-dir {d}",
                        env={"TINKER_BASE_URL": url, "TINKER_API_KEY": key}, health=f"{url}/api/v1/healthz")
    rec.wait_ready(timeout)
    return rec


def _record_path(state: Path, name: str) -> Path:
    return state / f"{name}.json"


def load_record(state: Path, name: str) -> ServiceRecord | None:
    p = _record_path(state, name)
    return ServiceRecord(**json.loads(p.read_text())) if p.exists() else None


def save_record(state: Path, rec: ServiceRecord) -> None:
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(_record_path(state, rec.name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold keys
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(rec), f, indent=2)


def up(
    name: str, state: Path, *, port: int | None = None, mlflow_backend: str | None = None,
    serve_db: str | None = None, serve_storage: str | None = None,
) -> ServiceRecord:
    """Start one service unless it already runs; returns its record."""
    rec = load_record(state, name)
    if rec is not None and rec.alive():
        return rec
    if name == "s3":
        rec = start_s3(state)
    elif name == "mlflow":
        # Same default store as infra.tracking, so the UI shows the runs the pipeline logged.
        backend = mlflow_backend or f"sqlite:///{Path('.tuneloop/mlflow.db').resolve()}"
        if backend.startswith("sqlite:///"):
            Path(backend.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        rec = start_mlflow_server(backend, state / "mlflow-artifacts", state / "mlflow.log",
                                  port=_port(port, DEFAULT_PORTS["mlflow"]))  # fmt: skip
    elif name == "prefect":
        rec = start_prefect_server(
            state / "prefect-home", state / "prefect.log", port=_port(port, DEFAULT_PORTS["prefect"])
        )
    elif name == "serve":
        rec = start_serve(state, port=_port(port, DEFAULT_PORTS["serve"]), db=serve_db, storage=serve_storage)
    else:
        raise BadInputError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}")
    save_record(state, rec)
    return rec


def down(name: str, state: Path) -> bool:
    rec = load_record(state, name)
    if rec is None:
        return False
    stopped = rec.stop()
    _record_path(state, name).unlink(missing_ok=True)
    return stopped


def status(name: str, state: Path) -> dict[str, Any]:
    rec = load_record(state, name)
    if rec is None:
        return {"name": name, "running": False}
    health = rec.health or rec.url  # s3 has no health URL: its root answers
    healthy = False
    if rec.alive():
        try:
            with urllib.request.urlopen(health, timeout=2):
                healthy = True
        except urllib.error.HTTPError:
            healthy = True  # S3 answers 403 to an unsigned GET: alive and serving
        except OSError:
            healthy = False
    return {
        "name": name,
        "running": rec.alive(),
        "healthy": healthy,
        "pid": rec.pid,
        "url": rec.url,
        "log": rec.log,
    }


def write_env_file(path: str | Path, env: dict[str, str]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())


def test_env(rec: ServiceRecord) -> dict[str, str]:
    """Variables tests/s3_fixtures.py reads (kept apart from AWS_* so moto-based tests are not redirected)."""
    return {
        "TUNELOOP_TEST_S3_ENDPOINT": rec.url,
        "TUNELOOP_TEST_S3_ACCESS_KEY": rec.env["AWS_ACCESS_KEY_ID"],
        "TUNELOOP_TEST_S3_SECRET_KEY": rec.env["AWS_SECRET_ACCESS_KEY"],
    }


# --- CLI -----------------------------------------------------------------------------------------------------
def _names(args: argparse.Namespace) -> list[str]:
    bad = [n for n in args.names if n not in SERVICES]
    if bad:
        raise SystemExit(f"unknown service(s) {bad}; choose from {', '.join(SERVICES)}")
    return list(args.names) or list(SERVICES)


def _cmd_up(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    env: dict[str, str] = {}
    names = _names(args)
    if args.port and len(names) != 1:
        raise SystemExit("--port needs exactly one service name")
    style = args.env_style or ("test" if getattr(args, "module_mode", False) else "aws")
    for name in names:
        rec = up(name, state, port=args.port, mlflow_backend=args.mlflow_backend, serve_db=args.serve_db,
                 serve_storage=args.serve_storage)
        print(f"{name:<8} up   pid {rec.pid:<7} {rec.url}   log {rec.log}", file=sys.stderr)
        if style == "test" and name == "s3":
            env.update(test_env(rec))
        else:
            env.update(rec.env)
    if args.env_file:
        write_env_file(args.env_file, env)
    for k, v in env.items():
        print(f"export {k}={v}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    for name in reversed(_names(args)):
        print(f"{name:<8} {'stopped' if down(name, state) else 'not running'}", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    rows = [status(n, state) for n in _names(args)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if not r["running"]:
                print(f"{r['name']:<8} down")
            else:
                print(
                    f"{r['name']:<8} {'up' if r['healthy'] else 'UNHEALTHY'}  pid {r['pid']:<7} {r['url']}  log {r['log']}"
                )
    return 0


def add_services_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register `services up|down|status`; each leaf sets args.func(args) -> exit code."""
    p = subparsers.add_parser("services", help="start/stop the local S3, MLflow, Prefect and Tinker API servers")
    sub = p.add_subparsers(dest="services_cmd", required=True)
    for cmd, fn, helptext in (
        ("up", _cmd_up, "start services (all if none named) in the background"),
        ("down", _cmd_down, "stop services"),
        ("status", _cmd_status, "show what runs where"),
    ):
        sp = sub.add_parser(cmd, help=helptext)
        sp.add_argument("names", nargs="*", metavar="SERVICE", help="s3, mlflow, prefect, serve (default: all)")
        sp.add_argument("--state-dir", default=str(default_state_dir()), help="pid files, logs and data")
        sp.set_defaults(func=fn)
        if cmd == "up":
            sp.add_argument("--port", type=int, help="port (only with a single service; s3 picks free ports)")
            sp.add_argument(
                "--mlflow-backend",
                help="backend store URI for the MLflow server (default the embedded sqlite)",
            )
            sp.add_argument(
                "--env-file", help="also write the client environment to this file (KEY=VALUE lines)"
            )
            sp.add_argument("--serve-db", help="database URL of `serve` (default sqlite under the state dir)")
            sp.add_argument("--serve-storage", help="checkpoint storage URI of `serve` (default: the s3 service's "
                                                    "bucket when it runs, else files under the state dir)")
            sp.add_argument("--env-style", choices=["aws", "test"],
                            help="s3 variables: AWS_* (default) or TUNELOOP_TEST_S3_* (default for python -m)")  # fmt: skip
        if cmd == "status":
            sp.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.services")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_services_commands(sub)
    # `python -m infra.services up s3` == `tuneloop services up s3`, but env output defaults to the test style.
    args = parser.parse_args(["services", *(argv if argv is not None else sys.argv[1:])])
    args.module_mode = True
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
