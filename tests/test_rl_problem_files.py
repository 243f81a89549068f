"""RL problem files (env.train_file / env.eval_file, read through tasks.data_io.load_rows): a JSONL and a
Parquet file give the same problems (the ids of the generated problems they were written from); a bad row is
refused by the pre-flight check naming file, line / row and field, with nothing written; a real RL pipeline
run on a problem file is evaluated on exactly those problems (the stored eval example ids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from envs.arithmetic import load_problems, write_problems
from infra.config import BadInputError, load_config


def _generated(n: int) -> list[dict[str, Any]]:
    from data.generators import generate

    return generate("reverse", n, 0, "eval", length=4)


def _parquet(rows: list[dict[str, Any]], path: Path, rename: dict[str, str] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[Any]] = {}
    for r in rows:
        for k, v in r.items():
            cols.setdefault((rename or {}).get(k, k), []).append(v)
    pq.write_table(pa.table(cols), path)
    return path


def test_jsonl_and_parquet_problem_files_give_the_same_problems(tmp_path: Path) -> None:
    gen = _generated(12)
    jl = write_problems(gen, tmp_path / "p.jsonl")
    flat = [{"question": r["messages"][0]["content"], "answer": r["answer"]} for r in gen]  # no id column
    pq_path = _parquet(flat, tmp_path / "p.parquet", rename={"question": "problem"})
    a = load_problems(str(jl))
    b = load_problems(str(pq_path), {"question": "problem"})
    assert a == b
    # a problem from a file is the generated problem itself (same id, prompt, answer and demonstration)
    assert [(r["id"], r["messages"], r["answer"]) for r in a] == [(r["id"], r["messages"], r["answer"]) for r in gen]


def _check(tmp_path: Path, overrides: list[str]) -> None:
    from flows.rl_pipeline import check_rl_run
    from recipes.rl_config import RLConfig

    cfg = load_config(RLConfig, None, [f"run_root={tmp_path}/runs", "model.base_model=tiny", *overrides])
    check_rl_run(cfg, "r")


def test_bad_problem_rows_are_refused_naming_file_row_and_field(tmp_path: Path) -> None:
    rows = [{"question": r["messages"][0]["content"], "answer": r["answer"]} for r in _generated(6)]
    bad_jl = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[2] = json.dumps({"question": rows[2]["question"]})  # line 3: no answer
    bad_jl.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInputError) as e:
        _check(tmp_path, [f"env.eval_file={bad_jl}"])
    assert f"{bad_jl}:3: field 'answer': missing" in str(e.value)
    bad_pq = _parquet([*rows[:4], {"question": "Reverse 12.", "answer": "21."}], tmp_path / "bad.parquet")
    with pytest.raises(BadInputError) as e:  # row 4 (0-based): an answer the env's grader can never match
        _check(tmp_path, [f"env.train_file={bad_pq}"])
    assert f"{bad_pq} row 4: field 'answer'" in str(e.value) and "can never be graded" in str(e.value)
    dup = _parquet([*rows[:3], rows[1]], tmp_path / "dup.parquet")
    with pytest.raises(BadInputError) as e:
        _check(tmp_path, [f"env.eval_file={dup}"])
    assert f"{dup} row 3: field 'question': duplicate of {dup} row 1" in str(e.value)
    # a held-out problem that is also a training one is refused
    both = write_problems(_generated(5), tmp_path / "both.jsonl")
    with pytest.raises(BadInputError, match="also training problems"):
        _check(tmp_path, [f"env.train_file={both}", f"env.eval_file={both}"])
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_rl_run_on_a_problem_file_evaluates_exactly_those_problems(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from evals.store import ResultStore, list_result_metas, read_records_file
    from flows.rl_pipeline import rl_pipeline
    from infra.config import to_dict
    from recipes.rl_config import RLConfig
    from recipes.rl_eval import eval_benchmark

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    held = _generated(40)[30:]  # 10 held-out problems, not the first ones the generator would give
    ev = _parquet([{"id": f"p{i}", "question": r["messages"][0]["content"], "answer": r["answer"]}
                   for i, r in enumerate(held)], tmp_path / "held.parquet", rename={"question": "q"})
    cfg = load_config(RLConfig, None, [
        f"run_root={tmp_path}/runs", f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", "registry_model=",
        "model.base_model=tiny", f"env.eval_file={ev}", "env.columns.question=q", "env.n_train=64",
        "warmup.steps=2", "warmup.batch_size=8", "rl.iterations=1", "rl.group_size=2", "rl.groups_per_batch=2",
        "rl.kl_metric=false", "eval.n_examples=100", "eval.guards=[]", "eval.bootstrap_resamples=100"])
    with prefect_test_harness(server_startup_timeout=180):
        res = rl_pipeline(to_dict(cfg), run_name="files")
    store = ResultStore(Path(res.run_dir) / "eval")
    want = {f"p{i}" for i in range(10)}
    bench = eval_benchmark(cfg, cfg.eval.n_examples)  # the target's example ids: content keys of those rows
    assert sorted(e.meta["row_id"] for e in bench.examples) == sorted(want)
    for who in ("start", "trained"):  # the gated target (greedy pass@1) of the start and the trained model
        ids = {m.benchmark: set(read_records_file(p)) for m, p in list_result_metas(store.checkpoint_dir(who))}
        assert ids["target"] == {e.id for e in bench.examples}, who
