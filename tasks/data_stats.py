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

Trade-off: duplicate detection by 64-bit hash can merge two different rows with probability ~n^2/2^65
(1e-8 at 1M rows); groups report row indices, which the caller maps to file:line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
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


def duplicate_stats(rows_ds: Any, max_groups: int = 5) -> dict[str, Any]:
    import numpy as np

    hashes = np.empty(len(rows_ds), dtype=np.int64)
    i = 0
    for b in rows_ds.select_columns(["messages"]).iter(batch_size=_BATCH):
        for msgs in b["messages"]:
            hashes[i] = row_hash(_turns(msgs))
            i += 1
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
