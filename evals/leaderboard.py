"""A leaderboard of N runs evaluated on the same examples: which is best, and is it really better?

Features:
- each run's score on one benchmark with its bootstrap CI (the same seeded bootstrap as `evals.compare`);
- the paired difference of every run to the best one and to the starting model (base), each pair computed
  by `evals.compare.compare` itself (so a leaderboard row equals `tuneloop compare best run` on that pair:
  same diff, CI, test and raw p-value), then Holm-adjusted within each family (runs vs best: N - 1 tests;
  runs vs base: N tests);
- a plain statement of which runs are statistically tied with the best: no significant difference after
  Holm at `alpha`. Tied means "this eval set cannot tell them apart", not "equivalent";
- `resolve_refs`: runs named by pipeline run dirs, result folders, MLflow run ids or a sweep id.

Trade-offs: the best is the highest point estimate (first listed on an exact tie), so "best" itself is chosen
on the data the rows are computed on; that is why the sweep re-scores the winner on a confirmation split that
no ranking saw (flows/sweep.py). Only the examples every run has are compared (as `compare` does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evals.compare import BenchmarkComparison, GatePolicy, compare
from evals.runner import EvalResult, load_eval_result
from evals.stats import bootstrap_ci, holm
from evals.store import ResultStore


@dataclass
class LeaderboardRow:
    name: str
    rank: int
    n: int
    score: float
    ci: tuple[float, float]
    diff_best: float = 0.0  # this run minus the best (<= 0)
    diff_best_ci: tuple[float, float] = (0.0, 0.0)
    p_best: float = 1.0
    p_best_holm: float = 1.0
    test_best: str = "-"
    diff_base: float = math.nan  # this run minus the base (nan: no base given)
    diff_base_ci: tuple[float, float] = (math.nan, math.nan)
    p_base: float = math.nan
    p_base_holm: float = math.nan
    vs_base: str = "-"  # better | worse | no significant difference
    is_best: bool = False
    tied_with_best: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a sweep trial's params and status


@dataclass
class Leaderboard:
    benchmark: str
    rows: list[LeaderboardRow]
    best: str
    base: str | None
    alpha: float
    confidence: float
    vs_best: dict[str, BenchmarkComparison] = field(default_factory=dict)
    vs_base: dict[str, BenchmarkComparison] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, LeaderboardRow]:
        return {r.name: r for r in self.rows}

    def tied(self) -> list[str]:
        """Runs not significantly different from the best (the best excluded)."""
        return [r.name for r in self.rows if r.tied_with_best and not r.is_best]

    def statement(self) -> str:
        tied = self.tied()
        head = f"best on {self.benchmark}: {self.best} ({self.by_name()[self.best].score:.3f})"
        if not tied:
            return (f"{head}; every other run is significantly worse (Holm-adjusted p < {self.alpha:g}): "
                    "the best is really the best on this eval set")
        return (f"{head}; statistically tied with it (Holm-adjusted p >= {self.alpha:g}, this eval set cannot "
                f"tell them apart): {', '.join(tied)}")

    def to_dict(self) -> dict[str, Any]:
        from evals.compare import _finite

        return _finite({"benchmark": self.benchmark, "best": self.best, "base": self.base, "alpha": self.alpha,
                        "confidence": self.confidence, "tied_with_best": self.tied(), "statement": self.statement(),
                        "rows": [asdict(r) for r in self.rows], "warnings": self.warnings})

    def _cells(self, extra_cols: Sequence[str]) -> tuple[list[str], list[list[str]]]:
        pct = f"{self.confidence:.0%}"
        head = ["#", "run", *extra_cols, "n", f"score [{pct} CI]", f"vs best [{pct} CI]", "p vs best (Holm)",
                "tied", f"vs {self.base or 'base'} [{pct} CI]", "p vs base (Holm)"]
        body = []
        for r in self.rows:
            vs_best = "best" if r.is_best else f"{r.diff_best:+.3f} {_ci(r.diff_best_ci)}"
            p_best = "-" if r.is_best else f"{r.p_best_holm:.3g}"
            tie = "best" if r.is_best else ("yes" if r.tied_with_best else "no")
            vs_base = "-" if math.isnan(r.diff_base) else f"{r.diff_base:+.3f} {_ci(r.diff_base_ci)}"
            p_base = "-" if math.isnan(r.p_base_holm) else f"{r.p_base_holm:.3g}"
            body.append([str(r.rank), r.name, *(_fmt(r.extra.get(c, "")) for c in extra_cols), str(r.n),
                         f"{r.score:.3f} [{r.ci[0]:.3f}, {r.ci[1]:.3f}]", vs_best, p_best, tie, vs_base, p_base])
        return head, body

    def format_table(self, extra_cols: Sequence[str] = ()) -> str:
        head, body = self._cells(extra_cols)
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += ["p(Holm): paired test (McNemar exact for 0/1 scores, else paired t), Holm-adjusted within each "
                  "column's family", self.statement(), *(f"warning: {w}" for w in self.warnings)]
        return "\n".join(lines)

    def to_markdown(self, extra_cols: Sequence[str] = ()) -> str:
        head, body = self._cells(extra_cols)
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _only(res: EvalResult, benchmark: str) -> EvalResult:
    return EvalResult(res.checkpoint, {benchmark: res.benchmarks[benchmark]})


def _renamed(res: EvalResult, name: str) -> EvalResult:
    return EvalResult(name, dict(res.benchmarks))


def leaderboard(results: Mapping[str, EvalResult], base: EvalResult | None = None, *, benchmark: str = "target",
                policy: GatePolicy | None = None, extra: Mapping[str, dict[str, Any]] | None = None
                ) -> Leaderboard:
    """Rank `results` ({run name: its eval result}) on `benchmark`; `policy` supplies alpha, confidence, the
    bootstrap and the minimum effect (default: GatePolicy's). Runs without that benchmark are left out with a
    warning."""
    pol = policy or GatePolicy()
    pol = GatePolicy(targets=[benchmark], alpha=pol.alpha, min_effect=pol.min_effect, confidence=pol.confidence,
                     n_bootstrap=pol.n_bootstrap, seed=pol.seed, power=pol.power,
                     allow_protocol_mismatch=pol.allow_protocol_mismatch)
    warnings = [f"{n}: no {benchmark!r} results; left out" for n, r in results.items() if benchmark not in r.benchmarks]
    runs = {n: _only(_renamed(r, n), benchmark) for n, r in results.items() if benchmark in r.benchmarks}
    if not runs:
        raise ValueError(f"leaderboard: no run has results for benchmark {benchmark!r}")
    means = {n: r.benchmarks[benchmark].mean for n, r in runs.items()}
    order = sorted(runs, key=lambda n: -means[n] if math.isfinite(means[n]) else math.inf)  # stable: ties keep order
    best = order[0]
    vs_best = {n: compare(runs[best], runs[n], pol).by_name()[benchmark] for n in order[1:]}
    vs_base: dict[str, BenchmarkComparison] = {}
    if base is not None:
        if benchmark not in base.benchmarks:
            warnings.append(f"base {base.checkpoint}: no {benchmark!r} results; no comparison with it")
        else:
            b = _only(base, benchmark)
            vs_base = {n: compare(b, runs[n], pol).by_name()[benchmark] for n in order}
    kw = {"n_resamples": pol.n_bootstrap, "seed": pol.seed, "confidence": pol.confidence}
    rows = []
    for rank, n in enumerate(order, 1):
        scores = list(runs[n].benchmarks[benchmark].scores().values())
        finite = all(math.isfinite(s) for s in scores) and scores
        ci = bootstrap_ci(scores, **kw) if finite else None
        rows.append(LeaderboardRow(n, rank, len(scores), means[n], (ci.low, ci.high) if ci else (math.nan, math.nan),
                                   is_best=n == best, tied_with_best=n == best, extra=dict((extra or {}).get(n, {}))))
    by = {r.name: r for r in rows}
    names = list(vs_best)
    for n, p_adj in zip(names, holm([vs_best[n].p_value for n in names]), strict=True):
        c, r = vs_best[n], by[n]
        r.diff_best, r.diff_best_ci, r.p_best, r.p_best_holm, r.test_best = c.diff, c.diff_ci, c.p_value, p_adj, c.test
        r.tied_with_best = not p_adj < pol.alpha
    names = list(vs_base)
    for n, p_adj in zip(names, holm([vs_base[n].p_value for n in names]), strict=True):
        c, r = vs_base[n], by[n]
        r.diff_base, r.diff_base_ci, r.p_base, r.p_base_holm = c.diff, c.diff_ci, c.p_value, p_adj
        r.vs_base = ("better" if c.diff > 0 else "worse") if p_adj < pol.alpha else "no significant difference"
    return Leaderboard(benchmark, rows, best, base.checkpoint if base is not None else None, pol.alpha,
                       pol.confidence, vs_best, vs_base, warnings)


# ------------------------------------------------------------------------------------- naming the runs

def _from_run_dir(d: Path) -> tuple[EvalResult, EvalResult | None]:
    """A pipeline run dir: its trained model's results and its base's (if stored)."""
    store = ResultStore(d / "eval")
    base_dir = next((store.checkpoint_dir(n) for n in ("base", "start")
                     if (store.checkpoint_dir(n) / "checkpoint.json").exists()), None)
    trained = load_eval_result(store.checkpoint_dir("trained"))
    return trained, load_eval_result(base_dir) if base_dir else None


def _sweep_trial_dirs(ref: str, sweep_root: str | Path) -> list[tuple[str, Path]] | None:
    """A sweep's trials (name, run dir) that finished, from its sweep dir or id; None: not a sweep."""
    for d in (Path(ref), Path(sweep_root) / ref):
        manifest = d / "sweep.json"
        if manifest.exists():
            trials = json.loads(manifest.read_text()).get("trials", [])
            return [(t["name"], Path(t["run_dir"])) for t in trials
                    if t.get("state") == "COMPLETE" and (Path(t["run_dir"]) / "eval").is_dir()]
    return None


def _mlflow_sweep_children(ref: str) -> list[str]:
    import mlflow

    from infra.tracking import default_tracking_uri

    mlflow.set_tracking_uri(default_tracking_uri())
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`tuneloop.sweep_id` = '{ref}' and tags.`tuneloop.trial` != ''")
    return [r.info.run_id for r in runs if r.info.status == "FINISHED"]


def resolve_refs(refs: Sequence[str], sweep_root: str | Path = ".tuneloop/sweeps",
                 mlflow_loader: Any = None) -> tuple[dict[str, EvalResult], EvalResult | None]:
    """({name: trained result}, the first base found) for refs that are pipeline run dirs, result folders
    (checkpoint.json), sweep dirs or ids (their finished trials), or MLflow run ids (`runs:/ID` or bare).
    `mlflow_loader(ref) -> EvalResult` fetches a `runs:/ID[/CKPT]` result (evals.cli passes its own)."""
    results: dict[str, EvalResult] = {}
    base: EvalResult | None = None

    def add(name: str, trained: EvalResult, b: EvalResult | None) -> None:
        nonlocal base
        key, i = name, 2
        while key in results:  # two refs with one name stay two rows
            key, i = f"{name}#{i}", i + 1
        results[key] = trained
        base = base or b

    for ref in refs:
        p = Path(ref)
        if (p / "checkpoint.json").exists():
            r = load_eval_result(p)
            add(r.checkpoint, r, None)
        elif (p / "eval").is_dir():
            add(p.name, *_from_run_dir(p))
        elif (trials := _sweep_trial_dirs(ref, sweep_root)) is not None:
            for name, d in trials:
                add(name, *_from_run_dir(d))
        else:
            if mlflow_loader is None:
                raise ValueError(f"{ref!r}: not a run dir, result folder or sweep, and no MLflow loader given")
            ids = [ref.removeprefix("runs:/")] if ref.startswith("runs:/") or _is_run_id(ref) \
                else _mlflow_sweep_children(ref)
            if not ids:
                raise ValueError(f"{ref!r}: not a run dir, result folder, sweep dir/id or MLflow run id")
            for rid in ids:
                run_id = rid.partition("/")[0]
                add(run_id[:8], mlflow_loader(f"runs:/{rid}"), _maybe(mlflow_loader, f"runs:/{run_id}/base"))
    return results, base


def _is_run_id(ref: str) -> bool:
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


def _maybe(loader: Any, ref: str) -> EvalResult | None:
    try:
        return loader(ref)
    except Exception:  # a run without stored base results: the leaderboard just has no base column
        return None
