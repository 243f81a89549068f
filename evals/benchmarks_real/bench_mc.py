"""Log-likelihood MC throughput: `HFLoglikScorer.batch_choice_logprobs` (shared few-shot prefix KV cache,
batched suffixes, LM head only at scored positions) vs a plain transformers loop (one full forward per
choice, what a hand-written eval does), on the same model and examples; the scores must agree.

    python -m evals.benchmarks_real.bench_mc smollm2-135m --benchmark mmlu --limit 40

The comparison against lm-evaluation-harness 0.4.13 itself (`hf` backend, same examples fed from a local
file) is `bench/bench_eval_real.py` (`mc_eval_examples_per_s_ratio_vs_lm_eval`); note that lm-eval already
runs one context pass for all single-token continuations such as MMLU's letters, so the gain over it is
smaller than over this loop. The prefix sharing needs several examples per MMLU subject: a `--limit`
under 57 (one per subject) shows only the LM-head saving.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from evals.benchmarks_real.loaders import real_benchmark
from evals.benchmarks_real.loglik import HFLoglikScorer, mc_metrics


def plain_loop_logprobs(model: Any, scorer: HFLoglikScorer, context: str, conts: list[str]) -> list[float]:
    import torch

    out = []
    for c in conts:
        ctx, cont = scorer.encode_pair(context, c)
        with torch.inference_mode():
            lp = model(input_ids=torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
        out.append(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--benchmark", default="mmlu")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from training_core.model_loading import load_base

    base = load_base(args.model)
    scorer = HFLoglikScorer(base.model, base.tokenizer, args.model, max_length=base.max_length)
    bench = real_benchmark(args.benchmark, args.limit, args.seed)
    items = [(e.messages[0]["content"], [e.meta["delimiter"] + str(c) for c in e.meta["choices"]], e) for e in bench.examples]
    scorer.choice_logprobs(items[0][0], items[0][1])  # warm-up (allocator, kernels)

    def timed(fn: Any) -> tuple[float, list[list[float]]]:
        t = time.perf_counter()
        res = [fn(ctx, conts) for ctx, conts, _ in items]
        return time.perf_counter() - t, res

    t = time.perf_counter()
    ours = scorer.batch_choice_logprobs([(ctx, conts) for ctx, conts, _ in items])  # shares few-shot prefixes
    t_ours = time.perf_counter() - t
    t_plain, plain = timed(lambda ctx, conts: plain_loop_logprobs(base.model, scorer, ctx, conts))
    acc = [mc_metrics(lp, list(e.meta["choices"]), int(e.target))[bench.primary] for lp, (_, _, e) in zip(ours, items, strict=True)]
    acc_p = [mc_metrics(lp, list(e.meta["choices"]), int(e.target))[bench.primary] for lp, (_, _, e) in zip(plain, items, strict=True)]
    max_diff = max(abs(a - b) for x, y in zip(ours, plain, strict=True) for a, b in zip(x, y, strict=True))
    print(json.dumps({
        "benchmark": args.benchmark, "n": len(items), "model": args.model, "metric": bench.primary,
        "score_shared_context": sum(acc) / len(acc), "score_plain_loop": sum(acc_p) / len(acc_p),
        "max_abs_logprob_diff": max_diff, "examples_per_s_shared_context": len(items) / t_ours,
        "examples_per_s_plain_loop": len(items) / t_plain, "mc_eval_examples_per_s_ratio_vs_plain_loop": t_plain / t_ours,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
