"""The RL pipeline and the sft-then-rl chain through the CLI and as real Prefect flow runs: bad input exits 2
having written nothing; the chain's RL run starts from the SFT checkpoint and must beat it (paired verdict,
CI excluding 0), with per-iteration metrics, rollout transcripts and stable metric names in a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop_cli import main as cli


@pytest.fixture
def empty_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    return work


@pytest.mark.parametrize("argv,needle", [
    (["run", "rl", "env.name=nope"], "env.name=nope"),
    (["run", "rl", "rl.group_size=1"], "rl.group_size"),
    (["run", "rl", "init_from=/no/such/ckpt"], "init_from=/no/such/ckpt: no such checkpoint"),
    (["run", "rl", "eval.guards=[nope]"], "eval.guards="),
    (["run", "rl", "env.name=bench:gsm", "env.n_train=40", "env.n_eval=20"], "no SFT warm-up data"),
    (["run", "sft-then-rl", "rl.rl.iterations=0"], "rl.rl.iterations"),
    (["run", "sft-then-rl", "sft.data.task=nope"], "nope"),
    (["run", "rl", "--run-name", "../x"], "--run-name"),
])
def test_bad_rl_input_exits_2_and_writes_nothing(empty_ws: Path, capsys: pytest.CaptureFixture[str],
                                                 argv: list[str], needle: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert list(empty_ws.iterdir()) == []


def test_config_prints_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    for recipe in ("rl", "sft-then-rl"):
        assert cli.main(["config", recipe, "--describe"]) == 0
        out = yaml.safe_load(capsys.readouterr().out)
        assert out["name"] == recipe
    assert cli.main(["config", "sft-then-rl", "rl.rl.iterations=3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["rl"]["rl"]["iterations"] == 3 and out["rl"]["warmup"]["steps"] == 0


# The chain at test size: a short SFT (held-out pass@1 well below 1) then RL from its checkpoint. Sizes follow
# the RL recipe's measured defaults (recipes/README_rl.md), shortened.
CHAIN = [
    "sft.data.n_train=2000", "sft.data.n_eval=100", "sft.data.replay=", "sft.train.steps=80",
    "sft.train.save_every=40", "sft.train.eval_loss_examples=16", "sft.eval.n_examples=100",
    "sft.eval.guard_examples=20", "sft.eval.bootstrap_resamples=500", "sft.eval.guard_margins={heldout_text: 6.0}",
    "rl.rl.iterations=40", "rl.rl.save_every=20", "rl.eval.guard_examples=20", "rl.eval.bootstrap_resamples=500",
]


@pytest.mark.slow
def test_sft_then_rl_chain_improves_over_the_sft_checkpoint(tmp_path: Path) -> None:
    import json

    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.chain import sft_then_rl
    from flows.chain_config import ChainConfig
    from infra.config import load_config, to_dict

    db = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(ChainConfig, None, [*CHAIN, f"sft.run_root={tmp_path}/runs", f"rl.run_root={tmp_path}/runs",
                                          f"sft.tracking_uri={db}", f"rl.tracking_uri={db}"])
    with prefect_test_harness(server_startup_timeout=180):
        sft, rl = sft_then_rl(to_dict(cfg), run_name="chain")
    # RL started from the SFT run's checkpoint and is judged against it, not against the base
    rl_cfg = json.loads((Path(rl.run_dir) / "summary.json").read_text())
    assert rl.compared_against == "start" and rl.pipeline == "rl" and sft.pipeline == "sft"
    assert 0.02 < rl.base_score < 0.9, rl.verdict_table  # weak but not zero: RL can only reinforce what it samples
    assert rl.verdict == "improved" and rl.diff_ci[0] > 0, rl.verdict_table
    assert rl.train_loss_last > rl.train_loss_first  # mean reward rose over the iterations
    assert rl_cfg["local_checkpoint"].startswith(str(tmp_path / "runs" / "chain-rl"))
    run_dir = Path(rl.run_dir)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward_mean" in m] == list(range(1, 41))
    assert sorted(p.name for p in (run_dir / "rollouts").iterdir())[0] == "iter-000000.jsonl"
    client = MlflowClient(tracking_uri=db)
    run = client.get_run(rl.mlflow_run_id)
    assert run.data.tags["pipeline"] == "rl" and run.data.tags["verdict"] == "improved"
    for name in ("start_target", "trained_target", "trained_target_ci_low", "diff_target_ci_low", "diff",
                 "start_target_sampled", "trained_target_sampled"):
        assert name in run.data.metrics, name
    train_run = next(r for r in client.search_runs([run.info.experiment_id])
                     if r.data.tags.get("mlflow.parentRunId") == run.info.run_id and r.info.run_name == "train")
    assert len(client.get_metric_history(train_run.info.run_id, "reward_mean")) == 40
