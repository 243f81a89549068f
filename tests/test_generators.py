"""data.generators: determinism, disjoint splits, stable ids, correct answers, grading, JSONL I/O."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from data.generators import (
    TASKS,
    extract_answer,
    generate,
    make_record,
    read_jsonl,
    score,
    split_of,
    train_eval,
    write_jsonl,
)


def _prompts(records: list[dict]) -> set[str]:
    return {r["messages"][0]["content"] for r in records}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_and_seed_dependent(task: str) -> None:
    a = generate(task, 50, seed=3)
    b = generate(task, 50, seed=3)
    c = generate(task, 50, seed=4)
    assert a == b
    assert [r["id"] for r in a] != [r["id"] for r in c]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_eval_disjoint_by_content(task: str) -> None:
    train, ev = train_eval(task, 400, 100, seed=0)
    assert len(train) == 400 and len(ev) == 100
    assert len(_prompts(train)) == 400 and len(_prompts(ev)) == 100  # no duplicates inside a split
    assert not _prompts(train) & _prompts(ev)
    assert not {r["id"] for r in train} & {r["id"] for r in ev}
    # Membership is a function of the content alone: other seeds' train sets never hold an eval problem.
    other_train = generate(task, 400, seed=7, split="train")
    assert not _prompts(other_train) & _prompts(ev)
    assert all(split_of(task, p) == "eval" for p in _prompts(ev))


def test_eval_set_does_not_depend_on_train_size() -> None:
    assert train_eval("addition", 10, 50)[1] == train_eval("addition", 300, 50)[1]


def test_ids_are_content_hashes_and_stable() -> None:
    rec = make_record("What is 47+385?", "432")
    assert rec["messages"] == [
        {"role": "user", "content": "What is 47+385?"},
        {"role": "assistant", "content": "Answer: 432"},
    ]
    payload = json.dumps({"messages": rec["messages"], "answer": "432"}, sort_keys=True)
    assert rec["id"] == hashlib.sha256(payload.encode()).hexdigest()[:16]
    # Pinned: a change here silently re-keys every dataset written before it.
    assert rec["id"] == "6397b51e8f045527"
    assert generate("addition", 1, seed=0)[0]["messages"][0]["content"] == "What is 66+50?"


def test_answers_are_correct() -> None:
    for r in generate("addition", 200, seed=1, digits=3):
        a, b = map(int, re.fullmatch(r"What is (\d+)\+(\d+)\?", r["messages"][0]["content"]).groups())
        assert r["answer"] == str(a + b) and a < 1000 and b < 1000
    for r in generate("subtraction", 100, seed=1):
        a, b = map(int, re.fullmatch(r"What is (\d+)-(\d+)\?", r["messages"][0]["content"]).groups())
        assert int(r["answer"]) == a - b
    for r in generate("multiplication", 100, seed=1):
        a, b = map(int, re.fullmatch(r"What is (\d+)\*(\d)\?", r["messages"][0]["content"]).groups())
        assert int(r["answer"]) == a * b
    for r in generate("reverse", 100, seed=1, length=5):
        s = re.fullmatch(r"Reverse the digits (\d{5})\.", r["messages"][0]["content"]).group(1)
        assert r["answer"] == "".join(reversed(s))
    for r in generate("sort_letters", 100, seed=1):
        letters = r["messages"][0]["content"].removeprefix("Sort the letters: ").split(" ")
        assert r["answer"].split(" ") == sorted(letters) and len(letters) == 6
    for r in generate("copy", 50, seed=1):
        assert r["messages"][0]["content"] == "Repeat: " + r["answer"]
    for r in generate("reverse", 20, seed=2):
        assert r["messages"][1] == {"role": "assistant", "content": "Answer: " + r["answer"]}


def test_exhausted_problem_space_raises() -> None:
    # 1-digit addition has 100 problems, ~10 of them in eval.
    with pytest.raises(ValueError, match="only .* distinct eval problems"):
        generate("addition", 50, seed=0, split="eval", digits=1)
    assert len(generate("addition", 100, seed=0, split=None, digits=1)) == 100
    with pytest.raises(KeyError, match="unknown task"):
        generate("nope", 1, seed=0)


@pytest.mark.parametrize(
    ("completion", "extracted", "points"),
    [
        ("Answer: 432", "432", 1.0),
        ("Answer:432.", "432", 1.0),
        ("  Answer:  432  \nmore text", "432", 1.0),
        ("Answer: 4320", "4320", 0.0),
        ("The answer is 432", None, 0.0),
        ("Answer: 43 2", "43 2", 0.0),
        ("", None, 0.0),
    ],
)
def test_extract_and_score(completion: str, extracted: str | None, points: float) -> None:
    assert extract_answer(completion) == extracted
    assert score(completion, "432") == points


def test_jsonl_roundtrip_and_errors(tmp_path) -> None:
    recs = generate("sort_letters", 30, seed=0)
    path = write_jsonl(recs, tmp_path / "sub" / "train.jsonl")
    assert read_jsonl(path) == recs
    assert len(path.read_text().splitlines()) == 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        read_jsonl(bad)
