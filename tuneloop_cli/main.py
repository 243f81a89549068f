"""`tuneloop`: the command line.

    tuneloop demo [--quick]              # the SFT pipeline on embedded defaults (a real model; --quick: tiny)
    tuneloop run sft --config c.yaml train.steps=100 model.base_model=smollm2-135m
    tuneloop run sft --run-name my-run   # re-running an unfinished run name resumes it from its checkpoint
    tuneloop run rl | sft-then-rl        # RL from verifiable rewards (alone, or after SFT in one command)
    tuneloop config sft|rl|... [--describe]   # the resolved config as YAML (--describe: each knob's meaning)
    tuneloop data validate FILE [--eval-file E] [overrides]   # the same data checks as `run sft`
    tuneloop eval CHECKPOINT / tuneloop compare A B [C ...]
    tuneloop sweep sft --config base.yaml --space space.yaml --trials 6   # winner re-scored on held-back data
    tuneloop checkpoints list|prune|du, tuneloop services up|down|status, tuneloop deployments ...

Every input (config values, data files, model name, init_from, run name) is checked before anything is
written: a bad one prints one message naming the file, line and field, and exits 2.

Exit codes: 0 success, 1 failure or a failed gate (`--no-fail-on-gate`: exit 0 anyway; `demo` exits 0
on a failed gate unless `--fail-on-gate`),
2 usage / bad input (nothing was written).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# Light imports only at module level: `tuneloop --help` must not load torch / prefect / mlflow / scipy.
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("tuneloop")
_STARTED = time.time()  # wall time of a run is measured from here (Prefect's start-up included)
# `tuneloop demo`: SmolLM2-135M-Instruct learns a skill, guarded by real benchmarks (`--quick`: the tiny preset)
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flows", "demo_real.yaml")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "botocore", "filelock", "prefect.events"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuneloop")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


def _load_sft_config(args: argparse.Namespace) -> Any:
    from flows.sft_config import PipelineConfig
    from infra.config import load_config

    demo = getattr(args, "command", None) == "demo" and not getattr(args, "quick", False)
    return load_config(PipelineConfig, args.config, args.overrides, base=DEMO_CONFIG if demo else None)


def _default_run_name(args: argparse.Namespace, cfg: Any) -> str:
    recipe = "demo" if args.command == "demo" else cfg.name
    return f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run_sft(args: argparse.Namespace) -> int:
    from infra.config import dump_yaml

    cfg = _load_sft_config(args)
    run_name = args.run_name or _default_run_name(args, cfg)
    from flows.preflight import check_sft_run, run_dir_of

    # every input is checked here, before the flow exists: a bad one writes nothing (no run dir, MLflow run,
    # cache entry) and is never retried
    resumes, data = check_sft_run(cfg, run_name)
    for w in data.warnings:
        print(f"data warning: {w}", file=sys.stderr)
    print("config:\n" + "\n".join("  " + x for x in dump_yaml(cfg).splitlines()), flush=True)
    if resumes:
        print(f"resuming run {run_name} from its last checkpoint in {run_dir_of(cfg, run_name).resolve()}",
              flush=True)
    import dataclasses

    from tuneloop_cli.env import ensure_state_dirs

    ensure_state_dirs()
    from flows.sft_pipeline import format_summary, sft_pipeline
    from infra.config import to_dict

    res = sft_pipeline(to_dict(cfg), run_name=run_name, checked=True)
    res = dataclasses.replace(res, seconds=time.time() - _STARTED)  # what the user waited, start-up included
    print()
    print(res.verdict_table)
    print()
    print(format_summary(res))
    if not res.gate_passed and args.fail_on_gate:
        print("tuneloop: the gate failed: exit 1 (--no-fail-on-gate to exit 0)", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def cmd_run_recipe(args: argparse.Namespace) -> int:
    """`tuneloop run <recipe>` for every recipe but sft (whose pre-flight also reports data warnings)."""
    import dataclasses

    from infra.config import dump_yaml, load_config, to_dict
    from tuneloop_cli.pipelines import RECIPES, load

    recipe = RECIPES[args.pipeline]
    cfg = load_config(load(recipe.config), args.config, args.overrides)
    run_name = args.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    resumes = load(recipe.check)(cfg, run_name)  # bad input: exit 2, nothing written
    print("config:\n" + "\n".join("  " + x for x in dump_yaml(cfg).splitlines()), flush=True)
    if resumes:
        print(f"resuming run {run_name} from its last checkpoint", flush=True)
    from tuneloop_cli.env import ensure_state_dirs

    ensure_state_dirs()
    from flows.common import format_summary

    out = load(recipe.flow)(to_dict(cfg), run_name=run_name, checked=True)
    results = list(out) if isinstance(out, tuple) else [out]
    results[-1] = dataclasses.replace(results[-1], seconds=time.time() - _STARTED)
    for res in results:
        print(f"\n== {res.pipeline}: {res.run_name}\n")
        print(res.verdict_table)
        print()
        print(format_summary(res))
    if not all(r.gate_passed for r in results) and args.fail_on_gate:
        print("tuneloop: the gate failed: exit 1 (--no-fail-on-gate to exit 0)", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from infra.config import dump_yaml, load_config
    from tuneloop_cli.pipelines import RECIPES, load

    cfg = load_config(load(RECIPES[args.pipeline].config), args.config, args.overrides)
    print(dump_yaml(cfg, describe=args.describe), end="")
    return EXIT_OK


def cmd_data_validate(args: argparse.Namespace) -> int:
    from infra.config import ConfigError

    overrides = list(args.overrides)
    if args.eval:
        if args.eval_file:
            raise ConfigError("--eval checks FILE as an eval file; --eval-file names the eval file of a training FILE")
    else:
        overrides += [f"data.train_file={args.file}", f"data.eval_file={args.eval_file or ''}"]
    cfg = _load_sft_config(argparse.Namespace(config=args.config, overrides=overrides))
    from flows.preflight import check_data, check_eval_file

    if args.eval:
        res = check_eval_file(cfg, args.file)
        print(f"{args.file}: {res.n_eval} eval rows OK")
        return EXIT_OK
    res = check_data(cfg, require_eval=False)
    for w in res.warnings:
        print(f"warning: {w}")
    what = f" + {args.eval_file}: {res.n_eval} eval rows" if args.eval_file else ""
    print(f"{args.file}: {res.n_train} training rows (replay included) OK{what} "
          f"(model {cfg.model.base_model}, data.max_length={cfg.data.max_length})")
    return EXIT_OK


def cmd_presets_build(args: argparse.Namespace) -> int:
    from training_core.presets import resolve_model_path

    for name in args.names:
        print(f"{name}: {resolve_model_path(name)}")
    return EXIT_OK


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (defaults are embedded)")
    p.add_argument("overrides", nargs="*", help="overrides like train.steps=100 model.rank=16")


def _add_run_args(p: argparse.ArgumentParser, default_name: str, fail_on_gate: bool = True) -> None:
    p.add_argument("--run-name", help=f"run name (default {default_name}-YYYYMMDD-HHMMSS); an existing unfinished "
                   "run of that name resumes from its last checkpoint, a finished one is refused")
    p.add_argument("--fail-on-gate", action=argparse.BooleanOptionalAction, default=fail_on_gate,
                   help="exit 1 when the gate fails (default); --no-fail-on-gate exits 0" if fail_on_gate else
                   "exit 1 when the gate fails (default off for the demo, a showcase: a second `make demo` is "
                   "gated against the first one's champion, cannot beat it and is not promoted)")


def _command_of(argv: list[str] | None) -> str | None:
    """The subcommand named in `argv` (None: build every command group for real, e.g. for tests)."""
    if argv is None:
        return None
    return next((a for a in argv if not a.startswith("-")), "")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI; with `argv`, groups with heavy imports are loaded only when `argv` uses them (fast --help)."""
    command = _command_of(argv)
    ap = argparse.ArgumentParser(prog="tuneloop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging (also after a subcommand)")
    ap.add_argument("--version", action="version", version=f"tuneloop {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the SFT pipeline on embedded defaults: SmolLM2-135M-Instruct learns "
                          "2-digit addition, guarded by ARC-Easy, HellaSwag and held-out text (flows/"
                          "demo_real.yaml); --quick: the tiny random-init preset on digit reversal")
    demo.add_argument("--quick", action="store_true", help="the ~3-minute tiny-preset demo (the SFT defaults)")
    _add_config_args(demo)
    _add_run_args(demo, "demo", fail_on_gate=False)
    demo.set_defaults(func=cmd_run_sft)

    run = sub.add_parser("run", help="run a pipeline")
    rsub = run.add_subparsers(dest="pipeline", required=True)
    sft = rsub.add_parser("sft", help="SFT: data -> train -> checkpoint -> evaluate -> compare -> track",
                          description="Inputs are validated before anything is written (bad input: exit 2). "
                          "Re-running with the same --run-name resumes an unfinished run from its last checkpoint.")
    _add_config_args(sft)
    _add_run_args(sft, "sft")
    sft.set_defaults(func=cmd_run_sft)
    from tuneloop_cli.pipelines import RECIPES

    for r in RECIPES.values():
        if r.name == "sft":
            continue
        rp = rsub.add_parser(r.name, help=r.help, description=f"{r.help}. Inputs are validated before anything is "
                             "written (bad input: exit 2). Re-running with the same --run-name resumes an "
                             "unfinished run from its last checkpoint.")
        _add_config_args(rp)
        _add_run_args(rp, r.name)
        rp.set_defaults(func=cmd_run_recipe)

    cfg = sub.add_parser("config", help="print the resolved config as YAML")
    cfg.add_argument("pipeline", choices=sorted(RECIPES))
    cfg.add_argument("--describe", action="store_true", help="comment every knob with its meaning")
    _add_config_args(cfg)
    cfg.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    val = dsub.add_parser("validate", help="run the checks `run sft` applies to a chat JSONL (exit 2 if bad)")
    val.add_argument("file")
    val.add_argument("--eval", action="store_true", help="FILE is an eval file: rows need an 'answer'")
    val.add_argument("--eval-file", help="the eval file FILE will be trained with (checks leaks between them)")
    _add_config_args(val)
    val.set_defaults(func=cmd_data_validate)
    _register(dsub, "flows.cli", "add_push_command", ["push"])
    _register(dsub, "tuneloop_cli.data_cli", "add_data_stats_command", ["stats"])

    pre = sub.add_parser("presets", help="build local model presets")
    psub = pre.add_subparsers(dest="presets_command", required=True)
    pb = psub.add_parser("build")
    pb.add_argument("names", nargs="+")
    pb.set_defaults(func=cmd_presets_build)

    # evals.cli loads numpy, scipy and matplotlib (~3 s): only for `eval` / `compare` themselves
    if command is None or command in ("eval", "compare"):
        _wire_eval_generators()
        _register(sub, "evals.cli", "add_eval_commands", ["eval", "compare"])
    else:
        sub.add_parser("eval", help="evaluate a checkpoint on a suite (resumable)")
        sub.add_parser("compare", help="paired comparison of two checkpoints / result folders + gate")
    for mod, fn, names in (("infra.retention", "add_checkpoint_commands", ["checkpoints"]),
                           ("infra.services", "add_services_commands", ["services"]),
                           ("flows.cli", "add_flow_commands", ["deployments"]),
                           ("service.cli", "add_serve_commands", ["serve", "keys"]),
                           ("tuneloop_cli.sweep_cli", "add_sweep_command", ["sweep"])):
        _register(sub, mod, fn, names)
    _verbose_everywhere(ap)
    return ap


def _wire_eval_generators() -> None:
    with contextlib.suppress(ImportError):  # a missing evals package is reported by _register
        from evals.cli import set_generator_factory

        def make_generator(spec: str) -> Any:  # lazy: keeps `tuneloop --help` free of torch imports
            from flows.preflight import check_model_or_checkpoint
            from tuneloop_cli.generators import make_generator as make

            check_model_or_checkpoint(spec)  # "not a checkpoint or model dir", not a tokenizer's complaint
            return make(spec)

        set_generator_factory(make_generator)


def _register(sub: Any, module: str, fn: str, names: list[str]) -> None:
    """Register a command group; if its module does not import, its commands say why instead of vanishing."""
    import importlib

    try:
        register: Callable[[Any], Any] = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        why = f"{type(e).__name__}: {e}"
        for name in names:
            p = sub.add_parser(name, help=f"(unavailable: {why})", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=_unavailable(name, module, why))
        return
    register(sub)


def _unavailable(name: str, module: str, why: str) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        print(f"tuneloop: `{name}` is unavailable: importing {module} failed: {why}", file=sys.stderr)
        return EXIT_FAIL

    return run


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """`-v` after a subcommand too (`tuneloop run sft -v`); SUPPRESS keeps a leading `-v` from being reset."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                if not any("-v" in a.option_strings or "--verbose" in a.option_strings for a in child._actions):
                    child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                       help="debug logging")
                _verbose_everywhere(child)


def _is_bad_input(e: BaseException) -> bool:
    from infra.config import BadInputError

    if isinstance(e, BadInputError):
        return True
    mod = sys.modules.get("flows.common")  # a run that finished between pre-flight and the flow
    return mod is not None and isinstance(e, getattr(mod, "RunExistsError", ()))


def main(argv: list[str] | None = None) -> int:
    from tuneloop_cli.env import apply_env_defaults, ensure_state_dirs

    apply_env_defaults(create_dirs=False)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after an option once FILE was read (`data validate F --eval-file E
    # k=v`): key=value leftovers are the command's config overrides wherever they stand
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    try:
        if args.func not in (cmd_run_sft, cmd_run_recipe, cmd_config, cmd_data_validate):  # these write only once inputs are good
            ensure_state_dirs()
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if _is_bad_input(e):
            print(f"tuneloop: bad input: {e}", file=sys.stderr)
            return EXIT_USAGE
        # a failure, not the user's input: the traceback goes to the log for whoever debugs it
        log.error("failed: %s: %s", type(e).__name__, e, exc_info=True)
        return EXIT_FAIL
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
