"""The SFT pipeline as real Prefect flow runs (Prefect's test harness), recorded in a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file

from flows.sft_config import PipelineConfig
from flows.sft_pipeline import RunExistsError, sft_pipeline
from infra.config import load_config, to_dict
from infra.storage import open_storage
from tasks.prepare_data import prepare_dataset, resolve_replay
from tasks.train import train_sft
from tasks.train_worker import KILL_ENV

FAST = [
    "data.n_train=400", "data.n_eval=40", "eval.n_examples=40", "eval.batch_size=40",
    "train.batch_size=8", "train.eval_loss_examples=16", "eval.bootstrap_resamples=500",
]


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def _cfg(tmp_path: Path, *extra: str) -> PipelineConfig:
    return load_config(PipelineConfig, None, [*FAST, f"run_root={tmp_path}/runs",
                                              f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", *extra])


def _gate_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "gate.yaml"
    p.write_text("targets: [target]\nguards: [heldout_text]\nguard_margins: {heldout_text: 0.5}\n")
    return p


def test_pipeline_end_to_end_is_tracked_in_mlflow(tmp_path, monkeypatch, capsys):
    steps = 100
    # 100 steps on the task alone (no replay, short warm-up): the demo's 300 steps with 25 % replay take 3x longer
    cfg = _cfg(tmp_path, f"train.steps={steps}", "train.batch_size=16", "train.save_every=50", "train.warmup_steps=15",
               "data.replay=", "train.eval_every=50", "train.eval_every_examples=8", "eval.guard_examples=20")
    res = sft_pipeline(to_dict(cfg), run_name="e2e")
    # training did something real: loss falls and held-out accuracy rises above the base with a 95% CI above 0
    assert res.train_loss_last < res.train_loss_first - 2
    assert res.eval_loss_after < res.eval_loss_before - 2
    assert res.base_score == 0.0
    assert res.verdict == "improved" and res.diff_ci[0] > 0.2, res.verdict_table
    assert res.p_value < 1e-3
    assert "heldout_text" in res.verdict_table and "guard" in res.verdict_table
    # the checkpoint is committed in storage and verifies
    st = open_storage(f"file://{tmp_path}/runs")
    assert st.is_committed("e2e/checkpoints/final")
    man = st.download_dir("e2e/checkpoints/final", tmp_path / "dl")
    assert "adapter_model.safetensors" in man.files and "optimizer.safetensors" in man.files
    # MLflow: one parent run with the full config, nested stage runs, per-step metrics, artifacts
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    run = client.get_run(res.mlflow_run_id)
    assert run.data.params["train.steps"] == str(steps) and run.data.params["model.base_model"] == "tiny"
    assert run.data.tags["verdict"] == res.verdict
    assert "diff" in run.data.metrics
    # the checkpoint is a registered model version carrying its verdict; it is champion iff the gate passed
    from infra import registry

    assert res.model_version and res.promoted == res.gate_passed
    champ = registry.get_champion("tuneloop-sft", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    if res.gate_passed:
        assert champ is not None and champ[0] == res.model_version and champ[1] == res.checkpoint_uri
    else:
        assert champ is None
    mv = MlflowClient().get_model_version("tuneloop-sft", res.model_version)
    assert mv.tags["verdict.verdict"] == res.verdict and mv.tags["verdict.gate_passed"] == str(res.gate_passed)
    print(res.verdict_table)
    exp = run.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{res.mlflow_run_id}'")
    names = {c.info.run_name for c in children}
    assert {"train", "evaluate"} <= names
    train_run = next(c for c in children if c.info.run_name == "train")
    hist = client.get_metric_history(train_run.info.run_id, "train_loss")
    assert sorted(m.step for m in hist) == list(range(1, steps + 1))
    assert client.get_metric_history(train_run.info.run_id, "eval/target"), "eval during training was logged"
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"config.json", "comparison.json", "summary.json", "report", "data_quality"} <= arts
    comp = json.loads((Path(res.run_dir) / "summary.json").read_text())
    assert comp["verdict"] == res.verdict
    assert Path(res.report_path).is_file()
    # `tuneloop compare` takes MLflow runs: base vs trained of this run, same verdict as the pipeline's
    from tuneloop_cli.main import main as cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    capsys.readouterr()
    rc = cli(["compare", f"runs:/{res.mlflow_run_id}/base", f"runs:/{res.mlflow_run_id}", "--json",
              "--gate", str(_gate_yaml(tmp_path))])
    out = json.loads(capsys.readouterr().out)
    assert rc == (0 if res.gate_passed else 1) and out["gate"]["passed"] == res.gate_passed
    tgt = next(c for c in out["comparisons"] if c["benchmark"] == "target")
    assert tgt["diff"] == pytest.approx(res.diff) and tgt["verdict"] == "improved"
    # a finished run is never overwritten
    with pytest.raises(RunExistsError):
        sft_pipeline(to_dict(cfg), run_name="e2e")


def test_sigkilled_training_is_retried_and_equals_uninterrupted_run(tmp_path, monkeypatch):
    """SIGKILL the training process mid-run: the task's retry resumes from the last committed checkpoint,
    never repeats an optimizer step, and ends with exactly the weights of an uninterrupted run."""
    steps = ["train.steps=10", "train.save_every=4", "eval.n_examples=8", "eval.batch_size=8"]
    cfg = _cfg(tmp_path, *steps, "train.subprocess=true", "train.timeout_s=600")
    monkeypatch.setenv(KILL_ENV, "6")  # dies after step 6; step-4 is the last committed checkpoint
    res = sft_pipeline(to_dict(cfg), run_name="killed")
    run_dir = Path(res.run_dir)
    assert (run_dir / ".killed-once").read_text() == "6", "the training process was really killed"
    result = json.loads((run_dir / "train_result.json").read_text())
    assert result["resumed_from"] == 4
    assert [s for s, _ in result["losses"]] == [5, 6, 7, 8, 9, 10], "steps 5..10 ran once each after resume"

    ref_cfg = _cfg(tmp_path / "ref", *steps)
    ds = prepare_dataset(resolve_replay(ref_cfg.data, ref_cfg.model.base_model), tmp_path / "ref" / "cache")
    ref = train_sft(ref_cfg, ds.train_path, ds.eval_path, tmp_path / "ref" / "run")
    a = load_file(Path(res.local_checkpoint) / "adapter_model.safetensors")
    b = load_file(Path(ref.checkpoint) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    sa = json.loads((Path(res.local_checkpoint) / "trainer_state.json").read_text())
    assert sa["step"] == 10
