"""`tuneloop sweep`: a real sweep (tiny preset, 8 steps per trial) killed mid-trial with SIGKILL and continued
by rerunning the same command; a failing trial; MLflow parent/child runs and metric names; the confirmation
split disjoint from the selection split and read only at the end; the pruning hook."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from evals.leaderboard import _from_run_dir, leaderboard
from evals.store import ResultStore, list_result_metas, read_records_file
from flows.sweep_config import load_space
from tasks.evaluate import target_benchmark

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "registry_model": "sweep-test",
    "model": {"base_model": "tiny"},
    "data": {"n_train": 64, "n_eval": 24, "replay": ""},
    "train": {"steps": 8, "batch_size": 4, "warmup_steps": 1, "save_every": 2, "eval_every": 4,
              "eval_every_examples": 4, "eval_loss_examples": 8},
    "eval": {"batch_size": 12, "guard_examples": 8, "bootstrap_resamples": 200},
}
# 2 x 2 grid: the two "no-such-model" trials fail in their own pre-flight; the sweep must go on
SPACE = {"sampler": "grid", "trials": 4, "parallel": 1, "pruner": "none", "seed": 0,
         "params": {"train.learning_rate": {"values": [1e-3, 5e-3]},
                    "model.base_model": {"values": ["tiny", "no-such-model"]}}}


def _argv(tmp: Path) -> list[str]:
    return ["sweep", "sft", "--config", str(tmp / "base.yaml"), "--space", str(tmp / "space.yaml"),
            f"run_root={tmp}/runs", f"tracking_uri=sqlite:///{tmp}/mlflow.db"]


def _checkpointed_running_trial(sweep_dir: Path) -> str | None:
    """Name of a RUNNING trial that has a committed step checkpoint, once another trial has COMPLETED."""
    man = sweep_dir / "sweep.json"
    if not man.exists():
        return None
    trials = json.loads(man.read_text())["trials"]
    if not any(t["state"] == "COMPLETE" for t in trials):
        return None
    for t in trials:
        if t["state"] == "RUNNING" and list((Path(t["run_dir"]) / "checkpoints").glob("**/step-*")):
            return t["name"]
    return None


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp / "space.yaml").write_text(yaml.safe_dump(SPACE))
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("PREFECT_API_URL", None)
    (tmp / "prefect").mkdir()
    # its own session: the kill takes its Prefect server child along (no orphan left behind)
    proc = subprocess.Popen([sys.executable, "-m", "tuneloop_cli.sweep_cli", *_argv(tmp)], cwd=tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "killed.log", "w"),  # noqa: SIM115
                            start_new_session=True)
    sweeps = tmp / "sweeps"
    killed = None
    deadline = time.time() + 540
    try:
        while killed is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            dirs = list(sweeps.glob("*")) if sweeps.exists() else []
            killed = _checkpointed_running_trial(dirs[0]) if dirs else None
    finally:
        with contextlib.suppress(ProcessLookupError):  # like a killed machine: nothing gets to clean up
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed is not None, f"no checkpointed second trial: {(tmp / 'killed.log').read_text()[-3000:]}"
    sweep_dir = next(sweeps.glob("*"))
    before = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    finished = {t["name"]: (Path(t["run_dir"]) / "summary.json").stat().st_mtime_ns
                for t in before if t["state"] == "COMPLETE"}
    assert "result" not in json.loads((sweep_dir / "sweep.json").read_text())
    assert not (sweep_dir / "confirmation").exists()  # killed before the end: the confirmation split is unread
    from tuneloop_cli import sweep_cli

    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with prefect_test_harness(server_startup_timeout=180):
            assert sweep_cli.main(_argv(tmp)) == 0  # the same command again
    finally:
        os.chdir(cwd)
    return {"tmp": tmp, "sweep_dir": sweep_dir, "killed": killed, "finished_before": finished, "before": before,
            "manifest": json.loads((sweep_dir / "sweep.json").read_text())}


def test_killed_sweep_resumes_without_rerunning_finished_trials(killed_and_resumed: dict[str, Any]) -> None:
    k = killed_and_resumed
    man = k["manifest"]
    trials = {t["name"]: t for t in man["trials"]}
    # one trial per grid point, no extra trial for the one that was killed: it ran again under its own name
    assert sorted(t["number"] for t in man["trials"]) == [0, 1, 2, 3]
    assert sorted(t["state"] for t in man["trials"]) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert trials[k["killed"]]["state"] == "COMPLETE"
    for name, mtime in k["finished_before"].items():  # finished trials were not rerun
        assert (Path(trials[name]["run_dir"]) / "summary.json").stat().st_mtime_ns == mtime
    # a failed trial is recorded with its reason and did not stop the sweep
    for t in man["trials"]:
        if t["params"]["model.base_model"] == "no-such-model":
            assert t["state"] == "FAIL" and "no-such-model" in t["error"]
    res = man["result"]
    assert res["winner"] in trials and trials[res["winner"]]["state"] == "COMPLETE"
    assert res["n_trials_run"] == 4 - len(k["finished_before"]) - sum(t["state"] == "FAIL" for t in k["before"])
    client = MlflowClient(tracking_uri=f"sqlite:///{k['tmp']}/mlflow.db")
    exp = client.get_experiment_by_name("tuneloop").experiment_id
    runs = client.search_runs([exp], f"tags.`tuneloop.run_dir` = '{Path(trials[k['killed']]['run_dir']).resolve()}'")
    assert len(runs) == 1 and runs[0].data.tags["tuneloop.resumed"] == "1"  # its MLflow run was continued
    assert runs[0].info.status == "FINISHED"


def test_mlflow_parent_child_structure_and_metric_names(killed_and_resumed: dict[str, Any]) -> None:
    k = killed_and_resumed
    man, res = k["manifest"], k["manifest"]["result"]
    client = MlflowClient(tracking_uri=f"sqlite:///{k['tmp']}/mlflow.db")
    exp = client.get_experiment_by_name("tuneloop").experiment_id
    parents = client.search_runs([exp], "tags.`tuneloop.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.run_id == res["parent_run_id"]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["tuneloop.sweep_id"] == man["sweep_id"]
    assert parent.data.tags["winner"] == res["winner"] and parent.data.params["sampler"] == "grid"
    for m in ("winner_selection_score", "winner_confirmation_score", "winner_confirmation_score_ci_low",
              "winner_confirmation_score_ci_high", "runner_up_confirmation_score", "base_confirmation_score",
              "confirmation_diff", "confirmation_p_value", "gate_passed", "n_tied_with_best"):
        assert m in parent.data.metrics, m
    assert parent.data.metrics["winner_confirmation_score"] == res["winner_confirmation_score"]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4  # one per trial, the killed one continued rather than duplicated
    by_trial = {c.data.tags["tuneloop.trial"]: c for c in children}
    for t in man["trials"]:
        c = by_trial[str(t["number"])]
        assert c.data.tags["tuneloop.sweep_id"] == man["sweep_id"] and c.data.tags["tuneloop.trial_state"] == t["state"]
        assert c.info.run_id == t["mlflow_run_id"]
        if t["state"] == "COMPLETE":
            assert c.info.status == "FINISHED" and c.data.params["train.learning_rate"] == str(t["params"]["train.learning_rate"])
            for m in ("sweep_score", "sweep_score_ci_low", "sweep_score_ci_high", "sweep_rank", "sweep_diff_vs_best",
                      "sweep_p_vs_best_holm", "diff", "diff_ci_low", "diff_ci_high", "p_value", "gate_passed"):
                assert m in c.data.metrics, m
            assert c.data.metrics["sweep_score"] == t["value"] and c.data.tags["verdict"]
            assert c.data.tags["sweep_tied_with_best"] in ("true", "false")
            stages = {s.info.run_name: s for s in
                      client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{c.info.run_id}'")}
            assert sorted(stages) == ["evaluate", "train"]  # the pipeline's stages nest under the trial's run
            ev = c.data.metrics  # per-benchmark scores sit on the pipeline's own run (flows/common.finish_run)
            assert ev["trained_target"] == t["value"] and {"trained_target_ci_low", "base_target"} <= set(ev)
        else:
            assert c.info.status == "FAILED"
    # the leaderboard recorded is the one recomputed from the trials' stored results
    done = [t for t in man["trials"] if t["state"] == "COMPLETE"]
    loaded = {t["name"]: _from_run_dir(Path(t["run_dir"])) for t in done}
    e = BASE["eval"]
    from evals.compare import GatePolicy

    lb = leaderboard({n: r for n, (r, _) in loaded.items()}, next(iter(loaded.values()))[1],
                     policy=GatePolicy(n_bootstrap=e["bootstrap_resamples"]))
    assert [(r["name"], r["score"], r["p_best_holm"]) for r in res["leaderboard"]["rows"]] == \
        [(r.name, r.score, r.p_best_holm) for r in lb.rows]
    report = Path(res["report_path"])
    assert report.name == "index.html" and (report.parent / "params.png").stat().st_size > 1000
    assert (report.parent / "curves.png").exists() and "confirmation split" in report.read_text()


def test_confirmation_split_is_disjoint_and_read_only_at_the_end(killed_and_resumed: dict[str, Any]) -> None:
    k = killed_and_resumed
    data = k["sweep_dir"] / "data"
    sel = target_benchmark(str(data / "selection.jsonl"), 10**6)
    conf = target_benchmark(str(data / "confirmation.jsonl"), 10**6)
    sel_ids, conf_ids = {e.id for e in sel.examples}, {e.id for e in conf.examples}
    assert len(sel_ids) == len(conf_ids) == 12 and not sel_ids & conf_ids
    done = [t for t in k["manifest"]["trials"] if t["state"] == "COMPLETE"]
    last_trial_end = 0
    for t in done:
        rd = Path(t["run_dir"])
        assert json.loads((rd / "summary.json").read_text())["run_name"] == t["name"]
        last_trial_end = max(last_trial_end, (rd / "summary.json").stat().st_mtime_ns)
        for folder in [*(rd / "eval").glob("*"), *(rd / "eval_during_training").glob("*")]:
            for meta, path in list_result_metas(folder):
                if meta.benchmark == "target":  # ranking and pruning saw selection examples only
                    recs = read_records_file(path)
                    # a periodic eval cut by the SIGKILL may have stored nothing; a final one is complete
                    assert set(recs) <= sel_ids and (recs or folder.parent.name == "eval_during_training")
        trained = ResultStore(rd / "eval").checkpoint_dir("trained")
        assert {r for m, p in list_result_metas(trained) if m.benchmark == "target" for r in read_records_file(p)} \
            == sel_ids  # every trial ranked on all of the same selection examples
    store = k["sweep_dir"] / "confirmation"
    winner = k["manifest"]["result"]["winner"]
    metas = [(m, p) for m, p in list_result_metas(ResultStore(store).checkpoint_dir(winner)) if m.benchmark == "target"]
    assert len(metas) == 1 and set(read_records_file(metas[0][1])) == conf_ids
    assert min(p.stat().st_mtime_ns for p in store.rglob("*.jsonl")) > last_trial_end  # only after the last trial


def test_pruning_hook_stops_training_and_is_never_retried(tmp_path: Path) -> None:
    from evals.periodic import PeriodicEvaluator, TrialPruned, listening
    from evals.suite import default_suite
    from evals.testing import OracleGenerator
    from tasks.base import retry_unless_bad_input

    suite = default_suite(["arithmetic"], n=10)
    logged: list[tuple[int, dict[str, float]]] = []
    ev = PeriodicEvaluator(suite.benchmarks, 2, suite.protocol, log_fn=lambda m, s: logged.append((s, m)))
    seen: list[tuple[int, float]] = []

    def prune_below_half(step: int, metrics: dict[str, float]) -> None:
        seen.append((step, metrics["eval/arithmetic"]))
        if metrics["eval/arithmetic"] < 0.5:
            raise TrialPruned(f"step {step}")

    gen = OracleGenerator("g", suite.benchmarks, {"arithmetic": 0.0})
    assert ev.maybe_run(2, gen) is not None  # no listener: nothing happens
    with listening(prune_below_half), pytest.raises(TrialPruned, match="step 4"):
        ev.maybe_run(4, gen)
    assert seen == [(4, 0.0)] and [s for s, _ in logged] == [2, 4]  # logged before the listener decided
    assert ev.maybe_run(6, gen) is not None  # the listener ended with its block
    state = type("S", (), {"data": TrialPruned("x")})()
    assert TrialPruned.no_retry is True and retry_unless_bad_input(None, None, state) is False
    assert load_space(None, **SPACE).grid_size() == 4


def test_compare_prints_the_sweeps_leaderboard(killed_and_resumed: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from evals import cli

    k = killed_and_resumed
    res = k["manifest"]["result"]
    p = argparse.ArgumentParser()
    cli.add_eval_commands(p.add_subparsers(dest="cmd"))

    def run(*argv: str) -> dict[str, Any]:
        args = p.parse_args(["compare", *argv, "--json"])
        assert args.func(args) == 0
        return json.loads(capsys.readouterr().out)

    def key(lb: dict[str, Any]) -> list[tuple[Any, ...]]:  # CIs aside: the CLI's bootstrap size is its default
        return [(r["name"], r["score"], r["p_best"], r["p_best_holm"], r["tied_with_best"]) for r in lb["rows"]]

    by_id = run(k["manifest"]["sweep_id"], "--sweep-root", str(k["sweep_dir"].parent))
    assert key(by_id) == key(res["leaderboard"]) and by_id["best"] == res["winner"]
    assert key(run(str(k["sweep_dir"]))) == key(res["leaderboard"])
    # the same trials named by their MLflow run ids: results fetched from the runs' logged artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{k['tmp']}/mlflow.db")
    done = {t["mlflow_run_id"]: t["name"] for t in k["manifest"]["trials"] if t["state"] == "COMPLETE"}
    by_run = run(*done, "--leaderboard")
    assert [r["score"] for r in by_run["rows"]] == [r["score"] for r in res["leaderboard"]["rows"]]
    assert [r["p_best"] for r in by_run["rows"]] == [r["p_best"] for r in res["leaderboard"]["rows"]]
