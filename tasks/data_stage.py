"""Stage 1 (chat data): prepare (validate, mix replay, cache) and the data-quality gate, as Prefect tasks."""

from __future__ import annotations

import json
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

    from evals.data_quality import DataQualityConfig, check_training_data
    from recipes.common import read_rows
    from training_core.model_loading import resolve
    from training_core.renderers import TrainOnWhat, get_renderer

    c = from_dict(PipelineConfig, cfg)
    tok = AutoTokenizer.from_pretrained(resolve(c.model.base_model))
    renderer = get_renderer(c.data.renderer, tok)
    rows = read_rows(ds.train_path)
    evals = {"target": [json.dumps(r["messages"][:-1]) for r in read_rows(ds.eval_path)]}
    rep = check_training_data([r["messages"] for r in rows], tok,
                              lambda m: renderer.build_supervised_example(m, TrainOnWhat(c.data.train_on_what)),
                              out_dir, eval_sets=evals, config=DataQualityConfig(max_tokens=c.data.max_length))
    summary = {"problems": [p.message for p in rep.problems], "stats": rep.stats}
    run_logger().info("data quality: %d problem(s); report in %s", len(rep.problems), out_dir)
    return summary
