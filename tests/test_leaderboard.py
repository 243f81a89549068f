"""evals.leaderboard: pairwise numbers equal evals.compare's, Holm within each family, ties, and `tuneloop
compare` with any number of runs (result folders and pipeline run dirs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from evals import cli
from evals.compare import GatePolicy, compare
from evals.leaderboard import leaderboard, resolve_refs
from evals.runner import EvalResult, evaluate
from evals.stats import holm
from evals.suite import default_suite
from evals.testing import OracleGenerator

N = 120
POL = GatePolicy(alpha=0.05, min_effect=0.05, n_bootstrap=500, seed=0)


def _results(tmp: Path, accs: dict[str, float], salts: dict[str, str] | None = None) -> dict[str, EvalResult]:
    suite = default_suite(["arithmetic"], n=N)
    out = {}
    for name, acc in accs.items():
        gen = OracleGenerator(name, suite.benchmarks, {"arithmetic": acc}, salt=(salts or {}).get(name, "oracle"))
        out[name] = evaluate(gen, suite.benchmarks, suite.protocol, tmp / "store", checkpoint=name)
    return out


def test_pairwise_numbers_equal_compare_and_holm_is_per_family(tmp_path: Path) -> None:
    res = _results(tmp_path, {"base": 0.2, "a": 0.55, "b": 0.8, "c": 0.75, "d": 0.4},
                   salts={"c": "other", "d": "third"})
    runs = {k: v for k, v in res.items() if k != "base"}
    lb = leaderboard(runs, res["base"], benchmark="arithmetic", policy=POL)
    assert [r.name for r in lb.rows] == ["b", "c", "a", "d"] and lb.best == "b"
    by = lb.by_name()
    for name in ("c", "a", "d"):
        ref = compare(res["b"], res[name], GatePolicy(targets=["arithmetic"], alpha=0.05, min_effect=0.05,
                                                      n_bootstrap=500, seed=0)).by_name()["arithmetic"]
        r = by[name]
        assert (r.diff_best, r.diff_best_ci, r.p_best, r.test_best) == (ref.diff, ref.diff_ci, ref.p_value, ref.test)
        assert r.ci == ref.ci_b  # the run's own score CI: the same seeded bootstrap as compare's
    for name in runs:
        ref = compare(res["base"], res[name], POL).by_name()["arithmetic"]
        r = by[name]
        assert (r.diff_base, r.diff_base_ci, r.p_base) == (ref.diff, ref.diff_ci, ref.p_value)
    # Holm: N-1 tests against the best, N against the base, each family adjusted on its own
    assert [by[n].p_best_holm for n in ("c", "a", "d")] == holm([by[n].p_best for n in ("c", "a", "d")])
    assert [by[n].p_base_holm for n in runs] == holm([by[n].p_base for n in runs])
    # 0.8 vs 0.75 on 120 examples cannot be told apart; 0.4 is clearly worse than 0.8
    assert by["c"].tied_with_best and not by["d"].tied_with_best and not by["a"].tied_with_best
    assert lb.tied() == ["c"] and "statistically tied" in lb.statement() and "c" in lb.statement()
    assert by["b"].vs_base == "better" and by["b"].is_best and by["b"].rank == 1
    table = lb.format_table()
    assert "tied" in table and "b" in table and f"{by['c'].p_best_holm:.3g}" in table
    md = lb.to_markdown()
    assert md.count("\n") == len(lb.rows) + 1 and md.startswith("| # | run |")


def test_identical_runs_are_tied_and_a_clear_winner_is_not(tmp_path: Path) -> None:
    res = _results(tmp_path, {"x": 0.6, "y": 0.6, "z": 0.6})
    lb = leaderboard(res, benchmark="arithmetic", policy=POL)
    assert lb.best == "x"  # equal scores: the first listed
    for name in ("y", "z"):
        r = lb.by_name()[name]
        assert r.diff_best == 0.0 and r.p_best == 1.0 and r.p_best_holm == 1.0 and r.tied_with_best
    assert lb.tied() == ["y", "z"] and lb.base is None and all(r.vs_base == "-" for r in lb.rows)
    clear = leaderboard(_results(tmp_path / "2", {"good": 0.95, "bad": 0.1}), benchmark="arithmetic", policy=POL)
    assert clear.tied() == [] and "significantly worse" in clear.statement()
    assert clear.by_name()["bad"].p_best_holm < 1e-6


def test_compare_accepts_many_runs_and_prints_the_leaderboard(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from evals.store import ResultStore

    # three pipeline-like run dirs (<run>/eval with "base" and "trained") and one plain result folder
    suite = default_suite(["arithmetic"], n=N)
    dirs = []
    for name, acc in (("r1", 0.3), ("r2", 0.7), ("r3", 0.68)):
        d = tmp_path / name
        for ck, a in (("base", 0.1), ("trained", acc)):
            evaluate(OracleGenerator(ck, suite.benchmarks, {"arithmetic": a}), suite.benchmarks, suite.protocol,
                     d / "eval", checkpoint=ck)
        dirs.append(str(d))
    evaluate(OracleGenerator("solo", suite.benchmarks, {"arithmetic": 0.5}), suite.benchmarks, suite.protocol,
             tmp_path / "plain", checkpoint="solo")
    folder = str(ResultStore(tmp_path / "plain").checkpoint_dir("solo"))
    runs, base = resolve_refs([*dirs, folder])
    assert list(runs) == ["r1", "r2", "r3", "solo"] and base is not None and base.checkpoint == "base"

    p = argparse.ArgumentParser()
    cli.add_eval_commands(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["compare", *dirs, folder, "--benchmark", "arithmetic", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["best"] == "r2" and out["tied_with_best"] == ["r3"]
    ref = leaderboard(runs, base, benchmark="arithmetic")
    assert out["rows"] == json.loads(json.dumps(ref.to_dict()["rows"]))
    args = p.parse_args(["compare", *dirs, "--benchmark", "arithmetic"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "r2" in text.splitlines()[2] and "statistically tied" in text
