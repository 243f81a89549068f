"""DPO preference pairs and distillation prompts load from any format through `tasks.data_io.load_rows`.

A Parquet / CSV / JSON export of the same rows gives exactly the JSONL's rows (and the same tokenized pairs),
columns map from other names, and a bad columnar row is named by file, 0-based row index and field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.preferences import preference_rows
from recipes.dpo_config import PrefDataConfig
from recipes.preference_data import prepare_preferences, read_preference_jsonl, read_preferences
from recipes.prompt_data import PromptDataError, load_prompts
from tasks.prepare_data import DataValidationError


def _jsonl(p: Path, rows: list[dict]) -> str:
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _parquet(p: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), p)
    return str(p)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from training_core.model_loading import resolve

    return AutoTokenizer.from_pretrained(resolve("tiny"))


def test_parquet_preferences_equal_jsonl_rows_and_tokens(tmp_path: Path, tok) -> None:
    rows = preference_rows(12, 0, "train", length=2)
    evl = preference_rows(4, 0, "eval", length=2)
    assert isinstance(rows[0]["prompt"], list)  # the message shape (Parquet: a list of structs)
    ref = read_preference_jsonl(_jsonl(tmp_path / "p.jsonl", rows))
    pq_rows = read_preference_jsonl(_parquet(tmp_path / "p.parquet", rows))
    assert [r for _, r in pq_rows] == [r for _, r in ref]
    assert [n for n, _ in ref] == list(range(1, 13)) and [n for n, _ in pq_rows] == list(range(12))
    # the string shape from CSV, with our names mapped from the user's
    flat = [{"question": r["prompt"][-1]["content"], "good": r["chosen"][0]["content"],
             "bad": r["rejected"][0]["content"]} for r in rows]
    csv = tmp_path / "p.csv"
    import pandas as pd

    pd.DataFrame(flat).to_csv(csv, index=False)
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    got = read_preferences(str(csv), cols, tmp_path / "hf")
    assert [r["chosen"] for _, r in got] == [r["chosen"] for _, r in ref]
    assert got[3][0] == f"{csv} row 3"
    # a whole DPO data preparation from Parquet: the same tokenized pairs as from JSONL
    base = {"max_length": 128}
    a = prepare_preferences(PrefDataConfig(train_file=str(tmp_path / "p.jsonl"), eval_file=_jsonl(
        tmp_path / "e.jsonl", evl), **base), tok, tmp_path / "c1")
    b = prepare_preferences(PrefDataConfig(train_file=str(tmp_path / "p.parquet"), eval_file=_parquet(
        tmp_path / "e.parquet", evl), **base), tok, tmp_path / "c2")
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in a.train] == \
        [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in b.train]
    assert b.train[5].source == f"{tmp_path / 'p.parquet'} row 5" and a.train[5].source.endswith("p.jsonl:6")
    assert a.hash != b.hash  # keyed by the file's contents
    c = prepare_preferences(PrefDataConfig(train_file=str(tmp_path / "p.parquet"), eval_file=str(
        tmp_path / "e.parquet"), **base), tok, tmp_path / "c2")
    assert c.cached and c.hash == b.hash


def test_bad_parquet_preference_row_names_row_index_and_field(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": f"A{i}", "rejected": f"a{i}"} for i in range(6)]
    rows[4]["rejected"] = rows[4]["chosen"]
    path = _parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataValidationError) as ei:
        read_preference_jsonl(path)
    assert str(ei.value).startswith(f"{path} row 4: field 'rejected': identical to 'chosen'")
    rows[4]["rejected"] = "ok"
    rows[2]["prompt"] = None  # a null cell: missing
    with pytest.raises(DataValidationError, match=r"bad2\.parquet row 2: field 'prompt': missing"):
        read_preference_jsonl(_parquet(tmp_path / "bad2.parquet", rows))
    renamed = [{"q": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    with pytest.raises(DataValidationError, match=r"bad3\.jsonl:3: field 'prompt': missing"):  # JSONL: the line
        read_preference_jsonl(_jsonl(tmp_path / "bad3.jsonl", renamed), {"prompt": "q"})


def test_prompts_from_parquet_and_csv_equal_jsonl(tmp_path: Path) -> None:
    chats = [{"messages": [{"role": "user", "content": f"reverse {i}{i + 1}"},
                           {"role": "assistant", "content": f"{i + 1}{i}"}], "answer": f"{i + 1}{i}", "id": f"r{i}"}
             for i in range(5)]
    chats.append(chats[1])  # a duplicate prompt: dropped everywhere
    ref = load_prompts(_jsonl(tmp_path / "c.jsonl", chats))
    assert len(ref) == 5 and ref[0].messages == [{"role": "user", "content": "reverse 01"}]
    pq = load_prompts(_parquet(tmp_path / "c.parquet", chats), cache_dir=tmp_path / "hf")
    assert [(r.id, r.messages, r.answer, r.meta) for r in pq] == [(r.id, r.messages, r.answer, r.meta) for r in ref]
    # ShareGPT turns under another column name, in Parquet
    share = [{"conversation": [{"from": "human", "value": c["messages"][0]["content"]},
                               {"from": "gpt", "value": c["messages"][1]["content"]}]} for c in chats]
    sg = load_prompts(_parquet(tmp_path / "s.parquet", share), columns={"messages": "conversation"})
    assert [r.messages for r in sg] == [r.messages for r in ref]
    # CSV: a plain prompt column named otherwise, and the first n
    csv = tmp_path / "p.csv"
    csv.write_text("question,answer\n" + "".join(f"reverse {i}{i + 1},{i + 1}{i}\n" for i in range(5)))
    cs = load_prompts(str(csv), 3, columns={"prompt": "question"})
    assert [r.messages for r in cs] == [r.messages for r in ref[:3]]
    assert [r.answer for r in cs] == [r.answer for r in ref[:3]]


def test_bad_parquet_prompt_row_names_row_index_and_field(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "bot", "content": "x"}]}]
    path = _parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(PromptDataError) as ei:
        load_prompts(path)
    assert str(ei.value).startswith(f"{path} row 1: field 'messages[0].role': must be one of")
    with pytest.raises(PromptDataError, match=r"p\.csv row 1: field 'prompt': missing or empty"):
        (tmp_path / "p.csv").write_text('prompt\nhello\n""\n')
        load_prompts(str(tmp_path / "p.csv"))
