"""`tuneloop data stats FILE [--eval-file E] [--json OUT] [-c cfg.yaml] [overrides]`: streaming statistics.

FILE is any format `tasks.data_io` loads (JSONL, JSON, Parquet, CSV, an Arrow dir, a dataset dir,
org/name[:split], s3://), with `data.columns.messages=COL` for other schemas; the config's model (tokenizer),
renderer, train_on_what and max_length apply. The rows are validated and tokenized into the Arrow cache
of `tasks.data_cache` under `<run_root>/../cache` (a second call on the same file is a hit), then summarised
by `tasks.data_stats` (length histogram, truncation share, weighted-token share, duplicates, contamination:
an eval item's last user turn sharing an n-gram, or all of it if shorter, with a training turn), all
streamed, so it works at millions of rows. Bad input exits 2 like `validate`.

Wiring (tuneloop_cli/main.py, next to `_register(dsub, "flows.cli", "add_push_command", ["push"])`):
    _register(dsub, "tuneloop_cli.data_cli", "add_data_stats_command", ["stats"])
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXIT_OK = 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from flows.preflight import load_tokenizer
    from flows.sft_config import PipelineConfig
    from infra.config import load_config
    from tasks.data_cache import tokenize_cached
    from tasks.data_io import load_rows
    from tasks.data_stats import dataset_stats

    cfg = load_config(PipelineConfig, args.config, list(args.overrides))
    d = cfg.data
    cache = Path(cfg.run_root).parent / "cache"
    tok = load_tokenizer(cfg.model.base_model)
    # max_length 0: nothing refused here; the report counts what the run would refuse
    ts = tokenize_cached(args.file, tok, d.renderer, d.train_on_what, 0, cache, columns=d.columns,
                         num_proc=d.num_proc)
    rows = load_rows(args.file, d.columns, cache_dir=cache / "hf")
    evals: dict[str, list[str]] = {}
    if args.eval_file:
        from tasks.data_io import chat_validator

        ev = load_rows(args.eval_file, d.columns, chat_validator(), cache_dir=cache / "hf")
        evals["eval"] = [_question(m) for m in ev["messages"]]
    stats = dataset_stats(rows, ts.dataset, d.max_length, evals, args.ngram)
    stats["file"], stats["cache_entry"], stats["cache_hit"] = args.file, ts.dir, ts.cached
    print(format_stats(stats))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2) + "\n")
        print(f"written {args.json}")
    return EXIT_OK


def _question(turns: Any) -> str:
    """An eval item's question: its last user turn (n-grams never span turns, as in training text)."""
    from tasks.data_io import normalize_turns

    users = [m["content"] for m in normalize_turns(turns)[:-1] if m.get("role") == "user"]
    return users[-1] if users else ""


def format_stats(s: dict[str, Any]) -> str:
    hit = "hit" if s["cache_hit"] else "miss"
    lines = [f"{s['file']}: {s['n_rows']} rows, {s['tokens_total']} tokens (cache {hit})",
             f"  length p50 {s['length_p50']:.0f}  p90 {s['length_p90']:.0f}  p99 {s['length_p99']:.0f}  "
             f"max {s['length_max']}",
             f"  over data.max_length={s['max_length']}: {s['n_over_max_length']} ({s['truncation_share']:.2%}; "
             f"a run refuses them)",
             f"  loss-weighted tokens: {s['weighted_token_share']:.1%}",
             f"  duplicates: {s['n_duplicates']} ({s['duplicate_share']:.2%})"
             + (f", e.g. rows {s['duplicate_groups'][0]}" if s["duplicate_groups"] else "")]
    edges, counts = s["length_hist"]["edges"], s["length_hist"]["counts"]
    top = max(counts) or 1
    for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
        lines.append(f"  [{lo:>6}, {hi:>6}) {c:>9} {'#' * round(30 * c / top)}")
    for name, c in s["contamination"].items():
        lines.append(f"  contamination vs {name}: {c['contaminated']}/{c['of']} eval items share an n-gram with "
                     f"training" + (f" (e.g. eval {c['examples'][0]['eval_index']} ~ train row "
                                    f"{c['examples'][0]['train_index']})" if c["examples"] else ""))
    return "\n".join(lines)


def add_data_stats_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `stats` on the `tuneloop data` subparsers."""
    p = subparsers.add_parser("stats", help="streaming dataset statistics: lengths, duplicates, contamination "
                              "(any format; the run's tokenizer and renderer)")
    p.add_argument("file", help="JSONL, JSON, Parquet, CSV, Arrow dir, dataset dir, org/name[:split] or s3://")
    p.add_argument("--eval-file", help="eval set to check contamination against (any format)")
    p.add_argument("--json", help="also write the statistics as JSON here")
    p.add_argument("--ngram", type=int, default=13, help="contamination n-gram length (default %(default)s)")
    p.add_argument("--config", "-c", help="YAML config file (defaults are embedded)")
    p.add_argument("overrides", nargs="*", help="overrides like data.columns.messages=conversation")
    p.set_defaults(func=cmd_data_stats)
    return p
