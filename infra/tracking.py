"""MLflow tracking: one run per pipeline run, nested runs per stage, the full config as params.

Default store: `sqlite:///.tuneloop/mlflow.db` (embedded, no server). Point `tracking_uri` at
`http://host:5000` for a tracking server.

Resume: a run started with a `key` (the pipeline: its run directory) is continued, not duplicated, when the
pipeline runs again after a kill: the killed process's MLflow run (left RUNNING) and its nested stage runs are
reopened, so a resumed training logs into the same loss curve. Steps between the resume checkpoint and the kill
are logged twice; the later value (the one the final model went through) is the last of that step.

Adoption: inside `child_of(parent_run_id)` (a contextvar, so it follows a thread, a Prefect task or a
`contextvars.copy_context()` run and nothing else), a top-level run becomes a child of that run (MLflow's
`mlflow.parentRunId` tag): a sweep's trials, each a whole pipeline run, show under the sweep's run. The run
itself stays top-level in every other respect (its stages nest under it; a FINISHED one is not reopened).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

DEFAULT_DB = ".tuneloop/mlflow.db"
RUN_KEY_TAG = "tuneloop.run_key"
RESUMED_TAG = "tuneloop.resumed"  # how many times the run was continued after its process died
PARENT_TAG = "mlflow.parentRunId"
_KEY_RE = re.compile(r"[A-Za-z0-9._-]+")  # goes into a filter string unquoted-safe
# the run a top-level `run()` is adopted by (see the module docstring); None: a real top-level run
parent_run_id: ContextVar[str | None] = ContextVar("tuneloop_parent_run_id", default=None)


@contextmanager
def child_of(run_id: str | None) -> Iterator[None]:
    """Top-level `run()`s started inside become children of `run_id` (None: no adoption)."""
    token = parent_run_id.set(run_id)
    try:
        yield
    finally:
        parent_run_id.reset(token)


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def setup(tracking_uri: str = "", experiment: str = "tuneloop") -> str:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
        # keep artifacts next to the embedded store, not in ./mlruns of whatever the working directory is
        art = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        mlflow.create_experiment(experiment, artifact_location=art.resolve().as_uri())
    mlflow.set_experiment(experiment)
    return uri


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict | tuple) else str(v)
    return out


def find_resumable(key: str, parent_run_id: str | None, top_level: bool | None = None) -> str | None:
    """The newest run of the active experiment with this key and parent that should be continued: a top-level
    run unless it FINISHED (then a new one starts), a nested run whatever its status (its parent is being
    continued, so its stage is being re-run). `top_level` (default: no parent) says which rule applies: an
    adopted run (`child_of`) has a parent but the top-level rule."""
    import mlflow
    from mlflow.tracking import MlflowClient

    top = parent_run_id is None if top_level is None else top_level
    exp = mlflow.tracking.fluent._get_experiment_id()
    query = f"tags.`{RUN_KEY_TAG}` = '{key}'"
    if parent_run_id is not None:  # in the filter: a stage key ("train") is shared by every pipeline run
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    runs = MlflowClient().search_runs([exp], query, order_by=["attributes.start_time DESC"])
    for r in runs:
        if r.data.tags.get(PARENT_TAG) != parent_run_id:
            continue
        if top and r.info.status == "FINISHED":
            return None
        return r.info.run_id
    return None


@contextmanager
def run(name: str, nested: bool = False, tags: dict[str, str] | None = None, key: str | None = None
        ) -> Iterator[Any]:
    """Start an MLflow run, or continue the unfinished one with the same `key` (see the module docstring)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    tags = dict(tags or {})
    adopted = None if nested else parent_run_id.get()
    if adopted:
        tags[PARENT_TAG] = adopted
    resume_id = None
    if key is not None:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"tracking key {key!r}: use letters, digits, '.', '_', '-'")
        tags[RUN_KEY_TAG] = key
        parent = mlflow.active_run() if nested else None
        resume_id = find_resumable(key, parent.info.run_id if parent else adopted, top_level=not nested)
    if resume_id is None:
        with mlflow.start_run(run_name=name, nested=nested, tags=tags) as r:
            yield r
        return
    before = MlflowClient().get_run(resume_id)
    tags[RESUMED_TAG] = str(int(before.data.tags.get(RESUMED_TAG, "0")) + 1)
    with mlflow.start_run(run_id=resume_id, nested=nested, tags=tags) as r:
        yield r


def log_params(params: dict[str, Any]) -> None:
    """Log params to the active run. A continued run already has params: equal ones are skipped, a changed one
    is refused (MLflow would fail on it anyway, less clearly) because one run records one configuration."""
    import mlflow
    from mlflow.tracking import MlflowClient

    flat = flatten(params)
    have = MlflowClient().get_run(mlflow.active_run().info.run_id).data.params
    changed = {k: (have[k], v) for k, v in flat.items() if k in have and have[k] != v}
    if changed:
        what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())[:5])
        from infra.config import BadInputError

        raise BadInputError(f"MLflow run {mlflow.active_run().info.run_id} being resumed was started with "
                            f"another config ({what}): resume with the original settings, or start a new run")
    items = [(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i : i + 100]))


def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
    import mlflow

    clean = {k.replace(":", "_"): float(v) for k, v in metrics.items() if v is not None}
    if run_id is None:
        mlflow.log_metrics(clean, step=step)
    else:
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        ts = int(time.time() * 1000)
        MlflowClient().log_batch(run_id, metrics=[Metric(k, v, ts, step or 0) for k, v in clean.items()])


def log_dict(d: dict[str, Any], artifact_file: str) -> None:
    import mlflow

    mlflow.log_dict(d, artifact_file)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path)
    elif p.exists():
        mlflow.log_artifact(str(p), artifact_path)


def ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
