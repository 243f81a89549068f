"""MLflow tracking: one run per pipeline run, nested runs per stage, the full config as params.

Default store: `sqlite:///.tuneloop/mlflow.db` (embedded, no server). Point `tracking_uri` at
`http://host:5000` for a tracking server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_DB = ".tuneloop/mlflow.db"


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


@contextmanager
def run(name: str, nested: bool = False, tags: dict[str, str] | None = None) -> Iterator[Any]:
    import mlflow

    with mlflow.start_run(run_name=name, nested=nested, tags=tags or {}) as r:
        yield r


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    flat = flatten(params)
    items = list(flat.items())
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
