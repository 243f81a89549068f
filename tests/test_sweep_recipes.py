"""`tuneloop sweep rl` and `tuneloop sweep dpo`: real 2-trial sweeps (tiny preset, a few iterations / steps,
tiny eval sets) through the sweep flow: the confirmation split is disjoint from the selection split, every
trial was evaluated on exactly the selection examples (the stored eval records), and the winner was
re-scored on exactly the confirmation examples at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prefect.testing.utilities import prefect_test_harness

from evals.store import ResultStore, list_result_metas, read_records_file

COMMON = {"registry_model": "", "model": {"base_model": "tiny"}}
RL = {**COMMON, "env": {"n_train": 64, "n_eval": 12},
      "warmup": {"steps": 2, "batch_size": 8},
      "rl": {"iterations": 2, "group_size": 2, "groups_per_batch": 2, "kl_metric": False, "save_every": 1},
      "eval": {"n_examples": 12, "guards": [], "bootstrap_resamples": 100}}
DPO = {**COMMON, "data": {"n_train": 24, "n_eval": 12},
       "warmup": {"steps": 2, "batch_size": 4},
       "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "save_every": 2},
       "eval": {"guards": [], "bootstrap_resamples": 100}}


def _space(param: str, values: list[float]) -> dict[str, Any]:
    return {"sampler": "grid", "trials": 2, "parallel": 1, "pruner": "none", "seed": 0,
            "params": {param: {"values": values}}}


def _target_ids(run_eval: Path, who: str, bench: str) -> set[str]:
    metas = [(m, p) for m, p in list_result_metas(ResultStore(run_eval).checkpoint_dir(who)) if m.benchmark == bench]
    assert len(metas) == 1, (who, bench, metas)
    return set(read_records_file(metas[0][1]))


def _run(recipe: str, base: dict[str, Any], space: dict[str, Any], tmp: Path) -> Any:
    from flows.sweep import run_sweep

    cfg = {**base, "run_root": f"{tmp}/runs", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"}
    if recipe == "dpo":
        cfg["cache_root"] = f"{tmp}/cache"
    with prefect_test_harness(server_startup_timeout=180):
        return run_sweep(recipe, cfg, space)


def _check(res: Any, bench: str, sel_ids: set[str], conf_ids: set[str]) -> None:
    assert sel_ids and conf_ids and not sel_ids & conf_ids
    assert sorted(t.state for t in res.trials) == ["COMPLETE", "COMPLETE"]
    for t in res.trials:  # every trial ranked on all of, and only, the selection examples
        assert _target_ids(Path(t.run_dir) / "eval", "trained", bench) == sel_ids, t.name
    conf = Path(res.sweep_dir) / "confirmation"
    assert _target_ids(conf, res.winner, bench) == conf_ids  # the winner re-scored on the confirmation split
    assert _target_ids(conf, res.runner_up, bench) == conf_ids
    assert res.compared_against == "start" and _target_ids(conf, "start", bench) == conf_ids
    lb = {r["name"]: r for r in res.leaderboard["rows"]}
    assert res.winner_selection_score == lb[res.winner]["score"] == max(r["score"] for r in lb.values())


def test_sweep_rl_selection_and_confirmation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.sweep_config import load_attr
    from infra.config import from_dict
    from recipes.rl_config import RLConfig
    from recipes.rl_eval import eval_benchmark

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    res = _run("rl", RL, _space("rl.learning_rate", [5e-5, 2e-4]), tmp_path)
    data = Path(res.sweep_dir) / "data"

    def ids(path: Path) -> set[str]:  # the target's example ids of a problem file, as the pipeline builds them
        cfg = from_dict(RLConfig, {**RL, "env": {**RL["env"], "eval_file": str(path)}})
        return {e.id for e in eval_benchmark(cfg, 100).examples}

    sel, conf = ids(data / "selection.jsonl"), ids(data / "confirmation.jsonl")
    assert len(sel) + len(conf) == 12  # the env's 12 held-out problems, split
    _check(res, "target", sel, conf)
    # the split is the generated held-out problems themselves (same ids as the env generates)
    splits = load_attr("flows.sweep_config:split_rl")(from_dict(RLConfig, RL), tmp_path / "again", 0.5, 0)
    assert Path(splits.selection).read_text() == (data / "selection.jsonl").read_text()


def test_sweep_dpo_selection_and_confirmation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.config import from_dict
    from recipes.dpo import prepare, tokenizer_for
    from recipes.dpo_config import DPOConfig

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    res = _run("dpo", DPO, _space("train.learning_rate", [1e-3, 3e-3]), tmp_path)
    data = Path(res.sweep_dir) / "data"

    def ids(path: Path) -> set[str]:  # the pair ids of a preference file, as the DPO pipeline reads them
        cfg = from_dict(DPOConfig, {**DPO, "cache_root": f"{tmp_path}/cache", "data": {
            "train_file": str(data / "train.jsonl"), "eval_file": str(path)}})
        return {p.id for p in prepare(cfg, tokenizer_for(cfg)).eval}

    sel, conf = ids(data / "selection.jsonl"), ids(data / "confirmation.jsonl")
    assert len(sel) + len(conf) == 12
    _check(res, "heldout_pref", sel, conf)


def test_sweep_dpo_split_reads_any_format_with_column_mapping(tmp_path: Path) -> None:
    """User preference files in Parquet under other column names: the sweep's copies hold exactly the reader's
    rows (our field names, so trials run without the mapping), and the held-out pairs split disjointly."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.preferences import preference_rows
    from flows.sweep_config import recipe_config, split_dpo
    from infra.config import from_dict
    from recipes.preference_data import read_preferences

    rename = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    files = {}
    for split, n in (("train", 8), ("eval", 10)):
        rows = [{rename.get(k, k): json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                for r in preference_rows(n, 0, split)]
        files[split] = tmp_path / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), files[split])
    columns = {k: v for k, v in rename.items()}
    cfg = from_dict(recipe_config("dpo"), {"data": {"train_file": str(files["train"]),
                                                    "eval_file": str(files["eval"]), "columns": columns}})
    splits = split_dpo(cfg, tmp_path / "sweep", 0.5, 0)
    assert splits.overrides["data.columns"] == {}
    copied = {name: [row for _, row in read_preferences(path)] for name, path in
              (("train", splits.train), ("sel", splits.selection), ("conf", splits.confirmation))}
    assert copied["train"] == [row for _, row in read_preferences(str(files["train"]), columns)]
    expected_eval = [row for _, row in read_preferences(str(files["eval"]), columns)]
    assert len(copied["sel"]) + len(copied["conf"]) == len(expected_eval) == 10
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, copied["sel"] + copied["conf"])) == sorted(map(key, expected_eval))
    assert not {key(r) for r in copied["sel"]} & {key(r) for r in copied["conf"]}
