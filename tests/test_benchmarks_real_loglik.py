"""Log-likelihood multiple choice: lm-eval's acc / acc_norm, one shared-context batched pass, store + compare."""

from __future__ import annotations

import os
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


def test_shared_context_pass_equals_per_choice_scoring_with_one_context_pass(tiny: Any) -> None:
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
    # one pass over the context, then the multi-token continuations' tails over its cache, batched by
    # similar length (the single-token " x" needs no more than the context pass)
    ctx_ids = sc.encode_pair(ctx, " x")[0]
    tails = sorted(len(sc.encode_pair(ctx, c)[1]) - 1 for c in conts if len(sc.encode_pair(ctx, c)[1]) > 1)
    assert calls[0] == (1, len(ctx_ids)) and sum(b for b, _ in calls[1:]) == len(tails) >= 3
    assert 2 <= len(calls) <= 1 + len(tails) and all(t in tails for _, t in calls[1:])  # padded to its longest


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


def test_encode_pair_encodes_a_context_once_and_follows_a_new_one(tiny: Any) -> None:
    sc = HFLoglikScorer(tiny.model, tiny.tokenizer, "tiny")
    calls: list[str] = []
    enc = sc._encode
    sc._encode = lambda text: (calls.append(text), enc(text))[1]  # type: ignore[method-assign]
    seq = [("Q: a\nAnswer:", " A"), ("Q: a\nAnswer:", " B"), ("Q: bb\nAnswer:", " A"), ("Q: a\nAnswer:", " C")]
    for ctx, cont in seq:
        c, t = sc.encode_pair(ctx, cont)
        assert c == enc(ctx) and c + t == enc(ctx + cont)
        c.append(0)  # the caller owns the list: the memo must not change with it
    assert calls.count("Q: a\nAnswer:") == 2 and calls.count("Q: bb\nAnswer:") == 1  # re-encoded after a switch


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


# ---------------------------------------------------------------- shared-prefix KV cache (prefix_batch)

_SHOTS = "".join(f"Question {k}: what is {k} plus {k + 1}?\nA. {2 * k}\nB. {2 * k + 1}\nAnswer: B\n\n" for k in range(5))


def _fewshot_items(n_subjects: int = 2, per_subject: int = 3) -> list[tuple[str, list[str]]]:
    """MMLU-shaped items: per subject a header + the same 5 shots, then a question of varying length."""
    items = []
    for s in range(n_subjects):
        head = f"The following are questions about subject number {s}.\n\n" + _SHOTS
        for q in range(per_subject):
            items.append((head + "Question: " + "and then " * (q * 3 + s) + f"what is {q}?\nAnswer:",
                          [" A", " B", " C", " D"]))
    return items


def _flat(xs: list[list[float]]) -> list[float]:
    return [x for row in xs for x in row]


def _naive_all(model: Any, sc: HFLoglikScorer, items: list[tuple[str, list[str]]]) -> list[list[float]]:
    return [[_naive(model, sc, ctx, c) for c in conts] for ctx, conts in items]


def test_shared_prefix_batch_equals_plain_loop_and_reuses_the_prefix(tiny: Any) -> None:
    from evals.benchmarks_real.prefix_batch import MIN_PREFIX

    sc = HFLoglikScorer(tiny.model, tiny.tokenizer, "tiny")
    items = _fewshot_items()
    # interleave the subjects: the planner must regroup them by shared token prefix
    items = [items[i] for i in (0, 3, 1, 4, 2, 5)]
    seen: list[int] = []
    hook = tiny.model.register_forward_hook(lambda m, a, k, out: seen.append(int(k["input_ids"].numel())),
                                            with_kwargs=True)
    try:
        got = sc.batch_choice_logprobs(items)
    finally:
        hook.remove()
    assert _flat(got) == pytest.approx(_flat(_naive_all(tiny.model, sc, items)), abs=1e-4)
    ctxs = [sc.encode_pair(c, " A")[0] for c, _ in items]
    assert all(len(sc.encode_pair(c, x)[1]) == 1 for c, conts in items for x in conts)  # single-token letters
    # each subject's common token prefix runs once: the model sees far fewer tokens than the contexts hold
    prefix = [len(os.path.commonprefix([c for c, subj in zip(ctxs, (0, 1, 0, 1, 0, 1), strict=True) if subj == s]))
              for s in (0, 1)]
    assert all(p >= MIN_PREFIX for p in prefix)
    assert sc.stats["prefix_tokens"] == sum(2 * p for p in prefix)  # 3 questions a subject: 2 prefix runs saved
    assert sum(seen) == sc.stats["tokens"] and sum(seen) < sum(len(c) for c in ctxs) - sum(prefix)
    # one prefix call per subject + at most one call per question: never one per choice
    assert len(seen) <= 2 + len(items)


def test_shared_prefix_with_multi_token_continuations_of_varied_length(tiny: Any) -> None:
    sc = HFLoglikScorer(tiny.model, tiny.tokenizer, "tiny")
    conts = [" Paris", " the city of Lyon in the south of the country", " x", " Berlin is big"]
    items = [(ctx, conts) for ctx, _ in _fewshot_items(2, 3)]
    items.append(("Answer: ", ["Paris", "the sea"]))  # trailing space: lm-eval moves it into the continuation
    items.append(("", [" a b c", " d"]))  # empty context: scored after the end-of-text token
    got = sc.batch_choice_logprobs(items)
    want = _naive_all(tiny.model, sc, items[:-1])
    want.append([_naive_empty(tiny.model, sc, c) for c in items[-1][1]])
    assert _flat(got) == pytest.approx(_flat(want), abs=1e-4)
    assert sc.stats["prefix_tokens"] > 0
    # the same numbers one item at a time (no grouping) and through the per-example API
    assert _flat([sc.choice_logprobs(c, x) for c, x in items]) == pytest.approx(_flat(got), abs=1e-4)


def _naive_empty(model: Any, sc: HFLoglikScorer, cont: str) -> float:
    c, t = sc.encode_pair("", cont)
    assert c == []
    ids = [sc._prefix_token()] + t
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(float(lp[j, tok]) for j, tok in enumerate(t))


def test_shared_prefix_through_a_lora_sampling_client_on_the_engine_thread() -> None:
    from training_core import ServiceClient, types
    from training_core.renderers import datum_from_tokens_weights

    service = ServiceClient()
    tc = service.create_lora_training_client("tiny", rank=8, seed=0)
    tok = tc.get_tokenizer()
    ids = list(tok.encode(_SHOTS, add_special_tokens=False))[:64]
    for _ in range(3):  # a few steps so that the adapter actually moves the log-probs
        tc.forward_backward([datum_from_tokens_weights(ids, [1.0] * len(ids))], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    lora = HFLoglikScorer.from_sampling_client(tc.save_weights_and_get_sampling_client(), "lora")
    base = HFLoglikScorer.from_sampling_client(service.create_sampling_client(base_model="tiny"), "base")
    items = _fewshot_items(2, 2) + [(_fewshot_items(1, 1)[0][0], [" Paris is nice", " no"])]
    got = lora.batch_choice_logprobs(items)
    assert lora.stats["prefix_tokens"] > 0
    # the reference: the plain loop on the engine's model with the same adapter active, on its thread
    want = lora._run(lambda: _naive_all(lora._model(), lora, items))
    assert _flat(got) == pytest.approx(_flat(want), abs=1e-4)
    base_lp = base.batch_choice_logprobs(items)
    assert max(abs(a - b) for x, y in zip(got, base_lp, strict=True) for a, b in zip(x, y, strict=True)) > 1e-2


def test_plan_groups_cuts_at_shared_token_prefixes() -> None:
    from evals.benchmarks_real.prefix_batch import Request, length_batches, plan_groups

    shot_a, shot_b = tuple(range(100, 160)), tuple(range(200, 250))
    reqs = [Request(shot_a + (1, 2), ((5,),)), Request(shot_b + (7,), ((5,),)), Request(shot_a + (3,), ((5,),)),
            Request(shot_b + (8, 9, 9), ((5,),)), Request(shot_a + (1, 4), ((5,),)), Request((9, 9, 9), ((5,),))]
    groups = plan_groups(reqs, call_tokens=8)
    by_members = {tuple(sorted(g.members)): g.prefix_len for g in groups}
    assert by_members[(0, 2, 4)] == 60 and by_members[(1, 3)] == 50
    # the prefix is a token prefix of every member's context and leaves each at least one own token
    for g in groups:
        for i in g.members:
            assert len(reqs[i].ctx) > g.prefix_len and reqs[i].ctx[:g.prefix_len] == reqs[g.members[0]].ctx[:g.prefix_len]
    # 0-shot contexts without a shared prefix: one group, no prefix pass, batched by similar length
    flat = [Request(tuple(range(k, k + n)), ((1,),)) for k, n in enumerate((5, 40, 6, 38, 7))]
    assert [(sorted(g.members), g.prefix_len) for g in plan_groups(flat, 8)] == [([0, 1, 2, 3, 4], 0)]
    assert length_batches([5, 40, 6, 38, 7], 8, 16) == [[1, 3], [4, 2, 0]]


def test_prefix_cache_broadcast_as_views_stays_intact_and_scores_exactly(tiny: Any) -> None:
    """The prefix cache enters each suffix sub-batch as stride-0 views of its one row (no copy per row), is
    left unchanged by the pass (the next sub-batch reuses it), and any sub-batching gives the plain loop's
    numbers: every row in one padded batch, or every row alone."""
    from evals.benchmarks_real.prefix_batch import GroupScorer, broadcast_rows, plan_groups

    sc = HFLoglikScorer(tiny.model, tiny.tokenizer, "tiny")
    items = _fewshot_items(1, 4)
    reqs = [r for c, x in items for r in sc._requests(c, x)]
    (group,) = plan_groups(reqs, 8)
    p = group.prefix_len
    assert p >= 16 and len({len(r.ctx) for r in reqs}) == 4  # one shared prefix, four suffix lengths
    want = _naive_all(tiny.model, sc, items)
    with torch.inference_mode():
        prefix = tiny.model(input_ids=torch.tensor([list(reqs[0].ctx[:p])]), use_cache=True).past_key_values
        keys0 = prefix.layers[0].keys.clone()
        rows = broadcast_rows(prefix, 3)
        k = rows.layers[0].keys
        assert k.shape[0] == 3 and k.stride(0) == 0 and k.data_ptr() == prefix.layers[0].keys.data_ptr()
        tiny.model(input_ids=torch.tensor([list(r.ctx[p:p + 2]) for r in reqs[:3]]), past_key_values=rows)
        assert rows.get_seq_length() == p + 2 and prefix.get_seq_length() == p  # the source is not extended
        assert torch.equal(prefix.layers[0].keys, keys0)
        for call_tokens, n_calls in ((1000, 2), (0, 5)):  # 1 prefix + 1 padded batch / + 4 single rows
            gs = GroupScorer(tiny.model, call_tokens=call_tokens)
            got = gs.score(reqs, p)
            assert gs.calls == n_calls and _flat(got) == pytest.approx(_flat(want), abs=1e-4)
