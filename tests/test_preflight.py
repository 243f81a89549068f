"""Pre-flight: every bad run input is refused at its file, line and field, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.preflight import (
    PreflightError,
    check_checkpoint,
    check_data,
    check_model,
    check_model_or_checkpoint,
    check_run_name,
    load_tokenizer,
)
from flows.sft_config import PipelineConfig
from infra.config import BadInputError, load_config
from tasks.prepare_data import DataValidationError, read_chat_jsonl, read_chat_jsonl_lines


def row(i: int, content: str | None = None) -> dict:
    a = f"Answer: {i:04d}"[::-1]
    return {"messages": [{"role": "user", "content": content or f"reverse {i:04d}"},
                         {"role": "assistant", "content": a}], "answer": a}


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def cfg_for(tmp: Path, *extra: str) -> PipelineConfig:
    return load_config(PipelineConfig, None, [f"run_root={tmp}/runs", "data.replay=", *extra])


# ------------------------------------------------------------------------------------- encodings and paths

def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(row(i)).encode() + b"\r\n" for i in range(3)))
    assert [n for n, _ in read_chat_jsonl_lines(p)] == [1, 2, 3]


def test_non_utf8_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(json.dumps(row(1)).encode() + b"\n" + json.dumps(row(2)).encode()[:-2] + b"\xff\"}\n")
    with pytest.raises(DataValidationError, match=rf"{p}:2: not UTF-8 text \(byte 0xff"):
        read_chat_jsonl(p)


def test_directory_is_not_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="is a directory"):
        read_chat_jsonl(tmp_path)
    with pytest.raises(DataValidationError, match="file not found"):
        read_chat_jsonl(tmp_path / "nope.jsonl")


def test_json_error_gives_the_column_an_editor_shows(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"messages": [}\r\n')  # BOM + CRLF must not shift the column
    with pytest.raises(DataValidationError, match=rf"{p}:1: invalid JSON \(.* at column 15\)"):
        read_chat_jsonl(p)


# ------------------------------------------------------------------------- data checks the run applies

def test_overlong_rows_use_data_max_length_and_original_lines(tmp_path: Path, tok) -> None:
    rows = [row(i) for i in range(20)]
    rows[6] = row(6, "x " * 200)  # line 7
    tr, ev = write(tmp_path / "t.jsonl", rows), write(tmp_path / "e.jsonl", [row(i) for i in range(50, 55)])
    cfg = cfg_for(tmp_path, f"data.train_file={tr}", f"data.eval_file={ev}", "data.max_length=64")
    with pytest.raises(PreflightError, match=rf"more than data.max_length=64 tokens: {tr}:7 \(\d+ tokens\); raise"):
        check_data(cfg, tok)
    assert check_data(cfg_for(tmp_path, f"data.train_file={tr}", f"data.eval_file={ev}", "data.max_length=1024"),
                      tok).n_train == 20


def test_duplicates_are_reported_at_their_lines_in_the_shuffled_mixed_set(tmp_path: Path, tok) -> None:
    rows = [row(i) for i in range(20)]
    rows[9], rows[14] = row(2), row(2)  # lines 10 and 15 repeat line 3: 2/20 = 10% > the run's 5%
    tr, ev = write(tmp_path / "t.jsonl", rows), write(tmp_path / "e.jsonl", [row(i) for i in range(50, 55)])
    replay = write(tmp_path / "r.jsonl", [row(i) for i in range(100, 120)])
    cfg = cfg_for(tmp_path, f"data.train_file={tr}", f"data.eval_file={ev}", f"data.replay={replay}",
                  "data.replay_fraction=0.1")
    with pytest.raises(PreflightError, match=rf"\[duplicates\] 2 duplicate rows .*: {tr}:3 = {tr}:10 = {tr}:15"):
        check_data(cfg, tok)


def test_eval_rows_in_training_are_located(tmp_path: Path, tok) -> None:
    tr = write(tmp_path / "t.jsonl", [row(i) for i in range(20)])
    ev = write(tmp_path / "e.jsonl", [row(50), row(4)])
    cfg = cfg_for(tmp_path, f"data.train_file={tr}", f"data.eval_file={ev}")
    with pytest.raises(PreflightError, match=rf"1 eval rows are also training rows: {ev}:2 = {tr}:5"):
        check_data(cfg, tok)


def test_train_file_needs_an_eval_file_for_a_run_not_for_validate(tmp_path: Path, tok) -> None:
    tr = write(tmp_path / "t.jsonl", [row(i) for i in range(20)])
    cfg = cfg_for(tmp_path, f"data.train_file={tr}")
    with pytest.raises(BadInputError, match="data.eval_file is not"):
        check_data(cfg, tok)
    assert check_data(cfg, tok, require_eval=False).n_train == 20


def test_unknown_task_and_bad_task_kwargs(tmp_path: Path, tok) -> None:
    with pytest.raises(PreflightError, match="data.task=nope: unknown generator"):
        check_data(cfg_for(tmp_path, "data.task=nope"), tok)
    with pytest.raises(PreflightError, match="data.task_kwargs=.*not accepted"):
        check_data(cfg_for(tmp_path, "data.task_kwargs={bogus: 1}", "data.n_train=10"), tok)


# ------------------------------------------------------------------------- models, checkpoints, run names

def test_unknown_model_lists_presets_and_says_hub_needs_network(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PreflightError, match=r"model.base_model=tinyy: unknown model: not a preset \(.*tiny.*\)"):
        check_model("tinyy")
    with pytest.raises(PreflightError, match="needs network"):
        check_model("some-org/some-model-that-is-not-cached")
    with pytest.raises(PreflightError, match="not a Hugging Face model directory"):
        check_model(str(tmp_path))
    with pytest.raises(PreflightError, match="no such directory"):
        check_model(str(tmp_path / "missing"))
    check_model("tiny")


def test_eval_of_a_directory_that_is_neither_checkpoint_nor_model(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="neither a training checkpoint .* nor a Hugging Face model"):
        check_model_or_checkpoint(str(tmp_path))


def test_init_from_must_be_a_committed_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="init_from=.*: no such checkpoint directory"):
        check_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(PreflightError, match="not a training checkpoint"):
        check_checkpoint(f"file://{tmp_path}")
    (tmp_path / "trainer_state.json").write_text("{}")
    with pytest.raises(PreflightError, match="never committed"):
        check_checkpoint(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{}")
    check_checkpoint(str(tmp_path))


def test_run_name_finished_refused_unfinished_resumes(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    assert check_run_name(cfg, "r1") is False
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    assert check_run_name(cfg, "r1") is True
    (tmp_path / "runs" / "r1" / "summary.json").write_text("{}")
    with pytest.raises(PreflightError, match="run 'r1' already finished"):
        check_run_name(cfg, "r1")
    with pytest.raises(PreflightError, match="--run-name"):
        check_run_name(cfg, "../escape")


# ------------------------------------------------------------------------------------------------ retries

def test_validation_errors_are_never_retried_by_prefect() -> None:
    from prefect.states import Failed

    from tasks.base import retry_unless_bad_input
    from tasks.data_stage import prepare_data_task
    from tasks.gate_stage import evaluate_task
    from tasks.train_stage import train_task

    for t in (prepare_data_task, train_task, evaluate_task):
        assert t.retry_condition_fn is retry_unless_bad_input
    assert retry_unless_bad_input(None, None, Failed(data=DataValidationError("x.jsonl:3: bad"))) is False
    assert retry_unless_bad_input(None, None, Failed(data=RuntimeError("rank died"))) is True

    class Pruned(Exception):  # e.g. a sweep trial stopped by its pruner: final, like bad input
        no_retry = True

    assert retry_unless_bad_input(None, None, Failed(data=Pruned("trial 3 pruned at step 20"))) is False


def test_loading_a_directory_that_is_not_a_model_says_so(tmp_path: Path) -> None:
    from training_core.model_loading import ModelLoadError, load_base

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):  # not "install sentencepiece"
        load_base(str(tmp_path))


def test_overlong_rows_reaching_training_are_bad_input_not_retried(tok) -> None:
    from recipes.sft import build_datums

    rows = [{**row(1, "x " * 100), "id": "a"}]
    with pytest.raises(BadInputError, match="exceed data.max_length=16"):
        build_datums(rows, tok, "chat_template", "last_assistant_message", 16)


def test_init_from_with_a_broken_trainer_state_is_bad_input(tmp_path: Path) -> None:
    from flows.preflight import check_sft_run

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "trainer_state.json").write_text("{}")
    (ck / "manifest.json").write_text("{}")
    with pytest.raises(PreflightError, match=f"init_from={ck}: corrupt checkpoint"):
        check_sft_run(cfg_for(tmp_path, f"init_from={ck}"), "r")


def test_contaminated_eval_rows_are_located(tmp_path: Path, tok) -> None:
    long_q = "please reverse the digits of this number and answer in the usual format for row"
    train = [row(i, f"{long_q} {i}") for i in range(20)]
    tr = write(tmp_path / "t.jsonl", train)
    ev_row = row(7, f"{long_q} 7 now")  # not a training row (no leak), but shares a 13-word run with all of them
    ev = write(tmp_path / "e.jsonl", [row(50), ev_row])
    with pytest.raises(PreflightError, match=rf"\[contamination\] 1 eval rows share a 13-word .*: {ev}:2 ~ {tr}:1"):
        check_data(cfg_for(tmp_path, f"data.train_file={tr}", f"data.eval_file={ev}"), tok)
