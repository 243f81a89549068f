"""`tuneloop eval` / `tuneloop compare` through argparse with a fake generator factory."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from evals import cli
from evals.store import ResultStore
from evals.suite import default_suite, load_suite
from evals.testing import OracleGenerator

N = 80


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneloop")
    sub = p.add_subparsers(dest="cmd", required=True)
    cli.add_eval_commands(sub)
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


def checkpoint(tmp: Path, name: str, acc: dict[str, float]) -> str:
    d = tmp / name
    d.mkdir()
    (d / "acc.json").write_text(json.dumps(acc))
    return str(d)


@pytest.fixture
def factory() -> Iterator[None]:
    bench = default_suite(["arithmetic", "mc", "heldout_text"], n=N).benchmarks

    def make(path: str) -> OracleGenerator:
        return OracleGenerator(Path(path).name, bench, json.loads((Path(path) / "acc.json").read_text()))

    cli.set_generator_factory(make)
    yield
    cli.set_generator_factory(None)


COMMON = ["--benchmarks", "arithmetic,mc,heldout_text", "--n", str(N)]


def test_eval_then_compare_gate(tmp_path: Path, factory: None, capsys: pytest.CaptureFixture[str]) -> None:
    res = str(tmp_path / "results")
    a = checkpoint(tmp_path, "base", {"arithmetic": 0.4, "mc": 0.9})
    b = checkpoint(tmp_path, "sft", {"arithmetic": 0.9, "mc": 0.9})
    assert run(["eval", a, "--results-dir", res, *COMMON]) == 0
    out = capsys.readouterr().out
    assert "arithmetic" in out and f"{N}/{N}" in out and "ppl=" in out
    assert run(["eval", a, "--results-dir", res, "--json", *COMMON]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["benchmarks"]["mc"]["n"] == N
    stored = list(ResultStore(res).checkpoint_dir(a).glob("mc.*.jsonl"))
    assert len(stored) == 1 and len(stored[0].read_text().splitlines()) == N  # resumed: nothing appended twice

    gate = tmp_path / "gate.yaml"
    gate.write_text("targets: [arithmetic]\nguards: [mc]\nguard_margin: 0.05\n")
    code = run(["compare", a, b, "--results-dir", res, "--gate", str(gate), "--json", *COMMON])
    verdict = json.loads(capsys.readouterr().out)
    assert code == 0 and verdict["gate"]["passed"] is True
    comps = {c["benchmark"]: c for c in verdict["comparisons"]}
    assert comps["arithmetic"]["verdict"] == "improved" and comps["mc"]["ni_passed"] is True

    # B regresses the guard: exit code 1 and the reason in the table.
    c = checkpoint(tmp_path, "forgot", {"arithmetic": 0.9, "mc": 0.5})
    assert run(["compare", a, c, "--results-dir", res, "--gate", str(gate), *COMMON]) == 1
    out = capsys.readouterr().out
    assert "GATE: FAILED" in out and "FAIL guard mc" in out

    # Result folders work without any generator (e.g. on a laptop, from copied results).
    cli.set_generator_factory(None)
    store = ResultStore(res)
    code = run(["compare", str(store.checkpoint_dir(a)), str(store.checkpoint_dir(b)), "--gate", str(gate), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["gate"] == verdict["gate"]


def test_protocol_mismatch_and_unknown_checkpoint(tmp_path: Path, factory: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    res = str(tmp_path / "results")
    a = checkpoint(tmp_path, "a", {"arithmetic": 0.5})
    b = checkpoint(tmp_path, "b", {"arithmetic": 0.5})
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"protocol: {{system_prompt: 'Be terse.'}}\nbenchmarks:\n  - builtin: arithmetic\n    n: {N}\n")
    assert load_suite(suite).protocol.system_prompt == "Be terse."
    assert run(["eval", a, "--results-dir", res, "--benchmarks", "arithmetic", "--n", str(N)]) == 0
    assert run(["eval", b, "--results-dir", res, "--suite", str(suite)]) == 0
    store = ResultStore(res)
    capsys.readouterr()
    code = run(["compare", str(store.checkpoint_dir(a)), str(store.checkpoint_dir(b)), "--no-gate"])
    err = capsys.readouterr().err
    assert code == 2 and "protocols differ" in err and "system_prompt" in err
    assert run(["compare", str(store.checkpoint_dir(a)), str(store.checkpoint_dir(b)), "--allow-protocol-mismatch",
                "--no-gate"]) == 0
    cli.set_generator_factory(None)
    assert run(["compare", "nope-a", "nope-b", "--results-dir", res, "--no-gate"]) == 2
    assert "no generator factory registered" in capsys.readouterr().err


def test_compare_refuses_to_gate_without_a_policy(tmp_path: Path, factory: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    res = str(tmp_path / "results")
    a = checkpoint(tmp_path, "base", {"arithmetic": 0.4, "mc": 0.9})
    b = checkpoint(tmp_path, "forgot", {"arithmetic": 0.9, "mc": 0.5})
    # No --gate, a suite without a gate, no pipeline run: passing "vacuously" with exit 0 read as a release
    # decision. Refused before anything is evaluated.
    assert run(["compare", a, b, "--results-dir", res, *COMMON]) == 2
    assert "no gate policy" in capsys.readouterr().err and not Path(res).exists()
    assert run(["compare", a, b, "--results-dir", res, "--no-gate", *COMMON]) == 0  # explicitly ungated
    out = capsys.readouterr().out
    assert "GATE: NONE" in out and "PASSED" not in out and "REGRESSED" in out
    # A suite's own gate is used.
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"benchmarks:\n  - builtin: arithmetic\n    n: {N}\n  - builtin: mc\n    n: {N}\n"
                     "gate: {targets: [arithmetic], guards: [mc], guard_margin: 0.05}\n")
    assert run(["compare", a, b, "--results-dir", res, "--suite", str(suite)]) == 1
    assert "FAIL guard mc" in capsys.readouterr().out


def test_compare_of_pipeline_runs_applies_their_recorded_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`runs:/` references: the gate the pipeline recorded (comparison.json) decides, not an empty default."""
    import dataclasses

    from mlflow import MlflowClient

    from evals.compare import GatePolicy
    from evals.runner import evaluate

    benches = default_suite(["arithmetic", "mc"], n=N).benchmarks
    store = tmp_path / "eval"
    for name, acc in (("base", {"arithmetic": 0.4, "mc": 0.9}), ("trained", {"arithmetic": 0.9, "mc": 0.5})):
        evaluate(OracleGenerator(name, benches, acc), benches, default_suite().protocol, store, checkpoint=name)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    client = MlflowClient(tracking_uri=tracking)
    exp = client.create_experiment("runs", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp).info.run_id
    nested = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id  # like the "evaluate" run
    client.log_artifacts(nested, str(store), "eval")
    recorded = GatePolicy(targets=["arithmetic"], guards=["mc"], guard_margin=0.05, min_effect=0.05)
    client.log_dict(parent, {"policy": dataclasses.asdict(recorded)}, "comparison.json")
    for ref in (parent, nested):
        assert run(["compare", f"runs:/{ref}/base", f"runs:/{ref}", "--json"]) == 1
        out = json.loads(capsys.readouterr().out)
        assert out["policy"] == dataclasses.asdict(recorded) and out["gated"] is True
        assert not out["gate"]["passed"] and out["gate"]["failures"][0].startswith("guard mc")
    # --gate still overrides the recorded one
    gate = tmp_path / "gate.yaml"
    gate.write_text("targets: [arithmetic]\n")
    assert run(["compare", f"runs:/{parent}/base", f"runs:/{parent}", "--gate", str(gate)]) == 0


def test_suite_yaml_errors_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "s.yaml"
    bad.write_text("benchmarks:\n  - builtin: arithmetic\n    count: 3\n")
    with pytest.raises(ValueError, match=r"benchmarks\[0\]: unknown key\(s\) \['count'\]"):
        load_suite(bad)
    bad.write_text("protocol: {max_token: 3}\n")
    with pytest.raises(ValueError, match="max_token"):
        load_suite(bad)
