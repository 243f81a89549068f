"""bench_rl's correctness checks: group-centred advantages, the same-work guard and ratio arithmetic, and one
real iteration of each side (ours over the engine, TRL's GRPOTrainer in its worker) on the `tiny` preset
doing exactly the same token work with the same on-policy loss value."""

from __future__ import annotations

import pytest

from bench.bench_rl import (
    IterStats,
    OursRlSide,
    RlConfig,
    TrlGrpoSide,
    group_advantages,
    make_problems,
    rl_datum,
    summarize_iterations,
)


def test_group_advantages_centre_each_group_without_scaling() -> None:
    adv = group_advantages([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], 4)
    assert adv == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.25, 0.25, 0.25, -0.75]


def test_rl_datum_puts_advantage_and_logprobs_on_sampled_tokens_only() -> None:
    d = rl_datum([5, 6, 7], [8, 9], [-0.5, -1.5], 2.0)
    assert d.model_input.to_ints() == [5, 6, 7, 8]
    inp = d.loss_fn_inputs
    assert inp["target_tokens"].tolist() == [6, 7, 8, 9]
    assert inp["logprobs"].tolist() == [0.0, 0.0, -0.5, -1.5]
    assert inp["advantages"].tolist() == [0.0, 0.0, 2.0, 2.0]


def test_summary_ratio_shares_and_same_work_guard() -> None:
    cfg = RlConfig(groups=2, group_size=2, max_tokens=4)
    ours = [IterStats(1.0, 0.25, 16, 40, 0.0, 1.0), IterStats(2.0, 0.5, 16, 44, 0.0, 0.0)]
    trl = [IterStats(3.0, 1.5, 16, 40, 0.0, 1.0), IterStats(6.0, 3.0, 16, 44, 0.0, 0.0)]
    res = summarize_iterations(cfg, {"ours_bf16": ours, "trl_fp32": trl}, rounds=2, warmup=0)
    assert res["rl_iteration_tokens_per_s_ratio_vs_trl_grpo"] == 3.0
    assert res["rl_iteration_sampling_share_ours"] == 0.25
    assert res["rl_iteration_sampling_share_trl_grpo"] == 0.5
    # tokens = sampled + trained (prompt + completion): 2 * 16 + 40 = 72 in round one, 76 in round two
    assert res["rl_iteration_bench_setup"]["tokens_per_iter_all"]["ours_bf16"] == [72, 76]
    bad = [IterStats(3.0, 1.5, 15, 40, 0.0, 1.0), IterStats(6.0, 3.0, 16, 44, 0.0, 0.0)]
    with pytest.raises(AssertionError, match="same|differ"):
        summarize_iterations(cfg, {"ours_bf16": ours, "trl_fp32": bad}, rounds=2, warmup=0)


def test_ours_and_trl_grpo_do_the_same_work_per_iteration() -> None:
    from training_core.presets import resolve_model_path

    path = resolve_model_path("tiny")
    cfg = RlConfig(model="tiny", groups=2, group_size=2, max_tokens=4, threads=1)
    cfg.prompts, cfg.answers = make_problems(path, 2)
    ours = OursRlSide(cfg, "fp32")
    trl = TrlGrpoSide(cfg, path, iterations=1, precision="fp32")
    try:
        a, b = ours.iteration(), trl.iteration()
    finally:
        ours.close()
        trl.close()
    from transformers import AutoTokenizer

    prompt_lens = [len(x) for x in AutoTokenizer.from_pretrained(path)(text=cfg.prompts)["input_ids"]]
    assert a.completion_tokens == b.completion_tokens == 2 * 2 * 4  # exactly max_tokens per sample, EOS off
    assert a.prompt_tokens == b.prompt_tokens == 2 * sum(prompt_lens)  # same tokenization of the same prompts
    # On-policy (ratio 1 in fp32) with group-centred advantages and equal lengths, both losses are
    # -sum_t A_t (ours) and -mean_t A_t (TRL dapo): 0 up to fp32 rounding of the ratio.
    assert abs(a.loss) < 1e-4 and abs(b.loss) < 1e-4
    assert 0 < a.sample_s < a.total_s and 0 < b.sample_s < b.total_s
