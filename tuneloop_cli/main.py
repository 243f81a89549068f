"""`tuneloop`: the command line.

    tuneloop demo                        # the SFT pipeline on embedded defaults
    tuneloop run sft --config c.yaml train.steps=100 model.base_model=smollm2-135m
    tuneloop config sft                  # print the default config as YAML
    tuneloop eval CHECKPOINT / tuneloop compare A B
    tuneloop checkpoints list|prune|du, tuneloop services up|down|status, tuneloop data validate FILE

Exit codes: 0 success, 1 failure (including a failed gate), 2 usage / bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "botocore", "filelock", "prefect.events"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_sft_config(args: argparse.Namespace) -> Any:
    from flows.sft_config import PipelineConfig
    from infra.config import load_config

    return load_config(PipelineConfig, args.config, args.overrides)


def cmd_run_sft(args: argparse.Namespace) -> int:
    from flows.sft_pipeline import format_summary, sft_pipeline
    from infra.config import dump_yaml, to_dict

    cfg = _load_sft_config(args)
    print("config:\n" + "\n".join("  " + x for x in dump_yaml(cfg).splitlines()), flush=True)
    res = sft_pipeline(to_dict(cfg), run_name=args.run_name)
    print()
    print(res.verdict_table)
    print()
    print(format_summary(res))
    return EXIT_OK if (res.gate_passed or not args.fail_on_gate) else EXIT_FAIL


def cmd_config(args: argparse.Namespace) -> int:
    from infra.config import dump_yaml

    print(dump_yaml(_load_sft_config(args)), end="")
    return EXIT_OK


def cmd_data_validate(args: argparse.Namespace) -> int:
    from tasks.prepare_data import read_chat_jsonl

    rows = read_chat_jsonl(args.file, need_answer=args.eval)
    print(f"{args.file}: {len(rows)} rows OK")
    return EXIT_OK


def cmd_presets_build(args: argparse.Namespace) -> int:
    from training_core.presets import resolve_model_path

    for name in args.names:
        print(f"{name}: {resolve_model_path(name)}")
    return EXIT_OK


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (defaults are embedded)")
    p.add_argument("overrides", nargs="*", help="overrides like train.steps=100 model.rank=16")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tuneloop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the SFT pipeline on embedded defaults")
    _add_config_args(demo)
    demo.add_argument("--run-name")
    demo.add_argument("--fail-on-gate", action="store_true", help="exit 1 when the gate fails")
    demo.set_defaults(func=cmd_run_sft)

    run = sub.add_parser("run", help="run a pipeline")
    rsub = run.add_subparsers(dest="pipeline", required=True)
    sft = rsub.add_parser("sft", help="SFT: data -> train -> checkpoint -> evaluate -> compare -> track")
    _add_config_args(sft)
    sft.add_argument("--run-name")
    sft.add_argument("--fail-on-gate", action="store_true", help="exit 1 when the gate fails")
    sft.set_defaults(func=cmd_run_sft)

    cfg = sub.add_parser("config", help="print the resolved config as YAML")
    cfg.add_argument("pipeline", choices=["sft"])
    _add_config_args(cfg)
    cfg.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    val = dsub.add_parser("validate", help="validate a chat JSONL file")
    val.add_argument("file")
    val.add_argument("--eval", action="store_true", help="rows must carry an 'answer' to grade against")
    val.set_defaults(func=cmd_data_validate)
    with contextlib.suppress(ImportError):
        from flows.cli import add_push_command

        add_push_command(dsub)

    pre = sub.add_parser("presets", help="build local model presets")
    psub = pre.add_subparsers(dest="presets_command", required=True)
    pb = psub.add_parser("build")
    pb.add_argument("names", nargs="+")
    pb.set_defaults(func=cmd_presets_build)

    for mod, fn in (("evals.cli", "add_eval_commands"), ("infra.retention", "add_checkpoint_commands"),
                    ("infra.services", "add_services_commands"), ("flows.cli", "add_flow_commands")):
        _maybe_register(sub, mod, fn)
    return ap


def _maybe_register(sub: Any, module: str, fn: str) -> None:
    import importlib

    if module == "evals.cli":
        from evals.cli import set_generator_factory

        def make_generator(spec: str) -> Any:  # lazy: keeps `tuneloop --help` free of torch imports
            from tuneloop_cli.generators import make_generator as make

            return make(spec)

        set_generator_factory(make_generator)

    with contextlib.suppress(ImportError, AttributeError):
        register: Callable[[Any], None] = getattr(importlib.import_module(module), fn)
        register(sub)


def main(argv: list[str] | None = None) -> int:
    from tuneloop_cli.env import apply_env_defaults

    apply_env_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from infra.config import ConfigError

    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"tuneloop: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"tuneloop: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
