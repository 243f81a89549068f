"""A sweep's search space and settings (space.yaml), the recipe lookup, and the selection/confirmation split.

space.yaml:
    sampler: grid            # grid | random | tpe (Optuna's GridSampler, RandomSampler, TPESampler)
    trials: 6                # total trials of the sweep (a rerun continues up to this many)
    parallel: 1              # trials running at once
    params:                  # dotted config keys, as in `a.b=value` overrides
      train.learning_rate: {values: [1e-3, 3e-3, 1e-2]}          # categorical; the grid of a grid sweep
      model.rank: {values: [4, 16]}
      train.warmup_steps: {low: 0, high: 20, type: int}          # ranges need `grid:` for a grid sweep
      train.weight_decay: {low: 1e-5, high: 1e-1, log: true}
    pruner: median           # none | median (Optuna MedianPruner on the periodic eval, train.eval_every)
    confirmation_fraction: 0.5   # share of the eval rows held back for the confirmation split

Trade-offs: `data.*` keys cannot be swept: the data is materialised once so that every trial is evaluated on
the same selection examples (the paired leaderboard needs that). The split is per recipe (SweepRecipe.split):
SFT prepares its dataset and splits the eval rows; RL writes the env's held-out problems as problem files
(env.eval_file); DPO writes the generated (or given) pairs as preference JSONL (data.train_file/eval_file). The Optuna study lives in its own SQLite
file next to the MLflow one by default: Optuna and MLflow both keep an `alembic_version` table, so they cannot
share one database file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infra.config import BadInputError


@dataclass(frozen=True)
class SweepRecipe:
    """What a sweep needs of a recipe, as lazy "module:attr" strings (nothing heavy imported to build the CLI):
    config class; pipeline flow `(config dict, run_name, checked) -> PipelineResult`; pre-flight check
    `(config, run_name)` run once on the shared inputs; `split(cfg, data_dir, fraction, seed) -> Splits`
    (materialise the eval data once, selection / confirmation files, the trials' overrides);
    `rescore(cfg, splits, metric, run_dir, models, out_dir) -> (baseline name, {name: EvalResult})` on the
    confirmation split (flows/sweep_report.py); `metric`: the benchmark trials are ranked on by default."""

    config: str
    flow: str
    preflight: str
    split: str
    rescore: str
    metric: str = "target"


# adding a recipe to `tuneloop sweep` is one line here
RECIPES: dict[str, SweepRecipe] = {
    "sft": SweepRecipe("flows.sft_config:PipelineConfig", "flows.sft_pipeline:sft_pipeline",
                       "flows.preflight:check_sft_run", "flows.sweep_config:split_sft",
                       "flows.sweep_report:rescore_sft"),
    "rl": SweepRecipe("recipes.rl_config:RLConfig", "flows.rl_pipeline:rl_pipeline", "flows.rl_pipeline:check_rl_run",
                      "flows.sweep_config:split_rl", "flows.sweep_report:rescore_rl"),
    "dpo": SweepRecipe("recipes.dpo_config:DPOConfig", "flows.dpo_pipeline:dpo_pipeline",
                       "flows.dpo_pipeline:check_dpo_run", "flows.sweep_config:split_dpo",
                       "flows.sweep_report:rescore_dpo", metric="heldout_pref"),
}
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median")


def load_attr(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def sweep_recipe(name: str) -> SweepRecipe:
    if name not in RECIPES:
        raise BadInputError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]


def recipe_config(name: str) -> Any:
    """The config class of a recipe (without importing its flow: no Prefect yet)."""
    return load_attr(sweep_recipe(name).config)


def recipe(name: str) -> tuple[Any, Any]:
    """(config class, pipeline flow) of a recipe."""
    return recipe_config(name), load_attr(sweep_recipe(name).flow)


@dataclass
class ParamSpec:
    name: str
    values: list[Any] | None = None  # categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    type: str = "float"  # float | int (ranges)
    grid: list[Any] | None = None  # a range's points in a grid sweep

    def grid_values(self) -> list[Any]:
        pts = self.values if self.values is not None else self.grid
        if not pts:
            raise BadInputError(f"space: {self.name}: a grid sweep needs `values:` or `grid:` for every param")
        return list(pts)


@dataclass
class SweepSpec:
    params: dict[str, ParamSpec]
    sampler: str = "tpe"
    trials: int = 6
    parallel: int = 1
    pruner: str = "median"
    pruner_startup_trials: int = 2  # trials that finish before any is pruned
    pruner_warmup_steps: int = 0  # no pruning at or before this training step
    metric: str = ""  # the benchmark trials are ranked on (maximized); '' = the recipe's (SweepRecipe.metric)
    confirmation_fraction: float = 0.5
    seed: int = 0  # sampler seed and split seed
    storage: str = ""  # Optuna RDB URL; '' = sqlite file `sweeps.db` next to the MLflow database
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise BadInputError(f"space: sampler {self.sampler!r}; use one of {list(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise BadInputError(f"space: pruner {self.pruner!r}; use one of {list(PRUNERS)}")
        if self.trials < 1 or self.parallel < 1:
            raise BadInputError("space: trials and parallel must be >= 1")
        if not 0.0 < self.confirmation_fraction < 1.0:
            raise BadInputError("space: confirmation_fraction must be in (0, 1)")
        if not self.params:
            raise BadInputError("space: `params` names no hyperparameter to sweep")
        for p in self.params.values():
            if p.name.startswith("data."):
                raise BadInputError(f"space: {p.name}: data settings cannot be swept (every trial must be "
                                    "evaluated on the same examples)")
            if p.values is None and (p.low is None or p.high is None):
                raise BadInputError(f"space: {p.name}: give `values: [...]` or `low:` and `high:`")
            if p.type not in ("float", "int"):
                raise BadInputError(f"space: {p.name}: type {p.type!r}; use float or int")
        if self.sampler == "grid":
            for p in self.params.values():
                p.grid_values()

    def grid_size(self) -> int:
        n = 1
        for p in self.params.values():
            n *= len(p.grid_values())
        return n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = {k: {f: v for f, v in asdict(p).items() if v is not None and f != "name"}
                       for k, p in self.params.items()}
        return d


def load_space(path: str | Path | None, **override: Any) -> SweepSpec:
    """space.yaml (or {} when None) with CLI overrides (None values ignored)."""
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise BadInputError(f"space {path}: {e}") from e
    raw.update({k: v for k, v in override.items() if v is not None})
    params_raw = raw.pop("params", {}) or {}
    known = set(SweepSpec.__dataclass_fields__) - {"params"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BadInputError(f"space {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    params = {}
    for name, p in params_raw.items():
        if isinstance(p, list):
            p = {"values": p}
        bad = sorted(set(p) - set(ParamSpec.__dataclass_fields__))
        if bad:
            raise BadInputError(f"space {path}: {name}: unknown key(s) {bad}")
        params[name] = ParamSpec(name=name, **p)
    return SweepSpec(params=params, **raw)


def sweep_id_for(recipe_name: str, config: dict[str, Any], spec: SweepSpec) -> str:
    """Same recipe, base config and space -> same sweep id: rerunning the command continues the sweep. The
    trial budget and concurrency are left out (raising --trials continues the same sweep)."""
    d = spec.to_dict()
    for k in ("trials", "parallel"):
        d.pop(k)
    blob = json.dumps({"recipe": recipe_name, "config": config, "space": d}, sort_keys=True, default=str)
    return f"{config.get('name', recipe_name)}-sweep-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def default_storage(tracking_uri: str) -> str:
    """Optuna's RDB storage on the project's database. A server database (PostgreSQL, the one MLflow and the
    service use in production): the same database, in its own schema `optuna`. SQLite: a `sweeps.db` file beside
    `mlflow.db`, since both Optuna and MLflow keep an `alembic_version` table and one SQLite file has one
    namespace. `storage:` in space.yaml overrides either."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'sweeps.db'}"
    if tracking_uri.startswith(("postgresql", "postgres:")):
        return schema_url(tracking_uri, "optuna")
    return f"sqlite:///{Path('.tuneloop/sweeps.db').resolve()}"


def schema_url(db_url: str, schema: str) -> str:
    """`db_url` with every connection's search_path set to `schema` (created if absent)."""
    import sqlalchemy as sa

    url = sa.engine.make_url(db_url.replace("postgres://", "postgresql://", 1))
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    finally:
        engine.dispose()
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


@dataclass
class Splits:
    train: str
    selection: str
    confirmation: str
    selection_ids: list[str] = field(default_factory=list)
    confirmation_ids: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # what every trial's config gets besides its params


def _write_if_changed(path: Path, text: str) -> None:
    # unchanged bytes keep the dataset hash and the trials' cache entries valid on a resumed sweep
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _split_order(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(selection, confirmation) row indices: a seeded shuffle, each side >= 2 rows, in file order."""
    if n < 4:
        raise BadInputError(f"{n} eval rows: too few to split into selection and confirmation")
    order = list(range(n))
    random.Random(f"sweep-split/{seed}").shuffle(order)
    n_conf = min(n - 2, max(2, round(n * fraction)))
    return sorted(order[n_conf:]), sorted(order[:n_conf])


def split_sft(cfg: Any, data_dir: Path, fraction: float, seed: int) -> Splits:
    """Prepare the base config's dataset once (tasks.prepare_data, replay mixed in) and split its eval rows
    (seeded shuffle) into a selection split and a disjoint confirmation split."""
    from tasks.prepare_data import prepare_dataset, resolve_replay

    info = prepare_dataset(resolve_replay(cfg.data, cfg.model.base_model), Path(cfg.run_root).parent / "cache")
    rows = [x for x in Path(info.eval_path).read_text().splitlines() if x.strip()]
    sel, conf = _split_order(len(rows), fraction, seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    train = data_dir / "train.jsonl"
    if not train.exists() or train.read_bytes() != Path(info.train_path).read_bytes():
        shutil.copyfile(info.train_path, train)
    paths = data_dir / "selection.jsonl", data_dir / "confirmation.jsonl"
    for path, idx in zip(paths, (sel, conf), strict=True):
        _write_if_changed(path, "".join(rows[i] + "\n" for i in idx))
    ids = [[json.loads(rows[i])["id"] for i in idx] for idx in (sel, conf)]
    splits = Splits(str(train.resolve()), str(paths[0].resolve()), str(paths[1].resolve()), ids[0], ids[1])
    # the materialised data (replay is already in it), the whole selection split as the eval set, no registry
    # (only the confirmed winner is registered)
    splits.overrides = {"data.train_file": splits.train, "data.eval_file": splits.selection, "data.replay": "",
                        "eval.n_examples": len(ids[0]), "registry_model": ""}
    return splits


materialise_splits = split_sft  # the name bench/bench_sweep.py used


def split_rl(cfg: Any, data_dir: Path, fraction: float, seed: int) -> Splits:
    """The env's held-out problems (generated, or env.eval_file: the `eval.n_examples` the pipeline would use)
    written once as problem files and split; trials read `env.eval_file=<selection>`. Training problems stay
    as configured (generated from (task, seed), or env.train_file): every trial trains on the same ones."""
    from envs.arithmetic import write_problems
    from envs.registry import build_dataset

    if cfg.env.name != "arithmetic":
        raise BadInputError(f"sweep rl: env.name={cfg.env.name}: the selection / confirmation split needs the "
                            f"arithmetic env's problem files (env.eval_file)")
    rows = build_dataset(cfg.env).eval_rows(cfg.eval.n_examples)
    sel, conf = _split_order(len(rows), fraction, seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = data_dir / "selection.jsonl", data_dir / "confirmation.jsonl"
    for path, idx in zip(paths, (sel, conf), strict=True):
        tmp = write_problems([rows[i] for i in idx], path.with_suffix(".new"))
        _write_if_changed(path, tmp.read_text())
        tmp.unlink()
    splits = Splits(cfg.env.train_file, str(paths[0].resolve()), str(paths[1].resolve()),
                    [rows[i]["id"] for i in sel], [rows[i]["id"] for i in conf])
    splits.overrides = {"env.eval_file": splits.selection, "eval.n_examples": len(sel), "registry_model": ""}
    return splits


def split_dpo(cfg: Any, data_dir: Path, fraction: float, seed: int) -> Splits:
    """The generated pairs (or data.train_file / data.eval_file) written once as preference JSONL, the held-out
    pairs split; trials read `data.train_file=<train>`, `data.eval_file=<selection>`. Ids are the lines' content
    hashes (the DPO reader keys pairs by content as well). With preference files the pipeline's target is the
    held-out preference accuracy (`heldout_pref`), the metric a DPO sweep ranks on."""
    d = cfg.data
    if d.train_file:
        from recipes.preference_data import read_preferences

        # any format the DPO reader takes, columns mapped and every row validated: the copies use our names
        train_lines, eval_lines = ([json.dumps(r, ensure_ascii=False) for _, r in read_preferences(f, d.columns)]
                                   for f in (d.train_file, d.eval_file))
    else:
        from data.preferences import preference_rows

        kw = dict(d.task_kwargs)
        train_lines = [json.dumps(r, ensure_ascii=False) for r in preference_rows(d.n_train, d.seed, "train", **kw)]
        eval_lines = [json.dumps(r, ensure_ascii=False) for r in preference_rows(d.n_eval, d.seed, "eval", **kw)]
    sel, conf = _split_order(len(eval_lines), fraction, seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    train = data_dir / "train.jsonl"
    _write_if_changed(train, "".join(x + "\n" for x in train_lines))
    paths = data_dir / "selection.jsonl", data_dir / "confirmation.jsonl"
    for path, idx in zip(paths, (sel, conf), strict=True):
        _write_if_changed(path, "".join(eval_lines[i] + "\n" for i in idx))
    ids = [[hashlib.sha256(eval_lines[i].encode()).hexdigest()[:16] for i in idx] for idx in (sel, conf)]
    splits = Splits(str(train.resolve()), str(paths[0].resolve()), str(paths[1].resolve()), ids[0], ids[1])
    splits.overrides = {"data.train_file": splits.train, "data.eval_file": splits.selection, "data.columns": {},
                        "registry_model": ""}
    return splits


def trial_overrides(splits: Splits, n_selection: int | None = None) -> dict[str, Any]:
    """What every trial's config gets besides its params (set by the recipe's split function)."""
    return dict(splits.overrides)


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    cur = d
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            raise BadInputError(f"config has no section {p!r} (in {key!r})")
        cur = cur[p]
    if parts[-1] not in cur:
        raise BadInputError(f"config has no key {key!r}")
    cur[parts[-1]] = value
