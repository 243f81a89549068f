"""evaluate(): batching, resumability, the pinned protocol, pass@k, perplexity; guard suite; periodic eval."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from evals.benchmarks import Benchmark, Example
from evals.builtin import builtin_benchmark
from evals.guard import build_guard_suite, load_guard_suite
from evals.periodic import PeriodicEvaluator
from evals.protocols import EvalProtocol, Messages
from evals.runner import evaluate, load_eval_result
from evals.store import ResultStore
from evals.testing import OracleGenerator


@pytest.fixture(scope="module")
def benches() -> list:
    return [builtin_benchmark("arithmetic", 50), builtin_benchmark("mc", 30), builtin_benchmark("heldout_text", 20)]


class Crashing(OracleGenerator):
    """Dies on the call after `ok_calls` generate() calls, like a pre-empted eval job."""

    def __init__(self, *a, ok_calls: int, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self.ok_calls = ok_calls

    def generate(self, prompts: list[Messages], protocol: EvalProtocol) -> list[list[str]]:
        if len(self.calls) >= self.ok_calls:
            raise RuntimeError("pre-empted")
        return super().generate(prompts, protocol)


def test_evaluate_batches_grades_and_stores(tmp_path: Path, benches: list) -> None:
    gen = OracleGenerator("ckpt-a", benches, {"arithmetic": 0.5, "mc": 1.0})
    res = evaluate(gen, benches, EvalProtocol(system_prompt="Be brief."), tmp_path, batch_size=16)
    assert gen.calls == [16, 16, 16, 2, 16, 14]  # many prompts per call, never more than batch_size
    ar = res.benchmarks["arithmetic"]
    right = {ex.id: f"Let me compute.\n#### {ex.target}" for ex in benches[0].examples}
    for ex_id, rec in ar.records.items():
        assert rec.score == float(rec.output == right[ex_id])  # graded against the known right answer
        assert json.loads(rec.prompt)[0] == {"role": "system", "content": "Be brief."}
    assert 0.3 < ar.mean < 0.7 and res.benchmarks["mc"].mean == 1.0
    # The full protocol is pinned: per-benchmark grader and max_tokens, stored beside the records.
    assert ar.protocol.grader.startswith("numeric(") and ar.protocol.max_tokens == 16
    meta = json.loads((ResultStore(tmp_path).checkpoint_dir("ckpt-a") / f"arithmetic.{ar.protocol_hash}.meta.json")
                      .read_text())
    assert meta["protocol"]["system_prompt"] == "Be brief." and meta["protocol_hash"] == ar.protocol_hash
    assert EvalProtocol.from_dict(meta["protocol"]).hash() == ar.protocol_hash
    loaded = load_eval_result(ResultStore(tmp_path).checkpoint_dir("ckpt-a"))
    assert loaded.means() == pytest.approx(res.means())


def test_protocol_hash_tracks_every_field() -> None:
    base = EvalProtocol()
    variants = [base.replace(system_prompt="x"), base.replace(max_tokens=17), base.replace(temperature=0.7),
                base.replace(top_p=0.9), base.replace(top_k=5), base.replace(seed=1), base.replace(stop=("\n",)),
                base.replace(num_samples=2), base.replace(renderer="qwen3"), base.replace(grader_version="2")]
    hashes = {v.hash() for v in variants}
    assert len(hashes) == len(variants) and base.hash() not in hashes
    assert EvalProtocol(stop=["a"]).hash() == EvalProtocol(stop=("a",)).hash()


def test_resume_after_crash_skips_finished_ids(tmp_path: Path, benches: list) -> None:
    bench = benches[0]
    full = evaluate(OracleGenerator("c", [bench], 0.5), [bench], EvalProtocol(), None, batch_size=8)
    crash = Crashing("c", [bench], 0.5, ok_calls=3)
    with pytest.raises(RuntimeError, match="pre-empted"):
        evaluate(crash, [bench], EvalProtocol(), tmp_path, batch_size=8)
    again = OracleGenerator("c", [bench], 0.5)
    res = evaluate(again, [bench], EvalProtocol(), tmp_path, batch_size=8)
    assert sum(again.calls) == len(bench) - 3 * 8  # only unfinished examples are sampled
    got = {k: (r.output, r.score) for k, r in res.benchmarks["arithmetic"].records.items()}
    want = {k: (r.output, r.score) for k, r in full.benchmarks["arithmetic"].records.items()}
    assert got == want
    # Nothing left: a third run samples nothing.
    third = OracleGenerator("c", [bench], 0.5)
    evaluate(third, [bench], EvalProtocol(), tmp_path, batch_size=8)
    assert third.calls == []


def test_torn_last_line_is_redone(tmp_path: Path, benches: list) -> None:
    bench = benches[1]
    res = evaluate(OracleGenerator("c", [bench], 1.0), [bench], EvalProtocol(), tmp_path)
    path = ResultStore(tmp_path).checkpoint_dir("c") / f"mc.{res.benchmarks['mc'].protocol_hash}.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # crash mid-write
    gen = OracleGenerator("c", [bench], 1.0)
    res2 = evaluate(gen, [bench], EvalProtocol(), tmp_path)
    assert gen.calls == [1] and res2.benchmarks["mc"].mean == 1.0
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_changed_dataset_under_same_key_refuses(tmp_path: Path) -> None:
    b1 = builtin_benchmark("arithmetic", 10, seed=0)
    evaluate(OracleGenerator("c", [b1], 1.0), [b1], EvalProtocol(), tmp_path)
    b2 = builtin_benchmark("arithmetic", 10, seed=1)
    with pytest.raises(ValueError, match="dataset hash"):
        evaluate(OracleGenerator("c", [b2], 1.0), [b2], EvalProtocol(), tmp_path)


def test_generator_contract_violations_are_clear(benches: list) -> None:
    class Short(OracleGenerator):
        def generate(self, prompts, protocol):  # type: ignore[no-untyped-def]
            return super().generate(prompts, protocol)[:-1]

    with pytest.raises(ValueError, match="returned 9 results for 10 prompts"):
        evaluate(Short("s", benches, 1.0), [benches[0]], EvalProtocol(), None, batch_size=10)


def test_pass_at_k_with_multiple_samples(benches: list) -> None:
    bench = Benchmark("arith20", benches[0].examples[:20], benches[0].grader)
    proto = EvalProtocol(num_samples=4, temperature=0.8)
    res = evaluate(OracleGenerator("c", [bench], 0.4), [bench], proto, None).benchmarks["arith20"]
    for r in res.records.values():
        assert len(r.samples) == 4 and r.score == pytest.approx(np.mean(r.sample_scores))

    def brute(scores: list[float], k: int) -> float:
        subsets = list(itertools.combinations(scores, k))
        return sum(any(s == 1.0 for s in sub) for sub in subsets) / len(subsets)

    pk = res.pass_at()
    assert sorted(pk) == [1, 2, 4]
    for k, v in pk.items():
        assert v == pytest.approx(np.mean([brute(r.sample_scores, k) for r in res.records.values()]))
    assert pk[1] == pytest.approx(res.mean) and 0 < pk[1] < pk[2] < pk[4] <= 1


def test_perplexity_benchmark(benches: list) -> None:
    ppl = benches[2]
    gen = OracleGenerator("c", benches, 1.0)
    br = evaluate(gen, [ppl], EvalProtocol(), None).benchmarks["heldout_text"]
    nll = gen.nll([ex.target for ex in ppl.examples])
    assert [r.score for r in br.records.values()] == pytest.approx([-a / b for a, b in nll])
    assert br.summary()["perplexity"] == pytest.approx(math.exp(sum(a for a, _ in nll) / sum(b for _, b in nll)))
    assert br.protocol.grader == "nll_per_token"


def test_guard_suite_keeps_what_the_base_solves(tmp_path: Path, benches: list) -> None:
    cands = [benches[0], benches[1]]
    base = OracleGenerator("base", cands, {"arithmetic": 0.6, "mc": 0.7})
    suite = build_guard_suite(base, cands, EvalProtocol(), min_per_benchmark=5, save_dir=tmp_path / "guards")
    probe = evaluate(OracleGenerator("base", cands, {"arithmetic": 0.6, "mc": 0.7}), cands, EvalProtocol(), None)
    for b in cands:
        solved = [i for i, s in probe.benchmarks[b.name].scores().items() if s == 1.0]
        g = next(x for x in suite if x.name == f"guard_{b.name}")
        assert [e.id for e in g.examples] == solved  # exactly the items the base gets right, in order
    assert suite[-1].kind == "perplexity"
    reloaded = load_guard_suite(tmp_path / "guards")
    assert {b.name: [e.id for e in b.examples] for b in reloaded} == {b.name: [e.id for e in b.examples] for b in suite}
    again = evaluate(OracleGenerator("base", cands, {"arithmetic": 0.6, "mc": 0.7}),
                     [b for b in reloaded if b.kind == "generate"], EvalProtocol(), None)
    assert all(r.mean == 1.0 for r in again.benchmarks.values())
    with pytest.raises(ValueError, match="solves only"):
        build_guard_suite(OracleGenerator("weak", cands, 0.0), cands, EvalProtocol(), min_per_benchmark=5)


def test_periodic_evaluator(tmp_path: Path, benches: list) -> None:
    logged: list[tuple[int, dict]] = []
    small = [Benchmark("a10", benches[0].examples[:10], benches[0].grader), benches[2]]
    pe = PeriodicEvaluator(small, every_n_steps=10, store=tmp_path, log_fn=lambda m, s: logged.append((s, m)),
                           run_name="run1")
    gen = OracleGenerator("live", small, 1.0)
    outs = {step: pe.maybe_run(step, gen) for step in range(0, 31, 5)}
    assert [s for s, m in outs.items() if m is not None] == [10, 20, 30]
    m = outs[10]
    assert m is not None and m["eval/a10"] == 1.0 and m["eval/heldout_text/ppl"] > 1
    assert {"eval/a10/ci_low", "eval/a10/ci_high", "eval/heldout_text"} <= set(m)
    assert [s for s, _ in logged] == [10, 20, 30]
    assert (ResultStore(tmp_path).checkpoint_dir("run1/step-20") / "checkpoint.json").exists()
    with pytest.raises(ValueError):
        PeriodicEvaluator(small, every_n_steps=0)


def test_duplicate_examples_rejected() -> None:
    ex = Example.make([{"role": "user", "content": "hi"}], "x")
    with pytest.raises(ValueError, match="identical"):
        Benchmark("dup", [ex, ex], benchmarks_grader())


def benchmarks_grader():  # type: ignore[no-untyped-def]
    from evals.graders import ExactGrader

    return ExactGrader()


class _Tok:
    bos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [2 + ord(c) % 50 for c in text]


class _Done:
    def __init__(self, value: list[float | None]) -> None:
        self.value = value

    def result(self) -> list[float | None]:
        return self.value


class _LogprobClient:
    """compute_logprobs like training_core's: None for the first (BOS) position, then one logprob per token;
    -inf on every token of a text containing 'zz' (a model that rules that text out)."""

    def __init__(self, tok: _Tok) -> None:
        self.tok = tok

    def compute_logprobs(self, model_input: object) -> _Done:
        ids = model_input.to_ints()  # type: ignore[attr-defined]
        zero_prob = self.tok.encode("zz")[0]
        return _Done([None] + [-math.inf if i == zero_prob else -2.0 for i in ids[1:]])


def test_textgen_nll_counts_zero_probability_tokens_against_the_model() -> None:
    from training_core.textgen import SamplingGenerator

    gen = SamplingGenerator.__new__(SamplingGenerator)  # only nll() is under test: no model, no renderer
    gen.tokenizer = _Tok()
    gen.client = _LogprobClient(gen.tokenizer)  # type: ignore[assignment]
    ok, bad = gen.nll(["abcd", "abzz"])
    assert ok == (pytest.approx(8.0), 4)
    # The -inf tokens were dropped and the count shrunk to 2, so "abzz" scored -2.0/token, as well as "abcd".
    assert bad == (math.inf, 4)


class ZeroProb(OracleGenerator):
    """An NLL of inf (zero probability on some token) for the first `n_bad` texts it is asked about."""

    def __init__(self, *a, n_bad: int, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self.n_bad = n_bad

    def nll(self, texts: list[str]) -> list[tuple[float, int]]:
        out = []
        for v, toks in super().nll(texts):
            out.append((math.inf, toks) if self.n_bad > 0 else (v, toks))
            self.n_bad -= 1
        return out


def test_zero_probability_text_is_scored_minus_inf_and_survives_the_store(tmp_path: Path, benches: list) -> None:
    ppl = benches[2]
    res = evaluate(ZeroProb("z", [ppl], 1.0, n_bad=2), [ppl], EvalProtocol(), tmp_path, batch_size=7)
    scores = [r.score for r in res.benchmarks["heldout_text"].records.values()]
    assert scores[:2] == [-math.inf, -math.inf] and all(math.isfinite(s) for s in scores[2:])
    br = load_eval_result(ResultStore(tmp_path).checkpoint_dir("z")).benchmarks["heldout_text"]
    assert [r.score for r in br.records.values()] == scores  # reloaded from the JSONL store
    s = br.summary()
    assert s["mean"] == -math.inf and s["perplexity"] == math.inf and "ci_low" not in s
    with pytest.raises(ValueError, match="nll"):  # -inf NLL (probability > 1) is still a generator bug
        class Broken(OracleGenerator):
            def nll(self, texts: list[str]) -> list[tuple[float, int]]:
                return [(-math.inf, 3) for _ in texts]

        evaluate(Broken("b", [ppl], 1.0), [ppl], EvalProtocol(), None)
