"""`python -m infra.services` (the path .ci/run uses) and the Kubernetes manifests in infra/k8s/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from infra import services
from infra.s3_server import pid_alive
from infra.storage import open_storage

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"


def _services(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "infra.services", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_services_s3_up_env_file_status_down(tmp_path: Path) -> None:
    state, env_file = tmp_path / "state", tmp_path / "s3.env"
    up = _services("up", "s3", "--env-file", str(env_file), "--state-dir", str(state), cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    try:
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert set(env) == {
            "TUNELOOP_TEST_S3_ENDPOINT",
            "TUNELOOP_TEST_S3_ACCESS_KEY",
            "TUNELOOP_TEST_S3_SECRET_KEY",
        }
        assert env["TUNELOOP_TEST_S3_ENDPOINT"].startswith("http://127.0.0.1:")
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"  # it holds a secret key
        # The server outlived the CLI process and serves real S3 with those credentials.
        st = open_storage(
            "s3://tuneloop/ci-check",
            endpoint_url=env["TUNELOOP_TEST_S3_ENDPOINT"],
            access_key=env["TUNELOOP_TEST_S3_ACCESS_KEY"],
            secret_key=env["TUNELOOP_TEST_S3_SECRET_KEY"],
        )
        st.put_bytes("x", b"ok")
        assert st.get_bytes("x") == b"ok"
        st_now = services.status("s3", state)
        assert st_now["running"] and st_now["healthy"] and st_now["url"] == env["TUNELOOP_TEST_S3_ENDPOINT"]
        pid = st_now["pid"]
        assert services.up("s3", state).pid == pid  # idempotent: an `up` on a running service reuses it
    finally:
        down = _services("down", "s3", "--state-dir", str(state), cwd=tmp_path)
    assert down.returncode == 0 and "stopped" in down.stderr
    assert not pid_alive(pid)
    assert services.status("s3", state) == {"name": "s3", "running": False}


def _docs() -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_k8s_manifests_are_complete_and_consistent() -> None:
    docs = _docs()
    assert {
        "config.yaml",
        "mlflow.yaml",
        "prefect-worker.yaml",
        "training-job.yaml",
        "deepspeed-multinode-job.yaml",
    } <= set(docs)
    every = [d for ds in docs.values() for d in ds]
    for d in every:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        assert d["metadata"].get("name"), d
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "tuneloop", d["metadata"]["name"]
    named = {(d["kind"], d["metadata"]["name"]) for d in every}
    kinds = {(f, d["kind"]) for f, ds in docs.items() for d in ds}
    assert {("mlflow.yaml", "Deployment"), ("mlflow.yaml", "Service"), ("prefect-worker.yaml", "Deployment"),
            ("training-job.yaml", "Job"), ("deepspeed-multinode-job.yaml", "Job")} <= kinds  # fmt: skip

    workloads = [d for d in every if d["kind"] in ("Deployment", "Job")]
    for w in workloads:
        pod = w["spec"]["template"]
        for c in _containers(w):
            assert c["name"] and c["image"] and not c["image"].endswith(":latest"), c
            assert "memory" in c["resources"]["limits"], (w["metadata"]["name"], c["name"])
            for src in c.get("envFrom", []):  # every referenced ConfigMap/Secret is defined here
                ref = src.get("configMapRef") or src.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in src else "Secret"
                assert (kind, ref["name"]) in named, ref
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod["spec"].get("volumes", [])}, mounts
        for v in pod["spec"].get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in named
        if w["kind"] == "Deployment":
            sel = w["spec"]["selector"]["matchLabels"]
            assert sel.items() <= pod["metadata"]["labels"].items()
        else:
            assert pod["spec"]["restartPolicy"] in ("Never", "OnFailure") and "backoffLimit" in w["spec"]

    # Each Service selects pods of some workload and targets a port those containers declare.
    for svc in (d for d in every if d["kind"] == "Service"):
        sel = svc["spec"]["selector"].items()
        targets = [w for w in workloads if sel <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, svc["metadata"]["name"]
        ports = {p.get("name") for w in targets for c in _containers(w) for p in c.get("ports", [])}
        ports |= {p["containerPort"] for w in targets for c in _containers(w) for p in c.get("ports", [])}
        assert all(p["targetPort"] in ports for p in svc["spec"]["ports"]), svc["metadata"]["name"]

    mlflow = next(d for d in docs["mlflow.yaml"] if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in _containers(mlflow)[0]["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert _containers(mlflow)[0]["readinessProbe"]["httpGet"]["path"] == "/health"

    ds = next(d for d in docs["deepspeed-multinode-job.yaml"] if d["kind"] == "Job")
    headless = next(d for d in docs["deepspeed-multinode-job.yaml"] if d["kind"] == "Service")
    spec = ds["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert (
        headless["spec"]["clusterIP"] == "None"
        and spec["template"]["spec"]["subdomain"] == headless["metadata"]["name"]
    )
    args = _containers(ds)[0]["args"]
    assert "--nnodes=2" in args and "--node-rank=$(JOB_COMPLETION_INDEX)" in args
    assert f"--master-addr={ds['metadata']['name']}-0.{headless['metadata']['name']}" in args


def test_k8s_training_job_command_parses_with_the_cli() -> None:
    from tuneloop_cli.main import build_parser

    job = next(d for d in _docs()["training-job.yaml"] if d["kind"] == "Job")
    c = _containers(job)[0]
    assert c["command"][0] == "tuneloop"
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    assert args.config == "/config/sft.yaml" and callable(args.func)
