"""Stage 1 (chat data): prepare (validate, mix replay, cache) and the data-quality gate, as Prefect tasks.

The data-quality gate streams: the prepared training rows are read as a memory-mapped Arrow dataset and
tokenized once into the shared tokenized Arrow cache (`<cache root>/tokenized/<key>`, `tasks.data_cache`),
and the report (`tasks.data_stats.quality_report`: the same stats, problems and files as
`evals.data_quality.check_training_data`) is computed over them in batches: no list of rows in memory, so it
runs at 1M rows. Trade-off: rows the tokenizer cache refuses (cannot be rendered, no trained EOS) are one
located blocking `render` problem (the first such row), not a list of every failing row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from flows.sft_config import PipelineConfig
from infra.config import from_dict
from tasks.base import retry_unless_bad_input, run_logger
from tasks.prepare_data import DatasetInfo, prepare_dataset, resolve_replay


@task(name="prepare-data", retries=1, retry_delay_seconds=0, retry_condition_fn=retry_unless_bad_input)
def prepare_data_task(cfg: dict[str, Any], cache_root: str) -> DatasetInfo:
    c = from_dict(PipelineConfig, cfg)
    info = prepare_dataset(resolve_replay(c.data, c.model.base_model), cache_root)
    run_logger().info("data: %d train / %d eval rows (%s, cache %s)", info.n_train, info.n_eval, info.dir,
                      "hit" if info.cached else "miss")
    return info


@task(name="data-quality", retries=0)
def data_quality_task(cfg: dict[str, Any], ds: DatasetInfo, out_dir: str) -> dict[str, Any]:
    """Blocking problems (empty / unweighted examples, eval contamination, ...) stop the pipeline here."""
    from transformers import AutoTokenizer

    from evals.data_quality import DataQualityConfig
    from recipes.common import read_rows
    from tasks.data_cache import tokenize_cached
    from tasks.data_io import load_rows
    from tasks.data_stats import quality_report
    from tasks.prepare_data import DataValidationError
    from training_core.model_loading import resolve

    c = from_dict(PipelineConfig, cfg)
    tok = AutoTokenizer.from_pretrained(resolve(c.model.base_model))
    cache_root = Path(ds.dir).parent.parent  # the prepare stage's cache root (<root>/datasets/<hash>)
    rows_ds = load_rows(ds.train_path, cache_dir=cache_root / "hf")
    tokenized, render_error = None, ""
    try:  # max_length 0: over-long rows are counted by the report, not refused here
        tokenized = tokenize_cached(ds.train_path, tok, c.data.renderer, c.data.train_on_what, 0, cache_root,
                                    num_proc=c.data.num_proc).dataset
    except DataValidationError as e:
        render_error = str(e)
    evals = {"target": [json.dumps(r["messages"][:-1]) for r in read_rows(ds.eval_path)]}  # the small eval set
    rep = quality_report(rows_ds, tokenized, tok, out_dir, eval_sets=evals, render_error=render_error,
                         config=DataQualityConfig(max_tokens=c.data.max_length))
    summary = {"problems": [p.message for p in rep.problems], "stats": rep.stats}
    run_logger().info("data quality: %d problem(s); report in %s", len(rep.problems), out_dir)
    return summary
