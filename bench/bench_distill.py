"""On-policy distillation throughput, and on-policy vs off-policy at the same number of student tokens.

    python -m bench.bench_distill [--rounds 6] [--compare [--token-budget 30000]] [--no-write] [--results F]

Iteration bench: the default distillation config (reference teacher and student on the `tiny` preset: 8 prompts
x 4 samples of up to 12 tokens per step) run through `recipes.distill.train_distill`, one warm-up step then
`--rounds` timed steps. Each step is timed by phase inside the recipe: student sampling (snapshot + batched
KV-cache sampling), teacher scoring (`forward` of prompt + completion through the frozen teacher), update
(`forward_backward` importance_sampling + `optim_step`). Figures (medians over the rounds):
`distill_onpolicy_iter_tokens_per_s` = completion tokens per step / step time (sample + score + update), the
per-phase tokens/s (sampling: completion tokens; scoring and update: prompt + completion tokens) and each
phase's share of the step.

`--compare`: both modes from the same student with the same teacher, prompts and hyperparameters, stopped at the
same student-token budget (`train.max_student_tokens`: completion tokens trained on), then the student before,
after each mode and the teacher evaluated on the same held-out problems: score, gap closed, wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import merge_results, print_table


def _cfg(**overrides: Any) -> Any:
    from recipes.distill_config import DistillConfig

    cfg = DistillConfig()
    for k, v in overrides.items():
        section, _, name = k.partition("__")
        setattr(getattr(cfg, section) if name else cfg, name or section, v)
    return cfg


def iteration_bench(rounds: int) -> dict[str, Any]:
    from recipes.distill import reference_models, train_distill

    cfg = _cfg(train__steps=rounds + 1, train__save_every=10_000)
    reference_models(cfg)  # built (or found in the cache) before any timing
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        train_distill(cfg, Path(tmp) / "run", on_iter=lambda step, m: rows.append(m))
    timed = rows[1:]  # the first step pays one-off costs (sampler weights packing, allocator warm-up)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed)

    step_s = [r["sample_s"] + r["teacher_s"] + r["update_s"] for r in timed]
    total = statistics.median(step_s)
    out = {
        "distill_onpolicy_iter_tokens_per_s": statistics.median(r["step_tokens"] / s for r, s in zip(timed, step_s,
                                                                                                    strict=True)),
        "distill_onpolicy_iter_s": total,
        "distill_onpolicy_completion_tokens_per_iter": med("step_tokens"),
        "distill_onpolicy_sample_tokens_per_s": med("sample_tokens_per_s"),
        "distill_onpolicy_teacher_tokens_per_s": med("teacher_tokens_per_s"),
        "distill_onpolicy_update_tokens_per_s": med("update_tokens_per_s"),
        "distill_onpolicy_share_sample": med("sample_s") / total,
        "distill_onpolicy_share_teacher": med("teacher_s") / total,
        "distill_onpolicy_share_update": med("update_s") / total,
        "distill_onpolicy_setup": {"rounds": len(timed), "prompts_per_step": cfg.distill.prompts_per_step,
                                   "group_size": cfg.distill.group_size, "max_tokens": cfg.distill.max_tokens,
                                   "model": cfg.model.base_model},
    }
    print_table([{"phase": p, "tokens/s": out[f"distill_onpolicy_{k}_tokens_per_s"],
                  "share": out[f"distill_onpolicy_share_{k}"]}
                 for p, k in (("student sampling", "sample"), ("teacher scoring", "teacher"), ("update", "update"))])
    print(f"one iteration: {total:.2f} s, {out['distill_onpolicy_iter_tokens_per_s']:.0f} completion tokens/s")
    return out


def compare_modes(token_budget: int, steps: int) -> dict[str, Any]:
    from evals.compare import GatePolicy, compare
    from recipes.distill import evaluate_models, gap_closed, reference_models, train_distill

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {}
        for mode in ("on_policy", "off_policy"):
            cfg = _cfg(mode=mode, train__steps=steps, train__max_student_tokens=token_budget)
            teacher, student = reference_models(cfg)
            t0 = time.perf_counter()
            res = train_distill(cfg, Path(tmp) / mode)
            wall = time.perf_counter() - t0
            hist = Path(res.metrics_path).read_text().splitlines()
            ckpts[mode] = res.checkpoint
            results[mode] = {"wall_s": wall, "steps": res.steps,
                             "student_tokens": int(json.loads(hist[-1])["student_tokens"])}
        evals = evaluate_models(cfg, {"teacher": teacher, "student_before": student or cfg.model.base_model,
                                      **ckpts})
    scores = {k: r.means()["target"] for k, r in evals.items()}
    for mode, r in results.items():
        c = compare(evals["student_before"], evals[mode], GatePolicy(targets=["target"])).by_name()["target"]
        r.update(score_before=scores["student_before"], score_after=scores[mode], teacher=scores["teacher"],
                 gap_closed=gap_closed(scores["student_before"], scores[mode], scores["teacher"]),
                 diff_ci=f"[{c.diff_ci[0]:+.3f}, {c.diff_ci[1]:+.3f}]", p=c.p_adjusted, verdict=c.verdict)
        rows.append({"mode": mode, **r})
    print_table(rows)
    return {"distill_mode_comparison": {"token_budget": token_budget, "n_eval": cfg.eval.n_examples, "rows": rows}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--compare", action="store_true", help="also run both modes at the same token budget")
    ap.add_argument("--token-budget", type=int, default=30_000)
    ap.add_argument("--steps", type=int, default=200, help="upper bound on steps of the --compare runs")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--results", default="bench/results.json", help="JSON file the figures are merged into")
    args = ap.parse_args(argv)
    out = iteration_bench(args.rounds)
    if args.compare:
        out.update(compare_modes(args.token_budget, args.steps))
    if not args.no_write:
        print(f"written to {merge_results(out, args.results)}")
    return out


if __name__ == "__main__":
    main()
