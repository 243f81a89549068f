"""HTML report with PNG plots: scores with CIs per checkpoint, forest plot of differences, loss curves,
flipped examples side by side, the verdict table, the gate decision and the pinned protocols."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

from evals.compare import ComparisonReport, Flip, format_verdict_table  # noqa: E402
from evals.runner import EvalResult  # noqa: E402

LossCurve = Sequence[float] | Sequence[tuple[int, float]]
_VERDICT_COLOR = {"improved": "#2a9d3c", "regressed": "#c0392b", "unchanged": "#7f8c8d", "inconclusive": "#e69f00"}


def _esc(x: object) -> str:
    return html.escape(str(x))


def _scores_plot(results: Sequence[EvalResult], path: Path) -> None:
    names = list(dict.fromkeys(n for r in results for n in r.benchmarks))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        labels, means, lo, hi = [], [], [], []
        kind = "generate"
        for r in results:
            br = r.benchmarks.get(name)
            if br is None or not br.records or not math.isfinite(br.mean):
                continue  # -inf scores (zero-probability texts) have no bar; the verdict table names them
            ci = br.ci()
            kind = br.kind
            labels.append(r.checkpoint[-18:])
            means.append(ci.estimate)
            lo.append(ci.estimate - ci.low)
            hi.append(ci.high - ci.estimate)
        x = range(len(labels))
        ax.bar(x, means, yerr=[lo, hi], capsize=4, color=plt.cm.tab10.colors[: len(labels)])
        ax.set_xticks(list(x), labels, rotation=20, fontsize=7)
        ax.set_title(name + (" (log-lik/token)" if kind == "perplexity" else ""), fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("scores with 95% bootstrap CIs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _forest_plot(report: ComparisonReport, path: Path) -> None:
    comps = report.comparisons
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(comps) + 1.4), dpi=100)
    for i, c in enumerate(comps):
        y = len(comps) - 1 - i
        color = _VERDICT_COLOR.get(c.verdict, "black")
        if not all(map(math.isfinite, (c.diff, *c.diff_ci))):
            continue  # a non-finite comparison (see compare._nonfinite_comparison) has no point to draw
        ax.errorbar(c.diff, y, xerr=[[c.diff - c.diff_ci[0]], [c.diff_ci[1] - c.diff]], fmt="o", color=color, capsize=4)
        if c.role == "guard":
            ax.plot([-c.ni_margin], [y], marker="|", markersize=18, markeredgewidth=2.5, color="#c0392b")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(comps)), [f"{c.benchmark} [{c.role}] {c.verdict}" for c in reversed(comps)], fontsize=8)
    ax.set_xlabel(f"B - A (paired, {report.policy.confidence:.0%} CI); red tick = guard margin")
    ax.set_title("differences per benchmark")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _loss_plot(curves: Mapping[str, LossCurve], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for name, curve in curves.items():
        pts = list(curve)
        if pts and isinstance(pts[0], tuple | list):
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]  # type: ignore[index]
        else:
            xs, ys = list(range(len(pts))), pts
        ax.plot(xs, ys, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("loss curves")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _prompt_text(prompt: str) -> str:
    try:
        msgs = json.loads(prompt)
        return "\n".join(f"[{m['role']}] {m['content']}" for m in msgs)
    except (ValueError, TypeError, KeyError):
        return prompt


def _flip_rows(flips: list[Flip], limit: int) -> tuple[str, str]:
    rows = []
    for f in flips[:limit]:
        rows.append(f"<tr><td><pre>{_esc(_prompt_text(f.prompt))}</pre><small>id {_esc(f.example_id)}; target "
                    f"{_esc(f.target)}</small></td><td><pre>{_esc(f.output_a)}</pre><small>extracted {_esc(f.extracted_a)}"
                    f", score {f.score_a:g}</small></td><td><pre>{_esc(f.output_b)}</pre><small>extracted "
                    f"{_esc(f.extracted_b)}, score {f.score_b:g}</small></td></tr>")
    more = f"<p>{len(flips) - limit} more not shown.</p>" if len(flips) > limit else ""
    return "".join(rows), more


def write_report(out_dir: str | Path, *, report: ComparisonReport | None = None, results: Sequence[EvalResult] = (),
                 loss_curves: Mapping[str, LossCurve] | None = None, title: str = "tuneloop eval report",
                 max_flips: int = 20) -> Path:
    """Write index.html and its PNGs under `out_dir`; returns the path of index.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{_esc(title)}</h1>"]
    if report is not None:
        status = "NONE" if not report.gated else "PASSED" if report.gate.passed else "FAILED"
        parts.append(f"<h2 class='gate {status.lower()}'>Gate: {status}</h2><ul>"
                     + "".join(f"<li>{_esc(r)}</li>" for r in report.gate.reasons) + "</ul>")
        parts.append(f"<h2>Verdicts</h2><pre class='table'>{_esc(format_verdict_table(report))}</pre>")
    if results:
        _scores_plot(results, out / "scores.png")
        parts.append("<h2>Scores per checkpoint</h2><img src='scores.png' alt='scores with confidence intervals'>")
    if report is not None and report.comparisons:
        _forest_plot(report, out / "forest.png")
        parts.append("<h2>Differences (forest plot)</h2><img src='forest.png' alt='forest plot of differences'>")
    if loss_curves:
        _loss_plot(loss_curves, out / "loss.png")
        parts.append("<h2>Loss curves</h2><img src='loss.png' alt='loss curves'>")
    if report is not None:
        parts.append("<h2>Flipped examples</h2>")
        head = f"<tr><th>prompt</th><th>A: {_esc(report.checkpoint_a)}</th><th>B: {_esc(report.checkpoint_b)}</th></tr>"
        for c in report.comparisons:
            if not (c.fixed or c.broken):
                continue
            for label, flips in (("fixed by B", c.fixed), ("broken by B", c.broken)):
                if flips:
                    rows, more = _flip_rows(flips, max_flips)
                    parts.append(f"<h3>{_esc(c.benchmark)}: {len(flips)} {label}</h3><table class='flips'>{head}{rows}</table>{more}")
    protos = {}
    for r in results:
        for name, br in r.benchmarks.items():
            protos.setdefault((name, br.protocol_hash), br.protocol.to_dict())
    if protos:
        parts.append("<h2>Eval protocols</h2>" + "".join(
            f"<h4>{_esc(n)} · {_esc(h)}</h4><pre>{_esc(json.dumps(p, indent=1, sort_keys=True))}</pre>"
            for (n, h), p in protos.items()))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{_esc(title)}</title><style>
body{{font-family:sans-serif;margin:1.5em;max-width:1300px}} img{{max-width:100%;border:1px solid #ddd}}
.gate.passed{{color:#2a9d3c}} .gate.failed{{color:#c0392b}} pre{{white-space:pre-wrap;margin:0}}
pre.table{{white-space:pre;overflow-x:auto;background:#f6f6f6;padding:.6em}}
table.flips{{border-collapse:collapse;width:100%}} table.flips td,table.flips th{{border:1px solid #ccc;
padding:4px;vertical-align:top;width:33%;font-size:12px}}</style></head><body>{''.join(parts)}</body></html>"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
