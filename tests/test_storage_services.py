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


def test_services_serve_alongside_s3_keeps_checkpoints_in_it(tmp_path: Path) -> None:
    """`up s3 serve`: the Tinker API server starts with a key minted for the printed env and its checkpoints
    going to the S3 server started with it; the real tinker SDK trains and saves through it."""
    import tinker

    state, env_file = tmp_path / "state", tmp_path / "svc.env"
    up = _services("up", "s3", "serve", "--env-file", str(env_file), "--state-dir", str(state), cwd=tmp_path)
    pids: list[int] = []
    try:
        assert up.returncode == 0, up.stderr
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert {"TINKER_BASE_URL", "TINKER_API_KEY", "TUNELOOP_TEST_S3_ENDPOINT"} <= set(env)
        assert f"export TINKER_API_KEY={env['TINKER_API_KEY']}" in up.stdout
        pids = [services.status(n, state)["pid"] for n in ("s3", "serve")]
        st = services.status("serve", state)
        assert st["running"] and st["healthy"] and st["url"] == env["TINKER_BASE_URL"]
        assert services.up("serve", state).pid == st["pid"]  # idempotent

        sc = tinker.ServiceClient(base_url=env["TINKER_BASE_URL"], api_key=env["TINKER_API_KEY"])
        tc = sc.create_lora_training_client(base_model="tiny", rank=4).result(timeout=180)
        datum = tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(list(range(5, 21))),
                                   loss_fn_inputs={"target_tokens": list(range(6, 22)), "weights": [1.0] * 16})
        assert tc.forward_backward([datum], "cross_entropy").result(timeout=120).metrics["loss:sum"] > 0
        path = tc.save_state("svc").result(timeout=120).path
        assert path.endswith("/weights/svc")
        bucket = open_storage("s3://tuneloop/serve", endpoint_url=env["TUNELOOP_TEST_S3_ENDPOINT"],
                              access_key=env["TUNELOOP_TEST_S3_ACCESS_KEY"],
                              secret_key=env["TUNELOOP_TEST_S3_SECRET_KEY"])
        committed = bucket.list_committed("")  # in the S3 server, manifest last, not only on local disk
        assert any(c.endswith("/weights/svc") for c in committed), committed
    finally:
        down = _services("down", "serve", "s3", "--state-dir", str(state), cwd=tmp_path)
    assert down.returncode == 0 and down.stderr.count("stopped") == 2, down.stderr
    assert pids and not any(pid_alive(p) for p in pids)
    assert services.status("serve", state) == {"name": "serve", "running": False}


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


def test_k8s_serve_manifest_runs_tuneloop_serve_from_its_secret_and_configmap(tmp_path: Path) -> None:
    import json
    import re

    from service.app import ServeConfig, create_app
    from service.cli import cmd_serve
    from service.keys import _read
    from tuneloop_cli.main import build_parser

    every = [d for ds in _docs().values() for d in ds]
    docs = _docs()["serve.yaml"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "tuneloop-serve" for d in docs)
    # one server per database: live state is in its memory, and a starting server fails the old one's work
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    c = _containers(dep)[0]
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    assert args.func is cmd_serve and args.host == "0.0.0.0"
    assert {p["containerPort"] for p in c["ports"]} == {args.port}

    # DB URL from a Secret, storage URI from a ConfigMap, both through envFrom
    provided: dict[str, tuple[str, str]] = {}
    for src in c["envFrom"]:
        kind, ref = ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else ("Secret", src["secretRef"])
        obj = next(d for d in every if d["kind"] == kind and d["metadata"]["name"] == ref["name"])
        provided.update({k: (kind, ref["name"]) for k in {**obj.get("data", {}), **obj.get("stringData", {})}})
    assert re.fullmatch(r"\$\((\w+)\)", args.db) and provided[args.db[2:-1]][0] == "Secret"
    assert re.fullmatch(r"\$\((\w+)\)", args.storage) and provided[args.storage[2:-1]][0] == "ConfigMap"
    db_secret = next(d for d in every if d["kind"] == "Secret" and d["metadata"]["name"] == provided[args.db[2:-1]][1])
    assert db_secret["stringData"][args.db[2:-1]].startswith("postgresql://")

    # the keys file is mounted from a Secret whose placeholder is a valid (empty) keys file
    mount = next(m for m in c["volumeMounts"] if args.keys.startswith(m["mountPath"] + "/"))
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    keys_secret = next(d for d in every if d["kind"] == "Secret" and d["metadata"]["name"] == vol["secret"]["secretName"])
    (tmp_path / "keys.json").write_text(keys_secret["stringData"][Path(args.keys).name])
    assert _read(tmp_path / "keys.json") == [] and json.loads((tmp_path / "keys.json").read_text())

    # the probes get 200 from the app without a key (a probe has none)
    from fastapi.testclient import TestClient

    app = create_app(ServeConfig(state_dir=tmp_path / "state", keys_file=tmp_path / "keys.json"))
    with TestClient(app) as client:
        for probe in ("readinessProbe", "livenessProbe"):
            assert client.get(c[probe]["httpGet"]["path"]).status_code == 200
