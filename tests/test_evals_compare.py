"""compare(): paired tests per benchmark, Holm, verdicts, non-inferiority guards, the gate, protocol pinning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from evals.builtin import builtin_benchmark
from evals.compare import GatePolicy, compare, format_verdict_table
from evals.protocols import EvalProtocol, ProtocolMismatchError
from evals.runner import BenchmarkResult, EvalResult, evaluate
from evals.store import ExampleRecord
from evals.testing import OracleGenerator


@pytest.fixture(scope="module")
def suite() -> list:
    return [builtin_benchmark("arithmetic", 200), builtin_benchmark("mc", 150), builtin_benchmark("heldout_text", 60)]


def _run(name: str, suite: list, acc: dict, proto: EvalProtocol | None = None, nll_scale: float = 1.0) -> EvalResult:
    return evaluate(OracleGenerator(name, suite, acc, nll_scale=nll_scale), suite, proto or EvalProtocol(), None)


POLICY = GatePolicy(targets=["arithmetic"], guards=["mc", "heldout_text"], guard_margin=0.05,
                    guard_margins={"heldout_text": 0.05}, min_effects={"heldout_text": 0.05})


def _scored(checkpoint: str, scores: dict[str, list[float]], kind: str = "generate") -> EvalResult:
    """An EvalResult with the given per-example scores (example ids e0, e1, ... shared across checkpoints)."""
    proto = EvalProtocol()
    res = EvalResult(checkpoint)
    for name, xs in scores.items():
        recs = {f"e{i}": ExampleRecord(f"e{i}", name, checkpoint, proto.hash(), "p", "o", None, float(x))
                for i, x in enumerate(xs)}
        res.benchmarks[name] = BenchmarkResult(name, kind, checkpoint, proto, proto.hash(), "d", len(xs), recs)
    return res


def test_improvement_passes_gate_with_reference_pvalues(suite: list) -> None:
    base = _run("base", suite, {"arithmetic": 0.5, "mc": 0.8})
    # Guards pass with real, within-margin losses (not bit-identical scores): a few mc items broken,
    # held-out log-likelihood 1 % worse.
    tuned = _run("tuned", suite, {"arithmetic": 0.85, "mc": 0.78}, nll_scale=1.01)
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
    # Holm within the targets (here one: unadjusted) and separately within the other rows
    assert ar.p_adjusted == ar.p_value
    ref_holm = multipletests([by["mc"].p_value, by["heldout_text"].p_value], method="holm")[1]
    assert [by["mc"].p_adjusted, by["heldout_text"].p_adjusted] == pytest.approx(list(ref_holm))
    assert 0 < len(by["mc"].broken) <= 6 and by["mc"].fixed == [] and by["mc"].ni_passed
    assert -0.05 < by["mc"].ni_lower_bound < by["mc"].diff < 0
    ht = by["heldout_text"]
    assert ht.test == "paired-t" and ht.ni_passed and -0.05 < ht.ni_lower_bound < ht.diff < 0
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
    # nothing gated: the report says so instead of printing a gate decision
    rep = compare(a, a, GatePolicy())
    assert not rep.gated and "vacuously" in rep.gate.reasons[0] and json.loads(rep.to_json())["gated"] is False
    table = format_verdict_table(rep)
    assert "GATE: NONE" in table and "PASSED" not in table
    assert compare(a, a, GatePolicy(guards=["arithmetic"])).gated


def test_holm_corrects_over_the_targets_only() -> None:
    # 6 fixes, 0 broken: exact McNemar p = 2 / 2**6 = 0.031 < 0.05, so the target improved. An info benchmark
    # with nothing changed (p = 1) used to join the Holm family and double that p to 0.0625: "inconclusive".
    n = 200
    a = {"target": [0.0] * n, "extra_info": [1.0] * 100 + [0.0] * 100}
    b = {"target": [1.0] * 6 + [0.0] * (n - 6), "extra_info": a["extra_info"]}
    pol = GatePolicy(targets=["target"])
    alone = compare(_scored("a", {"target": a["target"]}), _scored("b", {"target": b["target"]}), pol)
    both = compare(_scored("a", a), _scored("b", b), pol)
    for rep in (alone, both):
        t = rep.by_name()["target"]
        assert t.p_value == pytest.approx(2 / 2**6) and t.p_adjusted == t.p_value
        assert t.verdict == "improved" and rep.gate.passed
    # Two targets do form one family.
    two = compare(_scored("a", a), _scored("b", b), GatePolicy(targets=["target", "extra_info"]))
    assert two.by_name()["target"].p_adjusted == pytest.approx(2 * 2 / 2**6)
    assert two.by_name()["target"].verdict == "inconclusive" and not two.gate.passed


def test_zero_probability_counts_against_the_candidate() -> None:
    a = [-8.0 - 0.01 * i for i in range(40)]
    better_but_rules_out_one = [x + 0.5 for x in a]
    better_but_rules_out_one[7] = -math.inf  # e.g. a -inf logprob on one held-out token
    pol = GatePolicy(guards=["heldout_text"], guard_margins={"heldout_text": 0.5})
    rep = compare(_scored("base", {"heldout_text": a}, "perplexity"),
                  _scored("cand", {"heldout_text": better_but_rules_out_one}, "perplexity"), pol)
    c = rep.by_name()["heldout_text"]
    assert (c.verdict, c.ni_passed, c.test) == ("regressed", False, "non-finite")
    assert any("non-finite score (zero probability) on 1 of 40" in w for w in c.warnings)
    assert not rep.gate.passed and rep.gate.failures[0].startswith("guard heldout_text")
    assert "REGRESSED" in format_verdict_table(rep)
    assert json.loads(rep.to_json())["comparisons"][0]["diff"] is None  # -inf is not JSON: null
    # The baseline ruling a text out: nothing can be quantified, so inconclusive (and still no pass).
    rev = compare(_scored("base", {"heldout_text": better_but_rules_out_one}, "perplexity"),
                  _scored("cand", {"heldout_text": a}, "perplexity"), pol)
    c = rev.by_name()["heldout_text"]
    assert (c.verdict, c.ni_passed) == ("inconclusive", False) and not rev.gate.passed


def test_gate_against_champion_keeps_base_as_info_row(suite: list) -> None:
    base = _run("base", suite[:2], {"arithmetic": 0.3, "mc": 0.8})
    champion = _run("champion", suite[:2], {"arithmetic": 0.85, "mc": 0.8})
    worse = _run("trained", suite[:2], {"arithmetic": 0.6, "mc": 0.8})  # beats the base, not the champion
    pol = GatePolicy(targets=["arithmetic"], guards=["mc"])
    assert compare(base, worse, pol).gate.passed  # what gating against the base let through
    rep = compare(champion, worse, pol, info_baselines=[base])
    by = rep.by_name()
    assert by["arithmetic"].verdict == "regressed" and not rep.gate.passed
    info = by["arithmetic vs base"]
    assert (info.role, info.baseline, info.verdict, info.fixed) == ("info", "base", "improved", [])
    assert info.mean_a == pytest.approx(base.benchmarks["arithmetic"].mean)
    assert all(not f.startswith("target arithmetic vs") for f in rep.gate.failures)
    table = format_verdict_table(rep)
    assert "A = champion" in table and "arithmetic vs base" in table and "instead of A" in table


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
