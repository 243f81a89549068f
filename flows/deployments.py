"""Prefect deployments of the retrain flows, defined in code (no prefect.yaml).

    (a) scheduled-retrain/tuneloop-scheduled   cron (default 03:00 UTC): newest data drop newer than the
                                               champion's -> train from the champion -> evaluate -> gate
    (b) data-triggered-run/tuneloop-data-push  one pushed dataset (`tuneloop data push FILE`)

Two ways to run them against a Prefect server (PREFECT_API_URL):
    serve_deployments(cfg, data_uri)          one long-running process registers both and executes their runs
                                              (`tuneloop deployments serve`); simplest, one machine
    create_deployments(cfg, data_uri, pool)   register them on a work pool; `prefect worker start --pool P`
                                              processes (any machine with tuneloop installed) execute runs
"A new object under a watched S3 prefix" is (a) with a frequent cron (`--cron "*/10 * * * *"`): a run that
finds no new drop costs a listing and a registry query.
Entrypoints are module paths (flows.retrain.*), so a worker needs the package installed, not this checkout.
The pipeline config is resolved (relative paths made absolute) and stored as the deployments' default
parameters; a run may override it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from uuid import UUID

# Module imports stay light (no prefect/torch): the CLI builds its parser from these names on every call.
SCHEDULED_DEPLOYMENT = "tuneloop-scheduled"
DATA_DEPLOYMENT = "tuneloop-data-push"
SCHEDULED = f"scheduled-retrain/{SCHEDULED_DEPLOYMENT}"  # <flow name>/<deployment>, as run_deployment takes
DATA = f"data-triggered-run/{DATA_DEPLOYMENT}"
DEFAULT_CRON = "0 3 * * *"
DEFAULT_POOL = "tuneloop"


def default_data_uri() -> str:
    """Where data drops are pushed and watched: $TUNELOOP_DATA_URI, else .tuneloop/data."""
    return os.environ.get("TUNELOOP_DATA_URI") or f"file://{Path('.tuneloop/data').resolve()}"


def api_url() -> str:
    """The configured Prefect server ("" = none: flows would run on a temporary ephemeral server)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or ""


def _abs_sqlite(uri: str) -> str:
    rest = uri.removeprefix("sqlite:///")
    return uri if rest.startswith("/") else f"sqlite:///{Path(rest).resolve()}"


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The config as a dict with paths absolute: deployment runs may start in another directory."""
    from infra.config import to_dict
    from infra.tracking import default_tracking_uri

    d = to_dict(cfg)
    d["run_root"] = str(Path(d["run_root"]).resolve())
    d["tracking_uri"] = d["tracking_uri"] or default_tracking_uri()
    if d["tracking_uri"].startswith("sqlite:///"):
        d["tracking_uri"] = _abs_sqlite(d["tracking_uri"])
    if d["storage_uri"] and "://" not in d["storage_uri"]:
        d["storage_uri"] = str(Path(d["storage_uri"]).resolve())
    for k in ("train_file", "eval_file"):
        if d["data"][k]:
            d["data"][k] = str(Path(d["data"][k]).resolve())
    return d


def build_deployments(config: dict[str, Any], data_uri: str, cron: str = DEFAULT_CRON, timezone: str = "UTC",
                      settle_s: float = 60.0) -> list[Any]:
    """The two RunnerDeployments (not yet registered)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.retrain import data_triggered_run, scheduled_retrain

    common: dict[str, Any] = {"tags": ["tuneloop", "retrain"], "entrypoint_type": EntrypointType.MODULE_PATH}
    sched = scheduled_retrain.to_deployment(
        name=SCHEDULED_DEPLOYMENT, schedules=[Cron(cron, timezone=timezone)],
        parameters={"config": config, "data_dir_uri": data_uri, "settle_s": settle_s},
        description=f"retrain on new data drops under {data_uri} (cron {cron!r} {timezone})", **common,
    )  # fmt: skip
    data = data_triggered_run.to_deployment(
        name=DATA_DEPLOYMENT, parameters={"config": config},
        description="train on one pushed dataset (tuneloop data push FILE)", **common,
    )  # fmt: skip
    return [sched, data]


def serve_deployments(config: dict[str, Any], data_uri: str, cron: str = DEFAULT_CRON, timezone: str = "UTC",
                      settle_s: float = 60.0, limit: int | None = None) -> None:
    """Register both deployments and execute their runs until interrupted (blocks)."""
    from prefect import serve

    from flows.retrain import ensure_limit

    _require_server()
    ensure_limit()
    serve(*build_deployments(config, data_uri, cron, timezone, settle_s), limit=limit)


def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            except ObjectAlreadyExists:
                pass


def create_deployments(config: dict[str, Any], data_uri: str, work_pool: str = DEFAULT_POOL,
                       cron: str = DEFAULT_CRON, timezone: str = "UTC", settle_s: float = 60.0
                       ) -> dict[str, UUID]:
    """Register both deployments on `work_pool` (a process pool, created if missing); returns name -> id."""
    from flows.retrain import ensure_limit

    _require_server()
    ensure_work_pool(work_pool)
    ensure_limit()
    out = {}
    for dep, full in zip(build_deployments(config, data_uri, cron, timezone, settle_s), (SCHEDULED, DATA),
                         strict=True):
        out[full] = dep.apply(work_pool_name=work_pool)
    return out


def trigger(name: str, parameters: dict[str, Any] | None = None, wait: bool = False, timeout: float = 3600,
            poll_interval: float = 2.0) -> Any:
    """Start a run of deployment `name` through the API; returns the FlowRun (final state if wait)."""
    from prefect.deployments import run_deployment

    _require_server()
    return run_deployment(name, parameters=parameters or {}, timeout=timeout if wait else 0,
                          poll_interval=poll_interval, as_subflow=False)


class NoServerError(ValueError):
    """Deployments need a Prefect server (a ValueError: the CLI reports it as a usage error, exit 2)."""


def _require_server() -> None:
    if not api_url():
        raise NoServerError("no Prefect server configured: set PREFECT_API_URL "
                            "(e.g. from `tuneloop services up prefect`)")
