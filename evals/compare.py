"""Paired comparison of two eval results, verdicts per benchmark and the release gate."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evals.protocols import ProtocolMismatchError, diff_protocols
from evals.runner import BenchmarkResult, EvalResult
from evals.stats import (
    bootstrap_ci,
    diff_sd,
    holm,
    is_binary,
    mcnemar_exact,
    minimum_detectable_effect,
    noninferiority,
    paired_bootstrap_ci,
    paired_t_test,
    power_warning,
)

VERDICTS = ("improved", "unchanged", "regressed", "inconclusive")


@dataclass
class GatePolicy:
    """Targets must improve (significant after Holm); guards must pass non-inferiority at their margin."""

    targets: list[str] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)
    guard_margin: float = 0.02
    guard_margins: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.05
    min_effect: float = 0.05  # the pipeline's eval.min_effect default: one gate, one minimum effect
    min_effects: dict[str, float] = field(default_factory=dict)
    power: float = 0.8
    confidence: float = 0.95
    n_bootstrap: int = 2000
    seed: int = 0
    allow_protocol_mismatch: bool = False

    def __post_init__(self) -> None:
        both = sorted(set(self.targets) & set(self.guards))
        if both:
            raise ValueError(f"GatePolicy: {both} listed as both target and guard")
        if not 0 < self.alpha < 1 or not 0 < self.confidence < 1:
            raise ValueError("GatePolicy: alpha and confidence must be in (0, 1)")

    def margin_for(self, name: str) -> float:
        return float(self.guard_margins.get(name, self.guard_margin))

    def min_effect_for(self, name: str) -> float:
        return float(self.min_effects.get(name, self.min_effect))

    def role(self, name: str) -> str:
        return "target" if name in self.targets else "guard" if name in self.guards else "info"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "gate policy") -> GatePolicy:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> GatePolicy:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if "gate" in data and isinstance(data["gate"], dict):
            data = data["gate"]
        return cls.from_dict(data, source=str(path))


@dataclass
class Flip:
    example_id: str
    prompt: str
    target: Any
    output_a: str
    output_b: str
    extracted_a: str | None
    extracted_b: str | None
    score_a: float
    score_b: float


@dataclass
class BenchmarkComparison:
    benchmark: str
    role: str
    kind: str
    n: int
    mean_a: float
    mean_b: float
    ci_a: tuple[float, float]
    ci_b: tuple[float, float]
    diff: float
    diff_ci: tuple[float, float]
    test: str
    p_value: float
    p_adjusted: float = math.nan
    verdict: str = "inconclusive"
    ni_margin: float = 0.0
    ni_p_value: float = math.nan
    ni_lower_bound: float = math.nan
    ni_passed: bool = False
    mde: float = math.nan
    mde_sd: float = math.nan  # SD of paired differences used for the power calculation
    warnings: list[str] = field(default_factory=list)
    fixed: list[Flip] = field(default_factory=list)
    broken: list[Flip] = field(default_factory=list)
    protocol_hash_a: str = ""
    protocol_hash_b: str = ""
    baseline: str = ""  # set on info rows against an extra baseline (not A): that baseline's checkpoint


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    failures: list[str]


@dataclass
class ComparisonReport:
    checkpoint_a: str
    checkpoint_b: str
    comparisons: list[BenchmarkComparison]
    gate: GateResult
    policy: GatePolicy
    warnings: list[str] = field(default_factory=list)
    gated: bool = True  # False: the policy names no target or guard, so `gate` decides nothing

    def by_name(self) -> dict[str, BenchmarkComparison]:
        return {c.benchmark: c for c in self.comparisons}

    def to_dict(self, include_flips: bool = False) -> dict[str, Any]:
        comps = []
        for c in self.comparisons:
            d = dataclasses.asdict(c)
            d["n_fixed"], d["n_broken"] = len(c.fixed), len(c.broken)
            if not include_flips:
                d.pop("fixed")
                d.pop("broken")
            comps.append(d)
        return _finite({"checkpoint_a": self.checkpoint_a, "checkpoint_b": self.checkpoint_b, "comparisons": comps,
                        "gate": dataclasses.asdict(self.gate), "policy": dataclasses.asdict(self.policy),
                        "gated": self.gated, "warnings": self.warnings})

    def to_json(self, include_flips: bool = False) -> str:
        return json.dumps(self.to_dict(include_flips), indent=2, sort_keys=True, allow_nan=False)


def _finite(obj: Any) -> Any:
    """JSON has no NaN: use None (null) so other tools can parse the verdict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _flips(ra: BenchmarkResult, rb: BenchmarkResult, ids: list[str]) -> tuple[list[Flip], list[Flip]]:
    fixed, broken = [], []
    for i in ids:
        a, b = ra.records[i], rb.records[i]
        if a.score == b.score:
            continue
        f = Flip(i, a.prompt, a.extra.get("target"), a.output, b.output, a.extracted, b.extracted, a.score, b.score)
        (fixed if b.score > a.score else broken).append(f)
    return fixed, broken


def _nonfinite_comparison(name: str, ra: BenchmarkResult, rb: BenchmarkResult, pol: GatePolicy,
                          a_N: np.ndarray, b_N: np.ndarray) -> BenchmarkComparison:
    """Scores that are not finite: a model put zero probability on some held-out token (log-lik -inf).

    No test applies to infinite values, and dropping those examples would reward the model that has them.
    B alone non-finite: B is infinitely worse, "regressed" (p = 0) and never non-inferior. A non-finite:
    nothing can be quantified, "inconclusive" (p = 1), non-inferiority not shown either.
    """
    bad_a, bad_b = int(np.sum(~np.isfinite(a_N))), int(np.sum(~np.isfinite(b_N)))
    b_worse = bad_b > 0 and bad_a == 0
    nan2 = (math.nan, math.nan)
    with np.errstate(invalid="ignore"):
        diff = float(np.mean(b_N) - np.mean(a_N)) if b_worse else math.nan
    comp = BenchmarkComparison(
        benchmark=name, role=pol.role(name), kind=ra.kind, n=len(a_N), mean_a=float(np.mean(a_N)),
        mean_b=float(np.mean(b_N)), ci_a=nan2, ci_b=nan2, diff=diff, diff_ci=(diff, diff) if b_worse else nan2,
        test="non-finite", p_value=0.0 if b_worse else 1.0, ni_margin=pol.margin_for(name), ni_p_value=1.0,
        ni_lower_bound=-math.inf, ni_passed=False, protocol_hash_a=ra.protocol_hash, protocol_hash_b=rb.protocol_hash)
    for r, bad in ((ra, bad_a), (rb, bad_b)):
        if bad:
            comp.warnings.append(f"{r.checkpoint}: non-finite score (zero probability) on {bad} of {len(a_N)} "
                                 f"examples")
    return comp


def _compare_one(name: str, ra: BenchmarkResult, rb: BenchmarkResult, pol: GatePolicy) -> BenchmarkComparison:
    ids = [i for i in ra.records if i in rb.records]
    if not ids:
        raise ValueError(f"benchmark {name!r}: no example ids in common between {ra.checkpoint!r} and "
                         f"{rb.checkpoint!r} (different prompts or templates?)")
    a_N = np.array([ra.records[i].score for i in ids])
    b_N = np.array([rb.records[i].score for i in ids])
    if not (np.all(np.isfinite(a_N)) and np.all(np.isfinite(b_N))):
        return _nonfinite_comparison(name, ra, rb, pol, a_N, b_N)
    kw = {"n_resamples": pol.n_bootstrap, "seed": pol.seed, "confidence": pol.confidence}
    ci_d = paired_bootstrap_ci(a_N, b_N, **kw)
    ci_a, ci_b = bootstrap_ci(a_N, **kw), bootstrap_ci(b_N, **kw)
    if is_binary(a_N) and is_binary(b_N):
        test, p = "mcnemar-exact", mcnemar_exact(a_N, b_N).p_value
    else:
        test, p = "paired-t", paired_t_test(a_N, b_N)
    margin = pol.margin_for(name)
    ni = noninferiority(a_N, b_N, margin, alpha=pol.alpha)
    sd = diff_sd(a_N, b_N)
    comp = BenchmarkComparison(
        benchmark=name, role=pol.role(name), kind=ra.kind, n=len(ids), mean_a=float(a_N.mean()),
        mean_b=float(b_N.mean()), ci_a=(ci_a.low, ci_a.high), ci_b=(ci_b.low, ci_b.high), diff=ci_d.estimate,
        diff_ci=(ci_d.low, ci_d.high), test=test, p_value=p, ni_margin=margin, ni_p_value=ni.p_value,
        ni_lower_bound=ni.lower_bound, ni_passed=ni.passed,
        mde=minimum_detectable_effect(len(ids), sd, alpha=pol.alpha, power=pol.power), mde_sd=sd,
        protocol_hash_a=ra.protocol_hash, protocol_hash_b=rb.protocol_hash)
    for r in (ra, rb):
        if not r.complete:
            comp.warnings.append(f"{r.checkpoint}: only {len(r.records)}/{r.n_examples} examples finished")
    if len(ids) < max(len(ra.records), len(rb.records)):
        comp.warnings.append(f"compared on the {len(ids)} examples both results have")
    if ra.protocol_hash != rb.protocol_hash:
        comp.warnings.append("protocols differ (comparison explicitly allowed)")
    if ra.kind == "generate":
        comp.fixed, comp.broken = _flips(ra, rb, ids)
    return comp


def _verdict(c: BenchmarkComparison, alpha: float, min_effect: float) -> str:
    if c.p_adjusted < alpha:
        return "improved" if c.diff > 0 else "regressed" if c.diff < 0 else "unchanged"
    if -min_effect <= c.diff_ci[0] and c.diff_ci[1] <= min_effect:
        # The whole CI sits inside the equivalence band. A zero-width CI (no example changed) says
        # nothing about small samples, so then the sample must also be able to detect min_effect.
        if c.diff_ci[0] == c.diff_ci[1] and c.mde > min_effect:
            return "inconclusive"
        return "unchanged"
    return "inconclusive"


def _check_protocols(name: str, ra: BenchmarkResult, rb: BenchmarkResult, allow: bool) -> None:
    if ra.protocol_hash != rb.protocol_hash and not allow:
        diff = diff_protocols(ra.protocol, rb.protocol)
        raise ProtocolMismatchError(
            f"benchmark {name!r}: protocols differ ({ra.protocol_hash} vs {rb.protocol_hash}): "
            + ", ".join(f"{k}: {va!r} != {vb!r}" for k, (va, vb) in diff.items())
            + ". Re-run both under one protocol, or pass allow_protocol_mismatch=True.")


def compare(result_a: EvalResult, result_b: EvalResult, gate: GatePolicy | None = None, *,
            allow_protocol_mismatch: bool | None = None,
            info_baselines: Sequence[EvalResult] = ()) -> ComparisonReport:
    """Compare B against A (baseline) on every benchmark both have; apply the gate policy.

    `info_baselines`: further baselines B is also compared with, as info rows named `<benchmark> vs
    <checkpoint>` (e.g. the raw base when A is the champion). They never enter the gate or the targets' Holm
    family.
    """
    pol = gate or GatePolicy()
    allow = pol.allow_protocol_mismatch if allow_protocol_mismatch is None else allow_protocol_mismatch
    warnings: list[str] = []
    comps: list[BenchmarkComparison] = []
    names = list(result_a.benchmarks) + [n for n in result_b.benchmarks if n not in result_a.benchmarks]
    for name in names:
        ra, rb = result_a.benchmarks.get(name), result_b.benchmarks.get(name)
        if ra is None or rb is None:
            warnings.append(f"{name}: only in {result_a.checkpoint if ra else result_b.checkpoint}; not compared")
            continue
        _check_protocols(name, ra, rb, allow)
        comps.append(_compare_one(name, ra, rb, pol))
    for extra in info_baselines:
        for name, rx in extra.benchmarks.items():
            rb = result_b.benchmarks.get(name)
            if rb is None:
                continue
            _check_protocols(name, rx, rb, allow)
            c = _compare_one(name, rx, rb, pol)
            # Flips are listed against A only; the role is info whatever the benchmark's role against A.
            c.benchmark, c.role, c.baseline = f"{name} vs {extra.checkpoint}", "info", extra.checkpoint
            c.fixed, c.broken = [], []
            comps.append(c)
    # Holm within two families: the targets (what the gate's "improved" rests on) and everything else.
    # One family over all rows let an added info or guard benchmark change the target's verdict.
    for family in ([c for c in comps if c.role == "target"], [c for c in comps if c.role != "target"]):
        for c, p_adj in zip(family, holm([c.p_value for c in family]), strict=True):
            c.p_adjusted = p_adj
    for c in comps:
        min_effect = pol.min_effect_for(c.benchmark.removesuffix(f" vs {c.baseline}") if c.baseline else c.benchmark)
        c.verdict = _verdict(c, pol.alpha, min_effect)
        if c.verdict == "inconclusive" and math.isfinite(c.mde_sd):  # only then does "too few examples" explain it
            warn = power_warning(c.n, c.mde_sd, min_effect, alpha=pol.alpha, power=pol.power)
            if warn:
                c.warnings.insert(0, warn)
    report = ComparisonReport(result_a.checkpoint, result_b.checkpoint, comps, GateResult(True, [], []), pol, warnings,
                              gated=bool(pol.targets or pol.guards))
    report.gate = evaluate_gate(report, pol)
    return report


def evaluate_gate(report: ComparisonReport, pol: GatePolicy) -> GateResult:
    by = report.by_name()
    reasons: list[str] = []
    failures: list[str] = []
    for name in pol.targets:
        c = by.get(name)
        if c is None:
            failures.append(f"target {name}: missing from the comparison")
        elif c.verdict != "improved":
            failures.append(f"target {name}: {c.verdict} (diff {c.diff:+.3f}, Holm p={c.p_adjusted:.3g}); must improve")
        else:
            reasons.append(f"target {name}: improved (diff {c.diff:+.3f}, Holm p={c.p_adjusted:.3g})")
    for name in pol.guards:
        c = by.get(name)
        if c is None:
            failures.append(f"guard {name}: missing from the comparison")
        elif not c.ni_passed:
            failures.append(f"guard {name}: non-inferiority not shown (lower bound {c.ni_lower_bound:+.3f} "
                            f"vs margin -{c.ni_margin:.3f}, p={c.ni_p_value:.3g})")
        else:
            reasons.append(f"guard {name}: non-inferior (lower bound {c.ni_lower_bound:+.3f} > -{c.ni_margin:.3f})")
    for name in pol.targets + pol.guards:
        c = by.get(name)
        if c is not None and any("examples finished" in w for w in c.warnings):
            failures.append(f"{name}: incomplete results; finish the eval before gating")
    if not pol.targets and not pol.guards:
        reasons.append("no target or guard benchmarks configured: gate passes vacuously")
    return GateResult(not failures, [*(f"FAIL {f}" for f in failures), *(f"ok {r}" for r in reasons)], failures)


def _fmt_ci(lo: float, hi: float, digits: int = 3) -> str:
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def format_verdict_table(report: ComparisonReport) -> str:
    """A fixed-width table for terminals, followed by warnings and the gate decision."""
    pct = f"{report.policy.confidence:.0%}"
    head = ["benchmark", "role", "n", "A", "B", f"B-A {pct} CI", "test", "p(Holm)", "NI", "verdict"]
    rows = [head]
    for c in report.comparisons:
        ni = ("pass" if c.ni_passed else "FAIL") + f" m={c.ni_margin:g}" if c.role == "guard" else "-"
        rows.append([c.benchmark + (" (ll/tok)" if c.kind == "perplexity" else ""), c.role, str(c.n),
                     f"{c.mean_a:.3f}", f"{c.mean_b:.3f}", f"{c.diff:+.3f} {_fmt_ci(*c.diff_ci)}",
                     c.test, f"{c.p_adjusted:.3g}", ni, c.verdict.upper() if c.verdict == "regressed" else c.verdict])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"A = {report.checkpoint_a}", f"B = {report.checkpoint_b}"]
    for j, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("p(Holm): adjusted within the targets, and separately within the other rows")
    extra = sorted({c.baseline for c in report.comparisons if c.baseline})
    if extra:
        lines.append(f"rows '... vs X': B against X ({', '.join(extra)}) instead of A, for information only")
    notes = [f"{c.benchmark}: {w}" for c in report.comparisons for w in c.warnings] + report.warnings
    if notes:
        lines.append("")
        lines.extend(f"warning: {n}" for n in notes)
    lines.append("")
    if not report.gated:  # a vacuous "PASSED" read like a release decision
        lines.append("GATE: NONE (no target or guard benchmarks configured; nothing was gated)")
        return "\n".join(lines)
    lines.append(f"GATE: {'PASSED' if report.gate.passed else 'FAILED'}")
    lines.extend(f"  {r}" for r in report.gate.reasons)
    return "\n".join(lines)
