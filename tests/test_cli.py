"""The `tuneloop` command line: bad input exits 2 having written nothing, `data validate` agrees with `run sft`,
failures are failures, the gate decides the exit code, `--help` stays light."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tuneloop_cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.n_train=40", "data.n_eval=10", "data.replay="]


def row(i: int, content: str | None = None) -> dict:
    a = f"Answer: {i:04d}"[::-1]
    return {"messages": [{"role": "user", "content": content or f"reverse {i:04d}"},
                         {"role": "assistant", "content": a}], "answer": a}


def lines(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A working dir holding only input files; the pipeline itself is replaced by a recorder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (work / "train.jsonl").write_text(lines([row(i) for i in range(40)]))
    (work / "eval.jsonl").write_text(lines([row(i) for i in range(100, 110)]))
    calls: list[dict[str, Any]] = []
    import flows.sft_pipeline as sp

    def fake_pipeline(config: dict[str, Any], run_name: str | None = None, checked: bool = False) -> Any:
        calls.append({"config": config, "run_name": run_name, "checked": checked})
        return ws_result(run_name or "", gate=True)

    monkeypatch.setattr(sp, "sft_pipeline", fake_pipeline)
    return {"dir": work, "calls": calls, "inputs": {p.name for p in work.iterdir()}}


def ws_result(run_name: str, gate: bool) -> Any:
    from flows.sft_pipeline import PipelineResult

    return PipelineResult(
        run_name=run_name, run_dir="r", mlflow_run_id="m", tracking_uri="sqlite:///x.db", checkpoint_uri="c",
        local_checkpoint="c", base_score=0.0, tuned_score=1.0 if gate else 0.0, diff=1.0, diff_ci=(1.0, 1.0),
        p_value=0.01, verdict="improved" if gate else "regressed", gate_passed=gate, verdict_table="TABLE",
        report_path="r", model_version="1", promoted=gate, train_loss_first=1.0, train_loss_last=0.5,
        eval_loss_before=1.0, eval_loss_after=0.5, seconds=0.001)


def written(ws: dict[str, Any]) -> list[str]:
    return sorted(str(p.relative_to(ws["dir"])) for p in ws["dir"].rglob("*") if p.name not in ws["inputs"]
                  or p.parent != ws["dir"])


def finished_run(ws: dict[str, Any]) -> str:
    d = ws["dir"] / ".tuneloop" / "runs" / "done"
    d.mkdir(parents=True)
    (d / "summary.json").write_text("{}")
    ws["inputs"] |= {".tuneloop"}
    return "done"


TRAIN = ["data.train_file=train.jsonl", "data.eval_file=eval.jsonl"]

# (files to create, overrides, expected message fragment); every case must be refused by `run sft` and,
# where it is about a data file, by `data validate` with the same message
BAD_DATA: list[tuple[dict[str, str | bytes], str]] = [
    ({"bad.jsonl": lines([row(1), {"messages": [{"role": "robot", "content": "x"}]}])},
     "bad.jsonl:2: field 'messages[0].role'"),
    ({"bad.jsonl": lines([row(1), '{"messages": ['])}, "bad.jsonl:2: invalid JSON"),
    ({"bad.jsonl": json.dumps(row(1)).encode() + b"\n\xff\xfe\n"}, "bad.jsonl:2: not UTF-8"),
    ({"bad.jsonl": lines([row(i) for i in range(20)] + [row(1), row(2)])},
     "[duplicates] 2 duplicate rows"),
    ({"bad.jsonl": lines([row(i) for i in range(20)] + [row(3, "x " * 300)])},
     "more than data.max_length=128 tokens: bad.jsonl:21"),
    ({"bad.jsonl": lines([row(i) for i in range(20)] + [row(104)])}, "eval.jsonl:5 = bad.jsonl:21"),
]


@pytest.mark.parametrize("files,needle", BAD_DATA, ids=[n.split(":")[-1][:20] for _, n in BAD_DATA])
def test_bad_data_refused_alike_by_validate_and_run(ws, capsys, files, needle) -> None:
    for name, content in files.items():
        p = ws["dir"] / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
        ws["inputs"].add(name)
    assert cli.main(["data", "validate", "bad.jsonl", "--eval-file", "eval.jsonl"]) == 2
    err_validate = capsys.readouterr().err
    assert needle in err_validate
    assert cli.main(["run", "sft", "data.train_file=bad.jsonl", "data.eval_file=eval.jsonl"]) == 2
    err_run = capsys.readouterr().err
    assert needle in err_run and err_run.count("\n") <= 3, err_run  # one message, no traceback
    assert err_run.split("tuneloop: bad input: ")[1] == err_validate.split("tuneloop: bad input: ")[1]
    assert written(ws) == [] and ws["calls"] == []


BAD_RUN = [
    (["train.steps=-5"], "train.steps=-5"),
    (["train.steps=2.5"], "train.steps=2.5"),
    (["train.learning_rate=0"], "train.learning_rate=0"),
    (["train.save_every=0"], "train.save_every=0"),
    (["train.batch_size=0"], "train.batch_size=0"),
    (["model.rank=0"], "model.rank=0"),
    (["tracking_uri=null"], "tracking_uri=null"),
    (["data.replay=no"], "data.replay=False"),
    (["trian.steps=1"], "trian: unknown key"),
    (["model.base_model=tinyy"], "unknown model: not a preset"),
    (["model.base_model=org/not-cached-anywhere"], "needs network"),
    (["model.base_model=."], "not a Hugging Face model directory"),
    (["init_from=."], "init_from=.: not a training checkpoint"),
    (["init_from=/nonexistent/ckpt"], "no such checkpoint directory"),
    (["data.train_file=train.jsonl"], "data.eval_file is not"),
    (["data.train_file=missing.jsonl", "data.eval_file=eval.jsonl"], "missing.jsonl: file not found"),
    (["data.train_file=.", "data.eval_file=eval.jsonl"], ".: is a directory"),
    ([*TRAIN, "data.replay=missing.jsonl"], "data.replay=missing.jsonl: file not found"),
    (["data.task=nope"], "data.task=nope: unknown generator"),
    ([*TRAIN, "data.max_length=8"], "more than data.max_length=8 tokens: train.jsonl:1"),
    (["eval.guards=[nope]"], "eval.guards="),
]


@pytest.mark.parametrize("overrides,needle", BAD_RUN, ids=[n[:24] for _, n in BAD_RUN])
def test_bad_run_input_exits_2_and_writes_nothing(ws, capsys, monkeypatch, overrides, needle) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["run", "sft", *FAST, *overrides]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert written(ws) == [] and ws["calls"] == []


def test_finished_run_name_is_a_one_line_refusal(ws, capsys) -> None:
    name = finished_run(ws)
    assert cli.main(["run", "sft", *FAST, "--run-name", name]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "already finished" in err and ws["calls"] == []


def test_good_input_runs_with_recipe_run_name_and_validate_agrees(ws, capsys) -> None:
    assert cli.main(["data", "validate", "train.jsonl", "--eval-file", "eval.jsonl", *FAST]) == 0
    assert cli.main(["run", "sft", *FAST, *TRAIN]) == 0
    assert cli.main(["demo", "--quick", *FAST]) == 0
    names = [c["run_name"] for c in ws["calls"]]
    assert names[0].startswith("sft-") and names[1].startswith("demo-")
    assert all(c["checked"] for c in ws["calls"])
    assert "train.jsonl: 40 training rows" in capsys.readouterr().out


def test_demo_trains_a_real_model_guarded_by_real_benchmarks_and_quick_is_the_tiny_one() -> None:
    import argparse

    def cfg(*argv: str, config: str | None = None) -> Any:
        return cli._load_sft_config(argparse.Namespace(command=argv[0], quick="--quick" in argv, config=config,
                                                       overrides=[a for a in argv[1:] if "=" in a]))

    real = cfg("demo", "train.steps=3")
    assert (real.model.base_model, real.data.task, real.train.steps) == ("smollm2-135m", "addition", 3)
    assert {"arc_easy", "hellaswag", "heldout_text"} <= set(real.eval.guards)
    # 300 guard examples: at 100 a 5-point non-inferiority margin is narrower than the CI itself
    assert real.eval.guard_examples == 300 and real.train.learning_rate == 5e-4
    # `make demo-aggressive` overlays the real demo and changes only the learning rate (8x)
    aggressive = cfg("demo", "train.steps=3", config=str(Path(cli.DEMO_CONFIG).with_name("demo_aggressive.yaml")))
    assert aggressive.train.learning_rate == 8 * real.train.learning_rate
    aggressive.train.learning_rate = real.train.learning_rate
    assert aggressive == real
    quick = cfg("demo", "--quick")
    assert quick == cfg("run") and quick.model.base_model == "tiny"


def test_wall_time_counts_from_cli_start(ws, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "_STARTED", cli.time.time() - 42.0)  # as if start-up took 42 s
    assert cli.main(["run", "sft", *FAST]) == 0
    summary = capsys.readouterr().out
    wall = next(x for x in summary.splitlines() if x.startswith("wall time"))
    assert int(wall.split("|")[1].split()[0]) >= 42


@pytest.mark.parametrize("cmd,flag,rc", [("run sft", None, 1), ("run sft", "--fail-on-gate", 1),
                                         ("run sft", "--no-fail-on-gate", 0), ("demo --quick", None, 0),
                                         ("demo --quick", "--fail-on-gate", 1)])
def test_failed_gate_exit_code(ws, capsys, monkeypatch, cmd, flag, rc) -> None:
    import flows.sft_pipeline as sp

    monkeypatch.setattr(sp, "sft_pipeline", lambda config, run_name=None, checked=False: ws_result(run_name, False))
    assert cli.main([*cmd.split(), *FAST, *([flag] if flag else [])]) == rc
    assert "GATE" not in capsys.readouterr().err or rc == 1


def test_failure_inside_a_run_is_exit_1_with_traceback_not_bad_input(ws, capsys, caplog, monkeypatch) -> None:
    import flows.sft_pipeline as sp

    def boom(config: dict, run_name: str | None = None, checked: bool = False) -> Any:
        raise KeyError("rank 1 lost its shard")  # a bug deep inside: not the user's input

    monkeypatch.setattr(sp, "sft_pipeline", boom)
    with caplog.at_level(logging.ERROR, logger="tuneloop"):
        assert cli.main(["run", "sft", *FAST]) == 1
    assert "bad input" not in capsys.readouterr().err
    rec = next(r for r in caplog.records if r.name == "tuneloop")
    assert rec.exc_info is not None and "rank 1 lost its shard" in rec.getMessage()


def test_a_command_group_that_fails_to_import_says_so(ws, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "infra.services", None)  # import raises ImportError
    assert cli.main(["services", "status"]) == 1
    assert "`services` is unavailable: importing infra.services failed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "services" in capsys.readouterr().out


def test_verbose_after_the_subcommand_and_version(capsys) -> None:
    p = cli.build_parser(["config", "sft"])
    assert p.parse_args(["config", "sft", "-v"]).verbose is True
    assert p.parse_args(["-v", "config", "sft"]).verbose is True
    assert p.parse_args(["config", "sft"]).verbose is False
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("tuneloop ")


def test_help_mentions_resume_and_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "sft", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "same --run-name resumes" in out and "--no-fail-on-gate" in out


def test_config_describe(ws, capsys) -> None:
    assert cli.main(["config", "sft", "--describe", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7  # optimizer steps" in out and written(ws) == []


def test_help_imports_nothing_heavy() -> None:
    code = ("import sys\nfrom tuneloop_cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = ['torch', 'scipy', 'matplotlib', 'transformers', 'prefect', 'mlflow', 'numpy']\n"
            "print('HEAVY', [m for m in heavy if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_eval_of_a_plain_directory_is_bad_input(ws, capsys) -> None:
    assert cli.main(["eval", str(ws["dir"])]) == 2
    assert "neither a training checkpoint" in capsys.readouterr().err


def test_eval_prints_where_results_went(tmp_path: Path, monkeypatch, capsys) -> None:
    from evals import cli as ecli
    from evals.suite import default_suite
    from evals.testing import OracleGenerator

    monkeypatch.chdir(tmp_path)
    bench = default_suite(["arithmetic"], n=10).benchmarks
    ecli.set_generator_factory(lambda path: OracleGenerator("ck", bench, 0.5))
    try:
        p = cli.argparse.ArgumentParser()
        ecli.add_eval_commands(p.add_subparsers(dest="cmd"))
        args = p.parse_args(["eval", "ck", "--benchmarks", "arithmetic", "--n", "10"])
        assert args.func(args) == 0
    finally:
        ecli.set_generator_factory(None)
    out = capsys.readouterr().out
    assert f"results: {tmp_path / 'eval_results'}" in out


@pytest.mark.parametrize("flag,rc", [(None, 1), ("--no-fail-on-gate", 0)])
def test_data_push_run_here_exits_1_on_a_failed_gate(ws, monkeypatch, capsys, flag, rc) -> None:
    import flows.retrain as retrain

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(retrain, "data_triggered_run", lambda **kw: retrain.RetrainOutcome(
        status="trained", reason="", drop_id=kw["drop_id"], gate_passed=False, verdict="regressed"))
    to = ws["dir"].parent / "drops"
    argv = ["data", "push", "train.jsonl", "--eval", "eval.jsonl", "--to", f"file://{to}", "--local"]
    assert cli.main([*argv, *([flag] if flag else [])]) == rc


def test_data_push_refuses_what_the_run_would(ws, capsys) -> None:
    (ws["dir"] / "long.jsonl").write_text(lines([row(i) for i in range(20)] + [row(1, "x " * 300)]))
    to = ws["dir"].parent / "drops"
    assert cli.main(["data", "push", "long.jsonl", "--eval", "eval.jsonl", "--to", f"file://{to}"]) == 2
    assert "long.jsonl:21" in capsys.readouterr().err and not to.exists()


def test_known_noise_is_silenced_for_every_entry_point(monkeypatch) -> None:
    import warnings

    from tuneloop_cli.env import apply_env_defaults

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_env_defaults(create_dirs=False)
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
        warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="recipes.sft")  # ours still show
    import os

    assert [str(w.message) for w in caught] == ["ours"]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # transformers' "Loading weights" bar
