"""The SFT pipeline as real Prefect flow runs (Prefect's test harness), recorded in a real MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file

from data.generators import train_eval
from flows.sft_config import PipelineConfig
from flows.sft_pipeline import RunExistsError, sft_pipeline
from infra.config import load_config, to_dict
from infra.storage import open_storage
from recipes.sft import train_sft
from tasks.prepare_data import prepare_dataset, resolve_replay
from tasks.train_worker import KILL_ENV

# The retrain: half the answers copied instead of reversed, 15 steps at lr 2e-4 from the champion. Measured
# (eval every 5 steps, 40 examples): 1.0 -> 0.85, 0.65, 0.55 at steps 5, 10, 15, so it lands well between the
# base (0) and the champion (~1); at lr 2e-3 the same data takes the task to ~0.1 in 5 steps (no longer
# beating the base), and 20 % harmful rows at lr 2e-3 to 0.15-0.28.
HARMFUL_FRACTION, HARMFUL_STEPS = 0.5, 15
HARMFUL_TRAIN = ["train.learning_rate=2e-4"]
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


STEPS = 100
# 100 steps on the task alone (no replay, short warm-up): the demo's 300 steps with 25 % replay take 3x longer.
# Without replay the model forgets ~3 nats/token of held-out text in 100 steps, which the demo's 0.5-nat guard
# margin rightly fails; here the margin is widened so that the run passes its gate (guard failures are pinned
# in tests/test_evals_compare.py), and the gate-passing path, promotion included, is what is tested.
TASK_ONLY = [f"train.steps={STEPS}", "train.batch_size=16", "train.save_every=50", "train.warmup_steps=15",
             "data.replay=", "eval.guard_examples=20", "eval.guard_margins={heldout_text: 6.0}"]


@pytest.fixture(scope="module")
def champion_run(harness: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PipelineConfig, Any]:
    """One pipeline run on a fresh registry: its gate passes and it becomes the champion (v1)."""
    tmp = tmp_path_factory.mktemp("champion")
    cfg = _cfg(tmp, *TASK_ONLY, "train.eval_every=50", "train.eval_every_examples=8")
    return tmp, cfg, sft_pipeline(to_dict(cfg), run_name="e2e")


def test_pipeline_end_to_end_is_tracked_in_mlflow(champion_run, monkeypatch, capsys):
    tmp_path, cfg, res = champion_run
    steps = STEPS
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
    # the checkpoint is a registered model version carrying its verdict; with no champion yet the gate is
    # against the base, it passes, and the version becomes the champion
    from infra import registry

    assert res.compared_against == "base" and res.champion_score is None
    assert res.gate_passed and res.promoted and res.model_version == "1", res.verdict_table
    champ = registry.get_champion("tuneloop-sft", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert champ == (res.model_version, res.checkpoint_uri)
    mv = MlflowClient().get_model_version("tuneloop-sft", res.model_version)
    assert mv.tags["verdict.verdict"] == res.verdict and mv.tags["verdict.gate_passed"] == "True"
    assert mv.tags["verdict.compared_against"] == "base"
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
    # `tuneloop compare` takes MLflow runs: base vs trained of this run, under the gate the run recorded
    # (no --gate), so the same verdict and decision as the pipeline's
    from tuneloop_cli.main import main as cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    capsys.readouterr()
    rc = cli(["compare", f"runs:/{res.mlflow_run_id}/base", f"runs:/{res.mlflow_run_id}", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["gate"]["passed"] is True
    assert out["policy"]["min_effect"] == cfg.eval.min_effect and out["policy"]["guards"] == ["heldout_text"]
    tgt = next(c for c in out["comparisons"] if c["benchmark"] == "target")
    assert tgt["diff"] == pytest.approx(res.diff) and tgt["verdict"] == "improved"
    # a finished run is never overwritten
    with pytest.raises(RunExistsError):
        sft_pipeline(to_dict(cfg), run_name="e2e")


def _harmful_rows(n: int, seed: int, harmful_fraction: float) -> list[dict[str, Any]]:
    """The champion's task with a share of the answers wrong: the digits copied instead of reversed."""
    train, _ = train_eval("reverse", n, 1, seed=seed, length=4)
    rows = []
    for i, r in enumerate(train):
        row = dict(r)
        if (i % 100) < harmful_fraction * 100:
            digits = row["messages"][0]["content"].split()[-1].rstrip(".")
            row["messages"] = [row["messages"][0], {"role": "assistant", "content": f"Answer: {digits}"}]
            row["answer"] = digits
        rows.append(row)
    return rows


def test_retrain_on_harmful_data_that_beats_the_base_is_not_promoted(champion_run, tmp_path):
    """A retrain from the champion on bad data still beats the raw base; gated against the base it was promoted
    over the better champion. The champion is the baseline A now (the base an info row), and it stays."""
    from infra import registry

    champ_tmp, _, champ = champion_run
    assert champ.promoted
    shutil.copy(champ_tmp / "mlflow.db", tmp_path / "mlflow.db")  # the registry as it is after the champion run
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    harm, evl = tmp_path / "harm.jsonl", tmp_path / "eval.jsonl"
    harm.write_text("".join(json.dumps(r) + "\n" for r in _harmful_rows(400, 1, HARMFUL_FRACTION)))
    _, eval_rows = train_eval("reverse", 1, 40, seed=0, length=4)
    evl.write_text("".join(json.dumps(dict(r)) + "\n" for r in eval_rows))
    cfg = _cfg(tmp_path, *TASK_ONLY, f"train.steps={HARMFUL_STEPS}", f"train.save_every={HARMFUL_STEPS}",
               "train.warmup_steps=0", *HARMFUL_TRAIN,
               f"data.train_file={harm}", f"data.eval_file={evl}", f"init_from={champ.checkpoint_uri}")
    res = sft_pipeline(to_dict(cfg), run_name="harmful")

    assert res.compared_against == f"champion v{champ.model_version}"
    assert res.base_score < res.tuned_score < res.champion_score, res.verdict_table
    assert not res.gate_passed and not res.promoted and res.verdict == "regressed", res.verdict_table
    assert registry.get_champion("tuneloop-sft", tracking_uri=tracking) == (champ.model_version, champ.checkpoint_uri)
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    comp = json.loads(Path(client.download_artifacts(res.mlflow_run_id, "comparison.json", str(tmp_path))).read_text())
    by = {c["benchmark"]: c for c in comp["comparisons"]}
    assert comp["checkpoint_a"] == "champion" and by["target"]["verdict"] == "regressed"
    # what the old gate saw: better than the base, significantly, and the guard within its margin
    assert by["target vs base"]["role"] == "info" and by["target vs base"]["verdict"] == "improved"
    assert by["heldout_text vs base"]["ni_passed"]
    assert comp["gate"]["failures"][0].startswith("target target: regressed")
    mv = client.get_model_version("tuneloop-sft", res.model_version)
    assert mv.tags["gate_passed"] == "false" and mv.tags["verdict.compared_against"] == res.compared_against


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
    # 10 steps do not learn the task (the base scores 0, so does this): the gate fails, nothing is promoted
    from infra import registry

    assert not res.gate_passed and not res.promoted and res.model_version == "1", res.verdict_table
    assert registry.get_champion("tuneloop-sft", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db") is None
