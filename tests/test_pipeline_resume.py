"""A pipeline run whose whole process is SIGKILLed while saving a checkpoint, then run again: the same MLflow
runs continue (one loss curve, nothing left RUNNING), the summary's first loss is step 1's, the config logged is
the one training used, and retention handles the run's real on-disk layout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flows.sft_config import PipelineConfig
from flows.sft_pipeline import sft_pipeline
from infra.config import load_config, to_dict
from infra.retention import list_checkpoints, prune
from infra.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
# Run by a child process: the flow, killed (SIGKILL: no handler, no MLflow end_run) inside the step-4 save,
# after the first file of the checkpoint was written into its temp dir.
KILLED_RUN = """
import json, os, signal, sys
import training_core.state as state
real = state.save_file
def save_then_die(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if ".step-000004.tmp-" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
state.save_file = save_then_die
from flows.sft_pipeline import sft_pipeline
sft_pipeline(json.loads(open(sys.argv[1]).read()), run_name=sys.argv[2])
"""


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def _files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of the run outside checkpoints/ (summary, metrics, report, eval, data quality)."""
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(run_dir).parts}


def test_killed_run_continues_its_mlflow_runs_and_retention_frees_it(tmp_path: Path) -> None:
    from training_core.service_client import ServiceClient

    # init_from a rank-4 adapter while the config says rank 8: training uses 4, so MLflow must say 4
    init = ServiceClient(checkpoint_root=tmp_path / "ck").create_lora_training_client("tiny", rank=4, seed=3)
    init_path = init.save_state("init").result().path
    db = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(PipelineConfig, None, [
        f"run_root={tmp_path}/runs", f"tracking_uri={db}", f"init_from={init_path}", "model.rank=8",
        "data.n_train=64", "data.n_eval=8", "data.replay=", "eval.n_examples=8", "eval.batch_size=8",
        "eval.guard_examples=8", "eval.bootstrap_resamples=200", "train.batch_size=4", "train.steps=6",
        "train.save_every=2", "train.warmup_steps=1", "train.eval_loss_examples=4"])
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(cfg)))
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path / "cfg.json"), "r1"], env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == -9, "the pipeline process was really killed"
    run_dir = tmp_path / "runs" / "r1"
    (temp,) = list(run_dir.glob("checkpoints/*/weights/.step-000004.tmp-*"))  # the half-written save
    mlflow.set_tracking_uri(db)
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment).experiment_id
    (dead,) = client.search_runs([exp], "attributes.run_name = 'r1'")
    assert dead.info.status == "RUNNING"  # what a SIGKILL leaves behind
    (dead_train,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{dead.info.run_id}'")
    assert [m.step for m in client.get_metric_history(dead_train.info.run_id, "train_loss")] == [1, 2, 3, 4]

    res = sft_pipeline(to_dict(cfg), run_name="r1")  # run it again: resumes from step-2

    assert res.mlflow_run_id == dead.info.run_id
    (parent,) = client.search_runs([exp], "attributes.run_name = 'r1'")
    assert parent.info.status == "FINISHED" and parent.data.tags["tuneloop.resumed"] == "1"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["evaluate", "train"]
    assert all(c.info.status == "FINISHED" for c in children)
    train_run = next(c for c in children if c.info.run_name == "train")
    assert train_run.info.run_id == dead_train.info.run_id
    assert parent.data.params["model.rank"] == "4" and parent.data.params["model.lora_alpha"] == "4.0"
    # one curve: steps 3-4 were logged before the kill and again after the resume (same batches, same values)
    hist = client.get_metric_history(train_run.info.run_id, "train_loss")
    last = {m.step: m.value for m in sorted(hist, key=lambda m: m.timestamp)}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
    assert sorted(last) == list(curve) == [1, 2, 3, 4, 5, 6]
    assert last == pytest.approx(curve, rel=1e-9)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_loss_first"] == pytest.approx(curve[1], rel=1e-12)  # not step 3's, the resume point's
    assert summary["train_loss_last"] == pytest.approx(curve[6], rel=1e-12)

    # Retention on this layout: the finished run is freed by ttl, the half-written save goes, its files stay.
    st = open_storage(f"file://{tmp_path}/runs")
    cks = list_checkpoints(st)
    assert {c.group for c in cks} == {"r1"} and "r1/checkpoints/final" in {c.prefix for c in cks}
    before = _files(run_dir)
    assert {"summary.json", "metrics.jsonl"} <= set(before)
    assert {f.split("/")[0] for f in before} >= {"report", "eval", "data_quality"}
    plan = prune(st, ttl_s=0, partial_older_than_s=0)
    assert sorted(c.prefix for c in plan.delete) == sorted(c.prefix for c in cks)
    assert list(plan.partial) == [temp.relative_to(tmp_path / "runs").as_posix()] and not temp.exists()
    assert st.list_committed() == [] and _files(run_dir) == before
