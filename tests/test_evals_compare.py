"""compare(): paired tests per benchmark, Holm, verdicts, non-inferiority guards, the gate, protocol pinning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from evals.builtin import builtin_benchmark
from evals.compare import GatePolicy, compare, format_verdict_table
from evals.protocols import EvalProtocol, ProtocolMismatchError
from evals.runner import EvalResult, evaluate
from evals.testing import OracleGenerator


@pytest.fixture(scope="module")
def suite() -> list:
    return [builtin_benchmark("arithmetic", 200), builtin_benchmark("mc", 150), builtin_benchmark("heldout_text", 60)]


def _run(name: str, suite: list, acc: dict, proto: EvalProtocol | None = None, nll_scale: float = 1.0) -> EvalResult:
    return evaluate(OracleGenerator(name, suite, acc, nll_scale=nll_scale), suite, proto or EvalProtocol(), None)


POLICY = GatePolicy(targets=["arithmetic"], guards=["mc", "heldout_text"], guard_margin=0.05,
                    guard_margins={"heldout_text": 0.05}, min_effects={"heldout_text": 0.05})


def test_improvement_passes_gate_with_reference_pvalues(suite: list) -> None:
    base = _run("base", suite, {"arithmetic": 0.5, "mc": 0.8})
    tuned = _run("tuned", suite, {"arithmetic": 0.85, "mc": 0.8})
    rep = compare(base, tuned, POLICY)
    by = rep.by_name()
    a = np.array(list(base.benchmarks["arithmetic"].scores().values()))
    b = np.array(list(tuned.benchmarks["arithmetic"].scores().values()))
    only_a, only_b = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    assert only_a == 0 and only_b > 40  # same salt + higher accuracy = pure fixes
    ar = by["arithmetic"]
    assert ar.test == "mcnemar-exact"
    assert ar.p_value == pytest.approx(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    assert ar.diff == pytest.approx(b.mean() - a.mean())
    assert ar.diff_ci[0] > 0 and ar.verdict == "improved"
    assert len(ar.fixed) == only_b and ar.broken == []
    ref_holm = multipletests([c.p_value for c in rep.comparisons], method="holm")[1]
    assert [c.p_adjusted for c in rep.comparisons] == pytest.approx(list(ref_holm))
    assert by["mc"].verdict == "unchanged" and by["mc"].ni_passed  # identical answers
    assert by["heldout_text"].test == "paired-t" and by["heldout_text"].ni_passed
    assert rep.gate.passed, rep.gate.reasons
    table = format_verdict_table(rep)
    assert "GATE: PASSED" in table and "arithmetic" in table and "improved" in table and "mcnemar-exact" in table
    d = json.loads(rep.to_json())
    assert d["gate"]["passed"] is True and {c["benchmark"] for c in d["comparisons"]} == {"arithmetic", "mc",
                                                                                          "heldout_text"}


def test_forgetting_fails_the_guard(suite: list) -> None:
    base = _run("base", suite, {"arithmetic": 0.5, "mc": 0.8})
    forgot = _run("forgot", suite, {"arithmetic": 0.85, "mc": 0.55}, nll_scale=1.3)
    rep = compare(base, forgot, POLICY)
    by = rep.by_name()
    assert by["mc"].verdict == "regressed" and not by["mc"].ni_passed and len(by["mc"].broken) > 20
    assert by["heldout_text"].verdict == "regressed" and not by["heldout_text"].ni_passed
    assert not rep.gate.passed
    assert any(f.startswith("guard mc:") for f in rep.gate.failures)
    assert any(f.startswith("guard heldout_text:") for f in rep.gate.failures)
    assert "GATE: FAILED" in format_verdict_table(rep)
    # No improvement on the target fails too, with the reason named.
    flat = compare(base, _run("flat", suite, {"arithmetic": 0.5, "mc": 0.8}), POLICY)
    assert not flat.gate.passed and flat.gate.failures[0].startswith("target arithmetic: unchanged")


def test_protocol_mismatch_raises_unless_allowed(suite: list) -> None:
    small = suite[:2]
    a = _run("a", small, {"arithmetic": 0.5, "mc": 0.5})
    b = _run("b", small, {"arithmetic": 0.5, "mc": 0.5}, EvalProtocol(system_prompt="You are a math whiz."))
    with pytest.raises(ProtocolMismatchError, match="system_prompt"):
        compare(a, b, GatePolicy())
    rep = compare(a, b, GatePolicy(), allow_protocol_mismatch=True)
    assert all("protocols differ" in " ".join(c.warnings) for c in rep.comparisons)


def test_small_sample_warns_and_is_inconclusive() -> None:
    tiny = [builtin_benchmark("arithmetic", 12)]
    rep = compare(_run("a", tiny, {"arithmetic": 0.5}), _run("b", tiny, {"arithmetic": 0.7}),
                  GatePolicy(targets=["arithmetic"], min_effect=0.05))
    c = rep.comparisons[0]
    assert c.verdict == "inconclusive" and any("underpowered" in w for w in c.warnings)
    assert c.mde > 0.05 and not rep.gate.passed
    # Nothing flipped on 12 items: a zero-width CI, yet too small to call "unchanged" or non-inferior.
    same = _run("a", tiny, {"arithmetic": 0.5})
    rep = compare(same, same, GatePolicy(guards=["arithmetic"], min_effect=0.05))
    assert rep.comparisons[0].diff_ci == (0.0, 0.0) and rep.comparisons[0].verdict == "inconclusive"
    assert not rep.gate.passed


def test_missing_benchmark_fails_gate(suite: list) -> None:
    a = _run("a", suite[:1], {"arithmetic": 0.5})
    rep = compare(a, a, GatePolicy(guards=["mc"]))
    assert not rep.gate.passed and rep.gate.failures == ["guard mc: missing from the comparison"]
    assert compare(a, a, GatePolicy()).gate.passed  # nothing gated: passes, and says so
    assert "vacuously" in compare(a, a, GatePolicy()).gate.reasons[0]


def test_gate_policy_yaml(tmp_path: Path) -> None:
    p = tmp_path / "gate.yaml"
    p.write_text("gate:\n  targets: [gsm]\n  guards: [guard_mc]\n  guard_margin: 0.03\n  alpha: 0.01\n")
    pol = GatePolicy.from_yaml(p)
    assert (pol.targets, pol.guards, pol.margin_for("guard_mc"), pol.alpha) == (["gsm"], ["guard_mc"], 0.03, 0.01)
    p.write_text("targets: [gsm]\nguard_margn: 0.1\n")
    with pytest.raises(ValueError, match="guard_margn"):
        GatePolicy.from_yaml(p)
    with pytest.raises(ValueError, match="both target and guard"):
        GatePolicy(targets=["x"], guards=["x"])
