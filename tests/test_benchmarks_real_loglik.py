"""Log-likelihood multiple choice: lm-eval's acc / acc_norm, one shared-context batched pass, store + compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from evals.benchmarks import Example
from evals.benchmarks_real import LoglikMCBenchmark, evaluate_suite, mc_metrics, real_benchmark
from evals.benchmarks_real.loglik import HFLoglikScorer, secondary_mean
from evals.compare import GatePolicy, compare
from evals.protocols import EvalProtocol
from evals.runner import load_eval_result
from evals.store import ResultStore


@pytest.fixture(scope="module")
def tiny() -> Any:
    from training_core.model_loading import load_base

    return load_base("tiny")


def _naive(model: Any, scorer: HFLoglikScorer, ctx: str, cont: str) -> float:
    """One full sequence per choice, no cache: the plain definition the shared-context pass must equal."""
    c, t = scorer.encode_pair(ctx, cont)
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([c + t])).logits[0].float().log_softmax(-1)
    return sum(float(lp[len(c) - 1 + j, tok]) for j, tok in enumerate(t))


def test_shared_context_pass_equals_per_choice_scoring_in_two_forward_calls(tiny: Any) -> None:
    sc = HFLoglikScorer(tiny.model, tiny.tokenizer, "tiny")
    ctx = "Question: What is the capital of France?\nAnswer:"
    conts = [" Paris", " the city of Lyon in the south", " x", " Berlin is big"]
    calls: list[tuple[int, ...]] = []
    hook = tiny.model.register_forward_hook(lambda m, a, k, out: calls.append(tuple(k["input_ids"].shape)),
                                            with_kwargs=True)
    try:
        got = sc.choice_logprobs(ctx, conts)
    finally:
        hook.remove()
    want = [_naive(tiny.model, sc, ctx, c) for c in conts]
    assert got == pytest.approx(want, abs=1e-3)
    # one pass over the context, then all four continuations together in one batch over its cache
    assert len(calls) == 2 and calls[0][0] == 1 and calls[1][0] == 4


def test_single_token_choices_need_only_the_context_pass(tiny: Any) -> None:
    sc = HFLoglikScorer(tiny.model, tiny.tokenizer, "tiny")
    ctx = "Q: pick one\nAnswer:"
    assert all(len(sc.encode_pair(ctx, f" {x}")[1]) == 1 for x in "AB")
    calls: list[int] = []
    hook = tiny.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = sc.choice_logprobs(ctx, [" A", " B"])
    finally:
        hook.remove()
    assert len(calls) == 1 and got == pytest.approx([_naive(tiny.model, sc, ctx, c) for c in (" A", " B")], abs=1e-3)


def test_encode_pair_moves_trailing_space_into_the_continuation(tiny: Any) -> None:
    sc = HFLoglikScorer(tiny.model, tiny.tokenizer, "tiny")
    assert sc.encode_pair("Answer: ", "Paris") == sc.encode_pair("Answer:", " Paris")


def test_acc_and_acc_norm_right_and_wrong() -> None:
    # the long choice has the lower total but the higher per-character log-likelihood
    m = mc_metrics([-10.0, -12.0], ["ab", "abcdefgh"], gold=1)
    assert m == {"acc": 0.0, "acc_norm": 1.0, "pred": 0, "pred_norm": 1}
    m = mc_metrics([-10.0, -12.0], ["ab", "abcdefgh"], gold=0)
    assert m["acc"] == 1.0 and m["acc_norm"] == 0.0
    assert mc_metrics([-1.0, -1.0], ["x", "y"], gold=0)["acc"] == 1.0  # ties: the first, as np.argmax


class _Oracle:
    """A scorer that knows the answers (or gets them all wrong), to test the plumbing end to end."""

    def __init__(self, name: str, right: bool, gold: dict[str, int]) -> None:
        self.name, self.right, self.gold = name, right, gold

    def choice_logprobs(self, context: str, continuations: list[str]) -> list[float]:
        g = self.gold[context]
        best = g if self.right else (g + 1) % len(continuations)
        return [-1.0 if i == best else -5.0 for i in range(len(continuations))]


class _GSMGen:
    name = "gen"

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def generate(self, prompts: list[list[dict[str, str]]], protocol: EvalProtocol) -> list[list[str]]:
        return [[f"So the answer is {self.answers[p[-1]['content']]}."] for p in prompts]

    def nll(self, texts: list[str]) -> list[tuple[float, int]]:
        raise NotImplementedError


def test_mixed_suite_stores_results_and_compares_paired(tmp_path: Path) -> None:
    piqa = real_benchmark("piqa", limit=12, seed=0)
    gsm = real_benchmark("gsm8k", limit=4, seed=0)
    gold = {e.messages[0]["content"]: int(e.target) for e in piqa.examples}
    answers = {e.messages[0]["content"]: str(e.target) for e in gsm.examples}
    store = ResultStore(tmp_path)
    ra = evaluate_suite(_GSMGen(answers), [gsm, piqa], EvalProtocol(), store, checkpoint="A",
                        scorer=_Oracle("A", False, gold))
    rb = evaluate_suite(_GSMGen(answers), [gsm, piqa], EvalProtocol(), store, checkpoint="B",
                        scorer=_Oracle("B", True, gold))
    assert list(ra.benchmarks) == ["gsm8k", "piqa"]
    assert ra.benchmarks["gsm8k"].mean == 1.0 and ra.benchmarks["piqa"].mean == 0.0 and rb.benchmarks["piqa"].mean == 1.0
    assert secondary_mean(rb.benchmarks["piqa"], "acc") == 1.0
    proto = rb.benchmarks["piqa"].protocol
    assert dict(proto.extra)["scoring"] == "loglik-mc/acc_norm" and "limit=12" in dict(proto.extra)["subset"]
    # reload from disk and compare: same ids, binary scores -> McNemar, B improved on piqa
    a2, b2 = load_eval_result(store.checkpoint_dir("A")), load_eval_result(store.checkpoint_dir("B"))
    assert set(a2.benchmarks) == {"gsm8k", "piqa"}
    rep = compare(a2, b2, GatePolicy())
    piqa_cmp = next(c for c in rep.comparisons if c.benchmark == "piqa")
    assert piqa_cmp.n == 12 and piqa_cmp.test == "mcnemar-exact" and piqa_cmp.diff == 1.0
    # resume: nothing is rescored (a scorer that would fail proves it)
    again = evaluate_suite(None, [piqa], EvalProtocol(), store, checkpoint="B", scorer=_Oracle("x", True, {}))
    assert again.benchmarks["piqa"].mean == 1.0


def test_through_a_training_core_sampling_client(tiny: Any) -> None:
    from training_core import ServiceClient
    from training_core.textgen import SamplingGenerator

    gen = SamplingGenerator(ServiceClient().create_sampling_client(base_model="tiny"), "base:tiny")
    ex = [Example.make([{"role": "user", "content": f"Question: item {i}?\nAnswer:"}], i % 2,
                       {"choices": ["yes it is", "no"], "delimiter": " "}) for i in range(3)]
    bench = LoglikMCBenchmark("toy_mc", ex, primary="acc")
    res = evaluate_suite(gen, [bench], EvalProtocol())
    direct = HFLoglikScorer(tiny.model, tiny.tokenizer, "direct")
    for e in ex:
        rec = res.benchmarks["toy_mc"].records[e.id]
        want = direct.choice_logprobs(e.messages[0]["content"], [" yes it is", " no"])
        assert rec.extra["logprobs"] == pytest.approx(want, abs=1e-3)
