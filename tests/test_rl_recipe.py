"""The RL recipe: group advantages, zero-variance groups, the on-policy importance ratio, the KL term against
an independent reference computation, resume exactness (with overlap) and a short run whose reward rises.

The runs use the random-init `tiny` preset with a dense test env (reward = share of vowels among the reply's
characters), so every group has reward variance and learning shows within a few iterations.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from envs.base import Env, EnvGroupBuilder, StepResult
from envs.registry import register_env
from flows.sft_config import ModelConfig
from recipes.rl import (
    Episode,
    Turn,
    apply_kl_penalty,
    build_batch,
    episode_datums,
    group_advantages,
    importance_ratios,
    train_rl,
    turn_datum,
)
from recipes.rl_config import EnvConfig, RLConfig, RLTrainConfig, WarmupConfig
from training_core import ServiceClient, types


class VowelsEnv(Env):
    """Dense reward: the share of the reply's characters that are vowels."""

    def __init__(self, q: str) -> None:
        self.q = q

    def initial_observation(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.q}]

    def step(self, message: dict[str, str]) -> StepResult:
        text = message["content"]
        share = sum(c in "aeiou" for c in text) / max(len(text), 1)
        return StepResult(share, True, metrics={"correct": float(share > 0.4)})


class VowelsDataset:
    name, single_turn = "vowels", False

    def batch(self, iteration: int, groups_per_batch: int) -> list[EnvGroupBuilder]:
        qs = [f"Write numbers {(iteration * groups_per_batch + i) % 50}." for i in range(groups_per_batch)]
        return [EnvGroupBuilder(lambda q=q: VowelsEnv(q), q) for q in qs]

    def eval_builders(self, n: int) -> list[EnvGroupBuilder]:
        return [EnvGroupBuilder(lambda q=q: VowelsEnv(q), q) for q in (f"Numbers {i}." for i in range(n))]


register_env("test_vowels", lambda c: VowelsDataset())


def _cfg(**rl: Any) -> RLConfig:
    return RLConfig(model=ModelConfig(base_model="tiny", rank=8, lora_alpha=16.0),
                    env=EnvConfig(name="test_vowels", max_tokens=8), warmup=WarmupConfig(steps=0),
                    rl=RLTrainConfig(**{"iterations": 4, "group_size": 4, "groups_per_batch": 4,
                                        "learning_rate": 1e-3, "save_every": 2, **rl}))


def _ep(reward: float, n_prompt: int = 3, n_sampled: int = 2) -> Episode:
    turn = Turn(list(range(1, n_prompt + 1)), [7] * n_sampled, [-0.5] * n_sampled)
    return Episode([{"role": "user", "content": "q"}], [turn], reward, metrics={"correct": float(reward == 1.0)})


def test_group_advantages_exact() -> None:
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([3.0, 1.0, 2.0]) == [1.0, -1.0, 0.0]
    std = math.sqrt(2 / 3)
    assert group_advantages([3.0, 1.0, 2.0], normalize_std=True, eps=0.0) == pytest.approx([1 / std, -1 / std, 0.0])
    assert group_advantages([0.5, 0.5, 0.5]) is None


def test_batch_centres_groups_and_drops_zero_variance() -> None:
    groups = [[_ep(1.0), _ep(0.0), _ep(0.0), _ep(0.0)], [_ep(1.0)] * 4, [_ep(0.0)] * 4, [_ep(0.25), _ep(0.75)] * 2]
    datums, n_sampled, rows, m = build_batch(groups, RLConfig())
    assert m["zero_var_groups"] == 2 and m["groups"] == 4 and len(datums) == 8 and n_sampled == [[2, 3]] * 8
    got = [d.loss_fn_inputs["advantages"].data for d in datums]
    # prompt of 3 tokens: 2 leading positions carry no advantage, the 2 sampled tokens carry the group's
    want = [[0.0, 0.0, a, a] for a in (0.75, -0.25, -0.25, -0.25, -0.25, 0.25, -0.25, 0.25)]
    assert got == want
    assert datums[0].loss_fn_inputs["logprobs"].data == [0.0, 0.0, -0.5, -0.5]
    assert datums[0].model_input.to_ints() == [1, 2, 3, 7] and datums[0].loss_fn_inputs["target_tokens"].data == [2, 3, 7, 7]
    assert m["reward_mean"] == pytest.approx((1 + 4 + 0 + 2) / 16) and m["pass_rate"] == pytest.approx(5 / 16)
    assert [r["advantage"] for r in rows[:4]] == [0.75, -0.25, -0.25, -0.25]


def test_multi_turn_episode_is_one_datum_when_prompts_extend() -> None:
    t1 = Turn([1, 2], [5, 6], [-0.1, -0.2])
    t2 = Turn([1, 2, 5, 6, 8, 9], [7], [-0.3])  # the re-rendered prompt extends turn 1: one sequence
    (d, pos), = episode_datums([t1, t2], 0.5)
    assert d.model_input.to_ints() == [1, 2, 5, 6, 8, 9] and d.loss_fn_inputs["target_tokens"].data == [2, 5, 6, 8, 9, 7]
    assert pos == [1, 2, 5] and d.loss_fn_inputs["advantages"].data == [0.0, 0.5, 0.5, 0.0, 0.0, 0.5]
    assert d.loss_fn_inputs["logprobs"].data == pytest.approx([0.0, -0.1, -0.2, 0.0, 0.0, -0.3])
    t2b = Turn([1, 2, 4, 8, 9], [7], [-0.3])  # retokenized differently: a datum per turn
    assert [p for _, p in episode_datums([t1, t2b], 0.5)] == [[1, 2], [4]]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with ServiceClient(checkpoint_root=tmp_path_factory.mktemp("ck")) as s:
        yield s


def _sampled_datums(tc: Any, advantage: float = 1.0) -> tuple[list[types.Datum], list[list[int]]]:
    from training_core.renderers import get_renderer

    r = get_renderer("chat_template", tc.get_tokenizer())
    sampler = tc.save_weights_and_get_sampling_client()
    prompts = [r.build_generation_prompt([{"role": "user", "content": f"Say {i}."}]) for i in range(3)]
    outs = sampler.sample_batch(prompts, types.SamplingParams(max_tokens=6, temperature=1.0, seed=1), 2).result()
    datums, n = [], []
    for p, out in zip(prompts, outs, strict=True):
        for s in out.sequences:
            datums.append(turn_datum(Turn(p.to_ints(), s.tokens, s.logprobs or []), advantage))
            T = datums[-1].model_input.length
            n.append(list(range(T - len(s.tokens), T)))
    return datums, n


def test_on_policy_importance_ratio_is_one(service: Any) -> None:
    tc = service.create_lora_training_client("tiny", rank=8, seed=0)
    datums, n = _sampled_datums(tc)
    fwd = tc.forward(datums, "importance_sampling").result()
    ratios = importance_ratios(datums, n, [o["logprobs"].tolist() for o in fwd.loss_fn_outputs])
    assert len(ratios) == sum(map(len, n)) and max(abs(x - 1.0) for x in ratios) < 1e-4


def test_kl_penalty_matches_reference_formula(service: Any) -> None:
    tc = service.create_lora_training_client("tiny", rank=8, seed=0)
    ref = service.create_lora_training_client("tiny", rank=8, seed=0)  # = the starting weights
    warm, _ = _sampled_datums(tc)
    sft = [types.Datum(d.model_input, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in warm]
    tc.forward_backward(sft, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # the policy now differs from the reference
    datums, n = _sampled_datums(tc, advantage=0.5)
    ref_lp = [o["logprobs"].tolist() for o in ref.forward(datums, "cross_entropy").result().loss_fn_outputs]
    before = [list(d.loss_fn_inputs["advantages"].data) for d in datums]
    kl = apply_kl_penalty(datums, n, ref_lp, kl_coef=0.1)
    # reference: the reference model's logprobs from the sampling path (prompt logprobs), not its forward
    ref_sampler = ref.save_weights_and_get_sampling_client()
    diffs = []
    for d, pos, adv0 in zip(datums, n, before, strict=True):
        full = d.model_input.to_ints() + [d.loss_fn_inputs["target_tokens"].data[-1]]
        plp = ref_sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
        q = d.loss_fn_inputs["logprobs"].data
        T, k = d.model_input.length, len(pos)
        for t in pos:
            diff = q[t] - plp[t + 1]
            diffs.append(diff)
            assert d.loss_fn_inputs["advantages"].data[t] == pytest.approx(adv0[t] - 0.1 * diff, abs=1e-5)
        assert d.loss_fn_inputs["advantages"].data[: T - k] == adv0[: T - k]  # prompt positions untouched
    assert kl == pytest.approx(sum(diffs) / len(diffs), abs=1e-5) and abs(kl) > 1e-3


def _final_params(path: str) -> dict[str, torch.Tensor]:
    with ServiceClient() as s:  # keys without the adapter's name (train<N>), which differs per client
        params = s.create_training_client_from_state(path).trainable_parameters()
        return {re.sub(r"\.train\d+\.", ".", k): v.clone() for k, v in params.items()}


def _rewards(run_dir: Path) -> list[tuple[int, float]]:
    import json

    return [(r["step"], r["reward_mean"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The uninterrupted reference run both resume tests compare with."""
    run = tmp_path_factory.mktemp("rl") / "full"
    return run, train_rl(_cfg(overlap=True), run)


def test_resume_equals_uninterrupted_run_with_overlap(tmp_path: Path, full_run: tuple[Path, Any]) -> None:
    full_dir, full = full_run
    part = train_rl(_cfg(overlap=True), tmp_path / "part", stop_after=3)  # checkpoint at 2, killed after 3
    assert part.checkpoint == "" and len(part.losses) == 3
    resumed = train_rl(_cfg(overlap=True), tmp_path / "part")
    assert resumed.resumed_from == 2 and [s for s, _ in resumed.losses] == [3, 4]  # no update repeated/skipped
    assert _rewards(tmp_path / "part") == _rewards(full_dir) == full.loss_history
    a, b = _final_params(full.checkpoint), _final_params(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full_dir / "rollouts" / "iter-000003.jsonl").read_text().count("\n") == 16


def test_short_run_raises_the_reward(tmp_path: Path) -> None:
    seen: list[dict[str, float]] = []
    res = train_rl(_cfg(iterations=8, save_every=8, groups_per_batch=6), tmp_path / "run",
                   on_iter=lambda i, m: seen.append(m))
    r = [x for _, x in res.loss_history]
    assert len(r) == 8 and sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.1, r
    assert seen[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and seen[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"entropy", "response_len", "sample_tokens_per_s", "train_tokens_per_s", "zero_var_groups"} <= set(seen[0])


_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import tests.test_rl_recipe as t
def on_iter(i, m):
    if i == 3:  # iteration 3 logged, not checkpointed (save_every=2): park here until SIGKILL
        print("READY", flush=True)
        time.sleep(600)
t.train_rl(t._cfg(overlap=True), {run!r}, on_iter=on_iter)
"""


def test_sigkilled_run_resumes_to_the_same_trajectory(tmp_path: Path, full_run: tuple[Path, Any]) -> None:
    import signal
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    full_dir, full = full_run
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=root, run=str(tmp_path / "killed"))],
                             stdout=subprocess.PIPE, cwd=root, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert len(_rewards(tmp_path / "killed")) == 3  # iteration 3 ran but its update is in no checkpoint
    resumed = train_rl(_cfg(overlap=True), tmp_path / "killed")
    assert resumed.resumed_from == 2 and _rewards(tmp_path / "killed") == _rewards(full_dir)
    a, b = _final_params(full.checkpoint), _final_params(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
