"""Sweep overhead: K trials through `flows.sweep` vs the same K pipeline runs launched one after another.

    python -m bench.bench_sweep [--trials 3] [--steps 80] [--rounds 3] [--no-write]

Trials are sized like the default sweep's (examples/sweep/base.yaml: tiny preset, 2000 training rows, 200 eval
rows split 100/100, 80 steps, periodic eval every 20 steps, 50-example guards); only the learning rate varies
(a grid of K values), no pruning (a pruned trial would do less work than its by-hand twin), no registry.

Figures (bench/results.json, key "sweep"):
- `sweep_overhead_ratio`: wall time of the whole sweep at --parallel 1 (split, study, K trials, leaderboard,
  confirmation re-scoring of base / winner / runner-up, report) / wall time of the same K `sft_pipeline` runs
  by hand (same configs, same materialised data, same process and Prefect server). Goal <= 1.05.
- `sweep_overhead_ratio_trials`: the same without the sweep's end phase (the cost of orchestrating trials).
- `parallel2_speedup`: sweep wall at --parallel 1 / at --parallel 2 (a fresh sweep id: nothing reused).
- `loadavg_1m_mean|max_<phase>` (manual, sweep_p1, sweep_p2): the 1-minute load average sampled every 5 s
  (the machine is shared: other processes' load changes every timing).
By-hand runs and p1 sweeps alternate for `--rounds` rounds (medians are the figures) because load drifts; an
untimed short run on the same data first fills the prepared-data cache (else the first timed side pays it).
What the sweep saves against the by-hand runs: trials after the first reuse the base model's stored results
(same model, examples and protocol: flows/sweep._base_key) and the confirmation re-scoring reuses the trials'
guard results; what it adds: Optuna, the parent run, MLflow child tagging, the end phase.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import merge_results, print_table

ROOT = Path(__file__).resolve().parents[1]


class LoadSampler:
    """1-minute load average every `every` seconds, grouped by the current phase."""

    def __init__(self, every: float = 5.0) -> None:
        self.phase, self.samples, self.every = "setup", {}, every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.setdefault(self.phase, []).append(os.getloadavg()[0])

    def figures(self) -> dict[str, float]:
        self._stop.set()
        out = {}
        for ph, xs in self.samples.items():
            out[f"loadavg_1m_mean_{ph}"] = round(statistics.mean(xs), 2)
            out[f"loadavg_1m_max_{ph}"] = round(max(xs), 2)
        return out


def _base(tmp: Path, steps: int) -> dict[str, Any]:
    from flows.sft_config import PipelineConfig
    from infra.config import load_config, to_dict

    cfg = load_config(PipelineConfig, str(ROOT / "examples/sweep/base.yaml"), [
        f"train.steps={steps}", f"train.save_every={max(1, steps // 2)}", "registry_model=",
        f"run_root={tmp}/runs", f"tracking_uri=sqlite:///{tmp}/mlflow.db"])
    return to_dict(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3, help="by-hand / sweep pairs, interleaved (medians reported)")
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
    from flows.sweep_config import load_space, set_dotted, split_sft
    from infra.config import from_dict, to_dict

    load = LoadSampler()
    lrs = [1e-3, 2e-3, 4e-3, 3e-4, 3e-3, 6e-3][: args.trials]
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
    splits = split_sft(cfg, tmp / "manual-data", spec.confirmation_fraction, spec.seed)

    def manual(tag: str) -> float:
        load.phase = "manual"
        t0 = time.time()
        for i, lr in enumerate(lrs):
            c = to_dict(cfg)
            for k, v in {**splits.overrides, "train.learning_rate": lr}.items():
                set_dotted(c, k, v)
            sft_pipeline(c, run_name=f"manual-{tag}-{i}")
        return time.time() - t0

    # untimed: one short run on the same data fills the prepared-data cache and loads the code paths, so the
    # first timed side does not pay one-time costs the others skip
    c = to_dict(cfg)
    for k, v in {**splits.overrides, "train.steps": 2, "train.save_every": 2}.items():
        set_dotted(c, k, v)
    sft_pipeline(c, run_name="warmup")
    manual_s, sweep_s, end_s, trial_s = [], [], [], []
    for r in range(args.rounds):  # interleaved: load drift on the shared machine hits both sides alike
        manual_s.append(manual(f"r{r}"))
        load.phase = "sweep_p1"
        t0 = time.time()
        r1 = run_sweep("sft", base, {**space, "parallel": 1}, sweep_id=f"bench-p1-r{r}")
        sweep_s.append(time.time() - t0)
        end_s.append(r1.extra["seconds_end"])
        trial_s.append([round(t.seconds, 1) for t in r1.trials])
    load.phase = "sweep_p2"
    t0 = time.time()
    r2 = run_sweep("sft", base, {**space, "parallel": 2}, sweep_id="bench-p2")
    s2 = time.time() - t0
    ref, s1, end1 = statistics.median(manual_s), statistics.median(sweep_s), statistics.median(end_s)
    figures = {
        "sweep_overhead_ratio": round(s1 / ref, 3),
        "sweep_overhead_ratio_trials": round((s1 - end1) / ref, 3),
        "parallel2_speedup": round(s1 / s2, 3),
        "trials": args.trials, "steps_per_trial": args.steps, "rounds": args.rounds,
        "manual_s": [round(x, 1) for x in manual_s], "sweep_p1_s_all": [round(x, 1) for x in sweep_s],
        "sweep_p1_s": round(s1, 1), "sweep_p1_end_s": round(end1, 1), "sweep_p2_s": round(s2, 1),
        "sweep_p1_trial_s": trial_s, "winner_p1": r1.winner, "winner_p2": r2.winner, **load.figures(),
    }
    print_table([{k: v for k, v in figures.items() if not isinstance(v, list)}])
    if not args.no_write:
        print("wrote", merge_results({"sweep": figures}))


if __name__ == "__main__":
    main()
