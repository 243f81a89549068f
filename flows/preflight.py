"""Pre-flight checks of a run's inputs, before any run directory, MLflow run or cache entry exists.

`tuneloop run sft` calls `check_sft_run` before the Prefect flow starts, and `tuneloop data validate` calls
`check_data` with the same config: both refuse the same inputs, with the same messages. Every problem is a
`PreflightError` (bad input: exit 2) naming where to fix it: the file and line of a row, the config field.

The data checks are the ones the run itself applies later (row schema, `data.max_length` in `build_datums`,
the blocking checks of `evals.data_quality`, train/eval leaks), run here on the same rows in the same order,
so a dataset this accepts is never refused mid-run, and one the run would refuse is refused here. Every
format `tasks.data_io` loads is accepted (JSONL rows are named file:line, columnar ones "file row i"), with
`data.columns` mapping the user's column names.

A user training file (`data.train_file`) is checked streaming, so a million rows fit: it is rendered and
tokenized by the run's own `tasks.data_cache.tokenize_cached` into a temporary Arrow entry (deleted after the
check: nothing of the run is written), and over-long rows, train/eval leaks, and the data-quality report
(`tasks.data_stats.quality_report`, the data stage's) are computed over Arrow batches; only the eval set
(small) and replay rows are held as lists. Generated data (sized by `data.n_train`) keeps the list path.
Trade-off: rows the tokenizer refuses are reported one (the first) at a time, as the run would refuse them.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.sft_config import PipelineConfig
from infra.config import BadInputError

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LISTED = 5


class PreflightError(BadInputError):
    """A run input is unusable; the message says which and where."""


@dataclass
class DataCheck:
    n_train: int = 0
    n_eval: int = 0
    warnings: list[str] = field(default_factory=list)


def _src_key(source: str) -> tuple[str, int]:
    """Sort "file:12" after "file:9", and each file's rows in line order (the mixed set is shuffled)."""
    head, _, tail = source.rpartition(":") if ":" in source else (source, "", "")
    if tail.isdigit():
        return head, int(tail)
    head, _, num = source.rpartition(" ")
    return (head, int(num)) if num.isdigit() else (source, 0)


def _join(sources: list[str]) -> str:
    more = f" (+{len(sources) - _LISTED} more)" if len(sources) > _LISTED else ""
    return ", ".join(sources[:_LISTED]) + more


# ---------------------------------------------------------------------------------------------- model / paths

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model(name: str, what: str = "model.base_model") -> None:
    """A preset, a local Hugging Face model directory, or a hub id that can be reached (or is cached)."""
    from training_core.presets import PRESETS

    if name in PRESETS:
        return
    presets = ", ".join(sorted(PRESETS))
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise PreflightError(f"{what}={name}: is a file, not a model directory")
        if not (p / "config.json").is_file():
            hint = " (it is a training checkpoint: use init_from)" if (p / "trainer_state.json").is_file() else ""
            raise PreflightError(f"{what}={name}: not a Hugging Face model directory (no config.json){hint}")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise PreflightError(f"{what}={name}: no such directory")
    if "/" not in name:
        raise PreflightError(f"{what}={name}: unknown model: not a preset ({presets}) and not a local directory; "
                             f"a hub id looks like org/name")
    if _offline() and not _hub_cached(name):
        raise PreflightError(f"{what}={name}: not a preset ({presets}), not a local directory, and the hub id is "
                             f"not in the local Hugging Face cache; downloading it needs network: run with "
                             f"HF_HUB_OFFLINE=0 on a machine that can reach the hub")


def check_checkpoint(ref: str, what: str = "init_from") -> None:
    """A committed training_core checkpoint directory (s3:// is checked when it is downloaded)."""
    if ref.startswith("s3://"):
        return
    p = Path(ref.removeprefix("file://")).expanduser()
    if not p.exists():
        raise PreflightError(f"{what}={ref}: no such checkpoint directory")
    if not p.is_dir():
        raise PreflightError(f"{what}={ref}: is a file, not a checkpoint directory")
    if not (p / "trainer_state.json").is_file():
        hint = " (a base model: use model.base_model)" if (p / "config.json").is_file() else ""
        raise PreflightError(f"{what}={ref}: not a training checkpoint (no trainer_state.json){hint}")
    if not (p / "manifest.json").is_file():
        raise PreflightError(f"{what}={ref}: checkpoint was never committed (no manifest.json): an interrupted save")


def check_model_or_checkpoint(spec: str) -> None:
    """What `tuneloop eval` / `compare` accept as a model: a checkpoint dir, or a base model."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "trainer_state.json").is_file():
        return check_checkpoint(spec, "checkpoint")
    if p.is_dir() and not (p / "config.json").is_file():
        raise PreflightError(f"{spec}: neither a training checkpoint (no trainer_state.json) nor a Hugging Face "
                             f"model directory (no config.json)")
    check_model(spec, "model")


def run_dir_of(cfg: PipelineConfig, run_name: str) -> Path:
    return Path(cfg.run_root) / run_name


def check_run_name(cfg: PipelineConfig, run_name: str) -> bool:
    """True when `run_name` exists unfinished (the run resumes); refuses a finished run or an unsafe name."""
    if not _RUN_NAME.match(run_name):
        raise PreflightError(f"--run-name {run_name!r}: use letters, digits, '.', '_' and '-' (no '/')")
    d = run_dir_of(cfg, run_name)
    if (d / "summary.json").exists():
        raise PreflightError(f"run {run_name!r} already finished ({d / 'summary.json'}); pick another --run-name")
    if d.exists() and not d.is_dir():
        raise PreflightError(f"run dir {d}: exists and is not a directory")
    return d.is_dir()


# ----------------------------------------------------------------------------------------------------- data

def _rendered(rows: list[dict[str, Any]], sources: list[str], render: Any) -> list[tuple[list[int], list[float]]]:
    out = []
    for r, src in zip(rows, sources, strict=True):
        try:
            tokens, weights = render(r["messages"])
        except Exception as e:  # the renderer's own error, located
            raise PreflightError(f"{src}: field 'messages': cannot be rendered: {type(e).__name__}: {e}") from None
        out.append((list(tokens), list(weights)))
    return out


def _overlong(rendered: list[tuple[list[int], list[float]]], sources: list[str], max_length: int) -> list[str]:
    long = [(s, len(t)) for (t, _), s in zip(rendered, sources, strict=True) if len(t) > max_length]
    return [f"{s} ({n} tokens)" for s, n in sorted(long, key=lambda x: _src_key(x[0]))]


def _duplicate_groups(rows: list[dict[str, Any]], sources: list[str]) -> list[list[str]]:
    # the same normalisation as evals.data_quality's duplicate check (whitespace-collapsed role + content)
    groups: dict[str, list[str]] = defaultdict(list)
    for r, s in zip(rows, sources, strict=True):
        key = json.dumps([[str(m.get("role")), " ".join(str(m.get("content", "")).split())]
                          for m in r["messages"] if isinstance(m, Mapping)])
        groups[key].append(s)
    return sorted((sorted(g, key=_src_key) for g in groups.values() if len(g) > 1), key=lambda g: _src_key(g[0]))


def load_tokenizer(base_model: str) -> Any:
    from transformers import AutoTokenizer

    from training_core.model_loading import resolve

    return AutoTokenizer.from_pretrained(resolve(base_model))


def _build(cfg: PipelineConfig, require_eval: bool) -> tuple[tuple[list[Any], list[str]], tuple[list[Any], list[str]]]:
    from tasks.prepare_data import build_rows_with_sources, resolve_replay

    d = resolve_replay(cfg.data, cfg.model.base_model)
    if not d.train_file:
        from data.generators import TASKS

        if d.task not in TASKS:
            raise PreflightError(f"data.task={d.task}: unknown generator; known: {sorted(TASKS)}")
        try:
            return build_rows_with_sources(d)
        except TypeError as e:  # the generator's signature refused the kwargs
            raise PreflightError(f"data.task_kwargs={d.task_kwargs}: not accepted by task {d.task!r}: {e}") from None
    return build_rows_with_sources(d, require_eval=require_eval)


def _loadable(path: str) -> bool:
    """A file, a directory holding a dataset, or a remote id (checked when it is loaded)."""
    p = Path(path)
    if p.is_file() or path.startswith("s3://"):
        return True
    if p.is_dir():
        return any(f.suffix in (".jsonl", ".json", ".parquet", ".csv", ".arrow") for f in p.rglob("*"))
    from tasks.data_io import is_hub_id

    return is_hub_id(path)


def check_data(cfg: PipelineConfig, tokenizer: Any = None, require_eval: bool = True) -> DataCheck:
    """Everything the run checks on its data, reported at the user's file and line; raises PreflightError.

    `require_eval=False`: `tuneloop data validate` of a training file without its eval file.
    """
    from evals.data_quality import DataQualityConfig, check_training_data
    from tasks.prepare_data import leaked_rows
    from training_core.renderers import TrainOnWhat, get_renderer

    d = cfg.data
    for path, what in ((d.replay, "data.replay"),):
        if path and path != "auto" and not path.startswith("builtin:") and not _loadable(path):
            kind = "is a directory without a dataset" if Path(path).is_dir() else "file not found"
            raise PreflightError(f"{what}={path}: {kind} (give a chat dataset: JSONL, JSON, Parquet, CSV, an "
                                 f"Arrow dir, org/name or s3://; '' for none, or auto)")
    from tasks.prepare_data import resolve_replay

    if resolve_replay(d, cfg.model.base_model).train_file:
        tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.base_model)
        return _check_file_streamed(cfg, tok, require_eval)
    (train, t_src), (evl, e_src) = _build(cfg, require_eval)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.base_model)
    renderer = get_renderer(d.renderer, tok)

    def render(msgs: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
        return renderer.build_supervised_example(msgs, TrainOnWhat(d.train_on_what))

    t_r = _rendered(train, t_src, render)
    # the eval loss before/after training renders the first eval_loss_examples eval rows the same way
    n_el = min(len(evl), cfg.train.eval_loss_examples)
    e_r = _rendered(evl[:n_el], e_src[:n_el], render)
    long = _overlong(t_r, t_src, d.max_length) + _overlong(e_r, e_src[:n_el], d.max_length)
    if long:
        raise PreflightError(f"{len(long)} rows render to more than data.max_length={d.max_length} tokens: "
                             f"{_join(long)}; raise data.max_length or shorten them (truncating would drop the "
                             f"end-of-turn token)")
    leaks = leaked_rows(train, evl)
    if leaks:
        pairs = [f"{e_src[j]} = {t_src[i]}" for j, i in leaks]
        raise PreflightError(f"{len(leaks)} eval rows are also training rows: {_join(pairs)}")
    cached = {id(r["messages"]): tr for r, tr in zip(train, t_r, strict=True)}
    check = DataCheck(len(train), len(evl))
    dq_cfg = DataQualityConfig(max_tokens=d.max_length)
    with tempfile.TemporaryDirectory(prefix="tuneloop-preflight-") as tmp:  # the report is the run's to write
        rep = check_training_data([r["messages"] for r in train], tok, lambda m: cached[id(m)], tmp,
                                  eval_sets={"target": [json.dumps(r["messages"][:-1]) for r in evl]} if evl else None,
                                  config=dq_cfg, raise_on_blocking=False)
    problems = []
    for p in rep.problems:
        msg = p.message
        if p.check == "duplicates":
            groups = _duplicate_groups(train, t_src)
            msg = (f"{rep.stats['n_duplicates']} duplicate rows ({rep.stats['n_duplicates'] / max(len(train), 1):.1%}"
                   f", more than {dq_cfg.max_duplicate_fraction:.0%} is refused): "
                   + "; ".join(" = ".join(g[:3]) for g in groups[:_LISTED]))
        elif p.check == "contamination":
            hit = rep.stats["contamination"]["target"]
            ex = hit["examples"]
            msg = (f"{hit['contaminated']} eval rows share a {dq_cfg.ngram}-word sequence with training rows: "
                   + _join([f"{e_src[x['eval_index']]} ~ {t_src[x['train_index']]}" for x in ex]))
        (problems if p.severity == "error" else check.warnings).append(f"[{p.check}] {msg}")
    if problems:
        raise PreflightError("the data would be refused by the run's data-quality check:\n  " + "\n  ".join(problems))
    return check


class _Chain:
    """Several row datasets read as one (their `messages` features may differ, so no Arrow concatenation)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def select_columns(self, cols: list[str]) -> _Chain:
        return _Chain([p.select_columns(cols) for p in self.parts])

    def iter(self, batch_size: int) -> Any:
        for p in self.parts:
            yield from p.iter(batch_size=batch_size)


def _check_file_streamed(cfg: PipelineConfig, tok: Any, require_eval: bool) -> DataCheck:
    """`check_data` of a user training file (+ replay) over Arrow batches: the same checks, order and messages."""
    import datasets

    quiet = not datasets.are_progress_bars_disabled()
    if quiet:  # a refusal is one message on stderr, not progress bars of temporary work
        datasets.disable_progress_bars()
    try:
        return _check_streamed(cfg, tok, require_eval)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _check_streamed(cfg: PipelineConfig, tok: Any, require_eval: bool) -> DataCheck:
    import datasets
    import numpy as np

    from evals.data_quality import DataQualityConfig
    from tasks.data_cache import locate, tokenize_cached
    from tasks.data_io import chat_validator, iter_validated, load_rows, resolve_source
    from tasks.data_stats import first_duplicate_groups, quality_report
    from tasks.prepare_data import (
        DataValidationError,
        _replay_with_sources,
        _with_ids,
        is_jsonl,
        read_chat_rows_with_sources,
        resolve_replay,
        validate_chat_jsonl,
    )
    from training_core.renderers import TrainOnWhat, get_renderer

    d = resolve_replay(cfg.data, cfg.model.base_model)
    if not d.eval_file and require_eval:
        raise DataValidationError("data.train_file is set but data.eval_file is not: give a held-out eval set")
    el = read_chat_rows_with_sources(d.eval_file, need_answer=True, columns=d.columns) if d.eval_file else []
    evl, e_src = _with_ids([r for _, r in el]), [s for s, _ in el]
    if is_jsonl(d.train_file) and not d.columns:  # the exact line reader's checks and messages, streamed
        validate_chat_jsonl(d.train_file)
    with tempfile.TemporaryDirectory(prefix="tuneloop-preflight-") as tmp:  # nothing of the run is written
        hf = Path(tmp) / "hf"
        src = resolve_source(d.train_file, hf)
        rows_ds = load_rows(src, d.columns, cache_dir=hf)
        ts = tokenize_cached(d.train_file, tok, d.renderer, d.train_on_what, 0, tmp, columns=d.columns,
                             num_proc=d.num_proc)  # validates + renders every row (the run's own map)
        n_file = len(rows_ds)
        replay = _replay_with_sources(d, n_file)
        rows_parts, tok_parts = [rows_ds], [ts.dataset.select_columns(["input_ids", "weights", "length"])]
        if replay:
            rp = Path(tmp) / "replay.jsonl"
            rp.write_text("".join(json.dumps(r) + "\n" for r, _ in replay))
            rows_parts.append(load_rows(str(rp), cache_dir=hf))
            tok_parts.append(tokenize_cached(str(rp), tok, d.renderer, d.train_on_what, 0, tmp).dataset
                             .select_columns(["input_ids", "weights", "length"]))
        rows_all = _Chain(rows_parts)
        tok_all = tok_parts[0] if len(tok_parts) == 1 else datasets.concatenate_datasets(tok_parts)
        n = len(rows_all)

        def t_src(i: int) -> str:
            return locate(src, i) if i < n_file else replay[i - n_file][1]

        # over-long: the training rows from the Arrow lengths, the first eval_loss_examples eval rows rendered
        lengths_N = np.asarray(tok_all.data.column("length").to_numpy())
        over_N = np.flatnonzero(lengths_N > d.max_length)
        renderer = get_renderer(d.renderer, tok)
        n_el = min(len(evl), cfg.train.eval_loss_examples)
        e_r = _rendered(evl[:n_el], e_src[:n_el], lambda m: renderer.build_supervised_example(
            m, TrainOnWhat(d.train_on_what)))
        long = [f"{t_src(int(i))} ({int(lengths_N[i])} tokens)" for i in over_N[:_LISTED]] + \
            _overlong(e_r, e_src[:n_el], d.max_length)  # training rows first, as the list path lists them
        n_long = len(over_N) + sum(len(t) > d.max_length for t, _ in e_r)
        if n_long:
            more = f" (+{n_long - _LISTED} more)" if n_long > _LISTED else ""
            raise PreflightError(f"{n_long} rows render to more than data.max_length={d.max_length} tokens: "
                                 f"{', '.join(long[:_LISTED])}{more}; raise data.max_length or shorten them "
                                 f"(truncating would drop the end-of-turn token)")
        # train/eval leaks by row id, the training rows streamed (validated as the run reads them)
        eval_ids = {r["id"] for r in evl}
        first: dict[Any, int] = {}
        if eval_ids:
            rows_it = itertools.chain(iter_validated(rows_ds, src, chat_validator()), (r for r, _ in replay))
            for i, row in enumerate(rows_it):
                rid = _with_ids([row])[0]["id"]
                if rid in eval_ids:
                    first.setdefault(rid, i)
        leaks = [(j, first[r["id"]]) for j, r in enumerate(evl) if r["id"] in first]
        if leaks:
            pairs = [f"{e_src[j]} = {t_src(i)}" for j, i in leaks]
            raise PreflightError(f"{len(leaks)} eval rows are also training rows: {_join(pairs)}")
        dq_cfg = DataQualityConfig(max_tokens=d.max_length)
        hashes_N = np.empty(n, dtype=np.int64)
        rep = quality_report(rows_all, tok_all, tok, Path(tmp) / "report", hashes_N=hashes_N,
                             eval_sets={"target": [json.dumps(r["messages"][:-1]) for r in evl]} if evl else None,
                             config=dq_cfg, raise_on_blocking=False)
        check = DataCheck(n, len(evl))
        problems = []
        for p in rep.problems:  # located while the (downloaded) source is still here
            msg = p.message
            if p.check == "duplicates":
                groups = [[t_src(i) for i in g[:3]] for g in first_duplicate_groups(hashes_N, _LISTED)]
                msg = (f"{rep.stats['n_duplicates']} duplicate rows ({rep.stats['n_duplicates'] / max(n, 1):.1%}"
                       f", more than {dq_cfg.max_duplicate_fraction:.0%} is refused): "
                       + "; ".join(" = ".join(g) for g in groups))
            elif p.check == "contamination":
                hit = rep.stats["contamination"]["target"]
                msg = (f"{hit['contaminated']} eval rows share a {dq_cfg.ngram}-word sequence with training rows: "
                       + _join([f"{e_src[x['eval_index']]} ~ {t_src(x['train_index'])}" for x in hit["examples"]]))
            (problems if p.severity == "error" else check.warnings).append(f"[{p.check}] {msg}")
    if problems:
        raise PreflightError("the data would be refused by the run's data-quality check:\n  " + "\n  ".join(problems))
    return check


def check_eval_file(cfg: PipelineConfig, path: str, tokenizer: Any = None) -> DataCheck:
    """An eval file alone: rows with an 'answer', and the first eval_loss_examples within data.max_length."""
    from tasks.prepare_data import read_chat_rows_with_sources
    from training_core.renderers import TrainOnWhat, get_renderer

    lines = read_chat_rows_with_sources(path, need_answer=True, columns=cfg.data.columns)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.base_model)
    renderer = get_renderer(cfg.data.renderer, tok)
    head = lines[: cfg.train.eval_loss_examples]
    src = [s for s, _ in head]
    r = _rendered([row for _, row in head], src,
                  lambda m: renderer.build_supervised_example(m, TrainOnWhat(cfg.data.train_on_what)))
    long = _overlong(r, src, cfg.data.max_length)
    if long:
        raise PreflightError(f"{len(long)} rows render to more than data.max_length={cfg.data.max_length} "
                             f"tokens: {_join(long)}")
    return DataCheck(0, len(lines))


# ------------------------------------------------------------------------------------------------- the run

def check_sft_run(cfg: PipelineConfig, run_name: str) -> tuple[bool, DataCheck]:
    """All of a run's inputs, cheapest first; returns (resumes an unfinished run, data check)."""
    resumes = check_run_name(cfg, run_name)
    check_model(cfg.model.base_model)
    tokenizer = None
    if cfg.init_from:
        check_checkpoint(cfg.init_from)
        local = Path(cfg.init_from.removeprefix("file://")).expanduser()
        if local.is_dir():  # training from a checkpoint uses its base model's tokenizer (recipes.common.adopt_init_from)
            from recipes.common import checkpoint_model_values
            from training_core.checkpoint import CheckpointError

            try:
                ck = checkpoint_model_values(str(local))
            except CheckpointError as e:
                raise PreflightError(f"init_from={cfg.init_from}: corrupt checkpoint: {e}") from None
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise PreflightError(f"init_from={cfg.init_from}: unreadable trainer_state.json ({e!r})") from None
            base = ck.get("base_model_path") or ck.get("base_model")
            tokenizer = load_tokenizer(base if base and Path(base).is_dir() else ck["base_model"])
    from evals.builtin import BUILTIN
    from tasks.evaluate import unknown_guards

    if unknown := unknown_guards(list(cfg.eval.guards)):  # built-ins and real benchmarks (arc_easy, ...)
        raise PreflightError(f"eval.guards={list(cfg.eval.guards)}: unknown {unknown}; known: {sorted(BUILTIN)} "
                             f"and the real benchmarks (evals/BENCHMARKS.md)")
    return resumes, check_data(cfg, tokenizer)
