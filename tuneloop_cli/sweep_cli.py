"""`tuneloop sweep sft|rl|dpo --config base.yaml --space space.yaml [--trials N] [--parallel K] [--sampler S]`.

Light at import (argparse only): Optuna, Prefect and torch load when the command runs. Rerunning the same
command continues the sweep (same sweep id); `--sweep-id` names one explicitly. Exit codes: 0 done (1 with
--fail-on-gate when the confirmed winner fails the gate), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_sweep(args: argparse.Namespace) -> int:
    from flows.sweep_config import load_space, recipe_config
    from infra.config import load_config, to_dict
    from tuneloop_cli.env import ensure_state_dirs

    cfg_cls = recipe_config(args.recipe)  # the config only: inputs are checked before anything is written
    cfg = load_config(cfg_cls, args.config, list(args.overrides or []))
    spec = load_space(args.space, trials=args.trials, parallel=args.parallel, sampler=args.sampler)
    ensure_state_dirs()
    from flows.sweep import format_sweep_summary, run_sweep

    space = spec.to_dict()
    res = run_sweep(args.recipe, to_dict(cfg), space, sweep_id=args.sweep_id)
    print()
    print(res.leaderboard_table)
    print()
    print(res.extra["confirmation_table"])
    print()
    print(format_sweep_summary(res))
    if args.fail_on_gate and not res.gate_passed:
        print("tuneloop: the confirmed winner failed the gate: exit 1", file=sys.stderr)
        return 1
    return 0


def add_sweep_command(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="hyperparameter sweep: Optuna search, paired leaderboard, "
                              "confirmation split", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe (flows/sweep_config.RECIPES): sft, rl or dpo")
    p.add_argument("--config", help="base config YAML of the recipe")
    p.add_argument("--space", required=True, help="search space YAML (see examples/sweep/space.yaml)")
    p.add_argument("--trials", type=int, help="total trials (default: the space's)")
    p.add_argument("--parallel", type=int, help="trials at once (default: the space's)")
    p.add_argument("--sampler", choices=["grid", "random", "tpe"], help="default: the space's")
    p.add_argument("--sweep-id", help="name of the sweep (default: derived from recipe, config and space)")
    p.add_argument("--fail-on-gate", action="store_true", help="exit 1 when the confirmed winner fails the gate")
    p.add_argument("overrides", nargs="*", help="base config overrides a.b=value")
    p.set_defaults(func=cmd_sweep)


def main(argv: list[str] | None = None) -> int:
    """`python -m tuneloop_cli.sweep_cli sweep sft ...` (the same command before it is wired into `tuneloop`)."""
    from tuneloop_cli.env import apply_env_defaults

    apply_env_defaults(create_dirs=False)
    ap = argparse.ArgumentParser(prog="tuneloop")
    add_sweep_command(ap.add_subparsers(dest="command", required=True))
    args, extra = ap.parse_known_args(argv)
    # argparse gives a trailing nargs="*" positional nothing once options came between: k=v leftovers are the
    # overrides wherever they stand (tuneloop_cli.main does the same)
    if extra and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
