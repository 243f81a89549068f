"""Sweep overhead: K trials through `flows.sweep` vs the same K pipeline runs launched one after another.

    python -m bench.bench_sweep [--trials 3] [--steps 20] [--no-write]

Figures (bench/results.json, key "sweep"):
- `sweep_overhead_ratio`: wall time of the whole sweep at --parallel 1 (data split, study, K trials, the
  leaderboard, the confirmation re-scoring, the report) / wall time of the same K `sft_pipeline` runs by hand
  (same configs, same materialised data, same process and Prefect server). Goal <= 1.05.
- `sweep_overhead_ratio_trials`: the same with the sweep's end (confirmation + report) left out: the cost of
  orchestrating the trials alone.
- `parallel2_speedup`: sweep wall at --parallel 1 / at --parallel 2 (a fresh sweep id: nothing reused).
Manual runs are timed before and after the sweep (the mean is the reference) because the machine is shared.
Trade-off: small trials (tiny preset, few steps), so fixed per-sweep costs weigh more than in real sweeps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import merge_results, print_table


def _base(tmp: Path, steps: int) -> dict[str, Any]:
    from flows.sft_config import PipelineConfig
    from infra.config import load_config, to_dict

    cfg = load_config(PipelineConfig, None, [
        "data.n_train=256", "data.n_eval=64", "data.replay=", "eval.batch_size=32", "train.batch_size=8",
        f"train.steps={steps}", "train.warmup_steps=2", f"train.save_every={steps}", "train.eval_loss_examples=16",
        "eval.guard_examples=16", "eval.bootstrap_resamples=500", "registry_model=",
        f"run_root={tmp}/runs", f"tracking_uri=sqlite:///{tmp}/mlflow.db"])
    return to_dict(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from tuneloop_cli.env import apply_env_defaults

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    apply_env_defaults()
    from prefect import flow

    from flows.sft_config import PipelineConfig
    from flows.sft_pipeline import sft_pipeline
    from flows.sweep import run_sweep
    from flows.sweep_config import load_space, materialise_splits, set_dotted, trial_overrides
    from infra.config import from_dict, to_dict

    lrs = [1e-3, 3e-3, 1e-2, 3e-2, 3e-4, 2e-3][: args.trials]
    space = {"sampler": "grid", "trials": args.trials, "pruner": "none", "seed": 0,
             "params": {"train.learning_rate": {"values": lrs}}}
    base = _base(tmp, args.steps)

    @flow
    def warm() -> int:  # the ephemeral Prefect server starts here, outside every timing
        return 1

    warm()
    spec = load_space(None, **space)
    cfg = from_dict(PipelineConfig, base)
    # the sweep's own split (same files it will use), so manual runs do exactly the trials' work
    splits = materialise_splits(cfg, tmp / "manual-data", spec.confirmation_fraction, spec.seed)
    over = trial_overrides(splits, len(splits.selection_ids))

    def manual(tag: str) -> float:
        t0 = time.time()
        for i, lr in enumerate(lrs):
            c = to_dict(cfg)
            for k, v in {**over, "train.learning_rate": lr}.items():
                set_dotted(c, k, v)
            sft_pipeline(c, run_name=f"manual-{tag}-{i}")
        return time.time() - t0

    m1 = manual("a")
    t0 = time.time()
    r1 = run_sweep("sft", base, {**space, "parallel": 1}, sweep_id="bench-p1")
    s1 = time.time() - t0
    m2 = manual("b")
    t0 = time.time()
    r2 = run_sweep("sft", base, {**space, "parallel": 2}, sweep_id="bench-p2")
    s2 = time.time() - t0
    ref = (m1 + m2) / 2
    end1 = r1.extra["seconds_end"]
    figures = {
        "sweep_overhead_ratio": round(s1 / ref, 3),
        "sweep_overhead_ratio_trials": round((s1 - end1) / ref, 3),
        "parallel2_speedup": round(s1 / s2, 3),
        "trials": args.trials, "steps_per_trial": args.steps, "manual_s": [round(m1, 1), round(m2, 1)],
        "sweep_p1_s": round(s1, 1), "sweep_p1_end_s": round(end1, 1), "sweep_p2_s": round(s2, 1),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "winner_p1": r1.winner, "winner_p2": r2.winner,
    }
    print_table([{k: v for k, v in figures.items() if not isinstance(v, list)}])
    if not args.no_write:
        print("wrote", merge_results({"sweep": figures}))


if __name__ == "__main__":
    main()
