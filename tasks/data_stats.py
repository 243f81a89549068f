"""Streaming dataset statistics for the data-quality report, sized for millions of rows.

    stats = dataset_stats(rows_ds, tokenized, max_length=128, eval_sets={"target": eval_prompts})

Features (memory: O(rows) 8-byte hashes + O(eval n-grams); the rows and tokens stay in memory-mapped Arrow):
- token length histogram (power-of-two bins up to the longest row) and p50/p90/p99/max, from the Arrow
  `length` column of the tokenized cache (numpy over the column, no Python list of lengths);
- truncation share: rows longer than `max_length` (the run refuses them; the report says how many);
- loss-weighted token share, from the `weights` column (Arrow compute);
- exact duplicates by a 64-bit hash of the whitespace-normalised (role, content) turns (the same
  normalisation as `evals.data_quality`), counted with `numpy.unique`;
- contamination: eval items sharing a word n-gram (default 13, or the whole item if shorter) with any
  training turn, as in `evals.data_quality._contamination`, streamed over the training rows in Arrow batches.

- `quality_report`: the data-quality gate's report (`evals.data_quality.check_training_data`'s stats,
  problems and JSON/HTML/PNG files) from the same streamed passes, for `tasks.data_stage.data_quality_task`.

Trade-off: duplicate detection by 64-bit hash can merge two different rows with probability ~n^2/2^65
(1e-8 at 1M rows); groups report row indices, which the caller maps to file:line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_BATCH = 4096
_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def row_hash(messages: Sequence[Any]) -> int:
    key = json.dumps([[str(m.get("role")), " ".join(str(m.get("content", "")).split())]
                      for m in messages if isinstance(m, Mapping)])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def length_stats(lengths_N: Any, max_length: int) -> dict[str, Any]:
    import numpy as np

    arr = np.asarray(lengths_N.to_numpy() if hasattr(lengths_N, "to_numpy") else lengths_N, dtype=np.int64)
    if arr.size == 0:
        return {"n_rows": 0}
    top = int(arr.max())
    # [0, 8), [8, 16), ... up to the power of two >= the longest row (numpy's last bin includes its edge)
    edges = [0] + [2 ** k for k in range(3, max(4, int(np.ceil(np.log2(max(top, 8)))) + 1))]
    counts, _ = np.histogram(arr, bins=np.asarray(edges))
    over = int((arr > max_length).sum())
    return {"n_rows": int(arr.size), "tokens_total": int(arr.sum()),
            "length_hist": {"edges": edges, "counts": [int(c) for c in counts]},
            "length_p50": float(np.percentile(arr, 50)), "length_p90": float(np.percentile(arr, 90)),
            "length_p99": float(np.percentile(arr, 99)), "length_max": top, "max_length": max_length,
            "n_over_max_length": over, "truncation_share": over / int(arr.size)}


def row_hashes(rows_ds: Any) -> Any:
    """`row_hash` of every row's `messages`, streamed in Arrow batches (numpy int64, 8 bytes a row)."""
    import numpy as np

    hashes = np.empty(len(rows_ds), dtype=np.int64)
    i = 0
    for b in rows_ds.select_columns(["messages"]).iter(batch_size=_BATCH):
        for msgs in b["messages"]:
            hashes[i] = row_hash(_turns(msgs))
            i += 1
    return hashes


def first_duplicate_groups(hashes: Any, n_groups: int, per_group: int = 5) -> list[list[int]]:
    """Row indices of the first `n_groups` groups of equal hashes, in order of each group's first row."""
    import numpy as np

    _, first, inverse, counts = np.unique(hashes, return_index=True, return_inverse=True, return_counts=True)
    dup_g = np.flatnonzero(counts > 1)
    dup_g = dup_g[np.argsort(first[dup_g], kind="stable")][:n_groups]
    return [np.flatnonzero(inverse == g)[:per_group].tolist() for g in dup_g]


def duplicate_stats(rows_ds: Any, max_groups: int = 5) -> dict[str, Any]:
    import numpy as np

    hashes = row_hashes(rows_ds)
    uniq, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    n_dup = int(len(hashes) - len(uniq))
    groups: list[list[int]] = []
    if n_dup:
        dup_ids = np.flatnonzero(counts > 1)[:max_groups]
        for g in dup_ids:
            groups.append([int(x) for x in np.flatnonzero(inverse == g)[:5]])
        groups.sort()
    return {"n_duplicates": n_dup, "duplicate_share": n_dup / max(len(hashes), 1), "duplicate_groups": groups}


def _turns(msgs: Any) -> list[dict[str, Any]]:
    from tasks.data_io import normalize_turns

    return [m for m in normalize_turns(msgs) if isinstance(m, Mapping)] if msgs is not None else []


def contamination_stats(rows_ds: Any, eval_sets: Mapping[str, Sequence[str]], ngram: int = 13,
                        max_examples: int = 5) -> dict[str, Any]:
    """Per eval set: how many items share an n-gram (or their whole text, if shorter) with a training turn."""
    out: dict[str, Any] = {}
    for name, texts in eval_sets.items():
        grams: dict[int, dict[tuple[str, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
        for j, t in enumerate(texts):
            w = _words(t)
            k = min(ngram, len(w))
            if k:
                for s in range(len(w) - k + 1):
                    grams[k][tuple(w[s:s + k])].append(j)
        hits: dict[int, int] = {}
        i = 0
        for b in rows_ds.select_columns(["messages"]).iter(batch_size=_BATCH):
            for msgs in b["messages"]:
                for m in _turns(msgs):
                    w = _words(str(m.get("content", "")))
                    for k, g in grams.items():
                        for s in range(len(w) - k + 1):
                            for j in g.get(tuple(w[s:s + k]), ()):
                                hits.setdefault(j, i)
                i += 1
        ex = sorted(hits.items())[:max_examples]
        out[name] = {"contaminated": len(hits), "of": len(texts), "share": len(hits) / max(len(texts), 1),
                     "examples": [{"eval_index": j, "train_index": t} for j, t in ex]}
    return out


def weight_stats(tokenized_ds: Any) -> dict[str, Any]:
    import pyarrow.compute as pc

    w = pc.list_flatten(tokenized_ds.data.column("weights"))
    total = len(w)
    return {"weighted_token_share": float(pc.sum(pc.greater(w, 0)).as_py() or 0) / max(total, 1)}


def dataset_stats(rows_ds: Any, tokenized_ds: Any, max_length: int,
                  eval_sets: Mapping[str, Sequence[str]] | None = None, ngram: int = 13) -> dict[str, Any]:
    """All of the above in one dict (JSON-serialisable): what `tuneloop data stats` prints and writes."""
    stats = length_stats(tokenized_ds.data.column("length"), max_length)
    stats.update(weight_stats(tokenized_ds))
    stats.update(duplicate_stats(rows_ds))
    stats["contamination"] = contamination_stats(rows_ds, eval_sets or {}, ngram)
    return stats


# ------------------------------------------------------------------ the data-quality report, streamed


def _listed(idx: list[int], total: int, cap: int) -> str:
    more = f" (+{total - cap} more)" if total > cap else ""
    return ", ".join(map(str, idx[:cap])) + more


def _row_weight_counts(tokenized_ds: Any) -> Any:
    """Loss-weighted tokens per row (numpy int64), batch by batch over the Arrow `weights` lists."""
    import numpy as np

    out = []
    for b in tokenized_ds.data.to_batches(max_chunksize=65536):
        w = b.column(b.schema.get_field_index("weights"))
        pos = np.asarray(w.flatten()) > 0
        cs = np.concatenate([[0], np.cumsum(pos, dtype=np.int64)])
        offs = np.asarray(w.offsets) - int(w.offsets[0].as_py())
        out.append(cs[offs[1:]] - cs[offs[:-1]])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def quality_report(rows_ds: Any, tokenized_ds: Any, tokenizer: Any, out_dir: str | Path, *,
                   eval_sets: Mapping[str, Sequence[str]] | None = None, config: Any = None,
                   raise_on_blocking: bool = True, render_error: str = "", hashes_N: Any = None) -> Any:
    """`evals.data_quality.check_training_data`'s report (same stats, problems, JSON/HTML/PNG files), computed
    streaming from the rows' Arrow dataset (`messages`) and its tokenized Arrow cache (`length`, `weights`,
    `input_ids`), so it runs at millions of rows. Rows come from the tokenized cache, which refused rows that
    cannot be rendered: `render_error` (the cache's located refusal) becomes the blocking `render` problem.
    `hashes_N` (an int64 array of len(rows)): filled with the rows' duplicate hashes, for callers that locate
    the duplicate groups themselves."""
    import numpy as np

    from evals.data_quality import (
        DataQualityConfig,
        DataQualityError,
        DataQualityReport,
        Problem,
        _histogram,
        _render_html,
    )

    cfg = config or DataQualityConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(rows_ds)
    report = DataQualityReport(n, {}, [], str(out))
    add = report.problems.append
    cap = cfg.max_listed
    if n == 0:
        add(Problem("empty", "error", "the training set has no examples"))
    # per-row contents: empty rows and the duplicate hashes in one streamed pass over `messages`
    empty: list[int] = []
    n_empty = 0
    hashes = np.empty(n, dtype=np.int64) if hashes_N is None else hashes_N
    i = 0
    for b in rows_ds.select_columns(["messages"]).iter(batch_size=_BATCH):
        for msgs in b["messages"]:
            turns = _turns(msgs)
            if not turns or not any(isinstance(m.get("content"), str) and m["content"].strip() for m in turns):
                n_empty += 1
                if len(empty) < cap:
                    empty.append(i)
            hashes[i] = row_hash(turns)
            i += 1
    lengths_N = np.zeros(0, dtype=np.int64) if tokenized_ds is None else \
        np.asarray(tokenized_ds.data.column("length").to_numpy(), dtype=np.int64)
    wpos_N = np.zeros(0, dtype=np.int64) if tokenized_ds is None else _row_weight_counts(tokenized_ds)
    weighted, total = int(wpos_N.sum()), int(lengths_N.sum())
    no_weight_N = np.flatnonzero(wpos_N == 0)
    overlong_N = np.flatnonzero(lengths_N > cfg.max_tokens)
    if render_error:
        add(Problem("render", "error", f"examples failed to render; first: {render_error}"))
    if n_empty:
        add(Problem("empty", "error" if cfg.block_on_empty else "warning",
                    f"{n_empty} examples have no content: {_listed(empty, n_empty, cap)}"))
    share = weighted / total if total else 0.0
    if n and total and weighted == 0:
        add(Problem("loss_weights", "error", "no token has a positive loss weight: training would learn nothing "
                    "(check train_on_what / the assistant mask / pad == eos)"))
    elif len(no_weight_N):
        add(Problem("loss_weights", "warning", f"{len(no_weight_N)} examples have no loss-weighted token: "
                    f"{_listed(no_weight_N[:cap].tolist(), len(no_weight_N), cap)}"))
    if len(overlong_N):
        frac = len(overlong_N) / n
        add(Problem("overlong", "error" if frac > cfg.max_overlong_fraction else "warning",
                    f"{len(overlong_N)} examples ({frac:.1%}) exceed max_tokens={cfg.max_tokens}: "
                    f"{_listed(overlong_N[:cap].tolist(), len(overlong_N), cap)}"))
    # duplicates: groups in order of their first row, as the list-based report lists them
    n_dup = int(n - len(np.unique(hashes)))
    if n_dup:
        groups = first_duplicate_groups(hashes, 3)
        frac = n_dup / n
        add(Problem("duplicates", "error" if frac > cfg.max_duplicate_fraction else "warning",
                    f"{n_dup} duplicate examples ({frac:.1%}); groups e.g. {groups}"))
    contamination: dict[str, Any] = {}
    hits_all = contamination_stats(rows_ds, eval_sets or {}, cfg.ngram, max_examples=cap)
    for name, texts in (eval_sets or {}).items():
        h = hits_all[name]
        frac = h["contaminated"] / len(texts) if texts else 0.0
        contamination[name] = {"n_eval": len(texts), "contaminated": h["contaminated"], "fraction": frac,
                               "examples": [{**x, "eval_text": texts[x["eval_index"]][:200]} for x in h["examples"]]}
        if h["contaminated"]:
            x = h["examples"][0]
            add(Problem("contamination", "error" if frac > cfg.max_contaminated_fraction else "warning",
                        f"eval set {name!r}: {h['contaminated']}/{len(texts)} items share a {cfg.ngram}-gram (or "
                        f"their whole text) with training examples, e.g. eval {x['eval_index']} ~ train "
                        f"{x['train_index']}"))
    ex_i = min(cfg.example_index, max(n - 1, 0))
    rendered: list[tuple[str, float]] = []
    if tokenized_ds is not None and len(tokenized_ds):
        row = tokenized_ds.select_columns(["input_ids", "weights"])[ex_i]
        rendered = [(tokenizer.decode([t]), float(w)) for t, w in zip(row["input_ids"], row["weights"], strict=True)]
    report.stats = {
        "tokens_total": total, "tokens_weighted": weighted, "weighted_token_share": share,
        "length_min": int(lengths_N.min()) if len(lengths_N) else 0,
        "length_max": int(lengths_N.max()) if len(lengths_N) else 0,
        "length_mean": float(lengths_N.mean()) if len(lengths_N) else 0.0,
        "n_empty": n_empty, "n_render_failed": 0 if not render_error else 1, "n_no_weight": len(no_weight_N),
        "n_overlong": len(overlong_N), "n_duplicates": n_dup, "contamination": contamination,
        "rendered_example_index": ex_i, "rendered_example": [[t, w] for t, w in rendered],
    }
    _histogram(lengths_N if len(lengths_N) else [0], cfg.max_tokens, out / "token_lengths.png")
    (out / "data_quality.json").write_text(json.dumps(report.to_dict(), indent=2))
    (out / "data_quality.html").write_text(_render_html(report, rendered))
    if report.blocking and raise_on_blocking:
        lines = "\n".join(f"  - [{p.check}] {p.message}" for p in report.blocking)
        raise DataQualityError(f"training data has {len(report.blocking)} blocking problem(s):\n{lines}\n"
                               f"report: {out / 'data_quality.html'}")
    return report
