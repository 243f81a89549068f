"""Data quality report on a training set, before any training (pain-points cluster 3).

Checks: render failures, empty examples, exact duplicates, train/eval contamination (word n-gram overlap
with every eval set), over-long examples, the share of loss-weighted tokens (zero is an error), a token
length histogram and one rendered example with its weights. Blocking problems raise DataQualityError
after the report (JSON + HTML + PNG) has been written, so the artifact explains the failure.
"""

from __future__ import annotations

import html
import json
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evals.benchmarks import AnyBenchmark
from evals.protocols import Messages

RenderFn = Callable[[Messages], tuple[list[int], list[float]]]


class DataQualityError(RuntimeError):
    """Blocking data problems; the message lists them and where the report is."""


@dataclass
class DataQualityConfig:
    max_tokens: int = 2048
    ngram: int = 13
    max_duplicate_fraction: float = 0.05
    max_contaminated_fraction: float = 0.0  # per eval set: share of eval items seen in training
    max_overlong_fraction: float = 0.01
    block_on_empty: bool = True
    example_index: int = 0
    max_listed: int = 10


@dataclass
class Problem:
    check: str
    severity: str  # "error" (blocking) | "warning"
    message: str


@dataclass
class DataQualityReport:
    n_examples: int
    stats: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    out_dir: str = ""

    @property
    def blocking(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"n_examples": self.n_examples, "stats": self.stats, "problems": [asdict(p) for p in self.problems],
                "blocking": bool(self.blocking)}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def benchmark_texts(bench: AnyBenchmark) -> list[str]:
    """What a contamination check should look for: the prompt text (or the held-out text)."""
    return [ex.prompt_text() for ex in bench.examples]


def _contamination(train_texts: list[list[str]], eval_texts: Sequence[str], n: int) -> list[tuple[int, int]]:
    """(eval index, train index) for every eval item with an n-gram (or its whole text, if shorter) in training."""
    eval_grams: dict[int, dict[tuple[str, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
    for j, t in enumerate(eval_texts):
        w = _words(t)
        k = min(n, len(w))
        if k == 0:
            continue
        for i in range(len(w) - k + 1):
            eval_grams[k][tuple(w[i:i + k])].append(j)
    hits: dict[int, int] = {}
    for k, grams in eval_grams.items():
        for ti, msgs in enumerate(train_texts):
            for text in msgs:
                w = _words(text)
                for i in range(len(w) - k + 1):
                    for j in grams.get(tuple(w[i:i + k]), ()):
                        hits.setdefault(j, ti)
    return sorted(hits.items())


def _histogram(lengths: list[int], max_tokens: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4C72B0")
    ax.axvline(max_tokens, color="#C44E52", linestyle="--", label=f"max_tokens={max_tokens}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _render_html(report: DataQualityReport, rendered: list[tuple[str, float]]) -> str:
    rows = "".join(f"<tr class='{p.severity}'><td>{p.severity}</td><td>{html.escape(p.check)}</td>"
                   f"<td>{html.escape(p.message)}</td></tr>" for p in report.problems) or "<tr><td colspan=3>none</td></tr>"
    toks = "".join(f"<span class='{'w' if w > 0 else 'nw'}' title='weight {w:g}'>{html.escape(t)}</span>"
                   for t, w in rendered)
    stats = html.escape(json.dumps(report.stats, indent=2))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Data quality</title><style>
body{{font-family:sans-serif;margin:2em}} .error td{{color:#b00}} .warning td{{color:#a60}}
.w{{background:#c8f0c8}} .nw{{background:#eee;color:#777}} pre.tok{{white-space:pre-wrap;border:1px solid #ccc;padding:.5em}}
td{{padding:2px 8px;border-bottom:1px solid #ddd}}</style></head><body>
<h1>Data quality: {report.n_examples} examples, {'BLOCKED' if report.blocking else 'ok'}</h1>
<h2>Problems</h2><table>{rows}</table>
<h2>Token lengths</h2><img src="token_lengths.png" alt="token length histogram">
<h2>Rendered example (green = loss-weighted)</h2><pre class="tok">{toks}</pre>
<h2>Stats</h2><pre>{stats}</pre></body></html>"""


def _as_messages(item: Any, index: int) -> Messages:
    if isinstance(item, Mapping) and "messages" in item:
        item = item["messages"]
    if not isinstance(item, list):
        raise DataQualityError(f"training example {index}: expected a list of messages or {{'messages': [...]}}, "
                               f"got {type(item).__name__}")
    return item


def check_training_data(examples: Sequence[Any], tokenizer: Any, render: RenderFn, out_dir: str | Path, *,
                        eval_sets: Mapping[str, Sequence[str] | AnyBenchmark] | None = None,
                        config: DataQualityConfig | None = None, raise_on_blocking: bool = True) -> DataQualityReport:
    """Build the report, write data_quality.{json,html} + token_lengths.png under `out_dir`, raise if blocking."""
    cfg = config or DataQualityConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    msgs_list = [_as_messages(x, i) for i, x in enumerate(examples)]
    n = len(msgs_list)
    report = DataQualityReport(n, {}, [], str(out))
    add = report.problems.append

    def listed(idx: list[int]) -> str:
        more = f" (+{len(idx) - cfg.max_listed} more)" if len(idx) > cfg.max_listed else ""
        return ", ".join(map(str, idx[: cfg.max_listed])) + more

    if n == 0:
        add(Problem("empty", "error", "the training set has no examples"))
    lengths: list[int] = []
    weighted = total = 0
    render_failed, empty, no_weight, overlong = [], [], [], []
    rendered_example: list[tuple[str, float]] = []
    first_error = ""
    for i, msgs in enumerate(msgs_list):
        contents = [m.get("content", "") if isinstance(m, Mapping) else "" for m in msgs]
        if not msgs or not any(isinstance(c, str) and c.strip() for c in contents):
            empty.append(i)
        try:
            tokens, weights = render(msgs)
        except Exception as e:  # any renderer failure is a data problem to report, not a crash
            if not render_failed:
                first_error = f"first: example {i}: {type(e).__name__}: {e}"
            render_failed.append(i)
            continue
        if len(tokens) != len(weights):
            raise DataQualityError(f"render() returned {len(tokens)} tokens but {len(weights)} weights for example {i}")
        lengths.append(len(tokens))
        w_pos = sum(1 for w in weights if w > 0)
        weighted += w_pos
        total += len(tokens)
        if w_pos == 0:
            no_weight.append(i)
        if len(tokens) > cfg.max_tokens:
            overlong.append(i)
        if i == min(cfg.example_index, n - 1):
            rendered_example = [(tokenizer.decode([t]), float(w)) for t, w in zip(tokens, weights, strict=True)]
    if render_failed:
        add(Problem("render", "error", f"{len(render_failed)} examples failed to render: {listed(render_failed)}; {first_error}"))
    if empty:
        add(Problem("empty", "error" if cfg.block_on_empty else "warning",
                    f"{len(empty)} examples have no content: {listed(empty)}"))
    share = weighted / total if total else 0.0
    if n and total and weighted == 0:
        add(Problem("loss_weights", "error", "no token has a positive loss weight: training would learn nothing "
                    "(check train_on_what / the assistant mask / pad == eos)"))
    elif no_weight:
        add(Problem("loss_weights", "warning", f"{len(no_weight)} examples have no loss-weighted token: {listed(no_weight)}"))
    if overlong:
        frac = len(overlong) / n
        add(Problem("overlong", "error" if frac > cfg.max_overlong_fraction else "warning",
                    f"{len(overlong)} examples ({frac:.1%}) exceed max_tokens={cfg.max_tokens}: {listed(overlong)}"))
    # Exact duplicates after whitespace normalisation.
    groups: dict[str, list[int]] = defaultdict(list)
    for i, msgs in enumerate(msgs_list):
        groups[json.dumps([[str(m.get("role")), " ".join(str(m.get("content", "")).split())]
                           for m in msgs if isinstance(m, Mapping)])].append(i)
    dups = [g for g in groups.values() if len(g) > 1]
    n_dup = sum(len(g) - 1 for g in dups)
    if dups:
        frac = n_dup / n
        add(Problem("duplicates", "error" if frac > cfg.max_duplicate_fraction else "warning",
                    f"{n_dup} duplicate examples ({frac:.1%}); groups e.g. {[g[:5] for g in dups[:3]]}"))
    contamination: dict[str, Any] = {}
    train_texts = [[str(m.get("content", "")) for m in msgs if isinstance(m, Mapping)] for msgs in msgs_list]
    for name, ev in (eval_sets or {}).items():
        texts = benchmark_texts(ev) if hasattr(ev, "examples") else list(ev)  # type: ignore[arg-type]
        hits = _contamination(train_texts, texts, cfg.ngram)
        frac = len(hits) / len(texts) if texts else 0.0
        contamination[name] = {"n_eval": len(texts), "contaminated": len(hits), "fraction": frac,
                               "examples": [{"eval_index": j, "train_index": t, "eval_text": texts[j][:200]}
                                            for j, t in hits[: cfg.max_listed]]}
        if hits:
            add(Problem("contamination", "error" if frac > cfg.max_contaminated_fraction else "warning",
                        f"eval set {name!r}: {len(hits)}/{len(texts)} items share a {cfg.ngram}-gram (or their whole "
                        f"text) with training examples, e.g. eval {hits[0][0]} ~ train {hits[0][1]}"))
    report.stats = {
        "tokens_total": total, "tokens_weighted": weighted, "weighted_token_share": share,
        "length_min": min(lengths, default=0), "length_max": max(lengths, default=0),
        "length_mean": (sum(lengths) / len(lengths)) if lengths else 0.0,
        "n_empty": len(empty), "n_render_failed": len(render_failed), "n_no_weight": len(no_weight),
        "n_overlong": len(overlong), "n_duplicates": n_dup, "contamination": contamination,
        "rendered_example_index": min(cfg.example_index, max(n - 1, 0)),
        "rendered_example": [[t, w] for t, w in rendered_example],
    }
    _histogram(lengths or [0], cfg.max_tokens, out / "token_lengths.png")
    (out / "data_quality.json").write_text(json.dumps(report.to_dict(), indent=2))
    (out / "data_quality.html").write_text(_render_html(report, rendered_example))
    if report.blocking and raise_on_blocking:
        lines = "\n".join(f"  - [{p.check}] {p.message}" for p in report.blocking)
        raise DataQualityError(f"training data has {len(report.blocking)} blocking problem(s):\n{lines}\n"
                               f"report: {out / 'data_quality.html'}")
    return report
