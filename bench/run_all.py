"""Run the benchmark suite and print one table of its headline figures against the issue's goals.

    python -m bench.run_all [--all] [--quick] [--only train,sampling]

Each benchmark runs in its own fresh process (``python -m bench.<name>``), merges its figures into
``bench/results.json`` itself (``bench.common.merge_results``), and this script then reads back the figures
measured during this run. ``--all`` adds ``bench_zero3_memory`` (multi-process DeepSpeed; slow).
``--quick`` shortens the training and eval benches (fewer rounds / prompts). The eval bench runs with 16
prompts (batch 16) here rather than its default 32, to keep the whole suite under ~10 minutes.
A benchmark that fails is reported and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import REPO_ROOT, print_table

RESULTS = REPO_ROOT / "bench" / "results.json"
BENCHES = ("train", "sampling", "eval", "service", "eval_real")
# long (TRL sides, 1M rows, whole pipeline runs): `--all` or `--only`
OPTIONAL = ("zero3_memory", "rl", "dpo", "distill", "data", "sweep")

# figure -> (goal text, check(value, all figures))
GOALS: dict[str, tuple[str, Any]] = {
    "train_tokens_per_s_ratio_vs_trl": (">= 1.5", lambda v, f: v >= 1.5),
    "train_tokens_per_s_ratio_vs_trl_no_ckpt": ("(>= 1.5)", lambda v, f: v >= 1.5),
    "train_tokens_per_s_ratio_vs_plain_loop": (">= 1.2", lambda v, f: v >= 1.2),
    "train_fraction_of_bf16_peak": (">= 0.35", lambda v, f: v >= 0.35),
    "time_to_first_step_s_ours": ("<= TRL's", lambda v, f: v <= f.get("time_to_first_step_s_trl", float("inf"))),
    "time_to_first_step_s_trl": ("", None),
    "sample_tokens_per_s_ratio_vs_generate": (">= 2", lambda v, f: v >= 2),
    "mc_eval_examples_per_s_ratio_vs_lm_eval": (">= 3", lambda v, f: v >= 3),
    "mc_eval_dense_examples_per_s_ratio_vs_lm_eval": (">= 3", lambda v, f: v >= 3),
    "gen_eval_examples_per_s_ratio_vs_generate_loop": ("", None),
    "service_step_time_ratio_vs_inprocess": ("<= 1.10", lambda v, f: v <= 1.10),
    "service_sample_time_ratio_vs_inprocess": ("<= 1.15", lambda v, f: v <= 1.15),
    "rl_iteration_tokens_per_s_ratio_vs_trl_grpo": (">= 2", lambda v, f: v >= 2),
    "rl_sampler_tokens_per_s_ratio_vs_generate_bs16": ("", None),
    "rl_sampler_tokens_per_s_ratio_vs_generate_bs64": ("", None),
    "rl_sampler_tokens_per_s_ratio_vs_generate_bs128": ("", None),
    "dpo_step_tokens_per_s_ratio_vs_trl": (">= 1.5", lambda v, f: v >= 1.5),
    "data_prepare_rows_per_s_ratio": (">= 2", lambda v, f: v >= 2),
    "data_prepare_peak_rss_mib_1m": ("< 2048", lambda v, f: v < 2048),
    "sweep_overhead_ratio": ("<= 1.05", lambda v, f: v <= 1.05),
}


def _args_for(name: str, quick: bool) -> list[str]:
    if name == "rl" and quick:
        return ["--rounds", "1", "--warmup", "1", "--sampler-repeats", "1", "--trl-precisions", "bf16"]
    if name == "train" and quick:
        return ["--rounds", "4", "--warmup", "1", "--ttfs-repeats", "1"]
    if name == "eval":  # its one-prompt-at-a-time arm dominates: 16 prompts keep the suite under ~10 min
        return ["--n", "8" if quick else "16", "--batch-size", "8" if quick else "16"]
    if name == "eval_real":  # ~3 + ~4 minutes on 2 cores; --quick: a smoke-sized run
        return ["--mc-n", "8", "--gen-n", "4", "--chunks", "2"] if quick else ["--mc-n", "60", "--gen-n", "16", "--chunks", "2"]
    if name == "service" and quick:
        return ["--rounds", "3", "--steps", "2"]
    if name == "zero3_memory" and quick:
        return ["--quick"]
    return []


def _measured_since(start: str) -> dict[str, Any]:
    if not RESULTS.exists():
        return {}
    data = json.loads(RESULTS.read_text())
    times = data.get("_meta", {}).get("measured_at", {})
    return {k: v for k, v in data.items() if k != "_meta" and times.get(k, "") >= start}


def _rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    flat: dict[str, Any] = {}
    for k, v in figures.items():
        if isinstance(v, bool | int | float | str):
            flat[k] = v
        elif isinstance(v, dict) and not k.endswith(("_setup", "_all")):  # one level of a section, scalars only
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, int | float | str)})
    rows = []
    for k in sorted(flat, key=lambda k: (k not in GOALS, k)):
        goal, check = GOALS.get(k, ("", None))
        ok = "" if check is None or not isinstance(flat[k], int | float) else ("yes" if check(flat[k], flat) else "NO")
        rows.append({"figure": k, "value": flat[k], "goal": goal, "met": ok})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="also run the optional benches: " + ", ".join(OPTIONAL))
    ap.add_argument("--quick", action="store_true", help="shorter runs (noisier)")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(BENCHES + OPTIONAL))
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    if args.all and not args.only:
        names += [n for n in OPTIONAL if (REPO_ROOT / "bench" / f"bench_{n}.py").exists()]
    start = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    status: list[dict[str, Any]] = []
    for name in names:
        cmd = [sys.executable, "-m", f"bench.bench_{name}", *_args_for(name, args.quick)]
        print(f"== {' '.join(cmd[1:])}  (load {os.getloadavg()[0]:.1f})", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
        status.append({"bench": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)})
    print()
    print_table(status)
    print()
    print_table(_rows(_measured_since(start)))
    print(f"\nfull results: {RESULTS}  (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return 1 if any(s["rc"] != 0 for s in status) else 0


if __name__ == "__main__":
    sys.exit(main())
