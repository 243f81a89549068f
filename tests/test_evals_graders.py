"""Graders, answer extraction, IFEval constraints and the JSONL benchmark loader on known cases."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from data.generators import split_of
from evals.benchmarks import BenchmarkFormatError, Example, example_id, load_jsonl_benchmark
from evals.builtin import BUILTIN, builtin_benchmark
from evals.graders import (
    ChoiceGrader,
    ContainsGrader,
    ExactGrader,
    NormalizedGrader,
    NumericGrader,
    RegexGrader,
    extract_choice,
    extract_number,
    make_grader,
)
from evals.ifeval import check_constraint


@pytest.mark.parametrize("text,want", [
    ("The answer is 42.", "42"),
    ("3 apples + 4 apples = 7 apples", "7"),
    ("Step 1: 12*3 = 36\nStep 2: 36+4 = 40\n#### 40", "40"),
    ("#### 1,234 dollars", "1,234"),
    ("so she pays $18.50 in total", "18.50"),
    ("\\boxed{-17} because 3 - 20", "-17"),
    ("Answer: 3/4 of the cake, i.e. 0.75", "3/4"),
    ("the result is -0.5", "-0.5"),
    ("no digits here", None),
    ("x2 and v3 are labels; 5 is the answer", "5"),
])
def test_extract_number(text: str, want: str | None) -> None:
    assert extract_number(text) == want


@pytest.mark.parametrize("text,target,score", [
    ("#### 40", 40, 1.0), ("#### 40.0", "40", 1.0), ("$1,234", 1234, 1.0), ("Answer: 3/4", 0.75, 1.0),
    ("it is 41", 40, 0.0), ("nothing", 40, 0.0), ("1 + 1 = 2, answer 3", 2, 0.0),
])
def test_numeric_grader(text: str, target: object, score: float) -> None:
    assert NumericGrader().grade(text, target, {}).score == score


def test_numeric_tolerance() -> None:
    g = NumericGrader(abs_tol=0.01)
    assert g.grade("3.146", 3.14159, {}).score == 1.0
    assert g.grade("3.16", 3.14159, {}).score == 0.0
    rel = NumericGrader(abs_tol=0, rel_tol=0.05)
    assert rel.grade("104", 100, {}).score == 1.0 and rel.grade("106", 100, {}).score == 0.0
    assert "abs_tol=0.01" in g.name  # the tolerance is part of the pinned protocol


@pytest.mark.parametrize("text,n,want", [
    ("The answer is C.", 4, "C"), ("B", 4, "B"), ("(D) because it is largest", 4, "D"),
    ("I think answer: b", 4, "B"), ("A. 24", 4, "A"), ("I would pick option C here", 4, "C"),
    ("Answer is E", 4, None), ("I cannot tell", 4, None), ("It must be B, not A", 4, "A"),
])
def test_extract_choice(text: str, n: int, want: str | None) -> None:
    assert extract_choice(text, n) == want


def test_choice_grader_targets() -> None:
    g = ChoiceGrader()
    meta = {"choices": ["red", "green", "blue"]}
    assert g.grade("The answer is (B)", "B", meta).score == 1.0
    assert g.grade("The answer is (B)", 1, meta).score == 1.0
    assert g.grade("The answer is (B)", "green", meta).score == 1.0
    assert g.grade("The answer is (C)", "green", meta).score == 0.0
    assert g.check_target("Z", meta) is not None and g.check_target("A", {"choices": ["x"]}) is not None


def test_exact_normalized_contains_regex() -> None:
    assert ExactGrader().grade("  Paris \n", "Paris", {}).score == 1.0
    assert ExactGrader().grade("paris", "Paris", {}).score == 0.0
    assert NormalizedGrader().grade("The  Paris!", "paris", {}).score == 1.0
    assert NormalizedGrader().grade("Lyon", ["paris", "lyon"], {}).score == 1.0
    assert ContainsGrader().grade("It is in Paris, France", ["paris", "france"], {}).score == 1.0
    assert ContainsGrader().grade("It is in Paris", ["paris", "france"], {}).score == 0.0
    assert ContainsGrader(mode="any").grade("It is in Paris", ["paris", "france"], {}).score == 1.0
    assert ContainsGrader(case_sensitive=True).grade("paris", "Paris", {}).score == 0.0
    ext = RegexGrader(pattern=r"ANSWER:\s*(\w+)")
    g = ext.grade("blah ANSWER: yes", "yes", {})
    assert (g.extracted, g.score) == ("yes", 1.0)
    assert RegexGrader().grade("order #A-1234 shipped", r"#A-\d{4}", {}).score == 1.0
    assert RegexGrader().grade("order shipped", r"#A-\d{4}", {}).score == 0.0
    assert RegexGrader().check_target("([", {}) is not None


def test_callable_grader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_grader_mod.py").write_text(textwrap.dedent("""
        def grade(output, example):
            want = example["target"]
            return (1.0 if output.strip()[::-1] == want else 0.0), output.strip()[::-1]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    g = make_grader("my_grader_mod:grade")
    assert g.kind == "callable" and g.version.startswith("src-")
    res = g.grade("cba", "abc", {})
    assert (res.score, res.extracted) == (1.0, "abc")
    sys.modules.pop("my_grader_mod", None)
    with pytest.raises(ValueError, match="cannot import"):
        make_grader("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="unknown grader type"):
        make_grader({"type": "nope"})


@pytest.mark.parametrize("output,constraint,ok", [
    ("all quiet here", {"type": "lowercase"}, True),
    ("All quiet", {"type": "lowercase"}, False),
    ("ALL QUIET", {"type": "uppercase"}, True),
    ("one two three", {"type": "max_words", "n": 3}, True),
    ("one two three four", {"type": "max_words", "n": 3}, False),
    ("one two", {"type": "min_words", "n": 3}, False),
    ("a, b", {"type": "no_commas"}, False),
    ("the river is blue", {"type": "include_keywords", "words": ["river", "blue"]}, True),
    ("the rivers are blue", {"type": "include_keywords", "words": ["river", "blue"]}, False),
    ("the stone", {"type": "exclude_keywords", "words": ["stone"]}, False),
    ("text. The end.", {"type": "end_with", "phrase": "The end."}, True),
    ("Sure. text", {"type": "start_with", "phrase": "Sure."}, True),
    ("* a\n* b\n- c", {"type": "num_bullets", "n": 3}, True),
    ("* a\n* b", {"type": "num_bullets", "n": 3}, False),
    ('```json\n{"a": 1}\n```', {"type": "json"}, True),
    ("{a: 1}", {"type": "json"}, False),
    ('"hello"', {"type": "quoted"}, True),
])
def test_ifeval_constraints(output: str, constraint: dict, ok: bool) -> None:
    assert check_constraint(output, constraint) is ok


def test_ifeval_grader_lists_failures() -> None:
    g = make_grader("ifeval")
    meta = {"constraints": [{"type": "lowercase"}, {"type": "no_commas"}]}
    assert g.grade("fine text", None, meta).score == 1.0
    res = g.grade("Bad, text", None, meta)
    assert res.score == 0.0 and res.extracted == "failed:lowercase,no_commas"


def test_example_ids_are_content_hashes() -> None:
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    a = Example.make(msgs, 4, {"x": 1, "y": 2})
    b = Example.make([dict(m) for m in msgs], 4, {"y": 2, "x": 1})  # key order must not matter
    assert a.id == b.id == example_id(msgs, 4, {"x": 1, "y": 2})
    assert Example.make(msgs, 5).id != a.id
    assert len(a.id) == 16


def test_builtins_are_deterministic_and_distinct() -> None:
    for name in BUILTIN:
        b1, b2 = builtin_benchmark(name, 40, seed=3), builtin_benchmark(name, 40, seed=3)
        assert [e.id for e in b1.examples] == [e.id for e in b2.examples]
        assert len({e.id for e in b1.examples}) == 40
        assert [e.id for e in builtin_benchmark(name, 40, seed=4).examples] != [e.id for e in b1.examples]
    ar = builtin_benchmark("arithmetic", 30)
    for ex in ar.examples:  # the stored target is the true value of the printed expression
        expr = ex.messages[0]["content"].removeprefix("What is ").split("?")[0]
        assert eval(expr) == ex.target  # noqa: S307 - generated arithmetic only
        # Drawn from the data generators' eval split: training data from that module cannot contain it.
        assert split_of(ex.meta["op"], ex.messages[0]["content"]) == "eval"


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_loader_good_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "capitals.jsonl", [
        {"prompt": "Capital of France?", "answer": "Paris", "id": "q1"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}],
         "answer": "Lima"},
        "",
    ])
    b = load_jsonl_benchmark(p, "normalized")
    assert b.name == "capitals" and len(b) == 2
    assert b.examples[0].meta["source_id"] == "q1"
    assert b.examples[1].messages[0]["role"] == "system"
    mc = _write(tmp_path / "mc.jsonl", [{"prompt": "Pick red", "choices": ["blue", "red"], "answer": "B"}])
    bm = load_jsonl_benchmark(mc, "choice")
    assert "B. red" in bm.examples[0].messages[0]["content"]


@pytest.mark.parametrize("rows,grader,line,field", [
    ([{"prompt": "ok", "answer": "1"}, "{not json"], "exact", 2, "<row>"),
    ([{"prompt": "ok", "answer": "1"}, {"prompt": "", "answer": "1"}], "exact", 2, "prompt"),
    ([{"prompt": "ok", "anwser": "1"}], "exact", 1, "anwser"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "x"}], "numeric", 2, "answer"),
    ([{"prompt": "a"}], "exact", 1, "target"),
    ([{"prompt": "a", "answer": "B"}], "choice", 1, "choices"),
    ([{"prompt": "a", "choices": ["x", "y"], "answer": "Q"}], "choice", 1, "answer"),
    ([{"messages": [{"role": "usr", "content": "hi"}], "answer": "1"}], "exact", 1, "messages[0].role"),
    ([{"messages": [{"role": "user"}], "answer": "1"}], "exact", 1, "messages[0]"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "a", "answer": "1"}], "exact", 2, "<row>"),
    ([{"prompt": "a", "constraints": [{"type": "shout"}]}], "ifeval", 1, "constraints[0]"),
    (["[1, 2]"], "exact", 1, "<row>"),
])
def test_jsonl_loader_errors_name_file_line_field(tmp_path: Path, rows: list[object], grader: str, line: int,
                                                  field: str) -> None:
    p = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BenchmarkFormatError) as ei:
        load_jsonl_benchmark(p, grader)
    assert (ei.value.line, ei.value.field) == (line, field)
    assert str(ei.value).startswith(f"{p}:{line}: field {field!r}")
