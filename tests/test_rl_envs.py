"""RL environments: problem and tool envs, failure rewards, datasets, the benchmark adapter, and multi-turn
rollouts through the real renderer with a scripted "model" (a sampler that replays fixed replies)."""

from __future__ import annotations

from typing import Any

import pytest

from envs.arithmetic import EnvAnswerGrader, GeneratedProblemEnv, GeneratedTaskDataset
from envs.base import Env, EnvGroupBuilder, FailureRewards, StepResult
from envs.bench_env import BenchmarkDataset, BenchmarkProblemEnv
from envs.tool_calc import TOOL_ROLE, ToolCalcDataset, ToolCalcEnv, calculate, problems, sft_rows
from recipes.rl import build_batch, episode_datums, rollout_groups
from recipes.rl_config import RLConfig
from training_core import types
from training_core.futures import APIFuture


def test_problem_env_rewards_and_failure() -> None:
    fail = FailureRewards(unparseable=-0.5)
    env = GeneratedProblemEnv("Reverse the digits 1234.", "4321", fail)
    assert env.initial_observation() == [{"role": "user", "content": "Reverse the digits 1234."}]
    r = env.step({"role": "assistant", "content": "Answer: 4321"})
    assert (r.reward, r.done, r.metrics["correct"]) == (1.0, True, 1.0)
    with pytest.raises(RuntimeError, match="single-use"):
        env.step({"role": "assistant", "content": "Answer: 4321"})
    wrong = GeneratedProblemEnv("q", "4321", fail).step({"role": "assistant", "content": "Answer: 4320"})
    assert (wrong.reward, wrong.metrics["correct"]) == (0.0, 0.0)
    bad = GeneratedProblemEnv("q", "4321", fail).step({"role": "assistant", "content": "4321"})
    assert (bad.reward, bad.metrics["unparseable"]) == (-0.5, 1.0)


def test_tool_env_scripted_episode() -> None:
    env = ToolCalcEnv("What is 37*12?", "444", max_turns=3)
    r1 = env.step({"role": "assistant", "content": "CALC: 37*12"})
    assert (r1.done, r1.reward) == (False, 0.0)
    assert r1.next_messages == [{"role": TOOL_ROLE, "content": "RESULT: 444"}]
    r2 = env.step({"role": "assistant", "content": "Answer: 444"})
    assert (r2.done, r2.reward, r2.metrics["correct"], r2.metrics["tool_calls"]) == (True, 1.0, 1.0, 1.0)
    direct_wrong = ToolCalcEnv("What is 37*12?", "444").step({"role": "assistant", "content": "Answer: 440"})
    assert (direct_wrong.done, direct_wrong.reward) == (True, 0.0)
    nonsense = ToolCalcEnv("q", "444", failure=FailureRewards(unparseable=-1.0)).step(
        {"role": "assistant", "content": "hello"})
    assert (nonsense.reward, nonsense.metrics["unparseable"]) == (-1.0, 1.0)
    looping = ToolCalcEnv("q", "444", max_turns=2)
    looping.step({"role": "assistant", "content": "CALC: 1+1"})
    last = looping.step({"role": "assistant", "content": "CALC: 2+2"})  # no turn left to answer
    assert (last.done, last.metrics["unparseable"]) == (True, 1.0)


def test_calculator_is_safe() -> None:
    assert calculate("37*12") == "444" and calculate("(3+4)*-2") == "-14" and calculate("7/2") == "3.5"
    for bad in ("2**100", "__import__('os')", "1/0", "x+1", "9" * 80):
        assert calculate(bad) == "error"


def test_datasets_deterministic_and_disjoint() -> None:
    a, b = GeneratedTaskDataset("reverse", {"length": 4}, 500, 50, seed=3), GeneratedTaskDataset(
        "reverse", {"length": 4}, 500, 50, seed=3)
    assert [x.problem_id for x in a.batch(7, 8)] == [x.problem_id for x in b.batch(7, 8)]
    assert [x.problem_id for x in a.batch(7, 8)] != [x.problem_id for x in a.batch(8, 8)]
    train_ids = {r["id"] for r in a.train_rows}
    assert not train_ids & {x.problem_id for x in a.eval_builders(50)}
    bench = a.eval_benchmark(20)
    assert isinstance(bench.grader, EnvAnswerGrader) and len(bench) == 20
    ex = bench.examples[0]
    assert bench.grader.grade(f"Answer: {ex.target}", ex.target, ex.meta).score == 1.0
    tool_train = {q for q, _ in problems(300, 0, "train")}
    assert not tool_train & {q for q, _ in problems(50, 0, "eval")}
    assert [x.problem_id for x in ToolCalcDataset(300, 20).batch(2, 4)] == \
        [x.problem_id for x in ToolCalcDataset(300, 20).batch(2, 4)]
    row = sft_rows(1)[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", TOOL_ROLE, "assistant"]


def test_benchmark_adapter_uses_the_benchmark_grader() -> None:
    from evals.builtin import arithmetic

    bench = arithmetic(60)
    ds = BenchmarkDataset(bench, eval_percent=50)
    assert set(e.id for e in ds.train_examples).isdisjoint(e.id for e in ds.eval_examples)
    assert ds.eval_benchmark(1000).grader is bench.grader
    ex = ds.train_examples[0]
    for text in (f"The answer is {ex.target}", "The answer is 123456789", "no number"):
        env = BenchmarkProblemEnv(bench, ex)
        got = env.step({"role": "assistant", "content": text})
        assert got.reward == bench.grader.grade(text, ex.target, ex.meta).score
    assert BenchmarkProblemEnv(bench, ex).step({"role": "assistant", "content": "no number"}).metrics["unparseable"] == 1.0


# ---------------------------------------------------------------- rollouts with a scripted model


class ScriptedSampler:
    """Replies with scripted texts (per user question, in turn order), tokenized like a real sample."""

    def __init__(self, tokenizer: Any, script: dict[str, list[str]]) -> None:
        self.tok, self.script = tokenizer, script

    def get_tokenizer(self) -> Any:
        return self.tok

    def sample_batch(self, prompts: list[types.ModelInput], params: types.SamplingParams,
                     num_samples: int = 1) -> APIFuture[list[types.SampleResponse]]:
        from concurrent.futures import Future

        out = []
        for p in prompts:
            text = self.tok.decode(p.to_ints())
            question = next(q for q in self.script if q in text)
            turn = text.count("<|im_start|>assistant") - 1
            reply = self.tok.encode(self.script[question][turn], add_special_tokens=False)
            reply = reply + [self.tok.convert_tokens_to_ids("<|im_end|>")]
            seq = types.SampledSequence("stop", reply, [-0.1] * len(reply))
            out.append(types.SampleResponse([seq] * num_samples))
        f: Future[list[types.SampleResponse]] = Future()
        f.set_result(out)
        return APIFuture(f)


class ExplodingEnv(Env):
    def initial_observation(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": "explode"}]

    def step(self, message: dict[str, str]) -> StepResult:
        raise ValueError("env bug")


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from training_core.model_loading import resolve

    return AutoTokenizer.from_pretrained(resolve("tiny"))


def test_multi_turn_rollout_and_failures_are_counted(tiny_tokenizer: Any) -> None:
    from training_core.renderers import get_renderer

    renderer = get_renderer("chat_template", tiny_tokenizer)
    script = {"What is 37*12?": ["CALC: 37*12", "Answer: 444"], "What is 11*11?": ["Answer: 120"],
              "What is 13*13?": ["I do not know"], "explode": ["boom"]}
    fail = FailureRewards(overflow=-2.0, unparseable=-1.0, error=-3.0)
    builders = [EnvGroupBuilder(lambda q=q, a=a: ToolCalcEnv(q, a, 3, fail), q)
                for q, a in (("What is 37*12?", "444"), ("What is 11*11?", "121"), ("What is 13*13?", "169"))]
    builders.append(EnvGroupBuilder(ExplodingEnv, "boom"))
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=0)
    groups = rollout_groups(ScriptedSampler(tiny_tokenizer, script), renderer, builders, 2, params, 1024, fail)
    assert [[ep.reward for ep in g] for g in groups] == [[1.0, 1.0], [0.0, 0.0], [-1.0, -1.0], [-3.0, -3.0]]
    tool_ep = groups[0][0]
    assert [m["role"] for m in tool_ep.messages] == ["user", "assistant", TOOL_ROLE, "assistant"]
    assert tool_ep.messages[2]["content"] == "RESULT: 444" and len(tool_ep.turns) == 2
    # the second turn's prompt is the first turn's transcript re-rendered, ending in the tool's result
    assert "RESULT: 444" in tiny_tokenizer.decode(tool_ep.turns[1].prompt_tokens)
    # ... and extends turn 1's prompt + sampled tokens, so the episode trains as one sequence
    (datum, pos), = episode_datums(tool_ep.turns, 1.0)
    assert datum.model_input.length == len(tool_ep.turns[1].prompt_tokens) + len(tool_ep.turns[1].tokens) - 1
    assert len(pos) == sum(len(t.tokens) for t in tool_ep.turns)
    _, _, _, m = build_batch(groups, RLConfig())
    assert (m["unparseable_count"], m["error_count"], m["overflow_count"], m["zero_var_groups"]) == (2, 2, 0, 4)
    # a context too small for prompt + max_tokens: the defined overflow reward, counted, no crash
    over = rollout_groups(ScriptedSampler(tiny_tokenizer, script), renderer, builders[:1], 2, params, 20, fail)
    assert [ep.reward for ep in over[0]] == [-2.0, -2.0]
    assert build_batch(over, RLConfig())[3]["overflow_count"] == 2


def test_eval_episodes_gives_a_comparable_eval_result(tiny_tokenizer: Any) -> None:
    from evals.compare import compare
    from recipes.rl_eval import eval_episodes

    cfg = RLConfig()
    cfg.env.name, cfg.env.max_context = "tool_calc", 1024
    qa = problems(6, cfg.env.seed, "eval")
    # model A answers directly and wrongly; model B uses the tool on the first four problems
    a = ScriptedSampler(tiny_tokenizer, {q: ["Answer: 0"] for q, _ in qa})
    b = ScriptedSampler(tiny_tokenizer, {q: ([f"CALC: {q[8:-1]}", f"Answer: {ans}"] if i < 4 else ["Answer: 0"])
                                         for i, (q, ans) in enumerate(qa)})
    ra, rb = eval_episodes(cfg, a, "A", n=6), eval_episodes(cfg, b, "B", n=6)
    assert [r.score for r in rb.benchmarks["target"].records.values()] == [1.0] * 4 + [0.0] * 2
    assert ra.means() == {"target": 0.0} and rb.benchmarks["target"].protocol_hash == ra.benchmarks["target"].protocol_hash
    report = compare(ra, rb)
    assert report.comparisons[0].n == 6 and report.comparisons[0].diff == pytest.approx(4 / 6)
