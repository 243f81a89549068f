"""Real benchmarks as pipeline guards: resolved by name, scored by log-likelihood through the trained model's
sampler in the same store as the generated benchmarks, gated by name; unknown names refused before a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.benchmarks_real.loglik import LoglikMCBenchmark
from evals.compare import compare
from flows.sft_config import PipelineConfig
from infra.config import load_config
from tasks.evaluate import evaluate_model, guard_benchmarks, guard_names, unknown_guards
from tasks.gate_stage import gate_policy


def test_guard_names_resolve_to_builtins_and_real_benchmarks() -> None:
    cfg = load_config(PipelineConfig, None, ["eval.guards=[heldout_text, arc_easy, builtin:ifeval]",
                                             "eval.guard_examples=6"])
    benches = guard_benchmarks(cfg)
    assert [b.name for b in benches] == ["heldout_text", "arc_easy", "ifeval"]
    assert isinstance(benches[1], LoglikMCBenchmark) and len(benches[1].examples) == 6
    assert not isinstance(benches[2], LoglikMCBenchmark)  # the generated IFEval-like built-in, not the real one
    assert guard_names(list(cfg.eval.guards)) == ["heldout_text", "arc_easy", "ifeval"]
    assert gate_policy(cfg).guards == ["heldout_text", "arc_easy", "ifeval"]
    assert unknown_guards(["nope", "arc_easy", "builtin:arc_easy", "builtin:mc"]) == ["nope", "builtin:arc_easy"]


def test_unknown_guard_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from tuneloop_cli import main as cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "sft", "eval.guards=[arc_easy, arc_hard]", "data.n_train=40", "data.n_eval=10"]) == 2
    err = capsys.readouterr().err
    assert "eval.guards=" in err and "'arc_hard'" in err and "arc_easy'" not in err.split("unknown")[1].split(";")[0]
    assert list(tmp_path.iterdir()) == []


def test_real_mc_guard_scored_through_the_pipeline_evaluator(tmp_path: Path) -> None:
    cfg = load_config(PipelineConfig, None, ["eval.guards=[arc_easy]", "eval.guard_examples=6"])
    res = evaluate_model(cfg, guard_benchmarks(cfg), None, "base", tmp_path / "eval")
    b = res.benchmarks["arc_easy"]
    assert len(b.records) == 6 and all(r.score in (0.0, 1.0) for r in b.records.values())
    again = evaluate_model(cfg, guard_benchmarks(cfg), None, "again", tmp_path / "eval")
    assert [r.score for r in again.benchmarks["arc_easy"].records.values()] == [r.score for r in b.records.values()]
    rep = compare(res, again, gate_policy(cfg, targets=()))
    c = rep.by_name()["arc_easy"]
    assert (c.role, c.n, c.diff) == ("guard", 6, 0.0)
