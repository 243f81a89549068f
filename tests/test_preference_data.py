"""Preference data: validation (file, line, field), tokenization, cache, quality stats, the built-in task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.preferences import constraint_benchmark, follows_constraint, grade_constraint, preference_rows
from infra.config import BadInputError
from recipes.dpo_config import PrefDataConfig
from recipes.preference_data import contamination, prepare_preferences, read_preference_jsonl
from tasks.prepare_data import DataValidationError


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from training_core.model_loading import resolve

    return AutoTokenizer.from_pretrained(resolve("tiny"))


def _write(p: Path, rows: list) -> str:
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


GOOD = {"prompt": [{"role": "user", "content": "Say hi in uppercase."}],
        "chosen": [{"role": "assistant", "content": "HI"}], "rejected": [{"role": "assistant", "content": "hi"}]}


@pytest.mark.parametrize("bad,field,msg", [
    ({**GOOD, "chosen": [{"role": "assistant", "content": "hi"}]}, "rejected", "identical to 'chosen'"),
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "rejected", "identical to 'chosen'"),
    ({k: v for k, v in GOOD.items() if k != "rejected"}, "rejected", "missing"),
    ({**GOOD, "prompt": [{"role": "robot", "content": "x"}]}, "prompt[0].role", "'robot' is not one of"),
    ({**GOOD, "chosen": [{"role": "assistant", "content": 3}]}, "chosen[0].content", "not a string"),
    ({**GOOD, "chosen": [{"role": "user", "content": "HI"}]}, "chosen", "exactly one assistant message"),
    ({**GOOD, "prompt": GOOD["prompt"] + GOOD["chosen"]}, "prompt[1].role", "must not end with the assistant"),
    ({**GOOD, "rejected": ""}, "rejected", "empty string"),
    ([1, 2], "<row>", "expected a JSON object"),
])
def test_validation_errors_name_file_line_and_field(tmp_path: Path, bad: object, field: str, msg: str) -> None:
    path = _write(tmp_path / "p.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataValidationError) as ei:
        read_preference_jsonl(path)
    assert str(ei.value).startswith(f"{path}:3: field '{field}': ")
    assert msg in str(ei.value)
    assert isinstance(ei.value, BadInputError)  # exit code 2 through the CLI


def test_invalid_json_and_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [GOOD, "{not json"])
    with pytest.raises(DataValidationError, match=r"p\.jsonl:2: invalid JSON"):
        read_preference_jsonl(path)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataValidationError, match="no rows"):
        read_preference_jsonl(tmp_path / "e.jsonl")


def test_string_shape_equals_message_shape(tmp_path: Path, tok: object) -> None:
    s = {"prompt": "Say hi in uppercase.", "chosen": "HI", "rejected": "hi"}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(s) + "\r\n").encode() + b"\r\n")
    a = prepare_preferences(PrefDataConfig(train_file=_write(tmp_path / "m.jsonl", [GOOD]),
                                           eval_file=_write(tmp_path / "me.jsonl", [{**GOOD, "prompt": "other"}])),
                            tok, tmp_path / "c1")
    b = prepare_preferences(PrefDataConfig(train_file=str(tmp_path / "bom.jsonl"),
                                           eval_file=_write(tmp_path / "se.jsonl", [{**s, "prompt": "other"}])),
                            tok, tmp_path / "c2")
    pa, pb = a.train[0], b.train[0]
    assert (pa.prompt_ids, pa.chosen_ids, pa.rejected_ids) == (pb.prompt_ids, pb.chosen_ids, pb.rejected_ids)
    # the completion is the reply + end of turn; the prompt ends with the assistant header
    assert tok.decode(pa.chosen_ids) == "HI<|im_end|>" and tok.decode(pa.rejected_ids) == "hi<|im_end|>"
    assert tok.decode(pa.prompt_ids).endswith("<|im_start|>assistant\n")


def test_nothing_written_on_error_and_cache_roundtrip(tmp_path: Path, tok: object) -> None:
    cache = tmp_path / "cache"
    bad = _write(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    ev = _write(tmp_path / "ev.jsonl", [{**GOOD, "prompt": "held out"}])
    with pytest.raises(DataValidationError, match=r"bad\.jsonl:2: field 'rejected'"):
        prepare_preferences(PrefDataConfig(train_file=bad, eval_file=ev), tok, cache)
    assert not cache.exists()
    cfg = PrefDataConfig(n_train=40, n_eval=10)
    first = prepare_preferences(cfg, tok, cache)
    again = prepare_preferences(cfg, tok, cache)
    assert not first.cached and again.cached and again.dir == first.dir
    assert [p.chosen_ids for p in again.train] == [p.chosen_ids for p in first.train]
    # a tampered entry is recomputed, never trusted
    (Path(first.dir) / "train.jsonl").write_text("{}\n")
    third = prepare_preferences(cfg, tok, cache)
    assert not third.cached and [p.id for p in third.train] == [p.id for p in first.train]
    # another renderer is another entry
    other = prepare_preferences(PrefDataConfig(n_train=40, n_eval=10, renderer="role_colon"), tok, cache)
    assert other.hash != first.hash


def test_over_long_refused_or_truncated_and_counted(tmp_path: Path, tok: object) -> None:
    long = {**GOOD, "chosen": "HI " * 40, "rejected": "hi " * 40}
    tr = _write(tmp_path / "t.jsonl", [GOOD, long])
    ev = _write(tmp_path / "e.jsonl", [{**GOOD, "prompt": "held out"}])
    with pytest.raises(DataValidationError, match=r"t\.jsonl:2: field 'chosen': prompt \+ chosen is \d+ tokens"):
        prepare_preferences(PrefDataConfig(train_file=tr, eval_file=ev, max_length=40), tok, tmp_path / "c")
    ds = prepare_preferences(PrefDataConfig(train_file=tr, eval_file=ev, max_length=40, truncate=True), tok,
                             tmp_path / "c")
    assert ds.stats["truncated"] == 1
    p = ds.train[1]
    assert len(p.prompt_ids) + len(p.chosen_ids) == 40 and p.truncated


def test_quality_stats_and_contamination(tmp_path: Path, tok: object) -> None:
    dup = {**GOOD, "chosen": "HI!"}
    tr = _write(tmp_path / "t.jsonl", [GOOD, dup, dup])
    ev = _write(tmp_path / "e.jsonl", [{**GOOD, "prompt": "Say hi in lowercase, please."}])
    ds = prepare_preferences(PrefDataConfig(train_file=tr, eval_file=ev), tok, tmp_path / "c",
                             eval_prompts=["Say hi in uppercase.", "unrelated words here"])
    st = ds.stats
    assert st["n_train"] == 3 and st["duplicates"] == 1 and st["identical_pairs"] == 0
    assert st["contaminated_eval_prompts"] == 1 and st["eval_prompts_checked"] == 3
    assert st["chosen_tokens"]["min"] == len(ds.train[0].chosen_ids)
    # an exact held-out prompt in training is an error, naming both places
    leak = _write(tmp_path / "leak.jsonl", [GOOD])
    with pytest.raises(DataValidationError, match=r"leak\.jsonl:1 = .*t\.jsonl:1"):
        prepare_preferences(PrefDataConfig(train_file=tr, eval_file=leak), tok, tmp_path / "c2")
    assert contamination(["a b c d e f g h i"], ["x a b c d e f g h", "a b"], n=8) == [(0, 0)]


def test_builtin_task_is_checkable_and_split() -> None:
    tr, ev = preference_rows(300, 0, "train"), preference_rows(100, 0, "eval")
    assert not {r["prompt"][0]["content"] for r in tr} & {r["prompt"][0]["content"] for r in ev}
    for r in tr[:50]:
        case = "uppercase" if " in uppercase" in r["prompt"][0]["content"] else "lowercase"
        assert follows_constraint(r["chosen"][0]["content"], case)
        assert not follows_constraint(r["rejected"][0]["content"], case)
        assert r["chosen"][0]["content"].lower() == r["rejected"][0]["content"].lower()
    bench = constraint_benchmark(120, seed=0)
    assert len(bench) == 120 and bench.grader.name == "callable(ref='data.preferences:grade_constraint')"
    assert grade_constraint("A B C", {"target": "uppercase", "meta": {}}) == (1.0, "ABC")
    assert grade_constraint("A b C", {"target": "uppercase", "meta": {}})[0] == 0.0
    assert grade_constraint("...", {"target": "lowercase", "meta": {}})[0] == 0.0
    assert bench.grader.grade("q w e r", "lowercase", {}).score == 1.0
