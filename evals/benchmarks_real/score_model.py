"""Score a base model on real benchmarks without the CLI (a preset, a local HF dir):

    python -m evals.benchmarks_real.score_model smollm2-135m --benchmarks arc_easy,hellaswag,piqa,mmlu --limit 200

Prints one line per benchmark (mean with a 95% bootstrap CI, the other MC metric, examples/s) and,
with --results-dir, stores per-example results that `tuneloop compare` reads.
"""

from __future__ import annotations

import argparse
import json
import time

from evals.benchmarks_real.loglik import LoglikMCBenchmark, secondary_mean
from evals.benchmarks_real.run import evaluate_suite, resolve_benchmark
from evals.protocols import EvalProtocol
from evals.store import ResultStore


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="preset name or local model directory")
    ap.add_argument("--benchmarks", default="arc_easy,hellaswag,piqa,mmlu")
    ap.add_argument("--limit", type=int, default=None, help="seeded, stratified subset size per benchmark")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from training_core import ServiceClient
    from training_core.textgen import SamplingGenerator

    gen = SamplingGenerator(ServiceClient().create_sampling_client(base_model=args.model), f"base:{args.model}")
    store = ResultStore(args.results_dir) if args.results_dir else None
    rows = []
    for name in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
        bench = resolve_benchmark(name, limit=args.limit, seed=args.seed)
        t = time.perf_counter()
        res = evaluate_suite(gen, [bench], EvalProtocol(), store).benchmarks[bench.name]
        dt = time.perf_counter() - t
        ci = res.ci()
        row = {"benchmark": name, "n": len(res.records), "metric": getattr(bench, "primary", bench.grader.name
                                                                           if hasattr(bench, "grader") else ""),
               "mean": res.mean, "ci_low": ci.low, "ci_high": ci.high, "seconds": dt,
               "examples_per_s": len(res.records) / dt if dt > 0 else float("nan"), "protocol_hash": res.protocol_hash}
        if isinstance(bench, LoglikMCBenchmark):
            other = "acc" if bench.primary == "acc_norm" else "acc_norm"
            row[other] = secondary_mean(res, other)
        rows.append(row)
        if not args.json:
            extra = f" {other}={row[other]:.3f}" if isinstance(bench, LoglikMCBenchmark) else ""
            print(f"{name:14s} n={row['n']:5d} {row['metric']}={row['mean']:.3f} [{ci.low:.3f}, {ci.high:.3f}]"
                  f"{extra} {row['examples_per_s']:.2f} ex/s protocol={row['protocol_hash']}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
