"""MLflow registry helpers on the embedded sqlite store and on a real `mlflow server` on loopback."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from infra.registry import get_champion, promote_if_passed, register_checkpoint, set_verdict_tags
from infra.s3_server import pid_alive
from infra.services import ServiceRecord, down, save_record, start_mlflow_server, status
from infra.storage import CorruptCheckpointError, LocalStorage, Storage


def _commit(st: Storage, tmp: Path, prefix: str, seed: int) -> str:
    d = tmp / f"src-{seed}"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(os.urandom(300_000))
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "seed": seed}))
    st.upload_dir(d, prefix)
    return st.uri(prefix)


def _artifact_bytes(client: MlflowClient, run_id: str, path: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for a in client.list_artifacts(run_id, path):
        if a.is_dir:
            out.update(_artifact_bytes(client, run_id, a.path))
        else:
            out[a.path] = int(a.file_size or 0)
    return out


def _scenario(tracking_uri: str, tmp: Path, artifact_location: str | None) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.create_experiment("reg-test", artifact_location=artifact_location)
    run_id = client.create_run(exp).info.run_id
    st = LocalStorage(tmp / "ckpts")
    uri1 = _commit(st, tmp, "run/step-1", 1)
    v1 = register_checkpoint(run_id, uri1, "tiny-sft", {"step": 1}, tracking_uri=tracking_uri)
    mv = client.get_model_version("tiny-sft", v1)
    assert (v1, mv.tags["checkpoint_uri"], mv.tags["step"]) == ("1", uri1, "1")
    # Only the pointer and manifest were logged, never the 300 KB weights.
    arts = _artifact_bytes(client, run_id)
    assert sorted(p.rsplit("/", 1)[1] for p in arts) == ["manifest.json", "pointer.json"]
    assert sum(arts.values()) < 5_000
    logged = json.loads(
        Path(
            client.download_artifacts(run_id, next(p for p in arts if p.endswith("manifest.json")), str(tmp))
        ).read_text()
    )
    assert logged["files"] == json.loads(st.get_bytes("run/step-1/manifest.json"))["files"]

    set_verdict_tags("tiny-sft", v1, {"accuracy": 0.41, "ci95": [0.35, 0.47]}, tracking_uri=tracking_uri)
    assert promote_if_passed("tiny-sft", v1, gate_passed=False, tracking_uri=tracking_uri) is False
    tags = client.get_model_version("tiny-sft", v1).tags
    assert tags["gate_passed"] == "false" and json.loads(tags["verdict.ci95"]) == [0.35, 0.47]
    assert get_champion("tiny-sft", tracking_uri=tracking_uri) is None

    st.put_bytes("run/step-2/adapter_model.safetensors", b"partial")  # never committed
    with pytest.raises(CorruptCheckpointError, match="not committed"):
        register_checkpoint(run_id, st.uri("run/step-2"), "tiny-sft", tracking_uri=tracking_uri)

    uri3 = _commit(st, tmp, "run/step-3", 3)
    v2 = register_checkpoint(run_id, uri3, "tiny-sft", tracking_uri=tracking_uri)
    assert promote_if_passed("tiny-sft", v2, gate_passed=True, tracking_uri=tracking_uri) is True
    assert get_champion("tiny-sft", tracking_uri=tracking_uri) == (v2, uri3)
    uri4 = _commit(st, tmp, "run/step-4", 4)
    v3 = register_checkpoint(run_id, uri4, "tiny-sft", tracking_uri=tracking_uri)
    assert promote_if_passed("tiny-sft", v3, gate_passed=False, tracking_uri=tracking_uri) is False
    assert get_champion("tiny-sft", tracking_uri=tracking_uri) == (v2, uri3)  # a failed gate never moves it
    assert promote_if_passed("tiny-sft", v3, gate_passed=True, tracking_uri=tracking_uri) is True
    assert get_champion("tiny-sft", tracking_uri=tracking_uri) == (v3, uri4)
    assert client.get_model_version("tiny-sft", v3).tags["previous.champion"] == v2
    # A gate decided against an older champion (v2) or against the base (None) says nothing about the
    # current champion v3: the version is not promoted, and the tag says why.
    uri5 = _commit(st, tmp, "run/step-5", 5)
    v4 = register_checkpoint(run_id, uri5, "tiny-sft", tracking_uri=tracking_uri)
    assert promote_if_passed("tiny-sft", v4, True, tracking_uri=tracking_uri, gated_against=v2) is False
    assert promote_if_passed("tiny-sft", v4, True, tracking_uri=tracking_uri, gated_against=None) is False
    assert get_champion("tiny-sft", tracking_uri=tracking_uri) == (v3, uri4)
    tags = client.get_model_version("tiny-sft", v4).tags
    assert tags["gate_passed"] == "true" and "now version 3" in tags["promotion_skipped"]
    assert promote_if_passed("tiny-sft", v4, True, tracking_uri=tracking_uri, gated_against=v3) is True
    assert get_champion("tiny-sft", tracking_uri=tracking_uri) == (v4, uri5)
    # The first champion of a model: gated against the base (None) is right then.
    uri6 = _commit(st, tmp, "run/step-6", 6)
    w1 = register_checkpoint(run_id, uri6, "other-sft", tracking_uri=tracking_uri)
    assert promote_if_passed("other-sft", w1, True, tracking_uri=tracking_uri, gated_against=None) is True
    assert get_champion("no-such-model", tracking_uri=tracking_uri) is None


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow sqlite DB; copies of it skip the schema migrations (the slow part)."""
    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, migrated_db: Path
) -> Iterator[tuple[ServiceRecord, Path]]:
    """Spawned before the module's first test so its start-up overlaps the sqlite test; killed by PID at the end."""
    state = tmp_path_factory.mktemp("services")
    shutil.copy(migrated_db, state / "server.db")
    rec = start_mlflow_server(
        f"sqlite:///{state}/server.db", state / "mlflow-artifacts", state / "mlflow.log", wait=False
    )
    save_record(state, rec)
    yield rec, state
    down("mlflow", state)


def test_registry_on_sqlite(tmp_path: Path, migrated_db: Path) -> None:
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    _scenario(f"sqlite:///{tmp_path}/mlflow.db", tmp_path, artifact_location=str(tmp_path / "artifacts"))


def test_registry_on_mlflow_server(tmp_path: Path, mlflow_server: tuple[ServiceRecord, Path]) -> None:
    rec, state = mlflow_server
    rec.wait_ready(120)
    assert status("mlflow", state)["healthy"] is True
    _scenario(rec.url, tmp_path, artifact_location=None)  # artifacts proxied by the server
    assert list((state / "mlflow-artifacts").rglob("pointer.json"))  # landed in the server's store
    assert down("mlflow", state) is True
    assert not pid_alive(rec.pid) and status("mlflow", state) == {"name": "mlflow", "running": False}
